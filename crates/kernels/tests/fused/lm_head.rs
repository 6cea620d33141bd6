//! The fused head against the plain Burn composition it replaces: forward values, entropy,
//! and the gradients of both inputs, on rows that span several chunks.

use align_kernels::burn::backend::{Autodiff, Flex, NdArray};
use align_kernels::burn::tensor::backend::{AutodiffBackend, Backend};
use align_kernels::burn::tensor::{Distribution, Int, Tensor, TensorData, activation};
use align_kernels::{FusedOps, linear_logprobs, lm_head::CHUNK_LOGITS};

/// `log_softmax(x wᵀ / T)[t]` and its entropy, composed from Burn's own ops.
fn plain<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    t: Tensor<B, 1, Int>,
    temp: f32,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let z = x.matmul(w.transpose()) / temp;
    let logp = activation::log_softmax(z, 1);
    let ent = (logp.clone().exp() * logp.clone()).sum_dim(1).squeeze_dim::<1>(1).neg();
    (logp.gather(1, t.unsqueeze_dim(1)).squeeze_dim(1), ent)
}

use crate::common::{close, host};

/// Compares values and the gradients of `x` and `w` under a loss that weights each row
/// differently (so a wrong per-row upstream gradient shows).
fn check<B: AutodiffBackend + FusedOps>(n: usize, d: usize, vocab: usize, temp: f32, rel: f64) {
    let dev = Default::default();
    B::seed(&dev, 11);
    let x0 = Tensor::<B, 2>::random([n, d], Distribution::Normal(0.0, 1.0), &dev);
    let w0 = Tensor::<B, 2>::random([vocab, d], Distribution::Normal(0.0, 0.5), &dev);
    let targets: Vec<i64> = (0..n).map(|i| ((i * 7919 + 13) % vocab) as i64).collect();
    let t = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [n]), &dev);
    let weights =
        Tensor::<B, 1>::from_data(TensorData::new((0..n).map(|i| (i % 5) as f32 - 1.5).collect::<Vec<_>>(), [n]), &dev);

    let (x, w) = (x0.clone().require_grad(), w0.clone().require_grad());
    let (want, want_ent) = plain(x.clone(), w.clone(), t.clone(), temp);
    let g = (want.clone() * weights.clone()).sum().backward();
    let (want_dx, want_dw) = (host(x.grad(&g).unwrap()), host(w.grad(&g).unwrap()));

    let (x, w) = (x0.require_grad(), w0.require_grad());
    let out = linear_logprobs(x.clone(), w.clone(), t, temp, true);
    let g = (out.logprobs.clone() * weights).sum().backward();
    close("logprobs", &host(out.logprobs), &host(want), rel);
    close("entropy", &host(out.entropy.unwrap()), &host(want_ent), rel);
    close("dx", &host(x.grad(&g).unwrap()), &want_dx, rel);
    close("dw", &host(w.grad(&g).unwrap()), &want_dw, rel);
}

#[test]
fn matches_the_composition_in_f64() {
    // Three chunks: full, full, partial.
    let vocab = 40_000;
    let n = 2 * (CHUNK_LOGITS / vocab) + 22;
    check::<Autodiff<NdArray<f64>>>(n, 16, vocab, 0.7, 1e-10);
    check::<Autodiff<NdArray<f64>>>(5, 8, 97, 1.0, 1e-10);
}

#[test]
fn matches_the_composition_in_f32_on_flex() {
    let vocab = 30_000;
    let n = CHUNK_LOGITS / vocab + 9;
    check::<Autodiff<Flex>>(n, 32, vocab, 1.0, 1e-5);
    check::<Autodiff<Flex>>(7, 64, 1000, 0.6, 1e-5);
}

#[test]
fn only_the_tracked_input_gets_a_gradient() {
    type B = Autodiff<Flex>;
    let dev = Default::default();
    let x = Tensor::<B, 2>::random([6, 8], Distribution::Normal(0.0, 1.0), &dev).require_grad();
    let w = Tensor::<B, 2>::random([50, 8], Distribution::Normal(0.0, 1.0), &dev);
    let t = Tensor::<B, 1, Int>::from_data(TensorData::new(vec![1i64, 2, 3, 4, 5, 49], [6]), &dev);
    let out = linear_logprobs(x.clone(), w.clone(), t.clone(), 1.0, false);
    assert!(out.entropy.is_none());
    let g = out.logprobs.sum().backward();
    assert_eq!(x.grad(&g).unwrap().dims(), [6, 8]);
    assert!(w.grad(&g).is_none());
    // Without autodiff, the same values.
    let inner = linear_logprobs(x.clone().inner(), w.clone().inner(), t.clone().inner(), 1.0, false);
    let (want, _) = plain(x.inner(), w.inner(), t.inner(), 1.0);
    close("inner", &host(inner.logprobs), &host(want), 1e-5);
}

// Several row chunks of a 30,000-token vocabulary, and a tempered small one.
align_kernels::gpu_tests!(matches_the_composition_on_gpu, |G| {
    let vocab = 30_000;
    check::<Autodiff<G>>(CHUNK_LOGITS / vocab + 9, 32, vocab, 1.0, crate::common::GPU_REL);
    check::<Autodiff<G>>(7, 64, 1000, 0.6, crate::common::GPU_REL);
});
