//! One optimizer step of SFT (LoRA and full), DPO, GRPO and PPO on the tiny checkpoint, on
//! each GPU backend compiled in (`--features wgpu` / `cuda`), against the same step on the
//! CPU backend: same seed, same data, same completions; the loss, the gradient norm and the
//! update must agree. And a LoRA adapter trained there reads back in `align score --device
//! cpu` with the scores the GPU gives it.
//!
//! `adam_epsilon = 1` makes the first AdamW update `lr·g/(|g|+1)`, close to linear in the
//! gradient: with the default ε the update is `lr·sign(g)`, and a gradient at rounding level
//! could flip sign between backends. So the update comparison is a gradient comparison.
//!
//! Each comparison prints its figures as one JSON line on stderr (`-- --nocapture`).
// Without a GPU backend compiled in, only the CPU-against-CPU check below runs.
#![cfg_attr(not(any(feature = "wgpu", feature = "cuda")), allow(dead_code))]

use crate::common::{metrics, rl_config, root, tmp};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use align_model::backend::{Cpu, DeviceKind};
use align_model::burn::tensor::backend::Backend;
use align_model::{FusedOps, SafetensorsSource, WeightSource};
use align_pipeline::grpo::run_grpo;
use align_pipeline::ppo::run_ppo;
use align_pipeline::preference::{PairwiseStage, PreferenceConfig, run_preference};
use align_pipeline::sft::{SftConfig, run_sft};

/// Loss and gradient norm: relative to max(1, |CPU value|).
const LOSS_TOL: f64 = 1e-4;
/// The update (final − initial weights) of each tensor: ‖Δ_gpu − Δ_cpu‖ / ‖Δ_cpu‖.
const UPDATE_TOL: f64 = 1e-3;

/// The step's settings (the RL configs add logging and the schedule themselves).
const STEP: &str =
    "max_steps = 1\nlearning_rate = 1e-2\nadam_epsilon = 1.0\nweight_decay = 0.0\nsave_steps = 0\nseed = 7";
const SCHEDULE: &str = "logging_steps = 1\nlr_scheduler_type = \"constant\"";
const LORA: &str = "[lora]\nr = 8\nlora_alpha = 16\nlora_dropout = 0.0\ntarget_modules = \"all-linear\"\n";

fn tiny() -> PathBuf {
    root().join("fixtures/models/llama-tied")
}

#[derive(Clone, Copy, Debug)]
enum Case {
    SftLora,
    SftFull,
    Dpo,
    Grpo,
    Ppo,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::SftLora => "sft-lora",
            Case::SftFull => "sft-full",
            Case::Dpo => "dpo-lora",
            Case::Grpo => "grpo",
            Case::Ppo => "ppo",
        }
    }
}

/// A one-step stage config on 4 rows of a fixture file read through `adapter`.
fn step_config<T: serde::de::DeserializeOwned>(out: &Path, file: &str, adapter: &str, sections: &str) -> T {
    let lines = [
        format!("output_dir = {:?}", out.display().to_string()),
        format!("[model]\npath = {:?}", tiny().display().to_string()),
        format!("[data]\npath = {:?}", root().join("fixtures/data").join(file).display().to_string()),
        format!("adapter = {adapter:?}\nlimit = 4"),
        format!("[training]\nper_device_train_batch_size = 4\n{STEP}\n{SCHEDULE}"),
        sections.to_string(),
    ];
    toml::from_str(&lines.join("\n")).unwrap()
}

fn sft_config(out: &Path, lora: bool) -> SftConfig {
    let tokenize = "[tokenize]\nmax_length = 128\nmax_prompt_length = 64\n";
    step_config(out, "gsm8k_train_head.jsonl", "gsm8k_sft", &format!("{tokenize}{}", if lora { LORA } else { "" }))
}

fn dpo_config(out: &Path) -> PreferenceConfig {
    step_config(out, "piqa_head.jsonl", "piqa_preference", &format!("[tokenize]\nmax_length = 128\n{LORA}"))
}

fn prompts(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let f = dir.join("prompts.jsonl");
    let rows: String =
        (0..4).map(|i| format!("{{\"prompt\": \"Question {i}: what comes next?\", \"answer\": \"{i}\"}}\n")).collect();
    std::fs::write(&f, rows).unwrap();
    f
}

