//! The CPU backend's own kernels: one pass over contiguous f32 data, rows split across
//! threads, and an `exp` the compiler vectorises (flex's `exp` and `sigmoid` call the scalar
//! libm function element by element on one thread). Anything else (another dtype, a strided
//! view) takes the generic path.

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::{Shape, TensorData};
use rayon::prelude::*;

use crate::elementwise;
use crate::lm_head::{float, int, prim};
use crate::{FusedOps, TokenSampling};

/// Elements per task: below this, splitting costs more than it saves.
const GRAIN: usize = 1 << 14;

/// `eˣ` for f32 to about 2 ulp: `2ᵏ·p(r)` with `x = k ln 2 + r`, `|r| ≤ ln 2 / 2`, and a
/// degree-6 polynomial for `eʳ`. Branch-free, so loops over it vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5·2²³: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let k = t - ROUND;
    let ki = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((ki + 127) << 23) as u32)
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

fn contiguous_f32(t: &FlexTensor) -> Option<&[f32]> {
    t.as_slice::<f32>()
}

fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

fn shape(t: &FlexTensor) -> Shape {
    t.layout().shape().clone()
}

/// `silu(g)·u`.
fn swiglu(g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut y = vec![0.0f32; g.len()];
    y.par_chunks_mut(GRAIN).zip(g.par_chunks(GRAIN).zip(u.par_chunks(GRAIN))).for_each(|(y, (g, u))| {
        for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
            *y = g * sigmoid(g) * u;
        }
    });
    y
}

/// `(dg, du)` of `silu(g)·u`.
fn swiglu_backward(g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (mut dg, mut du) = (vec![0.0f32; g.len()], vec![0.0f32; g.len()]);
    dg.par_chunks_mut(GRAIN)
        .zip(du.par_chunks_mut(GRAIN))
        .zip(g.par_chunks(GRAIN).zip(u.par_chunks(GRAIN)).zip(dy.par_chunks(GRAIN)))
        .for_each(|((dg, du), ((g, u), dy))| {
            for i in 0..g.len() {
                let s = sigmoid(g[i]);
                let silu = g[i] * s;
                dg[i] = dy[i] * u[i] * (s + silu * (1.0 - s));
                du[i] = dy[i] * silu;
            }
        });
    (dg, du)
}

/// Rows per task for row-wise kernels over rows of length `d`.
fn rows_per_task(d: usize) -> usize {
    (GRAIN / d.max(1)).max(1)
}

/// RMSNorm rows: `(y, r)`.
fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    let rows = x.len() / d;
    let (mut y, mut r) = (vec![0.0f32; x.len()], vec![0.0f32; rows]);
    let k = rows_per_task(d);
    y.par_chunks_mut(k * d).zip(r.par_chunks_mut(k)).zip(x.par_chunks(k * d)).for_each(|((y, r), x)| {
        for ((y, r), x) in y.chunks_mut(d).zip(r.iter_mut()).zip(x.chunks(d)) {
            let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
            *r = 1.0 / (ms + eps).sqrt();
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                *y = x * *r * w;
            }
        }
    });
    (y, r)
}

/// RMSNorm backward: `(dx, dw)`.
fn rms_norm_backward(x: &[f32], w: &[f32], r: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    let k = rows_per_task(d);
    let mut dx = vec![0.0f32; x.len()];
    let dw = dx
        .par_chunks_mut(k * d)
        .zip(x.par_chunks(k * d).zip(r.par_chunks(k)).zip(dy.par_chunks(k * d)))
        .map(|(dx, ((x, r), dy))| {
            let mut dw = vec![0.0f32; d];
            for (((dx, x), &r), dy) in dx.chunks_mut(d).zip(x.chunks(d)).zip(r).zip(dy.chunks(d)) {
                let mut dot = 0.0f32;
                for i in 0..d {
                    let n = x[i] * r;
                    dot += dy[i] * w[i] * n;
                    dw[i] += dy[i] * n;
                }
                let dot = dot / d as f32;
                for i in 0..d {
                    let n = x[i] * r;
                    dx[i] = r * (dy[i] * w[i] - n * dot);
                }
            }
            dw
        })
        .reduce(
            || vec![0.0f32; d],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                a
            },
        );
    (dx, dw)
}

