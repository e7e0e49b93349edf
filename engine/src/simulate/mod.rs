//! The scale model: predicts a 2D step's time per stage, its memory per rank and its
//! samples/s on a described machine ([`machine::Machine`]), from the planner's plan and byte
//! counts, so that a grid can be chosen for a cluster nobody can run here (docs/scale.md).
//!
//! The parts: the machine description (`machine`) and its calibration from microbenchmarks
//! (`calibrate`), the embedding kernels' byte convention (`kernels`), collective times on the
//! machine's links (`links`), the step model (`model`) and the choice of a grid and sync
//! interval (`choose`).
pub mod calibrate;
pub mod kernels;
pub mod links;
pub mod choose;
pub mod machine;
pub mod model;
#[cfg(test)]
mod measured_here;

pub use machine::Machine;
pub use model::{predict, Prediction, Scenario, StagePrediction};
