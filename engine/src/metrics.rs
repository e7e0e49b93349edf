//! Quality metrics: log loss, normalized entropy, exact AUC.
