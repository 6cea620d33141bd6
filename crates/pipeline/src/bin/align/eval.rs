//! `align eval`: multiple choice, r1_zero, lm-eval GSM8K, perplexity, win rate, report.
//! The bodies are align-eval's; this file parses the arguments and writes the summaries.

use std::path::PathBuf;

use align_model::{FusedOps, Heads, load_pretrained};
use align_rollout::SamplingConfig;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use crate::model::load_with_adapter;

/// The model to evaluate.
#[derive(Args)]
pub struct ModelArgs {
    /// A GGUF file or an HF directory
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter to apply on top
    #[arg(long)]
    adapter: Option<PathBuf>,
}

/// The rows to evaluate on.
#[derive(Args)]
pub struct RowsArgs {
    /// JSONL, JSON or Parquet rows
    #[arg(long)]
    data: PathBuf,
    /// Skip this many rows first
    #[arg(long, default_value_t = 0)]
    skip: usize,
    /// Use at most this many rows
    #[arg(long)]
    limit: Option<usize>,
}

impl RowsArgs {
    fn dataset(&self) -> align_data::DatasetConfig {
        align_data::DatasetConfig { skip: self.skip, limit: self.limit, ..align_data::DatasetConfig::new(&self.data) }
    }
}

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Multiple choice by log-likelihood, as lm-eval (acc, acc_norm, acc_bytes, stderr).
    Mc {
        #[command(flatten)]
        model: ModelArgs,
        /// `piqa`, or a TOML task file (context / choices / gold templates)
        #[arg(long, default_value = "piqa")]
        task: String,
        #[command(flatten)]
        rows: RowsArgs,
        /// Writes <out>/<task>.jsonl (per item) and <out>/<task>.json (summary)
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        /// Run each item's context once and its choices from a KV cache (for long few-shot contexts)
        #[arg(long)]
        shared_context: bool,
    },
    /// GSM8K with the r1_zero prompt and grader: format_rate, accuracy, avg_reward.
    R1Zero {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        rows: RowsArgs,
        /// Writes <out>/r1_zero.jsonl (per sample) and <out>/r1_zero.json (summary)
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1.0)]
        temperature: f32,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 1024)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
    },
    /// lm-eval's GSM8K: k-shot "Question: …\nAnswer:", greedy, strict and flexible match.
    Gsm8k {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        data: PathBuf,
        /// Few-shot rows (GSM8K train; its first rows are used)
        #[arg(long)]
        shots: PathBuf,
        #[arg(long, default_value_t = 5)]
        num_fewshot: usize,
        #[arg(long, default_value_t = 0)]
        skip: usize,
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 256)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
    },
    /// Perplexity on a text file (.txt: the whole file) or a column of a dataset.
    Perplexity {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        data: PathBuf,
        /// The text column of JSONL/JSON/Parquet rows
        #[arg(long, default_value = "text")]
        column: String,
        #[arg(long)]
        limit: Option<usize>,
        /// Predicted tokens per window
        #[arg(long, default_value_t = 1024)]
        max_length: usize,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
    },
    /// Win rate of model A over model B on prompts, judged by a reward model.
    WinRate {
        #[arg(long)]
        model_a: PathBuf,
        #[arg(long)]
        adapter_a: Option<PathBuf>,
        #[arg(long)]
        model_b: PathBuf,
        #[arg(long)]
        adapter_b: Option<PathBuf>,
        /// The judge: an HF sequence-classification directory (`align reward`'s final/)
        #[arg(long)]
        reward_model: PathBuf,
        /// Rows with a `prompt` field (plain text)
        #[arg(long)]
        prompts: PathBuf,
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
    },
    /// A report of runs and evaluations: report.md (table), report.json, one PNG per metric.
    Report {
        /// NAME=DIR of a run (its metrics.jsonl); repeatable
        #[arg(long = "run")]
        runs: Vec<String>,
        /// NAME=FILE of an eval summary JSON (its numbers join NAME's row); repeatable
        #[arg(long = "summary")]
        summaries: Vec<String>,
        #[arg(long, default_value = "align report")]
        title: String,
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run<B: FusedOps>(command: EvalCommand, device: &B::Device) -> Result<()> {
    match command {
        EvalCommand::Mc { model, task, rows, out, batch_size, shared_context } => {
            let m = load_with_adapter::<B>(&model.model, model.adapter.as_deref(), device)?;
            let task = align_eval::McTask::resolve(&task)?;
            let cfg = rows.dataset();
            let items = align_eval::load_items(&task, &cfg)?;
            let (summary, results) = align_eval::run_multiple_choice(
                &m.model,
                &m.tokenizer,
                &task,
                &items,
                batch_size,
                shared_context,
                device,
            )?;
            align_eval::multiple_choice::write_results(&out, &summary, &results)?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
        }
        EvalCommand::R1Zero { model, rows, out, temperature, top_p, max_new_tokens, seed, batch_size } => {
            let m = load_with_adapter::<B>(&model.model, model.adapter.as_deref(), device)?;
            let cfg = rows.dataset();
            let items = align_eval::math::load_gsm8k(&cfg)?;
            let ecfg = align_eval::math::R1ZeroEvalConfig { temperature, top_p, max_new_tokens, seed, batch_size };
            // Samples are appended batch by batch; a rerun with the same --out resumes.
            std::fs::create_dir_all(&out)?;
            let summary =
                align_eval::run_r1_zero(&m.model, &m.tokenizer, &items, &ecfg, &out.join("r1_zero.jsonl"), true)?;
            align_model::weights::write_atomic(
                &out.join("r1_zero.json"),
                serde_json::to_string_pretty(&summary)?.as_bytes(),
            )?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
        }
        EvalCommand::Gsm8k { model, data, shots, num_fewshot, skip, limit, out, max_new_tokens, batch_size } => {
            let m = load_with_adapter::<B>(&model.model, model.adapter.as_deref(), device)?;
            let mut cfg = align_data::DatasetConfig::new(data);
            cfg.skip = skip;
            cfg.limit = limit;
            let items = align_eval::math::load_gsm8k(&cfg)?;
            let shot_rows = align_eval::math::load_gsm8k(&align_data::DatasetConfig {
                limit: Some(num_fewshot),
                ..align_data::DatasetConfig::new(shots)
            })?;
            let ecfg = align_eval::math::Gsm8kEvalConfig { num_fewshot, max_new_tokens, batch_size };
            std::fs::create_dir_all(&out)?;
            let summary =
                align_eval::run_gsm8k(&m.model, &m.tokenizer, &items, &shot_rows, &ecfg, &out.join("gsm8k.jsonl"))?;
            align_model::weights::write_atomic(
                &out.join("gsm8k.json"),
                serde_json::to_string_pretty(&summary)?.as_bytes(),
            )?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
        }
        EvalCommand::Perplexity { model, data, column, limit, max_length, batch_size } => {
            let m = load_with_adapter::<B>(&model.model, model.adapter.as_deref(), device)?;
            let texts: Vec<String> = if data.extension().is_some_and(|e| e == "txt") {
                vec![std::fs::read_to_string(&data).with_context(|| data.display().to_string())?]
            } else {
                let mut out = vec![];
                for rec in align_data::RecordReader::open(&data)?.take(limit.unwrap_or(usize::MAX)) {
                    let r = rec?;
                    match r.fields.get(&column) {
                        Some(serde_json::Value::String(t)) => out.push(t.clone()),
                        _ => bail!("{}: field `{column}` missing or not a string", r.location),
                    }
                }
                out
            };
            let b = align_eval::progress(texts.len(), "perplexity");
            let summary = align_eval::perplexity::perplexity(
                &m.model,
                &m.tokenizer,
                &texts,
                max_length,
                batch_size,
                device,
                |n| b.inc(n as u64),
            )?;
            b.finish_and_clear();
            println!("{}", serde_json::to_string_pretty(&summary)?);
        }
        EvalCommand::WinRate {
            model_a,
            adapter_a,
            model_b,
            adapter_b,
            reward_model,
            prompts,
            limit,
            out,
            temperature,
            max_new_tokens,
            seed,
            batch_size,
        } => {
            let a = load_with_adapter::<B>(&model_a, adapter_a.as_deref(), device)?;
            let b = load_with_adapter::<B>(&model_b, adapter_b.as_deref(), device)?;
            let rm = load_pretrained::<B>(&reward_model, Heads { lm: false, score: true, value: false }, device)?;
            let mut texts = vec![];
            for rec in align_data::RecordReader::open(&prompts)?.take(limit.unwrap_or(usize::MAX)) {
                let r = rec?;
                match r.fields.get("prompt") {
                    Some(serde_json::Value::String(t)) => texts.push(t.clone()),
                    _ => bail!("{}: field `prompt` missing or not a string", r.location),
                }
            }
            let sampling = SamplingConfig { temperature, max_new_tokens, seed, ..Default::default() };
            let c = align_eval::win_rate::Contender::of;
            let (samples, summary) =
                align_eval::win_rate::win_rate(&c(&a), &c(&b), &c(&rm), &texts, &sampling, batch_size, device)?;
            std::fs::create_dir_all(&out)?;
            align_eval::write_jsonl(&out.join("win_rate.jsonl"), &samples)?;
            align_model::weights::write_atomic(
                &out.join("win_rate.json"),
                serde_json::to_string_pretty(&summary)?.as_bytes(),
            )?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
        }
        EvalCommand::Report { runs, summaries, title, out } => {
            let split = |s: &str| -> Result<(String, PathBuf)> {
                let (n, p) = s.split_once('=').with_context(|| format!("{s:?}: expected NAME=PATH"))?;
                Ok((n.to_string(), PathBuf::from(p)))
            };
            let runs: Vec<(String, PathBuf)> = runs.iter().map(|r| split(r)).collect::<Result<_>>()?;
            let mut report = align_eval::report::from_runs(&title, &runs)?;
            let summaries: Vec<(String, PathBuf)> = summaries.iter().map(|s| split(s)).collect::<Result<_>>()?;
            align_eval::report::merge_summaries(&mut report, &summaries)?;
            for f in report.write(&out)? {
                println!("{}", f.display());
            }
        }
    }
    Ok(())
}
