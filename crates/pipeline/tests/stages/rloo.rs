//! RLOO on a tiny checkpoint: the policy learns what its reward asks, the KL penalty to the
//! reference starts at zero, off-policy passes run, and a killed run resumes to the same
//! numbers.

use crate::common::{metrics, rl_config, tmp};
use std::path::Path;

use align_model::backend::Cpu;
use align_pipeline::config::StageConfig;
use align_pipeline::rloo::run_rloo;

/// Eight prompts with a ground truth each.
fn data(dir: &Path) -> std::path::PathBuf {
    let f = dir.join("prompts.jsonl");
    let rows: String =
        (0..8).map(|i| format!("{{\"prompt\": \"Question {i}: what comes next?\", \"answer\": \"{i}\"}}\n")).collect();
    std::fs::write(&f, rows).unwrap();
    f
}

fn config(out: &Path, data: &Path, training: &str, rloo: &str) -> StageConfig {
    rl_config(out, data, training, "rloo", rloo, "")
}

/// Shorter is better, and a completion ends at its first "e".
const SHORT: &str = r#"num_generations = 4
max_completion_length = 8
stop_strings = ["e"]
rewards = [{ kind = "length", max_tokens = 8, cache_tokens = 8 }]"#;

#[test]
fn rloo_raises_its_reward() {
    let d = tmp("rloo-learn");
    let f = data(&d);
    let training = "per_device_train_batch_size = 8\ngradient_accumulation_steps = 2\nlearning_rate = 2e-2\nmax_steps = 12\neval_steps = 12";
    let cfg = config(&d.join("run"), &f, training, SHORT);
    run_rloo::<Cpu>(&cfg, false, &Default::default()).unwrap();
    let m = metrics(&d.join("run"));
    assert_eq!(m.len(), 12);
    let reward =
        |r: &[align_pipeline::train::StepMetrics]| r.iter().map(|m| m.extra["reward"]).sum::<f64>() / r.len() as f64;
    let (first, last) = (reward(&m[..3]), reward(&m[9..]));
    eprintln!("rloo mean reward {first:.3} → {last:.3}, kl {} → {}", m[0].extra["kl"], m[11].extra["kl"]);
    assert!(last > first + 0.1, "mean reward {first:.3} → {last:.3}");
    // The policy is its frozen reference until the first update: the sequence KL is ~0.
    assert!(m[0].extra["kl"].abs() < 1e-3, "{}", m[0].extra["kl"]);
    for k in ["rewards/length/mean", "completions/mean_length", "entropy", "clip_ratio/region_mean", "eval_reward"] {
        assert!(m[11].extra.contains_key(k), "{k} logged: {:?}", m[11].extra.keys());
    }
    let rows = std::fs::read_to_string(d.join("run/completions.jsonl")).unwrap();
    assert_eq!(rows.lines().count(), 12 * 16);
    let row: serde_json::Value = serde_json::from_str(rows.lines().next().unwrap()).unwrap();
    assert!(row["advantage"].is_f64() && row["length"].is_f64() && row["step"] == 1);
    assert!(d.join("run/final/model.safetensors").exists());
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn a_killed_run_resumes_to_the_same_numbers() {
    let d = tmp("rloo-resume");
    let f = data(&d);
    let training = "per_device_train_batch_size = 4\ngradient_accumulation_steps = 2\nlearning_rate = 1e-2\nmax_steps = 4\nsave_steps = 2";
    let rloo = format!("{SHORT}\nnum_iterations = 2\nbeta = 0.0\nnormalize_advantages = true");
    let whole = config(&d.join("whole"), &f, training, &rloo);
    run_rloo::<Cpu>(&whole, false, &Default::default()).unwrap();
    let cut = config(&d.join("cut"), &f, training, &rloo);
    run_rloo::<Cpu>(&cut, false, &Default::default()).unwrap();
    std::fs::remove_dir_all(d.join("cut/final")).unwrap();
    run_rloo::<Cpu>(&cut, true, &Default::default()).unwrap();
    let (a, b) = (metrics(&d.join("whole")), metrics(&d.join("cut")));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x.loss.unwrap() - y.loss.unwrap()).abs() < 1e-6, "step {}: {:?} vs {:?}", x.step, x.loss, y.loss);
        assert_eq!(x.extra["reward"], y.extra["reward"], "step {}", x.step);
    }
    // Passes after the first are off-policy: the ratio moves from 1 and some clip at lr 1e-2.
    assert!(a.iter().any(|r| r.extra["clip_ratio/region_mean"] > 0.0), "an off-policy pass clips at lr 1e-2");
    let rows = |p: &str| std::fs::read_to_string(d.join(p)).unwrap();
    assert_eq!(rows("whole/completions.jsonl"), rows("cut/completions.jsonl"));
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn an_rloo_config_needs_rewards_and_groups() {
    let d = tmp("rloo-bad");
    let f = data(&d);
    let cfg = config(&d.join("a"), &f, "per_device_train_batch_size = 4", "num_generations = 4");
    let e = run_rloo::<Cpu>(&cfg, false, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("reward function"), "{e}");
    let cfg = config(
        &d.join("b"),
        &f,
        "per_device_train_batch_size = 4",
        &SHORT.replace("num_generations = 4", "num_generations = 1"),
    );
    let e = run_rloo::<Cpu>(&cfg, false, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("num_generations"), "{e}");
    let cfg = config(&d.join("c"), &f, "per_device_train_batch_size = 3", SHORT);
    let e = run_rloo::<Cpu>(&cfg, false, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("num_generations"), "{e}");
    std::fs::remove_dir_all(&d).ok();
}
