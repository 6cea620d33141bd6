//! `cargo xtask bench --all`: the whole performance table in one run — inference, SFT, DPO,
//! GRPO and rollout rows, align next to the Python stack on the same shapes, with both sides'
//! peak RSS. Each align row runs in a child process of its own (`xtask bench-row`), so its
//! peak RSS is that row's alone, as each reference row is its own Python process.

use std::path::{Path, PathBuf};
use std::process::Command;

use align_model::backend::{Autodiff, DeviceKind, OnDevice};
use align_model::quant::QuantFormat;
use align_model::{BaseStorage, FusedOps, Heads, load_pretrained};
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::bench::PeerSetup;

/// One row of the table: what align runs (by `id`, in a child process) and what the reference
/// runs (`bench_trl.py` arguments), each reported as tokens/s.
pub struct Row {
    pub id: &'static str,
    pub label: &'static str,
    pub reference: &'static str,
    /// A training row (target ≥ 1.5×) rather than inference (target ≥ 1.0×).
    pub training: bool,
}

pub const ROWS: &[Row] = &[
    Row { id: "prefill", label: "prefill 8 × 128", reference: "HF forward", training: false },
    Row { id: "decode-b1", label: "decode batch 1, 64 new", reference: "HF generate", training: false },
    Row { id: "decode-b8", label: "decode batch 8, 64 new", reference: "HF generate", training: false },
    Row { id: "sft-lora", label: "SFT LoRA r=16, 8 × 256", reference: "TRL SFTTrainer", training: true },
    Row { id: "sft-full", label: "SFT full, 8 × 256", reference: "TRL SFTTrainer", training: true },
    Row { id: "sft-lora-long", label: "SFT LoRA r=16, 2 × 2048", reference: "TRL SFTTrainer", training: true },
    // QLoRA: the same step on a packed base (TRL's side is its f32-base LoRA step, as above).
    Row {
        id: "sft-lora-nf4",
        label: "SFT LoRA r=16, 8 × 256, NF4 base",
        reference: "TRL SFTTrainer (f32 base)",
        training: true,
    },
    Row {
        id: "sft-lora-gguf",
        label: "SFT LoRA r=16, 8 × 256, GGUF Q4_1 base",
        reference: "TRL SFTTrainer (f32 base)",
        training: true,
    },
    Row { id: "dpo-lora", label: "DPO LoRA, 4 pairs × ≤128", reference: "TRL DPOTrainer", training: true },
    Row { id: "dpo-lora-long", label: "DPO LoRA, 2 pairs × ≤1024", reference: "TRL DPOTrainer", training: true },
    Row {
        id: "grpo", label: "GRPO LoRA step, 2 prompts × G=4, ≤32 new", reference: "TRL GRPOTrainer", training: true
    },
    Row { id: "rollout", label: "rollout 8 prompts × G=8, 64 new", reference: "HF generate", training: false },
];

/// This process's peak resident set (VmHWM), MiB.
fn peak_rss_mib() -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .context("/proc/self/status has no VmHWM")?;
    Ok(kib / 1024.0)
}

