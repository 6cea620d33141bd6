//! `cargo xtask soak`: SIGKILL the real `align` binary at random moments across SFT, DPO,
//! GRPO, PPO and a pipeline, resume it, and check what it promises: after every kill no
//! checkpoint that resume would trust is unusable, and the finished run equals an
//! uninterrupted one (metrics row by row except wall-clock fields, weights byte for byte).
//!
//! Each scenario runs once uninterrupted into `run/`, which is then renamed `reference/`;
//! the killed runs use the same `run/` path, so every absolute path written into their
//! files (configs, fingerprints) is the same and whole trees can be compared. A kill lands
//! after a delay drawn uniformly from [0, 1.1 T) (T: the reference's duration; the first
//! kill of a scenario before the reference's first checkpoint, every third one inside a
//! checkpoint write) from a seeded splitmix64; the run is then relaunched (`--resume`; a
//! pipeline by the same command), and killed again while kills remain. A run that
//! finishes before its kill is compared, and the scenario starts a fresh round while
//! kills remain.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use align_model::SplitMix64;
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

#[derive(clap::Args)]
pub struct SoakArgs {
    /// Kills in all, spread evenly across the scenarios
    #[arg(long, default_value_t = 10)]
    kills: usize,
    /// Seed of the kill delays
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep the work directory (target/soak/work) after a clean run; it is always kept on a
    /// failure, for the reproduction
    #[arg(long)]
    keep: bool,
    /// Only these scenarios (sft, dpo, grpo, ppo, pipeline); repeatable
    #[arg(long = "scenario", value_name = "NAME")]
    scenarios: Vec<String>,
    /// The `align` binary to soak (default: `cargo build -p align-pipeline --bin align`,
    /// then target/debug/align)
    #[arg(long)]
    align: Option<PathBuf>,
    /// RAYON_NUM_THREADS of the children
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

/// Fields that hold wall-clock measurements (also under an `eval_` prefix): the only ones
/// allowed to differ between a killed-and-resumed run and an uninterrupted one. `seconds`
/// is a pipeline stage's duration in `stage.json`.
const TIMINGS: &[&str] = &[
    "tokens_per_second",
    "train_tokens_per_second",
    "step_seconds",
    "rollout_seconds",
    "rollout_tokens_per_second",
    "seconds",
];

const SCENARIOS: &[&str] = &["sft", "dpo", "grpo", "ppo", "pipeline"];

/// The soak pipeline's name: its stages run in `run/<PIPELINE>/<stage>/`.
const PIPELINE: &str = "soak";

pub fn run(a: &SoakArgs) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("xtask has no parent directory")?.to_path_buf();
    let out = root.join("target/soak");
    let work = out.join("work");
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("clearing {}", work.display()))?;
    }
    std::fs::create_dir_all(&work).with_context(|| work.display().to_string())?;
    let built = match &a.align {
        Some(p) => p.clone(),
        None => build_align(&root)?,
    };
    // A copy: a build running beside the soak must not swap the binary between the
    // reference run and the killed ones.
    let align = work.join("align");
    std::fs::copy(&built, &align).with_context(|| format!("copying {} to {}", built.display(), align.display()))?;
    let names = chosen_scenarios(&a.scenarios)?;
    let prompts = write_prompts(&work)?;
    let start = Instant::now();
    let mut reports = vec![];
    for (i, name) in names.iter().enumerate() {
        let scenario = Scenario::new(name, &root, &work, &prompts)?;
        let budget = a.kills / names.len() + usize::from(i < a.kills % names.len());
        // Seeded by the scenario's own number, so `--scenario NAME --kills <its budget>`
        // draws the same delays as the whole soak did.
        let number = SCENARIOS.iter().position(|s| s == name).unwrap_or(i) as u64;
        let mut rng = SplitMix64::new(a.seed ^ (number + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
        let ctx = Ctx { align: &align, threads: a.threads };
        reports.push(soak(&ctx, &scenario, budget, &mut rng)?);
    }
    let seconds = start.elapsed().as_secs_f64();
    print_table(&reports, seconds);
    for r in reports.iter().filter(|r| !r.passed()) {
        println!(
            "soak: reproduce {0}: cargo xtask soak --scenario {0} --kills {1} --seed {2} --keep",
            r.name, r.budget, a.seed
        );
    }
    let ok = reports.iter().all(Report::passed);
    write_summary(&out.join("summary.json"), a, &reports, seconds)?;
    if ok && !a.keep {
        std::fs::remove_dir_all(&work).ok();
    }
    if !ok {
        bail!("soak failed: see the table above, target/soak/summary.json and the runs kept in {}", work.display());
    }
    Ok(())
}

/// Build the binary the soak kills, as the tests do: the dev profile's `align`.
fn build_align(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "-p", "align-pipeline", "--bin", "align"])
        .current_dir(root)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build -p align-pipeline --bin align failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    Ok(target.join("debug/align"))
}

fn chosen_scenarios(asked: &[String]) -> Result<Vec<&'static str>> {
    if let Some(bad) = asked.iter().find(|s| !SCENARIOS.contains(&s.as_str())) {
        bail!("unknown scenario {bad:?} (one of {})", SCENARIOS.join(", "));
    }
    Ok(SCENARIOS.iter().copied().filter(|s| asked.is_empty() || asked.iter().any(|a| a == s)).collect())
}

/// Eight prompts with an answer each: the online stages' training and held-out prompts
/// (short, so a rollout costs little and a run is mostly steps and checkpoints).
fn write_prompts(work: &Path) -> Result<PathBuf> {
    let path = work.join("prompts.jsonl");
    let rows: String =
        (0..8).map(|i| format!("{{\"prompt\": \"Question {i}: what comes next?\", \"answer\": \"{i}\"}}\n")).collect();
    std::fs::write(&path, rows).with_context(|| path.display().to_string())?;
    Ok(path)
}

