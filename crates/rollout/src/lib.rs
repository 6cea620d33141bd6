//! Batched sampling from an align-model network with a KV cache, returning ids, text and
//! log-probs.
//!
//! Prompts are left-padded into one batch, prefilled once, then decoded one token per step
//! against the cache. Each row's positions count only its own tokens, so a row samples
//! exactly what it would alone. Log-probs are under the sampling temperature, before top-k
//! / top-p truncation: the quantity a policy-gradient trainer recomputes.

mod sampling;

pub use sampling::{Rng, SamplingConfig, sample_token};

use align_model::burn::tensor::Tensor;
use align_model::burn::tensor::backend::Backend;
use align_model::{TokenBatch, Transformer};

/// One completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Generated token ids (the stop token included when it was produced).
    pub tokens: Vec<u32>,
    /// log p(token) under the sampling temperature, one per token.
    pub logprobs: Vec<f32>,
    /// Stopped on a stop token rather than on `max_new_tokens`.
    pub stopped: bool,
}

/// Sample a completion for each prompt (token ids) with a KV cache.
pub fn generate<B: Backend>(
    model: &Transformer<B>,
    prompts: &[Vec<u32>],
    pad_id: u32,
    cfg: &SamplingConfig,
) -> Vec<Completion> {
    let device = model.embed_tokens.val().device();
    let n = prompts.len();
    let mut out: Vec<Completion> = vec![Completion { tokens: vec![], logprobs: vec![], stopped: false }; n];
    if n == 0 || cfg.max_new_tokens == 0 {
        return out;
    }
    let mut rng = Rng::new(cfg.seed);
    let mut cache = model.new_cache();
    let batch = TokenBatch::<B>::left_padded(prompts, pad_id, &device);
    let hidden = model.forward_hidden(&batch, Some(&mut cache));
    let [_, t, d] = hidden.dims();
    let mut last = hidden.narrow(1, t - 1, 1).reshape([n, d]);
    let mut positions: Vec<i64> = prompts.iter().map(|p| p.len() as i64).collect();
    for step in 0..cfg.max_new_tokens {
        let logits = model.logits(last.unsqueeze_dim(1)).reshape([n as i32, -1]);
        let logits = host_rows(logits);
        let mut next = Vec::with_capacity(n);
        for (i, row) in logits.iter().enumerate() {
            let c = &mut out[i];
            if c.stopped {
                next.push(pad_id);
                continue;
            }
            let allow_stop = step >= cfg.min_new_tokens;
            let (tok, lp) = sample_token(row, cfg, allow_stop, &mut rng);
            c.tokens.push(tok);
            c.logprobs.push(lp);
            if allow_stop && cfg.stop_token_ids.contains(&tok) {
                c.stopped = true;
            }
            next.push(tok);
        }
        if out.iter().all(|c| c.stopped) || step + 1 == cfg.max_new_tokens {
            break;
        }
        let batch = TokenBatch::<B>::next_tokens(&next, &positions, &device);
        for p in positions.iter_mut() {
            *p += 1;
        }
        let hidden = model.forward_hidden(&batch, Some(&mut cache));
        last = hidden.reshape([n, d]);
    }
    out
}

fn host_rows<B: Backend>(logits: Tensor<B, 2>) -> Vec<Vec<f32>> {
    let [_, v] = logits.dims();
    let data: Vec<f32> = logits.into_data().convert::<f32>().to_vec().expect("f32 logits");
    data.chunks(v).map(<[f32]>::to_vec).collect()
}

/// log-softmax of a logit row (for callers that score on the host).
pub fn log_softmax_row(row: &[f32], temperature: f32) -> Vec<f32> {
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = row.iter().map(|&x| (((x - max) / t) as f64).exp()).sum::<f64>().ln() as f32;
    row.iter().map(|&x| (x - max) / t - lse).collect()
}
