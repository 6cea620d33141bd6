//! The 2-D product every projection and the LM head run, as a backend op, so the CPU
//! backend can take it to the fastest library it has (a system BLAS: [`crate::blas`]) and
//! autodiff's backward products go the same way.

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

/// `a · b` for `a: [m, k]`, `b: [k, n]`.
pub fn matmul<B: FusedOps>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    float(B::matmul(prim(a), prim(b)))
}

#[derive(Debug, Clone)]
struct State<B: Backend> {
    a: FloatTensor<B>,
    b: FloatTensor<B>,
}

#[derive(Debug)]
struct Matmul;

impl<B: FusedOps> Backward<B, 2> for Matmul {
    type State = State<B>;

    /// `da = dc bᵀ`, `db = aᵀ dc`.
    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [na, nb] = ops.parents;
        let dc: Tensor<B, 2> = float(grads.consume::<B>(&ops.node));
        let (a, b) = (float::<B, 2>(ops.state.a), float::<B, 2>(ops.state.b));
        if let Some(node) = nb {
            grads.register::<B>(node.id, B::matmul(prim(a.transpose()), prim(dc.clone())));
        }
        if let Some(node) = na {
            grads.register::<B>(node.id, B::matmul(prim(dc), prim(b.transpose())));
        }
    }
}

pub(crate) fn autodiff_matmul<B: FusedOps, C: CheckpointStrategy>(
    a: FloatTensor<Autodiff<B, C>>,
    b: FloatTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    let c = B::matmul(a.primitive.clone(), b.primitive.clone());
    match Matmul.prepare::<C>([a.node.clone(), b.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(State { a: a.primitive, b: b.primitive }, c),
        OpsKind::UnTracked(prep) => prep.finish(c),
    }
}