// ---------------------------------------------------------------------------------------
// Scenarios: each a short run on the tiny fixture checkpoint that checkpoints every step.

struct Scenario {
    name: &'static str,
    dir: PathBuf,
    /// The first launch of a round, and every launch after a kill.
    first: Vec<String>,
    again: Vec<String>,
}

impl Scenario {
    fn new(name: &'static str, root: &Path, work: &Path, prompts: &Path) -> Result<Self> {
        let dir = work.join(name);
        std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
        let run = dir.join("run");
        let model = root.join("fixtures/models/llama-tied");
        let (text, file) = match name {
            "sft" => (sft_config(root, &model, &run), "sft.toml"),
            "dpo" => (dpo_config(root, &model, &run), "dpo.toml"),
            "grpo" => (grpo_config(&model, prompts, &run), "grpo.toml"),
            "ppo" => (ppo_config(&model, prompts, &run), "ppo.toml"),
            _ => (pipeline_file(root, &model, prompts, &run), "pipeline.toml"),
        };
        let config = dir.join(file);
        std::fs::write(&config, text).with_context(|| config.display().to_string())?;
        let config = config.display().to_string();
        let (first, again) = match name {
            // A pipeline resumes whatever was interrupted when run again as it was.
            "pipeline" => (vec!["pipeline".into(), config.clone()], vec!["pipeline".into(), config]),
            stage => (
                vec![stage.into(), "--config".into(), config.clone()],
                vec![stage.into(), "--resume".into(), "--config".into(), config],
            ),
        };
        Ok(Scenario { name, dir, first, again })
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    fn reference_dir(&self) -> PathBuf {
        self.dir.join("reference")
    }
}

/// LoRA SFT with dropout (the backend RNG must be reseeded on resume) and
/// `save_total_limit` (kills land inside the pruning too).
fn sft_config(root: &Path, model: &Path, out: &Path) -> String {
    let data = root.join("fixtures/data/gsm8k_train_head.jsonl");
    let body = format!(
        "[data]\npath = \"{}\"\nadapter = \"gsm8k_sft\"\nlimit = 8\n\
         [tokenize]\nmax_length = 192\nmax_prompt_length = 96\n\
         [training]\n{EVERY_STEP}per_device_train_batch_size = 2\ngradient_accumulation_steps = 2\n\
         learning_rate = 1e-3\nmax_steps = 10\nsave_total_limit = 2\nwarmup_ratio = 0.1\nlr_scheduler_type = \"cosine\"\n\
         {LORA}lora_dropout = 0.1\n",
        data.display()
    );
    stage_config(model, out, &body)
}

/// Full-weight DPO with a step-0 eval row and evals mid-run (rows a resume must keep).
fn dpo_config(root: &Path, model: &Path, out: &Path) -> String {
    let data = root.join("fixtures/data/piqa_head.jsonl").display().to_string();
    let body = format!(
        "[data]\npath = \"{data}\"\nadapter = \"piqa_preference\"\nlimit = 16\n\
         [eval_data]\npath = \"{data}\"\nadapter = \"piqa_preference\"\nskip = 16\nlimit = 4\n\
         [tokenize]\nmax_length = 128\n\
         [training]\n{EVERY_STEP}per_device_train_batch_size = 2\ngradient_accumulation_steps = 2\n\
         learning_rate = 1e-3\nlr_scheduler_type = \"linear\"\nmax_steps = 8\neval_steps = 4\neval_on_start = true\n\
         [dpo]\n"
    );
    stage_config(model, out, &body)
}

/// GRPO with two steps per generation batch (checkpoints fall between rounds) and
/// held-out evals; `completions.jsonl` must be cut back exactly on resume.
fn grpo_config(model: &Path, prompts: &Path, out: &Path) -> String {
    let prompts = prompts.display();
    let body = format!(
        "[data]\npath = \"{prompts}\"\n[eval_data]\npath = \"{prompts}\"\nlimit = 4\n\
         [training]\n{EVERY_STEP}{RL_TRAINING}max_steps = 8\neval_steps = 4\n\
         [grpo]\nnum_generations = 4\nmax_completion_length = 8\nstop_strings = [\"e\"]\nnum_iterations = 2\n\
         rewards = [{{ kind = \"length\", max_tokens = 8, cache_tokens = 8 }}]\n"
    );
    stage_config(model, out, &body)
}

/// LoRA PPO with a separate critic, minibatches and the adaptive KL controller (stage
/// state a checkpoint must carry), scored by a reward model.
fn ppo_config(model: &Path, prompts: &Path, out: &Path) -> String {
    let body = format!(
        "[data]\npath = \"{}\"\n\
         [training]\n{EVERY_STEP}{RL_TRAINING}max_steps = 6\nsave_total_limit = 3\n\
         [ppo]\nmax_completion_length = 8\ntemperature = 1.0\nrewards = [{{ kind = \"model\", path = \"{}\" }}]\n\
         num_mini_batches = 2\nadaptive_kl = true\nkl_target = 0.01\nkl_horizon = 10.0\n\
         {LORA}lora_dropout = 0.0\n",
        prompts.display(),
        model.display()
    );
    stage_config(model, out, &body)
}

/// Every scenario logs and checkpoints every step, with one seed.
const EVERY_STEP: &str = "logging_steps = 1\nsave_steps = 1\nseed = 7\n";
/// The online stages' optimisation.
const RL_TRAINING: &str = "per_device_train_batch_size = 4\ngradient_accumulation_steps = 2\n\
                           learning_rate = 1e-2\nlr_scheduler_type = \"constant\"\n";
/// A small adapter on every projection (the dropout is each scenario's).
const LORA: &str = "[lora]\nr = 4\nlora_alpha = 8\ntarget_modules = \"all-linear\"\n";

/// A stage config: `output_dir`, `[model]`, then `body`.
fn stage_config(model: &Path, out: &Path, body: &str) -> String {
    format!("output_dir = \"{}\"\n[model]\npath = \"{}\"\n{body}", out.display(), model.display())
}

/// LoRA SFT (merged for the next stage, then evaluated) → DPO from it (keeping one
/// checkpoint) → GRPO from that: kills land in training, merges, evals, stage records and
/// the report.
fn pipeline_file(root: &Path, model: &Path, prompts: &Path, runs: &Path) -> String {
    format!(
        r#"name = "{PIPELINE}"
runs_dir = "{runs}"
[base]
path = "{model}"

[[stages]]
name = "sft"
kind = "sft"
model = "@base"
data = {{ path = "{gsm8k}", adapter = "gsm8k_sft", limit = 8 }}
evals = [{{ name = "len", kind = "rewards", data = "{prompts}", rewards = [{{ kind = "length", max_tokens = 8, cache_tokens = 8 }}], temperature = 1.0, max_new_tokens = 8, batch_size = 4 }}]
[stages.tokenize]
max_length = 192
max_prompt_length = 96
[stages.training]
per_device_train_batch_size = 2
gradient_accumulation_steps = 2
learning_rate = 1e-3
max_steps = 5
logging_steps = 1
save_steps = 1
seed = 7
[stages.lora]
r = 4
lora_alpha = 8
lora_dropout = 0.1
target_modules = "all-linear"

[[stages]]
name = "dpo"
kind = "dpo"
model = "@sft"
data = {{ path = "{piqa}", adapter = "piqa_preference", limit = 16 }}
[stages.tokenize]
max_length = 128
[stages.training]
per_device_train_batch_size = 2
learning_rate = 1e-3
max_steps = 4
logging_steps = 1
save_steps = 1
save_total_limit = 1
seed = 7

[[stages]]
name = "grpo"
kind = "grpo"
model = "@dpo"
data = "{prompts}"
[stages.training]
per_device_train_batch_size = 4
learning_rate = 1e-2
lr_scheduler_type = "constant"
max_steps = 4
logging_steps = 1
save_steps = 1
seed = 7
[stages.grpo]
num_generations = 4
max_completion_length = 8
stop_strings = ["e"]
rewards = [{{ kind = "length", max_tokens = 8, cache_tokens = 8 }}]
"#,
        runs = runs.display(),
        model = model.display(),
        gsm8k = root.join("fixtures/data/gsm8k_train_head.jsonl").display(),
        piqa = root.join("fixtures/data/piqa_head.jsonl").display(),
        prompts = prompts.display(),
    )
}

// ---------------------------------------------------------------------------------------
// The soak of one scenario.

struct Ctx<'a> {
    align: &'a Path,
    threads: usize,
}

