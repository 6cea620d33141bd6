//! GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300) as TRL's `GRPOTrainer`:
//! group-relative advantages, the clipped per-token surrogate with a k3 KL penalty, and the
//! `grpo`/`bnpo`/`dr_grpo`/`dapo` aggregations; plus the CS336 ablation switches.
//!
//! Advantages are host math on the rewards of one generation batch (rewards come from
//! reward functions, not tensors); the per-token loss and its aggregation are tensors.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::kl::{KlEstimator, kl_per_token};

/// What the centred rewards are divided by (TRL `scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// The group's standard deviation (GRPO).
    #[default]
    Group,
    /// The standard deviation over the whole batch (the mean is still the group's).
    Batch,
    /// No division (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783; CS336's
    /// `use_std_normalization = false`).
    None,
}

/// How several reward functions combine (TRL `multi_objective_aggregation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MultiObjective {
    /// Weighted sum, then group normalisation.
    #[default]
    SumThenNormalize,
    /// GDPO: normalise each function within its group, weighted sum, then normalise the
    /// sum over the batch.
    NormalizeThenSum,
}

/// Advantage settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdvantageConfig {
    pub scale_rewards: ScaleRewards,
    pub multi_objective: MultiObjective,
    /// Added to the standard deviation: 1e-4 in TRL, 1e-6 in CS336.
    pub eps: f64,
    /// Subtract the group mean (false: CS336's `no_baseline`, A = r).
    pub baseline: bool,
}

impl Default for AdvantageConfig {
    fn default() -> Self {
        AdvantageConfig {
            scale_rewards: ScaleRewards::Group,
            multi_objective: MultiObjective::SumThenNormalize,
            eps: 1e-4,
            baseline: true,
        }
    }
}

/// Advantages of one generation batch with what TRL logs alongside.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupAdvantages {
    /// The aggregated reward of each completion (`None`: no function could score it).
    pub rewards: Vec<Option<f64>>,
    /// The standard deviation each advantage was (or, with `none`, would be) divided by.
    pub std: Vec<f64>,
    pub advantages: Vec<f64>,
    /// Fraction of completions whose std is zero (TRL's `frac_reward_zero_std`).
    pub frac_reward_zero_std: f64,
}

fn nanmean(v: &[f64]) -> f64 {
    let ok: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if ok.is_empty() { f64::NAN } else { ok.iter().sum::<f64>() / ok.len() as f64 }
}

/// Bessel-corrected standard deviation ignoring NaNs (TRL's `nanstd`; NaN for < 2 values).
fn nanstd(v: &[f64]) -> f64 {
    let m = nanmean(v);
    let ok: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if ok.len() < 2 {
        return f64::NAN;
    }
    let var = ok.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / ok.len() as f64;
    (var * ok.len() as f64 / (ok.len() - 1) as f64).sqrt()
}

fn weighted_nansum(row: &[f64], weights: &[f64]) -> f64 {
    if row.iter().all(|x| x.is_nan()) {
        return f64::NAN;
    }
    row.iter().zip(weights).filter(|(x, _)| !x.is_nan()).map(|(x, w)| x * w).sum()
}

