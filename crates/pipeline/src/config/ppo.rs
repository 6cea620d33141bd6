//! `[ppo]`: TRL `PPOConfig` names and defaults.

use std::path::PathBuf;

use align_losses::KlEstimator;
use align_reward::RewardTerm;
use serde::{Deserialize, Serialize};

/// Where the values come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Critic {
    /// Its own network (TRL's value model), initialised from `value_model_path`.
    #[default]
    Separate,
    /// A scalar value head on the policy's trunk (TRL's older `ValueHead`): one forward
    /// for both, the trunk shared by both losses.
    Shared,
}

/// `[ppo]`: TRL `PPOConfig` names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PpoSettings {
    /// What scores a completion (usually `{ kind = "model", path = "<reward stage>/final" }`;
    /// any reward functions, weighted). Required.
    pub rewards: Vec<RewardTerm>,
    /// separate | shared. Default separate.
    pub critic: Critic,
    /// The separate critic's starting checkpoint. Default: the first `model` reward's
    /// path (TRL's recipe starts the value model from the reward model), else the policy's.
    pub value_model_path: Option<PathBuf>,
    /// Tokens per completion at most (TRL `response_length`). Default 53.
    pub max_completion_length: usize,
    /// Default 0.7.
    pub temperature: f32,
    /// Default 1.0 (off).
    pub top_p: f32,
    /// Default 0 (off).
    pub top_k: usize,
    /// Default 0.
    pub min_new_tokens: usize,
    /// Passes over each rollout batch. Default 4.
    pub num_ppo_epochs: usize,
    /// Minibatches per pass (an optimizer step each). Default 1.
    pub num_mini_batches: usize,
    /// KL coefficient (the initial one when adaptive). Default 0.05.
    pub kl_coef: f64,
    /// k1 | k3 (TRL `kl_estimator`). Default k1.
    pub kl_estimator: KlEstimator,
    /// Adapt kl_coef toward `kl_target` (Ziegler et al. 2019). Default false.
    pub adaptive_kl: bool,
    /// The KL (summed over a completion, averaged over the batch) to hold. Default 6.0.
    pub kl_target: f64,
    /// Completions over which the coefficient may move by ≈ 20%. Default 10000.
    pub kl_horizon: f64,
    /// Default 0.2.
    pub cliprange: f64,
    /// Default 0.2.
    pub cliprange_value: f64,
    /// Default 0.1.
    pub vf_coef: f64,
    /// Default 1.0.
    pub gamma: f64,
    /// Default 0.95.
    pub lam: f64,
    /// Whiten the per-token rewards before GAE. Default false.
    pub whiten_rewards: bool,
    /// Subtracted from the score of a completion without EOS. Default none.
    pub missing_eos_penalty: Option<f64>,
    /// Temperature of the held-out evaluation (0 = greedy). Default 0.0.
    pub eval_temperature: f32,
    /// Write every completion with its score and KL to `completions.jsonl`. Default true.
    pub log_completions: bool,
}

impl Default for PpoSettings {
    fn default() -> Self {
        PpoSettings {
            rewards: vec![],
            critic: Critic::Separate,
            value_model_path: None,
            max_completion_length: 53,
            temperature: 0.7,
            top_p: 1.0,
            top_k: 0,
            min_new_tokens: 0,
            num_ppo_epochs: 4,
            num_mini_batches: 1,
            kl_coef: 0.05,
            kl_estimator: KlEstimator::K1,
            adaptive_kl: false,
            kl_target: 6.0,
            kl_horizon: 10000.0,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            gamma: 1.0,
            lam: 0.95,
            whiten_rewards: false,
            missing_eos_penalty: None,
            eval_temperature: 0.0,
            log_completions: true,
        }
    }
}
