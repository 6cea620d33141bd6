//! Perplexity of a model on texts, as lm-eval's rolling log-likelihood: each text is split
//! into disjoint windows of at most `max_length` predicted tokens; the first window is
//! conditioned on a single start token (BOS, else EOS) so every token of the text is
//! predicted exactly once; later windows carry the preceding tokens as context.

use align_data::{HostBatch, TokenizedSequence, pad_right};
use align_model::{FusedOps, Tokenizer, Transformer};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Perplexities over a set of texts (lm-eval's `word_perplexity`, `byte_perplexity`,
/// `bits_per_byte`, plus the token-level one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerplexitySummary {
    pub num_texts: usize,
    pub tokens: usize,
    pub words: usize,
    pub bytes: usize,
    /// −Σ log p over every token.
    pub nll: f64,
    pub token_perplexity: f64,
    pub word_perplexity: f64,
    pub byte_perplexity: f64,
    pub bits_per_byte: f64,
    pub seconds: f64,
}

/// Rows to score for one text: (input ids, how many of their last tokens are predicted).
fn windows(ids: &[u32], start: u32, max_length: usize) -> Vec<(Vec<u32>, usize)> {
    let mut out = vec![];
    let mut i = 0;
    while i < ids.len() {
        let end = (i + max_length).min(ids.len());
        // Context: the tokens before the window, as many as fit with it in max_length + 1.
        let ctx_len = (max_length + 1).saturating_sub(end - i).min(i);
        let mut row: Vec<u32> = if i == 0 { vec![start] } else { ids[i - ctx_len..i].to_vec() };
        row.extend_from_slice(&ids[i..end]);
        out.push((row, end - i));
        i = end;
    }
    out
}

/// Score texts; `progress` gets the number of texts done.
pub fn perplexity<B: FusedOps>(
    model: &Transformer<B>,
    tok: &Tokenizer,
    texts: &[String],
    max_length: usize,
    batch_size: usize,
    device: &B::Device,
    mut progress: impl FnMut(usize),
) -> Result<PerplexitySummary> {
    let start = std::time::Instant::now();
    // A window row holds max_length predicted tokens and one before them.
    let fits = model.config.max_position_embeddings.saturating_sub(1).max(1);
    if max_length > fits {
        tracing::warn!("max_length {max_length} exceeds the model's positions: windows of {fits} tokens");
    }
    let max_length = max_length.min(fits);
    let start_token =
        tok.bos_token_id.or(tok.eos_token_id).context("the tokenizer has neither BOS nor EOS to start a text")?;
    let pad = tok.pad_token_id.unwrap_or(start_token);
    let (mut tokens, mut words, mut bytes, mut nll) = (0usize, 0usize, 0usize, 0.0f64);
    for chunk in texts.chunks(batch_size.max(1)) {
        let mut rows = vec![];
        for t in chunk {
            let ids = tok.encode(t, false)?;
            tokens += ids.len();
            words += t.split_whitespace().count();
            bytes += t.len();
            for (row, predicted) in windows(&ids, start_token, max_length.max(1)) {
                let n = row.len();
                rows.push(TokenizedSequence {
                    loss_mask: (0..n).map(|j| j >= n - predicted).collect(),
                    input_ids: row,
                });
            }
        }
        for batch in rows.chunks(batch_size.max(1)) {
            let refs: Vec<&TokenizedSequence> = batch.iter().collect();
            nll -= summed_logprob(model, &pad_right(&refs, pad), device);
        }
        progress(chunk.len());
    }
    let per = |n: usize| (nll / n.max(1) as f64).exp();
    Ok(PerplexitySummary {
        num_texts: texts.len(),
        tokens,
        words,
        bytes,
        nll,
        token_perplexity: per(tokens),
        word_perplexity: per(words),
        byte_perplexity: per(bytes),
        bits_per_byte: nll / bytes.max(1) as f64 / std::f64::consts::LN_2,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn summed_logprob<B: FusedOps>(model: &Transformer<B>, batch: &HostBatch, device: &B::Device) -> f64 {
    let hidden = model.forward_hidden(&batch.to_device::<B>(device), None);
    let (targets, mask) = batch.shifted_targets();
    let at = batch.loss_positions(&targets, &mask);
    let lp: Vec<f64> = model
        .logprobs_at(hidden, &at.rows, &at.targets, 1.0, false)
        .logprobs
        .into_data()
        .convert::<f64>()
        .to_vec()
        .expect("float data");
    lp.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_predict_every_token_once() {
        let ids: Vec<u32> = (10..20).collect();
        let w = windows(&ids, 1, 4);
        assert_eq!(w[0], (vec![1, 10, 11, 12, 13], 4));
        assert_eq!(w[1], (vec![13, 14, 15, 16, 17], 4));
        assert_eq!(w[2], (vec![15, 16, 17, 18, 19], 2));
        assert_eq!(w.iter().map(|(_, p)| p).sum::<usize>(), ids.len());
    }
}
