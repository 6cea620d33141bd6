//! The test phases of `cargo xtask test` (docs/testing.md): the suite on the CPU, then the
//! GPU tests on the Vulkan driver the machine has (lavapipe on a CPU-only one) side by side
//! with the check of the CUDA build.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// The features the suite is built with: the GPU tests (`…::wgpu`) need wgpu.
const FEATURES: &str = "align-pipeline/wgpu,xtask/wgpu";

/// `cargo test` arguments split at `--`: cargo's own (with the packages and features the
/// suite is built with), then the test binaries'.
pub struct TestArgs {
    cargo: Vec<String>,
    harness: Vec<String>,
}

impl TestArgs {
    pub fn new(args: &[String]) -> Self {
        let (mut cargo, harness) = match args.iter().position(|a| a == "--") {
            Some(i) => (args[..i].to_vec(), args[i + 1..].to_vec()),
            None => (args.to_vec(), vec![]),
        };
        // `-p NAME` narrows the run (cargo would let `--workspace` override it), and the
        // wgpu feature goes to the packages named that have one (cargo refuses the others).
        let named: Vec<&String> = cargo
            .iter()
            .zip(cargo.iter().skip(1))
            .filter(|(a, _)| *a == "-p" || *a == "--package")
            .map(|(_, p)| p)
            .collect();
        let features = if named.is_empty() {
            FEATURES.to_string()
        } else {
            let with_wgpu = ["align-kernels", "align-model", "align-pipeline", "xtask"];
            named
                .iter()
                .filter(|p| with_wgpu.contains(&p.as_str()))
                .map(|p| format!("{p}/wgpu"))
                .collect::<Vec<_>>()
                .join(",")
        };
        if named.is_empty() {
            cargo.insert(0, "--workspace".into());
        }
        if !features.is_empty() {
            cargo.splice(0..0, ["--features".to_string(), features]);
        }
        TestArgs { cargo, harness }
    }
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Every test but the GPU ones, in parallel as cargo runs them.
pub fn cpu_suite(args: &TestArgs, gguf: &Path) -> Result<()> {
    let status = Command::new(cargo())
        .arg("test")
        .args(&args.cargo)
        .arg("--")
        .args(&args.harness)
        .args(["--skip", "::wgpu"])
        .env("ALIGN_SMOLLM2_GGUF", gguf)
        .status()?;
    if !status.success() {
        bail!("cargo test failed");
    }
    Ok(())
}

/// A test binary of the suite, as `cargo test --no-run` reports it.
struct TestBinary {
    name: String,
    path: PathBuf,
    /// Its package's directory: cargo runs tests there.
    package_dir: PathBuf,
}

/// The suite's test binaries (already built by [`cpu_suite`]: this only lists them).
fn test_binaries(args: &TestArgs) -> Result<Vec<TestBinary>> {
    let out = Command::new(cargo())
        .args(["test", "--no-run", "--message-format=json"])
        .args(&args.cargo)
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("cargo test --no-run failed");
    }
    let mut bins = vec![];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let (Some(path), Some(manifest)) = (msg["executable"].as_str(), msg["manifest_path"].as_str()) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let package_dir = Path::new(manifest).parent().context("manifest path")?.to_path_buf();
        let name = msg["target"]["name"].as_str().unwrap_or("?").to_string();
        bins.push(TestBinary { name, path: path.into(), package_dir });
    }
    Ok(bins)
}

/// The tests of `bin` whose names match the `::wgpu` filter.
fn gpu_test_count(bin: &TestBinary, harness: &[String]) -> Result<usize> {
    let out = Command::new(&bin.path)
        .args(["::wgpu", "--list"])
        .args(harness)
        .current_dir(&bin.package_dir)
        .output()
        .with_context(|| bin.path.display().to_string())?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.ends_with(": test")).count())
}

/// A child process whose output goes to a log file, printed whole when it ends (so the
/// jobs running side by side do not interleave their lines).
struct Job {
    what: String,
    child: Child,
    log: PathBuf,
    started: Instant,
}

impl Job {
    fn spawn(what: String, mut cmd: Command, log_dir: &Path) -> Result<Job> {
        let log = log_dir.join(format!("{}.log", what.replace([' ', '/'], "-")));
        let file = std::fs::File::create(&log).with_context(|| log.display().to_string())?;
        cmd.stdout(file.try_clone()?).stderr(file);
        let child = cmd.spawn().with_context(|| format!("{what}: could not start"))?;
        eprintln!("xtask test: {what} started");
        Ok(Job { what, child, log, started: Instant::now() })
    }
}

/// The GPU tests, one process per test binary that has any (tests inside a binary one at a
/// time: threads sharing a CubeCL device spin while its queue is full, and on two cores
/// that starved the driver), side by side with `cargo check` of the CUDA build. Each GPU
/// process keeps one core about 70% busy compiling shaders in the driver's LLVM, so running
/// them one after another left a core idle (docs/testing.md).
pub fn gpu_tests_and_cuda_check(args: &TestArgs, gguf: &Path, target: &Path) -> Result<()> {
    let log_dir = target.join("xtask-test");
    std::fs::create_dir_all(&log_dir).with_context(|| log_dir.display().to_string())?;
    let mut jobs = vec![];
    for bin in test_binaries(args)? {
        let n = gpu_test_count(&bin, &args.harness)?;
        if n == 0 {
            continue;
        }
        let mut cmd = Command::new(&bin.path);
        cmd.arg("::wgpu")
            .args(&args.harness)
            .args(["--test-threads=1", "--nocapture"])
            .current_dir(&bin.package_dir)
            .env("ALIGN_SMOLLM2_GGUF", gguf)
            // Autotune's candidates are each one more shader for the software driver to
            // compile; the fewest keeps the time bounded.
            .env("CUBECL_AUTOTUNE_LEVEL", std::env::var("CUBECL_AUTOTUNE_LEVEL").unwrap_or("minimal".into()))
            // `Backtrace::capture` off (panics still print theirs): under RUST_BACKTRACE=1
            // code that captures one per lock taken spends its time unwinding.
            .env("RUST_LIB_BACKTRACE", "0");
        jobs.push(Job::spawn(format!("wgpu tests of {} ({n})", bin.name), cmd, &log_dir)?);
    }
    // The GPU path must keep compiling where no GPU is. Every `cfg(feature = "cuda")` line
    // is in align-model and align-kernels (the backend dispatch); the rest is generic code
    // the wgpu build compiles.
    let mut check = Command::new(cargo());
    check.args(["check", "-p", "align-model", "--features", "cuda"]);
    jobs.push(Job::spawn("cargo check --features cuda".into(), check, &log_dir)?);

    // Polled, so each job's time is when it ended, and its output comes as soon as it does.
    let mut failed = vec![];
    while !jobs.is_empty() {
        let mut i = 0;
        while i < jobs.len() {
            let Some(status) = jobs[i].child.try_wait()? else {
                i += 1;
                continue;
            };
            let job = jobs.remove(i);
            eprint!("{}", std::fs::read_to_string(&job.log).unwrap_or_default());
            let secs = job.started.elapsed().as_secs_f64();
            if status.success() {
                eprintln!("xtask test: {} passed in {secs:.0} s", job.what);
            } else {
                eprintln!("xtask test: {} FAILED ({status}) in {secs:.0} s; log: {}", job.what, job.log.display());
                failed.push(job.what);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}
