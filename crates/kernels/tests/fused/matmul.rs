//! The backend product (a system BLAS on the CPU backend when one is installed) against
//! Burn's own matmul: plain, transposed and offset operands, and both input gradients.

use align_kernels::burn::backend::{Autodiff, Flex, NdArray};
use align_kernels::burn::tensor::backend::Backend;
use align_kernels::burn::tensor::{Distribution, Tensor};
use align_kernels::{blas, matmul};

use crate::common::{close, host};

/// Where Debian's OpenBLAS is installed (CI installs it) and the CPU has no AVX-512 (where
/// gemm's own kernels are faster), the CPU backend must have loaded it, or these tests would
/// only compare gemm with itself.
#[test]
fn an_installed_openblas_is_used() {
    let installed = std::path::Path::new("/usr/lib/x86_64-linux-gnu/libopenblas.so.0").exists();
    let avx512 = std::arch::is_x86_feature_detected!("avx512f");
    if installed && !avx512 && std::env::var("ALIGN_BLAS").is_err() {
        assert!(blas::library().is_some(), "libopenblas.so.0 is installed but was not loaded");
    }
}

fn random<B: Backend>(shape: [usize; 2]) -> Tensor<B, 2> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
}

#[test]
fn products_match_burns_matmul_for_every_operand_layout() {
    Flex::seed(&Default::default(), 3);
    let (a, b) = (random::<Flex>([37, 70]), random::<Flex>([70, 53]));
    let want = host(a.clone().matmul(b.clone()));
    close("plain", &host(matmul(a.clone(), b.clone())), &want, 1e-5);
    // Transposed views of contiguous data (strides [1, rows]).
    let (a_t, b_t) = (random::<Flex>([70, 37]).transpose(), random::<Flex>([53, 70]).transpose());
    let want = |x: &Tensor<Flex, 2>, y: &Tensor<Flex, 2>| host(x.clone().matmul(y.clone()));
    close("a as a transposed view", &host(matmul(a_t.clone(), b.clone())), &want(&a_t, &b), 1e-5);
    close("b as a transposed view", &host(matmul(a.clone(), b_t.clone())), &want(&a, &b_t), 1e-5);
    close("both transposed", &host(matmul(a_t.clone(), b_t.clone())), &want(&a_t, &b_t), 1e-5);
    // Views with an offset and a leading dimension wider than the rows.
    let wide = random::<Flex>([40, 90]);
    let view = wide.clone().narrow(0, 3, 37).narrow(1, 10, 70);
    let want = host(view.clone().matmul(b.clone()));
    close("offset view", &host(matmul(view, b.clone())), &want, 1e-5);
    // Vectors: one row, one column.
    let (row, col) = (random::<Flex>([1, 70]), random::<Flex>([70, 1]));
    close("one row", &host(matmul(row.clone(), b.clone())), &host(row.matmul(b)), 1e-5);
    close("one column", &host(matmul(a.clone(), col.clone())), &host(a.matmul(col)), 1e-5);
}

/// Both input gradients of the autodiff node against Burn's matmul's.
fn check_gradients<B: align_kernels::burn::tensor::backend::AutodiffBackend + align_kernels::FusedOps>(rel: f64) {
    B::seed(&Default::default(), 5);
    let (a0, b0, r) = (random::<B>([29, 64]), random::<B>([64, 41]), random::<B>([29, 41]));
    let (a, b) = (a0.clone().require_grad(), b0.clone().require_grad());
    let g = (a.clone().matmul(b.clone()) * r.clone()).sum().backward();
    let (want_a, want_b) = (host(a.grad(&g).unwrap()), host(b.grad(&g).unwrap()));
    let (a, b) = (a0.require_grad(), b0.require_grad());
    let y = matmul(a.clone(), b.clone());
    let g = (y * r).sum().backward();
    close("da", &host(a.grad(&g).unwrap()), &want_a, rel);
    close("db", &host(b.grad(&g).unwrap()), &want_b, rel);
}

#[test]
fn gradients_match_burns_matmul() {
    check_gradients::<Autodiff<Flex>>(1e-5);
    check_gradients::<Autodiff<NdArray<f64>>>(1e-10);
}

align_kernels::gpu_tests!(gradients_match_burns_matmul_on_gpu, |G| {
    check_gradients::<Autodiff<G>>(crate::common::GPU_REL);
});
