//! Frozen base weights kept quantised (QLoRA, Dettmers et al. 2023, arXiv:2305.14314; and
//! GGUF's own blocks), and the projection that reads them.
//!
//! A [`PackedMatrix`] is an `[out, in]` weight (`nn.Linear`'s layout, the one GGUF and
//! bitsandbytes quantise) stored at 0.5–1.06 bytes per value. [`packed_linear`] computes
//! `x Wᵀ + s·(x A) B` from it: the forward dequantises the matrix, uses it once and drops
//! it; the backward dequantises again for `dx = dy W + s·(dy Bᵀ) Aᵀ` and never forms a
//! gradient for `W`. So at most one dequantised matrix exists at a time, forward or
//! backward, and a network's base costs its packed size.
//!
//! Formats:
//! - NF4 (4-bit NormalFloat): one code per value into bitsandbytes' 16-value table, scaled
//!   by the absmax of each block of 64 values of the flattened matrix; with double
//!   quantisation the absmaxes are themselves stored as 8-bit codes of bitsandbytes'
//!   signed dynamic map, in blocks of 256, around their mean.
//! - ggml blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) along each row, byte for byte as in a GGUF
//!   file; Q8_0 and Q4_0 can also be made from f32 here (llama.cpp's reference rounding).

use std::fmt;
use std::sync::{Arc, OnceLock};

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, FloatDType, Tensor, TensorData};
use half::f16;

use crate::lm_head::{float, prim};
use crate::{FusedOps, matmul};

