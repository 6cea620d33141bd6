//! Masked attention on the CPU backend: the forward and the recomputing backward of
//! [`crate::attention`] (FlashAttention-2's equations, see there) as one task per
//! `(batch, head)` pair over contiguous f32, with gemm products on blocks of query rows.
//!
//! Each block of query rows reads only the span of keys its mask allows (first to last
//! allowed key over the block's rows), so a causal mask costs about half the products of the
//! full square, and padding or other segments outside the span cost nothing. Neither pass
//! keeps more than one block's scores; the forward keeps one log-sum-exp per row.

use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, Shape, TensorData};
use rayon::prelude::*;

use crate::flex::exp;

/// Query rows per block: large enough for gemm to run at speed, small enough that a block's
/// key span stays close to its own rows' under a causal mask.
const BLOCK_ROWS: usize = 64;

/// A `[b, h, m, n]` boolean mask read through its strides (broadcast axes have stride 0), so
/// an expanded mask is never copied.
struct Mask<'a> {
    bytes: &'a [u8],
    offset: usize,
    strides: [usize; 4],
}

impl Mask<'_> {
    /// Row `r` of pair `(bi, hi)`: `true` where the key is not allowed.
    fn row(&self, bi: usize, hi: usize, r: usize, n: usize) -> impl Iterator<Item = bool> + '_ {
        let base = self.offset + bi * self.strides[0] + hi * self.strides[1] + r * self.strides[2];
        (0..n).map(move |c| self.bytes[base + c * self.strides[3]] != 0)
    }
}

/// `f32` data of a float tensor in row-major order (copied only when strided).
fn f32_data(t: &FlexTensor) -> Option<std::borrow::Cow<'_, [f32]>> {
    if t.dtype() != DType::F32 {
        return None;
    }
    match t.as_slice::<f32>() {
        Some(s) => Some(std::borrow::Cow::Borrowed(s)),
        None => t.to_contiguous().as_slice::<f32>().map(|s| std::borrow::Cow::Owned(s.to_vec())),
    }
}

fn mask_view(mask: &FlexTensor) -> Option<Mask<'_>> {
    // One byte per value (the Native and U8 bool stores), non-negative strides, and every
    // index within the buffer.
    if !matches!(mask.dtype(), DType::Bool(_)) || mask.dtype().size() != 1 {
        return None;
    }
    let (shape, strides) = (mask.layout().shape(), mask.layout().strides());
    if strides.len() != 4 || strides.iter().any(|&s| s < 0) || shape.num_elements() == 0 {
        return None;
    }
    let s: Vec<usize> = strides.iter().map(|&s| s as usize).collect();
    let offset = mask.layout().start_offset();
    let last = offset + (0..4).map(|i| (shape[i] - 1) * s[i]).sum::<usize>();
    if last >= mask.bytes().len() {
        return None;
    }
    Some(Mask { bytes: mask.bytes(), offset, strides: [s[0], s[1], s[2], s[3]] })
}

