//! The LM head's `linear + log-softmax + gather`, fused and chunked over rows.
//!
//! For hidden rows `x: [n, d]`, the head `w: [vocab, d]`, targets `t: [n]` and a temperature
//! `T`, with `z = x wᵀ / T` (in f32, as TRL upcasts logits):
//!
//! ```text
//! logp_i    = z_i[t_i] − lse_i,             lse_i = log Σ_v exp z_iv
//! entropy_i = lse_i − Σ_v p_iv z_iv,        p_iv  = exp(z_iv − lse_i)
//! ```
//!
//! The forward pass keeps only `lse` per row. The backward pass, given `g = ∂L/∂logp`,
//! recomputes each chunk's logits and forms
//!
//! ```text
//! ∂L/∂z_iv = g_i / T · (1[v = t_i] − p_iv)
//! ∂L/∂x    = (∂L/∂z) w,      ∂L/∂w = (∂L/∂z)ᵀ x
//! ```
//!
//! so neither pass holds more than one `[chunk, vocab]` block of logits (the gradient of `w`
//! is formed only when the head trains: full fine-tuning, or tied embeddings).

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, FloatDType, IndexingUpdateOp, Int, Tensor, TensorPrimitive};

use crate::FusedOps;

/// Logits held at once, per chunk of rows: 2²² f32 values (16 MB), i.e. 85 rows of a
/// 49,152-token vocabulary. Larger chunks were no faster on CPU (the matmul is already
/// large) and cost memory on every backend.
pub const CHUNK_LOGITS: usize = 1 << 22;

/// What the head gives for each row.
#[derive(Debug, Clone)]
pub struct HeadLogprobs<B: Backend> {
    /// `log p(target)`, `[n]`, f32.
    pub logprobs: Tensor<B, 1>,
    /// Entropy of each row's next-token distribution, `[n]`, f32, no gradient.
    pub entropy: Option<Tensor<B, 1>>,
}

/// `log_softmax(x wᵀ / temperature)` at `targets`, for `x: [n, d]` and `w: [vocab, d]`,
/// fused: the `[n, vocab]` logits are never formed whole, and under autodiff one node with a
/// hand-derived backward replaces the log-softmax graph. A temperature of 0 or 1 divides
/// nothing (as `align_losses::token_logprobs`).
pub fn linear_logprobs<B: FusedOps>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    temperature: f32,
    with_entropy: bool,
) -> HeadLogprobs<B> {
    let [n, d] = x.dims();
    let [_, wd] = w.dims();
    assert_eq!(d, wd, "linear_logprobs: x is [{n}, {d}] but w is [vocab, {wd}]");
    assert_eq!(targets.dims()[0], n, "linear_logprobs: {n} rows but {} targets", targets.dims()[0]);
    let (logprobs, entropy) = B::linear_logprobs(
        x.into_primitive().tensor(),
        w.into_primitive().tensor(),
        targets.into_primitive(),
        temperature,
        with_entropy,
    );
    HeadLogprobs { logprobs: float(logprobs), entropy: entropy.map(float) }
}

/// Half-precision values to f32 for softmax and norm statistics; f32 and f64 stay as they are.
pub(crate) fn at_least_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    match t.dtype() {
        DType::F16 | DType::BF16 => t.cast(FloatDType::F32),
        _ => t,
    }
}

pub(crate) fn float<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

pub(crate) fn int<B: Backend>(p: IntTensor<B>) -> Tensor<B, 1, Int> {
    Tensor::from_primitive(p)
}

pub(crate) fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

fn rows_per_chunk(vocab: usize) -> usize {
    (CHUNK_LOGITS / vocab.max(1)).max(1)
}

/// A chunk's raw logits `x wᵀ` in f32, `[rows, vocab]` (the temperature is applied by the
/// statistics and the gradient, in the same pass).
fn chunk_logits<B: FusedOps>(x: Tensor<B, 2>, w: &Tensor<B, 2>) -> Tensor<B, 2> {
    at_least_f32(crate::matmul(x, w.clone().transpose()))
}

