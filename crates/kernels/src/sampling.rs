//! Choosing each row's next token from a `[rows, vocab]` block of logits where the logits
//! are, so only the chosen ids and their log-probs travel to the host.
//!
//! The rules are transformers' logits processors, in their order: temperature, then top-k
//! (the k most likely tokens), then top-p over the renormalised top-k set (the smallest set
//! of most likely tokens whose probability reaches p), then one draw by inverse CDF from a
//! uniform number the caller supplies (so a seeded host generator fixes every draw, and
//! every backend picks the same token from the same numbers). Greedy (`temperature = 0`)
//! takes the most likely token. Banned tokens (stop tokens before `min_new_tokens`) are
//! never chosen.
//!
//! The log-prob returned is the token's under the temperature over the whole vocabulary,
//! before truncation and before the ban: what a policy-gradient trainer recomputes from the
//! model's logits.
//!
//! [`sample_row`] is the reference on one host row (and the flex backend's kernel, row by
//! row on threads); [`sample_generic`] is the same rule as Burn tensor ops, which the CUDA
//! and wgpu backends run.

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};

use crate::flex::exp;
use crate::lm_head::at_least_f32;

/// How to choose a token (see the module documentation).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenSampling {
    /// Softmax temperature; `0` (or below) is greedy.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; `0` keeps all.
    pub top_k: usize,
    /// Keep the smallest most-likely set reaching this probability; `1` keeps all.
    pub top_p: f32,
    /// Tokens never chosen (their log-probs still count in the normaliser).
    pub banned: Vec<u32>,
}

impl TokenSampling {
    fn truncates(&self) -> bool {
        self.top_k > 0 || self.top_p < 1.0
    }

    fn scale(&self) -> f32 {
        if self.temperature > 0.0 { 1.0 / self.temperature } else { 1.0 }
    }
}

/// Never let the draw's threshold reach the total mass (a uniform in `[0, 1)` times the
/// total can round up to it), so the chosen token always has a positive weight.
const BELOW_TOTAL: f64 = 1.0 - 1e-7;

/// One row on the host: `(token, log p(token))` for the uniform number `u ∈ [0, 1)`.
/// The draw's weights are f32 exponentials (the vectorised [`crate::flex::exp`]) summed in
/// f64; the log-prob's normaliser is exact f64. Ties in the top-k/top-p order go to the lower token id.
pub fn sample_row(logits: &[f32], params: &TokenSampling, u: f32) -> (u32, f32) {
    let scale = params.scale();
    let banned = |i: usize| params.banned.contains(&(i as u32));
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * scale));
    // The log-prob a trainer compares against: the normaliser in f64 exponentials, the
    // draw's weights below in the fast f32 ones.
    let lse = (logits.iter().map(|&x| ((x * scale - max) as f64).exp()).sum::<f64>().ln()) as f32;
    let logp = |i: usize| (logits[i] * scale - max) - lse;
    let allowed = (0..logits.len()).filter(|&i| !banned(i) && logits[i] * scale > f32::NEG_INFINITY);
    if params.temperature <= 0.0 {
        let best = allowed.fold(None, |b: Option<usize>, i| match b {
            Some(j) if logits[j] >= logits[i] => Some(j),
            _ => Some(i),
        });
        let i = best.unwrap_or(0);
        return (i as u32, logp(i));
    }
    let weight = |i: usize| exp(logits[i] * scale - max) as f64;
    let mut order: Vec<usize> = allowed.collect();
    if params.truncates() {
        let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
        if params.top_k > 0 && params.top_k < order.len() {
            order.select_nth_unstable_by(params.top_k - 1, by_logit);
            order.truncate(params.top_k);
        }
        order.sort_unstable_by(by_logit);
        if params.top_p < 1.0 {
            let total: f64 = order.iter().map(|&i| weight(i)).sum();
            let (mut before, mut keep) = (0.0f64, 0);
            for &i in &order {
                if before >= params.top_p as f64 * total {
                    break;
                }
                before += weight(i);
                keep += 1;
            }
            order.truncate(keep.max(1));
        }
    }
    let total: f64 = order.iter().map(|&i| weight(i)).sum();
    let threshold = (u as f64 * total).min(total * BELOW_TOTAL);
    let mut mass = 0.0f64;
    for &i in &order {
        mass += weight(i);
        if mass > threshold {
            return (i as u32, logp(i));
        }
    }
    let i = order.last().copied().unwrap_or(0);
    (i as u32, logp(i))
}

