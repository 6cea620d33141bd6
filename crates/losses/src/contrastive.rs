//! InfoNCE contrastive loss with in-batch negatives, the auxiliary objective of SFT's
//! `--use_contrastive --contrastive_temp 0.07`: pooled representations of `N` (prompt,
//! response) pairs, each prompt's own response its positive and the batch's other `N − 1`
//! responses its negatives.
//!
//! Both sides are L2-normalised as `torch.nn.functional.normalize(x, dim=-1)` does (the norm
//! clamped at `eps = 1e-12`), `logits = prompt_n · response_nᵀ / τ` (`[N, N]`, cosine
//! similarities over a temperature), and the loss is the mean cross-entropy of each row of
//! logits against its diagonal (`F.cross_entropy(logits, arange(N))`), from a numerically
//! stable log-softmax. Inputs are tensors and the loss is a one-element tensor with the
//! gradient of both inputs; the retrieval accuracy is host math on the detached logits
//! ([`ContrastiveMetrics`]), as [`crate::preference::PreferenceMetrics`] is on rewards.
//!
//! `tests/reference.rs` checks the loss, logits, accuracies and the gradients of both
//! inputs against torch (float64, autograd) in `fixtures/reference/losses/contrastive.json`.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Int, Tensor, activation};
use serde::{Deserialize, Serialize};

/// The norm clamp of [`l2_normalize`]: `torch.nn.functional.normalize`'s default `eps`.
pub const NORMALIZE_EPS: f64 = 1e-12;

/// Which cross-entropies make up the InfoNCE loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContrastiveDirection {
    /// CLIP's symmetric loss (Radford et al. 2021, "Learning Transferable Visual Models From
    /// Natural Language Supervision", arXiv:2103.00020, Figure 3; open_clip's `ClipLoss`):
    /// `(CE(logits, arange) + CE(logitsᵀ, arange)) / 2`, prompt→response and
    /// response→prompt retrieval averaged.
    #[default]
    Symmetric,
    /// One-directional InfoNCE (van den Oord et al. 2018, "Representation Learning with
    /// Contrastive Predictive Coding", arXiv:1807.03748; SimCSE's in-batch-negatives loss,
    /// Gao et al. 2021, arXiv:2104.08821): `CE(logits, arange)`, each prompt retrieving its
    /// response among the batch's responses.
    PromptToResponse,
}

/// The InfoNCE loss of a batch of pairs.
pub struct InfoNce<B: Backend> {
    /// The mean loss, shape `[1]`.
    pub loss: Tensor<B, 1>,
    /// `prompt_n · response_nᵀ / τ`, `[N, N]`, detached: row `i` scores every response for
    /// prompt `i`, its positive on the diagonal.
    pub logits: Tensor<B, 2>,
}

impl<B: Backend> InfoNce<B> {
    /// [`ContrastiveMetrics::from_logits`] of the logits (reads them to the host).
    pub fn metrics(&self) -> ContrastiveMetrics {
        let n = self.logits.dims()[0];
        let host: Vec<f64> = self.logits.clone().into_data().convert::<f64>().to_vec().expect("f64 logits");
        ContrastiveMetrics::from_logits(&host, n)
    }
}

/// Half-precision representations to f32 (f32 and f64 stay as they are): the logits are
/// cosines times 1/τ ≈ 14, which bf16's 8 significant bits would round in steps of about
/// 0.06.
fn upcast<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    match x.dtype() {
        DType::F16 | DType::BF16 => x.cast(FloatDType::F32),
        _ => x,
    }
}

/// Each row over its L2 norm clamped at `eps`, `x / max(‖x‖₂, eps)`
/// (`torch.nn.functional.normalize(x, p=2, dim=-1, eps)`); a zero row stays zero.
///
/// The norm is computed as `sqrt(max(Σx², eps²))`, which is `max(‖x‖₂, eps)` in value and in
/// gradient (none through the norm below `eps`, as torch's clamp) but never differentiates
/// `sqrt` at 0, whose infinite derivative would turn a zero row's gradient into NaN.
pub fn l2_normalize<B: Backend>(x: Tensor<B, 2>, eps: f64) -> Tensor<B, 2> {
    let norm = x.clone().square().sum_dim(1).clamp_min(eps * eps).sqrt();
    x / norm
}