/// The temperature the logits are divided by: 1 where it divides nothing (0 or 1).
fn effective_temperature(temperature: f32) -> f32 {
    if temperature > 0.0 { temperature } else { 1.0 }
}

/// One chunk's `(log p(target), lse, entropy)` from its raw logits `z: [r, vocab]`, with
/// `z / temperature` the logits the softmax reads: the generic composition of Burn ops.
pub fn chunk_stats<B: Backend>(
    z: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    temperature: f32,
    with_entropy: bool,
) -> (Tensor<B, 1>, Tensor<B, 1>, Option<Tensor<B, 1>>) {
    let z = if temperature != 1.0 { z / temperature } else { z };
    let max = z.clone().max_dim(1);
    let e = (z.clone() - max.clone()).exp();
    let sum = e.clone().sum_dim(1);
    let lse = max + sum.clone().log();
    let picked = z.clone().gather(1, targets.unsqueeze_dim(1));
    let entropy = with_entropy.then(|| (lse.clone() - (e * z).sum_dim(1) / sum).squeeze_dim(1));
    ((picked - lse.clone()).squeeze_dim(1), lse.squeeze_dim(1), entropy)
}

/// One chunk's `∂L/∂z = scale · (1[v = t] − p)` for raw logits `z: [r, vocab]`, `p` the
/// softmax of `z / temperature` (from its `lse`) and `scale = g / T`: the generic composition.
pub fn chunk_grad<B: Backend>(
    z: Tensor<B, 2>,
    lse: Tensor<B, 1>,
    scale: Tensor<B, 1>,
    targets: Tensor<B, 1, Int>,
    temperature: f32,
) -> Tensor<B, 2> {
    let z = if temperature != 1.0 { z / temperature } else { z };
    let p = (z - lse.unsqueeze_dim(1)).exp();
    let scale = scale.unsqueeze_dim::<2>(1);
    (p * scale.clone().neg()).scatter(1, targets.unsqueeze_dim(1), scale, IndexingUpdateOp::Add)
}

/// The forward pass over row chunks, also returning each row's log-sum-exp (the backward's
/// only saved state besides the inputs).
pub(crate) struct Forward<B: Backend> {
    pub logprobs: Tensor<B, 1>,
    pub lse: Tensor<B, 1>,
    pub entropy: Option<Tensor<B, 1>>,
}

pub(crate) fn forward<B: FusedOps>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    temperature: f32,
    with_entropy: bool,
) -> Forward<B> {
    let [n, _] = x.dims();
    let rows = rows_per_chunk(w.dims()[0]);
    let temperature = effective_temperature(temperature);
    let (mut logprobs, mut lses, mut entropies) = (Vec::new(), Vec::new(), Vec::new());
    for start in (0..n).step_by(rows) {
        let len = rows.min(n - start);
        let z = chunk_logits(x.clone().narrow(0, start, len), &w);
        let (logp, lse, entropy) = B::head_chunk_stats(
            prim(z),
            targets.clone().narrow(0, start, len).into_primitive(),
            temperature,
            with_entropy,
        );
        logprobs.push(float(logp));
        lses.push(float(lse));
        entropies.extend(entropy.map(float));
    }
    let cat = |parts: Vec<Tensor<B, 1>>| -> Tensor<B, 1> {
        if parts.is_empty() { Tensor::zeros([0], &x.device()) } else { Tensor::cat(parts, 0) }
    };
    Forward { logprobs: cat(logprobs), lse: cat(lses), entropy: with_entropy.then(|| cat(entropies)) }
}

