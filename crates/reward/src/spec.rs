//! Reward functions from a stage config:
//!
//! ```toml
//! [[grpo.rewards]]
//! kind = "r1_zero"        # r1_zero | r1_zero_format | gsm8k | length | coherence | model | adlf
//!                         # | faithfulness | quality | fluency
//! weight = 1.0            # default 1.0
//! ```
//!
//! The multi-objective terms of a scored-conversations stage, each in [0, 1]:
//!
//! ```toml
//! rewards = [
//!   { kind = "fluency", weight = 0.2 },                         # the reference model's 1/perplexity
//!   { kind = "faithfulness", against = "both", weight = 0.3 },  # ROUGE-L F1 vs reply and context
//!   { kind = "quality", field = "score", range = [0, 5], weight = 0.5 },  # the row's score
//! ]
//! # quality from a reward model instead: { kind = "quality", model = "runs/rm/final" }
//! ```

use std::path::PathBuf;

use align_model::FusedOps;
use serde::{Deserialize, Deserializer, Serialize};

use crate::combine::{Adlf, WeightedSum};
use crate::faithfulness::{Faithfulness, FaithfulnessAgainst};
use crate::fluency::Fluency;
use crate::model::RewardModelScorer;
use crate::quality::{Quality, QualitySource};
use crate::rules::{Coherence, Gsm8kMatch, Gsm8kMatchMode, R1Zero, R1ZeroFormat, SoftOverlong};
use crate::{Result, Reward, RewardError};

fn answer() -> String {
    "answer".into()
}
fn three() -> usize {
    3
}
fn eight() -> usize {
    8
}
fn yes() -> bool {
    true
}
fn score_field() -> String {
    "score".into()
}
fn unit() -> (f64, f64) {
    (0.0, 1.0)
}
/// A scored conversation's `meta_eval_score` scale.
fn judge_scale() -> (f64, f64) {
    (0.0, 5.0)
}

/// One reward function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RewardSpec {
    /// The r1_zero grader: components format_reward, answer_reward.
    R1Zero {
        /// The example's ground-truth field. Default "answer".
        #[serde(default = "answer")]
        answer_field: String,
        /// 0: the grader's reward (= answer_reward); w > 0: w·format + (1 − w)·answer.
        /// Default 0.
        #[serde(default)]
        format_weight: f64,
    },
    /// Partial credit towards the r1_zero format (four checks, mean), for shaping.
    R1ZeroFormat,
    /// lm-eval's GSM8K number match.
    Gsm8k {
        /// Default "answer".
        #[serde(default = "answer")]
        answer_field: String,
        /// strict (after "#### ") | flexible (last number). Default flexible.
        #[serde(default)]
        mode: Gsm8kMatchMode,
    },
    /// DAPO's soft overlong penalty in completion tokens.
    Length {
        max_tokens: usize,
        /// Tokens before `max_tokens` where the penalty ramps from 0 to −1.
        cache_tokens: usize,
    },
    /// Distinct word n-grams × clean characters, in [0, 1].
    Coherence {
        /// Default 3.
        #[serde(default = "three")]
        n: usize,
    },
    /// A reward model from the reward stage (an HF sequence-classification directory).
    Model {
        path: PathBuf,
        /// Sequences per forward. Default 8.
        #[serde(default = "eight")]
        batch_size: usize,
        /// Append EOS after the completion, as the reward stage's tokenisation does.
        /// Default true.
        #[serde(default = "yes")]
        append_eos: bool,
    },
    /// `(1 − alpha)·external + alpha·internal`, external = the example's `external_field`
    /// mapped from `external_range` to [0, 1], internal = the weighted sum of `internal`.
    Adlf {
        alpha: f64,
        /// Default "score" (a scored conversation's `meta_eval_score`).
        #[serde(default = "score_field")]
        external_field: String,
        /// Default [0, 1].
        #[serde(default = "unit")]
        external_range: (f64, f64),
        internal: Vec<RewardTerm>,
    },
    /// ROUGE-L F1 of the completion against the row's reference reply (its last assistant
    /// turn, completion or answer) and/or its context (the turns before, or the prompt), in
    /// [0, 1]; components rouge_l_reference, rouge_l_context.
    Faithfulness {
        /// reference | context | both (the mean). Default both.
        #[serde(default)]
        against: FaithfulnessAgainst,
    },
    /// A quality score in [0, 1]: the row's external score by default
    /// (`{ kind = "quality", field = "score", range = [0, 5] }`), or a reward model's when
    /// `model` is given (`{ kind = "quality", model = "dir", batch_size = 8 }`); the two
    /// sets of fields do not mix. Component raw.
    Quality {
        /// The example's numeric field. Default "score" (a scored conversation's
        /// `meta_eval_score`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        field: Option<String>,
        /// The field's scale, mapped to [0, 1] (values outside clamped). Default [0, 5].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        range: Option<(f64, f64)>,
        /// A reward model (HF sequence-classification directory): σ(its score) instead.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<PathBuf>,
        /// With `model`: sequences per forward. Default 8.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        batch_size: Option<usize>,
        /// With `model`: append EOS after the completion. Default true.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        append_eos: Option<bool>,
    },
    /// exp(mean log-prob of the completion tokens given the prompt) under a causal LM, in
    /// [0, 1]; component mean_logprob.
    Fluency {
        /// An HF causal-LM directory (or GGUF). None: the stage's reference (starting)
        /// model, which the stage fills in before building.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<PathBuf>,
        /// Sequences per forward. Default 8.
        #[serde(default = "eight")]
        batch_size: usize,
    },
}

