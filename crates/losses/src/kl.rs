//! KL estimators of Schulman's "Approximating KL Divergence" (2020), per token, for the
//! policy `logp` against a reference `ref_logp` on samples from the policy.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

/// Which estimator of KL(π ‖ π_ref) to use per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// `logp − ref`: unbiased, high variance, can be negative (TRL PPO's default `k1`).
    #[default]
    K1,
    /// `½ (logp − ref)²`: low variance, biased.
    K2,
    /// `exp(ref − logp) − (ref − logp) − 1`: unbiased and non-negative (GRPO's KL term,
    /// TRL PPO's `k3`).
    K3,
}

/// The per-token estimate, same shape as the inputs.
pub fn kl_per_token<B: Backend, const D: usize>(
    logp: Tensor<B, D>,
    ref_logp: Tensor<B, D>,
    estimator: KlEstimator,
) -> Tensor<B, D> {
    match estimator {
        KlEstimator::K1 => logp - ref_logp,
        KlEstimator::K2 => (logp - ref_logp).square() * 0.5,
        KlEstimator::K3 => {
            let d = ref_logp - logp;
            d.clone().exp() - d - 1.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::TensorData;

    #[test]
    fn estimators_by_hand() {
        let dev = Default::default();
        let t = |v: Vec<f64>| Tensor::<NdArray<f64>, 1>::from_data(TensorData::new(v, [2]), &dev);
        let (logp, r) = (vec![-1.0, -2.0], vec![-1.5, -1.0]);
        let get = |e| -> Vec<f64> { kl_per_token(t(logp.clone()), t(r.clone()), e).into_data().to_vec().unwrap() };
        assert_eq!(get(KlEstimator::K1), vec![0.5, -1.0]);
        assert_eq!(get(KlEstimator::K2), vec![0.125, 0.5]);
        let k3 = get(KlEstimator::K3);
        assert!((k3[0] - ((-0.5f64).exp() + 0.5 - 1.0)).abs() < 1e-15);
        assert!((k3[1] - (1f64.exp() - 1.0 - 1.0)).abs() < 1e-15);
    }
}
