//! RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization
//! for Learning from Human Feedback in LLMs", arXiv:2402.14740; Kool et al. 2019) as TRL's
//! `RLOOTrainer` (1.16) computes it: `k` completions per prompt, each rewarded with its
//! sequence KL penalty folded in, its baseline the mean reward of the other `k − 1`, and a
//! clipped surrogate on whole-sequence log-probs.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// Rewards and advantages of a generation batch.
#[derive(Debug, Clone, PartialEq)]
pub struct RlooAdvantages {
    /// Each completion's reward after weighting, clipping and the KL penalty; NaN where no
    /// reward function scored it.
    pub rewards: Vec<f64>,
    /// `r_i − mean_{j≠i} r_j` over the group's scorable completions (normalised when asked);
    /// 0 for an unscorable completion or a group with one scorable completion.
    pub advantages: Vec<f64>,
}

/// Leave-one-out advantages (TRL `RLOOTrainer._generate_and_score_completions`):
/// - the reward is `Σ_f w_f·r_f` over the functions that scored a completion (NaN when none
///   did), clamped to `clip` when given;
/// - with `beta ≠ 0`, less `β·Σ_t (log π_old − log π_ref)` (`sequence_kl`, the k1 estimate
///   summed over the completion: a reward penalty, unlike GRPO's per-token loss term);
/// - the baseline of completion i is the mean reward of its scorable siblings;
/// - `normalize` rescales the batch's advantages to mean 0 and (Bessel) std 1, `+1e-4`.
///
/// `per_func` is `[completion][function]`, prompt-major in groups of `group`.
pub fn rloo_advantages(
    per_func: &[Vec<Option<f64>>],
    weights: &[f64],
    sequence_kl: Option<&[f64]>,
    beta: f64,
    group: usize,
    normalize: bool,
    clip: Option<(f64, f64)>,
) -> Result<RlooAdvantages, String> {
    if group < 2 || !per_func.len().is_multiple_of(group) {
        return Err(format!("{} completions do not form groups of {group} (at least 2)", per_func.len()));
    }
    let mut rewards: Vec<f64> = per_func
        .iter()
        .map(|fs| {
            let scored: Vec<f64> = fs.iter().zip(weights).filter_map(|(r, w)| r.map(|r| r * w)).collect();
            if scored.is_empty() { f64::NAN } else { scored.iter().sum() }
        })
        .collect();
    if let Some((lo, hi)) = clip {
        rewards.iter_mut().for_each(|r| *r = r.clamp(lo, hi));
    }
    if let Some(kl) = sequence_kl.filter(|_| beta != 0.0) {
        rewards.iter_mut().zip(kl).for_each(|(r, k)| *r -= beta * k);
    }
    let mut advantages = Vec::with_capacity(rewards.len());
    for g in rewards.chunks(group) {
        let scorable = g.iter().filter(|r| !r.is_nan()).count() as f64;
        let sum: f64 = g.iter().filter(|r| !r.is_nan()).sum();
        // NaN for unscorable rows and for a lone scorable one (0/0); zeroed below.
        advantages.extend(g.iter().map(|r| r - (sum - r) / (scorable - 1.0)));
    }
    if normalize {
        let valid: Vec<f64> = advantages.iter().copied().filter(|a| !a.is_nan()).collect();
        let n = valid.len() as f64;
        let mean = valid.iter().sum::<f64>() / n;
        let std = (valid.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        advantages.iter_mut().for_each(|a| *a = (*a - mean) / (std + 1e-4));
    }
    advantages.iter_mut().filter(|a| a.is_nan()).for_each(|a| *a = 0.0);
    Ok(RlooAdvantages { rewards, advantages })
}

/// The clipped surrogate per completion (TRL `RLOOTrainer._compute_loss`):
/// `−min(ρA, clip(ρ, 1−ε_lo, 1+ε_hi)·A)` with `ρ = exp(log π(y) − log π_old(y))` on summed
/// completion log-probs `[b]`; TRL's loss is their mean.
pub fn rloo_loss<B: Backend>(
    logps: Tensor<B, 1>,
    old_logps: Tensor<B, 1>,
    advantages: Tensor<B, 1>,
    eps_low: f64,
    eps_high: f64,
) -> Tensor<B, 1> {
    let ratio = (logps - old_logps).exp();
    let clipped = ratio.clone().clamp(1.0 - eps_low, 1.0 + eps_high);
    let unclipped = ratio * advantages.clone();
    unclipped.min_pair(clipped * advantages).neg()
}