/// RoPE over `x: [b, t, h, d]` with `cos, sin: [b, t, d]`; `sign = −1` rotates back.
fn rope(x: &[f32], cos: &[f32], sin: &[f32], heads: usize, d: usize, sign: f32) -> Vec<f32> {
    let half = d / 2;
    let mut y = vec![0.0f32; x.len()];
    // One task per (b, t) position at least: its heads share the angles.
    let per = heads * d;
    let k = rows_per_task(per);
    y.par_chunks_mut(k * per).zip(x.par_chunks(k * per)).enumerate().for_each(|(task, (y, x))| {
        for (p, (y, x)) in y.chunks_mut(per).zip(x.chunks(per)).enumerate() {
            let at = (task * k + p) * d;
            let (c, s) = (&cos[at..at + d], &sin[at..at + d]);
            for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
                let (y1, y2) = y.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (x[i], x[i + half]);
                    y1[i] = x1 * c[i] - sign * x2 * s[i];
                    y2[i] = x2 * c[i + half] + sign * x1 * s[i + half];
                }
            }
        }
    });
    y
}

/// Target ids of an int tensor (i64 or i32), or `None` for another layout.
fn targets(t: &FlexTensor) -> Option<Vec<usize>> {
    if let Some(v) = t.as_slice::<i64>() {
        return Some(v.iter().map(|&i| i as usize).collect());
    }
    t.as_slice::<i32>().map(|v| v.iter().map(|&i| i as usize).collect())
}

/// Values summed per block of a row in f32 lanes, the block totals in f64: the sums of a
/// 49,152-wide row stay as accurate as Burn's own reductions at the speed of f32 lanes.
const SUM_BLOCK: usize = 1024;

/// `(Σ e, Σ e·s)` over one row, with `e = exp(s)` and `s = z · inv_t − max` (so both sums
/// have terms of one sign: no cancellation in the entropy). The second is 0 unless asked.
fn exp_sums(z: &[f32], inv_t: f32, max: f32, with_dot: bool) -> (f64, f64) {
    const LANES: usize = 16;
    let (mut sum, mut dot) = (0.0f64, 0.0f64);
    for block in z.chunks(SUM_BLOCK) {
        let (mut s, mut d) = ([0.0f32; LANES], [0.0f32; LANES]);
        let mut lanes = block.chunks_exact(LANES);
        for lane in &mut lanes {
            for j in 0..LANES {
                let x = lane[j] * inv_t - max;
                let e = exp(x);
                s[j] += e;
                if with_dot {
                    d[j] += e * x;
                }
            }
        }
        for &v in lanes.remainder() {
            let x = v * inv_t - max;
            let e = exp(x);
            s[0] += e;
            d[0] += e * x;
        }
        sum += s.iter().map(|&v| f64::from(v)).sum::<f64>();
        dot += d.iter().map(|&v| f64::from(v)).sum::<f64>();
    }
    (sum, if with_dot { dot } else { 0.0 })
}

/// The fused head's row statistics over raw logits `z: [rows, vocab]` read as `z · inv_t`:
/// `(log p(target), lse, entropy)`, two passes over each row (max, then Σ exp).
fn head_stats(z: &[f32], t: &[usize], inv_t: f32, with_entropy: bool) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let vocab = z.len() / t.len().max(1);
    let rows: Vec<(f32, f32, f32)> = z
        .par_chunks(vocab)
        .zip(t.par_iter())
        .map(|(z, &t)| {
            let max = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * inv_t;
            let (sum, dot) = exp_sums(z, inv_t, max, with_entropy);
            let log_sum = sum.ln();
            let lse = f64::from(max) + log_sum;
            let picked = z.get(t).map_or(f64::NAN, |&v| f64::from(v * inv_t));
            // H = lse − Σ p·z = log Σe − Σ e·s / Σe, with s = z·inv_t − max.
            ((picked - lse) as f32, lse as f32, (log_sum - dot / sum) as f32)
        })
        .collect();
    let logp = rows.iter().map(|r| r.0).collect();
    let lse = rows.iter().map(|r| r.1).collect();
    let entropy = if with_entropy { rows.iter().map(|r| r.2).collect() } else { vec![] };
    (logp, lse, entropy)
}