/// bitsandbytes' NF4 code book (`get_4bit_type("nf4")`): the quantiles of N(0, 1)
/// normalised to [-1, 1], with an exact zero (QLoRA, appendix E). The digits are the f32
/// values as bitsandbytes prints them, so the table reads against its source.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// NF4 block: values per absmax (bitsandbytes' default `blocksize=64`).
pub const NF4_BLOCK: usize = 64;
/// Double quantisation: absmaxes per second-level scale (bitsandbytes' 256).
pub const NF4_SCALE_BLOCK: usize = 256;

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`): for each
/// decimal exponent 10^-6 … 10^0, `2^i` evenly spaced magnitudes (the midpoints of
/// `linspace(0.1, 1, 2^i + 1)`), both signs, plus 0 and 1; sorted.
pub fn dynamic_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(|| {
        let mut values = Vec::with_capacity(256);
        for i in 0..7i32 {
            let n = (1usize << i) + 1;
            // As torch computes it: an f32 step, linspace from both ends towards the middle
            // with one rounding per value (a fused multiply-add), f32 midpoints, and the
            // product with the power of ten in f32.
            let step = ((1.0f32 - 0.1f32) / (n - 1) as f32) as f64;
            let bound = |k: usize| {
                if k < n / 2 {
                    (0.1f32 as f64 + step * k as f64) as f32
                } else {
                    (1.0 - step * (n - 1 - k) as f64) as f32
                }
            };
            let scale = 10f64.powi(i - 6) as f32;
            for k in 0..n - 1 {
                let mean = (bound(k) + bound(k + 1)) / 2.0;
                values.push(scale * mean);
                values.push(-scale * mean);
            }
        }
        values.push(0.0);
        values.push(1.0);
        values.sort_by(f32::total_cmp);
        let mut map = [0f32; 256];
        map.copy_from_slice(&values);
        map
    })
}

/// A ggml block type kept as loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlBlock {
    Q8_0,
    Q4_0,
    Q4_1,
    Q4K,
    Q6K,
}

impl GgmlBlock {
    /// (values per block, bytes per block)
    pub fn size(self) -> (usize, usize) {
        match self {
            GgmlBlock::Q4_0 => (32, 18),
            GgmlBlock::Q4_1 => (32, 20),
            GgmlBlock::Q8_0 => (32, 34),
            GgmlBlock::Q4K => (256, 144),
            GgmlBlock::Q6K => (256, 210),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlBlock::Q8_0 => "Q8_0",
            GgmlBlock::Q4_0 => "Q4_0",
            GgmlBlock::Q4_1 => "Q4_1",
            GgmlBlock::Q4K => "Q4_K",
            GgmlBlock::Q6K => "Q6_K",
        }
    }

    /// Dequantise whole blocks (`bytes.len()` a multiple of the block size) into `out`,
    /// which holds exactly their values.
    pub fn dequantize(self, bytes: &[u8], out: &mut [f32]) {
        let (values, block_bytes) = self.size();
        for (b, y) in bytes.chunks_exact(block_bytes).zip(out.chunks_exact_mut(values)) {
            match self {
                GgmlBlock::Q8_0 => {
                    let d = half_at(b, 0);
                    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
                        *y = d * (q as i8) as f32;
                    }
                }
                // Q4_0 / Q4_1: value j is the low nibble of qs[j], value j+16 the high nibble.
                GgmlBlock::Q4_0 => {
                    let d = half_at(b, 0);
                    for (j, &q) in b[2..18].iter().enumerate() {
                        y[j] = d * ((q & 0x0F) as i32 - 8) as f32;
                        y[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
                    }
                }
                GgmlBlock::Q4_1 => {
                    let (d, m) = (half_at(b, 0), half_at(b, 2));
                    for (j, &q) in b[4..20].iter().enumerate() {
                        y[j] = d * (q & 0x0F) as f32 + m;
                        y[j + 16] = d * (q >> 4) as f32 + m;
                    }
                }
                // Q4_K: 256 values in 8 sub-blocks of 32, each with a 6-bit scale and min
                // packed into 12 bytes; super-block scales d and dmin.
                GgmlBlock::Q4K => {
                    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
                    let scales = &b[4..16];
                    for (j, (q, y)) in b[16..144].chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
                        let (sc1, m1) = q4k_scale_min(2 * j, scales);
                        let (sc2, m2) = q4k_scale_min(2 * j + 1, scales);
                        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                        for (l, &x) in q.iter().enumerate() {
                            y[l] = d1 * (x & 0x0F) as f32 - m1;
                            y[l + 32] = d2 * (x >> 4) as f32 - m2;
                        }
                    }
                }
                // Q6_K: 256 values; low 4 bits in ql, high 2 bits in qh, 16 signed 8-bit scales.
                GgmlBlock::Q6K => {
                    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                    let d = half_at(b, 208);
                    for (half, y) in y.chunks_exact_mut(128).enumerate() {
                        let (ql, qh, sc) = (&ql[64 * half..], &qh[32 * half..], &sc[8 * half..]);
                        for l in 0..32 {
                            let is = l / 16;
                            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                            let s = |k: usize| d * (sc[is + k] as i8) as f32;
                            y[l] = s(0) * q1 as f32;
                            y[l + 32] = s(2) * q2 as f32;
                            y[l + 64] = s(4) * q3 as f32;
                            y[l + 96] = s(6) * q4 as f32;
                        }
                    }
                }
            }
        }
    }
}

fn half_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn q4k_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// How to store a frozen base weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantFormat {
    /// NF4 with blocks of 64; `double_quant` also quantises the absmaxes.
    Nf4 { double_quant: bool },
    /// A ggml block type (made here: Q8_0, Q4_0; any, as loaded from GGUF).
    Ggml(GgmlBlock),
}

impl fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuantFormat::Nf4 { double_quant: false } => f.write_str("NF4"),
            QuantFormat::Nf4 { double_quant: true } => f.write_str("NF4 (double-quantised scales)"),
            QuantFormat::Ggml(b) => f.write_str(b.name()),
        }
    }
}

/// NF4's per-block absmaxes.
#[derive(Debug, Clone, PartialEq)]
pub enum Nf4Scales {
    F32(Vec<f32>),
    /// `absmax[i] = dynamic_map[codes[i]] · scales[i / 256] + offset`.
    Double {
        codes: Vec<u8>,
        scales: Vec<f32>,
        offset: f32,
    },
}

impl Nf4Scales {
    fn get(&self, block: usize) -> f32 {
        match self {
            Nf4Scales::F32(a) => a[block],
            Nf4Scales::Double { codes, scales, offset } => {
                dynamic_map()[codes[block] as usize] * scales[block / NF4_SCALE_BLOCK] + offset
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Nf4Scales::F32(a) => 4 * a.len(),
            Nf4Scales::Double { codes, scales, .. } => codes.len() + 4 * scales.len() + 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Storage {
    /// Two codes per byte over the flattened matrix, the first in the high nibble
    /// (bitsandbytes' order); a last odd code is padded with 0.
    Nf4 { codes: Vec<u8>, absmax: Nf4Scales },
    /// Whole ggml blocks, row after row.
    Ggml { block: GgmlBlock, bytes: Vec<u8> },
}

/// An `[out, in]` weight kept quantised (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct PackedMatrix {
    rows: usize,
    cols: usize,
    storage: Storage,
}

/// Why a matrix cannot be packed as asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantError(pub String);

impl fmt::Display for QuantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for QuantError {}

impl PackedMatrix {
    /// Quantise `values` (`[rows, cols]`, row-major) to `format`. ggml formats need whole
    /// blocks per row; Q4_1, Q4_K and Q6_K are only kept as loaded, not made here.
    pub fn quantize(format: QuantFormat, rows: usize, cols: usize, values: &[f32]) -> Result<Self, QuantError> {
        if values.len() != rows * cols {
            return Err(QuantError(format!("{} values for a [{rows}, {cols}] matrix", values.len())));
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(QuantError(format!("value {i} is {} (not finite)", values[i])));
        }
        let storage = match format {
            QuantFormat::Nf4 { double_quant } => nf4_quantize(values, double_quant),
            QuantFormat::Ggml(block) => {
                let (per_block, _) = block.size();
                if !cols.is_multiple_of(per_block) {
                    return Err(QuantError(format!(
                        "{cols} columns are not a whole number of {} blocks of {per_block}",
                        block.name()
                    )));
                }
                let quantize_block: fn(&[f32], &mut Vec<u8>) = match block {
                    GgmlBlock::Q8_0 => q8_0_block,
                    GgmlBlock::Q4_0 => q4_0_block,
                    other => {
                        return Err(QuantError(format!(
                            "{} is kept as loaded from GGUF, not made from f32 (use q8_0, q4_0 or nf4)",
                            other.name()
                        )));
                    }
                };
                let mut bytes = Vec::with_capacity(values.len() / per_block * block.size().1);
                for chunk in values.chunks_exact(per_block) {
                    quantize_block(chunk, &mut bytes);
                }
                Storage::Ggml { block, bytes }
            }
        };
        Ok(PackedMatrix { rows, cols, storage })
    }

    /// A GGUF tensor's blocks as they are (`bytes` exactly `rows` rows of `cols` values).
    pub fn from_ggml(block: GgmlBlock, rows: usize, cols: usize, bytes: Vec<u8>) -> Result<Self, QuantError> {
        let (per_block, block_bytes) = block.size();
        if !cols.is_multiple_of(per_block) {
            return Err(QuantError(format!(
                "{cols} columns are not a whole number of {} blocks of {per_block}",
                block.name()
            )));
        }
        if bytes.len() != rows * cols / per_block * block_bytes {
            return Err(QuantError(format!(
                "{} bytes for a [{rows}, {cols}] {} matrix ({} expected)",
                bytes.len(),
                block.name(),
                rows * cols / per_block * block_bytes
            )));
        }
        Ok(PackedMatrix { rows, cols, storage: Storage::Ggml { block, bytes } })
    }

    /// `[rows, cols]` = `[out, in]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    pub fn format(&self) -> QuantFormat {
        match &self.storage {
            Storage::Nf4 { absmax, .. } => {
                QuantFormat::Nf4 { double_quant: matches!(absmax, Nf4Scales::Double { .. }) }
            }
            Storage::Ggml { block, .. } => QuantFormat::Ggml(*block),
        }
    }

    /// Bytes held (codes and scales).
    pub fn stored_bytes(&self) -> usize {
        match &self.storage {
            Storage::Nf4 { codes, absmax } => codes.len() + absmax.bytes(),
            Storage::Ggml { bytes, .. } => bytes.len(),
        }
    }

    /// NF4: the codes (one per value, unpacked) and the absmax of each block, as stored.
    pub fn nf4_parts(&self) -> Option<(Vec<u8>, &Nf4Scales)> {
        match &self.storage {
            Storage::Nf4 { codes, absmax } => {
                let n = self.rows * self.cols;
                let unpacked = (0..n).map(|i| nibble(codes, i)).collect();
                Some((unpacked, absmax))
            }
            Storage::Ggml { .. } => None,
        }
    }

    /// ggml: the blocks as stored.
    pub fn ggml_bytes(&self) -> Option<&[u8]> {
        match &self.storage {
            Storage::Ggml { bytes, .. } => Some(bytes),
            Storage::Nf4 { .. } => None,
        }
    }

    /// The matrix in f32, `[rows, cols]` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_into(&mut out);
        out
    }

    /// Dequantise into `out` (`rows · cols` values), in parallel over rows of blocks.
    pub fn dequantize_into(&self, out: &mut [f32]) {
        use rayon::prelude::*;
        assert_eq!(out.len(), self.rows * self.cols, "dequantize_into: output size");
        match &self.storage {
            Storage::Nf4 { codes, absmax } => {
                // A block of 64 values is 32 whole bytes (blocks start at even values): two
                // codes per byte, one scale per block.
                out.par_chunks_mut(NF4_BLOCK * 64).enumerate().for_each(|(chunk, out)| {
                    let first = chunk * 64;
                    for (k, y) in out.chunks_mut(NF4_BLOCK).enumerate() {
                        let block = first + k;
                        let scale = absmax.get(block);
                        let bytes = &codes[block * NF4_BLOCK / 2..];
                        for (pair, &byte) in y.chunks_mut(2).zip(bytes) {
                            pair[0] = NF4_CODE[(byte >> 4) as usize] * scale;
                            if let Some(second) = pair.get_mut(1) {
                                *second = NF4_CODE[(byte & 0x0F) as usize] * scale;
                            }
                        }
                    }
                });
            }
            Storage::Ggml { block, bytes } => {
                let row_bytes = self.cols / block.size().0 * block.size().1;
                if row_bytes == 0 {
                    return;
                }
                out.par_chunks_mut(self.cols)
                    .zip(bytes.par_chunks(row_bytes))
                    .for_each(|(y, b)| block.dequantize(b, y));
            }
        }
    }

    /// The rows in a new order: row `i` of the result is row `order[i]` (ggml formats).
    pub fn permute_rows(&self, order: &[usize]) -> Result<Self, QuantError> {
        let Storage::Ggml { block, bytes } = &self.storage else {
            return Err(QuantError("NF4 blocks span rows: quantise after reordering".into()));
        };
        if order.len() != self.rows || order.iter().any(|&r| r >= self.rows) {
            return Err(QuantError(format!("a row order of {} for {} rows", order.len(), self.rows)));
        }
        let row_bytes = bytes.len() / self.rows.max(1);
        let mut out = Vec::with_capacity(bytes.len());
        for &r in order {
            out.extend_from_slice(&bytes[r * row_bytes..(r + 1) * row_bytes]);
        }
        Ok(PackedMatrix { rows: self.rows, cols: self.cols, storage: Storage::Ggml { block: *block, bytes: out } })
    }
}

