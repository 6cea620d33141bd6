//! Choosing the next token: the host rule's semantics (transformers' processor order), and
//! the device versions (the generic tensor-op rule, flex's kernel, autodiff's delegation)
//! against it on random logits.

use align_kernels::burn::backend::{Autodiff, Flex, NdArray};
use align_kernels::burn::tensor::backend::Backend;
use align_kernels::burn::tensor::{Tensor, TensorData};
use align_kernels::sampling::{sample_generic, sample_row};
use align_kernels::{FusedOps, TokenSampling};

fn params(temperature: f32, top_k: usize, top_p: f32, banned: &[u32]) -> TokenSampling {
    TokenSampling { temperature, top_k, top_p, banned: banned.to_vec() }
}

/// log-softmax in f64, the reference for every returned log-prob.
fn log_softmax(row: &[f32], temperature: f32) -> Vec<f64> {
    let s = if temperature > 0.0 { temperature as f64 } else { 1.0 };
    let z: Vec<f64> = row.iter().map(|&x| x as f64 / s).collect();
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
    z.iter().map(|x| x - lse).collect()
}

/// How often each token is drawn over an even grid of uniform numbers.
fn frequencies(row: &[f32], p: &TokenSampling, draws: usize) -> Vec<f64> {
    let mut f = vec![0.0; row.len()];
    for i in 0..draws {
        f[sample_row(row, p, (i as f32 + 0.5) / draws as f32).0 as usize] += 1.0 / draws as f64;
    }
    f
}

#[test]
fn greedy_takes_the_most_likely_allowed_token() {
    let row = [0.0f32, 1.0, 5.0, 5.0];
    assert_eq!(sample_row(&row, &params(0.0, 0, 1.0, &[]), 0.9).0, 2, "ties go to the lower id");
    let (t, lp) = sample_row(&row, &params(0.0, 0, 1.0, &[2, 3]), 0.9);
    assert_eq!(t, 1);
    assert!((lp as f64 - log_softmax(&row, 1.0)[1]).abs() < 1e-6, "the ban does not renormalise the log-prob");
}

#[test]
fn the_draw_follows_the_tempered_distribution() {
    let row = [2.0f32, 1.0, 0.0, -1.0];
    for temperature in [1.0f32, 0.5, 2.0] {
        let want: Vec<f64> = log_softmax(&row, temperature).iter().map(|x| x.exp()).collect();
        let got = frequencies(&row, &params(temperature, 0, 1.0, &[]), 20_000);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-3, "T = {temperature}: {got:?} vs {want:?}");
        }
        let (t, lp) = sample_row(&row, &params(temperature, 0, 1.0, &[]), 0.3);
        assert!((lp as f64 - log_softmax(&row, temperature)[t as usize]).abs() < 1e-6);
    }
}

#[test]
fn top_p_is_measured_over_the_renormalised_top_k_set() {
    // p = softmax([3, 2, 1, 0]) ≈ [0.644, 0.237, 0.087, 0.032]. After top-k = 2 the kept
    // pair renormalises to [0.731, 0.269], so top-p 0.7 keeps only the first token (over
    // the full vocabulary 0.644 < 0.7 would keep two), as transformers' TopK → TopP does.
    let row = [3.0f32, 2.0, 1.0, 0.0];
    let f = frequencies(&row, &params(1.0, 2, 0.7, &[]), 2_000);
    assert!(f[0] > 1.0 - 1e-9, "{f:?}");
    let f = frequencies(&row, &params(1.0, 0, 0.7, &[]), 2_000);
    assert!(f[0] > 0.7 && f[1] > 0.2 && f[2] == 0.0 && f[3] == 0.0, "{f:?}");
    let f = frequencies(&row, &params(1.0, 3, 1.0, &[]), 4_000);
    let kept = [0.644 / 0.968, 0.237 / 0.968, 0.087 / 0.968, 0.0];
    for (g, w) in f.iter().zip(kept) {
        assert!((g - w).abs() < 2e-3, "{f:?}");
    }
    // The log-prob is over the whole vocabulary, before truncation.
    let (t, lp) = sample_row(&row, &params(1.0, 1, 1.0, &[]), 0.5);
    assert_eq!(t, 0);
    assert!((lp as f64 - log_softmax(&row, 1.0)[0]).abs() < 1e-6);
}