/// `∂L/∂z = scale · (1[v = t] − exp(z · inv_t − lse))`, row by row.
fn head_grad(z: &[f32], lse: &[f32], scale: &[f32], t: &[usize], inv_t: f32) -> Vec<f32> {
    let vocab = z.len() / t.len().max(1);
    let mut dz = vec![0.0f32; z.len()];
    dz.par_chunks_mut(vocab).zip(z.par_chunks(vocab)).enumerate().for_each(|(i, (dz, z))| {
        let (l, s) = (lse[i], scale[i]);
        for (d, &v) in dz.iter_mut().zip(z) {
            *d = -s * exp(v * inv_t - l);
        }
        if let Some(d) = dz.get_mut(t[i]) {
            *d += s;
        }
    });
    dz
}

impl FusedOps for Flex {
    fn attention_forward(q: FlexTensor, k: FlexTensor, v: FlexTensor, mask: FlexTensor) -> (FlexTensor, FlexTensor) {
        match crate::flex_attention::forward(&q, &k, &v, &mask) {
            Some(out) => out,
            None => {
                let f = crate::attention::forward::<Flex>(
                    float(q),
                    float(k),
                    float(v),
                    burn::tensor::Tensor::from_primitive(mask),
                );
                (prim(f.out), prim(f.lse))
            }
        }
    }

    fn attention_backward(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        mask: FlexTensor,
        out: FlexTensor,
        lse: FlexTensor,
        dout: FlexTensor,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        match crate::flex_attention::backward(&q, &k, &v, &mask, &out, &lse, &dout) {
            Some(grads) => grads,
            None => {
                let g = crate::attention::backward::<Flex>(q, k, v, mask, out, lse, float(dout));
                (prim(g.q), prim(g.k), prim(g.v))
            }
        }
    }

    /// The kernel above recomputes at no loss of speed, so the probabilities are never kept.
    fn attention_recomputes(_scores: usize) -> bool {
        true
    }

    fn head_chunk_stats(
        z: FlexTensor,
        targets_: FlexTensor,
        temperature: f32,
        with_entropy: bool,
    ) -> (FlexTensor, FlexTensor, Option<FlexTensor>) {
        match (contiguous_f32(&z), targets(&targets_)) {
            (Some(zs), Some(t)) if !t.is_empty() && zs.len() % t.len() == 0 => {
                let rows = t.len();
                let (logp, lse, entropy) = head_stats(zs, &t, 1.0 / temperature, with_entropy);
                let v = |x: Vec<f32>| tensor(x, Shape::new([rows]));
                (v(logp), v(lse), with_entropy.then(|| v(entropy)))
            }
            _ => {
                let (logp, lse, entropy) =
                    crate::lm_head::chunk_stats::<Flex>(float(z), int(targets_), temperature, with_entropy);
                (prim(logp), prim(lse), entropy.map(prim))
            }
        }
    }

    fn head_chunk_grad(
        z: FlexTensor,
        lse: FlexTensor,
        scale: FlexTensor,
        targets_: FlexTensor,
        temperature: f32,
    ) -> FlexTensor {
        match (contiguous_f32(&z), contiguous_f32(&lse), contiguous_f32(&scale), targets(&targets_)) {
            (Some(zs), Some(ls), Some(ss), Some(t))
                if !t.is_empty() && zs.len() % t.len() == 0 && ls.len() == t.len() && ss.len() == t.len() =>
            {
                tensor(head_grad(zs, ls, ss, &t, 1.0 / temperature), shape(&z))
            }
            _ => {
                prim(crate::lm_head::chunk_grad::<Flex>(float(z), float(lse), float(scale), int(targets_), temperature))
            }
        }
    }

    /// A system BLAS when one loaded and the operands are 2-D f32 (row-major or transposed
    /// views); flex's gemm otherwise.
    fn matmul(a: FlexTensor, b: FlexTensor) -> FlexTensor {
        match crate::blas::matmul(&a, &b) {
            Some(c) => c,
            None => prim(float::<Flex, 2>(a).matmul(float(b))),
        }
    }

