//! Masked softmax attention whose backward recomputes the probabilities (flash-style): no
//! `[batch, heads, queries, keys]` tensor is kept between the passes, and neither pass holds
//! more than one block of query rows' scores.
//!
//! For `q: [b, h, m, d]`, `k, v: [b, h, n, d]`, a mask `[b, h, m, n]` (`true` = not
//! allowed) and `c = 1/√d`:
//!
//! ```text
//! S = c·q kᵀ (masked: −∞),  lse = log Σ_j exp S_j,  P = exp(S − lse),  O = P v
//! ```
//!
//! Backward, from `dO` (FlashAttention-2, Dao 2023, Algorithm 2):
//!
//! ```text
//! D = rowsum(dO ∘ O),  dv = Pᵀ dO,  dP = dO vᵀ,  dS = P ∘ (dP − D),
//! dq = c·dS k,         dk = c·dSᵀ q
//! ```
//!
//! Grouped-query attention is the caller's layout: the query heads sharing a key/value head
//! are stacked along the query axis (`m = groups · seq`), so `h` is the key/value heads.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::ops::{BoolTensor, FloatTensor};
use burn::tensor::{Bool, Tensor, TensorMetadata};

use crate::FusedOps;
use crate::lm_head::{at_least_f32, float, prim};

/// Scores held at once: 2²² f32 values (16 MB) per block of query rows.
pub const BLOCK_SCORES: usize = 1 << 22;

/// Below this many scores per call (64 MB in f32), autodiff keeps the probabilities as
/// Burn's own attention does: recomputing them costs more time than their memory is worth
/// (on the CPU backend the recomputing backward ran 3× slower at 8 × 256 tokens).
pub const RECOMPUTE_ABOVE_SCORES: usize = 1 << 24;

/// `softmax(c·q kᵀ, masked) v` (see the module docs), computed in blocks of query rows;
/// under autodiff one node whose backward recomputes each block's probabilities.
pub fn masked_attention<B: FusedOps>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4, Bool>,
) -> Tensor<B, 4> {
    float(B::masked_attention(prim(q), prim(k), prim(v), mask.into_primitive()))
}

fn rows_per_block(b: usize, h: usize, n: usize) -> usize {
    (BLOCK_SCORES / (b * h * n).max(1)).max(1)
}

/// One block's masked scores `c·q kᵀ` (f32 at least), `[b, h, rows, n]`.
fn block_scores<B: Backend>(q: Tensor<B, 4>, k: &Tensor<B, 4>, mask: Tensor<B, 4, Bool>, scale: f64) -> Tensor<B, 4> {
    let s = at_least_f32(q.matmul(k.clone().swap_dims(2, 3))) * scale;
    s.mask_fill(mask, f32::NEG_INFINITY)
}

pub(crate) struct Forward<B: Backend> {
    pub out: Tensor<B, 4>,
    /// `[b, h, m, 1]`, f32.
    pub lse: Tensor<B, 4>,
}

pub(crate) fn forward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4, Bool>,
) -> Forward<B> {
    let [b, h, m, d] = q.dims();
    let n = k.dims()[2];
    let scale = 1.0 / (d as f64).sqrt();
    let rows = rows_per_block(b, h, n);
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for start in (0..m).step_by(rows) {
        let len = rows.min(m - start);
        let s = block_scores(q.clone().narrow(2, start, len), &k, mask.clone().narrow(2, start, len), scale);
        // A row with every key masked gives 0, not NaN (max clamped finite, sum clamped > 0).
        let max = s.clone().max_dim(3).clamp_min(f32::MIN);
        let e = (s - max.clone()).exp();
        let sum = e.clone().sum_dim(3).clamp_min(f32::MIN_POSITIVE);
        outs.push((e / sum.clone()).cast(v.dtype()).matmul(v.clone()));
        lses.push(max + sum.log());
    }
    Forward { out: Tensor::cat(outs, 2), lse: Tensor::cat(lses, 2) }
}