/// One kill: where it landed and what it left.
struct Kill {
    round: usize,
    launch: usize,
    resuming: bool,
    /// Aimed at a checkpoint write rather than at a random moment.
    aimed: bool,
    delay: f64,
    found: String,
    last_log: String,
}

#[derive(Default)]
struct Report {
    name: &'static str,
    reference_seconds: f64,
    first_checkpoint_seconds: f64,
    budget: usize,
    kills: Vec<Kill>,
    /// Launches after a kill (`--resume`, or a pipeline run again).
    resumes: usize,
    rounds: usize,
    /// Rounds that ended differing from the reference, with an unusable checkpoint or a
    /// failed launch; the kills of the others were survived.
    failed_rounds: usize,
    kills_survived: usize,
    /// Kills that found no complete checkpoint yet: the next launch resumes from nothing.
    kills_before_checkpoint: usize,
    /// Kills of a relaunch before it trained a step: in its startup, or loading the
    /// checkpoint it resumes from (a pipeline: also skipping done stages, merges, evals).
    kills_before_first_step: usize,
    /// Kills that left a checkpoint half written (`step-N.tmp`, or a `step-N` without its
    /// `trainer_state.json`): they landed inside a checkpoint write or prune.
    kills_mid_checkpoint: usize,
    /// Checkpoints resume would pick (or that claim to be complete) but cannot be loaded.
    unusable: Vec<String>,
    /// Differences from the reference, and launches that failed.
    differences: Vec<String>,
    /// Temporary files and half-removed checkpoint directories left behind in finished
    /// runs; resume ignores them by design, so they are reported, not failed.
    leftovers: BTreeSet<String>,
    seconds: f64,
}

impl Report {
    fn passed(&self) -> bool {
        self.unusable.is_empty() && self.differences.is_empty()
    }

    fn kills_during_resume(&self) -> usize {
        self.kills.iter().filter(|k| k.resuming).count()
    }
}