fn nibble(codes: &[u8], i: usize) -> u8 {
    let byte = codes[i / 2];
    if i.is_multiple_of(2) { byte >> 4 } else { byte & 0x0F }
}

/// The index of the value of `table` (sorted ascending) nearest to `x`; the lower one on a
/// tie, as `argmin` takes the first.
fn nearest(table: &[f32], x: f32) -> u8 {
    let above = table.partition_point(|&v| v < x);
    if above == 0 {
        return 0;
    }
    if above == table.len() {
        return (table.len() - 1) as u8;
    }
    let (lo, hi) = (table[above - 1], table[above]);
    if x - lo <= hi - x { (above - 1) as u8 } else { above as u8 }
}

fn absmax(values: &[f32]) -> f32 {
    values.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// NF4 with blocks of 64 over the flattened matrix (bitsandbytes' `quantize_4bit`).
fn nf4_quantize(values: &[f32], double_quant: bool) -> Storage {
    let absmaxes: Vec<f32> = values.chunks(NF4_BLOCK).map(absmax).collect();
    let mut codes = vec![0u8; values.len().div_ceil(2)];
    for (block, chunk) in values.chunks(NF4_BLOCK).enumerate() {
        let a = absmaxes[block];
        for (j, &v) in chunk.iter().enumerate() {
            // An all-zero block has nothing to scale: every code is NF4's exact zero.
            let code = if a > 0.0 { nearest(&NF4_CODE, v / a) } else { 7 };
            let i = block * NF4_BLOCK + j;
            codes[i / 2] |= if i.is_multiple_of(2) { code << 4 } else { code };
        }
    }
    let absmax = if double_quant {
        // QLoRA's double quantisation: the absmaxes' mean is subtracted, the rest stored as
        // 8-bit dynamic-map codes with one f32 scale per 256.
        let offset = (absmaxes.iter().map(|&a| a as f64).sum::<f64>() / absmaxes.len().max(1) as f64) as f32;
        let centred: Vec<f32> = absmaxes.iter().map(|&a| a - offset).collect();
        let map = dynamic_map();
        let mut codes = Vec::with_capacity(centred.len());
        let mut scales = Vec::with_capacity(centred.len().div_ceil(NF4_SCALE_BLOCK));
        for chunk in centred.chunks(NF4_SCALE_BLOCK) {
            let s = absmax(chunk);
            scales.push(s);
            codes.extend(chunk.iter().map(|&c| if s > 0.0 { nearest(map, c / s) } else { nearest(map, 0.0) }));
        }
        Nf4Scales::Double { codes, scales, offset }
    } else {
        Nf4Scales::F32(absmaxes)
    };
    Storage::Nf4 { codes, absmax }
}

/// llama.cpp's `quantize_row_q8_0_ref`: `d = absmax / 127`, `q = round(x / d)`.
fn q8_0_block(x: &[f32], out: &mut Vec<u8>) {
    let d = absmax(x) / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    out.extend(x.iter().map(|&v| ((v * id).round() as i8) as u8));
}

/// llama.cpp's `quantize_row_q4_0_ref`: the value of largest magnitude maps to −8,
/// `d = max / −8`, `q = min(15, ⌊x / d + 8.5⌋)`.
fn q4_0_block(x: &[f32], out: &mut Vec<u8>) {
    let max = x.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
    for j in 0..16 {
        out.push(q(x[j]) | (q(x[j + 16]) << 4));
    }
}

/// A packed weight shared by every copy of its module (`Clone` is a reference count).
#[derive(Clone, PartialEq)]
pub struct PackedWeight(pub Arc<PackedMatrix>);

impl fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [r, c] = self.0.shape();
        write!(f, "PackedWeight({} [{r}, {c}], {} bytes)", self.0.format(), self.0.stored_bytes())
    }
}

