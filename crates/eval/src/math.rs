//! Generative math: GSM8K with the r1_zero prompt and grader (CS336), and lm-eval's GSM8K
//! form (k-shot "Question: …\nAnswer:", greedy, strict `#### N` and flexible last-number
//! matches).

use align_data::adapters::{gsm8k_ground_truth, r1_zero_prompt};
use align_data::{DatasetConfig, RecordReader};
use align_model::FusedOps;
use align_model::{Tokenizer, Transformer};
pub use align_reward::gsm8k_lm_eval_matches;
use align_reward::r1_zero_reward;
use align_rollout::{SamplingConfig, generate_text};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// A GSM8K row: the question and its ground-truth number (and the worked answer, for shots).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MathItem {
    pub question: String,
    pub answer: String,
    pub ground_truth: String,
}

/// GSM8K rows (`question`, `answer` ending in `#### N`); errors name the file and line.
pub fn load_gsm8k(data: &DatasetConfig) -> Result<Vec<MathItem>> {
    let mut out = vec![];
    for rec in RecordReader::open(&data.path)?.skip(data.skip).take(data.limit.unwrap_or(usize::MAX)) {
        let r = rec?;
        let field = |f: &str| -> Result<String> {
            r.fields
                .get(f)
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .with_context(|| format!("{}: field `{f}` missing or not a string", r.location))
        };
        let (question, answer) = (field("question")?, field("answer")?);
        let ground_truth = gsm8k_ground_truth(&answer)
            .with_context(|| format!("{}: field `answer` has no `#### N` ground truth", r.location))?;
        out.push(MathItem { question, answer, ground_truth });
    }
    Ok(out)
}

/// Sampling for r1_zero evaluation. Defaults are the reference's: temperature 1.0, top_p
/// 1.0, 1024 new tokens, stop at "</answer>" kept in the output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct R1ZeroEvalConfig {
    pub temperature: f32,
    pub top_p: f32,
    pub max_new_tokens: usize,
    pub seed: u64,
    /// Prompts per generation batch. Default 8.
    pub batch_size: usize,
}

impl Default for R1ZeroEvalConfig {
    fn default() -> Self {
        R1ZeroEvalConfig { temperature: 1.0, top_p: 1.0, max_new_tokens: 1024, seed: 0, batch_size: 8 }
    }
}

/// One graded sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MathSample {
    pub prompt: String,
    pub response: String,
    pub ground_truth: String,
    pub format_reward: f64,
    pub answer_reward: f64,
    pub reward: f64,
    /// Tokens generated for the response.
    pub completion_tokens: usize,
}

/// The r1_zero summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MathSummary {
    pub num_examples: usize,
    pub format_rate: f64,
    pub accuracy: f64,
    pub avg_reward: f64,
    pub seconds: f64,
    pub generated_tokens: usize,
}

/// Generate with the r1_zero prompt and grade each response, batch by batch. `done` holds
/// the samples of an interrupted run (whole batches, as `on_batch` received them): they are
/// checked against `items` and kept, and generation continues after them with the same
/// per-batch seeds, so a resumed run equals an uninterrupted one. `on_batch` gets each new
/// batch's samples (to append them to a file); returns every sample.
pub fn eval_r1_zero<B: FusedOps>(
    model: &Transformer<B>,
    tok: &Tokenizer,
    items: &[MathItem],
    cfg: &R1ZeroEvalConfig,
    done: Vec<MathSample>,
    mut on_batch: impl FnMut(&[MathSample]) -> Result<()>,
) -> Result<Vec<MathSample>> {
    let bs = cfg.batch_size.max(1);
    if done.len() > items.len() || (!done.len().is_multiple_of(bs) && done.len() != items.len()) {
        bail!(
            "{} samples already written do not form whole batches of {bs} of these {} items",
            done.len(),
            items.len()
        );
    }
    if let Some(i) = done.iter().zip(items).position(|(d, it)| d.prompt != r1_zero_prompt(&it.question)) {
        bail!("sample {i} already written is for another question: the output holds another run");
    }
    let pad = tok.pad_token_id.or(tok.eos_token_id).unwrap_or(0);
    let stop_ids: Vec<u32> = tok.eos_token_id.into_iter().collect();
    let first = done.len() / bs;
    let mut samples = done;
    for (b, chunk) in items.chunks(bs).enumerate().skip(first) {
        let prompts: Vec<String> = chunk.iter().map(|it| r1_zero_prompt(&it.question)).collect();
        let ids: Vec<Vec<u32>> = prompts.iter().map(|p| tok.encode(p, true)).collect::<align_model::Result<_>>()?;
        // One seed per batch, so a subset or a resumed run samples the same per batch.
        let sampling = SamplingConfig {
            temperature: cfg.temperature,
            top_p: cfg.top_p,
            max_new_tokens: cfg.max_new_tokens,
            stop_token_ids: stop_ids.clone(),
            seed: cfg.seed.wrapping_add(b as u64),
            ..Default::default()
        };
        let outs = generate_text(model, tok, &ids, pad, &sampling, &["</answer>".to_string()], true)?;
        let batch: Vec<MathSample> = chunk
            .iter()
            .zip(prompts)
            .zip(outs)
            .map(|((it, prompt), out)| {
                let s = r1_zero_reward(&out.text, &it.ground_truth);
                MathSample {
                    prompt,
                    completion_tokens: out.completion.tokens.len(),
                    response: out.text,
                    ground_truth: it.ground_truth.clone(),
                    format_reward: s.format_reward,
                    answer_reward: s.answer_reward,
                    reward: s.reward,
                }
            })
            .collect();
        on_batch(&batch)?;
        samples.extend(batch);
    }
    Ok(samples)
}

