//! `align generate`, `score`, `score-reward`, `convert` and `merge`: a model in, text or
//! numbers out.

use std::io::Write;
use std::path::{Path, PathBuf};

use align_model::burn::tensor::backend::Backend;
use align_model::{ChatMessage, FusedOps, Heads, HfHead, load_pretrained, save_pretrained};
use align_pipeline::preference::score_dataset;
use align_pipeline::score::{read_rows, score_rows};
use align_rollout::SamplingConfig;
use anyhow::{Context, Result, bail};
use clap::Args;

/// A model, with a PEFT adapter applied when one is given.
pub fn load_with_adapter<B: Backend>(
    model: &Path,
    adapter: Option<&Path>,
    device: &B::Device,
) -> Result<align_model::Pretrained<B>> {
    let mut m = load_pretrained::<B>(model, Heads::LM, device)?;
    if let Some(a) = adapter {
        m.model = align_lora::load_peft(m.model, a)?.0;
    }
    Ok(m)
}

/// Arguments of `align generate`.
#[derive(Args)]
pub struct GenerateArgs {
    /// A GGUF file or an HF directory (config.json, safetensors, tokenizer.json)
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter to apply on top
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user turn with the model's chat template
    #[arg(long)]
    pub chat: bool,
    /// System message (with --chat)
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// 0 = off
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn generate<B: FusedOps>(a: GenerateArgs, device: &B::Device) -> Result<()> {
    let GenerateArgs { model, adapter, prompt, chat, system, temperature, top_k, top_p, max_new_tokens, seed } = a;
    let mut cfg = SamplingConfig {
        temperature,
        top_k,
        top_p,
        max_new_tokens,
        min_new_tokens: 0,
        stop_token_ids: vec![],
        seed,
        first_row: 0,
    };
    // Before loading the model: a bad flag fails at once.
    cfg.validate()?;
    let m = load_with_adapter::<B>(&model, adapter.as_deref(), device)?;
    let text = if chat {
        let template = m.tokenizer.template().with_context(|| format!("{}: --chat", model.display()))?;
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
    cfg.stop_token_ids = m
        .tokenizer
        .eos_token_id
        .into_iter()
        .chain(m.model.config.eos_token_ids.iter().copied())
        .chain(m.tokenizer.token_to_id("<|im_end|>").filter(|_| chat))
        .collect();
    let pad = m.tokenizer.pad_token_id.or(m.tokenizer.eos_token_id).unwrap_or(0);
    let start = std::time::Instant::now();
    let out = align_rollout::generate(&m.model, &[ids], pad, &cfg).with_context(|| model.display().to_string())?;
    let secs = start.elapsed().as_secs_f64();
    let c = &out[0];
    println!("{}", m.tokenizer.decode(&c.tokens, true)?);
    tracing::info!(tokens = c.tokens.len(), seconds = format!("{secs:.2}"), "generated");
    Ok(())
}

/// Arguments of `align score`.
#[derive(Args)]
pub struct ScoreArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter to apply on top
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long)]
    pub data: PathBuf,
    /// Output JSONL (default: stdout)
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
}

pub fn score<B: FusedOps>(a: ScoreArgs, device: &B::Device) -> Result<()> {
    let ScoreArgs { model, adapter, data, out, batch_size } = a;
    let m = load_with_adapter::<B>(&model, adapter.as_deref(), device)?;
    let rows = read_rows(&data)?;
    let scored = score_rows(&m.model, &m.tokenizer, &rows, batch_size)?;
    let mut w: Box<dyn Write> = match &out {
        Some(p) => {
            Box::new(std::io::BufWriter::new(std::fs::File::create(p).with_context(|| format!("{}", p.display()))?))
        }
        None => Box::new(std::io::stdout().lock()),
    };
    for r in &scored {
        writeln!(w, "{}", serde_json::to_string(r)?)?;
    }
    w.flush()?;
    Ok(())
}

/// Arguments of `align score-reward`.
#[derive(Args)]
pub struct ScoreRewardArgs {
    /// A reward model: an HF sequence-classification directory (`align reward`'s final/)
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL/JSON/Parquet rows: prompt/completion, conversations, text or preference pairs
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Also print the token ids each score was computed on
    #[arg(long)]
    pub with_ids: bool,
    /// Skip this many rows first
    #[arg(long, default_value_t = 0)]
    pub skip: usize,
    /// Score at most this many rows
    #[arg(long)]
    pub limit: Option<usize>,
    /// A built-in adapter for the rows (e.g. piqa_preference)
    #[arg(long)]
    pub adapter: Option<String>,
}

pub fn score_reward<B: FusedOps>(a: ScoreRewardArgs, device: &B::Device) -> Result<()> {
    let ScoreRewardArgs { model, data, batch_size, with_ids, skip, limit, adapter } = a;
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
    let tokenize = align_data::TokenizeConfig { max_length: None, max_prompt_length: None, ..Default::default() };
    let rows = score_dataset(&m.model, &m.tokenizer, &cfg, &tokenize, batch_size, with_ids, device)?;
    let mut w = std::io::stdout().lock();
    for r in &rows {
        writeln!(w, "{r}")?;
    }
    Ok(())
}

/// Arguments of `align convert`.
#[derive(Args)]
pub struct ConvertArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn convert<B: FusedOps>(a: ConvertArgs, device: &B::Device) -> Result<()> {
    let ConvertArgs { model, out } = a;
    let m = load_pretrained::<B>(&model, Heads::LM, device)?;
    save_pretrained(&m.model, Some(&m.tokenizer), HfHead::CausalLm, &out)?;
    tracing::info!(out = %out.display(), "wrote HF checkpoint");
    Ok(())
}

/// Arguments of `align merge`.
#[derive(Args)]
pub struct MergeArgs {
    /// The base model (GGUF or HF directory)
    #[arg(long)]
    pub model: PathBuf,
    /// The PEFT adapter directory
    #[arg(long)]
    pub adapter: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn merge<B: FusedOps>(a: MergeArgs, device: &B::Device) -> Result<()> {
    let MergeArgs { model, adapter, out } = a;
    let m = load_pretrained::<B>(&model, Heads::LM, device)?;
    let (adapted, _) = align_lora::load_peft(m.model, &adapter)?;
    let merged = align_lora::merge_and_unload(adapted);
    save_pretrained(&merged, Some(&m.tokenizer), HfHead::CausalLm, &out)?;
    tracing::info!(out = %out.display(), "wrote merged HF checkpoint");
    Ok(())
}
