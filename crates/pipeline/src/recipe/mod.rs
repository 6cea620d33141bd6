//! Pipelines: a TOML file of stages (SFT → reward → RL, with branches) run in order, each
//! reading models and data from earlier stages by reference, each skipped when its
//! resolved config and inputs are unchanged, resumed when interrupted, and re-run (with
//! everything downstream of it) when changed.
//!
//! ```toml
//! name = "demo"                          # runs/<name>/
//! [base]                                 # what "@base" means
//! path = "model.gguf"                    # or fetch = "smollm2", or init = { … }
//! [data.arith]                           # a dataset generated in-process: "@arith/sft.jsonl"
//! kind = "synthetic_arithmetic"
//! [[stages]]
//! name = "sft"
//! kind = "sft"
//! model = "@base"                        # "@<stage>": that stage's model
//! data = "@arith/sft.jsonl"
//! evals = [{ name = "arith", kind = "rewards", data = "@arith/eval.jsonl", rewards = [{ kind = "r1_zero" }] }]
//! [stages.training]                      # the stage's own config sections, as `align <stage>` reads them
//! max_steps = 300
//! ```
//!
//! - [`resolve`]: `--set`, `--smoke`, references and fingerprints.
//! - [`run`]: the base model, generated data, each stage and its evals.
//! - [`evals`]: what can be evaluated after a stage.
//! - [`report`]: `report.md`, one row per stage, with PNG curves.

pub mod evals;
pub mod report;
pub mod resolve;
pub mod run;
pub mod tables;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use resolve::{Options, Pipeline, StagePlan, load};
pub use run::{StageState, list, run_pipeline};

/// What a stage does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageKind {
    Sft,
    Reward,
    Dpo,
    Orpo,
    Simpo,
    Kto,
    Ppo,
    Grpo,
    Rloo,
    BestOfN,
    /// No training: the evals of a model (a baseline row of the report).
    Eval,
}

impl StageKind {
    /// Whether the stage trains a policy (its model output is `final/`, merged under LoRA).
    pub fn trains_policy(self) -> bool {
        matches!(
            self,
            Self::Sft | Self::Dpo | Self::Orpo | Self::Simpo | Self::Kto | Self::Ppo | Self::Grpo | Self::Rloo
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Sft => "sft",
            Self::Reward => "reward",
            Self::Dpo => "dpo",
            Self::Orpo => "orpo",
            Self::Simpo => "simpo",
            Self::Kto => "kto",
            Self::Ppo => "ppo",
            Self::Grpo => "grpo",
            Self::Rloo => "rloo",
            Self::BestOfN => "best_of_n",
            Self::Eval => "eval",
        }
    }
}

/// The pipeline file as written (before `--set`, references and `--smoke`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// Runs go to `<runs_dir>/<name>/`.
    pub name: String,
    /// One paragraph on what the recipe reproduces. Default none.
    #[serde(default)]
    pub description: Option<String>,
    /// The real-size model the recipe is written for on CUDA. Default none.
    #[serde(default)]
    pub target: Option<String>,
    /// Default "runs" (relative to the working directory).
    #[serde(default = "default_runs_dir")]
    pub runs_dir: PathBuf,
    /// The model `@base` names.
    pub base: BaseModel,
    /// Datasets generated in-process, named for `@<name>/<file>` references. Default none.
    #[serde(default)]
    pub data: BTreeMap<String, DataSource>,
    /// Keys every stage starts from (its own keys win; sub-tables merge key by key), such as
    /// the eval list every stage runs. Default none.
    #[serde(default)]
    pub defaults: toml::Table,
    /// Run in this order; a stage may reference only stages above it. A stage with
    /// `extends = "<earlier stage>"` starts from that stage's table and is written as its
    /// difference (an ablation).
    pub stages: Vec<toml::Table>,
}

fn default_runs_dir() -> PathBuf {
    PathBuf::from("runs")
}

/// `[base]`: exactly one of `path`, `fetch`, `init`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseModel {
    /// A GGUF file or an HF checkpoint directory.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// A model `cargo xtask fetch` downloads, verifies and caches (`smollm2`).
    #[serde(default)]
    pub fetch: Option<String>,
    /// A randomly initialised model (the demo: no download).
    #[serde(default)]
    pub init: Option<RandomBase>,
}

/// A model initialised from a `config.json` and a word-level vocabulary of a generated
/// dataset; written to `runs/<name>/base/` as an HF checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomBase {
    /// A Llama `config.json`; `vocab_size` and the special-token ids come from the tokenizer.
    pub config: PathBuf,
    /// The `[data.<name>]` whose words make the tokenizer.
    pub vocabulary: String,
    /// Default 0.
    #[serde(default)]
    pub seed: u64,
    /// Std of the normal init (transformers' `initializer_range`). Default 0.02.
    #[serde(default = "default_init_std")]
    pub std: f64,
}

fn default_init_std() -> f64 {
    0.02
}

/// `[data.<name>]`: a dataset generated from a seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DataSource {
    /// Arithmetic word problems (align-data's `synthetic`), written as `sft.jsonl`
    /// (prompt/completion), `preference.jsonl` (right vs wrong answer), `rl.jsonl`
    /// (prompt/answer) from the train problems and `eval.jsonl` (prompt/answer),
    /// `preference_eval.jsonl` from the held-out ones.
    SyntheticArithmetic {
        /// Default 0.
        #[serde(default)]
        seed: u64,
        /// Train problems. Default 2000.
        #[serde(default = "default_train")]
        train: usize,
        /// Held-out problems (another seed stream). Default 200.
        #[serde(default = "default_eval")]
        eval: usize,
        /// Operands of sums and differences up to this (products: up to 10). Default 20.
        #[serde(default = "default_max_operand")]
        max_operand: i64,
        /// A rejected answer is off by 1..=spread. Default 5.
        #[serde(default = "default_spread")]
        wrong_spread: i64,
    },
    /// PIQA rows (`goal`, `sol1`, `sol2`, `label`) as scored conversations: each goal twice,
    /// a user turn and one solution as the assistant turn, `meta_eval_score` 9 for the right
    /// solution and 2 for the other (a 0–10 judge scale), and a `score_reason` (a wrong
    /// solution's names the right one). Written as `scored.jsonl`, and the right-solution
    /// half as `best.jsonl`.
    PiqaScoredConversations {
        path: PathBuf,
        /// Rows to skip first. Default 0.
        #[serde(default)]
        skip: usize,
        /// Rows to read at most. Default all.
        #[serde(default)]
        limit: Option<usize>,
    },
}

fn default_train() -> usize {
    2000
}
fn default_eval() -> usize {
    200
}
fn default_max_operand() -> i64 {
    20
}
fn default_spread() -> i64 {
    5
}
