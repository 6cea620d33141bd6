//! Pairwise preference objectives: the Bradley–Terry reward-model loss and the DPO family
//! (DPO and its `cdpo`, `robust`, `hinge` and `ipo` variants), ORPO and SimPO. Inputs are
//! one value per pair, `[b]`; outputs are per-pair losses, so the caller chooses how to
//! reduce (TRL takes the mean).

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, activation};
use serde::{Deserialize, Serialize};

/// Bradley–Terry reward-model loss per pair (Ouyang et al. 2022, InstructGPT;
/// TRL `RewardTrainer.compute_loss`): `−logσ(r_c − r_r − margin)`, plus
/// `c·(r_c + r_r)²` when a centering coefficient `c` is set (Eisenstein et al. 2023,
/// "Helping or Herding?", which keeps rewards centred on zero). The mean over pairs is
/// TRL's loss.
pub fn bradley_terry_loss<B: Backend>(
    chosen: Tensor<B, 1>,
    rejected: Tensor<B, 1>,
    margin: Option<Tensor<B, 1>>,
    center_rewards_coefficient: Option<f64>,
) -> Tensor<B, 1> {
    let diff = chosen.clone() - rejected.clone();
    let diff = match margin {
        Some(m) => diff - m,
        None => diff,
    };
    let loss = activation::log_sigmoid(diff).neg();
    match center_rewards_coefficient {
        Some(c) => loss + (chosen + rejected).square() * c,
        None => loss,
    }
}

/// The DPO loss variants of TRL's `DPOTrainer._compute_loss`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLossType {
    /// DPO (Rafailov et al. 2023, arXiv:2305.18290): `−logσ(βΔ)`. As TRL ≥ 0.29 it
    /// ignores `label_smoothing`.
    #[default]
    Sigmoid,
    /// Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"; TRL ≤ 0.28's
    /// `sigmoid` with label smoothing, OpenRLHF, torchtune):
    /// `−(1−ε)·logσ(βΔ) − ε·logσ(−βΔ)`.
    Cdpo,
    /// Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409), an unbiased estimate under
    /// label noise ε ∈ [0, 0.5): `(−(1−ε)·logσ(βΔ) + ε·logσ(−βΔ)) / (1 − 2ε)`.
    Robust,
    /// SLiC hinge (Zhao et al. 2023, arXiv:2305.10425): `relu(1 − βΔ)`.
    Hinge,
    /// IPO (Azar et al. 2023, arXiv:2310.12036) on per-token *averaged* log-ratios:
    /// `(Δ̄ − 1/(2β))²`.
    Ipo,
}

/// Per-pair DPO terms.
pub struct DpoTerms<B: Backend> {
    pub losses: Tensor<B, 1>,
    /// `β·(π_c − ref_c)`, detached (TRL's `rewards/chosen`).
    pub chosen_rewards: Tensor<B, 1>,
    /// `β·(π_r − ref_r)`, detached.
    pub rejected_rewards: Tensor<B, 1>,
}

/// DPO-family losses from summed completion log-probs of the policy and the reference.
/// `chosen_tokens` / `rejected_tokens` are each completion's token count (only `ipo`
/// uses them, to average the log-ratios).
#[allow(clippy::too_many_arguments)]
pub fn dpo_loss<B: Backend>(
    policy_chosen: Tensor<B, 1>,
    policy_rejected: Tensor<B, 1>,
    ref_chosen: Tensor<B, 1>,
    ref_rejected: Tensor<B, 1>,
    chosen_tokens: Tensor<B, 1>,
    rejected_tokens: Tensor<B, 1>,
    loss_type: DpoLossType,
    beta: f64,
    label_smoothing: f64,
) -> DpoTerms<B> {
    let chosen_logratios = policy_chosen - ref_chosen;
    let rejected_logratios = policy_rejected - ref_rejected;
    let delta = chosen_logratios.clone() - rejected_logratios.clone();
    let ls = label_smoothing;
    let losses = match loss_type {
        DpoLossType::Sigmoid => activation::log_sigmoid(delta * beta).neg(),
        DpoLossType::Cdpo => {
            let d = delta * beta;
            activation::log_sigmoid(d.clone()).neg() * (1.0 - ls) - activation::log_sigmoid(d.neg()) * ls
        }
        DpoLossType::Robust => {
            let d = delta * beta;
            (activation::log_sigmoid(d.clone()).neg() * (1.0 - ls) + activation::log_sigmoid(d.neg()) * ls)
                / (1.0 - 2.0 * ls)
        }
        DpoLossType::Hinge => activation::relu((delta * beta).neg() + 1.0),
        DpoLossType::Ipo => {
            let avg = chosen_logratios.clone() / chosen_tokens.clamp_min(1.0)
                - rejected_logratios.clone() / rejected_tokens.clamp_min(1.0);
            (avg - 1.0 / (2.0 * beta)).square()
        }
    };
    DpoTerms {
        losses,
        chosen_rewards: chosen_logratios.detach() * beta,
        rejected_rewards: rejected_logratios.detach() * beta,
    }
}

/// `log(1 − exp(x))` for `x < 0`, computed without cancellation (Mächler 2012, "Accurately
/// computing log(1 − exp(−|a|))"): `log1p(−exp(x))` below `−ln 2`, `log(−expm1(x))` above,
/// with `expm1(x) = 2t / (1 − t)`, `t = tanh(x/2)`, which stays exact as `x → 0⁻` where
/// TRL's plain `log1p(−exp(x))` loses digits.
pub fn log1mexp<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let far = x.clone().exp().neg().log1p();
    let t = (x.clone() * 0.5).tanh();
    // −expm1(x) = −2t / (1 − t) > 0 for x < 0
    let near = (t.clone() * -2.0).log() - t.neg().log1p();
    near.mask_where(x.lower_elem(-std::f64::consts::LN_2), far)
}

