//! The bodies of the `align eval` commands and of a recipe's evals: each loads what it
//! needs, shows progress, writes its per-item file and returns the summary that the CLI
//! prints and the recipes keep.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use align_model::{FusedOps, Tokenizer, Transformer};
use anyhow::{Context, Result};
use serde::Serialize;

use crate::math::{
    Gsm8kEvalConfig, MathItem, MathSample, MathSummary, R1ZeroEvalConfig, eval_gsm8k_lm_eval, eval_r1_zero,
    summarize_math,
};
use crate::multiple_choice::{McItem, McResult, McSummary, McTask, mean_with_stderr, score_items, summarize};

/// A progress bar: `what`, the bar, done/total, elapsed and ETA.
pub fn progress(len: usize, what: &str) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(len as u64).with_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}]")
            .expect("valid template"),
    );
    b.set_message(what.to_string());
    b
}

/// Rows as JSON lines, written atomically.
pub fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut text = String::new();
    for r in rows {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    align_model::weights::write_atomic(path, text.as_bytes())?;
    Ok(())
}

/// lm-eval multiple choice over `items`, with a progress bar over the choices scored.
#[allow(clippy::too_many_arguments)]
pub fn run_multiple_choice<B: FusedOps>(
    model: &Transformer<B>,
    tok: &Tokenizer,
    task: &McTask,
    items: &[McItem],
    batch_size: usize,
    shared_context: bool,
    device: &B::Device,
) -> Result<(McSummary, Vec<McResult>)> {
    let bar = progress(items.iter().map(|i| i.choices.len()).sum(), &task.name);
    let start = Instant::now();
    let results = score_items(model, tok, task, items, batch_size, shared_context, device, |n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    Ok((summarize(task, &results, start.elapsed().as_secs_f64()), results))
}

/// The r1_zero eval of `items`, each batch's samples appended to `samples_path` as it is
/// graded. With `resume`, samples already in the file are kept and generation continues
/// after them (the same per-batch seeds: a resumed run equals an uninterrupted one);
/// without, the file starts empty.
pub fn run_r1_zero<B: FusedOps>(
    model: &Transformer<B>,
    tok: &Tokenizer,
    items: &[MathItem],
    cfg: &R1ZeroEvalConfig,
    samples_path: &Path,
    resume: bool,
) -> Result<MathSummary> {
    let done: Vec<MathSample> = match std::fs::read_to_string(samples_path) {
        Ok(text) if resume => text
            .lines()
            .enumerate()
            .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{}:{}", samples_path.display(), i + 1)))
            .collect::<Result<_>>()?,
        _ => vec![],
    };
    if !done.is_empty() {
        tracing::info!(samples = done.len(), file = %samples_path.display(), "resuming");
    }
    let bar = progress(items.len(), "r1_zero");
    bar.set_position(done.len() as u64);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resume)
        .truncate(!resume)
        .open(samples_path)
        .with_context(|| samples_path.display().to_string())?;
    let start = Instant::now();
    let samples = eval_r1_zero(model, tok, items, cfg, done, |batch| {
        for s in batch {
            writeln!(file, "{}", serde_json::to_string(s)?)?;
        }
        file.sync_data()?;
        bar.inc(batch.len() as u64);
        Ok(())
    })?;
    bar.finish_and_clear();
    Ok(summarize_math(&samples, start.elapsed().as_secs_f64()))
}

/// lm-eval's k-shot GSM8K over `items` with `shots`; writes `samples_path` and returns
/// lm-eval's summary (strict and flexible exact match with standard errors).
pub fn run_gsm8k<B: FusedOps>(
    model: &Transformer<B>,
    tok: &Tokenizer,
    items: &[MathItem],
    shots: &[MathItem],
    cfg: &Gsm8kEvalConfig,
    samples_path: &Path,
) -> Result<serde_json::Value> {
    let bar = progress(items.len(), "gsm8k");
    let start = Instant::now();
    let samples = eval_gsm8k_lm_eval(model, tok, items, shots, cfg, |n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    let col = |f: fn(&crate::math::Gsm8kSample) -> f64| mean_with_stderr(&samples.iter().map(f).collect::<Vec<_>>());
    write_jsonl(samples_path, &samples)?;
    Ok(serde_json::json!({
        "task": "gsm8k", "num_fewshot": cfg.num_fewshot, "num_examples": samples.len(),
        "exact_match,strict-match": col(|s| s.strict_match),
        "exact_match,flexible-extract": col(|s| s.flexible_extract),
        "seconds": start.elapsed().as_secs_f64(),
    }))
}
