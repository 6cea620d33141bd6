//! `align score`: per-token log-probs of completions given prompts.
//!
//! Tokenisation follows TRL's DPOTrainer (and `ref_logprobs.py`): prompt and
//! prompt+completion are tokenised separately without special tokens, and the completion
//! starts at their common prefix, so a BPE merge across the boundary is handled the same
//! way.

use std::io::BufRead;
use std::path::Path;

use align_model::{FusedOps, TokenBatch, Tokenizer, Transformer};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// One `{prompt, completion}` input row.
#[derive(Debug, Clone, Deserialize)]
pub struct ScoreRow {
    pub prompt: String,
    pub completion: String,
    /// Where the row came from (`file:line`), for errors.
    #[serde(skip)]
    pub source: String,
}

/// What `align score` writes per row.
#[derive(Debug, Clone, Serialize)]
pub struct ScoredRow {
    pub prompt: String,
    pub completion: String,
    pub input_ids: Vec<u32>,
    pub prompt_len: usize,
    pub completion_ids: Vec<u32>,
    pub completion_logprobs: Vec<f32>,
    pub completion_logprob_sum: f64,
}

/// Read `{prompt, completion}` JSONL; every bad line is an error naming file, line and field.
pub fn read_rows(path: &Path) -> Result<Vec<ScoreRow>> {
    let f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let n = i + 1;
        let line = line.with_context(|| format!("{}:{n}: reading", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("{}:{n}: invalid JSON", path.display()))?;
        let field = |k: &str| -> Result<String> {
            match v.get(k) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(other) => bail!("{}:{n}: field `{k}`: expected a string, found {other}", path.display()),
                None => bail!("{}:{n}: field `{k}` is missing", path.display()),
            }
        };
        let source = format!("{}:{n}", path.display());
        let row = ScoreRow { prompt: field("prompt")?, completion: field("completion")?, source };
        if row.prompt.is_empty() || row.completion.is_empty() {
            bail!(
                "{}:{n}: field `{}` is empty",
                path.display(),
                if row.prompt.is_empty() { "prompt" } else { "completion" }
            );
        }
        rows.push(row);
    }
    if rows.is_empty() {
        bail!("{}: no rows to score (the file is empty)", path.display());
    }
    Ok(rows)
}

/// Token ids of prompt+completion and where the completion starts.
pub fn tokenize_pair(tok: &Tokenizer, prompt: &str, completion: &str) -> Result<(Vec<u32>, usize)> {
    let p = tok.encode(prompt, false)?;
    let full = tok.encode(&format!("{prompt}{completion}"), false)?;
    let plen = p.iter().zip(&full).take_while(|(a, b)| a == b).count();
    if plen == 0 || plen >= full.len() {
        bail!("prompt/completion split is degenerate (prompt_len {plen}, total {})", full.len());
    }
    Ok((full, plen))
}

/// Log-probs of `ids[t]` for `t >= prompt_len`, for a batch of sequences (the LM head runs
/// on those positions alone).
pub fn completion_logprobs<B: FusedOps>(
    model: &Transformer<B>,
    seqs: &[(Vec<u32>, usize)],
    pad_id: u32,
) -> Vec<Vec<f32>> {
    let device = model.embed_tokens.val().device();
    let ids: Vec<Vec<u32>> = seqs.iter().map(|(s, _)| s.clone()).collect();
    let batch = TokenBatch::<B>::right_padded(&ids, pad_id, &device);
    let t = batch.dims()[1];
    // Position j of row i predicts token j + 1.
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    for (i, (s, plen)) in seqs.iter().enumerate() {
        for j in plen - 1..s.len() - 1 {
            rows.push(i * t + j);
            targets.push(s[j + 1] as i64);
        }
    }
    let hidden = model.forward_hidden(&batch, None);
    let lp: Vec<f32> = model
        .logprobs_at(hidden, &rows, &targets, 1.0, false)
        .logprobs
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32 log-probs");
    let mut lp = lp.into_iter();
    seqs.iter().map(|(s, plen)| lp.by_ref().take(s.len() - plen).collect()).collect()
}

/// Score every row, `batch_size` at a time.
pub fn score_rows<B: FusedOps>(
    model: &Transformer<B>,
    tok: &Tokenizer,
    rows: &[ScoreRow],
    batch_size: usize,
) -> Result<Vec<ScoredRow>> {
    let pad = tok.pad_token_id.or(tok.eos_token_id).unwrap_or(0);
    let context = model.config.max_position_embeddings;
    // Log-probs of a cut row would be wrong, so a row beyond the context is refused; a
    // row too many bytes to fit is refused before the tokenizer sees it (memory).
    let byte_cap = context.saturating_mul(tok.max_token_bytes().max(1));
    let fits = |r: &ScoreRow| -> Result<(Vec<u32>, usize)> {
        let too_long = |what: String| {
            anyhow::anyhow!(
                "{}: the row is {what}, longer than the model's context of {context} positions (max_position_embeddings)",
                r.source
            )
        };
        let bytes = r.prompt.len() + r.completion.len();
        if bytes > byte_cap {
            return Err(too_long(format!("{bytes} bytes")));
        }
        let (ids, plen) = tokenize_pair(tok, &r.prompt, &r.completion).with_context(|| r.source.clone())?;
        if ids.len() > context {
            return Err(too_long(format!("{} tokens", ids.len())));
        }
        Ok((ids, plen))
    };
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(batch_size.max(1)) {
        let seqs = chunk.iter().map(fits).collect::<Result<Vec<_>>>()?;
        let lps = completion_logprobs(model, &seqs, pad);
        for ((r, (ids, plen)), lp) in chunk.iter().zip(seqs).zip(lps) {
            out.push(ScoredRow {
                prompt: r.prompt.clone(),
                completion: r.completion.clone(),
                completion_ids: ids[plen..].to_vec(),
                completion_logprob_sum: lp.iter().map(|&x| x as f64).sum(),
                completion_logprobs: lp,
                prompt_len: plen,
                input_ids: ids,
            });
        }
    }
    Ok(out)
}
