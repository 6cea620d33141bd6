//! Pipelines end to end: the built-in demo, shortened, improves each stage's own metric
//! with a fixed seed; a pipeline killed mid-stage finishes with the numbers of one that was
//! not; a changed stage re-runs with everything downstream of it and nothing upstream.
//!
//! Paths in pipeline files are relative to the working directory (the repository root),
//! so each test runs there.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::{root, tmp};
use align_model::backend::Cpu;
use align_pipeline::recipe::{Options, StageState, list, load, run_pipeline};

fn at_root() -> PathBuf {
    let r = root().canonicalize().unwrap();
    std::env::set_current_dir(&r).unwrap();
    r
}

fn options(runs: &Path, sets: &[&str]) -> Options {
    let mut all = vec![format!("runs_dir={}", runs.display())];
    all.extend(sets.iter().map(|s| s.to_string()));
    Options { sets: all, smoke: false, fetch: None }
}

#[test]
fn the_demo_improves_every_stage() {
    let r = at_root();
    let runs = tmp("demo");
    // The demo with a shorter GRPO stage.
    let short = ["stages.grpo.training.max_steps=100", "stages.dpo.training.max_steps=100"];
    let opts = options(&runs, &short);
    let p = load(&r.join("pipelines/demo.toml"), &opts).unwrap();
    let report = run_pipeline::<Cpu>(&p, None, false, &Default::default()).unwrap();
    let get = |stage: &str, metric: &str| -> f64 {
        let row = report.row(stage).unwrap_or_else(|| panic!("no row {stage}"));
        *row.evals.get(metric).unwrap_or_else(|| panic!("{stage}: no {metric} in {:?}", row.evals))
    };
    let acc = |stage: &str| get(stage, "arith/accuracy");
    eprintln!("{}", report.markdown());
    assert!(acc("untrained") < 0.05, "untrained {}", acc("untrained"));
    assert!(acc("sft") > acc("untrained") + 0.2, "sft {} vs untrained {}", acc("sft"), acc("untrained"));
    assert!(get("sft", "arith_greedy/accuracy") > 0.4, "{}", get("sft", "arith_greedy/accuracy"));
    assert!(get("reward", "pairs/accuracy") >= 0.9, "reward model {}", get("reward", "pairs/accuracy"));
    assert!(acc("grpo") > acc("sft") + 0.05, "grpo {} vs sft {}", acc("grpo"), acc("sft"));
    // DPO on pairs sampled from the SFT model (a right answer against a wrong one) raises
    // generation accuracy too.
    assert!(get("samples", "best_of_n/pairs") >= 1000.0, "{}", get("samples", "best_of_n/pairs"));
    assert!(acc("dpo") > acc("sft") + 0.02, "dpo {} vs sft {}", acc("dpo"), acc("sft"));
    // Its own metric, the implicit reward's accuracy on held-out synthetic pairs, is 0 at
    // step 0 (policy = reference: every margin is 0) and rises.
    let dpo = crate::common::metrics(&runs.join("demo/dpo"));
    let pref: Vec<f64> = dpo.iter().filter_map(|m| m.extra.get("eval_rewards/accuracies").copied()).collect();
    assert_eq!(dpo[0].step, 0);
    assert!(pref.len() >= 2 && pref[0] < 0.5 && pref[pref.len() - 1] > 0.5, "{pref:?}");
    assert!(runs.join("demo/report.md").exists() && runs.join("demo/loss.png").exists());

    // Everything is done: a second run skips every stage and reports the same numbers.
    let again = run_pipeline::<Cpu>(&p, None, false, &Default::default()).unwrap();
    assert_eq!(again.rows, report.rows);
    // A changed DPO stage re-runs alone; the stages above it stay done.
    let changed =
        load(&r.join("pipelines/demo.toml"), &options(&runs, &[short[0], short[1], "stages.dpo.dpo.beta=0.2"]))
            .unwrap();
    let states = list(&changed).unwrap();
    let state = |n: &str| states.iter().find(|(s, _, _)| s == n).unwrap().2.clone();
    assert_eq!(state("dpo"), StageState::Changed);
    for s in ["untrained", "reward", "grpo"] {
        assert_eq!(state(s), StageState::Done, "{s}");
    }
    // A changed SFT stage changes everything downstream of it.
    let sft = load(
        &r.join("pipelines/demo.toml"),
        &options(&runs, &[short[0], short[1], "stages.sft.training.max_steps=100"]),
    )
    .unwrap();
    let states = list(&sft).unwrap();
    for (name, _, st) in &states {
        let expected = if name == "untrained" { StageState::Done } else { StageState::Changed };
        assert_eq!(*st, expected, "{name}");
    }
}

