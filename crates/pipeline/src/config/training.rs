//! `[training]`: the optimisation settings every stage shares, by Hugging Face
//! `TrainingArguments` names and defaults.

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::optim::{AdamWConfig, Schedule};

/// `[training]`: HF TrainingArguments names; every default documented.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingArguments {
    /// Examples per micro-batch. Default 8.
    pub per_device_train_batch_size: usize,
    /// Micro-batches per optimizer step. Default 1.
    pub gradient_accumulation_steps: usize,
    /// Peak learning rate. Default 5e-5.
    pub learning_rate: f64,
    /// constant | linear | cosine | cosine_with_restarts. Default linear.
    pub lr_scheduler_type: Schedule,
    /// Cosine cycles (0.5 = half a cosine; restarts: number of cycles). Default 0.5.
    pub num_cycles: f64,
    /// Warmup as a fraction of all steps. Default 0.0.
    pub warmup_ratio: f64,
    /// Warmup steps; wins over warmup_ratio when > 0. Default 0.
    pub warmup_steps: usize,
    /// Epochs over the data. Default 3.0.
    pub num_train_epochs: f64,
    /// Optimizer steps; overrides num_train_epochs when set. Default none.
    pub max_steps: Option<usize>,
    /// Clip the global gradient norm to this (0 = off). Default 1.0.
    pub max_grad_norm: f64,
    /// Log every N steps. Default 10.
    pub logging_steps: usize,
    /// Evaluate the eval loss every N steps (needs eval data). Default none.
    pub eval_steps: Option<usize>,
    /// Also evaluate before the first step (logged as step 0). Default false.
    pub eval_on_start: bool,
    /// Checkpoint every N steps (0 = only the final model). Default 500.
    pub save_steps: usize,
    /// Keep at most this many checkpoints. Default none (all).
    pub save_total_limit: Option<usize>,
    /// Seed of shuffling, adapter init and dropout. Default 42.
    pub seed: u64,
    /// bf16 mixed precision: weights, activations and gradients in bf16 (half the memory
    /// and, on CUDA, tensor-core matmuls), while the optimizer keeps f32 master weights and
    /// moments (as Apex O2 / HF `bf16` with f32 masters), norms and losses run in f32, and
    /// `final/` is exported from the masters in f32. On the CPU backend bf16 is emulated
    /// and slower than f32. Default false.
    pub bf16: bool,
    /// Recompute cheap activations in backward instead of keeping them (Burn's balanced
    /// checkpointing strategy, chosen by the stage runner): less memory, more compute.
    /// Default false.
    pub gradient_checkpointing: bool,
    /// AdamW β1. Default 0.9.
    pub adam_beta1: f64,
    /// AdamW β2. Default 0.999.
    pub adam_beta2: f64,
    /// AdamW ε. Default 1e-8.
    pub adam_epsilon: f64,
    /// Decoupled weight decay (not on norms, biases, embeddings). Default 0.0.
    pub weight_decay: f64,
    /// Non-finite updates (NaN or infinite loss or gradient norm) skipped in a row before
    /// the run stops; a skipped update leaves the weights and the optimizer untouched and
    /// is counted as `skipped_updates` in metrics.jsonl. 0 stops at the first. Default 0.
    pub skip_nonfinite_steps: usize,
    /// Where the logged rows go (TRL's `report_to`): a name or a list of `"jsonl"`,
    /// `"tensorboard"`, `"all"` (both) and `"none"` (no dashboards). `metrics.jsonl` is
    /// always written, whatever the list says: resume and the pipeline report read it.
    /// `"tensorboard"` also writes each row as TensorBoard scalars, one tag per
    /// metrics.jsonl key at the row's step, to `<output_dir>/events.out.tfevents.*`
    /// (`tensorboard --logdir runs/` shows each stage as a run). Those files follow
    /// metrics.jsonl whatever the list: a fresh run removes a former run's, a resume cuts
    /// them back to the checkpoint's step. Default
    /// `["jsonl", "tensorboard"]`: TRL's default is every installed integration, and this
    /// one costs a few hundred bytes per logged row.
    pub report_to: ReportTo,
}

/// `[training] report_to`: the dashboards fed besides `metrics.jsonl` (always written).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ReportNames", into = "Vec<String>")]
pub struct ReportTo {
    /// TensorBoard event files in the output directory.
    pub tensorboard: bool,
}

impl Default for ReportTo {
    fn default() -> Self {
        ReportTo { tensorboard: true }
    }
}

/// The names `report_to` accepts.
const REPORT_NAMES: &str = r#""jsonl", "tensorboard", "all", "none""#;

/// `report_to` as written: one name (`"none"`, as TRL allows) or a list of them.
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = r#"[training] report_to: expected a name or a list of names ("jsonl", "tensorboard", "all", "none")"#
)]
enum ReportNames {
    One(String),
    Many(Vec<String>),
}