/// ORPO's odds-ratio terms (Hong et al. 2024, arXiv:2403.07691; TRL
/// `ORPOTrainer.odds_ratio_loss`) from *averaged* completion log-probs.
pub struct OrpoTerms<B: Backend> {
    /// `λ·logσ(log_odds)` per pair (negative; TRL's `losses`).
    pub losses: Tensor<B, 1>,
    /// `(c − r) − (log1mexp(c) − log1mexp(r))`.
    pub log_odds: Tensor<B, 1>,
    /// `λ·c`, detached.
    pub chosen_rewards: Tensor<B, 1>,
    /// `λ·r`, detached.
    pub rejected_rewards: Tensor<B, 1>,
}

/// The odds-ratio term of ORPO for averaged log-probs `chosen`/`rejected` and λ (TRL's
/// `beta`). The ORPO loss is `nll − mean(losses)`, see [`orpo_loss`].
pub fn orpo_odds_ratio<B: Backend>(chosen: Tensor<B, 1>, rejected: Tensor<B, 1>, lambda: f64) -> OrpoTerms<B> {
    let log_odds = (chosen.clone() - rejected.clone()) - (log1mexp(chosen.clone()) - log1mexp(rejected.clone()));
    OrpoTerms {
        losses: activation::log_sigmoid(log_odds.clone()) * lambda,
        log_odds,
        chosen_rewards: chosen.detach() * lambda,
        rejected_rewards: rejected.detach() * lambda,
    }
}

/// ORPO's loss: the chosen NLL minus the mean odds-ratio term.
pub fn orpo_loss<B: Backend>(nll: Tensor<B, 1>, terms: &OrpoTerms<B>) -> Tensor<B, 1> {
    nll - terms.losses.clone().mean()
}

/// SimPO per-pair loss (Meng et al. 2024, arXiv:2405.14734; TRL `CPOTrainer` with
/// `loss_type = "simpo"`): reference-free, on *averaged* log-probs with a target margin γ:
/// `−(1−ε)·logσ(β(c − r) − γ) − ε·logσ(−(β(c − r) − γ))`. Rewards are `β·c`, `β·r`.
pub fn simpo_loss<B: Backend>(
    chosen: Tensor<B, 1>,
    rejected: Tensor<B, 1>,
    beta: f64,
    gamma: f64,
    label_smoothing: f64,
) -> Tensor<B, 1> {
    let z = (chosen - rejected) * beta - gamma;
    activation::log_sigmoid(z.clone()).neg() * (1.0 - label_smoothing)
        - activation::log_sigmoid(z.neg()) * label_smoothing
}

/// What TRL logs for a batch of pairs from the per-pair rewards (DPO's implicit rewards or
/// a reward model's scores): `rewards/chosen`, `rewards/rejected`, `rewards/accuracies`
/// (fraction with chosen > rejected), `rewards/margins`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct PreferenceMetrics {
    pub chosen: f64,
    pub rejected: f64,
    pub accuracy: f64,
    pub margin: f64,
}

impl PreferenceMetrics {
    pub fn from_rewards(chosen: &[f64], rejected: &[f64]) -> Self {
        let n = chosen.len().max(1) as f64;
        let pairs = || chosen.iter().zip(rejected);
        PreferenceMetrics {
            chosen: chosen.iter().sum::<f64>() / n,
            rejected: rejected.iter().sum::<f64>() / n,
            accuracy: pairs().filter(|(c, r)| c > r).count() as f64 / n,
            margin: pairs().map(|(c, r)| c - r).sum::<f64>() / n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::TensorData;

    type B = NdArray<f64>;

    fn t(v: &[f64]) -> Tensor<B, 1> {
        Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &Default::default())
    }
    fn host(x: Tensor<B, 1>) -> Vec<f64> {
        x.into_data().to_vec().unwrap()
    }

    #[test]
    fn log1mexp_is_exact_near_zero_and_far_away() {
        let xs = [-1e-12, -1e-6, -0.1, -0.69, -0.7, -3.0, -40.0];
        let got = host(log1mexp(t(&xs)));
        for (x, g) in xs.iter().zip(got) {
            // reference: log(-expm1(x)) with std's expm1 (exact to an ulp)
            let e = (-x.exp_m1()).ln();
            assert!((g - e).abs() <= 1e-13 * e.abs().max(1.0), "x={x}: {g} vs {e}");
        }
    }

    /// SimPO by hand: β=2, γ=1, c=-0.5, r=-1.5 → z = 2·1 − 1 = 1.
    #[test]
    fn simpo_by_hand() {
        let l = host(simpo_loss(t(&[-0.5]), t(&[-1.5]), 2.0, 1.0, 0.0))[0];
        assert!((l - (1.0 + (-1f64).exp()).ln()).abs() < 1e-15);
        let ls = host(simpo_loss(t(&[-0.5]), t(&[-1.5]), 2.0, 1.0, 0.1))[0];
        let e = 0.9 * (1.0 + (-1f64).exp()).ln() + 0.1 * (1.0 + 1f64.exp()).ln();
        assert!((ls - e).abs() < 1e-15);
    }
}
