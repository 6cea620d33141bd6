//! Batched sampling from an align-model network with a KV cache, returning ids, text and
//! log-probs.
//!
//! Prompts are left-padded into one batch, prefilled once, then decoded one token per step
//! against the cache. Each row's positions count only its own tokens, so a row samples
//! exactly what it would alone. Tokens are chosen on the device (`FusedOps::sample_tokens`:
//! temperature, top-k, top-p from one seeded uniform number per row), so only ids and
//! log-probs reach the host, never a `[rows, vocab]` block of logits. Log-probs are under the
//! sampling temperature, before top-k / top-p truncation: the quantity a policy-gradient
//! trainer recomputes.

mod batch;
mod sampling;

pub use batch::{Generation, Rollouts, length_metrics, rollout};
pub use sampling::{Rng, SamplingConfig, row_rng, sample_token};

use align_model::FusedOps;
use align_model::{TokenBatch, Tokenizer, Transformer};

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

/// Why a generation could not run.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// A sampling value outside its range (temperature, top-p, …).
    #[error("sampling: {0}")]
    Sampling(String),
    /// A prompt plus its new tokens does not fit the model's positions.
    #[error(
        "prompt {prompt} has {tokens} tokens; with max_new_tokens {new} that is {} positions, beyond the model's context of {context} (max_position_embeddings): shorten the prompt or lower max_new_tokens",
        tokens + new
    )]
    Context { prompt: usize, tokens: usize, new: usize, context: usize },
    /// A prompt with no tokens: there is nothing to continue from.
    #[error("prompt {0} has no tokens")]
    Empty(usize),
    /// A prompt token the model has no embedding for.
    #[error("prompt {prompt}: token id {id} is beyond the model's vocab_size {vocab}")]
    Token { prompt: usize, id: u32, vocab: usize },
}

pub type Result<T, E = RolloutError> = std::result::Result<T, E>;

/// Refuse prompts the model cannot run: a token beyond its vocabulary, or a prompt that
/// with `max_new_tokens` exceeds its positions (GPT-2's learned positions end there;
/// RoPE models were not trained past it).
pub fn check_prompts<B: FusedOps>(model: &Transformer<B>, prompts: &[Vec<u32>], max_new_tokens: usize) -> Result<()> {
    let (vocab, context) = (model.config.vocab_size, model.config.max_position_embeddings);
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(RolloutError::Empty(i));
        }
        if let Some(&id) = p.iter().find(|&&id| id as usize >= vocab) {
            return Err(RolloutError::Token { prompt: i, id, vocab });
        }
        if p.len().saturating_add(max_new_tokens) > context {
            return Err(RolloutError::Context { prompt: i, tokens: p.len(), new: max_new_tokens, context });
        }
    }
    Ok(())
}

/// Sample a completion for each prompt (token ids) with a KV cache.
pub fn generate<B: FusedOps>(
    model: &Transformer<B>,
    prompts: &[Vec<u32>],
    pad_id: u32,
    cfg: &SamplingConfig,
) -> Result<Vec<Completion>> {
    generate_until(model, prompts, pad_id, cfg, |_, _| false)
}

/// [`generate`], also ending row `i` as soon as `stop(i, tokens so far)` holds (stop
/// strings: see [`generate_text`]).
pub fn generate_until<B: FusedOps>(
    model: &Transformer<B>,
    prompts: &[Vec<u32>],
    pad_id: u32,
    cfg: &SamplingConfig,
    stop: impl FnMut(usize, &[u32]) -> bool,
) -> Result<Vec<Completion>> {
    generate_groups_until(model, prompts, 1, pad_id, cfg, stop)
}