/// Runs one step of `case` on backend `B` into `dir`; returns the run directory.
fn run<B: FusedOps>(case: Case, dir: &Path) -> PathBuf {
    let out = dir.join("run");
    let device = Default::default();
    let training = format!("per_device_train_batch_size = 4\n{STEP}");
    match case {
        Case::SftLora | Case::SftFull => {
            run_sft::<B>(&sft_config(&out, matches!(case, Case::SftLora)), false, &device).unwrap();
        }
        Case::Dpo => {
            run_preference::<B>(&dpo_config(&out), PairwiseStage::Dpo, false, &device).unwrap();
        }
        Case::Grpo => {
            // Completions end at their first "e": lengths, so rewards, differ within a group.
            let body = "num_generations = 4\nmax_completion_length = 8\ntemperature = 1.0\nstop_strings = [\"e\"]\nrewards = [{ kind = \"length\", max_tokens = 8, cache_tokens = 8 }]";
            let cfg = rl_config(&out, &prompts(dir), &training, "grpo", body, LORA);
            run_grpo::<B>(&cfg, false, &device).unwrap();
        }
        Case::Ppo => {
            let body = format!(
                "max_completion_length = 8\ntemperature = 1.0\nrewards = [{{ kind = \"model\", path = \"{}\" }}]",
                tiny().display()
            );
            let cfg = rl_config(&out, &prompts(dir), &training, "ppo", &body, "");
            run_ppo::<B>(&cfg, false, &device).unwrap();
        }
    }
    out
}

/// Every tensor of a directory's safetensors files (model or adapter), as f32.
fn tensors(dir: &Path) -> BTreeMap<String, Vec<f32>> {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    assert!(!files.is_empty(), "{}: no safetensors", dir.display());
    let mut source = SafetensorsSource::open_files(&files).unwrap();
    source.names().into_iter().map(|n| (n.clone(), source.load(&n).unwrap().data)).collect()
}

fn norm(v: impl Iterator<Item = f64>) -> f64 {
    v.map(|x| x * x).sum::<f64>().sqrt()
}

/// The worst relative deviation of the update, over tensors; the initial value of a tensor
/// the base checkpoint lacks (a LoRA factor, a value head) is read as zero, which makes a
/// LoRA `A` (no gradient while `B` = 0) compare its equal values, not an update.
fn update_deviation(cpu: &Path, gpu: &Path) -> (f64, String) {
    let base = tensors(&tiny());
    let (a, b) = (tensors(&cpu.join("final")), tensors(&gpu.join("final")));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "the same tensors are exported");
    let (mut worst, mut at) = (0f64, String::new());
    for (name, w_cpu) in &a {
        let w_gpu = &b[name];
        let zeros = vec![0f32; w_cpu.len()];
        let w0 = base.get(name).filter(|w| w.len() == w_cpu.len()).unwrap_or(&zeros);
        let diff = norm(w_gpu.iter().zip(w_cpu).map(|(g, c)| (*g - *c) as f64));
        let update = norm(w_cpu.iter().zip(w0).map(|(c, z)| (*c - *z) as f64));
        let rel = if diff == 0.0 { 0.0 } else { diff / update.max(1e-30) };
        if rel > worst {
            (worst, at) = (rel, name.clone());
        }
    }
    (worst, at)
}

fn rel(gpu: f64, cpu: f64) -> f64 {
    (gpu - cpu).abs() / cpu.abs().max(1.0)
}

