//! Quality: a judge's score of the completion in [0, 1], from the dataset row (an external
//! score such as a scored conversation's `meta_eval_score`) or from a reward model.

use std::collections::BTreeMap;

use crate::{Result, Reward, RewardOutput, Sample, example_number, unit_interval};

/// Where the quality score comes from.
pub enum QualitySource {
    /// The example's numeric `field`, mapped from `range` to [0, 1] and clamped there.
    External { field: String, range: (f64, f64) },
    /// A reward model's score (a Bradley–Terry logit), through the logistic sigmoid.
    Model(Box<dyn Reward>),
}

/// The logistic function, 1 / (1 + e^−x), written to stay finite for large |x|.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 { 1.0 / (1.0 + (-x).exp()) } else { x.exp() / (1.0 + x.exp()) }
}

/// A quality score in [0, 1], so it can be weighed against other [0, 1] terms (fluency,
/// faithfulness) with weights that mean what they say:
/// - external: `(x − lo) / (hi − lo)` clamped to [0, 1], x the row's score (a score outside
///   the stated scale is a data error, but one row should not outweigh the batch);
/// - model: `σ(s)`, s the reward model's score. A reward model trained with the
///   Bradley–Terry loss scores so that `σ(s_a − s_b)` is the probability that a is
///   preferred; `σ(s)` is then the probability of beating a reply scored 0, the natural
///   monotone map of a logit onto [0, 1].
///
/// Component `raw`: the value before the map (the row's score, or the model's logit).
pub struct Quality {
    pub source: QualitySource,
}

impl Quality {
    fn mapped(&self, raw: f64) -> RewardOutput {
        let score = match &self.source {
            QualitySource::External { range, .. } => unit_interval(raw, *range),
            QualitySource::Model(_) => sigmoid(raw),
        };
        RewardOutput { score, components: BTreeMap::from([("raw".to_string(), raw)]) }
    }
}

impl Reward for Quality {
    fn name(&self) -> &str {
        "quality"
    }
    fn score(&self, s: &Sample) -> Result<RewardOutput> {
        Ok(self.score_batch(std::slice::from_ref(s))?.remove(0))
    }
    fn score_batch(&self, samples: &[Sample]) -> Result<Vec<RewardOutput>> {
        let raw: Vec<f64> = match &self.source {
            QualitySource::External { field, .. } => {
                samples.iter().map(|s| example_number(self.name(), s.example, field)).collect::<Result<_>>()?
            }
            QualitySource::Model(m) => m.score_batch(samples)?.into_iter().map(|o| o.score).collect(),
        };
        Ok(raw.into_iter().map(|r| self.mapped(r)).collect())
    }
}