fn soak(ctx: &Ctx, s: &Scenario, budget: usize, rng: &mut SplitMix64) -> Result<Report> {
    let start = Instant::now();
    let mut report = Report { name: s.name, budget, ..Report::default() };
    let (reference, first_checkpoint) = run_reference(ctx, s)?;
    (report.reference_seconds, report.first_checkpoint_seconds) = (reference, first_checkpoint);
    let expected = checkpoint_files(&s.reference_dir());
    eprintln!(
        "soak: {}: reference run {reference:.2} s, first checkpoint at {first_checkpoint:.2} s; {budget} kills to spend",
        s.name
    );
    let mut left = budget;
    loop {
        report.rounds += 1;
        let before = (report.kills.len(), left, report.unusable.len());
        let finished = kill_round(ctx, s, &mut report, &mut left, &expected, rng)?;
        let passed = finished && compare_round(s, &mut report) && report.unusable.len() == before.2;
        let kills = report.kills.len() - before.0;
        if passed {
            report.kills_survived += kills;
        } else {
            report.failed_rounds += 1;
            // Kept for the reproduction; the next round starts from an empty directory.
            let kept = s.dir.join(format!("failed-round-{}", report.rounds));
            if s.run_dir().exists() {
                std::fs::rename(s.run_dir(), &kept).with_context(|| kept.display().to_string())?;
                eprintln!("soak: {}: round {} kept in {}", s.name, report.rounds, kept.display());
            }
        }
        // A round that failed without spending a kill would fail the same way forever.
        if left == 0 || (!passed && left == before.1) {
            break;
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// The uninterrupted run, moved to `reference/`; returns its duration and when its first
/// complete checkpoint appeared.
fn run_reference(ctx: &Ctx, s: &Scenario) -> Result<(f64, f64)> {
    for d in [s.run_dir(), s.reference_dir()] {
        if d.exists() {
            std::fs::remove_dir_all(&d).with_context(|| d.display().to_string())?;
        }
    }
    let log = s.dir.join("reference.log");
    let start = Instant::now();
    let mut child = launch(ctx, &s.first, &log)?;
    let mut first_checkpoint = None;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for the reference run")? {
            break status;
        }
        if first_checkpoint.is_none() && scan_checkpoints(&s.run_dir(), &BTreeMap::new()).complete > 0 {
            first_checkpoint = Some(start.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let seconds = start.elapsed().as_secs_f64();
    if !status.success() {
        bail!("{}: the reference run failed ({status}):\n{}", s.name, tail(&log, 20));
    }
    std::fs::rename(s.run_dir(), s.reference_dir()).context("moving the reference run aside")?;
    Ok((seconds, first_checkpoint.unwrap_or(seconds)))
}

/// One round from an empty output directory: launch, kill after a random delay while
/// kills remain, relaunch; then let it finish. Returns whether it finished cleanly (a
/// failed launch is recorded and ends the round).
fn kill_round(
    ctx: &Ctx,
    s: &Scenario,
    report: &mut Report,
    left: &mut usize,
    expected: &BTreeMap<String, BTreeSet<String>>,
    rng: &mut SplitMix64,
) -> Result<bool> {
    let run = s.run_dir();
    if run.exists() {
        std::fs::remove_dir_all(&run).with_context(|| run.display().to_string())?;
    }
    let round = report.rounds;
    // A hung child fails the soak instead of stalling it.
    let hang = Duration::from_secs_f64((report.reference_seconds * 30.0).max(120.0));
    let mut launch_no = 0;
    loop {
        launch_no += 1;
        let resuming = launch_no > 1;
        report.resumes += usize::from(resuming);
        let log = s.dir.join(format!("logs/r{round}-l{launch_no}.log"));
        let args = if resuming { &s.again } else { &s.first };
        let trigger = if *left > 0 { next_trigger(report, rng) } else { Trigger::Never };
        let mut child = launch(ctx, args, &log)?;
        let watched: Vec<PathBuf> = expected.keys().map(|k| run.join(k)).collect();
        match wait_or_kill(&mut child, trigger, &watched, hang)? {
            Ended::Exited(status) if status.success() => return Ok(true),
            Ended::Exited(status) => {
                let why = format!("round {round} launch {launch_no} exited with {status}: {}", failure(&log));
                eprintln!("soak: {}: FAILED: {why}", s.name);
                report.differences.push(why);
                return Ok(false);
            }
            Ended::Hung => {
                let why = format!("round {round} launch {launch_no} hung past {} s", hang.as_secs());
                eprintln!("soak: {}: FAILED: {why}", s.name);
                report.differences.push(why);
                return Ok(false);
            }
            Ended::Killed(at) => {
                *left -= 1;
                let aimed = matches!(trigger, Trigger::InCheckpointWrite(..));
                // An unusable checkpoint fails the round, which still goes on: whether the
                // next launch trips over it is worth knowing too.
                let kill = record_kill(s, report, expected, (round, launch_no, resuming, aimed), at, &log);
                report.kills.push(kill);
            }
        }
    }
}

/// When the next kill lands. The first one of a scenario before the reference's first
/// checkpoint, so every scenario resumes from nothing at least once; every third one in a
/// checkpoint write, which is otherwise a small share of the time; the others anywhere in
/// [0, 1.1 T).
fn next_trigger(report: &Report, rng: &mut SplitMix64) -> Trigger {
    let secs = Duration::from_secs_f64;
    match report.kills.len() {
        0 => Trigger::After(secs(rng.uniform() * report.first_checkpoint_seconds)),
        n if n % 3 == 2 => {
            // A write of these tiny checkpoints lasts a few milliseconds: up to 2 ms after it
            // is seen lands inside it, or just after its rename.
            Trigger::InCheckpointWrite(
                secs(rng.uniform() * 0.6 * report.reference_seconds),
                secs(rng.uniform() * 0.002),
            )
        }
        _ => Trigger::After(secs(rng.uniform() * 1.1 * report.reference_seconds)),
    }
}

/// Inspect the output directory a kill left: checkpoints checked, the state printed.
fn record_kill(
    s: &Scenario,
    report: &mut Report,
    expected: &BTreeMap<String, BTreeSet<String>>,
    (round, launch, resuming, aimed): (usize, usize, bool, bool),
    delay: f64,
    log: &Path,
) -> Kill {
    let scan = scan_checkpoints(&s.run_dir(), expected);
    let text = std::fs::read_to_string(log).unwrap_or_default();
    report.kills_before_checkpoint += usize::from(scan.complete == 0);
    report.kills_before_first_step += usize::from(resuming && !text.contains(" train step="));
    report.kills_mid_checkpoint += usize::from(scan.dirs.iter().any(|(_, _, left)| !left.is_empty()));
    for p in &scan.unusable {
        eprintln!("soak: {}: BROKEN CHECKPOINT: {p}", s.name);
    }
    report
        .unusable
        .extend(scan.unusable.iter().map(|p| format!("kill {} (round {round}): {p}", report.kills.len() + 1)));
    let last_log = last_event(log);
    let found = [scan.describe(), progress(&s.run_dir())].into_iter().filter(|x| !x.is_empty()).collect::<Vec<_>>();
    let kill = Kill { round, launch, resuming, aimed, delay, found: found.join("; "), last_log };
    eprintln!(
        "soak: {:<8} kill {:>3}/{} round {} launch {}{} at {:.3} s{}: {}; last log: {}",
        s.name,
        report.kills.len() + 1,
        report.budget,
        kill.round,
        kill.launch,
        if kill.resuming { " (resuming)" } else { "" },
        kill.delay,
        if kill.aimed { " (aimed at a checkpoint write)" } else { "" },
        kill.found,
        kill.last_log
    );
    kill
}

/// A finished round against the reference; the output directory is kept as it ended.
fn compare_round(s: &Scenario, report: &mut Report) -> bool {
    let run = s.run_dir();
    let scan = scan_checkpoints(&run, &checkpoint_files(&s.reference_dir()));
    report.unusable.extend(scan.unusable.iter().map(|p| format!("finished round {}: {p}", report.rounds)));
    let cmp = compare_trees(&s.reference_dir(), &run);
    report.leftovers.extend(cmp.leftovers.iter().map(|l| format!("round {}: {l}", report.rounds)));
    let passed = cmp.differences.is_empty() && scan.unusable.is_empty();
    let verdict = match cmp.differences.len() {
        0 => "identical".to_string(),
        n => format!(
            "{n} differences, first: {}",
            cmp.differences.iter().take(3).cloned().collect::<Vec<_>>().join("; ")
        ),
    };
    eprintln!("soak: {}: round {} finished: {verdict}", s.name, report.rounds);
    report.differences.extend(cmp.differences.into_iter().map(|d| format!("round {}: {d}", report.rounds)));
    passed
}

/// How far a run got beyond its checkpoints: `final/` (whole or not), a pipeline's stage
/// records and report.
fn progress(run: &Path) -> String {
    let mut notes = vec![];
    if run.join("final").exists() {
        notes.push("final/ present".to_string());
    }
    let pipeline = run.join(PIPELINE);
    for stage in read_dir(&pipeline).into_iter().filter(|p| p.is_dir()) {
        let record = std::fs::read_to_string(stage.join("stage.json")).ok();
        let status =
            record.and_then(|t| serde_json::from_str::<Value>(&t).ok()?.get("status")?.as_str().map(String::from));
        let name = stage.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        notes.push(format!("{name} {}", status.as_deref().unwrap_or("(no record)")));
    }
    if pipeline.join("report.md").exists() {
        notes.push("report.md present".into());
    }
    notes.join(", ")
}

// ---------------------------------------------------------------------------------------
// Child processes.

fn launch(ctx: &Ctx, args: &[String], log: &Path) -> Result<Child> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    }
    let file = File::create(log).with_context(|| log.display().to_string())?;
    let err = file.try_clone().context("duplicating the log handle")?;
    Command::new(ctx.align)
        .args(args)
        .env("RAYON_NUM_THREADS", ctx.threads.to_string())
        // The last INFO event is read back after a kill: where it landed.
        .env("RUST_LOG", "info")
        // A failed launch is reported by its error's last lines, not a backtrace.
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {} {}", ctx.align.display(), args.join(" ")))
}

/// When to kill a launch.
#[derive(Clone, Copy)]
enum Trigger {
    /// Let it finish.
    Never,
    /// This long after the start.
    After(Duration),
    /// The second duration after a checkpoint write (a `step-N.tmp` directory) is first
    /// seen, once the first has passed.
    InCheckpointWrite(Duration, Duration),
}

enum Ended {
    Exited(ExitStatus),
    /// Killed this many seconds after its start.
    Killed(f64),
    Hung,
}

/// Wait for the child until its trigger fires (then SIGKILL it) or it exits; a child that
/// outlives `hang` is killed as hung. `watched`: the `checkpoints/` directories a write
/// shows up in.
fn wait_or_kill(child: &mut Child, trigger: Trigger, watched: &[PathBuf], hang: Duration) -> Result<Ended> {
    let start = Instant::now();
    let mut seen_write: Option<Instant> = None;
    loop {
        if let Some(status) = child.try_wait().context("polling the child")? {
            return Ok(Ended::Exited(status));
        }
        let now = start.elapsed();
        let fire = match trigger {
            Trigger::Never => false,
            Trigger::After(at) => now >= at,
            Trigger::InCheckpointWrite(after, into) => {
                if seen_write.is_none() && now >= after && writing_checkpoint(watched) {
                    seen_write = Some(Instant::now());
                }
                seen_write.is_some_and(|t| t.elapsed() >= into)
            }
        };
        if fire || now >= hang {
            // Child::kill is SIGKILL on Unix: no handler, no flush, no cleanup.
            child.kill().context("killing the child")?;
            child.wait().context("reaping the killed child")?;
            return Ok(if fire { Ended::Killed(now.as_secs_f64()) } else { Ended::Hung });
        }
        // Short sleeps: a kill is meant to land anywhere, to the millisecond.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Whether a checkpoint is being written: a `step-N.tmp` directory exists.
fn writing_checkpoint(watched: &[PathBuf]) -> bool {
    watched.iter().any(|d| {
        std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".tmp")))
    })
}

/// The last lines of a log, for an error message.
fn tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Why a launch failed, on one line: its error and causes (or panic), else its last lines.
fn failure(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let from = lines.iter().rposition(|l| l.starts_with("Error:") || l.contains("panicked at"));
    let shown = match from {
        Some(i) => &lines[i..(i + 8).min(lines.len())],
        None => &lines[lines.len().saturating_sub(4)..],
    };
    shown.iter().map(|l| l.trim()).collect::<Vec<_>>().join(" | ")
}

/// The last log event without its timestamp and level: where the kill landed.
fn last_event(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let Some(line) = text.lines().rev().find(|l| l.contains(" INFO ") || l.contains(" WARN ")) else {
        return "(nothing logged yet)".into();
    };
    let event = line.split_once(": ").map_or(line, |(_, rest)| rest);
    let short: String = event.chars().take(90).collect();
    if short.len() < event.len() { format!("{short}…") } else { short }
}

// ---------------------------------------------------------------------------------------
// Checkpoints: what resume would trust must load.

/// What a kill left under an output directory's `checkpoints/` directories.
struct Scan {
    /// Checkpoint directories resume lists (they hold `trainer_state.json`).
    complete: usize,
    /// Per `checkpoints/` directory: its complete steps and its leftovers.
    dirs: Vec<(String, Vec<usize>, Vec<String>)>,
    unusable: Vec<String>,
}

impl Scan {
    fn describe(&self) -> String {
        if self.dirs.is_empty() {
            return "no checkpoints directory yet".into();
        }
        let one = |(name, steps, left): &(String, Vec<usize>, Vec<String>)| {
            let steps: Vec<String> = steps.iter().map(usize::to_string).collect();
            let mut s = format!("{name} [{}]", steps.join(","));
            if !left.is_empty() {
                s.push_str(&format!(" + {}", left.join(",")));
            }
            s
        };
        self.dirs.iter().map(one).collect::<Vec<_>>().join(", ")
    }
}

/// The files a complete checkpoint holds (PPO's critic in a subdirectory), per
/// `checkpoints/` directory (by its path under the run), learnt from the reference run.
fn checkpoint_files(run: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    for ck in checkpoint_dirs(run) {
        let want: &mut BTreeSet<String> = out.entry(relative(run, &ck)).or_default();
        for step in read_dir(&ck).into_iter().filter(|d| d.join("trainer_state.json").exists()) {
            want.extend(files(&step));
        }
    }
    out
}

/// Every `checkpoints/` directory under a run (a pipeline has one per training stage).
fn checkpoint_dirs(run: &Path) -> Vec<PathBuf> {
    let mut found = vec![];
    let mut stack = vec![run.to_path_buf()];
    while let Some(d) = stack.pop() {
        for p in read_dir(&d).into_iter().filter(|p| p.is_dir()) {
            if p.file_name().is_some_and(|n| n == "checkpoints") {
                found.push(p);
            } else {
                stack.push(p);
            }
        }
    }
    found.sort();
    found
}

/// Check every checkpoint as resume sees it (crates/pipeline/src/train/checkpoint.rs):
/// `step-N` with `trainer_state.json` is complete and must load in full; the newest such
/// is the one resume picks. `step-N.tmp` and `step-N` without `trainer_state.json` are
/// ignored by resume, so they are only leftovers.
fn scan_checkpoints(run: &Path, expected: &BTreeMap<String, BTreeSet<String>>) -> Scan {
    let mut scan = Scan { complete: 0, dirs: vec![], unusable: vec![] };
    for ck in checkpoint_dirs(run) {
        let key = relative(run, &ck);
        let want = expected.get(&key).cloned().unwrap_or_default();
        let (mut steps, mut left) = (vec![], vec![]);
        for d in read_dir(&ck) {
            let name = d.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            match name.strip_prefix("step-").and_then(|n| n.parse::<usize>().ok()) {
                Some(step) if d.join("trainer_state.json").exists() => steps.push((step, d)),
                _ => left.push(name),
            }
        }
        steps.sort();
        let newest = steps.last().map(|(s, _)| *s);
        for (step, d) in &steps {
            if let Err(e) = check_checkpoint(d, *step, &want) {
                // The newest is unusable (resume picks it); an older one is damaged: resume
                // passes it over, but `checkpoints()` and `align pipeline` list it as complete.
                let role = match Some(*step) == newest {
                    true => "UNUSABLE: the one resume picks",
                    false => "damaged: listed as complete, not the one resume picks",
                };
                scan.unusable.push(format!("{} ({role}): {e:#}", relative(run, d)));
            }
        }
        scan.complete += steps.len();
        // A pipeline's stages are named by their directory.
        let label = key.strip_suffix("/checkpoints").map_or("checkpoints", |p| p.rsplit('/').next().unwrap_or(p));
        scan.dirs.push((label.to_string(), steps.into_iter().map(|(s, _)| s).collect(), left));
    }
    scan
}

/// A complete checkpoint must hold every file the reference's do, each whole: JSON that
/// parses, safetensors whose header covers the file exactly, and `trainer_state.json` of
/// its own step.
fn check_checkpoint(dir: &Path, step: usize, want: &BTreeSet<String>) -> Result<()> {
    for f in want {
        if !dir.join(f).exists() {
            bail!("{f} is missing");
        }
    }
    for name in files(dir) {
        let f = dir.join(&name);
        if name.ends_with(".safetensors") {
            check_safetensors(&f).with_context(|| name.clone())?;
        } else if name.ends_with(".json") {
            let text = std::fs::read_to_string(&f).with_context(|| name.clone())?;
            serde_json::from_str::<Value>(&text).with_context(|| format!("{name} does not parse"))?;
        }
    }
    let state: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("trainer_state.json"))?)?;
    if state.get("step").and_then(Value::as_u64) != Some(step as u64) {
        bail!("trainer_state.json holds step {:?}, not {step}", state.get("step"));
    }
    Ok(())
}

