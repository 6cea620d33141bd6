//! The CPU backend's own kernels: one pass over contiguous f32 data, rows split across
//! threads, and an `exp` the compiler vectorises (flex's `exp` and `sigmoid` call the scalar
//! libm function element by element on one thread). Anything else (another dtype, a strided
//! view) takes the generic path.

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::{Shape, TensorData};
use rayon::prelude::*;

use crate::FusedOps;
use crate::elementwise;
use crate::lm_head::{float, prim};

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

impl FusedOps for Flex {
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