/// `c[rows × cols] = alpha·c + beta·a·b` (`alpha` 0 overwrites) with `a: rows × k` and
/// `b: k × cols` given by (row stride, column stride); `c` is row-major with row stride `ldc`.
#[allow(clippy::too_many_arguments)]
fn gemm(
    rows: usize,
    cols: usize,
    k: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    beta: f32,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    // The bounds the strided reads and writes below stay within.
    assert!(c.len() >= (rows - 1) * ldc + cols);
    assert!(k == 0 || a.len() > (rows - 1) * a_rs + (k - 1) * a_cs);
    assert!(k == 0 || b.len() > (k - 1) * b_rs + (cols - 1) * b_cs);
    // SAFETY: every index gemm forms is within the slices (asserted above), `c` does not
    // alias `a` or `b` (distinct borrows), and the call runs on this thread only.
    unsafe {
        gemm::gemm(
            rows,
            cols,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Shapes of one call: `b` batch, `h` heads, `m` query rows, `n` keys, `d` head size.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    m: usize,
    n: usize,
    d: usize,
}

/// The allowed keys of each query row of a block: `(first, last + 1)` over the block, and the
/// mask of the block's rows over that span (`true` = not allowed). `None`: no key allowed.
fn block_span(
    mask: &Mask<'_>,
    (bi, hi): (usize, usize),
    rows: std::ops::Range<usize>,
    n: usize,
) -> Option<(usize, usize, Vec<bool>)> {
    let (mut lo, mut hi_key) = (n, 0);
    for r in rows.clone() {
        for (c, masked) in mask.row(bi, hi, r, n).enumerate() {
            if !masked {
                lo = lo.min(c);
                hi_key = hi_key.max(c + 1);
            }
        }
    }
    if lo >= hi_key {
        return None;
    }
    let mut block = Vec::with_capacity(rows.len() * (hi_key - lo));
    for r in rows {
        block.extend(mask.row(bi, hi, r, n).skip(lo).take(hi_key - lo));
    }
    Some((lo, hi_key, block))
}

/// Forward of one `(batch, head)` pair: writes `out` (`m × d`) and `lse` (`m`).
#[allow(clippy::too_many_arguments)]
fn forward_pair(
    dims: Dims,
    pair: (usize, usize),
    mask: &Mask<'_>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
) {
    let Dims { m, n, d, .. } = dims;
    let scale = 1.0 / (d as f32).sqrt();
    let mut s = Vec::new();
    for r0 in (0..m).step_by(BLOCK_ROWS) {
        let rr = BLOCK_ROWS.min(m - r0);
        let Some((lo, hi, masked)) = block_span(mask, pair, r0..r0 + rr, n) else {
            // No key allowed for any row: output 0 (as the generic path), lse −∞.
            out[r0 * d..(r0 + rr) * d].fill(0.0);
            lse[r0..r0 + rr].fill(f32::NEG_INFINITY);
            continue;
        };
        let kw = hi - lo;
        s.clear();
        s.resize(rr * kw, 0.0);
        gemm(rr, kw, d, &mut s, kw, false, &q[r0 * d..], (d, 1), &k[lo * d..], (1, d), scale);
        for ((row, masked), l) in s.chunks_mut(kw).zip(masked.chunks(kw)).zip(&mut lse[r0..r0 + rr]) {
            let max = row.iter().zip(masked).filter(|(_, m)| !**m).fold(f32::NEG_INFINITY, |a, (x, _)| a.max(*x));
            if max == f32::NEG_INFINITY {
                row.fill(0.0);
                *l = f32::NEG_INFINITY;
                continue;
            }
            let mut sum = 0.0f32;
            for (x, &m) in row.iter_mut().zip(masked) {
                *x = if m { 0.0 } else { exp(*x - max) };
                sum += *x;
            }
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|x| *x *= inv);
            *l = max + sum.ln();
        }
        gemm(rr, d, kw, &mut out[r0 * d..], d, false, &s, (kw, 1), &v[lo * d..], (d, 1), 1.0);
    }
}

/// Backward of one `(batch, head)` pair: writes `dq` (`m × d`), accumulates nothing outside
/// this pair's `dk`, `dv` (`n × d`, zeroed by the caller).
#[allow(clippy::too_many_arguments)]
fn backward_pair(
    dims: Dims,
    pair: (usize, usize),
    mask: &Mask<'_>,
    (q, k, v): (&[f32], &[f32], &[f32]),
    (out, lse, dout): (&[f32], &[f32], &[f32]),
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let Dims { m, n, d, .. } = dims;
    let scale = 1.0 / (d as f32).sqrt();
    let (mut p, mut dp) = (Vec::new(), Vec::new());
    for r0 in (0..m).step_by(BLOCK_ROWS) {
        let rr = BLOCK_ROWS.min(m - r0);
        let Some((lo, hi, masked)) = block_span(mask, pair, r0..r0 + rr, n) else {
            dq[r0 * d..(r0 + rr) * d].fill(0.0);
            continue;
        };
        let kw = hi - lo;
        p.clear();
        p.resize(rr * kw, 0.0);
        gemm(rr, kw, d, &mut p, kw, false, &q[r0 * d..], (d, 1), &k[lo * d..], (1, d), scale);
        for ((row, masked), &l) in p.chunks_mut(kw).zip(masked.chunks(kw)).zip(&lse[r0..r0 + rr]) {
            for (x, &m) in row.iter_mut().zip(masked) {
                *x = if m || l == f32::NEG_INFINITY { 0.0 } else { exp(*x - l) };
            }
        }
        let dob = &dout[r0 * d..(r0 + rr) * d];
        // dv[lo..hi] += Pᵀ dO
        gemm(kw, d, rr, &mut dv[lo * d..], d, true, &p, (1, kw), dob, (d, 1), 1.0);
        // dP = dO vᵀ
        dp.clear();
        dp.resize(rr * kw, 0.0);
        gemm(rr, kw, d, &mut dp, kw, false, dob, (d, 1), &v[lo * d..], (1, d), 1.0);
        // dS = c·P ∘ (dP − rowsum(dO ∘ O)), in place of dP
        for (i, (dp_row, p_row)) in dp.chunks_mut(kw).zip(p.chunks(kw)).enumerate() {
            let r = r0 + i;
            let big_d: f32 = dout[r * d..(r + 1) * d].iter().zip(&out[r * d..(r + 1) * d]).map(|(a, b)| a * b).sum();
            for (x, &pv) in dp_row.iter_mut().zip(p_row) {
                *x = scale * pv * (*x - big_d);
            }
        }
        // dq = dS k[lo..hi];  dk[lo..hi] += dSᵀ q
        gemm(rr, d, kw, &mut dq[r0 * d..], d, false, &dp, (kw, 1), &k[lo * d..], (d, 1), 1.0);
        gemm(kw, d, rr, &mut dk[lo * d..], d, true, &dp, (1, kw), &q[r0 * d..], (d, 1), 1.0);
    }
}

fn dims_of(q: &FlexTensor, k: &FlexTensor) -> Option<Dims> {
    let (qs, ks) = (q.layout().shape(), k.layout().shape());
    if qs.num_dims() != 4 || ks.num_dims() != 4 || qs[0] != ks[0] || qs[1] != ks[1] || qs[3] != ks[3] {
        return None;
    }
    Some(Dims { b: qs[0], h: qs[1], m: qs[2], n: ks[2], d: qs[3] })
}

fn tensor(values: Vec<f32>, shape: [usize; 4]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, Shape::new(shape)))
}

