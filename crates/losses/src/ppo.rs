//! PPO for RLHF (Schulman et al. 2017, arXiv:1707.06347; Ouyang et al. 2022) as TRL's
//! `PPOTrainer` (1.12, its last release): per-token rewards with a KL penalty and the
//! score at the end of the response, GAE (Schulman et al. 2015, arXiv:1506.02438),
//! whitening, clipped policy and value losses, and the adaptive KL controller (Ziegler et
//! al. 2019, arXiv:1909.08593).
//!
//! Rollout post-processing is host math in f64 over rows of equal length (one per
//! response); the two losses are tensors.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::kl::KlEstimator;
use crate::logprobs::masked_mean;

/// TRL's `INVALID_LOGPROB`: what log-probs hold after a response ends (so k1/k3 are 0).
pub const INVALID_LOGPROB: f64 = 1.0;

/// Responses truncated after their first stop token (kept): later tokens become `pad`.
pub fn truncate_after_stop(responses: &[Vec<i64>], stop_token: i64, pad_token: i64) -> Vec<Vec<i64>> {
    responses
        .iter()
        .map(|r| match r.iter().position(|&t| t == stop_token) {
            Some(i) => r.iter().enumerate().map(|(j, &t)| if j > i { pad_token } else { t }).collect(),
            None => r.clone(),
        })
        .collect()
}

/// Index of each response's last token before its first pad (TRL's
/// `first_true_indices(response == pad) − 1`; `len − 1` without a pad, `-1` for an empty
/// response is clamped to 0).
pub fn sequence_lengths(responses: &[Vec<i64>], pad_token: i64) -> Vec<usize> {
    responses.iter().map(|r| r.iter().position(|&t| t == pad_token).unwrap_or(r.len()).saturating_sub(1)).collect()
}

/// Scores less `penalty` for responses without an EOS token (TRL `missing_eos_penalty`:
/// discourages rambling to the length limit).
pub fn apply_missing_eos_penalty(scores: &[f64], responses: &[Vec<i64>], eos_token: i64, penalty: f64) -> Vec<f64> {
    scores.iter().zip(responses).map(|(s, r)| if r.contains(&eos_token) { *s } else { s - penalty }).collect()
}

/// Per-token rewards of a PPO batch.
#[derive(Debug, Clone, PartialEq)]
pub struct PpoRewards {
    /// The KL estimate per token (0 after each response: log-probs there are
    /// [`INVALID_LOGPROB`]).
    pub kl: Vec<Vec<f64>>,
    /// `−kl_coef · kl`.
    pub non_score_reward: Vec<Vec<f64>>,
    /// `non_score_reward` plus the score at index `sequence_length + 1` (one past the EOS)
    /// or, when that is past the end, at `sequence_length`.
    pub rewards: Vec<Vec<f64>>,
}

/// Rewards of each response token: a KL penalty against the reference everywhere and the
/// sequence score at the end (TRL `PPOTrainer.train`). `logprobs`/`ref_logprobs` must
/// already hold [`INVALID_LOGPROB`] after `sequence_lengths` (see [`mask_after`]).
pub fn ppo_token_rewards(
    logprobs: &[Vec<f64>],
    ref_logprobs: &[Vec<f64>],
    scores: &[f64],
    seq_lengths: &[usize],
    kl_coef: f64,
    estimator: KlEstimator,
) -> PpoRewards {
    let mut out = PpoRewards { kl: vec![], non_score_reward: vec![], rewards: vec![] };
    for i in 0..logprobs.len() {
        let kl: Vec<f64> = logprobs[i]
            .iter()
            .zip(&ref_logprobs[i])
            .map(|(lp, r)| match estimator {
                KlEstimator::K1 => lp - r,
                KlEstimator::K2 => 0.5 * (lp - r) * (lp - r),
                KlEstimator::K3 => (r - lp).exp() - 1.0 - (r - lp),
            })
            .collect();
        let nsr: Vec<f64> = kl.iter().map(|k| -kl_coef * k).collect();
        let mut rewards = nsr.clone();
        let t = rewards.len();
        let end = if seq_lengths[i] + 1 < t { seq_lengths[i] + 1 } else { seq_lengths[i] };
        if t > 0 {
            rewards[end] += scores[i];
        }
        out.kl.push(kl);
        out.non_score_reward.push(nsr);
        out.rewards.push(rewards);
    }
    out
}