/// A safetensors file is whole when its header parses and its tensors end where the file does.
fn check_safetensors(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path)?;
    let n = u64::from_le_bytes(bytes.get(..8).context("shorter than its header length")?.try_into()?) as usize;
    let header = bytes.get(8..8 + n).context("shorter than its header")?;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(header).context("header does not parse")?;
    let end = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(_, t)| t.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0) as usize;
    if 8 + n + end != bytes.len() {
        bail!("{} bytes, its header says {}", bytes.len(), 8 + n + end);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Comparison with the reference.

#[derive(Default)]
struct Comparison {
    differences: Vec<String>,
    leftovers: Vec<String>,
}

/// Every file of the finished run against the reference's: JSON and JSONL as values with
/// the wall-clock fields removed (JSONL row by row), everything else byte for byte.
/// Temporary files and checkpoint directories resume ignores are leftovers, not files.
fn compare_trees(reference: &Path, run: &Path) -> Comparison {
    let mut cmp = Comparison::default();
    let (want, got) = (files(reference), files(run));
    let (leftover, got): (BTreeSet<String>, BTreeSet<String>) = got.into_iter().partition(|f| is_leftover(run, f));
    cmp.leftovers = leftover.into_iter().collect();
    // TensorBoard files are named and stamped by wall time: compared per directory as the
    // scalars they hold, timings left out, like metrics.jsonl.
    let events = |files: &BTreeSet<String>| -> BTreeSet<String> {
        files.iter().filter(|f| f.contains("tfevents")).map(|f| parent_of(f)).collect()
    };
    for dir in events(&want).union(&events(&got)) {
        match (logged_scalars(&reference.join(dir)), logged_scalars(&run.join(dir))) {
            (Ok(a), Ok(b)) if a == b => {}
            (Ok(a), Ok(b)) => {
                let tag = a.keys().chain(b.keys()).find(|k| a.get(*k) != b.get(*k)).cloned().unwrap_or_default();
                cmp.differences.push(format!(
                    "{dir}/events.out.tfevents.*: `{tag}` is {:?}, the reference {:?}",
                    b.get(&tag),
                    a.get(&tag)
                ));
            }
            (Err(e), _) | (_, Err(e)) => cmp.differences.push(format!("{dir}/events.out.tfevents.*: {e:#}")),
        }
    }
    let (want, got): (BTreeSet<String>, BTreeSet<String>) = (
        want.into_iter().filter(|f| !f.contains("tfevents")).collect(),
        got.into_iter().filter(|f| !f.contains("tfevents")).collect(),
    );
    for f in want.difference(&got) {
        cmp.differences.push(format!("{f} is missing"));
    }
    for f in got.difference(&want) {
        cmp.differences.push(format!("{f} is not in the reference"));
    }
    for f in want.intersection(&got) {
        // A file that cannot be read or parsed (a torn JSON line) is a difference too.
        match compare_file(&reference.join(f), &run.join(f)) {
            Ok(None) => {}
            Ok(Some(d)) => cmp.differences.push(format!("{f}: {d}")),
            Err(e) => cmp.differences.push(format!("{f}: {e:#}")),
        }
    }
    cmp
}

/// The directory part of a relative path (`""` at the top).
fn parent_of(rel: &str) -> String {
    rel.rsplit_once('/').map_or(String::new(), |(dir, _)| dir.to_string())
}

/// A run directory's TensorBoard scalars without the timing tags.
fn logged_scalars(dir: &Path) -> Result<BTreeMap<String, Vec<(i64, f32)>>> {
    let mut scalars = align_pipeline::train::tensorboard::logged_scalars(dir)?;
    scalars.retain(|tag, _| !is_timing(tag));
    Ok(scalars)
}

/// A temporary file (`*.tmp`, or `write_atomic`'s `*.tmp<pid>`), something under a `*.tmp`
/// directory, or anything under `checkpoints/` but a complete `step-N` (resume reads
/// nothing else there).
fn is_leftover(run: &Path, rel: &str) -> bool {
    let tmp = |part: &str| part.rsplit_once(".tmp").is_some_and(|(_, pid)| pid.chars().all(|c| c.is_ascii_digit()));
    let parts: Vec<&str> = rel.split('/').collect();
    if parts.iter().any(|p| tmp(p)) {
        return true;
    }
    parts.windows(2).enumerate().any(|(i, w)| {
        w[0] == "checkpoints" && {
            let dir: PathBuf = parts[..i + 2].iter().collect();
            let step = w[1].strip_prefix("step-").is_some_and(|n| n.parse::<usize>().is_ok());
            !step || !run.join(dir).join("trainer_state.json").exists()
        }
    })
}

fn compare_file(a: &Path, b: &Path) -> Result<Option<String>> {
    let name = a.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if name.ends_with(".jsonl") {
        return compare_jsonl(a, b);
    }
    let (x, y) = (std::fs::read(a)?, std::fs::read(b)?);
    if name.ends_with(".json") {
        let (mut x, mut y): (Value, Value) = (serde_json::from_slice(&x)?, serde_json::from_slice(&y)?);
        strip_timings(&mut x);
        strip_timings(&mut y);
        return Ok(first_difference(&x, &y, ""));
    }
    if x == y {
        return Ok(None);
    }
    let at = x.iter().zip(&y).position(|(p, q)| p != q).unwrap_or(x.len().min(y.len()));
    Ok(Some(format!("bytes differ ({} vs {} bytes, first at byte {at})", x.len(), y.len())))
}

fn compare_jsonl(a: &Path, b: &Path) -> Result<Option<String>> {
    let rows = |p: &Path| -> Result<Vec<Value>> {
        let text = std::fs::read_to_string(p)?;
        text.lines()
            .enumerate()
            .map(|(i, l)| {
                let mut v: Value = serde_json::from_str(l).with_context(|| format!("line {} does not parse", i + 1))?;
                strip_timings(&mut v);
                Ok(v)
            })
            .collect()
    };
    let (x, y) = (rows(a)?, rows(b)?);
    for (i, (p, q)) in x.iter().zip(&y).enumerate() {
        if let Some(d) = first_difference(p, q, "") {
            let step = p.get("step").map_or(String::new(), |s| format!(" (step {s})"));
            return Ok(Some(format!("row {}{step}: {d}", i + 1)));
        }
    }
    Ok((x.len() != y.len()).then(|| format!("{} rows, the reference has {}", y.len(), x.len())))
}

fn is_timing(key: &str) -> bool {
    TIMINGS.contains(&key.strip_prefix("eval_").unwrap_or(key))
}

fn strip_timings(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|k, _| !is_timing(k));
            m.values_mut().for_each(strip_timings);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_timings),
        _ => {}
    }
}