/// `(out, lse)` of masked attention, or `None` where the inputs are not f32 with a
/// byte mask of matching shape (the caller then takes the generic path).
pub fn forward(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor, mask: &FlexTensor) -> Option<(FlexTensor, FlexTensor)> {
    let dims = dims_of(q, k)?;
    let Dims { b, h, m, n, d } = dims;
    if v.layout().shape().dims::<4>() != [b, h, n, d] || mask.layout().shape().dims::<4>() != [b, h, m, n] {
        return None;
    }
    let (qs, ks, vs, mv) = (f32_data(q)?, f32_data(k)?, f32_data(v)?, mask_view(mask)?);
    let (mut out, mut lse) = (vec![0.0f32; b * h * m * d], vec![0.0f32; b * h * m]);
    out.par_chunks_mut(m * d).zip(lse.par_chunks_mut(m)).enumerate().for_each(|(i, (o, l))| {
        let pair = (i / h, i % h);
        let (qi, ki) = (i * m * d, i * n * d);
        forward_pair(dims, pair, &mv, &qs[qi..qi + m * d], &ks[ki..ki + n * d], &vs[ki..ki + n * d], o, l);
    });
    Some((tensor(out, [b, h, m, d]), tensor(lse, [b, h, m, 1])))
}

/// `(dq, dk, dv)` from `dout`, recomputing each block's probabilities from `lse`; `None`
/// where [`forward`] would have been `None`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    mask: &FlexTensor,
    out: &FlexTensor,
    lse: &FlexTensor,
    dout: &FlexTensor,
) -> Option<(FlexTensor, FlexTensor, FlexTensor)> {
    let dims = dims_of(q, k)?;
    let Dims { b, h, m, n, d } = dims;
    if v.layout().shape().dims::<4>() != [b, h, n, d] || mask.layout().shape().dims::<4>() != [b, h, m, n] {
        return None;
    }
    let (qs, ks, vs, mv) = (f32_data(q)?, f32_data(k)?, f32_data(v)?, mask_view(mask)?);
    let (os, ls, dos) = (f32_data(out)?, f32_data(lse)?, f32_data(dout)?);
    if os.len() != b * h * m * d || ls.len() != b * h * m || dos.len() != b * h * m * d {
        return None;
    }
    let (mut dq, mut dk, mut dv) =
        (vec![0.0f32; b * h * m * d], vec![0.0f32; b * h * n * d], vec![0.0f32; b * h * n * d]);
    dq.par_chunks_mut(m * d).zip(dk.par_chunks_mut(n * d).zip(dv.par_chunks_mut(n * d))).enumerate().for_each(
        |(i, (dqi, (dki, dvi)))| {
            let pair = (i / h, i % h);
            let (qi, ki, li) = (i * m * d, i * n * d, i * m);
            backward_pair(
                dims,
                pair,
                &mv,
                (&qs[qi..qi + m * d], &ks[ki..ki + n * d], &vs[ki..ki + n * d]),
                (&os[qi..qi + m * d], &ls[li..li + m], &dos[qi..qi + m * d]),
                dqi,
                dki,
                dvi,
            );
        },
    );
    Some((tensor(dq, [b, h, m, d]), tensor(dk, [b, h, n, d]), tensor(dv, [b, h, n, d])))
}
