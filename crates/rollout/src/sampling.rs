//! Choosing the next token from a row of logits: greedy, or temperature with top-k and
//! top-p truncation, from a seeded generator.

use serde::{Deserialize, Serialize};

/// How to pick tokens. `temperature == 0` is greedy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    /// Softmax temperature; 0 picks the most likely token. Default 1.0.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off). Default 0.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0 = off). Default 1.0.
    pub top_p: f32,
    /// Tokens to generate at most. Default 64.
    pub max_new_tokens: usize,
    /// Stop tokens are suppressed before this many tokens. Default 0.
    pub min_new_tokens: usize,
    /// Token ids that end a completion (kept in its output). Default none.
    pub stop_token_ids: Vec<u32>,
    /// Seed of the sampler. Default 0.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 64,
            min_new_tokens: 0,
            stop_token_ids: vec![],
            seed: 0,
        }
    }
}

/// The sampler's generator.
pub use align_model::SplitMix64 as Rng;

/// Pick a token from `logits`; returns it with its log-prob under the temperature over the
/// full vocabulary, before truncation and before the `min_new_tokens` mask: the quantity a
/// trainer recomputes from the model's logits. Stop tokens are masked when `allow_stop` is
/// false.
pub fn sample_token(logits: &[f32], cfg: &SamplingConfig, allow_stop: bool, rng: &mut Rng) -> (u32, f32) {
    let masked: Vec<f32> = if allow_stop || cfg.stop_token_ids.is_empty() {
        logits.to_vec()
    } else {
        let mut l = logits.to_vec();
        for &s in &cfg.stop_token_ids {
            if let Some(x) = l.get_mut(s as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
        l
    };
    let raw = crate::log_softmax_row(logits, cfg.temperature);
    let logp = if allow_stop || cfg.stop_token_ids.is_empty() {
        raw.clone()
    } else {
        crate::log_softmax_row(&masked, cfg.temperature)
    };
    if cfg.temperature <= 0.0 {
        let (i, _) = masked
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &x)| if x > best.1 { (i, x) } else { best });
        return (i as u32, raw[i]);
    }
    // Candidates: every finite token, or the top k, or the smallest top-p set. Only top-p
    // needs an order over the whole vocabulary; top-k selects k first (a full sort of a
    // 49k-token row per sampled token would dominate decoding on CPU).
    let by_prob = |a: &usize, b: &usize| logp[*b].total_cmp(&logp[*a]).then(a.cmp(b));
    let mut order: Vec<usize> = (0..logp.len()).filter(|&i| logp[i].is_finite()).collect();
    if cfg.top_k > 0 && cfg.top_k < order.len() {
        order.select_nth_unstable_by(cfg.top_k - 1, by_prob);
        order.truncate(cfg.top_k);
    }
    if cfg.top_p < 1.0 {
        order.sort_unstable_by(by_prob);
        let mut mass = 0.0f64;
        let mut keep = 0;
        for &i in &order {
            mass += (logp[i] as f64).exp();
            keep += 1;
            if mass >= cfg.top_p as f64 {
                break;
            }
        }
        order.truncate(keep.max(1));
    }
    let weights: Vec<f64> = order.iter().map(|&i| (logp[i] as f64).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.uniform() * total;
    for (&i, w) in order.iter().zip(&weights) {
        if u < *w {
            return (i as u32, raw[i]);
        }
        u -= w;
    }
    let i = *order.last().expect("at least one finite logit");
    (i as u32, raw[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_max_and_respects_min_tokens() {
        let cfg = SamplingConfig { temperature: 0.0, stop_token_ids: vec![2], ..Default::default() };
        let mut rng = Rng::new(0);
        assert_eq!(sample_token(&[0.0, 1.0, 5.0], &cfg, true, &mut rng).0, 2);
        assert_eq!(sample_token(&[0.0, 1.0, 5.0], &cfg, false, &mut rng).0, 1);
    }

    #[test]
    fn top_k_and_top_p_truncate() {
        let mut rng = Rng::new(7);
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let k1 = SamplingConfig { top_k: 1, ..Default::default() };
        let p_small = SamplingConfig { top_p: 0.5, ..Default::default() };
        for _ in 0..200 {
            assert_eq!(sample_token(&logits, &k1, true, &mut rng).0, 0);
            assert_eq!(sample_token(&logits, &p_small, true, &mut rng).0, 0);
        }
        let k2 = SamplingConfig { top_k: 2, ..Default::default() };
        let seen: std::collections::BTreeSet<u32> =
            (0..500).map(|_| sample_token(&logits, &k2, true, &mut rng).0).collect();
        assert_eq!(seen, [0, 1].into());
    }
}