/// `group_size` completions of each prompt, prompt-major (the completions of prompt `p`
/// are rows `p·G .. (p+1)·G`, the layout group methods normalise over). Each prompt is
/// prefilled once and its KV cache repeated `G` times. `stop(row, tokens so far)` ends a
/// row early.
pub fn generate_groups_until<B: FusedOps>(
    model: &Transformer<B>,
    prompts: &[Vec<u32>],
    group_size: usize,
    pad_id: u32,
    cfg: &SamplingConfig,
    mut stop: impl FnMut(usize, &[u32]) -> bool,
) -> Result<Vec<Completion>> {
    cfg.validate()?;
    check_prompts(model, prompts, cfg.max_new_tokens)?;
    let device = model.embed_tokens.val().device();
    let (p, g) = (prompts.len(), group_size.max(1));
    let n = p * g;
    let mut out: Vec<Completion> = vec![Completion { tokens: vec![], logprobs: vec![], stopped: false }; n];
    if n == 0 || cfg.max_new_tokens == 0 {
        return Ok(out);
    }
    let mut rngs: Vec<Rng> = (0..n as u64).map(|i| row_rng(cfg.seed, cfg.first_row + i)).collect();
    let mut cache = model.new_cache();
    let batch = TokenBatch::<B>::left_padded(prompts, pad_id, &device);
    let hidden = model.forward_hidden(&batch, Some(&mut cache));
    let [_, t, d] = hidden.dims();
    let mut last = hidden.narrow(1, t - 1, 1).reshape([p, d]);
    // Batch row r decodes completion (r mod p)·G + r / p: the repeated cache tiles the
    // whole prompt batch G times.
    if g > 1 {
        cache = cache.repeat_batch(g);
        last = last.repeat_dim(0, g);
    }
    let slot = |r: usize| (r % p) * g + r / p;
    let mut positions: Vec<i64> = (0..n).map(|r| prompts[r % p].len() as i64).collect();
    for step in 0..cfg.max_new_tokens {
        let logits = model.logits(last.unsqueeze_dim(1)).reshape([n as i32, -1]);
        let allow_stop = step >= cfg.min_new_tokens;
        // One uniform number per live row, from the row's own stream: the device picks the
        // tokens and only ids and log-probs come back.
        let uniforms: Vec<f32> = (0..n)
            .map(|r| {
                let i = slot(r);
                if out[i].stopped || cfg.temperature <= 0.0 { 0.0 } else { rngs[i].uniform() as f32 }
            })
            .collect();
        let picked = B::sample_tokens(logits.into_primitive().tensor(), &uniforms, &cfg.token_sampling(allow_stop));
        let mut next = Vec::with_capacity(n);
        for (r, &(tok, lp)) in picked.iter().enumerate() {
            let i = slot(r);
            let c = &mut out[i];
            if c.stopped {
                next.push(pad_id);
                continue;
            }
            c.tokens.push(tok);
            c.logprobs.push(lp);
            if allow_stop && (cfg.stop_token_ids.contains(&tok) || stop(i, &c.tokens)) {
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
    Ok(out)
}

/// A completion with its text.
#[derive(Debug, Clone, PartialEq)]
pub struct TextCompletion {
    pub completion: Completion,
    /// The decoded completion, cut after the first stop string (kept when
    /// `include_stop_str_in_output`, else cut before it); special tokens skipped.
    pub text: String,
    /// Which stop string ended it, if one did.
    pub stop_string: Option<String>,
}

/// Sample completions and decode them, also stopping at `stop_strings` (which may span
/// several tokens): a row ends at the first token whose text completes a stop string.
pub fn generate_text<B: FusedOps>(
    model: &Transformer<B>,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    pad_id: u32,
    cfg: &SamplingConfig,
    stop_strings: &[String],
    include_stop_str_in_output: bool,
) -> Result<Vec<TextCompletion>> {
    generate_text_groups(model, tokenizer, prompts, 1, pad_id, cfg, stop_strings, include_stop_str_in_output)
}

/// [`generate_text`] with `group_size` completions per prompt, prompt-major (as
/// [`generate_groups_until`]).
#[allow(clippy::too_many_arguments)]
pub fn generate_text_groups<B: FusedOps>(
    model: &Transformer<B>,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    group_size: usize,
    pad_id: u32,
    cfg: &SamplingConfig,
    stop_strings: &[String],
    include_stop_str_in_output: bool,
) -> Result<Vec<TextCompletion>> {
    let longest = stop_strings.iter().map(|s| s.len()).max().unwrap_or(0);
    let completions = generate_groups_until(model, prompts, group_size, pad_id, cfg, |_, tokens| {
        if stop_strings.is_empty() {
            return false;
        }
        // A new stop string must end in the newest token: compare the text of a tail long
        // enough to hold the longest one (every token is at least one byte) with and
        // without that token.
        let from = tokens.len().saturating_sub(longest + 2);
        let now = tokenizer.decode(&tokens[from..], true).unwrap_or_default();
        let before = tokenizer.decode(&tokens[from..tokens.len() - 1], true).unwrap_or_default();
        stop_strings.iter().any(|s| now.matches(s.as_str()).count() > before.matches(s.as_str()).count())
    })?;
    Ok(completions
        .into_iter()
        .map(|c| {
            let full = tokenizer.decode(&c.tokens, true).unwrap_or_default();
            let first =
                stop_strings.iter().filter_map(|s| full.find(s.as_str()).map(|i| (i, s))).min_by_key(|(i, _)| *i);
            let (text, stop_string) = match first {
                Some((i, s)) if include_stop_str_in_output => (full[..i + s.len()].to_string(), Some(s.clone())),
                Some((i, s)) => (full[..i].to_string(), Some(s.clone())),
                None => (full, None),
            };
            TextCompletion { completion: c, text, stop_string }
        })
        .collect())
}
