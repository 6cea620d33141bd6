//! The pairwise stages' sections: `[reward]`, `[dpo]`, `[orpo]`, `[simpo]`.

use align_losses::preference::DpoLossType;
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use super::StageConfig;

/// `[reward]`: the Bradley–Terry reward model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RewardSettings {
    /// Adds `c·(r_c + r_r)²` to keep rewards centred (TRL `center_rewards_coefficient`).
    /// Default none.
    pub center_rewards_coefficient: Option<f64>,
    /// Subtract the rows' `margin` column inside the sigmoid when the data has one.
    /// Default true.
    #[serde(default = "yes")]
    pub use_margin: bool,
}

fn yes() -> bool {
    true
}

/// `[dpo]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpoSettings {
    /// Deviation from the reference. Default 0.1.
    pub beta: f64,
    /// sigmoid | cdpo | robust | hinge | ipo. Default sigmoid.
    pub loss_type: DpoLossType,
    /// ε of `cdpo` and `robust` (ignored by `sigmoid`, as in TRL ≥ 0.29). Default 0.0.
    pub label_smoothing: f64,
    /// Compute the reference log-probs of every pair once before training and hold no
    /// reference model afterwards. Default false.
    pub precompute_ref_log_probs: bool,
    /// Weight of an added NLL term, the mean loss per chosen completion token of the batch:
    /// RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"), TRL's
    /// `loss_type = ["sigmoid", "sft"]` with `loss_weights = [1, sft_weight]`. It keeps
    /// the chosen answers likely while DPO pushes the pair apart. Default 0 (pure DPO).
    pub sft_weight: f64,
}

impl Default for DpoSettings {
    fn default() -> Self {
        DpoSettings {
            beta: 0.1,
            loss_type: DpoLossType::Sigmoid,
            label_smoothing: 0.0,
            precompute_ref_log_probs: false,
            sft_weight: 0.0,
        }
    }
}

/// `[orpo]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrpoSettings {
    /// λ, the odds-ratio weight (TRL's `beta`). Default 0.1.
    pub beta: f64,
    /// NLL over the chosen completion only (the paper) instead of prompt + chosen (TRL).
    /// Default false.
    pub completion_only_nll: bool,
}

impl Default for OrpoSettings {
    fn default() -> Self {
        OrpoSettings { beta: 0.1, completion_only_nll: false }
    }
}

/// `[simpo]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimpoSettings {
    /// Reward scale β. Default 2.0 (the paper's range is 2.0–2.5).
    pub beta: f64,
    /// Target reward margin γ. Default 0.5 (TRL `simpo_gamma`).
    pub gamma: f64,
    /// Conservative smoothing ε. Default 0.0.
    pub label_smoothing: f64,
    /// Weight of an added chosen NLL term (TRL `cpo_alpha`; 0 for pure SimPO). Default 0.0.
    pub sft_weight: f64,
}

impl Default for SimpoSettings {
    fn default() -> Self {
        SimpoSettings { beta: 2.0, gamma: 0.5, label_smoothing: 0.0, sft_weight: 0.0 }
    }
}

/// Which pairwise objective a stage trains.
#[derive(Debug, Clone, PartialEq)]
pub enum Objective {
    Reward(RewardSettings),
    Dpo(DpoSettings),
    Orpo(OrpoSettings),
    Simpo(SimpoSettings),
}

/// A pairwise stage's config: the stage config shared by every stage.
pub type PreferenceConfig = StageConfig;

/// The stage names of `align` for [`PreferenceConfig::objective`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairwiseStage {
    Reward,
    Dpo,
    Orpo,
    Simpo,
}

impl StageConfig {
    /// The objective of `stage`, from its section (defaults when absent); a section of
    /// another stage is an error, so a DPO config is never silently run as ORPO.
    pub fn objective(&self, stage: PairwiseStage) -> Result<Objective> {
        let own = match stage {
            PairwiseStage::Reward => "reward",
            PairwiseStage::Dpo => "dpo",
            PairwiseStage::Orpo => "orpo",
            PairwiseStage::Simpo => "simpo",
        };
        self.check_sections(own, Some(own))?;
        if self.packing {
            bail!("packing applies to the sft stage only, not to {own}");
        }
        Ok(match stage {
            PairwiseStage::Reward => Objective::Reward(self.reward.clone().unwrap_or_default()),
            PairwiseStage::Dpo => Objective::Dpo(self.dpo.clone().unwrap_or_default()),
            PairwiseStage::Orpo => Objective::Orpo(self.orpo.clone().unwrap_or_default()),
            PairwiseStage::Simpo => Objective::Simpo(self.simpo.clone().unwrap_or_default()),
        })
    }
}