/// One step of `case` on `G` and on the CPU; asserts agreement and returns the figures.
fn compare<G: FusedOps>(case: Case) -> serde_json::Value {
    let backend = device_flag::<G>();
    let d = tmp(&format!("devices-{}-{backend}", case.name()));
    let cpu = run::<Cpu>(case, &d.join("cpu"));
    let t = std::time::Instant::now();
    let gpu = run::<G>(case, &d.join("gpu"));
    let gpu_s = t.elapsed().as_secs_f64();
    let (mc, mg) = (metrics(&cpu), metrics(&gpu));
    assert_eq!((mc.len(), mg.len()), (1, 1), "one logged step each");
    let (lc, lg) = (mc[0].loss.unwrap(), mg[0].loss.unwrap());
    let (nc, ng) = (mc[0].grad_norm, mg[0].grad_norm);
    if matches!(case, Case::Grpo | Case::Ppo) {
        let texts = |dir: &Path| -> Vec<String> {
            std::fs::read_to_string(dir.join("completions.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["completion"].to_string())
                .collect()
        };
        assert_eq!(texts(&gpu), texts(&cpu), "{}: the same completions are sampled", case.name());
    }
    assert!(nc > 0.0, "{}: the step has a gradient to compare", case.name());
    let (update, tensor) = update_deviation(&cpu, &gpu);
    let report = serde_json::json!({
        "backend": backend, "case": case.name(),
        "loss_cpu": lc, "loss_gpu": lg, "loss_rel": rel(lg, lc),
        "grad_norm_cpu": nc, "grad_norm_gpu": ng, "grad_norm_rel": rel(ng, nc),
        "update_rel": update, "update_worst_tensor": tensor, "gpu_seconds": gpu_s,
    });
    eprintln!("{report}");
    assert!(rel(lg, lc) < LOSS_TOL, "{}: loss {lg} on the GPU, {lc} on the CPU", case.name());
    assert!(rel(ng, nc) < LOSS_TOL, "{}: grad norm {ng} on the GPU, {nc} on the CPU", case.name());
    assert!(update < UPDATE_TOL, "{}: update of {tensor} differs by {update:e} (relative)", case.name());
    std::fs::remove_dir_all(&d).ok();
    report
}

/// The `align` binary; `ALIGN_BIN` names it where `cargo xtask gpu-check` carried this test.
fn align_bin() -> PathBuf {
    std::env::var_os("ALIGN_BIN").map_or_else(|| env!("CARGO_BIN_EXE_align").into(), PathBuf::from)
}

/// `--device` for backend `B`.
fn device_flag<B: 'static>() -> &'static str {
    DeviceKind::of::<B>().map_or("unknown", DeviceKind::name)
}

/// A LoRA adapter trained on `G` and exported: `align score --device cpu` reads it back and
/// gives the log-probs `G` gives it, which differ from the base model's.
fn adapter_reads_back_on_the_cpu<G: FusedOps + Backend>(device_flag: &str) {
    let d = tmp(&format!("devices-adapter-{device_flag}"));
    let out = d.join("run");
    let mut cfg = sft_config(&out, true);
    cfg.training.max_steps = Some(3);
    run_sft::<G>(&cfg, false, &Default::default()).unwrap();
    let rows = d.join("rows.jsonl");
    std::fs::write(
        &rows,
        "{\"prompt\": \"Natalia sold clips\", \"completion\": \" to 48 of her friends.\"}\n{\"prompt\": \"Q: 2+2?\", \"completion\": \" A: 4\"}\n",
    )
    .unwrap();
    let score = |device: &str, adapter: bool| -> Vec<f64> {
        let mut cmd = std::process::Command::new(align_bin());
        cmd.args(["--device", device, "score", "--model"]).arg(tiny()).arg("--data").arg(&rows);
        if adapter {
            cmd.arg("--adapter").arg(out.join("final"));
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "align --device {device} score: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout)
            .unwrap()
            .lines()
            .flat_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["completion_logprobs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect::<Vec<_>>()
            })
            .collect()
    };
    let (on_cpu, on_gpu, base) = (score("cpu", true), score(device_flag, true), score("cpu", false));
    assert_eq!(on_cpu.len(), on_gpu.len());
    let worst = on_cpu.iter().zip(&on_gpu).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
    let moved = on_cpu.iter().zip(&base).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
    eprintln!("adapter from {device_flag}: max |Δ log-prob| cpu vs {device_flag} {worst:.2e}; vs base {moved:.2e}");
    assert!(worst < 1e-4, "the adapter scores alike on both devices: {worst:e}");
    assert!(moved > 1e-3, "the adapter changes the scores: {moved:e}");
    std::fs::remove_dir_all(&d).ok();
}

align_model::gpu_tests!(sft_lora_step, |G| {
    compare::<G>(Case::SftLora);
});
align_model::gpu_tests!(sft_full_step, |G| {
    compare::<G>(Case::SftFull);
});
align_model::gpu_tests!(dpo_step, |G| {
    compare::<G>(Case::Dpo);
});
align_model::gpu_tests!(grpo_step, |G| {
    compare::<G>(Case::Grpo);
});
align_model::gpu_tests!(ppo_step, |G| {
    compare::<G>(Case::Ppo);
});
align_model::gpu_tests!(lora_adapter_reads_back_on_the_cpu, |G| {
    let flag = device_flag::<G>();
    adapter_reads_back_on_the_cpu::<G>(flag);
});

/// The comparison itself, CPU against CPU: identical runs give zero deviation, so the
/// harness above measures the backend, not run-to-run noise.
#[test]
fn the_comparison_is_exact_on_one_backend() {
    let r = compare::<Cpu>(Case::SftLora);
    assert_eq!(r["loss_rel"], 0.0);
    assert_eq!(r["update_rel"], 0.0);
}

// A device that cannot be opened (no driver: the loader is pointed at none) is an error
// saying what to install, exit status 1, not a backend's panic.
align_model::gpu_tests!(a_device_that_cannot_open_is_an_error, |G| {
    let flag = device_flag::<G>();
    let o = std::process::Command::new(align_bin())
        .args(["--device", flag, "generate", "--prompt", "Hi", "--max-new-tokens", "1", "--model"])
        .arg(tiny())
        .env("VK_ICD_FILENAMES", "/nonexistent/icd.json")
        .env("CUDA_VISIBLE_DEVICES", "")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no device could be opened"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
});
