//! GFLOP/s of the CPU backend's products on SmolLM2-135M's own shapes (8 × 256 rows): the
//! forward projections, the backward's transposed products, the LM head's chunks and
//! decoding; flex's gemm (Burn's matmul) against `align_kernels::matmul` (the system BLAS
//! when one loads). `cargo run -p align-kernels --example products` (the dev profile
//! optimises dependencies); docs/performance.md has the figures.

use std::time::Instant;

use align_kernels::burn::backend::Flex;
use align_kernels::burn::tensor::{Distribution, Tensor};
use align_kernels::{blas, matmul};

fn time(name: &str, m: usize, k: usize, n: usize, transpose_a: bool, transpose_b: bool) {
    let dev = Default::default();
    let a_shape = if transpose_a { [k, m] } else { [m, k] };
    let b_shape = if transpose_b { [n, k] } else { [k, n] };
    let a = Tensor::<Flex, 2>::random(a_shape, Distribution::Normal(0.0, 1.0), &dev);
    let b = Tensor::<Flex, 2>::random(b_shape, Distribution::Normal(0.0, 1.0), &dev);
    let a = if transpose_a { a.transpose() } else { a };
    let b = if transpose_b { b.transpose() } else { b };
    let gflops = |product: &dyn Fn() -> Tensor<Flex, 2>| {
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let t = Instant::now();
            let _ = product().into_data();
            best = best.min(t.elapsed().as_secs_f64());
        }
        2.0 * (m * k * n) as f64 / best / 1e9
    };
    let gemm = gflops(&|| a.clone().matmul(b.clone()));
    let ours = gflops(&|| matmul(a.clone(), b.clone()));
    println!("| {name} | {gemm:.1} | {ours:.1} |");
}

fn main() {
    println!(
        "| product | flex gemm GFLOP/s | align_kernels::matmul ({}) GFLOP/s |",
        blas::library().unwrap_or("no BLAS")
    );
    println!("|---|---|---|");
    time("fwd x·w 2048x576x1536", 2048, 576, 1536, false, false);
    time("fwd q 2048x576x576", 2048, 576, 576, false, false);
    time("down 2048x1536x576", 2048, 1536, 576, false, false);
    time("wgrad xT·dy 576x2048x1536", 576, 2048, 1536, true, false);
    time("head 85x576x49152 (x·wT)", 85, 576, 49152, false, true);
    time("head 680x576x49152 (x·wT)", 680, 576, 49152, false, true);
    time("decode b1 1x576x1536", 1, 576, 1536, false, false);
    time("decode b64 64x576x1536", 64, 576, 1536, false, false);
}