/// Where two JSON values first differ, as `path: reference vs run`.
fn first_difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    let at = |k: &str| if path.is_empty() { k.to_string() } else { format!("{path}.{k}") };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| match (x.get(k), y.get(k)) {
                (Some(p), Some(q)) => first_difference(p, q, &at(k)),
                (p, q) => Some(format!("{}: {} vs {}", at(k), show(p), show(q))),
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            x.iter().zip(y).enumerate().find_map(|(i, (p, q))| first_difference(p, q, &at(&i.to_string())))
        }
        _ => (a != b).then(|| format!("{}: {a} vs {b}", if path.is_empty() { "value" } else { path })),
    }
}

fn show(v: Option<&Value>) -> String {
    v.map_or("(absent)".into(), Value::to_string)
}

/// Files under `dir`, as `/`-separated paths relative to it.
fn files(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for p in read_dir(&d) {
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(relative(dir, &p));
            }
        }
    }
    out
}

fn read_dir(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(dir).into_iter().flatten().filter_map(|e| e.ok().map(|e| e.path())).collect();
    v.sort();
    v
}

fn relative(base: &Path, p: &Path) -> String {
    let rel = p.strip_prefix(base).unwrap_or(p);
    rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
}

// ---------------------------------------------------------------------------------------
// Output.

