//! `cargo xtask bench --rollout`: RL rollout throughput on SmolLM2-135M — 8 prompts × G = 8
//! samples, 64 new tokens each (temperature 1.0, exactly 64 tokens) — next to HF
//! `generate` on the same 64 sequences in the same run (`bench_trl.py --method generate`,
//! batch 64, greedy: HF expands a prompt's samples before its prefill, and greedy is the
//! cheaper decoding for it), as a ratio.

use std::path::Path;

use align_model::backend::Cpu;
use align_model::{FusedOps, Heads, load_pretrained};
use align_rollout::{SamplingConfig, generate_groups_until};
use anyhow::{Context, Result};
use serde_json::{Value, json};

pub const PROMPTS: usize = 8;
pub const GROUP: usize = 8;
pub const PROMPT_LEN: usize = 32;
pub const NEW: usize = 64;

pub fn align_tokens_per_second<B: FusedOps>(model: &Path, reps: usize) -> Result<(f64, Vec<f64>)> {
    let device = Default::default();
    let m = load_pretrained::<B>(model, Heads::LM, &device)?.model;
    let prompts = crate::bench::synthetic_ids(PROMPTS, PROMPT_LEN, m.config.vocab_size, 2);
    let stop: Vec<u32> = m.config.eos_token_ids.clone();
    let cfg = SamplingConfig {
        temperature: 1.0,
        max_new_tokens: NEW,
        min_new_tokens: NEW,
        stop_token_ids: stop,
        seed: 0,
        ..Default::default()
    };
    let mut secs = vec![];
    for rep in 0..=reps {
        let t = std::time::Instant::now();
        let out = generate_groups_until(
            &m,
            &prompts,
            GROUP,
            0,
            &SamplingConfig { seed: rep as u64, ..cfg.clone() },
            |_, _| false,
        )?;
        let s = t.elapsed().as_secs_f64();
        anyhow::ensure!(out.len() == PROMPTS * GROUP && out.iter().all(|c| c.tokens.len() == NEW));
        if rep > 0 {
            secs.push(s);
        }
    }
    let mut sorted = secs.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(((PROMPTS * GROUP * NEW) as f64 / sorted[sorted.len() / 2], secs))
}

pub fn run(gguf: &Path, peer: Option<&crate::bench::PeerSetup>, reps: usize) -> Result<Value> {
    eprintln!("bench: align rollout ({PROMPTS} prompts x G={GROUP}, {NEW} new tokens)...");
    let (ours, secs) = align_tokens_per_second::<Cpu>(gguf, reps)?;
    let hf = match peer {
        Some(peer) => {
            eprintln!("bench: HF generate, batch {} x {NEW} new tokens...", PROMPTS * GROUP);
            let args = ["--method", "generate", "--steps", &reps.to_string(), "--warmup", "1"]
                .into_iter()
                .chain(["--batch-size", &(PROMPTS * GROUP).to_string(), "--seq-len", &PROMPT_LEN.to_string()])
                .chain(["--max-new-tokens", &NEW.to_string()])
                .map(String::from)
                .collect::<Vec<_>>();
            Some(crate::bench::bench_trl(peer, &args)?)
        }
        None => None,
    };
    let theirs = match &hf {
        Some(v) => Some(v["tokens_per_second"]["median"].as_f64().context("tokens_per_second.median")?),
        None => None,
    };
    println!("| rollout, SmolLM2-135M, CPU | align tokens/s | HF generate tokens/s | align / HF |");
    println!("|---|---|---|---|");
    let shape = format!("{PROMPTS} prompts × G={GROUP}, {PROMPT_LEN}-token prompts, {NEW} new tokens");
    match theirs {
        Some(t) => println!("| {shape} | {ours:.1} | {t:.1} | {:.2} |", ours / t),
        None => println!("| {shape} | {ours:.1} | — | — |"),
    }
    Ok(json!({"align_tokens_per_s": ours, "align_seconds": secs, "hf_tokens_per_s": theirs, "hf": hf}))
}
