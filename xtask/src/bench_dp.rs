//! `cargo xtask bench-dp`: data-parallel scaling on this machine. SmolLM2-135M LoRA SFT (r=16,
//! GSM8K rows cut to 256 tokens, 8 rows per optimizer step) with one global batch, run as
//! - one process on every core, one replica (the baseline);
//! - one process on one core (for the scaling efficiency: N replicas against N × its speed);
//! - one process per core, each a replica with a single thread (`--nodes`);
//! - one process with one replica per core (`--devices`), sharing the CPU's thread pool.
//!
//! Each run is a child process (`xtask dp-train`, this binary) so its thread count is set
//! before any pool starts; throughput is rank 0's logged tokens/s (every replica's tokens),
//! memory the peak of the processes' summed resident sets.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;

#[derive(Args)]
pub struct BenchDpArgs {
    /// Optimizer steps per run (the first, warm-up, is left out of the figures)
    #[arg(long, default_value_t = 6)]
    pub steps: usize,
    /// Cores to use (replicas in the data-parallel runs)
    #[arg(long, default_value_t = 2)]
    pub cores: usize,
    /// A GGUF file or HF directory (default: the fetched SmolLM2)
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Where the runs and `bench-dp.json` go
    #[arg(long, default_value = "target/bench/dp")]
    pub out: PathBuf,
}

/// `xtask dp-train`: one process of a bench run (`align sft` with its data-parallel flags).
#[derive(Args)]
pub struct DpTrainArgs {
    #[arg(long)]
    pub config: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub devices: usize,
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    #[arg(long)]
    pub coordinator: Option<String>,
}

pub fn train(a: &DpTrainArgs) -> Result<()> {
    let mut cfg = align_pipeline::config::StageConfig::from_file(&a.config)?;
    let d = &mut cfg.distributed;
    (d.devices, d.nodes, d.node_rank, d.coordinator) = (a.devices, a.nodes, a.node_rank, a.coordinator.clone());
    d.validate()?;
    align_pipeline::sft::run_sft::<align_model::backend::Cpu>(&cfg, false, &Default::default())?;
    Ok(())
}

/// One configuration of the bench.
struct Layout {
    name: &'static str,
    processes: usize,
    devices: usize,
    threads: usize,
    accumulation: usize,
}

