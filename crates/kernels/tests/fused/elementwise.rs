//! RMSNorm and SwiGLU nodes against the Burn compositions they replace: values and the
//! gradients of every input (the norm's weight included, for full fine-tuning).

use align_kernels::burn::backend::{Autodiff, Flex, NdArray};
use align_kernels::burn::tensor::backend::AutodiffBackend;
use align_kernels::burn::tensor::{Distribution, Tensor, activation};
use align_kernels::{FusedOps, rms_norm, swiglu};

use crate::common::{close, host};

fn check_rms_norm<B: AutodiffBackend + FusedOps>(rel: f64) {
    let dev = Default::default();
    B::seed(&dev, 3);
    // 4-D as Qwen3's per-head q/k norm, 3-D as the blocks' norms.
    let x0 = Tensor::<B, 4>::random([2, 3, 5, 64], Distribution::Normal(0.5, 2.0), &dev);
    let w0 = Tensor::<B, 1>::random([64], Distribution::Normal(1.0, 0.3), &dev);
    let r = Tensor::<B, 4>::random([2, 3, 5, 64], Distribution::Normal(0.0, 1.0), &dev);
    let eps = 1e-5;

    let (x, w) = (x0.clone().require_grad(), w0.clone().require_grad());
    let want = x.clone() / (x.clone().square().mean_dim(3) + eps).sqrt() * w.clone().unsqueeze();
    let g = (want.clone() * r.clone()).sum().backward();
    let (want_dx, want_dw) = (host(x.grad(&g).unwrap()), host(w.grad(&g).unwrap()));

    let (x, w) = (x0.require_grad(), w0.require_grad());
    let got = rms_norm(x.clone(), w.clone(), eps);
    let g = (got.clone() * r).sum().backward();
    close("y", &host(got), &host(want), rel);
    close("dx", &host(x.grad(&g).unwrap()), &want_dx, rel);
    close("dw", &host(w.grad(&g).unwrap()), &want_dw, rel);
}

fn check_swiglu<B: AutodiffBackend + FusedOps>(rel: f64) {
    let dev = Default::default();
    B::seed(&dev, 4);
    let g0 = Tensor::<B, 3>::random([2, 7, 48], Distribution::Normal(0.0, 3.0), &dev);
    let u0 = Tensor::<B, 3>::random([2, 7, 48], Distribution::Normal(0.0, 1.0), &dev);
    let r = Tensor::<B, 3>::random([2, 7, 48], Distribution::Normal(0.0, 1.0), &dev);

    let (g, u) = (g0.clone().require_grad(), u0.clone().require_grad());
    let want = activation::silu(g.clone()) * u.clone();
    let gr = (want.clone() * r.clone()).sum().backward();
    let (want_dg, want_du) = (host(g.grad(&gr).unwrap()), host(u.grad(&gr).unwrap()));

    let (g, u) = (g0.require_grad(), u0.require_grad());
    let got = swiglu(g.clone(), u.clone());
    let gr = (got.clone() * r).sum().backward();
    close("y", &host(got), &host(want), rel);
    close("dg", &host(g.grad(&gr).unwrap()), &want_dg, rel);
    close("du", &host(u.grad(&gr).unwrap()), &want_du, rel);
}

#[test]
fn rms_norm_matches_the_composition() {
    check_rms_norm::<Autodiff<NdArray<f64>>>(1e-10);
    check_rms_norm::<Autodiff<Flex>>(1e-5);
}

#[test]
fn swiglu_matches_the_composition() {
    check_swiglu::<Autodiff<NdArray<f64>>>(1e-10);
    check_swiglu::<Autodiff<Flex>>(1e-5);
}

align_kernels::gpu_tests!(rms_norm_and_swiglu_on_gpu, |G| {
    check_rms_norm::<Autodiff<G>>(crate::common::GPU_REL);
    check_swiglu::<Autodiff<G>>(crate::common::GPU_REL);
});
