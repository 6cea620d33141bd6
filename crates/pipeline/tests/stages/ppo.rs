//! PPO on a tiny checkpoint: the reward-model score rises, the KL to the reference starts
//! at zero, the adaptive controller moves the coefficient as Ziegler et al. prescribe, both
//! critic layouts train, and a killed run resumes to the same numbers.

use crate::common::{metrics, rl_config, root, tmp};
use std::path::Path;

use align_model::backend::Cpu;
use align_pipeline::config::StageConfig;
use align_pipeline::ppo::run_ppo;

fn data(dir: &Path) -> std::path::PathBuf {
    let f = dir.join("prompts.jsonl");
    let rows: String =
        (0..16).map(|i| format!("{{\"prompt\": \"Tell me about number {i}.\", \"answer\": \"{i}\"}}\n")).collect();
    std::fs::write(&f, rows).unwrap();
    f
}

fn config(out: &Path, data: &Path, training: &str, ppo: &str, extra: &str) -> StageConfig {
    let tiny = root().join("fixtures/models/llama-tied");
    let body = format!(
        "max_completion_length = 8\ntemperature = 1.0\nrewards = [{{ kind = \"model\", path = \"{}\" }}]\n{ppo}",
        tiny.display()
    );
    rl_config(out, data, training, "ppo", &body, extra)
}

#[test]
fn ppo_raises_the_reward_model_score_with_a_separate_critic() {
    let d = tmp("ppo-learn");
    let f = data(&d);
    let training = "per_device_train_batch_size = 8\ngradient_accumulation_steps = 2\nlearning_rate = 1e-2\nmax_steps = 10\neval_steps = 10\neval_on_start = true";
    let cfg = config(&d.join("run"), &f, training, "kl_coef = 0.01", "");
    run_ppo::<Cpu>(&cfg, false, &Default::default()).unwrap();
    let m = metrics(&d.join("run"));
    assert_eq!(m.len(), 11);
    let train = &m[1..];
    // The policy is the reference until its first update: the rollout's KL is ~0.
    assert!(train[0].extra["objective/kl"].abs() < 1e-3, "{}", train[0].extra["objective/kl"]);
    assert!(train[9].extra["objective/kl"] > 1e-3);
    let score = |r: &[align_pipeline::train::StepMetrics]| {
        r.iter().map(|m| m.extra["objective/scores"]).sum::<f64>() / r.len() as f64
    };
    let (first, last) = (score(&train[..3]), score(&train[7..]));
    assert!(last > first, "reward-model score {first:.4} → {last:.4}");
    assert!(m[10].extra["eval_reward"] > m[0].extra["eval_reward"], "held-out reward rises");
    for k in [
        "policy/approxkl_avg",
        "policy/clipfrac_avg",
        "loss/value_avg",
        "val/clipfrac_avg",
        "objective/rlhf_reward",
        "kl_coef",
    ] {
        assert!(train[0].extra.contains_key(k), "{k}");
    }
    assert!(d.join("run/final/model.safetensors").exists());
    assert!(d.join("run/final/value_model/model.safetensors").exists());
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn adaptive_kl_moves_the_coefficient_toward_the_target() {
    let d = tmp("ppo-akl");
    let f = data(&d);
    let training = "per_device_train_batch_size = 4\nlearning_rate = 1e-3\nmax_steps = 4";
    // A target far above the measured KL: the error clips at −0.2 every update.
    let ppo = "adaptive_kl = true\nkl_coef = 0.2\nkl_target = 1000.0\nkl_horizon = 40.0\nnum_ppo_epochs = 1\ncritic = \"shared\"";
    let cfg = config(&d.join("run"), &f, training, ppo, "");
    run_ppo::<Cpu>(&cfg, false, &Default::default()).unwrap();
    let m = metrics(&d.join("run"));
    let mut want = 0.2;
    for row in &m {
        assert!((row.extra["kl_coef"] - want).abs() < 1e-12, "step {}: {} vs {want}", row.step, row.extra["kl_coef"]);
        want *= 1.0 - 0.2 * 4.0 / 40.0;
    }
    assert!(d.join("run/final/value_head.safetensors").exists());
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn a_killed_run_resumes_to_the_same_numbers() {
    let d = tmp("ppo-resume");
    let f = data(&d);
    let training = "per_device_train_batch_size = 4\ngradient_accumulation_steps = 2\nlearning_rate = 1e-2\nmax_steps = 4\nsave_steps = 2";
    let lora = "[lora]\nr = 4\nlora_alpha = 8\nlora_dropout = 0.0\ntarget_modules = \"all-linear\"\n";
    for (name, ppo) in [
        ("separate", "num_mini_batches = 2\nadaptive_kl = true\nkl_target = 0.01\nkl_horizon = 10.0"),
        ("shared", "critic = \"shared\""),
    ] {
        let whole = config(&d.join(format!("{name}-whole")), &f, training, ppo, lora);
        run_ppo::<Cpu>(&whole, false, &Default::default()).unwrap();
        let cut = config(&d.join(format!("{name}-cut")), &f, training, ppo, lora);
        run_ppo::<Cpu>(&cut, false, &Default::default()).unwrap();
        std::fs::remove_dir_all(d.join(format!("{name}-cut/final"))).unwrap();
        run_ppo::<Cpu>(&cut, true, &Default::default()).unwrap();
        let (a, b) = (metrics(&d.join(format!("{name}-whole"))), metrics(&d.join(format!("{name}-cut"))));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x.loss.unwrap() - y.loss.unwrap()).abs() < 1e-6,
                "{name} step {}: {:?} vs {:?}",
                x.step,
                x.loss,
                y.loss
            );
            assert_eq!(x.extra["objective/scores"], y.extra["objective/scores"], "{name} step {}", x.step);
            // f64 noise from the log-probs of a reloaded adapter, far below any effect.
            let (ka, kb) = (x.extra["kl_coef"], y.extra["kl_coef"]);
            assert!((ka - kb).abs() <= 1e-12 * ka.abs(), "{name} step {}: {ka} vs {kb}", x.step);
        }
    }
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn a_ppo_config_needs_its_rewards() {
    let d = tmp("ppo-bad");
    let f = data(&d);
    let mut cfg = config(&d.join("run"), &f, "", "", "");
    cfg.ppo.as_mut().unwrap().rewards.clear();
    let e = run_ppo::<Cpu>(&cfg, false, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("reward function"), "{e}");
    let e = toml::from_str::<StageConfig>(&format!(
        "{}\n[dpo]\n",
        std::fs::read_to_string(d.join("run/config.toml")).unwrap_or_default()
    ));
    assert!(e.is_err() || e.unwrap().check_sections("ppo", Some("ppo")).is_err());
    std::fs::remove_dir_all(&d).ok();
}