pub fn run(a: &BenchDpArgs) -> Result<()> {
    let model = match &a.model {
        Some(m) => m.clone(),
        None => crate::fetch::smollm2()?,
    };
    let n = a.cores.max(2);
    if 8 % n != 0 {
        bail!("--cores {n}: the global batch of 8 rows (2 per micro-batch) must split evenly");
    }
    let layouts = [
        Layout { name: "1 process × {n} threads", processes: 1, devices: 1, threads: n, accumulation: 4 },
        Layout { name: "1 process × 1 thread", processes: 1, devices: 1, threads: 1, accumulation: 4 },
        Layout { name: "{n} processes × 1 thread", processes: n, devices: 1, threads: 1, accumulation: 4 / n },
        Layout { name: "1 process, {n} replicas", processes: 1, devices: n, threads: n, accumulation: 4 / n },
    ];
    std::fs::create_dir_all(&a.out).with_context(|| a.out.display().to_string())?;
    let exe = std::env::current_exe().context("this xtask binary")?;
    let mut rows = vec![];
    for l in &layouts {
        let name = l.name.replace("{n}", &n.to_string());
        let dir = a.out.join(name.replace([' ', '×', ','], "_"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| dir.display().to_string())?;
        }
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("sft.toml");
        std::fs::write(&config, sft_config(&dir.join("run"), &model, l.accumulation, a.steps)?)?;
        eprintln!("bench-dp: {name} …");
        let port = free_port()?;
        let children: Vec<Child> = (0..l.processes)
            .map(|rank| {
                let mut c = Command::new(&exe);
                c.arg("dp-train").arg("--config").arg(&config).args(["--devices", &l.devices.to_string()]);
                if l.processes > 1 {
                    c.args(["--nodes", &l.processes.to_string(), "--node-rank", &rank.to_string()]);
                    c.args(["--coordinator", &format!("127.0.0.1:{port}")]);
                }
                c.env("RAYON_NUM_THREADS", l.threads.to_string()).stdout(Stdio::null()).stderr(Stdio::piped());
                c.spawn().context("starting xtask dp-train")
            })
            .collect::<Result<_>>()?;
        let pids: Vec<u32> = children.iter().map(Child::id).collect();
        let (peak, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let sampler = {
            let (peak, stop) = (peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let kib: u64 = pids.iter().filter_map(|p| rss_kib(*p)).sum();
                    peak.fetch_max(kib, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        for (rank, c) in children.into_iter().enumerate() {
            let out = c.wait_with_output()?;
            if !out.status.success() {
                bail!("{name}, process {rank}: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        stop.store(true, Ordering::Relaxed);
        let _ = sampler.join();
        let metrics = read_metrics(&dir.join("run/metrics.jsonl"))?;
        let tps = crate::bench::median(metrics.iter().skip(1).map(|m| m.0).collect());
        let step = crate::bench::median(metrics.iter().skip(1).map(|m| m.1).collect());
        let rss = peak.load(Ordering::Relaxed) as f64 / 1024.0;
        eprintln!("bench-dp: {name}: {tps:.1} tokens/s, {step:.2} s/step, peak RSS {rss:.0} MiB");
        rows.push(serde_json::json!({"layout": name, "tokens_per_s": tps, "step_seconds": step, "peak_rss_mib": rss}));
    }
    let base = rows[0]["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
    let one_core = rows[1]["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
    println!(
        "| layout (SmolLM2-135M LoRA SFT, 8 × ≤256 tokens per step) | tokens/s | × baseline | scaling efficiency | s/step | peak RSS (MiB, all processes) |"
    );
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        let tps = r["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
        // Against every core running at the one-core speed.
        let layout = r["layout"].as_str().unwrap_or("");
        let efficiency = match layout.contains("1 thread") && !layout.contains("processes") {
            true => "—".to_string(),
            false => format!("{:.0} %", 100.0 * tps / (n as f64 * one_core)),
        };
        println!(
            "| {layout} | {tps:.1} | {:.2} | {efficiency} | {:.2} | {:.0} |",
            tps / base,
            r["step_seconds"].as_f64().unwrap_or(f64::NAN),
            r["peak_rss_mib"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| {
        c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
    });
    let report = serde_json::json!({"cores": n, "steps": a.steps, "cpu": cpu, "rows": rows});
    let path = a.out.join("bench-dp.json");
    align_model::weights::write_atomic(&path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    eprintln!("bench-dp: {}", path.display());
    Ok(())
}

/// The bench's SFT stage: LoRA r=16 without dropout, micro-batches of 2 rows of at most
/// 256 tokens, no checkpoints.
fn sft_config(out: &Path, model: &Path, accumulation: usize, steps: usize) -> Result<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let data = root.join("fixtures/data/gsm8k_train_head.jsonl");
    Ok(format!(
        "output_dir = {out:?}\n[model]\npath = {model:?}\n[data]\npath = {data:?}\nadapter = \"gsm8k_sft\"\n\
         [tokenize]\nmax_length = 256\n[lora]\nr = 16\nlora_alpha = 32\nlora_dropout = 0.0\n[training]\n\
         per_device_train_batch_size = 2\ngradient_accumulation_steps = {accumulation}\nlearning_rate = 1e-4\n\
         max_steps = {steps}\nlogging_steps = 1\nsave_steps = 0\n[distributed]\ntimeout_s = 600\n",
        out = out.display().to_string(),
        model = model.display().to_string(),
        data = data.display().to_string(),
    ))
}

/// `(tokens_per_second, step_seconds)` of each logged step.
fn read_metrics(path: &Path) -> Result<Vec<(f64, f64)>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            let v: serde_json::Value =
                serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1))?;
            let f = |k: &str| v[k].as_f64().with_context(|| format!("{}:{}: no {k}", path.display(), i + 1));
            Ok((f("tokens_per_second")?, f("step_seconds")?))
        })
        .collect()
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
