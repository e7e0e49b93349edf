//! Synthetic data with a planted ground-truth model.