/// A reward function with its weight in the stage's sum.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RewardTerm {
    /// Default 1.0.
    pub weight: f64,
    #[serde(flatten)]
    pub spec: RewardSpec,
}

impl<'de> Deserialize<'de> for RewardTerm {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error;
        let mut table = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        let weight = match table.remove("weight") {
            None => 1.0,
            Some(v) => v.as_f64().ok_or_else(|| D::Error::custom(format!("`weight` must be a number, got {v}")))?,
        };
        let spec = RewardSpec::deserialize(serde_json::Value::Object(table)).map_err(D::Error::custom)?;
        Ok(RewardTerm { weight, spec })
    }
}

/// Build one function (a reward model is loaded onto `device`).
pub fn build_reward<B: FusedOps>(spec: &RewardSpec, device: &B::Device) -> Result<Box<dyn Reward>> {
    Ok(match spec {
        RewardSpec::R1Zero { answer_field, format_weight } => {
            if !(0.0..=1.0).contains(format_weight) {
                return Err(RewardError::Config(format!(
                    "r1_zero format_weight must be in [0, 1], got {format_weight}"
                )));
            }
            Box::new(R1Zero { answer_field: answer_field.clone(), format_weight: *format_weight })
        }
        RewardSpec::R1ZeroFormat => Box::new(R1ZeroFormat),
        RewardSpec::Gsm8k { answer_field, mode } => {
            Box::new(Gsm8kMatch { answer_field: answer_field.clone(), mode: *mode })
        }
        RewardSpec::Length { max_tokens, cache_tokens } => {
            if cache_tokens > max_tokens {
                return Err(RewardError::Config(format!(
                    "length cache_tokens ({cache_tokens}) exceeds max_tokens ({max_tokens})"
                )));
            }
            Box::new(SoftOverlong { max_tokens: *max_tokens, cache_tokens: *cache_tokens })
        }
        RewardSpec::Coherence { n } => Box::new(Coherence { n: *n }),
        RewardSpec::Model { path, batch_size, append_eos } => {
            let mut m = RewardModelScorer::<B>::load(path, *batch_size, device)?;
            m.append_eos = *append_eos;
            Box::new(m)
        }
        RewardSpec::Adlf { alpha, external_field, external_range, internal } => {
            if !(0.0..=1.0).contains(alpha) {
                return Err(RewardError::Config(format!("adlf alpha must be in [0, 1], got {alpha}")));
            }
            if external_range.1 <= external_range.0 {
                return Err(RewardError::Config(format!("adlf external_range {external_range:?} is empty")));
            }
            Box::new(Adlf {
                alpha: *alpha,
                external_field: external_field.clone(),
                external_range: *external_range,
                internal: Box::new(WeightedSum { name: "internal".into(), terms: build_terms::<B>(internal, device)? }),
            })
        }
        RewardSpec::Faithfulness { against } => Box::new(Faithfulness { against: *against }),
        RewardSpec::Quality { field, range, model, batch_size, append_eos } => {
            Box::new(Quality { source: quality_source::<B>(field, range, model, *batch_size, *append_eos, device)? })
        }
        RewardSpec::Fluency { path, batch_size } => {
            let path = path.as_ref().ok_or_else(|| {
                RewardError::Config(
                    "fluency has no model `path`: give one, or let the stage fill in its reference model".into(),
                )
            })?;
            Box::new(Fluency::<B>::load(path, *batch_size, device)?)
        }
    })
}

