//! Fused tensor kernels with hand-derived backward passes, as a Burn backend extension.
//!
//! Burn's autodiff records every elementary op of a composition and keeps the tensors each
//! backward step needs. For the LM head that means `log_softmax(x Wᵀ)` keeps several
//! `[rows, vocab]` tensors alive (400 MB each for 2,048 rows of SmolLM2's 49,152 tokens).
//! A fused op records one node instead and computes its own backward.
//!
//! The pattern is Burn's backend extension: [`FusedOps`] is a backend trait whose provided
//! methods compute the forward pass with ordinary tensor ops (so every backend has them:
//! flex, ndarray, CUDA), and `Autodiff<B>` overrides them with an op that records a single
//! node and a [`Backward`](burn::backend::autodiff::ops::Backward) implementation. Code that
//! uses a fused op asks for `B: FusedOps` instead of `B: Backend`.
//!
//! - [`matmul`]: the 2-D product of every projection and the LM head, which the CPU
//!   backend runs on a system BLAS when one is installed ([`blas`]).
//! - [`lm_head`]: `log_softmax(x Wᵀ / T)[target]` (and the entropy) over row chunks, never
//!   holding more than one chunk of logits, forward or backward.
//! - [`elementwise`]: RMSNorm and SwiGLU as one node each.
//! - [`rope`]: rotary position embedding as one node (its backward is the opposite rotation).
//! - [`lora`]: a LoRA projection as one product over the stacked base and low-rank
//!   factors, never forming the frozen weight's gradient.
//! - [`sampling`]: each row's next token chosen where the logits are (temperature, top-k,
//!   top-p), only ids and log-probs read back.
//! - [`attention`]: masked softmax attention whose backward recomputes the probabilities
//!   block by block (flash-style), so no `[batch, heads, seq, seq]` tensor outlives the
//!   forward pass.

pub mod attention;
pub mod blas;
pub mod elementwise;
pub mod flex;
mod flex_attention;
pub mod lm_head;
pub mod lora;
pub mod matmul;
pub mod quant;
pub mod rope;
pub mod sampling;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::{AttentionModuleOptions, BoolTensor, FloatTensor, IntTensor};

pub use attention::masked_attention;
pub use burn;
pub use elementwise::{rms_norm, swiglu};
pub use lm_head::{HeadLogprobs, linear_logprobs};
pub use lora::lora_linear;
pub use matmul::matmul;
pub use quant::{PackedMatrix, PackedWeight, QuantFormat, packed_linear};
pub use rope::rope;
pub use sampling::TokenSampling;

/// A Burn backend with align's fused kernels. The provided methods are the generic
/// implementations; `Autodiff<B>` overrides them with single-node ops and their own backward.
pub trait FusedOps: Backend {
    /// Log-probs of `targets` under `softmax(x wᵀ / temperature)` for `x: [n, d]`,
    /// `w: [vocab, d]`, `targets: [n]`, in f32 (`[n]`), and, when `with_entropy`, each row's
    /// entropy (`[n]`, carrying no gradient).
    fn linear_logprobs(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        targets: IntTensor<Self>,
        temperature: f32,
        with_entropy: bool,
    ) -> lm_head::LogprobsAndEntropy<Self> {
        let out = lm_head::forward::<Self>(
            lm_head::float(x),
            lm_head::float(w),
            lm_head::int(targets),
            temperature,
            with_entropy,
        );
        (lm_head::prim(out.logprobs), out.entropy.map(lm_head::prim))
    }

    /// One row chunk of the fused head: from raw logits `z: [r, vocab]` (f32 or f64) read
    /// as `z / temperature`, each row's `(log p(target), log-sum-exp, entropy when asked)`, `[r]`.
    fn head_chunk_stats(
        z: FloatTensor<Self>,
        targets: IntTensor<Self>,
        temperature: f32,
        with_entropy: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, Option<FloatTensor<Self>>) {
        let (logp, lse, entropy) =
            lm_head::chunk_stats::<Self>(lm_head::float(z), lm_head::int(targets), temperature, with_entropy);
        (lm_head::prim(logp), lm_head::prim(lse), entropy.map(lm_head::prim))
    }

    /// The backward of [`FusedOps::head_chunk_stats`]' log-probs: `∂L/∂z = scale · (1[v = t] − p)`
    /// with `p = exp(z / T − lse)` and `scale = g / T`, `[r, vocab]`.
    fn head_chunk_grad(
        z: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        targets: IntTensor<Self>,
        temperature: f32,
    ) -> FloatTensor<Self> {
        lm_head::prim(lm_head::chunk_grad::<Self>(
            lm_head::float(z),
            lm_head::float(lse),
            lm_head::float(scale),
            lm_head::int(targets),
            temperature,
        ))
    }