pub(crate) struct Grads<B: Backend> {
    pub q: Tensor<B, 4>,
    pub k: Tensor<B, 4>,
    pub v: Tensor<B, 4>,
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    mask: BoolTensor<B>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    dout: Tensor<B, 4>,
) -> Grads<B> {
    let q: Tensor<B, 4> = float(q);
    let (k, v): (Tensor<B, 4>, Tensor<B, 4>) = (float(k), float(v));
    let (out, lse): (Tensor<B, 4>, Tensor<B, 4>) = (float(out), float(lse));
    let mask: Tensor<B, 4, Bool> = Tensor::from_primitive(mask);
    let [b, h, m, d] = q.dims();
    let n = k.dims()[2];
    let scale = 1.0 / (d as f64).sqrt();
    let rows = rows_per_block(b, h, n);
    let dtype = q.dtype();
    let big_d = (at_least_f32(dout.clone()) * at_least_f32(out)).sum_dim(3);
    let (mut dq, mut dk, mut dv) = (Vec::new(), k.zeros_like(), v.zeros_like());
    for start in (0..m).step_by(rows) {
        let len = rows.min(m - start);
        let qb = q.clone().narrow(2, start, len);
        let s = block_scores(qb.clone(), &k, mask.clone().narrow(2, start, len), scale);
        let p = (s - lse.clone().narrow(2, start, len)).exp();
        let dob = dout.clone().narrow(2, start, len);
        dv = dv + p.clone().cast(dtype).swap_dims(2, 3).matmul(dob.clone());
        let dp = at_least_f32(dob.matmul(v.clone().swap_dims(2, 3)));
        let ds = (p * (dp - big_d.clone().narrow(2, start, len)) * scale).cast(dtype);
        dq.push(ds.clone().matmul(k.clone()));
        dk = dk + ds.swap_dims(2, 3).matmul(qb);
    }
    Grads { q: Tensor::cat(dq, 2), k: dk, v: dv }
}

#[derive(Debug, Clone)]
pub(crate) struct State<B: Backend> {
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    mask: BoolTensor<B>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
}

#[derive(Debug)]
struct MaskedAttention;

impl<B: FusedOps> Backward<B, 3> for MaskedAttention {
    type State = State<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [nq, nk, nv] = ops.parents;
        let dout = grads.consume::<B>(&ops.node);
        let State { q, k, v, mask, out, lse } = ops.state;
        let (dq, dk, dv) = B::attention_backward(q, k, v, mask, out, lse, dout);
        for (node, grad) in [(nq, dq), (nk, dk), (nv, dv)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

pub(crate) fn autodiff_masked_attention<B: FusedOps, C: CheckpointStrategy>(
    q: FloatTensor<Autodiff<B, C>>,
    k: FloatTensor<Autodiff<B, C>>,
    v: FloatTensor<Autodiff<B, C>>,
    mask: BoolTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    let [b, h, m, _] = q.primitive.shape().dims::<4>();
    let n = k.primitive.shape().dims::<4>()[2];
    if !B::attention_recomputes(b * h * m * n) {
        let out = burn::tensor::module::attention(
            float::<Autodiff<B, C>, 4>(q),
            float(k),
            float(v),
            Some(Tensor::from_primitive(mask)),
            None,
            burn::tensor::ops::AttentionModuleOptions::default(),
        );
        return prim(out);
    }
    let prep =
        MaskedAttention.prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()]).compute_bound().stateful();
    match prep {
        OpsKind::Tracked(prep) => {
            let (out, lse) =
                B::attention_forward(q.primitive.clone(), k.primitive.clone(), v.primitive.clone(), mask.clone());
            let state = State { q: q.primitive, k: k.primitive, v: v.primitive, mask, out: out.clone(), lse };
            prep.finish(state, out)
        }
        // Nothing to differentiate: the backend's own attention (fused where it has one).
        OpsKind::UnTracked(prep) => prep.finish(B::masked_attention(q.primitive, k.primitive, v.primitive, mask)),
    }
}
