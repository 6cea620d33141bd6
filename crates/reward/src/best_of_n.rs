//! Best-of-N (rejection sampling): score N candidates per prompt, keep the best. The
//! selections are prompt/completion rows the SFT stage trains on; the best against the
//! worst is an on-policy preference pair the DPO stage trains on.

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

/// The index of the lowest reward (the first on ties); `None` if empty or all NaN.
pub fn worst_index(rewards: &[f64]) -> Option<usize> {
    let negated: Vec<f64> = rewards.iter().map(|r| -r).collect();
    best_index(&negated)
}

impl BestOfN {
    /// The on-policy preference pair of this prompt, as a TRL preference row
    /// (`prompt`/`chosen`/`rejected`): its best candidate against its worst, when the best
    /// scores strictly higher (a prompt whose samples all score alike gives none). Pairs
    /// sampled from the policy being trained are what iterative and online DPO train on
    /// (Xu et al. 2023, "Some things are more CRINGE than others"; Guo et al. 2024, "Direct
    /// Language Model Alignment from Online AI Feedback"), rather than pairs another model
    /// wrote.
    pub fn pair(&self) -> Option<serde_json::Value> {
        let rewards: Vec<f64> = self.candidates.iter().map(|c| c.reward).collect();
        let worst = worst_index(&rewards)?;
        if rewards[self.best] <= rewards[worst] {
            return None;
        }
        let as_reply = |text: &str| match self.prompt {
            serde_json::Value::Array(_) => serde_json::json!([{"role": "assistant", "content": text}]),
            _ => serde_json::Value::String(text.to_string()),
        };
        Some(serde_json::json!({
            "prompt": self.prompt,
            "chosen": as_reply(&self.candidates[self.best].completion),
            "rejected": as_reply(&self.candidates[worst].completion),
        }))
    }

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