/// `(∂L/∂x, ∂L/∂w)` from `g = ∂L/∂logp`, each only when asked for.
fn backward<B: FusedOps>(
    state: State<B>,
    grad: Tensor<B, 1>,
    want_x: bool,
    want_w: bool,
) -> (Option<Tensor<B, 2>>, Option<Tensor<B, 2>>) {
    let State { x, w, targets, lse, temperature } = state;
    let (x, w, targets, lse): (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 1, Int>, Tensor<B, 1>) =
        (float(x), float(w), int(targets), float(lse));
    let [n, _] = x.dims();
    let rows = rows_per_chunk(w.dims()[0]);
    let temperature = effective_temperature(temperature);
    // `· (1/T)` rather than `/ T`: the rounding Burn's own `div_scalar` backward makes.
    let scale = if temperature != 1.0 { at_least_f32(grad) * (1.0 / temperature) } else { at_least_f32(grad) };
    let mut dx = Vec::new();
    let mut dw: Option<Tensor<B, 2>> = None;
    for start in (0..n).step_by(rows) {
        let len = rows.min(n - start);
        let xc = x.clone().narrow(0, start, len);
        let z = chunk_logits(xc.clone(), &w);
        let dz: Tensor<B, 2> = float(B::head_chunk_grad(
            prim(z),
            prim(lse.clone().narrow(0, start, len)),
            prim(scale.clone().narrow(0, start, len)),
            targets.clone().narrow(0, start, len).into_primitive(),
            temperature,
        ));
        let dz = dz.cast(w.dtype());
        if want_x {
            dx.push(crate::matmul(dz.clone(), w.clone()));
        }
        if want_w {
            let part = crate::matmul(dz.transpose(), xc);
            dw = Some(match dw {
                Some(acc) => acc + part,
                None => part,
            });
        }
    }
    let dx = want_x.then(|| if dx.is_empty() { x.zeros_like() } else { Tensor::cat(dx, 0) });
    let dw = if want_w { Some(dw.unwrap_or_else(|| w.zeros_like())) } else { None };
    (dx, dw)
}

/// The backward's state: the inputs (already alive: the final hidden states and the head),
/// the targets and one log-sum-exp per row.
#[derive(Debug, Clone)]
struct State<B: Backend> {
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    targets: IntTensor<B>,
    lse: FloatTensor<B>,
    temperature: f32,
}

#[derive(Debug)]
struct LinearLogprobs;

/// The fused head's outputs as primitives: log-probs and, when asked, entropies.
pub type LogprobsAndEntropy<B> = (FloatTensor<B>, Option<FloatTensor<B>>);

impl<B: FusedOps> Backward<B, 2> for LinearLogprobs {
    type State = State<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let grad: Tensor<B, 1> = float(grads.consume::<B>(&ops.node));
        let (dx, dw) = backward(ops.state, grad, node_x.is_some(), node_w.is_some());
        if let (Some(node), Some(dx)) = (node_x, dx) {
            grads.register::<B>(node.id, prim(dx));
        }
        if let (Some(node), Some(dw)) = (node_w, dw) {
            grads.register::<B>(node.id, prim(dw));
        }
    }
}

pub(crate) fn autodiff_linear_logprobs<B: FusedOps, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    w: FloatTensor<Autodiff<B, C>>,
    targets: IntTensor<Autodiff<B, C>>,
    temperature: f32,
    with_entropy: bool,
) -> LogprobsAndEntropy<Autodiff<B, C>> {
    let out = forward::<B>(
        float(x.primitive.clone()),
        float(w.primitive.clone()),
        int(targets.clone()),
        temperature,
        with_entropy,
    );
    let entropy = out.entropy.map(|e| <Autodiff<B, C> as AutodiffBackend>::from_inner(prim(e)));
    let logprobs = match LinearLogprobs.prepare::<C>([x.node.clone(), w.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let state = State { x: x.primitive, w: w.primitive, targets, lse: prim(out.lse), temperature };
            prep.finish(state, prim(out.logprobs))
        }
        OpsKind::UnTracked(prep) => prep.finish(prim(out.logprobs)),
    };
    (logprobs, entropy)
}