impl PackedWeight {
    pub fn new(m: PackedMatrix) -> Self {
        PackedWeight(Arc::new(m))
    }
}

/// `x Wᵀ + scale·(x a) b` for `x: [n, in]`, a packed `W: [out, in]` and, optionally, a
/// low-rank delta `(a: [in, r], b: [r, out], scale)`. `W` takes no gradient and is not
/// kept for the backward, which dequantises it again.
pub fn packed_linear<B: FusedOps>(
    x: Tensor<B, 2>,
    w: &PackedWeight,
    low_rank: Option<(Tensor<B, 2>, Tensor<B, 2>, f64)>,
) -> Tensor<B, 2> {
    let [_, d] = x.dims();
    let [_, cols] = w.0.shape();
    assert_eq!(d, cols, "packed_linear: x has {d} features, the packed weight {cols}");
    float(B::packed_linear(prim(x), w, low_rank.map(|(a, b, s)| (prim(a), prim(b), s))))
}

/// The packed matrix as a dense `[out, in]` tensor on `device`, in `dtype`.
pub fn dequantized<B: Backend>(w: &PackedWeight, device: &B::Device, dtype: DType) -> Tensor<B, 2> {
    let t = Tensor::<B, 2>::from_data(TensorData::new(w.0.dequantize(), w.0.shape()), device);
    match dtype {
        DType::F64 => t.cast(FloatDType::F64),
        DType::F16 => t.cast(FloatDType::F16),
        DType::BF16 => t.cast(FloatDType::BF16),
        _ => t,
    }
}

