//! RoPE as one node against its Burn composition: values and the gradient of x.

use align_kernels::burn::backend::{Autodiff, Flex, NdArray};
use align_kernels::burn::tensor::backend::AutodiffBackend;
use align_kernels::burn::tensor::{Distribution, Tensor};
use align_kernels::{FusedOps, rope};

use crate::common::{close, host};

fn check<B: AutodiffBackend + FusedOps>(b: usize, t: usize, h: usize, d: usize, rel: f64) {
    let dev = Default::default();
    B::seed(&dev, 8);
    let x0 = Tensor::<B, 4>::random([b, t, h, d], Distribution::Normal(0.0, 1.0), &dev);
    let angles = Tensor::<B, 3>::random([b, t, d / 2], Distribution::Uniform(-3.0, 3.0), &dev);
    let angles = Tensor::cat(vec![angles.clone(), angles], 2);
    let (cos, sin) = (angles.clone().cos(), angles.sin());
    let r = Tensor::<B, 4>::random([b, t, h, d], Distribution::Normal(0.0, 1.0), &dev);

    let x = x0.clone().require_grad();
    let x1 = x.clone().narrow(3, 0, d / 2);
    let x2 = x.clone().narrow(3, d / 2, d / 2);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    let want = x.clone() * cos.clone().unsqueeze_dim(2) + rotated * sin.clone().unsqueeze_dim(2);
    let g = (want.clone() * r.clone()).sum().backward();
    let want_dx = host(x.grad(&g).unwrap());

    let x = x0.require_grad();
    let got = rope(x.clone(), cos, sin);
    let g = (got.clone() * r).sum().backward();
    close("y", &host(got), &host(want), rel);
    close("dx", &host(x.grad(&g).unwrap()), &want_dx, rel);
}

#[test]
fn matches_the_composition() {
    check::<Autodiff<NdArray<f64>>>(2, 5, 3, 64, 1e-10);
    check::<Autodiff<Flex>>(2, 5, 3, 64, 1e-5);
    // Enough positions for several threads' worth of work on flex.
    check::<Autodiff<Flex>>(3, 200, 9, 128, 1e-5);
}

align_kernels::gpu_tests!(matches_the_composition_on_gpu, |G| {
    check::<Autodiff<G>>(2, 5, 3, 64, crate::common::GPU_REL);
    check::<Autodiff<G>>(3, 200, 9, 128, crate::common::GPU_REL);
});
