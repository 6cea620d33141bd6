//! `[grpo]`: TRL `GRPOConfig` names and defaults, with the CS336 ablation switches.

use align_losses::grpo::{AdvantageConfig, GrpoLossType, GrpoObjective, MultiObjective, ScaleRewards};
use align_reward::RewardTerm;
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// The CS336 loss variants, by the seed's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossVariant {
    /// `−r·log π`: the raw reward as advantage, no baseline, no normalisation.
    NoBaseline,
    /// `−A·log π` with group-normalised A: the policy gradient, never importance-weighted.
    ReinforceWithBaseline,
    /// The clipped surrogate `−min(ρA, clip(ρ)A)` (GRPO).
    GrpoClip,
    /// `−ρA`: the surrogate without clipping.
    GrpoNoClip,
}

/// CS336's length normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LengthNormalization {
    /// Each sequence's token mean, then the batch mean (= loss_type grpo).
    MaskedMean,
    /// Token sums over a constant, `B · max_completion_length` (= loss_type dr_grpo).
    MaskedNormalize,
}

/// `[grpo]`: TRL `GRPOConfig` names; the CS336 switches override what they name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoSettings {
    /// The reward functions and their weights (see align-reward's `RewardSpec`). Required.
    pub rewards: Vec<RewardTerm>,
    /// Completions per prompt, G. Default 8.
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
    /// Strings that end a completion (e.g. "</answer>"). Default none.
    pub stop_strings: Vec<String>,
    /// Keep the stop string in the completion. Default true.
    pub include_stop_str_in_output: bool,
    /// KL coefficient β against the reference (adapters disabled under LoRA, else a frozen
    /// copy); 0 loads no reference. Default 0.0.
    pub beta: f64,
    /// ε of the clipped surrogate. Default 0.2.
    pub epsilon: f64,
    /// Upper ε (DAPO uses 0.28). Default: `epsilon`.
    pub epsilon_high: Option<f64>,
    /// grpo | bnpo | dr_grpo | dapo. Default dapo.
    pub loss_type: GrpoLossType,
    /// group | batch | none. Default group.
    pub scale_rewards: ScaleRewards,
    /// Added to the std in advantages: 1e-4 (TRL); CS336 uses 1e-6. Default 1e-4.
    pub advantage_eps: f64,
    /// sum_then_normalize | normalize_then_sum. Default sum_then_normalize.
    pub multi_objective_aggregation: MultiObjective,
    /// Optimizer steps per generation batch (CS336 `epochs_per_rollout_batch`). Default 1.
    pub num_iterations: usize,
    /// Completions that hit `max_completion_length` are left out of the loss. Default false.
    pub mask_truncated_completions: bool,
    /// Multiply the k3 KL by the ratio (TRL ≥ 1.10). Default true.
    pub use_bias_correction_kl: bool,
    /// CS336 `loss_type`: no_baseline | reinforce_with_baseline | grpo_clip | grpo_no_clip.
    /// Default none (grpo_clip with TRL's settings).
    pub loss_variant: Option<LossVariant>,
    /// CS336 masked_mean | masked_normalize; overrides `loss_type`. Default none.
    pub length_normalization: Option<LengthNormalization>,
    /// CS336 `use_std_normalization`; false sets `scale_rewards = none`. Default none.
    pub use_std_normalization: Option<bool>,
    /// Temperature of the held-out evaluation (0 = greedy). Default 0.0.
    pub eval_temperature: f32,
    /// Write every completion with its rewards to `completions.jsonl`. Default true.
    pub log_completions: bool,
}

impl Default for GrpoSettings {
    fn default() -> Self {
        GrpoSettings {
            rewards: vec![],
            num_generations: 8,
            max_completion_length: 256,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_new_tokens: 0,
            stop_strings: vec![],
            include_stop_str_in_output: true,
            beta: 0.0,
            epsilon: 0.2,
            epsilon_high: None,
            loss_type: GrpoLossType::Dapo,
            scale_rewards: ScaleRewards::Group,
            advantage_eps: 1e-4,
            multi_objective_aggregation: MultiObjective::SumThenNormalize,
            num_iterations: 1,
            mask_truncated_completions: false,
            use_bias_correction_kl: true,
            loss_variant: None,
            length_normalization: None,
            use_std_normalization: None,
            eval_temperature: 0.0,
            log_completions: true,
        }
    }
}

/// The settings resolved into what the losses take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrpoPlan {
    pub advantages: AdvantageConfig,
    pub objective: GrpoObjective,
    pub loss_type: GrpoLossType,
    /// Off-policy passes weight by the ratio to the sampler's log-probs (false: the plain
    /// policy gradient, REINFORCE variants).
    pub importance_weighted: bool,
}

impl GrpoSettings {
    pub fn plan(&self) -> Result<GrpoPlan> {
        if self.rewards.is_empty() {
            bail!("[grpo] needs at least one reward function: [[grpo.rewards]] kind = \"r1_zero\", …");
        }
        if self.num_generations < 2 && self.scale_rewards == ScaleRewards::Group {
            bail!("num_generations must be at least 2 for group-normalised advantages");
        }
        if self.num_iterations == 0 {
            bail!("num_iterations must be at least 1");
        }
        let (lo, hi) = (self.epsilon, self.epsilon_high.unwrap_or(self.epsilon));
        let mut scale = self.scale_rewards;
        if self.use_std_normalization == Some(false) {
            scale = ScaleRewards::None;
        } else if self.use_std_normalization == Some(true) && scale == ScaleRewards::None {
            scale = ScaleRewards::Group;
        }
        let mut advantages = AdvantageConfig {
            scale_rewards: scale,
            multi_objective: self.multi_objective_aggregation,
            eps: self.advantage_eps,
            baseline: true,
        };
        let (clip, importance_weighted) = match self.loss_variant {
            None | Some(LossVariant::GrpoClip) => (Some((lo, hi)), true),
            Some(LossVariant::GrpoNoClip) => (None, true),
            Some(LossVariant::ReinforceWithBaseline) => (None, false),
            Some(LossVariant::NoBaseline) => {
                advantages.baseline = false;
                advantages.scale_rewards = ScaleRewards::None;
                (None, false)
            }
        };
        let loss_type = match self.length_normalization {
            Some(LengthNormalization::MaskedMean) => GrpoLossType::Grpo,
            Some(LengthNormalization::MaskedNormalize) => GrpoLossType::DrGrpo,
            None => self.loss_type,
        };
        Ok(GrpoPlan {
            advantages,
            objective: GrpoObjective { clip, beta: self.beta, use_bias_correction_kl: self.use_bias_correction_kl },
            loss_type,
            importance_weighted,
        })
    }
}