/// The generic forward: dequantise, then the dense product (with the LoRA stacking of
/// [`crate::lora`] when there is a delta).
pub(crate) fn forward<B: FusedOps>(
    x: Tensor<B, 2>,
    w: &PackedWeight,
    low_rank: Option<(Tensor<B, 2>, Tensor<B, 2>, f64)>,
) -> (Tensor<B, 2>, Option<Tensor<B, 2>>) {
    let dense = dequantized::<B>(w, &x.device(), x.dtype());
    match low_rank {
        None => (matmul(x, dense.transpose()), None),
        Some((a, b, scale)) => {
            let (y, h) = crate::lora::forward(x, dense.transpose(), a, b, scale);
            (y, Some(h))
        }
    }
}

#[derive(Debug, Clone)]
struct BaseState<B: Backend> {
    w: PackedWeight,
    dtype: DType,
    device: B::Device,
}

/// The backward of a packed projection without a delta: `dx = dy W`.
#[derive(Debug)]
struct PackedBase;

impl<B: FusedOps> Backward<B, 1> for PackedBase {
    type State = BaseState<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [nx] = ops.parents;
        let dy: Tensor<B, 2> = float(grads.consume::<B>(&ops.node));
        if let Some(node) = nx {
            let s = ops.state;
            let w = dequantized::<B>(&s.w, &s.device, s.dtype);
            grads.register::<B>(node.id, prim(matmul(dy, w)));
        }
    }
}