impl TryFrom<ReportNames> for ReportTo {
    type Error = String;

    fn try_from(names: ReportNames) -> Result<Self, String> {
        let names = match names {
            ReportNames::One(n) => vec![n],
            ReportNames::Many(n) => n,
        };
        let mut report = ReportTo { tensorboard: false };
        for name in &names {
            match name.as_str() {
                "jsonl" => {}
                "tensorboard" | "all" => report.tensorboard = true,
                // "none" with something else would say two contradicting things.
                "none" if names.len() == 1 => {}
                "none" => return Err(format!("[training] report_to: \"none\" stands alone, found {names:?}")),
                other => {
                    return Err(format!("[training] report_to: unknown value {other:?}; accepted: {REPORT_NAMES}"));
                }
            }
        }
        Ok(report)
    }
}

impl From<ReportTo> for Vec<String> {
    fn from(r: ReportTo) -> Self {
        let mut names = vec!["jsonl".to_string()];
        if r.tensorboard {
            names.push("tensorboard".into());
        }
        names
    }
}

impl Default for TrainingArguments {
    fn default() -> Self {
        TrainingArguments {
            per_device_train_batch_size: 8,
            gradient_accumulation_steps: 1,
            learning_rate: 5e-5,
            lr_scheduler_type: Schedule::Linear,
            num_cycles: 0.5,
            warmup_ratio: 0.0,
            warmup_steps: 0,
            num_train_epochs: 3.0,
            max_steps: None,
            max_grad_norm: 1.0,
            logging_steps: 10,
            eval_steps: None,
            eval_on_start: false,
            save_steps: 500,
            save_total_limit: None,
            seed: 42,
            bf16: false,
            gradient_checkpointing: false,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            weight_decay: 0.0,
            skip_nonfinite_steps: 0,
            report_to: ReportTo::default(),
        }
    }
}

impl TrainingArguments {
    /// Refuse values that would train silently wrong (gradient ascent, no steps, a
    /// schedule outside its range), naming the `[training]` field.
    pub fn validate(&self) -> Result<()> {
        let field = |name: &str, why: String| Err(anyhow::anyhow!("[training] {name}: {why}"));
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 { Ok(()) } else { field(name, format!("must be a positive number, found {v}")) }
        };
        let non_negative = |name: &str, v: f64| {
            if v.is_finite() && v >= 0.0 { Ok(()) } else { field(name, format!("must be a number ≥ 0, found {v}")) }
        };
        let at_least_one =
            |name: &str, v: usize| if v >= 1 { Ok(()) } else { field(name, "must be at least 1, found 0".into()) };
        at_least_one("per_device_train_batch_size", self.per_device_train_batch_size)?;
        at_least_one("gradient_accumulation_steps", self.gradient_accumulation_steps)?;
        at_least_one("logging_steps", self.logging_steps)?;
        positive("learning_rate", self.learning_rate)?;
        positive("num_cycles", self.num_cycles)?;
        positive("adam_epsilon", self.adam_epsilon)?;
        non_negative("max_grad_norm", self.max_grad_norm)?;
        non_negative("weight_decay", self.weight_decay)?;
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return field("warmup_ratio", format!("must be in [0, 1], found {}", self.warmup_ratio));
        }
        for (name, beta) in [("adam_beta1", self.adam_beta1), ("adam_beta2", self.adam_beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return field(name, format!("must be in [0, 1), found {beta}"));
            }
        }
        match self.max_steps {
            Some(0) => return field("max_steps", "must be at least 1 (0 would train nothing)".into()),
            Some(_) => {}
            None => positive("num_train_epochs", self.num_train_epochs)?,
        }
        if self.eval_steps == Some(0) {
            return field("eval_steps", "must be at least 1, found 0 (leave it out for no evals)".into());
        }
        if self.save_total_limit == Some(0) {
            return field(
                "save_total_limit",
                "must be at least 1, found 0 (set save_steps = 0 for no checkpoints)".into(),
            );
        }
        Ok(())
    }

    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            adam_beta1: self.adam_beta1,
            adam_beta2: self.adam_beta2,
            adam_epsilon: self.adam_epsilon,
            weight_decay: self.weight_decay,
            decay_all: false,
        }
    }

    /// Logged steps of a run: `max_steps`, else `num_train_epochs` over `rounds_per_epoch`
    /// batches (rounded up), each trained for `steps_per_round` steps.
    pub fn total_steps(&self, rounds_per_epoch: usize, steps_per_round: usize) -> usize {
        if let Some(s) = self.max_steps {
            return s;
        }
        ((rounds_per_epoch as f64 * self.num_train_epochs).ceil().max(1.0) as usize) * steps_per_round
    }

    /// Warmup steps of a schedule `total` optimizer steps long.
    pub fn warmup(&self, total: usize) -> usize {
        if self.warmup_steps > 0 { self.warmup_steps } else { (self.warmup_ratio * total as f64).ceil() as usize }
    }
}