/// `values` with every position after `offset + sequence_length` set to `fill`
/// (`offset` 0: TRL's `padding_mask`; 1: `padding_mask_p1`).
pub fn mask_after(values: &[Vec<f64>], seq_lengths: &[usize], offset: usize, fill: f64) -> Vec<Vec<f64>> {
    values
        .iter()
        .zip(seq_lengths)
        .map(|(row, &l)| row.iter().enumerate().map(|(t, &v)| if t > l + offset { fill } else { v }).collect())
        .collect()
}

/// The 0/1 mask of positions at or before `sequence_length + offset`.
pub fn valid_mask(width: usize, seq_lengths: &[usize], offset: usize) -> Vec<Vec<f64>> {
    seq_lengths.iter().map(|&l| (0..width).map(|t| if t > l + offset { 0.0 } else { 1.0 }).collect()).collect()
}

/// `(values − mean) / sqrt(var + 1e-8)` over the masked entries of a batch, with the
/// Bessel-corrected variance; `shift_mean = false` adds the mean back (TRL's
/// `masked_whiten`). Errors when fewer than two entries are masked in.
pub fn masked_whiten(values: &[Vec<f64>], mask: &[Vec<f64>], shift_mean: bool) -> Result<Vec<Vec<f64>>, String> {
    let n: f64 = mask.iter().flatten().sum();
    if n < 2.0 {
        return Err(format!("whitening needs at least 2 valid tokens, got {n}"));
    }
    let mean = values.iter().flatten().zip(mask.iter().flatten()).map(|(v, m)| v * m).sum::<f64>() / n;
    let var = values.iter().flatten().zip(mask.iter().flatten()).map(|(v, m)| (v - mean) * (v - mean) * m).sum::<f64>()
        / n
        * (n / (n - 1.0));
    let scale = 1.0 / (var + 1e-8).sqrt();
    Ok(values
        .iter()
        .map(|row| row.iter().map(|v| (v - mean) * scale + if shift_mean { 0.0 } else { mean }).collect())
        .collect())
}

/// Generalised advantage estimation over each full row: `δ_t = r_t + γ V_{t+1} − V_t`,
/// `A_t = δ_t + γλ A_{t+1}` (V past the end is 0); returns `(advantages, returns = A + V)`.
pub fn gae(rewards: &[Vec<f64>], values: &[Vec<f64>], gamma: f64, lam: f64) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let mut advs = vec![];
    let mut rets = vec![];
    for (r, v) in rewards.iter().zip(values) {
        let t = r.len();
        let mut a = vec![0.0; t];
        let mut last = 0.0;
        for i in (0..t).rev() {
            let next = if i + 1 < t { v[i + 1] } else { 0.0 };
            let delta = r[i] + gamma * next - v[i];
            last = delta + gamma * lam * last;
            a[i] = last;
        }
        rets.push(a.iter().zip(v).map(|(a, v)| a + v).collect());
        advs.push(a);
    }
    (advs, rets)
}

/// The clipped policy loss and its statistics.
pub struct PolicyLoss<B: Backend> {
    /// `masked_mean(max(−A·ρ, −A·clip(ρ, 1−c, 1+c)))`.
    pub loss: Tensor<B, 1>,
    /// Fraction of valid tokens where the clipped term is the larger (TRL `pg_clipfrac`).
    pub clipfrac: Tensor<B, 1>,
    /// `½·mean((logp − old_logp)²)` over every position, the padding counting as 0 (TRL
    /// `approxkl`, whose padded log-probs are both `INVALID_LOGPROB`).
    pub approxkl: Tensor<B, 1>,
}

