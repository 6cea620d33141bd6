//! `cargo xtask bench`: SmolLM2-135M throughput on this machine, next to the Python stack's
//! on the same shapes in the same run, reported as ratios (these machines are shared and
//! noisy: only a ratio taken back to back means anything).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use align_model::burn::tensor::{Int, Tensor, TensorData};
use align_model::{AutodiffFusedOps, FusedOps};
use align_model::{Heads, TokenBatch, Transformer, load_pretrained};
use align_rollout::{SamplingConfig, generate};
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 { xs[n / 2] } else { (xs[n / 2 - 1] + xs[n / 2]) / 2.0 }
}

/// Time `f` `reps` times after one warm-up; median seconds.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// Deterministic pseudo-random ordinary token ids (no special tokens).
pub fn synthetic_ids(n: usize, len: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = align_rollout::Rng::new(seed);
    (0..n).map(|_| (0..len).map(|_| 100 + (rng.next_u64() % (vocab as u64 - 200)) as u32).collect()).collect()
}

pub struct Figures {
    pub prefill_tps: f64,
    pub decode_b1_tps: f64,
    pub decode_b8_tps: f64,
}

/// align's inference figures on backend `B`.
pub fn align_inference<B: FusedOps>(model: &Transformer<B>, reps: usize) -> Figures {
    Figures {
        prefill_tps: align_prefill_tps(model, 8, 128, reps),
        decode_b1_tps: align_decode_tps(model, 1, reps),
        decode_b8_tps: align_decode_tps(model, 8, reps),
    }
}

/// Prefill tokens/s of `batch` prompts of `len` tokens: the forward, and the logits of the
/// last position only, as `generate` reads them after a prefill.
pub fn align_prefill_tps<B: FusedOps>(model: &Transformer<B>, batch: usize, len: usize, reps: usize) -> f64 {
    let device = model.embed_tokens.val().device();
    let prefill = synthetic_ids(batch, len, model.config.vocab_size, 1);
    let tokens = TokenBatch::<B>::right_padded(&prefill, 0, &device);
    let s = time(reps, || {
        let h = model.forward_hidden(&tokens, None);
        let _ = model.logits(h.narrow(1, len - 1, 1)).into_data();
    });
    (batch * len) as f64 / s
}

/// Greedy decode tokens/s: `batch` 32-token prompts, exactly 64 new tokens each.
pub fn align_decode_tps<B: FusedOps>(model: &Transformer<B>, batch: usize, reps: usize) -> f64 {
    let cfg = SamplingConfig { temperature: 0.0, max_new_tokens: 64, ..Default::default() };
    let prompts = synthetic_ids(batch, 32, model.config.vocab_size, 2);
    let s = time(reps, || {
        let out = generate(model, &prompts, 0, &cfg).expect("synthetic prompts fit the model");
        assert!(out.iter().all(|c| c.tokens.len() == 64));
    });
    (batch * 64) as f64 / s
}

/// One forward + backward step of next-token cross-entropy, tokens/s.
pub fn train_step_tps<B: AutodiffFusedOps>(gguf: &Path, batch: usize, len: usize, reps: usize) -> Result<f64> {
    let device = Default::default();
    let m = load_pretrained::<B>(gguf, Heads::LM, &device)?.model;
    let ids = synthetic_ids(batch, len + 1, m.config.vocab_size, 3);
    let inputs: Vec<Vec<u32>> = ids.iter().map(|s| s[..len].to_vec()).collect();
    let targets: Vec<i64> = ids.iter().flat_map(|s| s[1..].iter().map(|&t| t as i64)).collect();
    let tb = TokenBatch::<B>::right_padded(&inputs, 0, &device);
    let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [batch, len]), &device);
    let s = time(reps, || {
        let logits = m.forward(&tb);
        let loss = align_losses::token_logprobs(logits, targets.clone(), 1.0).mean().neg();
        let grads = loss.backward();
        drop(grads);
    });
    Ok((batch * len) as f64 / s)
}

