//! Generation batches for training and evaluation: `group` samples of each prompt with
//! stop strings, kept with their log-probs, texts and truncation flags.

use std::collections::BTreeMap;
use std::time::Instant;

use align_model::{FusedOps, Tokenizer, Transformer};

use crate::{SamplingConfig, generate_text_groups};

/// Sampling settings of a generation batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub max_new_tokens: usize,
    pub min_new_tokens: usize,
    pub stop_strings: Vec<String>,
    pub include_stop_str_in_output: bool,
}

impl Generation {
    /// Sampling at `temperature` with a stage's settings.
    pub fn new(
        temperature: f32,
        top_k: usize,
        top_p: f32,
        max_new_tokens: usize,
        min_new_tokens: usize,
        stop_strings: &[String],
        include_stop_str_in_output: bool,
    ) -> Self {
        let stop_strings = stop_strings.to_vec();
        Generation {
            temperature,
            top_k,
            top_p,
            max_new_tokens,
            min_new_tokens,
            stop_strings,
            include_stop_str_in_output,
        }
    }
}

/// The completions of a generation batch, prompt-major (`group` per prompt).
#[derive(Debug, Clone, Default)]
pub struct Rollouts {
    /// Index into the generation's prompts of each completion.
    pub prompt: Vec<usize>,
    pub completions: Vec<Vec<u32>>,
    /// Log-probs under the sampling temperature, one per completion token.
    pub logps: Vec<Vec<f32>>,
    pub texts: Vec<String>,
    /// Ended by `max_new_tokens` rather than EOS or a stop string.
    pub truncated: Vec<bool>,
    pub seconds: f64,
}

impl Rollouts {
    /// Length and speed metrics of the batch, by TRL's names.
    pub fn length_metrics(&self) -> BTreeMap<String, f64> {
        let lengths: Vec<usize> = self.completions.iter().map(Vec::len).collect();
        length_metrics(&lengths, &self.truncated, self.seconds)
    }

    pub fn len(&self) -> usize {
        self.completions.len()
    }
    pub fn is_empty(&self) -> bool {
        self.completions.is_empty()
    }
    pub fn tokens(&self) -> usize {
        self.completions.iter().map(Vec::len).sum()
    }
}

/// Length and speed metrics, by TRL's names, of completions of `lengths` tokens (`truncated`
/// where cut at the limit) sampled in `seconds`.
pub fn length_metrics(lengths: &[usize], truncated: &[bool], seconds: f64) -> BTreeMap<String, f64> {
    let lens: Vec<f64> = lengths.iter().map(|&l| l as f64).collect();
    let mut m = BTreeMap::new();
    m.insert("completions/mean_length".into(), lens.iter().sum::<f64>() / lens.len().max(1) as f64);
    m.insert("completions/max_length".into(), lens.iter().copied().fold(0.0, f64::max));
    m.insert("completions/min_length".into(), lens.iter().copied().fold(f64::INFINITY, f64::min));
    let cut = truncated.iter().filter(|&&t| t).count();
    m.insert("completions/clipped_ratio".into(), cut as f64 / lens.len().max(1) as f64);
    m.insert("rollout_tokens_per_second".into(), lens.iter().sum::<f64>() / seconds.max(1e-9));
    m.insert("rollout_seconds".into(), seconds);
    m
}

/// Sample `group` completions of each prompt (token ids) from `model`, seeded by `seed`;
/// `first_row` is the first completion's index in the whole batch this is a share of
/// ([`crate::SamplingConfig::first_row`]).
pub fn rollout<B: FusedOps>(
    model: &Transformer<B>,
    tok: &Tokenizer,
    prompts: &[&[u32]],
    group: usize,
    sampling: &Generation,
    seed: u64,
    first_row: u64,
) -> crate::Result<Rollouts> {
    let t0 = Instant::now();
    let pad = tok.pad_token_id.or(tok.eos_token_id).unwrap_or(0);
    let cfg = SamplingConfig {
        temperature: sampling.temperature,
        top_k: sampling.top_k,
        top_p: sampling.top_p,
        max_new_tokens: sampling.max_new_tokens,
        min_new_tokens: sampling.min_new_tokens,
        stop_token_ids: tok.eos_token_id.into_iter().collect(),
        seed,
        first_row,
    };
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
    let outs = generate_text_groups(
        model,
        tok,
        &ids,
        group,
        pad,
        &cfg,
        &sampling.stop_strings,
        sampling.include_stop_str_in_output,
    )?;
    let mut r = Rollouts::default();
    for (i, o) in outs.into_iter().enumerate() {
        r.prompt.push(i / group.max(1));
        r.truncated.push(!o.completion.stopped);
        r.completions.push(o.completion.tokens);
        r.logps.push(o.completion.logprobs);
        r.texts.push(o.text);
    }
    r.seconds = t0.elapsed().as_secs_f64();
    Ok(r)
}
