//! Ember transport: communicators, sub-communicators and collectives.