fn print_table(reports: &[Report], seconds: f64) {
    println!();
    println!(
        "| scenario | kills survived | resumes | kills during resume | of which before a step | kills before a checkpoint | kills mid-checkpoint | rounds (failed) | reference s | soak s | result |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in reports {
        println!(
            "| {} | {}/{} | {} | {} | {} | {} | {} | {} ({}) | {:.2} | {:.1} | {} |",
            r.name,
            r.kills_survived,
            r.kills.len(),
            r.resumes,
            r.kills_during_resume(),
            r.kills_before_first_step,
            r.kills_before_checkpoint,
            r.kills_mid_checkpoint,
            r.rounds,
            r.failed_rounds,
            r.reference_seconds,
            r.seconds,
            verdict(r)
        );
    }
    let kills: usize = reports.iter().map(|r| r.kills.len()).sum();
    let survived: usize = reports.iter().map(|r| r.kills_survived).sum();
    let passed = reports.iter().filter(|r| r.passed()).count();
    println!();
    println!(
        "soak: {survived}/{kills} kills survived, {passed}/{} scenarios identical in every round, {seconds:.0} s",
        reports.len()
    );
    for r in reports.iter().filter(|r| !r.leftovers.is_empty()) {
        let l: Vec<&String> = r.leftovers.iter().collect();
        println!("soak: {}: leftovers in finished runs (ignored by resume): {l:?}", r.name);
    }
}

