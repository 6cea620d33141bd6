//! `cargo xtask gpu-check`: everything a CUDA machine without registry access needs to
//! exercise align's GPU path, in one folder that fits what the project's lent device
//! carries (64 MiB), and `gpu-run`, the run itself, which writes one JSON report.
//!
//! `gpu-check` builds, with `--features cuda` in the release profile, the `align` and
//! `xtask` binaries and the three GPU test binaries (model parity, the fused ops, one step
//! of each stage against the CPU), compresses them next to SmolLM2-135M's config and
//! tokenizer into `target/gpu-check/`, and writes `run.sh` there. On the GPU machine, from
//! the repository root, `bash target/gpu-check/run.sh` runs:
//! - the test binaries' GPU tests (`::cuda`), with their figures;
//! - throughput rows of `bench --all` on a randomly initialised SmolLM2-135M (the weights
//!   are values, not shapes: throughput does not depend on them, and the 98 MB GGUF does not
//!   fit the carry), each with its peak device memory and MFU;
//! - a short full SFT run in bf16 and in f32, loss by loss.
//!
//! `--backend wgpu` builds the same folder for `--device wgpu`, so the whole flow can be
//! tried on a Vulkan driver (lavapipe) before a GPU is lent. docs/backends.md describes the
//! report.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use align_model::backend::{Cpu, DeviceKind, OnDevice};
use align_model::weights::write_atomic;
use align_model::{Architecture, FusedOps, Heads, HfHead, ModelConfig, Tokenizer, init_random, load_pretrained};
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// What the device tool carries with the working tree.
const CARRY_LIMIT: u64 = 64 << 20;

/// The test binaries (cargo test target, package) whose GPU tests run.
const TESTS: &[(&str, &str)] = &[("parity", "align-model"), ("fused", "align-kernels"), ("stages", "align-pipeline")];

/// The throughput rows run on the GPU (ids of `bench --all`).
const ROWS: &[&str] = &["prefill", "decode-b8", "rollout", "sft-lora", "sft-full", "sft-lora-long", "dpo-lora", "grpo"];

#[derive(clap::Args)]
pub struct PrepareArgs {
    /// The backend to build for: cuda, or wgpu to try the folder on a Vulkan driver here
    #[arg(long, default_value = "cuda", value_parser = ["cuda", "wgpu"])]
    backend: String,
    /// Cargo profile of the binaries
    #[arg(long, default_value = "release")]
    profile: String,
    /// The folder to write (carry it to the GPU machine)
    #[arg(long, default_value = "target/gpu-check")]
    out: PathBuf,
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// The backend the binaries were built for
    #[arg(long)]
    device: DeviceKind,
    /// The folder the binaries were unpacked into
    #[arg(long)]
    bin: PathBuf,
    /// The gpu-check folder (SmolLM2-135M's config and tokenizer, manifest.json)
    #[arg(long)]
    bundle: PathBuf,
    /// The repository root (the tests read its fixtures/)
    #[arg(long)]
    repo: PathBuf,
    /// The JSON report, rewritten after every part, so a run cut short keeps what it measured
    #[arg(long)]
    out: PathBuf,
    /// Only these parts (tests, throughput, bf16); repeatable. Default: all
    #[arg(long = "only")]
    only: Vec<String>,
    /// Only these test binaries (parity, fused, stages); repeatable. Default: all
    #[arg(long = "test")]
    tests: Vec<String>,
    /// Only these throughput rows; repeatable. Default: prefill, decode-b8, rollout,
    /// sft-lora, sft-full, sft-lora-long, dpo-lora, grpo
    #[arg(long = "row")]
    rows: Vec<String>,
    /// Timed repetitions of each throughput row, after one warm-up
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Steps of the bf16-against-f32 SFT runs
    #[arg(long, default_value_t = 10)]
    bf16_steps: usize,
    /// Throughput on this model (GGUF or HF directory) instead of the random SmolLM2-135M
    #[arg(long)]
    model: Option<PathBuf>,
    /// The device's dense bf16 peak, TFLOP/s, where the built-in table lacks it
    #[arg(long)]
    peak_bf16_tflops: Option<f64>,
    /// The device's fp32 (non-tensor-core) peak, TFLOP/s, where the built-in table lacks it
    #[arg(long)]
    peak_fp32_tflops: Option<f64>,
}