/// Measure align's side of row `id` in this process, on `device` (a GPU backend for
/// `gpu-check`), with `model` (a GGUF file or HF directory): `{"tokens_per_s", "peak_rss_mib"}`.
pub fn align_row(device: DeviceKind, model: &Path, id: &str, reps: usize) -> Result<Value> {
    struct Row<'a> {
        model: &'a Path,
        id: &'a str,
        reps: usize,
    }
    impl OnDevice for Row<'_> {
        type Output = Result<f64>;
        fn run<B: FusedOps>(self, device: &B::Device) -> Result<f64> {
            let Row { model, id, reps } = self;
            let lm = || -> Result<_> { Ok(load_pretrained::<B>(model, Heads::LM, device)?.model) };
            type Ad<B> = Autodiff<B>;
            use crate::bench_sft::align_step_seconds as sft_step;
            use BaseStorage::Dense;
            const NF4: BaseStorage = BaseStorage::Quantize(QuantFormat::Nf4 { double_quant: true });
            Ok(match id {
                "prefill" => crate::bench::align_prefill_tps(&lm()?, 8, 128, reps),
                "decode-b1" => crate::bench::align_decode_tps(&lm()?, 1, reps),
                "decode-b8" => crate::bench::align_decode_tps(&lm()?, 8, reps),
                "sft-lora" => 8.0 * 256.0 / sft_step::<Ad<B>>(model, Dense, 16, 8, 256, reps)?,
                "sft-full" => 8.0 * 256.0 / sft_step::<Ad<B>>(model, Dense, 0, 8, 256, reps)?,
                "sft-lora-long" => 2.0 * 2048.0 / sft_step::<Ad<B>>(model, Dense, 16, 2, 2048, reps)?,
                "sft-lora-nf4" => 8.0 * 256.0 / sft_step::<Ad<B>>(model, NF4, 16, 8, 256, reps)?,
                "sft-lora-gguf" => 8.0 * 256.0 / sft_step::<Ad<B>>(model, BaseStorage::Gguf, 16, 8, 256, reps)?,
                "dpo-lora" => crate::bench_dpo::align_tokens_per_second::<Ad<B>>(model, 4, 128, reps)?,
                "dpo-lora-long" => crate::bench_dpo::align_tokens_per_second::<Ad<B>>(model, 2, 1024, reps)?,
                "grpo" => crate::bench_grpo::align_tokens_per_second::<B>(model, reps)?,
                "rollout" => crate::bench_rollout::align_tokens_per_second::<B>(model, reps)?.0,
                other => bail!("unknown bench row {other:?}"),
            })
        }
    }
    let tps = device.run(Row { model, id, reps }).map_err(anyhow::Error::msg)??;
    Ok(json!({"tokens_per_s": tps, "peak_rss_mib": peak_rss_mib()?}))
}

/// Rows whose reference run is another row's: that row's id.
fn reference_key(id: &str) -> &str {
    match id {
        "sft-lora-nf4" | "sft-lora-gguf" => "sft-lora",
        other => other,
    }
}

/// The reference side of row `id`: tokens/s and peak RSS from `bench_trl.py`.
fn reference_row(p: &PeerSetup, id: &str, reps: usize) -> Result<(f64, f64, Value)> {
    let v = match id {
        "prefill" => crate::bench::peer_generate(p, 8, 128, 1, reps)?,
        "decode-b1" => crate::bench::peer_generate(p, 1, 32, 64, reps)?,
        "decode-b8" => crate::bench::peer_generate(p, 8, 32, 64, reps)?,
        "sft-lora" | "sft-lora-nf4" | "sft-lora-gguf" => crate::bench_sft::trl_sft(p, 16, 8, 256, reps)?,
        "sft-full" => crate::bench_sft::trl_sft(p, 0, 8, 256, reps)?,
        "sft-lora-long" => crate::bench_sft::trl_sft(p, 16, 2, 2048, reps)?,
        "dpo-lora" => crate::bench_dpo::trl_dpo(p, 4, 128, reps)?,
        "dpo-lora-long" => crate::bench_dpo::trl_dpo(p, 2, 1024, reps)?,
        "grpo" => crate::bench_grpo::trl(p, reps)?,
        "rollout" => crate::bench::peer_generate(
            p,
            crate::bench_rollout::PROMPTS * crate::bench_rollout::GROUP,
            crate::bench_rollout::PROMPT_LEN,
            crate::bench_rollout::NEW,
            reps,
        )?,
        other => bail!("unknown bench row {other:?}"),
    };
    let tps = if id == "prefill" {
        // One new token after a 128-token prompt: the call is the prefill.
        8.0 * 128.0 / v["step_seconds"]["median"].as_f64().context("step_seconds.median")?
    } else {
        v["tokens_per_second"]["median"].as_f64().context("tokens_per_second.median")?
    };
    let rss = v["peak_rss_mib"].as_f64().context("peak_rss_mib")?;
    Ok((tps, rss, v))
}

/// Run align's side of `id` in a child process (`xtask bench-row`) and read its JSON; on
/// `device`, with `model` (default: the fetched SmolLM2).
pub fn align_row_in_child(id: &str, reps: usize, device: DeviceKind, model: Option<&Path>) -> Result<Value> {
    let out = std::env::temp_dir().join(format!("align-bench-row-{}-{id}.json", std::process::id()));
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(["bench-row", id, "--reps", &reps.to_string(), "--device", device.name(), "--json-out"]).arg(&out);
    if let Some(m) = model {
        cmd.arg("--model").arg(m);
    }
    let status = cmd.status().context("running xtask bench-row")?;
    if !status.success() {
        bail!("xtask bench-row {id} failed ({status})");
    }
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
    std::fs::remove_file(&out).ok();
    Ok(v)
}