    /// Rows on threads, each by the host reference rule (no `[rows, vocab]` temporaries).
    fn sample_tokens(logits: FlexTensor, uniforms: &[f32], params: &TokenSampling) -> Vec<(u32, f32)> {
        match contiguous_f32(&logits) {
            Some(z) if !uniforms.is_empty() && z.len() % uniforms.len() == 0 => {
                let v = z.len() / uniforms.len();
                z.par_chunks(v)
                    .zip(uniforms.par_iter())
                    .map(|(row, &u)| crate::sampling::sample_row(row, params, u))
                    .collect()
            }
            _ => {
                let (tokens, logprobs) = crate::sampling::sample_generic::<Flex>(float(logits), uniforms, params);
                crate::sampling::to_host(tokens, logprobs)
            }
        }
    }

    fn rope(x: FlexTensor, cos: FlexTensor, sin: FlexTensor, inverse: bool) -> FlexTensor {
        match (contiguous_f32(&x), contiguous_f32(&cos), contiguous_f32(&sin)) {
            (Some(xs), Some(cs), Some(ss)) => {
                let dims = shape(&x);
                let (heads, d) = (dims[2], dims[3]);
                tensor(rope(xs, cs, ss, heads, d, if inverse { -1.0 } else { 1.0 }), dims)
            }
            _ => prim(crate::rope::forward::<Flex>(float(x), float(cos), float(sin), inverse)),
        }
    }

    fn swiglu(g: FlexTensor, u: FlexTensor) -> FlexTensor {
        match (contiguous_f32(&g), contiguous_f32(&u)) {
            (Some(gs), Some(us)) => tensor(swiglu(gs, us), shape(&g)),
            _ => prim(burn::tensor::activation::silu(float::<Flex, 1>(g)) * float::<Flex, 1>(u)),
        }
    }

    fn swiglu_backward(g: FlexTensor, u: FlexTensor, dy: FlexTensor) -> (FlexTensor, FlexTensor) {
        match (contiguous_f32(&g), contiguous_f32(&u), contiguous_f32(&dy)) {
            (Some(gs), Some(us), Some(dys)) => {
                let (dg, du) = swiglu_backward(gs, us, dys);
                (tensor(dg, shape(&g)), tensor(du, shape(&g)))
            }
            _ => {
                let (dg, du) = elementwise::swiglu_backward::<Flex, 1>(float(g), float(u), float(dy));
                (prim(dg), prim(du))
            }
        }
    }

    fn rms_norm(x: FlexTensor, w: FlexTensor, eps: f64) -> (FlexTensor, FlexTensor) {
        match (contiguous_f32(&x), contiguous_f32(&w)) {
            (Some(xs), Some(ws)) => {
                let (y, r) = rms_norm(xs, ws, eps as f32);
                let rows = r.len();
                (tensor(y, shape(&x)), tensor(r, Shape::new([rows, 1])))
            }
            _ => {
                let (y, r) = elementwise::rms_norm_forward::<Flex>(float(x), float(w), eps);
                (prim(y), prim(r))
            }
        }
    }

    fn rms_norm_backward(x: FlexTensor, w: FlexTensor, r: FlexTensor, dy: FlexTensor) -> (FlexTensor, FlexTensor) {
        match (contiguous_f32(&x), contiguous_f32(&w), contiguous_f32(&r), contiguous_f32(&dy)) {
            (Some(xs), Some(ws), Some(rs), Some(dys)) => {
                let (dx, dw) = rms_norm_backward(xs, ws, rs, dys);
                (tensor(dx, shape(&x)), tensor(dw, shape(&w)))
            }
            _ => {
                let (dx, dw) = elementwise::rms_norm_backward::<Flex>(float(x), float(w), float(r), float(dy));
                (prim(dx), prim(dw))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_is_within_a_few_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = super::exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(super::exp(0.0), 1.0);
        assert!(super::exp(-1000.0) < 1e-37 && super::exp(-1000.0) >= 0.0);
    }
}
