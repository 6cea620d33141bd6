//! The `align` command: argument parsing and output only. Every command calls the library
//! crates; one file per command group: `model.rs` (generate, score, score-reward,
//! convert, merge), `stages.rs` (the training stages, best-of-n, pipeline), `eval.rs`.

mod eval;
mod model;
mod stages;

use align_model::FusedOps;
use align_model::backend::{DeviceKind, OnDevice};
use align_pipeline::preference::PairwiseStage;
use anyhow::Result;
use clap::{Parser, Subcommand};

use stages::{StageArgs, Trainer};

#[derive(Parser)]
#[command(
    name = "align",
    version,
    about = "LLM alignment training: SFT, reward models, DPO/ORPO/SimPO/KTO, PPO, GRPO, RLOO"
)]
struct Cli {
    /// cpu; cuda in a build with `--features cuda`; wgpu (Vulkan, Metal) with `--features wgpu`
    #[arg(long, global = true, default_value = "cpu")]
    device: DeviceKind,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Complete a prompt with a model (greedy unless --temperature > 0).
    Generate(model::GenerateArgs),
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
    BestOfN(stages::BestOfNArgs),
    /// Score every row of a dataset with a reward model (JSONL on stdout).
    ScoreReward(model::ScoreRewardArgs),
    /// Evaluate a model (see `align eval --help`).
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Run a pipeline file: its stages in order, skipping what is done, resuming what was
    /// interrupted, then runs/<name>/report.md (`cargo xtask run-pipeline` also fetches
    /// `[base] fetch = …` models)
    Pipeline(stages::PipelineArgs),
    /// Merge a PEFT LoRA adapter into its base and write full HF safetensors.
    Merge(model::MergeArgs),
    /// Write a model (GGUF or HF directory) as an HF directory transformers loads:
    /// config.json, model.safetensors (f32), tokenizer.json, tokenizer_config.json.
    Convert(model::ConvertArgs),
    /// Per-token log-probs of each `{prompt, completion}` row of a JSONL file.
    Score(model::ScoreArgs),
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: logs piped to a file or CI stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    cli.device.run(cli.command).map_err(anyhow::Error::msg)?
}

impl OnDevice for Command {
    type Output = Result<()>;
    fn run<B: FusedOps>(self, device: &B::Device) -> Result<()> {
        run::<B>(self, device)
    }
}

fn run<B: FusedOps>(command: Command, device: &B::Device) -> Result<()> {
    match command {
        Command::Generate(a) => model::generate::<B>(a, device),
        Command::Sft(a) => stages::train::<B>(Trainer::Sft, a, device),
        Command::Reward(a) => stages::train::<B>(Trainer::Pairwise(PairwiseStage::Reward), a, device),
        Command::Dpo(a) => stages::train::<B>(Trainer::Pairwise(PairwiseStage::Dpo), a, device),
        Command::Orpo(a) => stages::train::<B>(Trainer::Pairwise(PairwiseStage::Orpo), a, device),
        Command::Simpo(a) => stages::train::<B>(Trainer::Pairwise(PairwiseStage::Simpo), a, device),
        Command::Kto(a) => stages::train::<B>(Trainer::Kto, a, device),
        Command::Grpo(a) => stages::train::<B>(Trainer::Grpo, a, device),
        Command::Rloo(a) => stages::train::<B>(Trainer::Rloo, a, device),
        Command::Ppo(a) => stages::train::<B>(Trainer::Ppo, a, device),
        Command::BestOfN(a) => stages::best_of_n::<B>(a, device),
        Command::ScoreReward(a) => model::score_reward::<B>(a, device),
        Command::Eval(e) => eval::run::<B>(e, device),
        Command::Pipeline(a) => stages::pipeline::<B>(a, device),
        Command::Merge(a) => model::merge::<B>(a, device),
        Command::Convert(a) => model::convert::<B>(a, device),
        Command::Score(a) => model::score::<B>(a, device),
    }
}