#[derive(Debug, Clone)]
struct LowRankState<B: Backend> {
    w: PackedWeight,
    x: FloatTensor<B>,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    h: FloatTensor<B>,
    scale: f64,
}

/// The backward with a delta (as [`crate::lora`], with `W` dequantised again):
/// `u = s·dy Bᵀ`, `dx = [dy, u]·[W; Aᵀ]`, `dA = xᵀ u`, `dB = hᵀ dy`.
#[derive(Debug)]
struct PackedLowRank;

impl<B: FusedOps> Backward<B, 3> for PackedLowRank {
    type State = LowRankState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [nx, na, nb] = ops.parents;
        let dy: Tensor<B, 2> = float(grads.consume::<B>(&ops.node));
        let s = ops.state;
        let (x, a, b, h) = (float::<B, 2>(s.x), float::<B, 2>(s.a), float::<B, 2>(s.b), float::<B, 2>(s.h));
        let u = matmul(dy.clone(), b.transpose()) * s.scale;
        if let Some(node) = nb {
            grads.register::<B>(node.id, prim(matmul(h.transpose(), dy.clone())));
        }
        if let Some(node) = na {
            grads.register::<B>(node.id, prim(matmul(x.clone().transpose(), u.clone())));
        }
        if let Some(node) = nx {
            let w = dequantized::<B>(&s.w, &x.device(), x.dtype());
            let wa = Tensor::cat(vec![w, a.transpose()], 0);
            grads.register::<B>(node.id, prim(matmul(Tensor::cat(vec![dy, u], 1), wa)));
        }
    }
}

type AutodiffLowRank<B, C> = Option<(FloatTensor<Autodiff<B, C>>, FloatTensor<Autodiff<B, C>>, f64)>;

