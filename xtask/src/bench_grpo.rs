//! The GRPO row of `cargo xtask bench --all`: `align grpo` (the real stage, through
//! `run_grpo`) against TRL's GRPOTrainer (`bench_trl.py --method grpo`) on the same shape:
//! LoRA r=16 on every linear layer, 8 completions per step = 2 prompts × G = 4, at most 32
//! completion tokens sampled at temperature 1.0, plain-text prompts of 12–24 tokens, DAPO
//! loss, β = 0 (no reference model), one update per generation batch. Generation is inside
//! the step on both sides; tokens/s = (prompt + completion) tokens / step wall time.

use std::path::Path;

use align_model::FusedOps;
use anyhow::{Context, Result};
use serde_json::Value;

pub const COMPLETIONS: usize = 8;
pub const GROUP: usize = 4;
pub const MAX_NEW: usize = 32;

/// Words of the synthetic prompts (ordinary English, a few tokens each).
const WORDS: &[&str] = &[
    "the", "river", "yes", "stone", "light", "garden", "walks", "under", "quiet", "morning", "paper", "green",
    "window", "sings", "over", "table", "small", "city", "runs", "blue",
];

/// Median tokens/s of `align grpo` steps after one warm-up step.
pub fn align_tokens_per_second<B: FusedOps>(model: &Path, reps: usize) -> Result<f64> {
    let dir = std::env::temp_dir().join(format!("align-bench-grpo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let steps = reps + 1;
    let mut rng = align_rollout::Rng::new(5);
    let rows: Vec<String> = (0..steps * COMPLETIONS / GROUP)
        .map(|_| {
            let n = 10 + (rng.next_u64() % 9) as usize;
            let words: Vec<&str> = (0..n).map(|_| WORDS[(rng.next_u64() % WORDS.len() as u64) as usize]).collect();
            serde_json::json!({ "prompt": words.join(" ") }).to_string()
        })
        .collect();
    let data = dir.join("prompts.jsonl");
    std::fs::write(&data, rows.join("\n") + "\n")?;
    let out = dir.join("run");
    let config = format!(
        r#"output_dir = {out:?}
[model]
path = {model:?}
[data]
path = {data:?}
[training]
per_device_train_batch_size = {COMPLETIONS}
learning_rate = 1e-5
max_steps = {steps}
logging_steps = 1
save_steps = 1000000
[lora]
r = 16
lora_alpha = 32
lora_dropout = 0.0
target_modules = "all-linear"
[grpo]
num_generations = {GROUP}
max_completion_length = {MAX_NEW}
temperature = 1.0
loss_type = "dapo"
beta = 0.0
rewards = [{{ kind = "coherence" }}]
"#
    );
    let cfg_path = dir.join("grpo.toml");
    std::fs::write(&cfg_path, config)?;
    let cfg = align_pipeline::config::StageConfig::from_file(&cfg_path)?;
    align_pipeline::grpo::run_grpo::<B>(&cfg, false, &Default::default())?;
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    let mut tps = vec![];
    for line in metrics.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)?;
        if v.get("step").and_then(Value::as_u64).is_some_and(|s| s > 1) {
            tps.push(v["tokens_per_second"].as_f64().context("metrics.jsonl: tokens_per_second")?);
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    anyhow::ensure!(tps.len() == reps, "expected {reps} timed GRPO steps in metrics.jsonl, found {}", tps.len());
    Ok(crate::bench::median(tps))
}

/// `bench_trl.py --method grpo` on the same shape.
pub fn trl(peer: &crate::bench::PeerSetup, steps: usize) -> Result<Value> {
    let args = ["--method", "grpo", "--steps", &steps.to_string(), "--warmup", "1"]
        .into_iter()
        .chain(["--batch-size", &COMPLETIONS.to_string(), "--num-generations", &GROUP.to_string()])
        .chain(["--max-new-tokens", &MAX_NEW.to_string(), "--lora", "16"])
        .map(String::from)
        .collect::<Vec<_>>();
    crate::bench::bench_trl(peer, &args)
}
