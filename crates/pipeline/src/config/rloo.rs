//! `[rloo]`: TRL `RLOOConfig` names and defaults.

use align_reward::RewardTerm;
use serde::{Deserialize, Serialize};

/// `[rloo]`: TRL `RLOOConfig` names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RlooSettings {
    /// The reward functions and their weights (see align-reward's `RewardSpec`). Required.
    pub rewards: Vec<RewardTerm>,
    /// Completions per prompt, k (at least 2: the baseline needs a sibling). Default 2.
    pub num_generations: usize,
    /// Tokens per completion at most. Default 256.
    pub max_completion_length: usize,
    /// Default 1.0.
    pub temperature: f32,
    /// Default 1.0 (off).
    pub top_p: f32,
    /// Default 0 (off).
    pub top_k: usize,
    /// Default 0.
    pub min_new_tokens: usize,
    /// Strings that end a completion. Default none.
    pub stop_strings: Vec<String>,
    /// Keep the stop string in the completion. Default true.
    pub include_stop_str_in_output: bool,
    /// KL coefficient β: the reward is less β·Σ_t(log π_old − log π_ref) (k1, summed over
    /// the completion); 0 loads no reference. Default 0.05.
    pub beta: f64,
    /// ε of the clipped surrogate. Default 0.2.
    pub epsilon: f64,
    /// Upper ε. Default: `epsilon`.
    pub epsilon_high: Option<f64>,
    /// Optimizer steps per generation batch (μ). Default 1.
    pub num_iterations: usize,
    /// Rescale the batch's advantages to mean 0, std 1. Default false.
    pub normalize_advantages: bool,
    /// Clamp rewards to `[min, max]` before the KL penalty. Default none.
    pub reward_clip_range: Option<[f64; 2]>,
    /// Completions that hit `max_completion_length` contribute no log-probs. Default false.
    pub mask_truncated_completions: bool,
    /// Temperature of the held-out evaluation (0 = greedy). Default 0.0.
    pub eval_temperature: f32,
    /// Write every completion with its rewards to `completions.jsonl`. Default true.
    pub log_completions: bool,
}

impl Default for RlooSettings {
    fn default() -> Self {
        RlooSettings {
            rewards: vec![],
            num_generations: 2,
            max_completion_length: 256,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_new_tokens: 0,
            stop_strings: vec![],
            include_stop_str_in_output: true,
            beta: 0.05,
            epsilon: 0.2,
            epsilon_high: None,
            num_iterations: 1,
            normalize_advantages: false,
            reward_clip_range: None,
            mask_truncated_completions: false,
            eval_temperature: 0.0,
            log_completions: true,
        }
    }
}