/// Give every `fluency` term without a `path` (in `terms`, and inside ADLF's internal
/// terms) the stage's reference model, `path`: a stage calls this before [`build_terms`],
/// so `{ kind = "fluency" }` means "the model this stage starts from".
pub fn fill_reference_model(terms: &mut [RewardTerm], path: &std::path::Path) {
    for t in terms {
        match &mut t.spec {
            RewardSpec::Fluency { path: p @ None, .. } => *p = Some(path.to_path_buf()),
            RewardSpec::Adlf { internal, .. } => fill_reference_model(internal, path),
            _ => {}
        }
    }
}

/// The quality reward's source: the row's score unless `model` is given; fields of the
/// other source are refused rather than ignored.
fn quality_source<B: FusedOps>(
    field: &Option<String>,
    range: &Option<(f64, f64)>,
    model: &Option<PathBuf>,
    batch_size: Option<usize>,
    append_eos: Option<bool>,
    device: &B::Device,
) -> Result<QualitySource> {
    match model {
        Some(path) => {
            if field.is_some() || range.is_some() {
                return Err(RewardError::Config(
                    "quality: `field`/`range` read the row's score, `model` scores with a reward model; give one"
                        .into(),
                ));
            }
            let mut m =
                RewardModelScorer::<B>::load(path, batch_size.unwrap_or_else(eight), device).map_err(|e| match e {
                    RewardError::Model { source, .. } => RewardError::Model { reward: "quality".into(), source },
                    e => e,
                })?;
            m.append_eos = append_eos.unwrap_or(true);
            m.name = "quality".into();
            Ok(QualitySource::Model(Box::new(m)))
        }
        None => {
            if batch_size.is_some() || append_eos.is_some() {
                return Err(RewardError::Config(
                    "quality: `batch_size`/`append_eos` apply to a reward `model`, and none is given".into(),
                ));
            }
            let range = range.unwrap_or_else(judge_scale);
            if !(range.0.is_finite() && range.1.is_finite() && range.1 > range.0) {
                return Err(RewardError::Config(format!("quality range {range:?} is empty")));
            }
            Ok(QualitySource::External { field: field.clone().unwrap_or_else(score_field), range })
        }
    }
}

/// Build weighted terms; two functions of one kind must differ in name, so the second of
/// a kind is logged as `<name>_2`, and so on.
pub fn build_terms<B: FusedOps>(terms: &[RewardTerm], device: &B::Device) -> Result<Vec<(Box<dyn Reward>, f64)>> {
    if terms.is_empty() {
        return Err(RewardError::Config("no reward functions".into()));
    }
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    terms
        .iter()
        .map(|t| {
            let f = build_reward::<B>(&t.spec, device)?;
            let n = seen.entry(f.name().to_string()).or_default();
            *n += 1;
            let f: Box<dyn Reward> =
                if *n == 1 { f } else { Box::new(Renamed { name: format!("{}_{n}", f.name()), inner: f }) };
            Ok((f, t.weight))
        })
        .collect()
}

/// A function under another name.
struct Renamed {
    name: String,
    inner: Box<dyn Reward>,
}

impl Reward for Renamed {
    fn name(&self) -> &str {
        &self.name
    }
    fn score(&self, s: &crate::Sample) -> Result<crate::RewardOutput> {
        self.inner.score(s)
    }
    fn score_batch(&self, s: &[crate::Sample]) -> Result<Vec<crate::RewardOutput>> {
        self.inner.score_batch(s)
    }
}