    /// Masked attention's forward keeping one log-sum-exp per query row: `(out, lse)` with
    /// `lse: [b, h, m, 1]` (see [`attention`]); the generic version works in blocks of rows.
    fn attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let f = attention::forward::<Self>(
            lm_head::float(q),
            lm_head::float(k),
            lm_head::float(v),
            Tensor::from_primitive(mask),
        );
        (lm_head::prim(f.out), lm_head::prim(f.lse))
    }

    /// `(dq, dk, dv)` of [`FusedOps::attention_forward`] from `dout`, recomputing the
    /// probabilities from `lse`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dout: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let g = attention::backward::<Self>(q, k, v, mask, out, lse, lm_head::float(dout));
        (lm_head::prim(g.q), lm_head::prim(g.k), lm_head::prim(g.v))
    }

    /// Whether autodiff attention over `scores` query-key pairs recomputes the probabilities
    /// in its backward (rather than keeping them, as Burn's attention does). Generic: only
    /// where they would not fit (above [`attention::RECOMPUTE_ABOVE_SCORES`]).
    fn attention_recomputes(scores: usize) -> bool {
        scores > attention::RECOMPUTE_ABOVE_SCORES
    }

    /// `softmax(q kᵀ/√d, masked) v` for `q: [b, h, m, d]`, `k, v: [b, h, n, d]` and a mask
    /// `[b, h, m, n]` (`true` = not allowed). Without autodiff, the backend's own attention.
    fn masked_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
    ) -> FloatTensor<Self> {
        let out = burn::tensor::module::attention(
            lm_head::float::<Self, 4>(q),
            lm_head::float(k),
            lm_head::float(v),
            Some(Tensor::from_primitive(mask)),
            None,
            AttentionModuleOptions::default(),
        );
        lm_head::prim(out)
    }

    /// `x w + scale·(x a) b` for `x: [n, in]`, `w: [in, out]`, `a: [in, r]`, `b: [r, out]`;
    /// `w` takes no gradient.
    fn lora_linear(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        let (y, _) =
            lora::forward::<Self>(lm_head::float(x), lm_head::float(w), lm_head::float(a), lm_head::float(b), scale);
        lm_head::prim(y)
    }

    /// `x Wᵀ + scale·(x a) b` for `x: [n, in]` and a packed, frozen `W: [out, in]`
    /// ([`quant`]), with the optional low-rank delta `(a: [in, r], b: [r, out], scale)`.
    /// Generic: dequantise on the host, upload, and the dense product.
    fn packed_linear(
        x: FloatTensor<Self>,
        w: &PackedWeight,
        low_rank: Option<(FloatTensor<Self>, FloatTensor<Self>, f64)>,
    ) -> FloatTensor<Self> {
        let low_rank = low_rank.map(|(a, b, s)| (lm_head::float(a), lm_head::float(b), s));
        lm_head::prim(quant::forward::<Self>(lm_head::float(x), w, low_rank).0)
    }

    /// RoPE of `x: [batch, seq, heads, d]` with `cos, sin: [batch, seq, d]`; `inverse`
    /// rotates by the opposite angle.
    fn rope(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>, inverse: bool) -> FloatTensor<Self> {
        lm_head::prim(rope::forward::<Self>(lm_head::float(x), lm_head::float(cos), lm_head::float(sin), inverse))
    }

    /// RMSNorm of `x: [rows, d]` with weight `w: [d]`: `(y, r)` with `r = 1/√(mean(x²) + ε)`
    /// per row (`[rows, 1]`, f32), which the backward reads.
    fn rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (y, r) = elementwise::rms_norm_forward::<Self>(lm_head::float(x), lm_head::float(w), eps);
        (lm_head::prim(y), lm_head::prim(r))
    }

    /// `(dx, dw)` of [`FusedOps::rms_norm`] from `dy`.
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        r: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (dx, dw) = elementwise::rms_norm_backward::<Self>(
            lm_head::float(x),
            lm_head::float(w),
            lm_head::float(r),
            lm_head::float(dy),
        );
        (lm_head::prim(dx), lm_head::prim(dw))
    }

    /// `silu(g) ∘ u` for flat `g, u: [n]`.
    fn swiglu(g: FloatTensor<Self>, u: FloatTensor<Self>) -> FloatTensor<Self> {
        let g = lm_head::float::<Self, 1>(g);
        lm_head::prim(burn::tensor::activation::silu(g) * lm_head::float::<Self, 1>(u))
    }

    /// `(dg, du)` of [`FusedOps::swiglu`] from `dy`.
    fn swiglu_backward(
        g: FloatTensor<Self>,
        u: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (dg, du) =
            elementwise::swiglu_backward::<Self, 1>(lm_head::float(g), lm_head::float(u), lm_head::float(dy));
        (lm_head::prim(dg), lm_head::prim(du))
    }

    /// `a · b` for `a: [m, k]`, `b: [k, n]`. Generic: Burn's matmul.
    fn matmul(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        lm_head::prim(lm_head::float::<Self, 2>(a).matmul(lm_head::float(b)))
    }

    /// Each row's next token from `logits: [rows, vocab]` and one uniform number in `[0, 1)`
    /// per row (see [`sampling`]): `(token, log p(token))` per row, the only values read back
    /// to the host. Generic: [`sampling::sample_generic`] on the device.
    fn sample_tokens(logits: FloatTensor<Self>, uniforms: &[f32], params: &TokenSampling) -> Vec<(u32, f32)> {
        let (tokens, logprobs) = sampling::sample_generic::<Self>(lm_head::float(logits), uniforms, params);
        sampling::to_host(tokens, logprobs)
    }
}

