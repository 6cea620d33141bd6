//! Pure tensor math of every alignment objective: log-prob gathering, SFT, DPO family,
//! ORPO, PPO, GRPO, KL. Functions of tensors in, tensors out: no I/O, no model.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, activation};

/// `log p(targets[b, t] | ·)` from `logits[b, t, :]` at a temperature (logits divided by
/// it first, as TRL's `selective_log_softmax(logits / temperature, …)`), shape `[b, t]`.
///
/// The caller aligns targets with logits: for a sequence `x`, logits at position `t`
/// predict `x[t + 1]`.
pub fn token_logprobs<B: Backend>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>, temperature: f32) -> Tensor<B, 2> {
    let logits = if temperature != 1.0 && temperature > 0.0 { logits / temperature } else { logits };
    let logp = activation::log_softmax(logits, 2);
    logp.gather(2, targets.unsqueeze_dim(2)).squeeze_dim(2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    #[test]
    fn gathers_log_softmax_at_targets() {
        let dev = Default::default();
        let logits =
            Tensor::<Flex, 3>::from_data(TensorData::new(vec![0.0f32, 1.0, 2.0, 2.0, 0.0, 0.0], [1, 2, 3]), &dev);
        let targets = Tensor::<Flex, 2, Int>::from_data(TensorData::new(vec![2i64, 0], [1, 2]), &dev);
        let got: Vec<f32> = token_logprobs(logits, targets, 1.0).into_data().to_vec().unwrap();
        let lse1 = (1f64 + 1f64.exp() + 2f64.exp()).ln();
        let lse2 = (2f64.exp() + 2.0).ln();
        assert!((got[0] as f64 - (2.0 - lse1)).abs() < 1e-6);
        assert!((got[1] as f64 - (2.0 - lse2)).abs() < 1e-6);
    }
}