pub fn summarize_math(samples: &[MathSample], seconds: f64) -> MathSummary {
    let n = samples.len().max(1) as f64;
    MathSummary {
        num_examples: samples.len(),
        format_rate: samples.iter().map(|s| s.format_reward).sum::<f64>() / n,
        accuracy: samples.iter().map(|s| s.answer_reward).sum::<f64>() / n,
        avg_reward: samples.iter().map(|s| s.reward).sum::<f64>() / n,
        seconds,
        generated_tokens: samples.iter().map(|s| s.completion_tokens).sum(),
    }
}

/// lm-eval's `gsm8k` settings: 5 shots from the train split (its first rows), greedy, at
/// most 256 new tokens, stopping at "Question:" (and the model's end of text).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gsm8kEvalConfig {
    pub num_fewshot: usize,
    pub max_new_tokens: usize,
    pub batch_size: usize,
}

impl Default for Gsm8kEvalConfig {
    fn default() -> Self {
        Gsm8kEvalConfig { num_fewshot: 5, max_new_tokens: 256, batch_size: 8 }
    }
}

/// One lm-eval-form GSM8K sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gsm8kSample {
    pub question: String,
    pub response: String,
    pub ground_truth: String,
    pub strict_match: f64,
    pub flexible_extract: f64,
}

/// lm-eval's GSM8K: k-shot context from `shots`, greedy generation, both matches.
pub fn eval_gsm8k_lm_eval<B: FusedOps>(
    model: &Transformer<B>,
    tok: &Tokenizer,
    items: &[MathItem],
    shots: &[MathItem],
    cfg: &Gsm8kEvalConfig,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Gsm8kSample>> {
    if shots.len() < cfg.num_fewshot {
        bail!("{} few-shot examples requested, {} available", cfg.num_fewshot, shots.len());
    }
    let prefix: String = shots[..cfg.num_fewshot]
        .iter()
        .map(|s| format!("Question: {}\nAnswer: {}\n\n", s.question, s.answer))
        .collect();
    let pad = tok.pad_token_id.or(tok.eos_token_id).unwrap_or(0);
    let sampling = SamplingConfig {
        temperature: 0.0,
        max_new_tokens: cfg.max_new_tokens,
        stop_token_ids: tok.eos_token_id.into_iter().collect(),
        ..Default::default()
    };
    let until = vec!["Question:".to_string(), "</s>".to_string(), "<|im_end|>".to_string()];
    // lm-eval's HF model keeps the last `max_length - max_gen_toks` tokens of a context.
    let context = model.config.max_position_embeddings;
    let mut out = vec![];
    for chunk in items.chunks(cfg.batch_size.max(1)) {
        let ids: Vec<Vec<u32>> = chunk
            .iter()
            .map(|it| tok.encode(&format!("{prefix}Question: {}\nAnswer:", it.question), true))
            .map(|ids| ids.map(|ids| keep_last(ids, context.saturating_sub(cfg.max_new_tokens))))
            .collect::<align_model::Result<_>>()?;
        for (it, g) in chunk.iter().zip(generate_text(model, tok, &ids, pad, &sampling, &until, false)?) {
            let (strict_match, flexible_extract) = gsm8k_lm_eval_matches(&g.text, &it.ground_truth);
            out.push(Gsm8kSample {
                question: it.question.clone(),
                response: g.text,
                ground_truth: it.ground_truth.clone(),
                strict_match,
                flexible_extract,
            });
        }
        progress(chunk.len());
    }
    Ok(out)
}

/// The last `n` tokens of `ids` (lm-eval's left truncation of a long context).
fn keep_last(mut ids: Vec<u32>, n: usize) -> Vec<u32> {
    if ids.len() > n {
        ids.drain(..ids.len() - n);
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lm_eval_gsm8k_matches() {
        assert_eq!(gsm8k_lm_eval_matches("She has 3 + 4 = 7.\n#### 7", "7"), (1.0, 1.0));
        assert_eq!(gsm8k_lm_eval_matches("So the answer is 1,000.", "1000"), (0.0, 1.0));
        // strict wants digits right after "#### ", as lm-eval's regex
        assert_eq!(gsm8k_lm_eval_matches("#### $1,200.", "1200"), (0.0, 1.0));
        assert_eq!(gsm8k_lm_eval_matches("#### 1,200.", "1200"), (1.0, 1.0));
        assert_eq!(gsm8k_lm_eval_matches("#### 12 then 13", "12"), (1.0, 0.0));
        assert_eq!(gsm8k_lm_eval_matches("no number here", "5"), (0.0, 0.0));
        assert_eq!(gsm8k_lm_eval_matches("It is -3", "-3"), (0.0, 1.0));
    }
}