/// Group-relative advantages (TRL `_generate_and_score_completions`): completions are in
/// groups of `num_generations` consecutive rows; `rewards_per_func[i][k]` is function `k`'s
/// reward for completion `i` (`None` where it does not apply); `weights[k]` its weight.
pub fn grpo_advantages(
    rewards_per_func: &[Vec<Option<f64>>],
    weights: &[f64],
    num_generations: usize,
    cfg: &AdvantageConfig,
) -> Result<GroupAdvantages, String> {
    let n = rewards_per_func.len();
    let g = num_generations;
    if g == 0 || !n.is_multiple_of(g) {
        return Err(format!("{n} completions do not split into groups of {g}"));
    }
    if let Some(bad) = rewards_per_func.iter().position(|r| r.len() != weights.len()) {
        return Err(format!(
            "completion {bad} has {} rewards for {} reward functions",
            rewards_per_func[bad].len(),
            weights.len()
        ));
    }
    let k = weights.len();
    let raw: Vec<Vec<f64>> =
        rewards_per_func.iter().map(|r| r.iter().map(|x| x.unwrap_or(f64::NAN)).collect()).collect();
    let groups = |v: &[f64], f: &dyn Fn(&[f64]) -> f64| -> Vec<f64> {
        v.chunks(g).flat_map(|c| std::iter::repeat_n(f(c), g)).collect()
    };
    let (rewards, std, mut advantages) = match cfg.multi_objective {
        MultiObjective::SumThenNormalize => {
            let rewards: Vec<f64> = raw.iter().map(|r| weighted_nansum(r, weights)).collect();
            let mean = groups(&rewards, &nanmean);
            let std = match cfg.scale_rewards {
                ScaleRewards::Group | ScaleRewards::None if g > 1 => groups(&rewards, &nanstd),
                ScaleRewards::Group | ScaleRewards::None => vec![0.0; n],
                ScaleRewards::Batch if n > 1 => vec![nanstd(&rewards); n],
                ScaleRewards::Batch => vec![0.0; n],
            };
            let adv = (0..n)
                .map(|i| {
                    let a = if cfg.baseline { rewards[i] - mean[i] } else { rewards[i] };
                    if cfg.scale_rewards == ScaleRewards::None { a } else { a / (std[i] + cfg.eps) }
                })
                .collect::<Vec<_>>();
            (rewards, std, adv)
        }
        MultiObjective::NormalizeThenSum => {
            let mut normed = vec![vec![f64::NAN; k]; n];
            for f in 0..k {
                let col: Vec<f64> = raw.iter().map(|r| r[f]).collect();
                let mean = groups(&col, &nanmean);
                let std = if g > 1 { groups(&col, &nanstd) } else { vec![0.0; n] };
                for i in 0..n {
                    normed[i][f] = (col[i] - mean[i]) / (std[i] + cfg.eps);
                }
            }
            let rewards: Vec<f64> = (0..n)
                .map(
                    |i| if raw[i].iter().all(|x| x.is_nan()) { f64::NAN } else { weighted_nansum(&normed[i], weights) },
                )
                .collect();
            let s = if n > 1 { nanstd(&rewards) } else { 0.0 };
            let m = nanmean(&rewards);
            let adv = rewards.iter().map(|r| (r - if cfg.baseline { m } else { 0.0 }) / (s + cfg.eps)).collect();
            (rewards, vec![s; n], adv)
        }
    };
    // Unscorable completions (and groups too small for a std) carry no signal.
    for a in &mut advantages {
        if a.is_nan() {
            *a = 0.0;
        }
    }
    let frac_reward_zero_std = std.iter().filter(|s| s.abs() <= 1e-8).count() as f64 / n.max(1) as f64;
    Ok(GroupAdvantages {
        rewards: rewards.iter().map(|r| (!r.is_nan()).then_some(*r)).collect(),
        std,
        advantages,
        frac_reward_zero_std,
    })
}

/// How per-token losses reduce to the loss (TRL `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrpoLossType {
    /// Mean over sequences of each sequence's token mean (the GRPO paper; CS336's
    /// `masked_mean` length normalisation).
    Grpo,
    /// Token sum over the micro-batch's active tokens.
    Bnpo,
    /// Token sum over `B · max_completion_length` (Dr. GRPO; CS336's `masked_normalize`).
    DrGrpo,
    /// Token sum over the active tokens of the whole generation batch (DAPO, Yu et al.
    /// 2025, arXiv:2503.14476; TRL's default).
    #[default]
    Dapo,
}

/// Per-token GRPO terms, `[b, t]`.
pub struct GrpoTokenTerms<B: Backend> {
    pub per_token_loss: Tensor<B, 2>,
    /// The k3 KL (times the ratio with bias correction), when a reference is given.
    pub per_token_kl: Option<Tensor<B, 2>>,
    /// `exp(logp − old_logp)`.
    pub ratio: Tensor<B, 2>,
}

/// Settings of the per-token objective.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrpoObjective {
    /// `(ε_low, ε_high)` of the clipped surrogate; `None`: the unclipped `−ratio·A`
    /// (CS336's `grpo_no_clip` and `reinforce_with_baseline`).
    pub clip: Option<(f64, f64)>,
    /// KL coefficient β (0: no KL term).
    pub beta: f64,
    /// Multiply the k3 KL by the ratio (TRL `use_bias_correction_kl`, default true since
    /// TRL 1.10): an importance-sampled KL when the data is off-policy.
    pub use_bias_correction_kl: bool,
}

