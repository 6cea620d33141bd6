//! Rotary position embedding (Su et al. 2021) in the non-interleaved layout of HF
//! checkpoints, as one node.
//!
//! For `x: [batch, seq, heads, d]` and per-position `cos, sin: [batch, seq, d]` (each
//! frequency repeated over both halves), with `rot(x) = [−x₂, x₁]`:
//!
//! ```text
//! y  = x ∘ cos + rot(x) ∘ sin
//! dx = dy ∘ cos − rot(dy) ∘ sin           (rotation by the opposite angle)
//! ```
//!
//! Composed from Burn ops it is two `narrow`s, a negation, a `cat`, two products and a sum,
//! each a pass over `x`, plus their backward passes.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;

use crate::FusedOps;
use crate::lm_head::{float, prim};

/// RoPE of `x: [batch, seq, heads, d]` with `cos, sin: [batch, seq, d]` (no gradient).
pub fn rope<B: FusedOps>(x: Tensor<B, 4>, cos: Tensor<B, 3>, sin: Tensor<B, 3>) -> Tensor<B, 4> {
    float(B::rope(prim(x), prim(cos), prim(sin), false))
}

/// The generic forward; `inverse` rotates by the opposite angle (the backward).
pub(crate) fn forward<B: Backend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 3>,
    sin: Tensor<B, 3>,
    inverse: bool,
) -> Tensor<B, 4> {
    let d = x.dims()[3];
    let x1 = x.clone().narrow(3, 0, d / 2);
    let x2 = x.clone().narrow(3, d / 2, d / 2);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    let sin = if inverse { sin.neg() } else { sin };
    x * cos.unsqueeze_dim(2) + rotated * sin.unsqueeze_dim(2)
}

#[derive(Debug, Clone)]
struct State<B: Backend> {
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
}

#[derive(Debug)]
struct Rope;

impl<B: FusedOps> Backward<B, 1> for Rope {
    type State = State<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        if let Some(node) = node {
            grads.register::<B>(node.id, B::rope(dy, ops.state.cos, ops.state.sin, true));
        }
    }
}

pub(crate) fn autodiff_rope<B: FusedOps, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    cos: FloatTensor<Autodiff<B, C>>,
    sin: FloatTensor<Autodiff<B, C>>,
    inverse: bool,
) -> FloatTensor<Autodiff<B, C>> {
    let y = B::rope(x.primitive.clone(), cos.primitive.clone(), sin.primitive.clone(), inverse);
    match Rope.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
        // The angles are constants of the positions: only x is differentiated.
        OpsKind::Tracked(prep) if !inverse => prep.finish(State { cos: cos.primitive, sin: sin.primitive }, y),
        OpsKind::Tracked(prep) => {
            let sin = B::float_neg(sin.primitive);
            prep.finish(State { cos: cos.primitive, sin }, y)
        }
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}
