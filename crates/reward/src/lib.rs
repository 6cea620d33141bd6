//! Turning text into scalar rewards: rule rewards (the r1_zero math grader, shared with
//! align-eval), reward-model scorers and their combinations.

pub mod math;

pub use math::{R1ZeroScore, answers_equal, normalize_answer, r1_zero_reward};
