//! RMSNorm and SwiGLU as single autodiff nodes with hand-derived backward passes.
//!
//! RMSNorm (Zhang & Sennrich 2019), as transformers' `LlamaRMSNorm` computes it: in f32,
//! cast back before the weight. Over the last dimension of size `D`, with
//! `r = 1/√(mean(x²) + ε)` and `n = x·r`:
//!
//! ```text
//! y  = n ∘ w
//! dw = Σ_rows dy ∘ n,      dx = r · (dn − n · mean(dn ∘ n)),   dn = dy ∘ w
//! ```
//!
//! SwiGLU's gate (Shazeer 2020): `y = silu(g) ∘ u` with `silu(g) = g·σ(g)`:
//!
//! ```text
//! dg = dy ∘ u ∘ σ(g)(1 + g(1 − σ(g))),     du = dy ∘ g·σ(g)
//! ```
//!
//! Burn's autodiff records RMSNorm as eight nodes and SwiGLU as three, each keeping its
//! inputs; these keep only `x` and `r` (RMSNorm) or `g` and `u` (SwiGLU).

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, activation};

use crate::FusedOps;
use crate::lm_head::{at_least_f32, float, prim};

/// RMSNorm over the last dimension with weight `w` (see the module docs).
pub fn rms_norm<B: FusedOps, const D: usize>(x: Tensor<B, D>, w: Tensor<B, 1>, eps: f64) -> Tensor<B, D> {
    let dims = x.dims();
    let d = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    let (y, _) = B::rms_norm(prim(x.reshape([rows, d])), prim(w), eps);
    float::<B, 2>(y).reshape(dims)
}

/// `silu(gate) ∘ up` (see the module docs).
pub fn swiglu<B: FusedOps, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    let dims = gate.dims();
    let n = dims.iter().product::<usize>();
    // Elementwise: the kernels see flat tensors.
    let y = B::swiglu(prim(gate.reshape([n])), prim(up.reshape([n])));
    float::<B, 1>(y).reshape(dims)
}

/// The generic RMSNorm forward: `(y, r)` for `x: [rows, d]`, `r: [rows, 1]` in f32.
pub(crate) fn rms_norm_forward<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 1>, eps: f64) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let dtype = x.dtype();
    let x = at_least_f32(x);
    let r = (x.clone().square().mean_dim(1) + eps).sqrt().recip();
    ((x * r.clone()).cast(dtype) * w.unsqueeze(), r)
}

/// The generic RMSNorm backward: `(dx, dw)`.
pub(crate) fn rms_norm_backward<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 1>,
    r: Tensor<B, 2>,
    dy: Tensor<B, 2>,
) -> (Tensor<B, 2>, Tensor<B, 1>) {
    let dtype = x.dtype();
    let n = at_least_f32(x) * r.clone();
    let dw = (dy.clone() * n.clone().cast(dtype)).sum_dim(0).squeeze_dim(0);
    let dn = at_least_f32(dy * w.unsqueeze());
    let dot = (dn.clone() * n.clone()).mean_dim(1);
    ((r * (dn - n * dot)).cast(dtype), dw)
}

/// The generic SwiGLU backward: `(dg, du)`.
pub(crate) fn swiglu_backward<B: Backend, const D: usize>(
    g: Tensor<B, D>,
    u: Tensor<B, D>,
    dy: Tensor<B, D>,
) -> (Tensor<B, D>, Tensor<B, D>) {
    let s = activation::sigmoid(g.clone());
    let silu = g * s.clone();
    // σ(g)(1 + g(1 − σ(g))) = σ(g) + silu(g)(1 − σ(g))
    let dsilu = s.clone() + silu.clone() * (s.neg() + 1.0);
    (dy.clone() * u * dsilu, dy * silu)
}

#[derive(Debug, Clone)]
pub(crate) struct RmsNormState<B: Backend> {
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    r: FloatTensor<B>,
}

#[derive(Debug)]
struct RmsNorm;

impl<B: FusedOps> Backward<B, 2> for RmsNorm {
    type State = RmsNormState<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [nx, nw] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let RmsNormState { x, w, r } = ops.state;
        let (dx, dw) = B::rms_norm_backward(x, w, r, dy);
        if let Some(node) = nx {
            grads.register::<B>(node.id, dx);
        }
        if let Some(node) = nw {
            grads.register::<B>(node.id, dw);
        }
    }
}

pub(crate) fn autodiff_rms_norm<B: FusedOps, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    w: FloatTensor<Autodiff<B, C>>,
    eps: f64,
) -> (FloatTensor<Autodiff<B, C>>, FloatTensor<B>) {
    let (y, r) = B::rms_norm(x.primitive.clone(), w.primitive.clone(), eps);
    let y = match RmsNorm.prepare::<C>([x.node.clone(), w.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(RmsNormState { x: x.primitive, w: w.primitive, r: r.clone() }, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    (y, r)
}

#[derive(Debug, Clone)]
pub(crate) struct SwigluState<B: Backend> {
    g: FloatTensor<B>,
    u: FloatTensor<B>,
}

#[derive(Debug)]
struct Swiglu;

impl<B: FusedOps> Backward<B, 2> for Swiglu {
    type State = SwigluState<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [ng, nu] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (dg, du) = B::swiglu_backward(ops.state.g, ops.state.u, dy);
        if let Some(node) = ng {
            grads.register::<B>(node.id, dg);
        }
        if let Some(node) = nu {
            grads.register::<B>(node.id, du);
        }
    }
}

pub(crate) fn autodiff_swiglu<B: FusedOps, C: CheckpointStrategy>(
    g: FloatTensor<Autodiff<B, C>>,
    u: FloatTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    let y = B::swiglu(g.primitive.clone(), u.primitive.clone());
    match Swiglu.prepare::<C>([g.node.clone(), u.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(SwigluState { g: g.primitive, u: u.primitive }, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}
