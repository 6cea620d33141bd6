//! `align generate`, `score`, `score-reward`, `convert` and `merge`: a model in, text or
//! numbers out.

use std::io::Write;
use std::path::{Path, PathBuf};

use align_data::scored::{CritiqueTask, DEFAULT_CRITIQUE_INSTRUCTION, DEFAULT_SCORE_FORMAT, ScoreCondition};
use align_data::{ChatFormat, Formatter};
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
    /// Wrap the prompt as a user turn in this chat format (what the model was trained
    /// with): template | standard | role_markers | turn_markers
    #[arg(long, value_parser = parse_chat_format)]
    pub chat_format: Option<ChatFormat>,
    /// System message (with --chat or --chat-format)
    #[arg(long)]
    pub system: Option<String>,
    /// Condition on this score: the prompt starts with its control string, as
    /// `[score_conditioning]` trained it
    #[arg(long)]
    pub target_score: Option<f64>,
    /// The control string of --target-score (`{score}` is replaced)
    #[arg(long, default_value = DEFAULT_SCORE_FORMAT, requires = "target_score")]
    pub score_format: String,
    /// Print a draft, the model's critique of it and a revision (Self-Refine), as
    /// `[self_critique]` trained it; needs a chat format
    #[arg(long)]
    pub self_critique: bool,
    /// The top of the critique's score scale (with --self-critique)
    #[arg(long, default_value_t = 5.0, requires = "self_critique")]
    pub max_score: f64,
    /// A reward model scoring the draft and the revision; the better one is kept (with
    /// --self-critique)
    #[arg(long, requires = "self_critique")]
    pub reward_model: Option<PathBuf>,
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

fn parse_chat_format(s: &str) -> Result<ChatFormat, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("unknown chat format {s:?} (template, standard, role_markers or turn_markers)"))
}

/// A model ready to answer prompts: sampling settings, stop tokens and chat format.
struct Generator<B: FusedOps> {
    m: align_model::Pretrained<B>,
    cfg: SamplingConfig,
    format: Option<ChatFormat>,
    pad: u32,
}

impl<B: FusedOps> Generator<B> {
    /// The ids of `messages` rendered for generation (or the plain text of its one user
    /// turn without a chat format).
    fn prompt_ids(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let ids = match self.format {
            Some(format) => {
                let template = self.m.tokenizer.template().map_err(|e| e.to_string());
                let text = Formatter { format, template }.render(messages, true)?;
                self.m.tokenizer.encode(&text, false)?
            }
            None => {
                let text: String = messages.iter().map(|m| m.content.as_str()).collect();
                self.m.tokenizer.encode(&text, true)?
            }
        };
        if ids.is_empty() {
            bail!("the prompt encodes to no tokens");
        }
        Ok(ids)
    }

    /// The reply to `messages` (its tokens and time logged).
    fn reply(&self, messages: &[ChatMessage]) -> Result<String> {
        let ids = self.prompt_ids(messages)?;
        let start = std::time::Instant::now();
        let out = align_rollout::generate(&self.m.model, &[ids], self.pad, &self.cfg)?;
        let c = &out[0];
        tracing::info!(tokens = c.tokens.len(), seconds = format!("{:.2}", start.elapsed().as_secs_f64()), "generated");
        Ok(self.m.tokenizer.decode(&c.tokens, true)?)
    }
}

pub fn generate<B: FusedOps>(a: GenerateArgs, device: &B::Device) -> Result<()> {
    let cfg = SamplingConfig {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        max_new_tokens: a.max_new_tokens,
        min_new_tokens: 0,
        stop_token_ids: vec![],
        seed: a.seed,
        first_row: 0,
    };
    // Before loading the model: a bad flag fails at once.
    cfg.validate()?;
    let format = a.chat_format.or(a.chat.then_some(ChatFormat::Template));
    if a.system.is_some() && format.is_none() {
        bail!("--system needs --chat or --chat-format");
    }
    if a.self_critique && format.is_none() {
        bail!("--self-critique needs --chat or --chat-format: the critique is a conversation");
    }
    let condition = a.target_score.map(|_| ScoreCondition::new(&a.score_format)).transpose()?;
    let critique = a.self_critique.then(|| CritiqueTask::new(DEFAULT_CRITIQUE_INSTRUCTION, a.max_score)).transpose()?;
    let judge = match &a.reward_model {
        Some(p) => Some(align_reward::RewardModelScorer::<B>::load(p, 2, device)?),
        None => None,
    };
    let m = load_with_adapter::<B>(&a.model, a.adapter.as_deref(), device)?;
    let mut g = Generator { cfg, format, pad: m.tokenizer.pad_token_id.or(m.tokenizer.eos_token_id).unwrap_or(0), m };
    g.cfg.stop_token_ids = (g.m.tokenizer.eos_token_id.into_iter())
        .chain(g.m.model.config.eos_token_ids.iter().copied())
        .chain(g.m.tokenizer.token_to_id("<|im_end|>").filter(|_| format.is_some()))
        .collect();
    let prompt = match (&condition, a.target_score) {
        (Some(c), Some(score)) => c.prompt(&a.prompt, score),
        _ => a.prompt.clone(),
    };
    let mut messages: Vec<ChatMessage> = a.system.iter().map(|s| ChatMessage::new("system", s)).collect();
    messages.push(ChatMessage::new("user", prompt));
    let draft = g.reply(&messages).with_context(|| a.model.display().to_string())?;
    let Some(task) = critique else {
        println!("{draft}");
        return Ok(());
    };
    let mut reviewed = messages.clone();
    reviewed.push(ChatMessage::new("assistant", draft.clone()));
    let ask = task.prompt(&reviewed).context("the draft is an assistant turn")?;
    let critique = g.reply(&[ask])?;
    let revision = g.reply(&CritiqueTask::revision(&messages, &draft, &critique))?;
    println!("draft:\n{draft}\n\ncritique:\n{critique}\n");
    match task.parse_score(&critique) {
        Some(s) => println!("critique score: {}\n", align_data::scored::score_text(s)),
        None => println!("critique score: none (no `Score: N` within 0..={})\n", a.max_score),
    }
    println!("revision:\n{revision}");
    if let Some(judge) = judge {
        // Self-Refine keeps a revision only when it is better.
        let prompt_text = g.m.tokenizer.decode(&g.prompt_ids(&messages)?, false)?;
        let example = serde_json::Value::Null;
        let samples: Vec<align_reward::Sample> = [draft.as_str(), revision.as_str()]
            .into_iter()
            .map(|completion| align_reward::Sample {
                prompt: &prompt_text,
                completion,
                completion_ids: &[],
                example: &example,
            })
            .collect();
        let scores = align_reward::Reward::score_batch(&judge, &samples)?;
        let (d, r) = (scores[0].score, scores[1].score);
        let kept = if r > d { "revision" } else { "draft" };
        println!("\nreward model: draft {d:.4}, revision {r:.4}; kept: {kept}");
    }
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
