//! The sections beyond next-token loss that scored conversations bring: `[score_conditioning]`
//! (SFT, and the online stages' prompts), `[self_critique]` and `[contrastive]` (SFT).

use align_data::scored::{CritiqueTask, DEFAULT_CRITIQUE_INSTRUCTION, DEFAULT_SCORE_FORMAT, ScoreCondition};
use align_losses::contrastive::ContrastiveDirection;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// `[score_conditioning]`: in SFT, each scored conversation's first user turn starts with
/// its score's control string (Decision Transformer / SteerLM), so generation can ask for a
/// score (`align generate --target-score 5`); in GRPO, RLOO and PPO, every prompt asks for
/// `target`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoreConditioningConfig {
    /// The control string; `{score}` is replaced by the row's `meta_eval_score`.
    /// Default "<score>{score}</score>\n".
    pub format: String,
    /// The online stages: the score every prompt asks for (required there; SFT conditions
    /// each row on its own score and refuses it). Default none.
    pub target: Option<f64>,
}

impl Default for ScoreConditioningConfig {
    fn default() -> Self {
        ScoreConditioningConfig { format: DEFAULT_SCORE_FORMAT.into(), target: None }
    }
}

impl ScoreConditioningConfig {
    pub fn condition(&self) -> Result<ScoreCondition> {
        if self.target.is_some_and(|t| !t.is_finite()) {
            bail!("[score_conditioning] target: must be a finite number");
        }
        ScoreCondition::new(&self.format).map_err(|e| anyhow::anyhow!("[score_conditioning] format: {e}"))
    }

    /// The condition and target of an online stage's prompts.
    pub fn online(&self, stage: &str) -> Result<(ScoreCondition, f64)> {
        let target = self.target.with_context(|| {
            format!("[score_conditioning] target: the {stage} stage needs the score its prompts ask for")
        })?;
        Ok((self.condition()?, target))
    }
}

/// `[self_critique]`: next to each scored conversation, train on its critique: given the
/// conversation, write its `score_reason` and `Score: N`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SelfCritiqueConfig {
    /// The critique tokens' weight in the loss (the seed's `--critique_weight`); the
    /// replies' tokens weigh 1. Default 0.5.
    pub weight: f64,
    /// The instruction before the conversation; `{max_score}` is replaced. Default "Critique
    /// the assistant's last reply in the conversation below, then rate it from 0 to
    /// {max_score}."
    pub instruction: String,
    /// The top of the scores' scale. Default 5 (`meta_eval_score`'s 0–5).
    pub max_score: f64,
}

impl Default for SelfCritiqueConfig {
    fn default() -> Self {
        SelfCritiqueConfig { weight: 0.5, instruction: DEFAULT_CRITIQUE_INSTRUCTION.into(), max_score: 5.0 }
    }
}

impl SelfCritiqueConfig {
    pub fn task(&self) -> Result<CritiqueTask> {
        if !(self.weight.is_finite() && self.weight > 0.0) {
            bail!("[self_critique] weight: must be a positive number, found {}", self.weight);
        }
        CritiqueTask::new(&self.instruction, self.max_score).map_err(|e| anyhow::anyhow!("[self_critique] {e}"))
    }
}

/// `[contrastive]`: an auxiliary InfoNCE loss between each row's prompt and its reply
/// (mean-pooled final hidden states), the other replies of the micro-batch as negatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContrastiveConfig {
    /// The auxiliary loss's weight next to the token loss. Default 0.1.
    pub weight: f64,
    /// The softmax temperature τ (the seed's `--contrastive_temp`). Default 0.07.
    pub temperature: f64,
    /// symmetric (CLIP) | prompt_to_response (InfoNCE one way). Default symmetric.
    pub direction: ContrastiveDirection,
}

impl Default for ContrastiveConfig {
    fn default() -> Self {
        ContrastiveConfig { weight: 0.1, temperature: 0.07, direction: ContrastiveDirection::Symmetric }
    }
}

impl ContrastiveConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.weight.is_finite() && self.weight > 0.0) {
            bail!("[contrastive] weight: must be a positive number, found {}", self.weight);
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            bail!("[contrastive] temperature: must be a positive number, found {}", self.temperature);
        }
        Ok(())
    }
}
