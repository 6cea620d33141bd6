//! `[curriculum]`: train on easier examples first (align-data's curriculum pacing).

use align_data::curriculum::Pacing;
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// What makes an example hard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    /// Its tokens: shorter first.
    Length,
    /// The starting model's mean loss per loss token on it (computed once, before the first
    /// step): what the model already predicts well first.
    Loss,
    /// `max_score − meta_eval_score` (scored conversations), or the `column`'s number: the
    /// best-rated rows first.
    Score,
}

impl Measure {
    pub fn name(self) -> &'static str {
        match self {
            Measure::Length => "length",
            Measure::Loss => "loss",
            Measure::Score => "score",
        }
    }
}

/// `[curriculum]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CurriculumConfig {
    /// Default "length".
    pub measure: Measure,
    /// competence (Platanios et al. 2019) | linear | step. Default competence.
    pub pacing: Pacing,
    /// The fraction of the data (easiest first) the first step draws from, c0. Default 0.1.
    pub initial: f64,
    /// The fraction of the run's steps after which every example is admitted. Default 0.5.
    pub duration: f64,
    /// Stages of `step` pacing. Default 4.
    pub stages: usize,
    /// The top of the scores' scale, for `measure = "score"`. Default 5 (`meta_eval_score`'s
    /// 0–5).
    pub max_score: f64,
    /// For `measure = "score"`: a numeric column of the data holding each row's difficulty,
    /// read as it is, instead of `max_score − meta_eval_score` (SFT). Default none.
    pub column: Option<String>,
}

impl Default for CurriculumConfig {
    fn default() -> Self {
        CurriculumConfig {
            measure: Measure::Length,
            pacing: Pacing::Competence,
            initial: 0.1,
            duration: 0.5,
            stages: 4,
            max_score: 5.0,
            column: None,
        }
    }
}

impl CurriculumConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.initial > 0.0 && self.initial <= 1.0) {
            bail!(
                "[curriculum] initial: must be in (0, 1] (the fraction the first step draws from), found {}",
                self.initial
            );
        }
        if !(self.duration > 0.0 && self.duration <= 1.0) {
            bail!("[curriculum] duration: must be in (0, 1] (a fraction of the run's steps), found {}", self.duration);
        }
        if self.pacing == Pacing::Step && self.stages < 2 {
            bail!("[curriculum] stages: step pacing needs at least 2, found {}", self.stages);
        }
        if self.column.is_some() && self.measure != Measure::Score {
            bail!("[curriculum] column: a column's difficulty is read with measure = \"score\"");
        }
        if !self.max_score.is_finite() {
            bail!("[curriculum] max_score: must be a finite number, found {}", self.max_score);
        }
        Ok(())
    }
}
