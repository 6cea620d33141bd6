//! The fused LoRA projection against `x W + s·(x A) B` composed from Burn ops: values and
//! the gradients of x, A and B; the frozen W gets none.

use align_kernels::burn::backend::{Autodiff, Flex, NdArray};
use align_kernels::burn::tensor::backend::AutodiffBackend;
use align_kernels::burn::tensor::{Distribution, Tensor};
use align_kernels::{FusedOps, lora_linear};

use crate::common::{close, host};

fn check<B: AutodiffBackend + FusedOps>(n: usize, din: usize, dout: usize, r: usize, rel: f64) {
    let dev = Default::default();
    B::seed(&dev, 9);
    let x0 = Tensor::<B, 2>::random([n, din], Distribution::Normal(0.0, 1.0), &dev);
    let w = Tensor::<B, 2>::random([din, dout], Distribution::Normal(0.0, 0.2), &dev);
    let a0 = Tensor::<B, 2>::random([din, r], Distribution::Normal(0.0, 0.2), &dev);
    let b0 = Tensor::<B, 2>::random([r, dout], Distribution::Normal(0.0, 0.2), &dev);
    let ry = Tensor::<B, 2>::random([n, dout], Distribution::Normal(0.0, 1.0), &dev);
    let scale = 2.0;

    let (x, a, b) = (x0.clone().require_grad(), a0.clone().require_grad(), b0.clone().require_grad());
    let want = x.clone().matmul(w.clone()) + x.clone().matmul(a.clone()).matmul(b.clone()) * scale;
    let g = (want.clone() * ry.clone()).sum().backward();
    let wants = [host(x.grad(&g).unwrap()), host(a.grad(&g).unwrap()), host(b.grad(&g).unwrap())];

    let (x, a, b) = (x0.require_grad(), a0.require_grad(), b0.require_grad());
    let got = lora_linear(x.clone(), w.clone(), a.clone(), b.clone(), scale);
    let g = (got.clone() * ry).sum().backward();
    close("y", &host(got), &host(want), rel);
    let gots = [host(x.grad(&g).unwrap()), host(a.grad(&g).unwrap()), host(b.grad(&g).unwrap())];
    for ((name, got), want) in ["dx", "dA", "dB"].iter().zip(&gots).zip(&wants) {
        close(name, got, want, rel);
    }
    assert!(w.grad(&g).is_none());
}

#[test]
fn matches_the_composition() {
    check::<Autodiff<NdArray<f64>>>(13, 24, 40, 4, 1e-10);
    check::<Autodiff<Flex>>(64, 96, 160, 16, 1e-5);
}

align_kernels::gpu_tests!(matches_the_composition_on_gpu, |G| {
    check::<Autodiff<G>>(64, 96, 160, 16, crate::common::GPU_REL);
});
