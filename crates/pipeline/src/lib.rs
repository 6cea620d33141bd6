//! Trainers for each alignment stage and the `align` command.
//!
//! Stage trainers arrive with their issues; today this crate holds the inference commands
//! the stages build on: [`score`] (completion log-probs, comparable with the reference
//! harness) and generation through align-rollout.

pub mod optim;
pub mod score;
pub mod sft;
pub mod trainer;