/// PPO's clipped surrogate over valid tokens (`mask`, TRL's `~padding_mask`).
pub fn ppo_policy_loss<B: Backend>(
    logp: Tensor<B, 2>,
    old_logp: Tensor<B, 2>,
    advantages: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    cliprange: f64,
) -> PolicyLoss<B> {
    let diff = logp - old_logp;
    let ratio = diff.clone().exp();
    let l1 = advantages.clone().neg() * ratio.clone();
    let l2 = advantages.neg() * ratio.clamp(1.0 - cliprange, 1.0 + cliprange);
    let clipped = l2.clone().greater(l1.clone()).float().cast(l1.dtype()).detach();
    PolicyLoss {
        loss: masked_mean(l1.max_pair(l2), mask.clone()),
        clipfrac: masked_mean(clipped, mask.clone()),
        approxkl: (diff.detach() * mask).square().mean() * 0.5,
    }
}

/// The clipped value loss and its clip fraction.
pub struct ValueLoss<B: Backend> {
    /// `½·masked_mean(max((V − R)², (clip(V, V_old ± c_v) − R)²))`.
    pub loss: Tensor<B, 1>,
    pub clipfrac: Tensor<B, 1>,
}

/// PPO's clipped value loss over valid tokens (`mask`, TRL's `~padding_mask_p1`).
pub fn ppo_value_loss<B: Backend>(
    values: Tensor<B, 2>,
    old_values: Tensor<B, 2>,
    returns: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    cliprange_value: f64,
) -> ValueLoss<B> {
    let clipped_v =
        values.clone().max_pair(old_values.clone() - cliprange_value).min_pair(old_values + cliprange_value);
    let l1 = (values - returns.clone()).square();
    let l2 = (clipped_v - returns).square();
    let clipped = l2.clone().greater(l1.clone()).float().cast(l1.dtype()).detach();
    ValueLoss { loss: masked_mean(l1.max_pair(l2), mask.clone()) * 0.5, clipfrac: masked_mean(clipped, mask) }
}

/// The adaptive KL controller of Ziegler et al. 2019 ("dynamic KL"): moves the KL
/// coefficient so the measured KL tracks `target`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveKl {
    pub value: f64,
    pub target: f64,
    pub horizon: f64,
}

impl AdaptiveKl {
    /// `err = clip(kl / target − 1, −0.2, 0.2)`, `value *= 1 + err · n_steps / horizon`.
    pub fn update(&mut self, current_kl: f64, n_steps: usize) {
        let err = (current_kl / self.target - 1.0).clamp(-0.2, 0.2);
        self.value *= 1.0 + err * n_steps as f64 / self.horizon;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_kl_moves_toward_the_target() {
        let mut c = AdaptiveKl { value: 0.2, target: 6.0, horizon: 10000.0 };
        c.update(12.0, 256); // err clipped to 0.2
        assert!((c.value - 0.2 * (1.0 + 0.2 * 256.0 / 10000.0)).abs() < 1e-15);
        let mut c = AdaptiveKl { value: 0.2, target: 6.0, horizon: 10000.0 };
        c.update(5.4, 100); // err = -0.1
        assert!((c.value - 0.2 * (1.0 - 0.1 * 100.0 / 10000.0)).abs() < 1e-15);
    }

    #[test]
    fn gae_by_hand() {
        // γ = 0.5, λ = 0.5: δ = [1 + 0.5·2 − 1, 0 + 0 − 2] = [1, −2]; A1 = −2, A0 = 1 + 0.25·(−2)
        let (a, r) = gae(&[vec![1.0, 0.0]], &[vec![1.0, 2.0]], 0.5, 0.5);
        assert_eq!(a, vec![vec![0.5, -2.0]]);
        assert_eq!(r, vec![vec![1.5, 0.0]]);
    }
}
