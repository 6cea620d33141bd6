//! The flash-style attention against Burn's own attention under autodiff: outputs and the
//! gradients of q, k and v, with causal + segment masks (padding, packed rows), GQA ratios
//! 1, 3 and 4 in the model's stacked layout, head_dim 64 and 128; short rows (probabilities
//! kept) and long ones (recomputed block by block).

use align_kernels::attention::{BLOCK_SCORES, RECOMPUTE_ABOVE_SCORES};
use align_kernels::burn::backend::{Autodiff, Flex, NdArray};
use align_kernels::burn::tensor::backend::{AutodiffBackend, Backend};
use align_kernels::burn::tensor::module::attention;
use align_kernels::burn::tensor::ops::AttentionModuleOptions;
use align_kernels::burn::tensor::{Bool, Distribution, Tensor, TensorData};
use align_kernels::{FusedOps, masked_attention};

use crate::common::{close, host};

/// The model's mask in its GQA layout `[b, kv, groups·t, t]`: a key after the query or in
/// another segment is masked. Row 0: one sequence then padding (segment 0: pads see pads);
/// row 1: two packed sequences filling the row.
fn mask<B: Backend>(b: usize, kv: usize, groups: usize, t: usize, dev: &B::Device) -> Tensor<B, 4, Bool> {
    let seg = |r: usize, j: usize| -> i64 {
        match r % 2 {
            0 if j < t - 3 => 1,
            0 => 0,
            _ if j < t / 2 => 1,
            _ => 2,
        }
    };
    let mut m = Vec::with_capacity(b * kv * groups * t * t);
    for r in 0..b {
        for _ in 0..kv * groups {
            for i in 0..t {
                for j in 0..t {
                    m.push(j > i || seg(r, i) != seg(r, j));
                }
            }
        }
    }
    Tensor::from_data(TensorData::new(m, [b, kv, groups * t, t]), dev)
}

fn check<B: AutodiffBackend + FusedOps>(b: usize, kv: usize, groups: usize, t: usize, d: usize, rel: f64) {
    let dev = Default::default();
    B::seed(&dev, 5);
    let q0 = Tensor::<B, 4>::random([b, kv, groups * t, d], Distribution::Normal(0.0, 1.0), &dev);
    let k0 = Tensor::<B, 4>::random([b, kv, t, d], Distribution::Normal(0.0, 1.0), &dev);
    let v0 = Tensor::<B, 4>::random([b, kv, t, d], Distribution::Normal(0.0, 1.0), &dev);
    let r = Tensor::<B, 4>::random([b, kv, groups * t, d], Distribution::Normal(0.0, 1.0), &dev);
    let m = mask::<B>(b, kv, groups, t, &dev);

    let (q, k, v) = (q0.clone().require_grad(), k0.clone().require_grad(), v0.clone().require_grad());
    let want = attention(q.clone(), k.clone(), v.clone(), Some(m.clone()), None, AttentionModuleOptions::default());
    let g = (want.clone() * r.clone()).sum().backward();
    let want_grads = [host(q.grad(&g).unwrap()), host(k.grad(&g).unwrap()), host(v.grad(&g).unwrap())];

    let (q, k, v) = (q0.require_grad(), k0.require_grad(), v0.require_grad());
    let got = masked_attention(q.clone(), k.clone(), v.clone(), m);
    let g = (got.clone() * r).sum().backward();
    close("out", &host(got), &host(want), rel);
    let got_grads = [host(q.grad(&g).unwrap()), host(k.grad(&g).unwrap()), host(v.grad(&g).unwrap())];
    for ((name, got), want) in ["dq", "dk", "dv"].iter().zip(&got_grads).zip(&want_grads) {
        close(name, got, want, rel);
    }
}

#[test]
fn matches_burn_attention_in_f64() {
    for (kv, groups, d) in [(2, 1, 64), (1, 3, 64), (2, 4, 128)] {
        check::<Autodiff<NdArray<f64>>>(2, kv, groups, 12, d, 1e-10);
    }
}

/// Long rows take the recomputing (flash-style) path, over several blocks of query rows.
#[test]
fn the_recomputing_path_matches_burn_attention() {
    let (kv, groups, t) = (1, 4, 2100);
    assert!(kv * groups * t * t > RECOMPUTE_ABOVE_SCORES, "the case takes the recomputing path");
    assert!(BLOCK_SCORES / (kv * t) < groups * t, "the case spans several blocks");
    check::<Autodiff<NdArray<f64>>>(1, kv, groups, t, 64, 1e-10);
    check::<Autodiff<Flex>>(1, kv, groups, t, 64, 1e-5);
}

#[test]
fn matches_burn_attention_in_f32_on_flex() {
    for (kv, groups, d) in [(3, 1, 64), (1, 3, 128), (2, 4, 64)] {
        check::<Autodiff<Flex>>(2, kv, groups, 20, d, 1e-5);
    }
    // Several blocks of query rows over padded and packed rows.
    check::<Autodiff<Flex>>(2, 1, 3, 150, 64, 1e-5);
}

// On a GPU: the generic forward and backward, f32 sums in another order. (The 2,100-token
// recomputing case is left to the f64 reference: on a software Vulkan driver its first,
// cold run took over 10 minutes of autotuning and shader compilation.)
align_kernels::gpu_tests!(matches_burn_attention_on_gpu, |G| {
    for (kv, groups, d) in [(3, 1, 64), (1, 3, 128), (2, 4, 64)] {
        check::<Autodiff<G>>(2, kv, groups, 20, d, crate::common::GPU_REL);
    }
});
