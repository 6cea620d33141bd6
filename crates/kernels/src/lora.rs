//! A LoRA projection `y = x W + s·(x A) B` (Hu et al. 2021) as one node: the frozen `W`'s
//! gradient is never formed, and no matmul has the rank as its inner dimension.
//!
//! With `x: [n, in]`, `W: [in, out]` (Burn's `Linear` layout), `A: [in, r]`, `B: [r, out]`
//! and `h = s·x A`:
//!
//! ```text
//! y  = [x, h] · [W; B]                      one product over in + r
//! u  = s·dy Bᵀ
//! dx = [dy, u] · [Wᵀ; Aᵀ]                   one product over out + r
//! dA = xᵀ u,     dB = hᵀ dy
//! ```
//!
//! Composed from Burn ops, `(x A) B` is a product whose inner dimension is the rank (16):
//! on CPU it ran at 6 GFLOP/s against 60–80 for the base weight's, and the LoRA terms cost
//! more than the projection they adapt. Stacking them onto the base product removes both
//! that and the separate addition.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;

use crate::lm_head::{float, prim};
use crate::{FusedOps, matmul};

/// `x W + scale·(x A) B` for `x: [n, in]` (see the module docs). `W` takes no gradient:
/// callers use this for frozen base weights only.
pub fn lora_linear<B: FusedOps>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    scale: f64,
) -> Tensor<B, 2> {
    float(B::lora_linear(prim(x), prim(w), prim(a), prim(b), scale))
}

/// The forward pass: `(y, h)` with `h = scale·x A` (the backward's only saved product).
pub(crate) fn forward<B: FusedOps>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    scale: f64,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let h = matmul(x.clone(), a) * scale;
    let y = matmul(Tensor::cat(vec![x, h.clone()], 1), Tensor::cat(vec![w, b], 0));
    (y, h)
}

#[derive(Debug, Clone)]
struct State<B: Backend> {
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    h: FloatTensor<B>,
    scale: f64,
}

#[derive(Debug)]
struct LoraLinear;

impl<B: FusedOps> Backward<B, 3> for LoraLinear {
    type State = State<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [nx, na, nb] = ops.parents;
        let dy: Tensor<B, 2> = float(grads.consume::<B>(&ops.node));
        let s = ops.state;
        let (x, w, a, b, h) =
            (float::<B, 2>(s.x), float::<B, 2>(s.w), float::<B, 2>(s.a), float::<B, 2>(s.b), float(s.h));
        let u = matmul(dy.clone(), b.transpose()) * s.scale;
        if let Some(node) = nb {
            grads.register::<B>(node.id, prim(matmul(h.transpose(), dy.clone())));
        }
        if let Some(node) = na {
            grads.register::<B>(node.id, prim(matmul(x.transpose(), u.clone())));
        }
        if let Some(node) = nx {
            let wa = Tensor::cat(vec![w.transpose(), a.transpose()], 0);
            grads.register::<B>(node.id, prim(matmul(Tensor::cat(vec![dy, u], 1), wa)));
        }
    }
}

pub(crate) fn autodiff_lora_linear<B: FusedOps, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    w: FloatTensor<Autodiff<B, C>>,
    a: FloatTensor<Autodiff<B, C>>,
    b: FloatTensor<Autodiff<B, C>>,
    scale: f64,
) -> FloatTensor<Autodiff<B, C>> {
    let (y, h) = forward::<B>(
        float(x.primitive.clone()),
        float(w.primitive.clone()),
        float(a.primitive.clone()),
        float(b.primitive.clone()),
        scale,
    );
    match LoraLinear.prepare::<C>([x.node.clone(), a.node.clone(), b.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let state = State { x: x.primitive, w: w.primitive, a: a.primitive, b: b.primitive, h: prim(h), scale };
            prep.finish(state, prim(y))
        }
        OpsKind::UnTracked(prep) => prep.finish(prim(y)),
    }
}
