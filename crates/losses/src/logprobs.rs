//! Per-token log-probs and the masked reductions every loss is built from.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Int, Tensor, activation};

/// Half-precision logits to f32 (f32 and f64 stay as they are).
fn upcast<B: Backend>(logits: Tensor<B, 3>) -> Tensor<B, 3> {
    match logits.dtype() {
        DType::F16 | DType::BF16 => logits.cast(FloatDType::F32),
        _ => logits,
    }
}

/// `log p(targets[b, t] | ·)` from `logits[b, t, :]` at a temperature (logits divided by
/// it first, as TRL's `selective_log_softmax(logits / temperature, …)`), shape `[b, t]`.
///
/// The caller aligns targets with logits: for a sequence `x`, logits at position `t`
/// predict `x[t + 1]`. Logits of a bf16 model are upcast first (TRL's `logits.float()`).
pub fn token_logprobs<B: Backend>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>, temperature: f32) -> Tensor<B, 2> {
    let logits = upcast(logits);
    let logits = if temperature != 1.0 && temperature > 0.0 { logits / temperature } else { logits };
    let logp = activation::log_softmax(logits, 2);
    logp.gather(2, targets.unsqueeze_dim(2)).squeeze_dim(2)
}

/// Entropy `-Σ p log p` of each position's next-token distribution, `[b, t]` (GRPO's
/// logged `entropy`), at the same temperature as [`token_logprobs`].
pub fn token_entropy<B: Backend>(logits: Tensor<B, 3>, temperature: f32) -> Tensor<B, 2> {
    let logits = upcast(logits);
    let logits = if temperature != 1.0 && temperature > 0.0 { logits / temperature } else { logits };
    let logp = activation::log_softmax(logits, 2);
    (logp.clone().exp() * logp).sum_dim(2).squeeze_dim::<2>(2).neg()
}

/// `Σ_t values·mask` per row, `[b]`.
pub fn masked_sum<B: Backend>(values: Tensor<B, 2>, mask: Tensor<B, 2>) -> Tensor<B, 1> {
    (values * mask).sum_dim(1).squeeze_dim(1)
}

/// `Σ values·mask / Σ mask` over the whole tensor (TRL's `masked_mean` without an axis),
/// a one-element tensor. An all-zero mask gives 0 (the numerator is 0 and the count is
/// clamped to 1, as TRL's `clamp(min=1.0)`).
pub fn masked_mean<B: Backend>(values: Tensor<B, 2>, mask: Tensor<B, 2>) -> Tensor<B, 1> {
    let count = mask.clone().sum().clamp_min(1.0);
    (values * mask).sum() / count
}

/// The log-prob of each row's completion: the sum of its masked token log-probs, or their
/// mean over the row's masked tokens when `averaged` (ORPO, SimPO, IPO), `[b]`.
pub fn sequence_logprobs<B: Backend>(token_logps: Tensor<B, 2>, mask: Tensor<B, 2>, averaged: bool) -> Tensor<B, 1> {
    let sum = masked_sum(token_logps, mask.clone());
    if averaged { sum / mask.sum_dim(1).squeeze_dim::<1>(1).clamp_min(1.0) } else { sum }
}

/// SFT cross-entropy: the mean negative log-likelihood over the masked tokens of the whole
/// batch (HF's `CrossEntropyLoss` with `ignore_index = -100` on the unmasked positions).
pub fn sft_loss<B: Backend>(token_logps: Tensor<B, 2>, mask: Tensor<B, 2>) -> Tensor<B, 1> {
    masked_mean(token_logps.neg(), mask)
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
        let got: Vec<f32> = token_logprobs(logits.clone(), targets, 1.0).into_data().to_vec().unwrap();
        let lse1 = (1f64 + 1f64.exp() + 2f64.exp()).ln();
        let lse2 = (2f64.exp() + 2.0).ln();
        assert!((got[0] as f64 - (2.0 - lse1)).abs() < 1e-6);
        assert!((got[1] as f64 - (2.0 - lse2)).abs() < 1e-6);
        // entropy of [0, 1, 2]
        let p: Vec<f64> = [0.0f64, 1.0, 2.0].iter().map(|x| (x - lse1).exp()).collect();
        let h: f64 = -p.iter().map(|p| p * p.ln()).sum::<f64>();
        let got: Vec<f32> = token_entropy(logits, 1.0).into_data().to_vec().unwrap();
        assert!((got[0] as f64 - h).abs() < 1e-6, "{} vs {h}", got[0]);
    }

    #[test]
    fn masked_reductions() {
        let dev = Default::default();
        let v = Tensor::<Flex, 2>::from_data(TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3]), &dev);
        let m = Tensor::<Flex, 2>::from_data(TensorData::new(vec![1.0f32, 1.0, 0.0, 0.0, 1.0, 1.0], [2, 3]), &dev);
        let s: Vec<f32> = masked_sum(v.clone(), m.clone()).into_data().to_vec().unwrap();
        assert_eq!(s, vec![3.0, 11.0]);
        let a: Vec<f32> = sequence_logprobs(v.clone(), m.clone(), true).into_data().to_vec().unwrap();
        assert_eq!(a, vec![1.5, 5.5]);
        let mm: Vec<f32> = masked_mean(v.clone(), m.clone()).into_data().to_vec().unwrap();
        assert_eq!(mm, vec![3.5]);
        let none: Vec<f32> = masked_mean(v, m.zeros_like()).into_data().to_vec().unwrap();
        assert_eq!(none, vec![0.0]);
    }
}