pub(crate) fn autodiff_packed_linear<B: FusedOps, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    w: &PackedWeight,
    low_rank: AutodiffLowRank<B, C>,
) -> FloatTensor<Autodiff<B, C>> {
    let xf = float::<B, 2>(x.primitive.clone());
    match low_rank {
        None => {
            let (dtype, device) = (xf.dtype(), xf.device());
            let (y, _) = forward::<B>(xf, w, None);
            match PackedBase.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => prep.finish(BaseState { w: w.clone(), dtype, device }, prim(y)),
                OpsKind::UnTracked(prep) => prep.finish(prim(y)),
            }
        }
        Some((a, b, scale)) => {
            let inner = Some((float(a.primitive.clone()), float(b.primitive.clone()), scale));
            let (y, h) = forward::<B>(xf, w, inner);
            let h = h.expect("a delta was given");
            match PackedLowRank
                .prepare::<C>([x.node.clone(), a.node.clone(), b.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let state = LowRankState {
                        w: w.clone(),
                        x: x.primitive,
                        a: a.primitive,
                        b: b.primitive,
                        h: prim(h),
                        scale,
                    };
                    prep.finish(state, prim(y))
                }
                OpsKind::UnTracked(prep) => prep.finish(prim(y)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_map_is_bitsandbytes_shape() {
        let m = dynamic_map();
        // The largest magnitude below 1: the last midpoint of linspace(0.1, 1, 65).
        assert!((m[0] + 0.992_968_75).abs() < 1e-7, "{}", m[0]);
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(m[255], 1.0);
        assert!(m.contains(&0.0));
    }

    #[test]
    fn nearest_takes_the_closest_and_the_lower_on_ties() {
        let t = [-1.0, 0.0, 1.0];
        assert_eq!(nearest(&t, -3.0), 0);
        assert_eq!(nearest(&t, 0.4), 1);
        assert_eq!(nearest(&t, 0.5), 1);
        assert_eq!(nearest(&t, 0.6), 2);
        assert_eq!(nearest(&t, 7.0), 2);
    }

    #[test]
    fn ggml_made_here_round_trips_its_own_values() {
        let values: Vec<f32> = (0..2 * 64).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        for block in [GgmlBlock::Q8_0, GgmlBlock::Q4_0] {
            let p = PackedMatrix::quantize(QuantFormat::Ggml(block), 2, 64, &values).unwrap();
            let deq = p.dequantize();
            // Requantising the dequantised values reproduces the same blocks exactly.
            let again = PackedMatrix::quantize(QuantFormat::Ggml(block), 2, 64, &deq).unwrap();
            assert_eq!(p.ggml_bytes(), again.ggml_bytes(), "{}", block.name());
            // Half a step (absmax / 127) for Q8_0; Q4_0's step is absmax / 8, and the side
            // opposite the largest magnitude is clamped at 7 steps, losing up to one step.
            let bound = if block == GgmlBlock::Q8_0 { 0.012 } else { 0.38 };
            let worst = values.iter().zip(&deq).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < bound, "{} error {worst}", block.name());
        }
    }

    #[test]
    fn rows_are_permuted_as_blocks() {
        let values: Vec<f32> = (0..4 * 32).map(|i| i as f32 / 10.0).collect();
        let p = PackedMatrix::quantize(QuantFormat::Ggml(GgmlBlock::Q8_0), 4, 32, &values).unwrap();
        let d = p.dequantize();
        let swapped = p.permute_rows(&[3, 2, 1, 0]).unwrap().dequantize();
        assert_eq!(swapped[..32], d[96..]);
        assert_eq!(swapped[96..], d[..32]);
        assert!(p.permute_rows(&[0, 1, 2]).is_err());
        let nf4 = PackedMatrix::quantize(QuantFormat::Nf4 { double_quant: false }, 4, 32, &values).unwrap();
        assert!(nf4.permute_rows(&[0, 1, 2, 3]).is_err());
    }

    #[test]
    fn bad_shapes_and_values_are_errors() {
        let q8 = QuantFormat::Ggml(GgmlBlock::Q8_0);
        assert!(PackedMatrix::quantize(q8, 2, 20, &[0.0; 40]).unwrap_err().0.contains("20 columns"));
        assert!(PackedMatrix::quantize(q8, 2, 32, &[0.0; 63]).is_err());
        let mut v = vec![0.0; 64];
        v[5] = f32::NAN;
        assert!(
            PackedMatrix::quantize(QuantFormat::Nf4 { double_quant: true }, 2, 32, &v)
                .unwrap_err()
                .0
                .contains("value 5")
        );
        assert!(PackedMatrix::from_ggml(GgmlBlock::Q4_0, 1, 32, vec![0; 17]).is_err());
    }

    #[test]
    fn nf4_sizes_and_zero_blocks() {
        let values = vec![0f32; 3 * 100];
        let p = PackedMatrix::quantize(QuantFormat::Nf4 { double_quant: false }, 3, 100, &values).unwrap();
        assert_eq!(p.stored_bytes(), 150 + 4 * 5);
        assert!(p.dequantize().iter().all(|&v| v == 0.0));
    }
}
