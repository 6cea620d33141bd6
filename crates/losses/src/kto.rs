//! KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
//! arXiv:2402.01306) as TRL's `KTOTrainer._compute_loss` (1.16) computes it: unpaired
//! completions labelled desirable or undesirable, each valued against a reference point
//! `z₀`, the KL between policy and reference estimated on mismatched prompt/completion
//! pairs of the same batch.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData, activation};
use serde::{Deserialize, Serialize};

/// TRL `KTOConfig.loss_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KtoLossType {
    /// Eq. (7) of the KTO paper: desirable `1 − σ(β(r − z₀))`, undesirable `1 − σ(β(z₀ − r))`
    /// with `r = log π(y|x) − log π_ref(y|x)`.
    #[default]
    Kto,
    /// Unpaired APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266): desirable
    /// `1 − σ(βr)`, undesirable `σ(βr)`; no reference point (no KL pass).
    ApoZeroUnpaired,
}

impl KtoLossType {
    /// Whether the loss needs the KL reference point (and so the mismatched pass).
    pub fn uses_reference_point(self) -> bool {
        self == KtoLossType::Kto
    }
}

/// The reference point `z₀`: the batch mean of `log π(y'|x) − log π_ref(y'|x)` over the
/// mismatched pairs `(x, y')`, clamped at 0 and without gradient (TRL; the paper's
/// estimate of KL(π‖π_ref)).
pub fn kto_reference_point(policy_kl_logps: &[f64], ref_kl_logps: &[f64]) -> f64 {
    if policy_kl_logps.is_empty() {
        return 0.0;
    }
    let n = policy_kl_logps.len() as f64;
    let mean = policy_kl_logps.iter().zip(ref_kl_logps).map(|(p, r)| p - r).sum::<f64>() / n;
    mean.max(0.0)
}

/// The mismatched completion of each example of a batch: the completions rotated by one
/// (TRL: `(x₁, yₙ), (x₂, y₁), …, (xₙ, yₙ₋₁)`), so the KL estimate sees the batch's own
/// completions under other prompts.
pub fn kto_mismatched(n: usize) -> Vec<usize> {
    (0..n).map(|i| (i + n - 1) % n.max(1)).collect()
}

/// Per-example KTO terms.
pub struct KtoTerms<B: Backend> {
    /// Each example's weighted loss (`desirable_weight` or `undesirable_weight` times its
    /// loss); TRL's loss is their mean.
    pub losses: Tensor<B, 1>,
    /// `β·(log π − log π_ref)`, detached (TRL's `rewards/chosen` and `rewards/rejected`).
    pub rewards: Tensor<B, 1>,
}

/// KTO losses of a batch from summed completion log-probs of the policy and the reference;
/// `desirable[i]` is example i's label and `reference_point` is [`kto_reference_point`]
/// (ignored by `apo_zero_unpaired`).
#[allow(clippy::too_many_arguments)]
pub fn kto_loss<B: Backend>(
    policy_logps: Tensor<B, 1>,
    ref_logps: Tensor<B, 1>,
    desirable: &[bool],
    reference_point: f64,
    beta: f64,
    desirable_weight: f64,
    undesirable_weight: f64,
    loss_type: KtoLossType,
) -> KtoTerms<B> {
    let device = policy_logps.device();
    let n = desirable.len();
    let column = |v: Vec<f64>| Tensor::<B, 1>::from_data(TensorData::new(v, [n]).convert::<B::FloatElem>(), &device);
    // sign +1 for desirable, −1 for undesirable: both branches are 1 − σ(β·sign·(r − z)).
    let sign = column(desirable.iter().map(|&d| if d { 1.0 } else { -1.0 }).collect());
    let weight = column(desirable.iter().map(|&d| if d { desirable_weight } else { undesirable_weight }).collect());
    let logratios = policy_logps - ref_logps;
    let z = match loss_type {
        KtoLossType::Kto => reference_point,
        KtoLossType::ApoZeroUnpaired => 0.0,
    };
    let losses = (activation::sigmoid((logratios.clone() - z) * sign * beta).neg() + 1.0) * weight;
    KtoTerms { losses, rewards: logratios.detach() * beta }
}
