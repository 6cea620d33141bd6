//! Composite rewards: a weighted sum of functions, and the ADLF mix of an external
//! (dataset) score with an internal composite.

use std::collections::BTreeMap;

use crate::{Result, Reward, RewardOutput, Sample, example_number, unit_interval};

/// `Σ wᵢ·rᵢ`; each function's score is a component under its name, and its own
/// components under `name/component`.
pub struct WeightedSum {
    pub name: String,
    pub terms: Vec<(Box<dyn Reward>, f64)>,
}

impl Reward for WeightedSum {
    fn name(&self) -> &str {
        &self.name
    }
    fn score(&self, s: &Sample) -> Result<RewardOutput> {
        Ok(self.score_batch(std::slice::from_ref(s))?.remove(0))
    }
    fn score_batch(&self, samples: &[Sample]) -> Result<Vec<RewardOutput>> {
        let mut out = vec![RewardOutput::default(); samples.len()];
        for (f, w) in &self.terms {
            for (o, r) in out.iter_mut().zip(f.score_batch(samples)?) {
                o.score += w * r.score;
                o.components.insert(f.name().to_string(), r.score);
                for (k, v) in r.components {
                    o.components.insert(format!("{}/{k}", f.name()), v);
                }
            }
        }
        Ok(out)
    }
}

/// ADLF: `(1 − α)·external + α·internal`, where external is the example's
/// `external_field` (e.g. a scored conversation's `meta_eval_score`, the `score` column)
/// normalised from `[min, max]` to [0, 1], and internal a composite of other functions.
/// Components: `external`, `internal` and the internal composite's components.
pub struct Adlf {
    pub alpha: f64,
    pub external_field: String,
    pub external_range: (f64, f64),
    pub internal: Box<dyn Reward>,
}

impl Adlf {
    fn external(&self, example: &serde_json::Value) -> Result<f64> {
        Ok(unit_interval(example_number("adlf", example, &self.external_field)?, self.external_range))
    }
}

impl Reward for Adlf {
    fn name(&self) -> &str {
        "adlf"
    }
    fn score(&self, s: &Sample) -> Result<RewardOutput> {
        Ok(self.score_batch(std::slice::from_ref(s))?.remove(0))
    }
    fn score_batch(&self, samples: &[Sample]) -> Result<Vec<RewardOutput>> {
        let internal = self.internal.score_batch(samples)?;
        samples
            .iter()
            .zip(internal)
            .map(|(s, i)| {
                let e = self.external(s.example)?;
                let mut components: BTreeMap<String, f64> = i.components;
                components.insert("external".into(), e);
                components.insert("internal".into(), i.score);
                Ok(RewardOutput { score: (1.0 - self.alpha) * e + self.alpha * i.score, components })
            })
            .collect()
    }
}
