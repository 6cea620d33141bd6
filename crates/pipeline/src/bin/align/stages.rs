//! The training stages (`align sft`, `reward`, `dpo`, `orpo`, `simpo`, `kto`, `grpo`,
//! `rloo`, `ppo`), `align best-of-n` and `align pipeline`.

use std::path::PathBuf;

use align_model::FusedOps;
use align_pipeline::config::StageConfig;
use align_pipeline::preference::{PairwiseStage, run_preference};
use anyhow::{Context, Result};
use clap::Args;

use crate::model::load_with_adapter;

/// `--config FILE [--resume]` of a training stage.
#[derive(Args)]
pub struct StageArgs {
    /// The stage's TOML config
    #[arg(long)]
    pub config: PathBuf,
    /// Continue from the newest complete checkpoint in output_dir
    #[arg(long)]
    pub resume: bool,
    #[command(flatten)]
    pub distributed: DistributedArgs,
}

/// Data-parallel flags: each overrides its `[distributed]` setting.
#[derive(Args)]
pub struct DistributedArgs {
    /// Replicas in this process, one per device (cuda:0..N; CPU: threads)
    #[arg(long)]
    pub devices: Option<usize>,
    /// Processes (nodes) taking part
    #[arg(long)]
    pub nodes: Option<usize>,
    /// This process's index among the nodes
    #[arg(long)]
    pub node_rank: Option<usize>,
    /// host:port of node 0, where the other nodes connect
    #[arg(long, value_name = "HOST:PORT")]
    pub coordinator: Option<String>,
}

impl DistributedArgs {
    /// `cfg`'s `[distributed]` with these flags applied.
    pub fn apply(&self, cfg: &mut StageConfig) -> Result<()> {
        let d = &mut cfg.distributed;
        d.devices = self.devices.unwrap_or(d.devices);
        d.nodes = self.nodes.unwrap_or(d.nodes);
        d.node_rank = self.node_rank.unwrap_or(d.node_rank);
        if let Some(c) = &self.coordinator {
            d.coordinator = Some(c.clone());
        }
        d.validate()
    }
}

/// Which training stage a command runs.
#[derive(Debug, Clone, Copy)]
pub enum Trainer {
    Sft,
    Pairwise(PairwiseStage),
    Kto,
    Grpo,
    Rloo,
    Ppo,
}

/// Run a training stage from its config; prints `final/`.
pub fn train<B: FusedOps>(trainer: Trainer, a: StageArgs, device: &B::Device) -> Result<()> {
    let mut cfg = StageConfig::from_file(&a.config)?;
    a.distributed.apply(&mut cfg).with_context(|| a.config.display().to_string())?;
    let out = match trainer {
        Trainer::Sft => align_pipeline::sft::run_sft::<B>(&cfg, a.resume, device)?,
        Trainer::Pairwise(stage) => run_preference::<B>(&cfg, stage, a.resume, device)?,
        Trainer::Kto => align_pipeline::kto::run_kto::<B>(&cfg, a.resume, device)?,
        Trainer::Grpo => align_pipeline::grpo::run_grpo::<B>(&cfg, a.resume, device)?,
        Trainer::Rloo => align_pipeline::rloo::run_rloo::<B>(&cfg, a.resume, device)?,
        Trainer::Ppo => align_pipeline::ppo::run_ppo::<B>(&cfg, a.resume, device)?,
    };
    println!("{}", out.display());
    Ok(())
}

/// Arguments of `align best-of-n`.
#[derive(Args)]
pub struct BestOfNArgs {
    /// The policy: a GGUF file or an HF directory
    #[arg(long)]
    pub policy: PathBuf,
    /// A PEFT LoRA adapter on the policy
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// A reward model (`align reward`'s final/)
    #[arg(long)]
    pub reward_model: PathBuf,
    /// Candidates per prompt
    #[arg(long, default_value_t = 8)]
    pub n: usize,
    /// Rows with a prompt (JSONL/JSON/Parquet: `prompt` column or conversations)
    #[arg(long)]
    pub prompts: PathBuf,
    /// Use at most this many prompts
    #[arg(long)]
    pub limit: Option<usize>,
    /// Where the selections go (JSONL: prompt, completion, reward, best, candidates)
    #[arg(long, default_value = "best_of_n.jsonl")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 = off
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Reward-model sequences per forward
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
}

pub fn best_of_n<B: FusedOps>(a: BestOfNArgs, device: &B::Device) -> Result<()> {
    let BestOfNArgs {
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
    } = a;
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
    print!("{}", align_eval::best_of_n_listing(&rows, &selections));
    let text: String =
        selections.iter().map(|s| serde_json::to_string(s).map(|l| l + "\n")).collect::<Result<_, _>>()?;
    align_model::weights::write_atomic(&out, text.as_bytes())?;
    tracing::info!(prompts = selections.len(), n, out = %out.display(), "best-of-n selections written");
    Ok(())
}

/// Arguments of `align pipeline`.
#[derive(Args)]
pub struct PipelineArgs {
    pub file: PathBuf,
    /// `key=value` edits of the file (`stages.sft.training.max_steps=50`); repeatable
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// A few steps of every stage with short evals, into runs/<name>-smoke/
    #[arg(long)]
    pub smoke: bool,
    /// Only this stage (the stages it reads must be done)
    #[arg(long)]
    pub stage: Option<String>,
    /// With --stage: run it again even when it is done
    #[arg(long)]
    pub force: bool,
}

pub fn pipeline<B: FusedOps>(a: PipelineArgs, device: &B::Device) -> Result<()> {
    let PipelineArgs { file, sets, smoke, stage, force } = a;
    let opts = align_pipeline::recipe::Options { sets, smoke, fetch: None };
    let p = align_pipeline::recipe::load(&file, &opts)?;
    let report = align_pipeline::recipe::run_pipeline::<B>(&p, stage.as_deref(), force, device)?;
    println!("{}", report.markdown());
    Ok(())
}
