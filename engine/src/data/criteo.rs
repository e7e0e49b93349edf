//! Streaming reader of the Criteo formats.
