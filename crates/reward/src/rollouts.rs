//! Scoring a generation batch with every reward function of a stage.

use std::collections::BTreeMap;

use align_data::GenerationPrompt;
use align_rollout::Rollouts;

use crate::{Result, Reward, Sample};

/// Scores of a generation batch: per function, and the components of each.
pub struct Scored {
    /// `[completion][function]`
    pub per_func: Vec<Vec<Option<f64>>>,
    /// `(function name, component) → value per completion`
    pub components: BTreeMap<String, Vec<f64>>,
}

/// Score completions with every reward function.
pub fn score_rollouts(
    rewards: &[(Box<dyn Reward>, f64)],
    prompts: &[&GenerationPrompt],
    r: &Rollouts,
) -> Result<Scored> {
    let samples: Vec<Sample> = (0..r.len())
        .map(|i| Sample {
            prompt: &prompts[r.prompt[i]].text,
            completion: &r.texts[i],
            completion_ids: &r.completions[i],
            example: &prompts[r.prompt[i]].example,
        })
        .collect();
    let mut per_func = vec![vec![None; rewards.len()]; r.len()];
    let mut components = BTreeMap::<String, Vec<f64>>::new();
    for (k, (f, _)) in rewards.iter().enumerate() {
        let outs = f.score_batch(&samples)?;
        for (i, o) in outs.into_iter().enumerate() {
            per_func[i][k] = (!o.score.is_nan()).then_some(o.score);
            for (c, v) in o.components {
                components.entry(format!("{}/{c}", f.name())).or_insert_with(|| vec![0.0; r.len()])[i] = v;
            }
        }
    }
    Ok(Scored { per_func, components })
}
