//! The `align` command.

use align_pipeline::recipe::evals::{progress, write_jsonl};
use std::io::Write;
use std::path::PathBuf;

use align_model::FusedOps;
use align_model::backend::{Cpu, DeviceKind};
use align_model::burn::tensor::backend::Backend;
use align_model::{ChatMessage, Heads, HfHead, load_pretrained, save_pretrained};
use align_pipeline::preference::{PairwiseStage, PreferenceConfig, run_preference, score_dataset};
use align_pipeline::score::{read_rows, score_rows};
use align_rollout::{SamplingConfig, generate};
use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "align", version, about = "LLM alignment training: SFT, reward models, DPO/ORPO, PPO, GRPO")]
struct Cli {
    /// cpu, or cuda in a build with `--features cuda`
    #[arg(long, global = true, default_value = "cpu")]
    device: DeviceKind,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Complete a prompt with a model (greedy unless --temperature > 0).
    Generate {
        /// A GGUF file or an HF directory (config.json, safetensors, tokenizer.json)
        #[arg(long)]
        model: PathBuf,
        /// A PEFT LoRA adapter to apply on top
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt as a user turn with the model's chat template
        #[arg(long)]
        chat: bool,
        /// System message (with --chat)
        #[arg(long)]
        system: Option<String>,
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// 0 = off
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Supervised fine-tuning (full or LoRA) from a TOML stage config.
    Sft(StageArgs),
    /// Train a Bradley–Terry reward model (score head; full or LoRA) from a TOML config.
    Reward(StageArgs),
    /// Direct preference optimisation (sigmoid, cdpo, robust, hinge, ipo).
    Dpo(StageArgs),
    /// ORPO: SFT plus an odds-ratio preference term, no reference model.
    Orpo(StageArgs),
    /// SimPO: reference-free, length-normalised margin.
    Simpo(StageArgs),
    /// GRPO: group-relative policy optimisation with reward functions ([grpo] section).
    Grpo(StageArgs),
    /// PPO (RLHF): policy, critic, reward model and reference, KL penalty ([ppo] section).
    Ppo(StageArgs),
    /// KTO: unpaired desirable/undesirable completions against a reference ([kto] section).
    Kto(StageArgs),
    /// RLOO: k samples per prompt, leave-one-out baseline, reward functions ([rloo] section).
    Rloo(StageArgs),
    /// Best-of-N: sample N completions per prompt, score them with a reward model, print
    /// each with its reward, mark the best, and write the selections as SFT rows.
    BestOfN {
        /// The policy: a GGUF file or an HF directory
        #[arg(long)]
        policy: PathBuf,
        /// A PEFT LoRA adapter on the policy
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// A reward model (`align reward`'s final/)
        #[arg(long)]
        reward_model: PathBuf,
        /// Candidates per prompt
        #[arg(long, default_value_t = 8)]
        n: usize,
        /// Rows with a prompt (JSONL/JSON/Parquet: `prompt` column or conversations)
        #[arg(long)]
        prompts: PathBuf,
        /// Use at most this many prompts
        #[arg(long)]
        limit: Option<usize>,
        /// Where the selections go (JSONL: prompt, completion, reward, best, candidates)
        #[arg(long, default_value = "best_of_n.jsonl")]
        out: PathBuf,
        #[arg(long, default_value_t = 1.0)]
        temperature: f32,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// 0 = off
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Reward-model sequences per forward
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
    },
    /// Score every row of a dataset with a reward model (JSONL on stdout).
    ScoreReward {
        /// A reward model: an HF sequence-classification directory (`align reward`'s final/)
        #[arg(long)]
        model: PathBuf,
        /// JSONL/JSON/Parquet rows: prompt/completion, conversations, text or preference pairs
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Also print the token ids each score was computed on
        #[arg(long)]
        with_ids: bool,
        /// Skip this many rows first
        #[arg(long, default_value_t = 0)]
        skip: usize,
        /// Score at most this many rows
        #[arg(long)]
        limit: Option<usize>,
        /// A built-in adapter for the rows (e.g. piqa_preference)
        #[arg(long)]
        adapter: Option<String>,
    },
    /// Evaluate a model (see `align eval --help`).
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Run a pipeline file: its stages in order, skipping what is done, resuming what was
    /// interrupted, then runs/<name>/report.md (`cargo xtask run-pipeline` also fetches
    /// `[base] fetch = …` models)
    Pipeline {
        file: PathBuf,
        /// `key=value` edits of the file (`stages.sft.training.max_steps=50`); repeatable
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// A few steps of every stage with short evals, into runs/<name>-smoke/
        #[arg(long)]
        smoke: bool,
        /// Only this stage (the stages it reads must be done)
        #[arg(long)]
        stage: Option<String>,
        /// With --stage: run it again even when it is done
        #[arg(long)]
        force: bool,
    },
    /// Merge a PEFT LoRA adapter into its base and write full HF safetensors.
    Merge {
        /// The base model (GGUF or HF directory)
        #[arg(long)]
        model: PathBuf,
        /// The PEFT adapter directory
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a model (GGUF or HF directory) as an HF directory transformers loads:
    /// config.json, model.safetensors (f32), tokenizer.json, tokenizer_config.json.
    Convert {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Per-token log-probs of each `{prompt, completion}` row of a JSONL file.
    Score {
        #[arg(long)]
        model: PathBuf,
        /// A PEFT LoRA adapter to apply on top
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        data: PathBuf,
        /// Output JSONL (default: stdout)
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
    },
}

/// `--config FILE [--resume]` of a training stage.
#[derive(Args)]
struct StageArgs {
    /// The stage's TOML config
    #[arg(long)]
    config: PathBuf,
    /// Continue from the newest complete checkpoint in output_dir
    #[arg(long)]
    resume: bool,
}

/// The model to evaluate.
#[derive(Args)]
struct ModelArgs {
    /// A GGUF file or an HF directory
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter to apply on top
    #[arg(long)]
    adapter: Option<PathBuf>,
}

/// The rows to evaluate on.
#[derive(Args)]
struct RowsArgs {
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
enum EvalCommand {
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

fn eval<B: FusedOps>(command: EvalCommand, device: &B::Device) -> Result<()> {
    match command {
        EvalCommand::Mc { model, task, rows, out, batch_size, shared_context } => {
            let m = load_with_adapter::<B>(&model.model, model.adapter.as_deref(), device)?;
            let task = align_eval::McTask::resolve(&task)?;
            let cfg = rows.dataset();
            let items = align_eval::load_items(&task, &cfg)?;
            let rows: usize = items.iter().map(|i| i.choices.len()).sum();
            let bar = progress(rows, &task.name);
            let start = std::time::Instant::now();
            let results = align_eval::score_items(
                &m.model,
                &m.tokenizer,
                &task,
                &items,
                batch_size,
                shared_context,
                device,
                |n| bar.inc(n as u64),
            )?;
            bar.finish_and_clear();
            let summary = align_eval::summarize(&task, &results, start.elapsed().as_secs_f64());
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
            let path = out.join("r1_zero.jsonl");
            let done: Vec<align_eval::math::MathSample> = match std::fs::read_to_string(&path) {
                Ok(text) => text
                    .lines()
                    .enumerate()
                    .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1)))
                    .collect::<Result<_>>()?,
                Err(_) => vec![],
            };
            if !done.is_empty() {
                tracing::info!(samples = done.len(), file = %path.display(), "resuming");
            }
            let b = progress(items.len(), "r1_zero");
            b.set_position(done.len() as u64);
            let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
            let start = std::time::Instant::now();
            let samples = align_eval::math::eval_r1_zero(&m.model, &m.tokenizer, &items, &ecfg, done, |batch| {
                for s in batch {
                    writeln!(file, "{}", serde_json::to_string(s)?)?;
                }
                file.sync_data()?;
                b.inc(batch.len() as u64);
                Ok(())
            })?;
            b.finish_and_clear();
            let summary = align_eval::math::summarize_math(&samples, start.elapsed().as_secs_f64());
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
            let b = progress(items.len(), "gsm8k");
            let start = std::time::Instant::now();
            let samples =
                align_eval::math::eval_gsm8k_lm_eval(&m.model, &m.tokenizer, &items, &shot_rows, &ecfg, |n| {
                    b.inc(n as u64)
                })?;
            b.finish_and_clear();
            let col = |f: fn(&align_eval::math::Gsm8kSample) -> f64| {
                align_eval::multiple_choice::mean_with_stderr(&samples.iter().map(f).collect::<Vec<_>>())
            };
            let summary = serde_json::json!({
                "task": "gsm8k", "num_fewshot": num_fewshot, "num_examples": samples.len(),
                "exact_match,strict-match": col(|s| s.strict_match),
                "exact_match,flexible-extract": col(|s| s.flexible_extract),
                "seconds": start.elapsed().as_secs_f64(),
            });
            std::fs::create_dir_all(&out)?;
            write_jsonl(&out.join("gsm8k.jsonl"), &samples)?;
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
            let b = progress(texts.len(), "perplexity");
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
            write_jsonl(&out.join("win_rate.jsonl"), &samples)?;
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
            for s in &summaries {
                let (name, path) = split(s)?;
                let v: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| path.display().to_string())?)
                        .with_context(|| path.display().to_string())?;
                let mut m = std::collections::BTreeMap::new();
                align_eval::report::flatten_numbers(&v, "", &mut m);
                match report.rows.iter_mut().find(|r| r.name == name) {
                    Some(row) => row.metrics.extend(m),
                    None => report.rows.push(align_eval::report::ReportRow { name, metrics: m }),
                }
            }
            for f in report.write(&out)? {
                println!("{}", f.display());
            }
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: logs piped to a file or CI stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.device {
        DeviceKind::Cpu => run::<Cpu>(cli.command, &Default::default()),
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => run::<align_model::backend::Cuda>(cli.command, &Default::default()),
        #[cfg(not(feature = "cuda"))]
        DeviceKind::Cuda => bail!("this build has no CUDA support: rebuild with `--features cuda`"),
    }
}

/// A model, with a PEFT adapter applied when one is given.
fn load_with_adapter<B: Backend>(
    model: &std::path::Path,
    adapter: Option<&std::path::Path>,
    device: &B::Device,
) -> Result<align_model::Pretrained<B>> {
    let mut m = load_pretrained::<B>(model, Heads::LM, device)?;
    if let Some(a) = adapter {
        m.model = align_lora::load_peft(m.model, a)?.0;
    }
    Ok(m)
}

fn pairwise<B: FusedOps>(
    config: &std::path::Path,
    stage: PairwiseStage,
    resume: bool,
    device: &B::Device,
) -> Result<()> {
    let cfg = PreferenceConfig::from_file(config)?;
    let out = run_preference::<B>(&cfg, stage, resume, device)?;
    println!("{}", out.display());
    Ok(())
}

fn run<B: FusedOps>(command: Command, device: &B::Device) -> Result<()> {
    match command {
        Command::Generate { model, adapter, prompt, chat, system, temperature, top_k, top_p, max_new_tokens, seed } => {
            let m = load_with_adapter::<B>(&model, adapter.as_deref(), device)?;
            let text = if chat {
                let template = m
                    .tokenizer
                    .chat_template
                    .as_ref()
                    .with_context(|| format!("{}: the model has no chat template", model.display()))?;
                let mut messages = Vec::new();
                if let Some(s) = system {
                    messages.push(ChatMessage::new("system", s));
                }
                messages.push(ChatMessage::new("user", prompt));
                template.render(&messages, true, None)?
            } else {
                prompt
            };
            let ids = m.tokenizer.encode(&text, !chat)?;
            if ids.is_empty() {
                bail!("the prompt encodes to no tokens");
            }
            let stop: Vec<u32> = m
                .tokenizer
                .eos_token_id
                .into_iter()
                .chain(m.model.config.eos_token_ids.iter().copied())
                .chain(m.tokenizer.token_to_id("<|im_end|>").filter(|_| chat))
                .collect();
            let cfg = SamplingConfig {
                temperature,
                top_k,
                top_p,
                max_new_tokens,
                min_new_tokens: 0,
                stop_token_ids: stop,
                seed,
            };
            let pad = m.tokenizer.pad_token_id.or(m.tokenizer.eos_token_id).unwrap_or(0);
            let start = std::time::Instant::now();
            let out = generate(&m.model, &[ids], pad, &cfg);
            let secs = start.elapsed().as_secs_f64();
            let c = &out[0];
            println!("{}", m.tokenizer.decode(&c.tokens, true)?);
            tracing::info!(tokens = c.tokens.len(), seconds = format!("{secs:.2}"), "generated");
        }
        Command::Sft(StageArgs { config, resume }) => {
            let cfg = align_pipeline::sft::SftConfig::from_file(&config)?;
            let out = align_pipeline::sft::run_sft::<B>(&cfg, resume, device)?;
            println!("{}", out.display());
        }
        Command::Reward(a) => pairwise::<B>(&a.config, PairwiseStage::Reward, a.resume, device)?,
        Command::Dpo(a) => pairwise::<B>(&a.config, PairwiseStage::Dpo, a.resume, device)?,
        Command::Orpo(a) => pairwise::<B>(&a.config, PairwiseStage::Orpo, a.resume, device)?,
        Command::Simpo(a) => pairwise::<B>(&a.config, PairwiseStage::Simpo, a.resume, device)?,
        Command::Grpo(a) => {
            let cfg = align_pipeline::config::StageConfig::from_file(&a.config)?;
            let out = align_pipeline::grpo::run_grpo::<B>(&cfg, a.resume, device)?;
            println!("{}", out.display());
        }
        Command::Ppo(a) => {
            let cfg = align_pipeline::config::StageConfig::from_file(&a.config)?;
            let out = align_pipeline::ppo::run_ppo::<B>(&cfg, a.resume, device)?;
            println!("{}", out.display());
        }
        Command::Kto(a) => {
            let cfg = align_pipeline::config::StageConfig::from_file(&a.config)?;
            let out = align_pipeline::kto::run_kto::<B>(&cfg, a.resume, device)?;
            println!("{}", out.display());
        }
        Command::Rloo(a) => {
            let cfg = align_pipeline::config::StageConfig::from_file(&a.config)?;
            let out = align_pipeline::rloo::run_rloo::<B>(&cfg, a.resume, device)?;
            println!("{}", out.display());
        }
        Command::BestOfN {
            policy,
            adapter,
            reward_model,
            n,
            prompts,
            limit,
            out,
            temperature,
            top_p,
            top_k,
            max_new_tokens,
            seed,
            batch_size,
        } => {
            let m = load_with_adapter::<B>(&policy, adapter.as_deref(), device)?;
            let rm = align_reward::RewardModelScorer::<B>::load(&reward_model, batch_size, device)?;
            let mut data = align_data::DatasetConfig::new(prompts);
            data.limit = limit;
            let rows = align_data::generation_prompts(&m.tokenizer, &data, &Default::default(), "prompts")?;
            let sampling = align_rollout::Generation {
                temperature,
                top_k,
                top_p,
                max_new_tokens,
                min_new_tokens: 0,
                stop_strings: vec![],
                include_stop_str_in_output: true,
            };
            let selections = align_eval::best_of_n(&m.model, &m.tokenizer, &rm, &rows, n, &sampling, seed)?;
            let mut w = std::io::stdout().lock();
            for (i, sel) in selections.iter().enumerate() {
                writeln!(w, "=== prompt {} ===\n{}", i + 1, rows[i].text)?;
                for (k, c) in sel.candidates.iter().enumerate() {
                    let mark = if k == sel.best { "  <== best" } else { "" };
                    writeln!(w, "--- candidate {} (reward {:.4}){mark}\n{}", k + 1, c.reward, c.completion.trim_end())?;
                }
            }
            let text: String =
                selections.iter().map(|s| serde_json::to_string(s).map(|l| l + "\n")).collect::<Result<_, _>>()?;
            align_model::weights::write_atomic(&out, text.as_bytes())?;
            tracing::info!(prompts = selections.len(), n, out = %out.display(), "best-of-n selections written");
        }
        Command::ScoreReward { model, data, batch_size, with_ids, skip, limit, adapter } => {
            let heads = Heads { lm: false, score: true, value: false };
            let m = load_pretrained::<B>(&model, heads, device)?;
            if !model.join("model.safetensors").exists() && !model.join("model.safetensors.index.json").exists() {
                bail!("{}: not an HF checkpoint directory", model.display());
            }
            let mut cfg = align_data::DatasetConfig::new(data);
            cfg.skip = skip;
            cfg.limit = limit;
            if let Some(a) = adapter {
                cfg.adapter = Some(
                    serde_json::from_value(serde_json::Value::String(a.clone()))
                        .map_err(|_| anyhow::anyhow!("unknown adapter {a:?}"))?,
                );
            }
            let tokenize =
                align_data::TokenizeConfig { max_length: None, max_prompt_length: None, ..Default::default() };
            let rows = score_dataset(&m.model, &m.tokenizer, &cfg, &tokenize, batch_size, with_ids, device)?;
            let mut w = std::io::stdout().lock();
            for r in &rows {
                writeln!(w, "{r}")?;
            }
        }
        Command::Eval(e) => eval::<B>(e, device)?,
        Command::Pipeline { file, sets, smoke, stage, force } => {
            let opts = align_pipeline::recipe::Options { sets, smoke, fetch: None };
            let p = align_pipeline::recipe::load(&file, &opts)?;
            let report = align_pipeline::recipe::run_pipeline::<B>(&p, stage.as_deref(), force, device)?;
            println!("{}", report.markdown());
        }
        Command::Merge { model, adapter, out } => {
            let m = load_pretrained::<B>(&model, Heads::LM, device)?;
            let (adapted, _) = align_lora::load_peft(m.model, &adapter)?;
            let merged = align_lora::merge_and_unload(adapted);
            save_pretrained(&merged, Some(&m.tokenizer), HfHead::CausalLm, &out)?;
            tracing::info!(out = %out.display(), "wrote merged HF checkpoint");
        }
        Command::Convert { model, out } => {
            let m = load_pretrained::<B>(&model, Heads::LM, device)?;
            save_pretrained(&m.model, Some(&m.tokenizer), HfHead::CausalLm, &out)?;
            tracing::info!(out = %out.display(), "wrote HF checkpoint");
        }
        Command::Score { model, adapter, data, out, batch_size } => {
            let m = load_with_adapter::<B>(&model, adapter.as_deref(), device)?;
            let rows = read_rows(&data)?;
            let scored = score_rows(&m.model, &m.tokenizer, &rows, batch_size)?;
            let mut w: Box<dyn Write> = match &out {
                Some(p) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(p).with_context(|| format!("{}", p.display()))?,
                )),
                None => Box::new(std::io::stdout().lock()),
            };
            for r in &scored {
                writeln!(w, "{}", serde_json::to_string(r)?)?;
            }
            w.flush()?;
        }
    }
    Ok(())
}
