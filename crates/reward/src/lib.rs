//! Turning text into scalar rewards. A [`Reward`] scores a completion of a prompt, with
//! the dataset row it came from (ground truth, external scores), and reports named
//! components next to its score so trainers can log each one.
//!
//! Functions: the r1_zero math grader (shared with align-eval), lm-eval's GSM8K numeric
//! match, DAPO's soft overlong length penalty, a coherence signal, the reward-model
//! scorer; the multi-objective terms of a scored-conversations stage, each in [0, 1]:
//! faithfulness (ROUGE-L F1 against the reference reply and context), quality (the row's
//! external score or a reward model's, normalised) and fluency (the reference model's
//! 1/perplexity of the completion); composites: a weighted sum and the ADLF mix.
//! [`RewardSpec`] builds any of them from a stage config; [`best_of_n`] picks among
//! candidates.

pub mod best_of_n;
pub mod combine;
pub mod faithfulness;
pub mod fluency;
pub mod math;
pub mod model;
pub mod quality;
pub mod rollouts;
pub mod rules;
pub mod spec;

use std::collections::BTreeMap;

pub use best_of_n::{BestOfN, Candidate, best_index};
pub use combine::{Adlf, WeightedSum};
pub use faithfulness::{Faithfulness, FaithfulnessAgainst, Grounding, grounding, lcs_len, rouge_l_f1, rouge_tokens};
pub use fluency::{Fluency, loss_token_logprobs};
pub use math::{R1ZeroScore, answers_equal, gsm8k_lm_eval_matches, normalize_answer, r1_zero_reward};
pub use model::{RewardModelScorer, last_token_scores, score_positions, score_sequences};
pub use quality::{Quality, QualitySource, sigmoid};
pub use rollouts::{Scored, score_rollouts};
pub use rules::{Coherence, Gsm8kMatch, Gsm8kMatchMode, R1Zero, R1ZeroFormat, SoftOverlong};
pub use spec::{RewardSpec, RewardTerm, build_reward, build_terms, fill_reference_model};

/// One completion to score.
#[derive(Debug, Clone, Copy)]
pub struct Sample<'a> {
    /// The prompt as the policy saw it (chat template applied, if any).
    pub prompt: &'a str,
    /// The completion text (special tokens skipped; a kept stop string included).
    pub completion: &'a str,
    /// The completion's token ids (length rewards); empty when unknown.
    pub completion_ids: &'a [u32],
    /// The dataset row the prompt came from: `align_data::Example` as JSON
    /// (`{"schema": "prompt_answer", "prompt": …, "answer": …}`), or any object.
    pub example: &'a serde_json::Value,
}

/// A score with the components that make it up (for logging, e.g. `format_reward`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RewardOutput {
    pub score: f64,
    pub components: BTreeMap<String, f64>,
}

impl RewardOutput {
    pub fn scalar(score: f64) -> Self {
        RewardOutput { score, components: BTreeMap::new() }
    }
}

/// A reward error names the function and what was missing.
#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    #[error("reward `{reward}`: {message}")]
    Input { reward: String, message: String },
    #[error("reward `{reward}`: {source}")]
    Model {
        reward: String,
        #[source]
        source: align_model::ModelError,
    },
    #[error("reward config: {0}")]
    Config(String),
}

pub type Result<T, E = RewardError> = std::result::Result<T, E>;

/// A reward function: `(prompt, completion, example) → score + named components`.
pub trait Reward {
    /// The name its metrics are logged under (`rewards/<name>/mean`).
    fn name(&self) -> &str;
    /// Score one completion.
    fn score(&self, sample: &Sample) -> Result<RewardOutput>;
    /// Score many (a reward model batches its forwards); order kept.
    fn score_batch(&self, samples: &[Sample]) -> Result<Vec<RewardOutput>> {
        samples.iter().map(|s| self.score(s)).collect()
    }
}

/// The string field `field` of the example, or an error naming the reward and the field.
pub fn example_str<'a>(reward: &str, example: &'a serde_json::Value, field: &str) -> Result<&'a str> {
    match example.get(field) {
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(other) => Err(RewardError::Input {
            reward: reward.into(),
            message: format!("example field `{field}` is not a string: {other}"),
        }),
        None => Err(RewardError::Input { reward: reward.into(), message: format!("example has no field `{field}`") }),
    }
}

/// The numeric field `field` of the example (an external score), or an error naming the
/// reward and the field.
pub fn example_number(reward: &str, example: &serde_json::Value, field: &str) -> Result<f64> {
    example.get(field).and_then(|v| v.as_f64()).ok_or_else(|| RewardError::Input {
        reward: reward.into(),
        message: format!("example has no numeric field `{field}`"),
    })
}

/// `x` mapped from `[lo, hi]` to [0, 1] and clamped there: how an external score on its own
/// scale (e.g. a judge's 0–5) becomes a reward term comparable with others.
pub fn unit_interval(x: f64, (lo, hi): (f64, f64)) -> f64 {
    ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
}