/// Every row, align then the reference back to back; prints the markdown table and returns
/// the report for `target/bench/all.json`.
pub fn run(peer: Option<&PeerSetup>, reps: usize, only: &[String]) -> Result<Value> {
    if let Some(unknown) = only.iter().find(|o| !ROWS.iter().any(|r| r.id == o.as_str())) {
        let ids: Vec<&str> = ROWS.iter().map(|r| r.id).collect();
        bail!("--row {unknown:?}: no such row (rows: {})", ids.join(", "));
    }
    let mut rows = vec![];
    // Rows that share a reference run (the QLoRA rows and sft-lora) measure it once.
    let mut references: std::collections::BTreeMap<&str, (f64, f64, Value)> = Default::default();
    let mut table = vec![
        "| row (SmolLM2-135M, f32, CPU) | align tok/s | reference | reference tok/s | ratio | align peak RSS MiB | reference peak RSS MiB | RSS ratio |".to_string(),
        "|---|---|---|---|---|---|---|---|".to_string(),
    ];
    for row in ROWS.iter().filter(|r| only.is_empty() || only.iter().any(|o| o == r.id)) {
        eprintln!("bench --all: {} (align)...", row.label);
        let ours = align_row_in_child(row.id, reps, DeviceKind::Cpu, None)?;
        let field = |k: &str| ours[k].as_f64().with_context(|| format!("xtask bench-row {}: no {k}", row.id));
        let (tps, rss) = (field("tokens_per_s")?, field("peak_rss_mib")?);
        let shared = reference_key(row.id);
        let theirs = match (peer, references.get(shared)) {
            (Some(_), Some(done)) => Some(done.clone()),
            (Some(p), None) => {
                eprintln!("bench --all: {} ({})...", row.label, row.reference);
                let measured = reference_row(p, row.id, reps)?;
                references.insert(shared, measured.clone());
                Some(measured)
            }
            (None, _) => None,
        };
        let line = match &theirs {
            Some((t, r, _)) => format!(
                "| {} | {tps:.1} | {} | {t:.1} | {:.2} | {rss:.0} | {r:.0} | {:.2} |",
                row.label,
                row.reference,
                tps / t,
                rss / r
            ),
            None => format!("| {} | {tps:.1} | {} | — | — | {rss:.0} | — | — |", row.label, row.reference),
        };
        println!("{line}");
        table.push(line);
        rows.push(json!({
            "id": row.id, "label": row.label, "training": row.training, "reference": row.reference,
            "align_tokens_per_s": tps, "align_peak_rss_mib": rss,
            "reference_tokens_per_s": theirs.as_ref().map(|t| t.0),
            "reference_peak_rss_mib": theirs.as_ref().map(|t| t.1),
            "ratio": theirs.as_ref().map(|t| tps / t.0),
            "rss_ratio": theirs.as_ref().map(|t| rss / t.1),
            "reference_report": theirs.map(|t| t.2),
        }));
    }
    println!("{}", table.join("\n"));
    let precision = match peer {
        Some(p) if p.reference_f32 => {
            "TRL trainers in f32 (bf16=False via xtask/scripts/trl_f32.py), other defaults kept"
        }
        Some(_) => "TRL's defaults (bf16=True autocast, gradient_checkpointing=True); HF forward/generate in f32",
        None => "none",
    };
    Ok(json!({"reps": reps, "reference_precision": precision, "rows": rows, "table": table.join("\n")}))
}

/// The HF checkpoint the reference side loads, made from the GGUF with transformers if absent.
pub fn ensure_hf_dir(python: &Path, peer: &Path, gguf: &Path, hf_dir: PathBuf) -> Result<PathBuf> {
    if !hf_dir.join("config.json").exists() {
        eprintln!("bench: converting the GGUF to an HF checkpoint with transformers...");
        let ok = Command::new(python)
            .arg("xtask/scripts/smollm2_reference.py")
            .arg("--gguf")
            .arg(gguf)
            .arg("--peer")
            .arg(peer)
            .arg("--hf-out")
            .arg(&hf_dir)
            .status()?
            .success();
        if !ok {
            bail!("xtask/scripts/smollm2_reference.py failed");
        }
    }
    Ok(hf_dir)
}