#[test]
fn banned_tokens_are_never_drawn() {
    let row = [5.0f32, 0.0, 0.0, 0.0];
    for p in [params(1.0, 0, 1.0, &[0]), params(1.0, 2, 1.0, &[0]), params(1.0, 0, 0.5, &[0])] {
        let f = frequencies(&row, &p, 3_000);
        assert_eq!(f[0], 0.0, "{p:?}: {f:?}");
    }
}

/// A seeded generator for the logits and the draws.
struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// The device rule against the host rule: same token unless the draw sits within 1e-5 of a
/// cumulative boundary (f32 against f64 sums), same log-prob to 1e-5.
fn check_device<B: Backend>(sample: impl Fn(Tensor<B, 2>, &[f32], &TokenSampling) -> Vec<(u32, f32)>) {
    let (rows, vocab) = (24, 500);
    let mut rng = SplitMix(5);
    let logits: Vec<f32> = (0..rows * vocab).map(|_| (rng.next() - 0.5) * 12.0).collect();
    let dev = Default::default();
    let cases = [
        params(1.0, 0, 1.0, &[]),
        params(0.7, 0, 1.0, &[3, 17]),
        params(1.3, 40, 1.0, &[]),
        params(1.0, 0, 0.9, &[]),
        params(0.8, 50, 0.8, &[7]),
        params(0.0, 0, 1.0, &[]),
        params(0.0, 0, 1.0, &[11]),
    ];
    let (mut compared, mut total) = (0, 0);
    for p in &cases {
        for _ in 0..4 {
            let uniforms: Vec<f32> = (0..rows).map(|_| rng.next()).collect();
            let t = Tensor::<B, 2>::from_data(TensorData::new(logits.clone(), [rows, vocab]), &dev);
            let got = sample(t, &uniforms, p);
            assert_eq!(got.len(), rows);
            for (r, (&u, &(tok, lp))) in uniforms.iter().zip(&got).enumerate() {
                let row = &logits[r * vocab..(r + 1) * vocab];
                let want_lp = log_softmax(row, p.temperature)[tok as usize];
                assert!((lp as f64 - want_lp).abs() < 1e-5, "{p:?} row {r}: log-prob {lp} vs {want_lp}");
                assert!(!p.banned.contains(&tok), "{p:?} row {r}: drew banned {tok}");
                total += 1;
                let near = [u - 1e-5, u + 1e-5].map(|v| sample_row(row, p, v.clamp(0.0, 0.999_999)).0);
                if near[0] != near[1] {
                    continue;
                }
                compared += 1;
                assert_eq!(tok, sample_row(row, p, u).0, "{p:?} row {r}, u = {u}");
            }
        }
    }
    assert!(compared * 10 >= total * 9, "only {compared} of {total} draws were away from a boundary");
}

#[test]
fn the_generic_rule_matches_the_host_rule() {
    check_device::<NdArray<f32>>(|t, u, p| {
        let (tok, lp) = sample_generic(t, u, p);
        let tok: Vec<i64> = tok.into_data().convert::<i64>().to_vec().unwrap();
        let lp: Vec<f32> = lp.into_data().convert::<f32>().to_vec().unwrap();
        tok.into_iter().map(|t| t as u32).zip(lp).collect()
    });
    check_device::<Flex>(|t, u, p| {
        let (tok, lp) = sample_generic(t, u, p);
        let tok: Vec<i64> = tok.into_data().convert::<i64>().to_vec().unwrap();
        let lp: Vec<f32> = lp.into_data().convert::<f32>().to_vec().unwrap();
        tok.into_iter().map(|t| t as u32).zip(lp).collect()
    });
}

#[test]
fn each_backend_samples_by_the_same_rule() {
    check_device::<Flex>(|t, u, p| Flex::sample_tokens(t.into_primitive().tensor(), u, p));
    check_device::<NdArray<f32>>(|t, u, p| NdArray::<f32>::sample_tokens(t.into_primitive().tensor(), u, p));
    check_device::<Autodiff<Flex>>(|t, u, p| Autodiff::<Flex>::sample_tokens(t.into_primitive().tensor(), u, p));
}

// The device rule where the logits are: the generic rule (sort, cumulative sums, argmax) on
// the GPU backend, and through its autodiff decorator.
align_kernels::gpu_tests!(samples_by_the_same_rule_on_gpu, |G| {
    check_device::<G>(|t, u, p| G::sample_tokens(t.into_primitive().tensor(), u, p));
    check_device::<Autodiff<G>>(|t, u, p| Autodiff::<G>::sample_tokens(t.into_primitive().tensor(), u, p));
});
