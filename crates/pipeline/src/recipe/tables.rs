//! The tables of the recipe-only stage kinds (`best_of_n`, `eval`) and the version of
//! generated data; read by resolution (validation, fingerprints) and by the runner.

use align_reward::RewardTerm;
use serde::{Deserialize, Serialize};

use crate::config::ModelSpec;

/// Bump when a generated dataset's contents change for the same settings.
pub const DATA_VERSION: &str = "2";

/// `best_of_n` stage settings (the stage's table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BestOfNStage {
    /// The policy that samples.
    pub model: ModelSpec,
    /// Rows with a `prompt`.
    pub data: align_data::DatasetConfig,
    /// What picks the best (usually `[{ kind = "model", path = "@reward" }]`).
    pub rewards: Vec<RewardTerm>,
    /// Candidates per prompt. Default 4.
    #[serde(default = "default_n")]
    pub n: usize,
    /// Default 0.8.
    #[serde(default = "default_bon_temperature")]
    pub temperature: f32,
    /// Default 1.0.
    #[serde(default = "default_top_p")]
    pub top_p: f32,
    /// Default 0 (off).
    #[serde(default)]
    pub top_k: usize,
    /// Default 64.
    #[serde(default = "default_bon_tokens")]
    pub max_new_tokens: usize,
    /// Default none.
    #[serde(default)]
    pub stop_strings: Vec<String>,
    /// Default 0.
    #[serde(default)]
    pub seed: u64,
    /// Also write `pairs.jsonl`: each prompt's best candidate against its worst, when the
    /// best scores higher (on-policy preference pairs for DPO). Default false.
    #[serde(default)]
    pub pairs: bool,
    /// Print every prompt with its candidates (as the seed recipe shows them). Default true.
    #[serde(default = "yes")]
    pub print: bool,
}

fn yes() -> bool {
    true
}

fn default_n() -> usize {
    4
}
fn default_bon_temperature() -> f32 {
    0.8
}
fn default_top_p() -> f32 {
    1.0
}
fn default_bon_tokens() -> usize {
    64
}

/// `eval` stage settings: only the model (the evals are the stage's `evals`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalStage {
    pub model: ModelSpec,
}
