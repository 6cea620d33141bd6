//! Best-of-N (rejection sampling): score N candidates per prompt, keep the best. The
//! selections are prompt/completion rows the SFT stage trains on.

use serde::{Deserialize, Serialize};

/// One scored candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub completion: String,
    pub reward: f64,
}

/// A prompt's candidates and the chosen one, as written to the selections JSONL: the
/// `prompt`/`completion` columns make it an SFT dataset as is (a conversational prompt,
/// a list of messages, gets the completion as an assistant message).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestOfN {
    pub prompt: serde_json::Value,
    /// The best candidate's completion.
    pub completion: serde_json::Value,
    pub reward: f64,
    pub best: usize,
    pub candidates: Vec<Candidate>,
}

/// The index of the highest reward (the first on ties); `None` if empty or all NaN.
pub fn best_index(rewards: &[f64]) -> Option<usize> {
    rewards
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.is_nan())
        .fold(None, |best: Option<(usize, f64)>, (i, &r)| match best {
            Some((_, b)) if b >= r => best,
            _ => Some((i, r)),
        })
        .map(|(i, _)| i)
}

impl BestOfN {
    /// Pick the best of `candidates`; `None` when there is nothing to pick.
    pub fn select(prompt: serde_json::Value, candidates: Vec<Candidate>) -> Option<Self> {
        let rewards: Vec<f64> = candidates.iter().map(|c| c.reward).collect();
        let best = best_index(&rewards)?;
        let text = candidates[best].completion.clone();
        let completion = match prompt {
            serde_json::Value::Array(_) => serde_json::json!([{"role": "assistant", "content": text}]),
            _ => serde_json::Value::String(text),
        };
        Some(BestOfN { prompt, completion, reward: candidates[best].reward, best, candidates })
    }
}