fn verdict(r: &Report) -> String {
    let mut parts = vec![];
    if let Some(u) = r.unusable.first() {
        parts.push(format!("broken checkpoint: {u}"));
    }
    if let Some(d) = r.differences.first() {
        parts.push(format!("differs: {d}"));
    }
    let more = (r.unusable.len() + r.differences.len()).saturating_sub(parts.len());
    if more > 0 {
        parts.push(format!("(+{more} more in summary.json)"));
    }
    if parts.is_empty() { "identical".into() } else { parts.join("; ") }
}

fn write_summary(path: &Path, a: &SoakArgs, reports: &[Report], seconds: f64) -> Result<()> {
    let scenario = |r: &Report| {
        let kills: Vec<Value> = r
            .kills
            .iter()
            .map(|k| {
                json!({"round": k.round, "launch": k.launch, "resuming": k.resuming, "aimed": k.aimed, "delay_s": k.delay,
                       "found": k.found, "last_log": k.last_log})
            })
            .collect();
        json!({
            "name": r.name, "result": if r.passed() { "identical" } else { "failed" },
            "kills": r.kills.len(), "kills_survived": r.kills_survived, "budget": r.budget, "resumes": r.resumes,
            "failed_rounds": r.failed_rounds,
            "kills_during_resume": r.kills_during_resume(), "kills_before_checkpoint": r.kills_before_checkpoint,
            "kills_before_first_step": r.kills_before_first_step,
            "kills_mid_checkpoint": r.kills_mid_checkpoint,
            "rounds": r.rounds, "reference_seconds": r.reference_seconds, "seconds": r.seconds,
            "broken_checkpoints": r.unusable, "differences": r.differences, "leftovers": r.leftovers, "kill_log": kills,
        })
    };
    let summary = json!({
        "kills": a.kills, "seed": a.seed, "threads": a.threads, "seconds": seconds,
        "passed": reports.iter().all(Report::passed),
        "scenarios": reports.iter().map(scenario).collect::<Vec<_>>(),
    });
    std::fs::write(path, serde_json::to_string_pretty(&summary)?).with_context(|| path.display().to_string())?;
    eprintln!("soak: wrote {}", path.display());
    Ok(())
}
