//! `cargo xtask bench --sft`: SFT optimizer-step throughput on SmolLM2-135M, batch 8 × 256,
//! LoRA r=16 on every linear layer and full fine-tuning, next to TRL's SFTTrainer on the
//! same model and batch (`bench_trl.py --method sft`) in the same run.

use std::path::Path;
use std::time::Instant;

use align_data::{TokenizedSequence, pad_right};
use align_lora::LoraConfig;
use align_model::backend::{Autodiff, Cpu};
use align_model::burn::optim::GradientsParams;
use align_model::burn::tensor::Tensor;
use align_model::{AutodiffFusedOps, BaseStorage, Heads, Transformer, load_pretrained_stored};
use align_pipeline::optim::{AdamW, AdamWConfig};
use align_pipeline::sft::nll_sum;
use anyhow::Result;
use serde_json::{Value, json};

/// Median seconds of an SFT step (forward, backward, AdamW) on `rows` × `len` tokens after
/// one warm-up step; `lora_rank` 0 is full fine-tuning. `model`: a GGUF file or HF directory,
/// its block projections stored as `storage` says (a packed base for QLoRA).
pub fn align_step_seconds<B: AutodiffFusedOps>(
    model: &Path,
    storage: BaseStorage,
    lora_rank: usize,
    rows: usize,
    len: usize,
    reps: usize,
) -> Result<f64> {
    let device = Default::default();
    let mut model = load_pretrained_stored::<B>(model, Heads::LM, storage, &device)?.model;
    if lora_rank > 0 {
        let cfg =
            LoraConfig { r: lora_rank, lora_alpha: 2.0 * lora_rank as f64, lora_dropout: 0.0, ..Default::default() };
        model = align_lora::attach(model, &cfg, 0)?.0;
    }
    let vocab = model.config.vocab_size as u64;
    let mut rng = align_rollout::Rng::new(7);
    let seqs: Vec<TokenizedSequence> = (0..rows)
        .map(|_| TokenizedSequence {
            input_ids: (0..len).map(|_| 100 + (rng.next_u64() % (vocab - 200)) as u32).collect(),
            loss_mask: vec![true; len],
        })
        .collect();
    let refs: Vec<&TokenizedSequence> = seqs.iter().collect();
    let batch = pad_right(&refs, 0);
    median_step_seconds(model, reps, |m| {
        let (sum, n) = nll_sum(m, &batch, &device);
        Ok(sum / n as f64)
    })
}

/// Median seconds of an optimizer step (the loss `loss` gives, backward, AdamW) over `reps`
/// steps after one warm-up step.
pub fn median_step_seconds<B: AutodiffFusedOps>(
    mut model: Transformer<B>,
    reps: usize,
    mut loss: impl FnMut(&Transformer<B>) -> Result<Tensor<B, 1>>,
) -> Result<f64> {
    let mut opt = AdamW::<B>::new(AdamWConfig::default());
    let mut times = Vec::new();
    for i in 0..=reps {
        let t = Instant::now();
        let l = loss(&model)?;
        let grads = GradientsParams::from_grads(l.backward(), &model);
        model = opt.step(model, grads, 1e-5, 1.0);
        let _ = model.embed_tokens.val().into_data(); // wait for the update
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// `bench_trl.py --method sft`: TRL's SFTTrainer with its defaults on `rows` × `len`.
pub fn trl_sft(peer: &crate::bench::PeerSetup, lora: usize, rows: usize, len: usize, steps: usize) -> Result<Value> {
    let args = ["--method", "sft", "--steps", &steps.to_string(), "--warmup", "1", "--batch-size", &rows.to_string()]
        .into_iter()
        .chain(["--seq-len", &len.to_string(), "--lora", &lora.to_string()])
        .map(String::from)
        .collect::<Vec<_>>();
    crate::bench::bench_trl(peer, &args)
}

pub fn run(gguf: &Path, peer: Option<&crate::bench::PeerSetup>, reps: usize) -> Result<Value> {
    println!(
        "| SFT step, SmolLM2-135M, 8 × 256 tokens, CPU | align tokens/s | TRL SFTTrainer tokens/s | align / TRL |"
    );
    println!("|---|---|---|---|");
    let mut report = json!({});
    for (name, rank) in [("LoRA r=16, all linear", 16usize), ("full fine-tuning", 0)] {
        let secs = align_step_seconds::<Autodiff<Cpu>>(gguf, BaseStorage::Dense, rank, 8, 256, reps)?;
        let ours = 8.0 * 256.0 / secs;
        let theirs = match peer {
            Some(peer) => {
                let v = trl_sft(peer, rank, 8, 256, reps)?;
                v["tokens_per_second"]["median"].as_f64()
            }
            None => None,
        };
        match theirs {
            Some(t) => println!("| {name} | {ours:.1} | {t:.1} | {:.2} |", ours / t),
            None => println!("| {name} | {ours:.1} | — | — |"),
        }
        report[name] = json!({"align_tokens_per_s": ours, "trl_tokens_per_s": theirs});
    }
    Ok(report)
}