/// The same rule as Burn tensor ops over `logits: [rows, vocab]` and one uniform number per
/// row: `(tokens [rows], log-probs [rows])`, on the logits' device. Weights accumulate in
/// f32 (a cumulative sum over the vocabulary), so a draw within about 1e-6 of a boundary
/// may pick the neighbouring token that [`sample_row`] would not.
pub fn sample_generic<B: Backend>(
    logits: Tensor<B, 2>,
    uniforms: &[f32],
    params: &TokenSampling,
) -> (Tensor<B, 1, Int>, Tensor<B, 1>) {
    let [n, v] = logits.dims();
    let device = logits.device();
    let z = at_least_f32(logits) * params.scale();
    let max = z.clone().max_dim(1);
    let lse = max.clone() + (z.clone() - max.clone()).exp().sum_dim(1).log();
    let ban = (!params.banned.is_empty()).then(|| {
        let mut m = vec![false; v];
        params.banned.iter().filter(|&&t| (t as usize) < v).for_each(|&t| m[t as usize] = true);
        Tensor::<B, 2, Bool>::from_data(TensorData::new(m, [1, v]), &device).expand([n, v])
    });
    let allowed = match &ban {
        Some(mask) => z.clone().mask_fill(mask.clone(), f32::NEG_INFINITY),
        None => z.clone(),
    };
    let tokens = if params.temperature <= 0.0 {
        allowed.argmax(1)
    } else {
        // Candidates in the order the draw walks them: the vocabulary's, or most likely first.
        let (candidates, order) = if params.truncates() {
            let (sorted, order) = allowed.sort_descending_with_indices(1);
            let k = if params.top_k > 0 { params.top_k.min(v) } else { v };
            (sorted.narrow(1, 0, k), Some(order.narrow(1, 0, k)))
        } else {
            (allowed, None)
        };
        let width = candidates.dims()[1];
        let mut weights = (candidates - max).exp();
        if params.top_p < 1.0 {
            let total = weights.clone().sum_dim(1).expand([n, width]);
            let before = weights.clone().cumsum(1) - weights.clone();
            // The most likely token always stays (transformers' `min_tokens_to_keep = 1`).
            let outside = before.clone().greater_equal(total * params.top_p).bool_and(before.greater_elem(0.0));
            weights = weights.mask_fill(outside, 0.0);
        }
        let cumulative = weights.cumsum(1);
        let total = cumulative.clone().narrow(1, width - 1, 1);
        let u = Tensor::<B, 1>::from_data(TensorData::new(uniforms.to_vec(), [n]), &device).reshape([n, 1]);
        let threshold = (u * total.clone()).min_pair(total * BELOW_TOTAL).expand([n, width]);
        let at = cumulative.lower_equal(threshold).int().sum_dim(1).clamp_max(width as i64 - 1);
        match order {
            Some(order) => order.gather(1, at),
            None => at,
        }
    };
    let logprobs = (z.gather(1, tokens.clone()) - lse).reshape([n]);
    (tokens.reshape([n]), logprobs)
}

/// Tokens and log-probs to the host, row by row.
pub(crate) fn to_host<B: Backend>(tokens: Tensor<B, 1, Int>, logprobs: Tensor<B, 1>) -> Vec<(u32, f32)> {
    // Converted data always reads back as the type it was converted to.
    let ids: Vec<i64> = tokens.into_data().convert::<i64>().to_vec().expect("i64 token ids");
    let lps: Vec<f32> = logprobs.into_data().convert::<f32>().to_vec().expect("f32 log-probs");
    ids.into_iter().zip(lps).map(|(t, lp)| (t as u32, lp)).collect()
}
