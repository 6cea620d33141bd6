//! `cargo xtask bench --dpo`: DPO optimizer-step throughput on SmolLM2-135M with LoRA r=16 on
//! every linear layer, 4 pairs of ≤128 tokens, the reference being the policy with its
//! adapters disabled (a reference forward every step), next to TRL's DPOTrainer on the same
//! shape (`bench_trl.py --method dpo --lora 16`) in the same run, as a ratio.

use std::path::Path;

use align_data::TokenizedSequence;
use align_lora::LoraConfig;
use align_model::backend::{Autodiff, Cpu};
use align_model::{AutodiffFusedOps, Heads, load_pretrained};
use align_pipeline::preference::{DpoSettings, Objective, Pair, PreferenceStage, Reference};
use align_pipeline::train::RowStage;
use anyhow::Result;
use serde_json::{Value, json};

const PAIRS: usize = 4;
const LEN: usize = 128;

/// Median tokens/s of a DPO step (policy and reference forwards, backward, AdamW) on `pairs`
/// pairs of ≤ `len` tokens after one warm-up step; tokens = non-pad tokens of the chosen and
/// rejected rows, as bench_trl.py counts.
pub fn align_tokens_per_second<B: AutodiffFusedOps>(path: &Path, pairs: usize, len: usize, reps: usize) -> Result<f64> {
    let device = Default::default();
    let pre = load_pretrained::<B>(path, Heads::LM, &device)?;
    let lora = LoraConfig { r: 16, lora_alpha: 32.0, lora_dropout: 0.0, ..Default::default() };
    let model = align_lora::attach(pre.model, &lora, 0)?.0;
    let vocab = model.config.vocab_size as u64;
    let mut rng = align_rollout::Rng::new(11);
    let mut ids = |n: usize| -> Vec<u32> { (0..n).map(|_| 100 + (rng.next_u64() % (vocab - 200)) as u32).collect() };
    // bench_trl.py's shape: prompt L/8..L/4 tokens, completions L/2..3L/4 (here their upper ends).
    let seq = |p: &[u32], c: Vec<u32>| TokenizedSequence {
        input_ids: p.iter().copied().chain(c.iter().copied()).collect(),
        loss_mask: std::iter::repeat_n(false, p.len()).chain(std::iter::repeat_n(true, c.len())).collect(),
    };
    let train: Vec<Pair> = (0..pairs)
        .map(|_| {
            let prompt = ids(len / 4);
            let (c, r) = (ids(3 * len / 4 - 1), ids(3 * len / 4 - 1));
            Pair { chosen: seq(&prompt, c), rejected: seq(&prompt, r), margin: None }
        })
        .collect();
    let tokens = train.iter().map(|p| p.chosen.len() + p.rejected.len()).sum::<usize>() as f64;
    let stage = PreferenceStage::<B> {
        objective: Objective::Dpo(DpoSettings::default()),
        train,
        eval: vec![],
        reference: Reference::AdaptersDisabled,
        pad_id: 0,
        batch_size: pairs,
        accumulation: 1,
        config: model.config.clone(),
        lora: Some(lora),
        tokenizer: pre.tokenizer,
        base: path.to_path_buf(),
        device,
        curriculum: None,
    };
    let all: Vec<usize> = (0..pairs).collect();
    let secs = crate::bench_sft::median_step_seconds(model, reps, |m| Ok(stage.row_loss(m, &all, pairs, 1)?.loss))?;
    Ok(tokens / secs)
}

/// `bench_trl.py --method dpo --lora 16`: TRL's DPOTrainer with its defaults.
pub fn trl_dpo(peer: &crate::bench::PeerSetup, pairs: usize, len: usize, steps: usize) -> Result<Value> {
    let args = ["--method", "dpo", "--steps", &steps.to_string(), "--warmup", "1", "--batch-size", &pairs.to_string()]
        .into_iter()
        .chain(["--seq-len", &len.to_string(), "--lora", "16"])
        .map(String::from)
        .collect::<Vec<_>>();
    crate::bench::bench_trl(peer, &args)
}

pub fn run(gguf: &Path, peer: Option<&crate::bench::PeerSetup>, reps: usize) -> Result<Value> {
    let ours = align_tokens_per_second::<Autodiff<Cpu>>(gguf, PAIRS, LEN, reps)?;
    let trl = match peer {
        Some(peer) => Some(trl_dpo(peer, PAIRS, LEN, reps)?),
        None => None,
    };
    let theirs = trl.as_ref().and_then(|v| v["tokens_per_second"]["median"].as_f64());
    println!(
        "| DPO step, SmolLM2-135M, LoRA r=16, {PAIRS} pairs × ≤{LEN} tokens, CPU | align tokens/s | TRL DPOTrainer tokens/s | align / TRL |"
    );
    println!("|---|---|---|---|");
    match theirs {
        Some(t) => println!("| sigmoid, β 0.1, reference = adapters disabled | {ours:.1} | {t:.1} | {:.2} |", ours / t),
        None => println!("| sigmoid, β 0.1, reference = adapters disabled | {ours:.1} | — | — |"),
    }
    Ok(json!({"align_tokens_per_s": ours, "trl_tokens_per_s": theirs, "trl": trl}))
}
