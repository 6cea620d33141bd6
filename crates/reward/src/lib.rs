//! Turning text into scalar rewards: rule rewards (the r1_zero math grader, shared with
//! align-eval) and the reward-model scorer.

pub mod math;
pub mod model;

pub use math::{R1ZeroScore, answers_equal, normalize_answer, r1_zero_reward};
pub use model::{last_token_scores, score_positions, score_sequences};
