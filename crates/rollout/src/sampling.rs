//! Choosing the next token from a row of logits: greedy, or temperature with top-k and
//! top-p truncation, from a seeded generator.

use align_kernels::TokenSampling;
use align_kernels::sampling::sample_row;
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
    /// Index of the first output row in the whole batch this call is a share of: each row
    /// draws from its own stream, keyed by the seed and its index there, so a batch split
    /// between data-parallel replicas samples what one device would. Not a config key.
    #[serde(skip)]
    pub first_row: u64,
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
            first_row: 0,
        }
    }
}

/// The sampler's generator.
pub use align_model::SplitMix64 as Rng;

/// The generator of output row `row` under `seed`: independent streams per row, so what a
/// row samples depends on neither the batch size nor the other rows.
pub fn row_rng(seed: u64, row: u64) -> Rng {
    let mut key = Rng::new(row ^ 0x5851_F42D_4C95_7F2D);
    Rng::new(seed ^ key.next_u64())
}

impl SamplingConfig {
    /// Refuse values that would otherwise be reinterpreted: a negative or non-finite
    /// temperature, top-p outside (0, 1].
    pub fn validate(&self) -> Result<(), crate::RolloutError> {
        let bad = |m: String| Err(crate::RolloutError::Sampling(m));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!("temperature must be a finite number ≥ 0 (0 = greedy), found {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1] (1 = off), found {}", self.top_p));
        }
        if self.min_new_tokens > self.max_new_tokens {
            return bad(format!(
                "min_new_tokens {} is larger than max_new_tokens {}",
                self.min_new_tokens, self.max_new_tokens
            ));
        }
        Ok(())
    }

    /// The kernel's rule for one decoding step: stop tokens are banned before
    /// `min_new_tokens` (when `allow_stop` is false).
    pub fn token_sampling(&self, allow_stop: bool) -> TokenSampling {
        TokenSampling {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            banned: if allow_stop { vec![] } else { self.stop_token_ids.clone() },
        }
    }
}

/// Pick a token from one host row of `logits` (the rule of
/// [`align_kernels::sampling`]: transformers' temperature → top-k → top-p);
/// returns it with its log-prob under the temperature over the full vocabulary, before
/// truncation and before the `min_new_tokens` ban: the quantity a trainer recomputes from
/// the model's logits. Stop tokens are banned when `allow_stop` is false. Draws one number
/// from `rng` unless greedy. [`crate::generate`] does the same on the device.
pub fn sample_token(logits: &[f32], cfg: &SamplingConfig, allow_stop: bool, rng: &mut Rng) -> (u32, f32) {
    let u = if cfg.temperature > 0.0 { rng.uniform() as f32 } else { 0.0 };
    sample_row(logits, &cfg.token_sampling(allow_stop), u)
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
    fn out_of_range_sampling_values_are_refused() {
        for (temperature, top_p) in
            [(-1.0, 1.0), (f32::NAN, 1.0), (f32::INFINITY, 1.0), (1.0, 2.0), (1.0, 0.0), (1.0, f32::NAN)]
        {
            let cfg = SamplingConfig { temperature, top_p, ..Default::default() };
            assert!(cfg.validate().is_err(), "T={temperature} top_p={top_p}");
        }
        assert!(SamplingConfig { temperature: 0.0, top_p: 1.0, ..Default::default() }.validate().is_ok());
        assert!(SamplingConfig { min_new_tokens: 9, max_new_tokens: 8, ..Default::default() }.validate().is_err());
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