/// `−min(ratio·A, clip(ratio, 1−ε_lo, 1+ε_hi)·A) + β·kl` per token (TRL
/// `GRPOTrainer._compute_loss`, token-level importance sampling). `old_logp = None` is the
/// on-policy case (the ratio is `exp(logp − logp.detach()) = 1` with the policy's gradient);
/// `advantages` is one value per sequence.
pub fn grpo_per_token_loss<B: Backend>(
    logp: Tensor<B, 2>,
    old_logp: Option<Tensor<B, 2>>,
    ref_logp: Option<Tensor<B, 2>>,
    advantages: Tensor<B, 1>,
    objective: &GrpoObjective,
) -> GrpoTokenTerms<B> {
    let old = old_logp.unwrap_or_else(|| logp.clone().detach());
    let ratio = (logp.clone() - old).exp();
    let a = advantages.unsqueeze_dim::<2>(1);
    let unclipped = ratio.clone() * a.clone();
    let mut per_token_loss = match objective.clip {
        Some((lo, hi)) => unclipped.min_pair(ratio.clone().clamp(1.0 - lo, 1.0 + hi) * a).neg(),
        None => unclipped.neg(),
    };
    let per_token_kl = match (objective.beta != 0.0, ref_logp) {
        (true, Some(r)) => {
            let kl = kl_per_token(logp, r, KlEstimator::K3);
            let kl = if objective.use_bias_correction_kl { kl * ratio.clone() } else { kl };
            per_token_loss = per_token_loss + kl.clone() * objective.beta;
            Some(kl)
        }
        _ => None,
    };
    GrpoTokenTerms { per_token_loss, per_token_kl, ratio }
}

/// Reduce per-token losses to the loss of one micro-batch. `max_completion_length` is used
/// by `dr_grpo`, `num_items_in_batch` (active tokens of the whole generation batch) by `dapo`.
pub fn grpo_aggregate<B: Backend>(
    per_token_loss: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    loss_type: GrpoLossType,
    max_completion_length: usize,
    num_items_in_batch: f64,
) -> Tensor<B, 1> {
    let b = per_token_loss.dims()[0];
    let masked = per_token_loss * mask.clone();
    match loss_type {
        GrpoLossType::Grpo => {
            let per_seq = masked.sum_dim(1).squeeze_dim::<1>(1) / mask.sum_dim(1).squeeze_dim::<1>(1).clamp_min(1.0);
            per_seq.mean()
        }
        GrpoLossType::Bnpo => masked.sum() / mask.sum().clamp_min(1.0),
        GrpoLossType::DrGrpo => masked.sum() / (b * max_completion_length) as f64,
        GrpoLossType::Dapo => masked.sum() / num_items_in_batch.max(1.0),
    }
}

/// Clipping statistics as TRL logs them.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ClipMetrics {
    /// Fraction of active tokens with ratio < 1−ε_lo and A < 0.
    pub low_mean: f64,
    /// Fraction with ratio > 1+ε_hi and A > 0.
    pub high_mean: f64,
    pub region_mean: f64,
    /// The smallest per-sequence low-clip fraction.
    pub low_min: f64,
    /// The largest per-sequence high-clip fraction.
    pub high_max: f64,
}

/// `clip_ratio/*` of TRL from host copies of the ratio `[b][t]`, advantages `[b]` and mask.
pub fn grpo_clip_metrics(
    ratio: &[Vec<f64>],
    advantages: &[f64],
    mask: &[Vec<f64>],
    eps_low: f64,
    eps_high: f64,
) -> ClipMetrics {
    let (mut low, mut high, mut region, mut total) = (0.0, 0.0, 0.0, 0.0);
    let (mut low_min, mut high_max) = (f64::INFINITY, f64::NEG_INFINITY);
    for ((r, a), m) in ratio.iter().zip(advantages).zip(mask) {
        let (mut sl, mut sh, mut n) = (0.0, 0.0, 0.0);
        for (x, w) in r.iter().zip(m) {
            let l = (*x < 1.0 - eps_low && *a < 0.0) as u8 as f64;
            let h = (*x > 1.0 + eps_high && *a > 0.0) as u8 as f64;
            sl += l * w;
            sh += h * w;
            region += (l.max(h)) * w;
            n += w;
        }
        low += sl;
        high += sh;
        total += n;
        if n > 0.0 {
            low_min = low_min.min(sl / n);
            high_max = high_max.max(sh / n);
        }
    }
    let t = total.max(1.0);
    ClipMetrics {
        low_mean: low / t,
        high_mean: high / t,
        region_mean: region / t,
        low_min: if low_min.is_finite() { low_min } else { 0.0 },
        high_max: if high_max.is_finite() { high_max } else { 0.0 },
    }
}