impl<B: FusedOps, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn linear_logprobs(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        targets: IntTensor<Self>,
        temperature: f32,
        with_entropy: bool,
    ) -> lm_head::LogprobsAndEntropy<Self> {
        lm_head::autodiff_linear_logprobs::<B, C>(x, w, targets, temperature, with_entropy)
    }

    fn masked_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
    ) -> FloatTensor<Self> {
        attention::autodiff_masked_attention::<B, C>(q, k, v, mask)
    }

    fn rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (y, r) = elementwise::autodiff_rms_norm::<B, C>(x, w, eps);
        (y, <Self as AutodiffBackend>::from_inner(r))
    }

    fn swiglu(g: FloatTensor<Self>, u: FloatTensor<Self>) -> FloatTensor<Self> {
        elementwise::autodiff_swiglu::<B, C>(g, u)
    }

    fn lora_linear(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        lora::autodiff_lora_linear::<B, C>(x, w, a, b, scale)
    }

    fn rope(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>, inverse: bool) -> FloatTensor<Self> {
        rope::autodiff_rope::<B, C>(x, cos, sin, inverse)
    }

    fn packed_linear(
        x: FloatTensor<Self>,
        w: &PackedWeight,
        low_rank: Option<(FloatTensor<Self>, FloatTensor<Self>, f64)>,
    ) -> FloatTensor<Self> {
        quant::autodiff_packed_linear::<B, C>(x, w, low_rank)
    }

    fn matmul(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        matmul::autodiff_matmul::<B, C>(a, b)
    }

    /// Sampling records nothing: the inner backend chooses.
    fn sample_tokens(logits: FloatTensor<Self>, uniforms: &[f32], params: &TokenSampling) -> Vec<(u32, f32)> {
        B::sample_tokens(<Self as AutodiffBackend>::inner(logits), uniforms, params)
    }
}

impl FusedOps for burn::backend::NdArray<f32> {}

/// f64: the reference backend of the kernels' own tests.
impl FusedOps for burn::backend::NdArray<f64> {}

#[cfg(feature = "cuda")]
impl FusedOps for burn::backend::Cuda {}

#[cfg(feature = "wgpu")]
impl FusedOps for burn::backend::Wgpu {}

/// An autodiff backend whose inner backend has the fused kernels too (trainers need both:
/// the tracked model and, for references and rollouts, its `valid()` copy).
pub trait AutodiffFusedOps: AutodiffBackend<InnerBackend: FusedOps> + FusedOps {}

impl<B: AutodiffBackend<InnerBackend: FusedOps> + FusedOps> AutodiffFusedOps for B {}

/// `gpu_tests!(name, |B| { … })`: a test module `name` with one `#[test]` per GPU backend
/// compiled into this crate (`name::wgpu` with `--features wgpu`, `name::cuda` with
/// `--features cuda`), `B` being that backend. For the test suites of this crate and the
/// crates above it: the features are read here, where they are known, not in the caller.
#[macro_export]
macro_rules! gpu_tests {
    ($name:ident, |$b:ident| $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::__if_wgpu! {
                #[test]
                fn wgpu() {
                    #[allow(dead_code)]
                    type $b = $crate::burn::backend::Wgpu;
                    $body
                }
            }
            $crate::__if_cuda! {
                #[test]
                fn cuda() {
                    #[allow(dead_code)]
                    type $b = $crate::burn::backend::Cuda;
                    $body
                }
            }
        }
    };
}

/// Its tokens, unchanged.
#[doc(hidden)]
#[macro_export]
macro_rules! __keep_tokens {
    ($($t:tt)*) => { $($t)* };
}

/// Nothing.
#[doc(hidden)]
#[macro_export]
macro_rules! __drop_tokens {
    ($($t:tt)*) => {};
}

// `__if_wgpu!` / `__if_cuda!`: the tokens where this crate has the feature, nothing elsewhere.
#[doc(hidden)]
#[cfg(not(feature = "cuda"))]
pub use __drop_tokens as __if_cuda;
#[doc(hidden)]
#[cfg(not(feature = "wgpu"))]
pub use __drop_tokens as __if_wgpu;
#[doc(hidden)]
#[cfg(feature = "cuda")]
pub use __keep_tokens as __if_cuda;
#[doc(hidden)]
#[cfg(feature = "wgpu")]
pub use __keep_tokens as __if_wgpu;
