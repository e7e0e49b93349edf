//! The scale model: predicts a 2D step's time per stage, its memory per rank and its
//! samples/s on a described machine ([`machine::Machine`]), from the planner's plan and byte
//! counts, so that a grid can be chosen for a cluster nobody can run here.
pub mod calibrate;
pub mod machine;

pub use machine::Machine;