// ---------------------------------------------------------------------------------------
// Preparing the folder (this machine)
// ---------------------------------------------------------------------------------------

pub fn prepare(a: &PrepareArgs) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let features = format!("align-pipeline/{b},xtask/{b}", b = a.backend);
    if a.out.exists() {
        std::fs::remove_dir_all(&a.out).with_context(|| format!("clearing {}", a.out.display()))?;
    }
    let bin_dir = a.out.join("bin");
    std::fs::create_dir_all(&bin_dir).with_context(|| bin_dir.display().to_string())?;

    eprintln!("gpu-check: SmolLM2-135M's config and tokenizer");
    let gguf = crate::fetch::smollm2()?;
    let smollm2 = load_pretrained::<Cpu>(&gguf, Heads::LM, &Default::default())?;
    let shape_dir = a.out.join("smollm2-135m");
    std::fs::create_dir_all(&shape_dir)?;
    let config = serde_json::to_string_pretty(&smollm2.model.config.to_hf_json(HfHead::CausalLm))?;
    write_atomic(&shape_dir.join("config.json"), config.as_bytes())?;
    smollm2.tokenizer.save(&shape_dir)?;

    eprintln!("gpu-check: building align and xtask ({}, --features {features})", a.profile);
    // A CUDA build leaves out xtask's default wgpu (it would double each binary); a wgpu build
    // keeps the default feature set, so it reuses the test suite's build.
    let only = if a.backend == "cuda" { &["--no-default-features"][..] } else { &[] };
    let build = [&["build", "--profile", &a.profile, "--workspace", "--bins"][..], only].concat();
    let mut built = cargo_executables(&cargo, &build, &features)?;
    built.retain(|(name, _)| name == "align" || name == "xtask");
    eprintln!("gpu-check: building the test binaries");
    let mut test_args = [&["test", "--no-run", "--profile", &a.profile, "--workspace"][..], only].concat();
    for (test, _) in TESTS {
        test_args.extend(["--test", test]);
    }
    built.extend(cargo_executables(&cargo, &test_args, &features)?);
    built.sort();
    built.dedup_by(|x, y| x.0 == y.0);
    for want in ["align", "xtask"].iter().chain(TESTS.iter().map(|(t, _)| t)) {
        if !built.iter().any(|(n, _)| n == want) {
            bail!("cargo built no `{want}` executable");
        }
    }

    let mut binaries = serde_json::Map::new();
    for (name, exe) in &built {
        let stripped = a.out.join(name);
        strip(exe, &stripped)?;
        let packed = bin_dir.join(format!("{name}.xz"));
        let raw = std::fs::metadata(&stripped)?.len();
        xz(&stripped, &packed)?;
        std::fs::remove_file(&stripped)?;
        let size = std::fs::metadata(&packed)?.len();
        eprintln!("gpu-check: {name}: {:.1} MiB stripped, {:.1} MiB compressed", mib(raw), mib(size));
        binaries.insert(name.clone(), json!({"stripped_bytes": raw, "compressed_bytes": size}));
    }
    let manifest = json!({
        "backend": a.backend,
        "profile": a.profile,
        "features": features,
        "commit": git(&["rev-parse", "HEAD"]),
        "uncommitted_changes": git(&["status", "--porcelain"]).is_some_and(|s| !s.is_empty()),
        "binaries": binaries,
    });
    write_atomic(&a.out.join("manifest.json"), serde_json::to_string_pretty(&manifest)?.as_bytes())?;
    let script = RUN_SH.replace("{backend}", &a.backend);
    let run_sh = a.out.join("run.sh");
    write_atomic(&run_sh, script.as_bytes())?;

    let total = folder_bytes(&a.out)?;
    eprintln!("gpu-check: {} holds {:.1} MiB", a.out.display(), mib(total));
    if total > CARRY_LIMIT {
        bail!(
            "{} holds {:.1} MiB, more than the {:.0} MiB a device run carries (sizes in manifest.json)",
            a.out.display(),
            mib(total),
            mib(CARRY_LIMIT)
        );
    }
    println!("On the GPU machine, from the repository root (carry {}):", a.out.display());
    println!("    bash {}", run_sh.display());
    println!("It writes $OUT/gpu-report.json ({} without $OUT).", a.out.join("gpu-report.json").display());
    Ok(())
}