/// InfoNCE over the `N` (prompt, response) pairs of a batch with in-batch negatives:
/// `prompt` and `response` are the pairs' pooled representations, both `[N, D]` with row
/// `i` of one paired with row `i` of the other (a shape mismatch panics). The loss is the
/// mean over the `N` rows (and, for [`ContrastiveDirection::Symmetric`], over both
/// directions) of `−log softmax(logits)[i, i]`, with the gradient of both inputs;
/// half-precision inputs are computed in f32.
///
/// `temperature` τ must be positive (the caller validates it; the seed's default is 0.07).
/// A useful batch has `N ≥ 2`: with `N = 1` there are no negatives and the loss is 0 (with
/// zero gradient), and an empty batch (`N = 0`) gives a constant loss of 0 and `[0, 0]`
/// logits, the convention of [`crate::masked_mean`] for an empty mask, rather than torch's
/// NaN. A zero row normalises to zero (its logits are all 0) and keeps a finite gradient.
pub fn info_nce_loss<B: Backend>(
    prompt: Tensor<B, 2>,
    response: Tensor<B, 2>,
    temperature: f64,
    direction: ContrastiveDirection,
) -> InfoNce<B> {
    assert_eq!(prompt.dims(), response.dims(), "info_nce_loss: prompt and response representations differ in shape");
    let [n, _] = prompt.dims();
    let device = prompt.device();
    let (prompt, response) = (upcast(prompt), upcast(response));
    if n == 0 {
        return InfoNce {
            loss: Tensor::zeros([1], (&device, prompt.dtype())),
            logits: Tensor::zeros([0, 0], (&device, prompt.dtype())),
        };
    }
    let p = l2_normalize(prompt, NORMALIZE_EPS);
    let r = l2_normalize(response, NORMALIZE_EPS);
    // Times 1/τ rather than over τ: Burn 0.21's autodiff differentiates a division by a
    // scalar with the scalar's f32 reciprocal, a 1e-8 relative error in f64 gradients at
    // τ = 0.07; a multiplication keeps the scalar as given.
    let logits = p.matmul(r.transpose()) * (1.0 / temperature);
    let diagonal = Tensor::<B, 1, Int>::arange(0..n as i64, &device);
    // Row i of log softmax over the responses, at its positive column i.
    let prompt_to_response = || {
        let logp = activation::log_softmax(logits.clone(), 1);
        logp.gather(1, diagonal.clone().unsqueeze_dim::<2>(1)).mean().neg()
    };
    let loss = match direction {
        ContrastiveDirection::Symmetric => {
            // Column j of log softmax over the prompts (CE of logitsᵀ), at its positive row j.
            let logp = activation::log_softmax(logits.clone(), 0);
            let response_to_prompt = logp.gather(0, diagonal.clone().unsqueeze_dim::<2>(0)).mean().neg();
            (prompt_to_response() + response_to_prompt) * 0.5
        }
        ContrastiveDirection::PromptToResponse => prompt_to_response(),
    };
    InfoNce { loss, logits: logits.detach() }
}

/// Retrieval accuracies of a batch's logits, logged beside the loss.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ContrastiveMetrics {
    /// Fraction of rows `i` with `argmax_j logits[i, j] == i`: prompts whose own response
    /// scores highest among the batch's responses.
    pub accuracy: f64,
    /// Fraction of columns `j` with `argmax_i logits[i, j] == j`: responses whose own prompt
    /// scores highest among the batch's prompts (the other half of the symmetric loss).
    pub accuracy_response_to_prompt: f64,
}

impl ContrastiveMetrics {
    /// From the `[n, n]` logits in row-major order. A tie goes to the first maximum, as
    /// `torch.argmax`; an empty batch has accuracy 0.
    pub fn from_logits(logits: &[f64], n: usize) -> Self {
        assert_eq!(logits.len(), n * n, "ContrastiveMetrics::from_logits: {} logits for n = {n}", logits.len());
        let rows = (0..n).filter(|&i| first_max(logits[i * n..(i + 1) * n].iter().copied()) == i).count();
        let cols = (0..n).filter(|&j| first_max((0..n).map(|i| logits[i * n + j])) == j).count();
        let d = n.max(1) as f64;
        ContrastiveMetrics { accuracy: rows as f64 / d, accuracy_response_to_prompt: cols as f64 / d }
    }
}