/// Run `../shared/peer/bench_trl.py` with `args` (after `--model DIR`); returns its JSON.
pub fn bench_trl(p: &PeerSetup, args: &[String]) -> Result<Value> {
    let out = std::env::temp_dir().join(format!("align-bench-trl-{}-{}.json", std::process::id(), args.join("_")));
    let mut cmd = Command::new(&p.python);
    if p.reference_f32 {
        // Our wrapper: TRL's configs with bf16 (autocast) off, then the harness unchanged.
        cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/trl_f32.py"));
    }
    let status = cmd
        .arg(p.peer.join("bench_trl.py"))
        .arg("--model")
        .arg(&p.hf_dir)
        .args(args)
        .arg("--json-out")
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("running {}", p.python.display()))?;
    if !status.success() {
        bail!("bench_trl.py {} failed ({status})", args.join(" "));
    }
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
    std::fs::remove_file(&out).ok();
    Ok(v)
}

/// `bench_trl.py --method generate` with the given shape.
pub fn peer_generate(p: &PeerSetup, batch: usize, prompt: usize, new: usize, steps: usize) -> Result<Value> {
    let args =
        ["--method", "generate", "--steps", &steps.to_string(), "--warmup", "1", "--batch-size", &batch.to_string()]
            .into_iter()
            .chain(["--seq-len", &prompt.to_string(), "--max-new-tokens", &new.to_string()])
            .map(String::from)
            .collect::<Vec<_>>();
    bench_trl(p, &args)
}

/// The reference side: the harness's Python, its directory, the HF checkpoint it loads,
/// and whether TRL's trainers run in f32 (`--reference-f32`) instead of their bf16 default.
pub struct PeerSetup {
    pub python: PathBuf,
    pub peer: PathBuf,
    pub hf_dir: PathBuf,
    pub reference_f32: bool,
}

pub fn run_inference_bench<B: FusedOps>(gguf: &Path, peer: Option<&PeerSetup>, reps: usize) -> Result<Value> {
    let device = Default::default();
    let m = load_pretrained::<B>(gguf, Heads::LM, &device)?.model;
    eprintln!("bench: align (prefill 8x128, decode 1x64 and 8x64 after 32-token prompts)...");
    let ours = align_inference(&m, reps);
    let mut report = json!({
        "model": gguf.display().to_string(),
        "align": {"prefill_8x128_tokens_per_s": ours.prefill_tps, "decode_b1_tokens_per_s": ours.decode_b1_tps,
                   "decode_b8_tokens_per_s": ours.decode_b8_tps},
    });
    println!("| figure (SmolLM2-135M, CPU) | align | HF transformers | align / HF |");
    println!("|---|---|---|---|");
    let row = |name: &str, ours: f64, theirs: Option<f64>| match theirs {
        Some(t) => println!("| {name} | {ours:.1} | {t:.1} | {:.2} |", ours / t),
        None => println!("| {name} | {ours:.1} | — | — |"),
    };
    match peer {
        Some(p) => {
            eprintln!("bench: HF generate through bench_trl.py on the same shapes...");
            // Prefill: one new token after a 128-token prompt; the call is dominated by the prefill.
            let pre = peer_generate(p, 8, 128, 1, reps)?;
            let pre_tps = 8.0 * 128.0 / pre["step_seconds"]["median"].as_f64().context("step_seconds.median")?;
            let b1 = peer_generate(p, 1, 32, 64, reps)?;
            let b8 = peer_generate(p, 8, 32, 64, reps)?;
            let tps = |v: &Value| v["tokens_per_second"]["median"].as_f64().context("tokens_per_second.median");
            let (b1, b8) = (tps(&b1)?, tps(&b8)?);
            row("prefill tokens/s (8 x 128)", ours.prefill_tps, Some(pre_tps));
            row("decode tokens/s (batch 1, 64 new)", ours.decode_b1_tps, Some(b1));
            row("decode tokens/s (batch 8, 64 new)", ours.decode_b8_tps, Some(b8));
            report["hf"] = json!({"prefill_8x128_tokens_per_s": pre_tps, "decode_b1_tokens_per_s": b1, "decode_b8_tokens_per_s": b8,
                                  "source": "bench_trl.py --method generate"});
        }
        None => {
            row("prefill tokens/s (8 x 128)", ours.prefill_tps, None);
            row("decode tokens/s (batch 1, 64 new)", ours.decode_b1_tps, None);
            row("decode tokens/s (batch 8, 64 new)", ours.decode_b8_tps, None);
            eprintln!("bench: no --python given: HF baseline skipped (ratios need it)");
        }
    }
    Ok(report)
}