/// The runner: unpacks the binaries and starts `xtask gpu-run`.
const RUN_SH: &str = r#"#!/usr/bin/env bash
# Written by `cargo xtask gpu-check`. Run from the repository root on the GPU machine:
#   bash target/gpu-check/run.sh [--only tests|throughput|bf16] [--test NAME] [--row ID] [--reps N]
# The report goes to $OUT/gpu-report.json, or next to this script without $OUT.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="${ALIGN_REPO_ROOT:-$PWD}"
[ -d "$repo/fixtures/models" ] || { echo "run.sh: run it from the repository root (no fixtures/models in $repo)" >&2; exit 2; }
command -v xz >/dev/null || { echo "run.sh: xz (xz-utils) is needed to unpack the binaries" >&2; exit 2; }
bin="$(mktemp -d)"
for f in "$here"/bin/*.xz; do
    name="$(basename "$f" .xz)"
    xz -dc "$f" > "$bin/$name"
    chmod +x "$bin/$name"
done
exec "$bin/xtask" gpu-run --device {backend} --bin "$bin" --bundle "$here" --repo "$repo" \
    --out "${OUT:-$here}/gpu-report.json" "$@"
"#;

/// Runs `cargo ARGS --features FEATURES` and returns the executables it built, by target name.
fn cargo_executables(cargo: &str, args: &[&str], features: &str) -> Result<Vec<(String, PathBuf)>> {
    let out = Command::new(cargo)
        .args(args)
        .args(["--features", features, "--message-format=json-render-diagnostics"])
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {cargo}"))?;
    if !out.status.success() {
        bail!("cargo {} --features {features} failed ({})", args.join(" "), out.status);
    }
    let mut found = vec![];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
        if v["reason"] == "compiler-artifact"
            && let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str())
        {
            found.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    Ok(found)
}

/// Debug information off (the release profile strips already; the dev profile keeps line tables).
fn strip(from: &Path, to: &Path) -> Result<()> {
    let status = Command::new("strip").arg("-o").arg(to).arg(from).status().context("running strip (binutils)")?;
    if !status.success() {
        bail!("strip {} failed ({status})", from.display());
    }
    Ok(())
}

/// xz, not gzip: the binaries compress to about 1/6 against gzip's 1/4, which decides whether
/// five of them fit the carry.
fn xz(from: &Path, to: &Path) -> Result<()> {
    let file = std::fs::File::create(to).with_context(|| to.display().to_string())?;
    let status = Command::new("xz")
        .args(["-9", "-T2", "-c"])
        .arg(from)
        .stdout(file)
        .status()
        .context("running xz (xz-utils)")?;
    if !status.success() {
        bail!("xz {} failed ({status})", from.display());
    }
    Ok(())
}

fn folder_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let meta = e.metadata()?;
        total += if meta.is_dir() { folder_bytes(&e.path())? } else { meta.len() };
    }
    Ok(total)
}

fn git(args: &[&str]) -> Option<String> {
    let o = Command::new("git").args(args).output().ok()?;
    o.status.success().then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

// ---------------------------------------------------------------------------------------
// The run (the GPU machine)
// ---------------------------------------------------------------------------------------

pub fn run(a: &RunArgs) -> Result<()> {
    let started = Instant::now();
    let want = |part: &str| a.only.is_empty() || a.only.iter().any(|p| p == part);
    let progress = |what: &str| eprintln!("gpu-run [{:>4.0} s] {what}", started.elapsed().as_secs_f64());
    let manifest: Value = std::fs::read_to_string(a.bundle.join("manifest.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let gpu = gpu_info();
    let mut report = json!({"backend": a.device.name(), "device": gpu, "build": manifest});
    let save = |report: &Value| -> Result<()> {
        write_atomic(&a.out, serde_json::to_string_pretty(report)?.as_bytes()).context("writing the report")
    };
    progress(&format!("opening the {} device", a.device.name()));
    if let Err(e) = a.device.check() {
        report["error"] = json!(e);
        save(&report)?;
        bail!("{e}");
    }
    save(&report)?;

    if want("tests") {
        for (test, _) in TESTS.iter().filter(|(t, _)| a.tests.is_empty() || a.tests.iter().any(|x| x == t)) {
            progress(&format!("{test}: the ::{} tests", a.device.name()));
            report["tests"][test] = run_test_binary(a, test);
            save(&report)?;
        }
    }

    let model = match &a.model {
        Some(m) => m.clone(),
        None if want("throughput") || want("bf16") => {
            progress("SmolLM2-135M with random weights");
            random_model(&a.bundle.join("smollm2-135m"), &std::env::temp_dir().join("align-gpu-check-smollm2"))?
        }
        None => PathBuf::new(),
    };
    if want("throughput") {
        let config = load_config(&model)?;
        let peaks = peaks(gpu["name"].as_str().unwrap_or(""), a.peak_bf16_tflops, a.peak_fp32_tflops);
        report["peak_tflops"] = json!({"bf16_dense": peaks.0, "fp32": peaks.1});
        report["throughput_model"] = json!(if a.model.is_some() {
            model.display().to_string()
        } else {
            "SmolLM2-135M shape, random weights".into()
        });
        let rows: Vec<&str> =
            if a.rows.is_empty() { ROWS.to_vec() } else { a.rows.iter().map(String::as_str).collect() };
        for id in rows {
            progress(&format!("throughput: {id}"));
            let memory = MemorySampler::start();
            let measured = crate::bench_all::align_row_in_child(id, a.reps, a.device, Some(&model));
            let memory = memory.map(MemorySampler::stop).unwrap_or(Value::Null);
            report["throughput"][id] = match measured {
                Ok(v) => {
                    let tps = v["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
                    let flops = flops_per_token(&config, id).map(|f| f * tps);
                    json!({
                        "tokens_per_s": tps,
                        "model_tflops_per_s": flops.map(|f| f / 1e12),
                        "mfu_vs_fp32_peak": flops.zip(peaks.1).map(|(f, p)| f / (p * 1e12)),
                        "mfu_vs_bf16_peak": flops.zip(peaks.0).map(|(f, p)| f / (p * 1e12)),
                        "host_peak_rss_mib": v["peak_rss_mib"],
                        "device_memory": memory,
                    })
                }
                Err(e) => json!({"error": format!("{e:#}"), "device_memory": memory}),
            };
            save(&report)?;
        }
    }

    if want("bf16") {
        progress(&format!("bf16 against f32: {} SFT steps each", a.bf16_steps));
        report["bf16_vs_f32"] = match a.device.run(Bf16Comparison { model: &model, repo: &a.repo, steps: a.bf16_steps })
        {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => json!({"error": format!("{e:#}")}),
            Err(e) => json!({"error": e}),
        };
        save(&report)?;
    }
    report["seconds"] = json!(started.elapsed().as_secs_f64());
    save(&report)?;
    progress(&format!("report: {}", a.out.display()));
    let failed = report["tests"].as_object().is_some_and(|t| t.values().any(|r| r["status"] != 0));
    if failed {
        bail!("some GPU tests failed (their output is in {})", a.out.display());
    }
    Ok(())
}

/// Runs one test binary's tests for this backend, one at a time, and collects the names
/// that passed or failed and the JSON lines the tests print (their figures).
fn run_test_binary(a: &RunArgs, test: &str) -> Value {
    let t = Instant::now();
    let out = Command::new(a.bin.join(test))
        .args([&format!("::{}", a.device.name()), "--test-threads=1", "--nocapture"])
        .env("ALIGN_REPO_ROOT", &a.repo)
        .env("ALIGN_BIN", a.bin.join("align"))
        .output();
    let o = match out {
        Ok(o) => o,
        Err(e) => return json!({"error": format!("running {}: {e}", a.bin.join(test).display())}),
    };
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let (mut passed, mut failed, mut figures) = (vec![], vec![], vec![]);
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("test ") {
            if let Some(name) = rest.strip_suffix(" ... ok") {
                passed.push(name.to_string());
            } else if let Some(name) = rest.strip_suffix(" ... FAILED") {
                failed.push(name.to_string());
            }
        } else if line.starts_with('{')
            && let Ok(v) = serde_json::from_str::<Value>(line)
        {
            figures.push(v);
        }
    }
    let tail: String = if o.status.success() {
        String::new()
    } else {
        text.chars().rev().take(6000).collect::<Vec<_>>().into_iter().rev().collect()
    };
    json!({
        "status": o.status.code(),
        "seconds": t.elapsed().as_secs_f64(),
        "passed": passed,
        "failed": failed,
        "figures": figures,
        "output_tail": tail,
    })
}

/// A model of `shape_dir`'s config with random weights, written as an HF checkpoint.
fn random_model(shape_dir: &Path, dir: &Path) -> Result<PathBuf> {
    let config = ModelConfig::from_file(&shape_dir.join("config.json"))?;
    let tokenizer = Tokenizer::from_dir(shape_dir)?;
    let model = init_random::<Cpu>(&config, Heads::LM, 0.02, 0, &Default::default())?;
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    align_model::save_pretrained(&model, Some(&tokenizer), HfHead::CausalLm, dir)?;
    Ok(dir.to_path_buf())
}

fn load_config(model: &Path) -> Result<ModelConfig> {
    if model.is_dir() {
        Ok(ModelConfig::from_file(&model.join("config.json"))?)
    } else {
        Ok(load_pretrained::<Cpu>(model, Heads::LM, &Default::default())?.model.config)
    }
}

/// The device's name, memory and driver from `nvidia-smi` (null fields without it).
fn gpu_info() -> Value {
    let q = Command::new("nvidia-smi")
        .args(["--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits", "-i", "0"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match q {
        Some(line) => {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            json!({"name": f.first(), "memory_mib": f.get(1).and_then(|m| m.parse::<u64>().ok()), "driver": f.get(2)})
        }
        None => json!({"name": null, "note": "no nvidia-smi"}),
    }
}

/// Dense peaks (bf16 tensor cores, fp32 CUDA cores) in TFLOP/s by product name, from
/// NVIDIA's data sheets (without sparsity); the first name contained in the device's wins.
const PEAKS: &[(&str, f64, f64)] = &[
    ("H200", 989.4, 66.9),
    ("H100 PCIe", 756.5, 51.2),
    ("H100 NVL", 835.5, 59.8),
    ("H100", 989.4, 66.9),
    ("A100", 312.0, 19.5),
    ("L40S", 362.1, 91.6),
    ("L4", 121.0, 30.3),
    ("A10", 125.0, 31.2),
    ("RTX 4090", 165.2, 82.6),
];

fn peaks(name: &str, bf16: Option<f64>, fp32: Option<f64>) -> (Option<f64>, Option<f64>) {
    let known = PEAKS.iter().find(|(n, _, _)| name.contains(n));
    (bf16.or(known.map(|k| k.1)), fp32.or(known.map(|k| k.2)))
}

/// Model FLOPs per token of a throughput row (PaLM's accounting, appendix B: matmuls only,
/// attention over the full length, recomputation not counted). N = the weights of every
/// matmul (all linears and the LM head; embedding lookups are not FLOPs). A forward is
/// 2N + 4·L·(heads·head_dim)·T per token; a full training step 6N + 12·L·(…)·T; a LoRA step
/// 4N + 12·L·(…)·T (frozen weights take no weight gradient). GRPO mixes sampling and
/// training in one timed step: no figure.
fn flops_per_token(c: &ModelConfig, row: &str) -> Option<f64> {
    let (d, l, v) = (c.hidden_size as f64, c.num_hidden_layers as f64, c.vocab_size as f64);
    let q = (c.num_attention_heads * c.head_dim) as f64;
    let kv = (c.num_key_value_heads * c.head_dim) as f64;
    let mlp = if c.architecture == Architecture::Gpt2 { 2.0 } else { 3.0 };
    let n = l * (d * q + 2.0 * d * kv + q * d + mlp * d * c.intermediate_size as f64) + d * v;
    let attn = |t: f64| 4.0 * l * q * t;
    Some(match row {
        "prefill" => 2.0 * n + attn(128.0),
        // Generated tokens see 32 prompt tokens and on average half of the 64 new ones.
        "decode-b1" | "decode-b8" | "rollout" => 2.0 * n + attn(64.0),
        "sft-full" => 6.0 * n + 3.0 * attn(256.0),
        "sft-lora" => 4.0 * n + 3.0 * attn(256.0),
        "sft-lora-long" => 4.0 * n + 3.0 * attn(2048.0),
        // The policy's LoRA step and the reference's forward, on every token.
        "dpo-lora" => 6.0 * n + 4.0 * attn(128.0),
        "dpo-lora-long" => 6.0 * n + 4.0 * attn(1024.0),
        _ => return None,
    })
}

/// Device memory in use, sampled every 100 ms by `nvidia-smi` while a row runs.
struct MemorySampler {
    child: Child,
    reader: std::thread::JoinHandle<()>,
    peak: Arc<AtomicU64>,
    before: u64,
}

impl MemorySampler {
    fn used_mib() -> Option<u64> {
        let o = Command::new("nvidia-smi")
            .args(["--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&o.stdout).trim().parse().ok()
    }

    /// None where `nvidia-smi` is absent (wgpu).
    fn start() -> Option<Self> {
        let before = Self::used_mib()?;
        let mut child = Command::new("nvidia-smi")
            .args(["--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0", "-lms", "100"])
            .stdout(Stdio::piped())
            .spawn()
            .ok()?;
        let stdout = child.stdout.take()?;
        let peak = Arc::new(AtomicU64::new(before));
        let seen = peak.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(std::io::Result::ok) {
                if let Ok(v) = line.trim().parse::<u64>() {
                    seen.fetch_max(v, Ordering::Relaxed);
                }
            }
        });
        Some(Self { child, reader, peak, before })
    }

    fn stop(mut self) -> Value {
        self.child.kill().ok();
        self.child.wait().ok();
        self.reader.join().ok();
        let peak = self.peak.load(Ordering::Relaxed);
        json!({"peak_mib": peak, "before_mib": self.before, "peak_above_before_mib": peak - self.before})
    }
}

/// A short full SFT run on GSM8K rows, once with `bf16 = true` (bf16 weights and
/// activations, f32 master weights) and once in f32, same seed: the losses step by step.
struct Bf16Comparison<'a> {
    model: &'a Path,
    repo: &'a Path,
    steps: usize,
}

impl OnDevice for Bf16Comparison<'_> {
    type Output = Result<Value>;
    fn run<B: FusedOps>(self, device: &B::Device) -> Result<Value> {
        let dir = std::env::temp_dir().join(format!("align-gpu-check-bf16-{}", std::process::id()));
        let mut runs = serde_json::Map::new();
        let mut losses: Vec<Vec<f64>> = vec![];
        for bf16 in [false, true] {
            let out = dir.join(if bf16 { "bf16" } else { "f32" });
            let config = format!(
                r#"output_dir = {out:?}
[model]
path = {model:?}
[data]
path = {data:?}
adapter = "gsm8k_sft"
[tokenize]
max_length = 256
[training]
per_device_train_batch_size = 8
max_steps = {steps}
learning_rate = 1e-4
logging_steps = 1
save_steps = 0
seed = 0
bf16 = {bf16}
"#,
                model = self.model.display().to_string(),
                data = self.repo.join("fixtures/data/gsm8k_train_head.jsonl").display().to_string(),
                steps = self.steps,
            );
            let cfg: align_pipeline::sft::SftConfig =
                toml::from_str(&config).context("the bf16 comparison's config")?;
            let t = Instant::now();
            align_pipeline::sft::run_sft::<B>(&cfg, false, device)?;
            let seconds = t.elapsed().as_secs_f64();
            let mut l = vec![];
            let mut tps = vec![];
            for line in std::fs::read_to_string(out.join("metrics.jsonl"))?.lines().filter(|l| !l.trim().is_empty()) {
                let v: Value = serde_json::from_str(line)?;
                if let Some(x) = v["loss"].as_f64() {
                    l.push(x);
                }
                if let Some(x) = v["tokens_per_second"].as_f64() {
                    tps.push(x);
                }
            }
            let steady = if tps.len() > 1 { crate::bench::median(tps[1..].to_vec()) } else { f64::NAN };
            runs.insert(
                if bf16 { "bf16" } else { "f32" }.into(),
                json!({"losses": l, "tokens_per_s_after_first_step": steady, "seconds": seconds}),
            );
            losses.push(l);
        }
        std::fs::remove_dir_all(&dir).ok();
        let worst =
            losses[0].iter().zip(&losses[1]).map(|(a, b)| (a - b).abs() / a.abs().max(1.0)).fold(0f64, f64::max);
        runs.insert("max_relative_loss_difference".into(), json!(worst));
        runs.insert("steps".into(), json!(self.steps));
        Ok(Value::Object(runs))
    }
}