/// The index of the first largest value (`torch.argmax`'s rule for ties); 0 when empty.
fn first_max(values: impl Iterator<Item = f64>) -> usize {
    let mut best: Option<(usize, f64)> = None;
    for (k, v) in values.enumerate() {
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((k, v));
        }
    }
    best.map_or(0, |(k, _)| k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex, NdArray};
    use burn::tensor::TensorData;

    fn t2<B: Backend>(v: &[f64], n: usize, d: usize) -> Tensor<B, 2> {
        Tensor::from_data(TensorData::new(v.to_vec(), [n, d]).convert::<B::FloatElem>(), &Default::default())
    }
    fn host<B: Backend, const D: usize>(x: Tensor<B, D>) -> Vec<f64> {
        x.into_data().convert::<f64>().to_vec().unwrap()
    }

    /// Two orthogonal pairs at τ = 1: the logits are the identity, so every row's (and
    /// column's) cross-entropy is `−log(e / (e + 1)) = log(1 + e⁻¹)`.
    #[test]
    fn orthogonal_pairs_by_hand() {
        type B = NdArray<f64>;
        let p = t2::<B>(&[2.0, 0.0, 0.0, 3.0], 2, 2);
        let r = t2::<B>(&[5.0, 0.0, 0.0, 0.5], 2, 2);
        let e = (1.0 + (-1f64).exp()).ln();
        for direction in [ContrastiveDirection::Symmetric, ContrastiveDirection::PromptToResponse] {
            let out = info_nce_loss(p.clone(), r.clone(), 1.0, direction);
            assert_eq!(host(out.logits.clone()), vec![1.0, 0.0, 0.0, 1.0]);
            let l = host(out.loss.clone());
            assert_eq!(l.len(), 1);
            assert!((l[0] - e).abs() < 1e-15, "{direction:?}: {} vs {e}", l[0]);
            assert_eq!(out.metrics(), ContrastiveMetrics { accuracy: 1.0, accuracy_response_to_prompt: 1.0 });
        }
    }

    #[test]
    fn empty_and_single_pair_batches() {
        type B = Autodiff<Flex>;
        let out = info_nce_loss(t2::<B>(&[], 0, 4), t2::<B>(&[], 0, 4), 0.07, ContrastiveDirection::Symmetric);
        assert_eq!(host(out.loss.clone()), vec![0.0]);
        assert_eq!(out.logits.dims(), [0, 0]);
        assert_eq!(out.metrics(), ContrastiveMetrics::default());

        let p = t2::<B>(&[0.3, -1.0, 2.0], 1, 3).require_grad();
        let r = t2::<B>(&[1.0, 1.0, 0.0], 1, 3).require_grad();
        let out = info_nce_loss(p.clone(), r.clone(), 0.07, ContrastiveDirection::Symmetric);
        assert_eq!(host(out.loss.clone()), vec![0.0]);
        let grads = out.loss.backward();
        for g in [p.grad(&grads).unwrap(), r.grad(&grads).unwrap()] {
            assert!(host(g).iter().all(|x| *x == 0.0));
        }
    }

    /// A zero row normalises to zero with a finite gradient (`1/eps` times the upstream one),
    /// not the NaN of differentiating `sqrt` at 0.
    #[test]
    fn zero_row_has_a_finite_gradient() {
        type B = Autodiff<NdArray<f64>>;
        let p = t2::<B>(&[0.0, 0.0, 1.0, 2.0], 2, 2).require_grad();
        let r = t2::<B>(&[1.0, 0.5, 0.0, 0.0], 2, 2).require_grad();
        let out = info_nce_loss(p.clone(), r.clone(), 0.07, ContrastiveDirection::Symmetric);
        assert!(host(out.loss.clone())[0].is_finite());
        let grads = out.loss.backward();
        for g in [p.grad(&grads).unwrap(), r.grad(&grads).unwrap()] {
            assert!(host(g).iter().all(|x| x.is_finite()));
        }
    }

    /// bf16 representations are computed in f32 and the gradient comes back to them.
    #[test]
    fn half_precision_is_upcast() {
        type B = Autodiff<Flex>;
        let dev = Default::default();
        let bf16 = |v: Vec<f32>| Tensor::<B, 2>::from_data(TensorData::new(v, [2, 2]), (&dev, DType::BF16));
        let p = bf16(vec![1.0, 0.0, 0.0, 1.0]).require_grad();
        let r = bf16(vec![1.0, 0.0, 0.0, 1.0]).require_grad();
        assert_eq!(p.dtype(), DType::BF16);
        let out = info_nce_loss(p.clone(), r, 0.07, ContrastiveDirection::PromptToResponse);
        assert_eq!(out.loss.dtype(), DType::F32);
        let want = (1.0 + (-1.0f64 / 0.07).exp()).ln();
        assert!((host(out.loss.clone())[0] - want).abs() < 1e-6);
        let g = p.grad(&out.loss.backward()).unwrap();
        assert_eq!(g.dtype(), DType::BF16);
    }

    #[test]
    fn metrics_take_the_first_of_tied_maxima() {
        // Row 0 ties between columns 0 and 1 (first: 0, a hit); row 1's maximum is column 0.
        let m = ContrastiveMetrics::from_logits(&[1.0, 1.0, 2.0, 0.5], 2);
        assert_eq!(m.accuracy, 0.5);
        // Column 0's maximum is row 1 (miss); column 1 ties at 1.0 vs 0.5 → row 0 (miss).
        assert_eq!(m.accuracy_response_to_prompt, 0.0);
    }
}