/// A short SFT → GRPO pipeline run by the `align` binary, killed once SFT has checkpointed,
/// then run again: the report equals that of an uninterrupted run.
#[test]
fn a_killed_pipeline_resumes_to_the_same_report() {
    let r = at_root();
    let sets = [
        "stages.sft.training.max_steps=60",
        "stages.sft.training.save_steps=20",
        "stages.grpo.training.max_steps=6",
        "stages.grpo.training.gradient_accumulation_steps=1",
        "stages.grpo.training.eval_steps=3",
        "stages.grpo.training.save_steps=2",
    ];
    // Only the first stages: `untrained`, `sft`, `reward` (short), `grpo`; DPO is left out
    // by running up to `grpo` stage by stage.
    let run = |runs: &Path, kill_after: Option<&str>| {
        let mut args: Vec<String> = vec!["pipeline".into(), "pipelines/demo.toml".into()];
        for s in options(runs, &sets).sets.iter().chain(["stages.reward.training.max_steps=20".to_string()].iter()) {
            args.push("--set".into());
            args.push(s.clone());
        }
        for stage in ["untrained", "sft", "reward", "grpo"] {
            let mut a = args.clone();
            a.extend(["--stage".into(), stage.into()]);
            let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_align"))
                .args(&a)
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            if kill_after == Some(stage) {
                // Kill once a checkpoint past the first is written, mid-stage.
                let ck = runs.join("demo/sft/checkpoints/step-40");
                let start = Instant::now();
                while !ck.exists() && start.elapsed() < Duration::from_secs(300) {
                    if child.try_wait().unwrap().is_some() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                child.kill().ok();
                child.wait().unwrap();
                let p = load(&r.join("pipelines/demo.toml"), &options(runs, &sets)).unwrap();
                assert!(
                    matches!(
                        p.stage(stage).map(|s| align_pipeline::recipe::run::state(s).unwrap()),
                        Ok(StageState::Interrupted(_))
                    ),
                    "the kill landed mid-stage"
                );
                let status = std::process::Command::new(env!("CARGO_BIN_EXE_align"))
                    .args(&a)
                    .stdout(std::process::Stdio::null())
                    .status()
                    .unwrap();
                assert!(status.success());
            } else {
                assert!(child.wait().unwrap().success(), "stage {stage}");
            }
        }
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(runs.join("demo/report.json")).unwrap()).unwrap();
        report
    };
    let whole = run(&tmp("pipeline-whole"), None);
    let resumed = run(&tmp("pipeline-killed"), Some("sft"));
    assert_eq!(whole["rows"], resumed["rows"]);
}

/// Every recipe in `pipelines/` resolves, full size and `--smoke`: its stage configs parse,
/// pass their section checks and reference only stages above them (the fetched base stands
/// in as the tiny checkpoint: nothing is run).
#[test]
fn every_recipe_resolves() {
    let r = at_root();
    fn tiny(_: &str) -> anyhow::Result<PathBuf> {
        Ok(root().join("fixtures/models/llama-tied"))
    }
    let mut n = 0;
    for f in std::fs::read_dir(r.join("pipelines")).unwrap() {
        let f = f.unwrap().path();
        if f.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        for smoke in [false, true] {
            let opts = Options { sets: vec![], smoke, fetch: Some(tiny) };
            let p = load(&f, &opts).unwrap_or_else(|e| panic!("{}: {e:#}", f.display()));
            assert!(!p.stages.is_empty(), "{}", f.display());
        }
        n += 1;
    }
    assert!(n >= 7, "{n} recipes");
}
