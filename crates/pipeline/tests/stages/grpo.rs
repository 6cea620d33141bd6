//! GRPO on a tiny checkpoint: the policy learns what its reward asks, the KL to the
//! adapters-disabled reference starts at zero and grows, off-policy passes run, a killed
//! run resumes to the same numbers, and bad settings are refused with a reason.

use crate::common::{metrics, rl_config, tmp};
use std::path::Path;

use align_losses::grpo::{GrpoLossType, ScaleRewards};
use align_model::backend::Cpu;
use align_pipeline::config::StageConfig;
use align_pipeline::grpo::run_grpo;

/// Eight prompts with a ground truth each.
fn data(dir: &Path) -> std::path::PathBuf {
    let f = dir.join("prompts.jsonl");
    let rows: String =
        (0..8).map(|i| format!("{{\"prompt\": \"Question {i}: what comes next?\", \"answer\": \"{i}\"}}\n")).collect();
    std::fs::write(&f, rows).unwrap();
    f
}

fn config(out: &Path, data: &Path, training: &str, grpo: &str, extra: &str) -> StageConfig {
    rl_config(out, data, training, "grpo", grpo, extra)
}

/// Shorter is better, and a completion ends at its first "e": the policy must learn to
/// write an "e" early. Every sample varies in length, so every group carries signal.
const SHORT: &str = r#"num_generations = 4
max_completion_length = 8
stop_strings = ["e"]
rewards = [{ kind = "length", max_tokens = 8, cache_tokens = 8 }]"#;

#[test]
fn grpo_raises_its_reward() {
    let d = tmp("grpo-learn");
    let f = data(&d);
    let training =
        "per_device_train_batch_size = 8\ngradient_accumulation_steps = 2\nlearning_rate = 2e-2\nmax_steps = 12";
    let cfg = config(&d.join("run"), &f, training, SHORT, "");
    run_grpo::<Cpu>(&cfg, false, &Default::default()).unwrap();
    let m = metrics(&d.join("run"));
    assert_eq!(m.len(), 12);
    let reward =
        |r: &[align_pipeline::train::StepMetrics]| r.iter().map(|m| m.extra["reward"]).sum::<f64>() / r.len() as f64;
    let (first, last) = (reward(&m[..3]), reward(&m[9..]));
    assert!(last > first + 0.1, "mean reward {first:.3} → {last:.3}");
    for k in [
        "rewards/length/mean",
        "frac_reward_zero_std",
        "completions/mean_length",
        "entropy",
        "clip_ratio/region_mean",
        "rollout_tokens_per_second",
    ] {
        assert!(m[0].extra.contains_key(k), "{k} logged: {:?}", m[0].extra.keys());
    }
    // One row per completion, with its reward and advantage.
    let rows = std::fs::read_to_string(d.join("run/completions.jsonl")).unwrap();
    assert_eq!(rows.lines().count(), 12 * 16);
    let row: serde_json::Value = serde_json::from_str(rows.lines().next().unwrap()).unwrap();
    assert!(row["advantage"].is_f64() && row["length"].is_f64() && row["step"] == 1);
    assert!(d.join("run/final/model.safetensors").exists());
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn kl_to_the_adapters_disabled_reference_starts_at_zero_and_off_policy_passes_clip() {
    let d = tmp("grpo-kl");
    let f = data(&d);
    let training = "per_device_train_batch_size = 4\ngradient_accumulation_steps = 2\nlearning_rate = 5e-2\nmax_steps = 6\neval_steps = 6";
    let grpo = format!("{SHORT}\nbeta = 0.1\nnum_iterations = 3\nloss_type = \"grpo\"");
    let lora = "[lora]\nr = 4\nlora_alpha = 8\nlora_dropout = 0.0\ntarget_modules = \"all-linear\"\n";
    let cfg = config(&d.join("run"), &f, training, &grpo, lora);
    run_grpo::<Cpu>(&cfg, false, &Default::default()).unwrap();
    let m = metrics(&d.join("run"));
    // LoRA's B starts at zero: the policy is the reference until the first update.
    assert!(m[0].extra["kl"].abs() < 1e-6, "{:?}", m[0].extra["kl"]);
    assert!(m[5].extra["kl"] > 1e-6, "{:?}", m[5].extra["kl"]);
    // Passes 2 and 3 of a generation batch are off-policy: the ratio moves from 1.
    assert_eq!(m[0].extra["clip_ratio/region_mean"], 0.0);
    assert!(m.iter().any(|r| r.extra["clip_ratio/region_mean"] > 0.0), "a step clips at lr 5e-2");
    assert!(m[5].extra.contains_key("eval_reward") && m[5].extra.contains_key("eval_rewards/length"));
    assert!(d.join("run/eval/step-6.jsonl").exists());
    assert!(d.join("run/final/adapter_model.safetensors").exists());
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn a_killed_run_resumes_to_the_same_numbers() {
    let d = tmp("grpo-resume");
    let f = data(&d);
    let training = "per_device_train_batch_size = 4\ngradient_accumulation_steps = 2\nlearning_rate = 1e-2\nmax_steps = 4\nsave_steps = 2";
    let grpo = format!("{SHORT}\nnum_iterations = 2");
    let whole = config(&d.join("whole"), &f, training, &grpo, "");
    run_grpo::<Cpu>(&whole, false, &Default::default()).unwrap();
    // The same run "killed" after its step-2 checkpoint: drop what came later, resume.
    let cut = config(&d.join("cut"), &f, training, &grpo, "");
    run_grpo::<Cpu>(&cut, false, &Default::default()).unwrap();
    std::fs::remove_dir_all(d.join("cut/final")).unwrap();
    assert!(run_grpo::<Cpu>(&cut, false, &Default::default()).is_err(), "refuses to overwrite without --resume");
    run_grpo::<Cpu>(&cut, true, &Default::default()).unwrap();
    let (a, b) = (metrics(&d.join("whole")), metrics(&d.join("cut")));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.step, y.step);
        assert!((x.loss.unwrap() - y.loss.unwrap()).abs() < 1e-6, "step {}: {:?} vs {:?}", x.step, x.loss, y.loss);
        assert_eq!(x.extra["reward"], y.extra["reward"], "step {}", x.step);
    }
    let (wa, wb) = (
        std::fs::read(d.join("whole/final/model.safetensors")).unwrap(),
        std::fs::read(d.join("cut/final/model.safetensors")).unwrap(),
    );
    assert!(wa == wb, "the resumed run ends with the same weights");
    let rows = |p: &str| std::fs::read_to_string(d.join(p)).unwrap();
    assert_eq!(rows("whole/completions.jsonl"), rows("cut/completions.jsonl"));
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn settings_resolve_the_seed_variants_and_refuse_bad_batches() {
    let d = tmp("grpo-plan");
    let f = data(&d);
    let plan = |g: &str| config(&d.join("x"), &f, "", &format!("{SHORT}\n{g}"), "").grpo.unwrap().plan().unwrap();
    let p = plan("loss_variant = \"no_baseline\"");
    assert!(!p.advantages.baseline && p.advantages.scale_rewards == ScaleRewards::None && p.objective.clip.is_none());
    assert!(!p.importance_weighted);
    let p = plan("loss_variant = \"reinforce_with_baseline\"\nuse_std_normalization = false");
    assert!(p.advantages.baseline && p.advantages.scale_rewards == ScaleRewards::None && !p.importance_weighted);
    let p = plan("loss_variant = \"grpo_no_clip\"\nlength_normalization = \"masked_normalize\"");
    assert!(p.objective.clip.is_none() && p.importance_weighted && p.loss_type == GrpoLossType::DrGrpo);
    let p = plan("epsilon_high = 0.28\nlength_normalization = \"masked_mean\"");
    assert_eq!((p.objective.clip, p.loss_type), (Some((0.2, 0.28)), GrpoLossType::Grpo));
    // 6 completions per generation batch do not form groups of 4.
    let cfg = config(&d.join("bad"), &f, "per_device_train_batch_size = 3\ngradient_accumulation_steps = 2", SHORT, "");
    let e = run_grpo::<Cpu>(&cfg, false, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("num_generations"), "{e}");
    let cfg = config(&d.join("bad2"), &f, "per_device_train_batch_size = 4", "num_generations = 4", "");
    let e = run_grpo::<Cpu>(&cfg, false, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("reward function"), "{e}");
    std::fs::remove_dir_all(&d).ok();
}

/// Splitting a generation batch into micro-batches leaves the loss and the update as they
/// were (TRL's normalisations: dapo over the whole batch's tokens, the others averaged
/// over the micro-batches).
#[test]
fn gradient_accumulation_does_not_change_the_step() {
    let d = tmp("grpo-accum");
    let f = data(&d);
    for loss_type in ["dapo", "grpo", "bnpo", "dr_grpo"] {
        let grpo = format!("{SHORT}\nloss_type = \"{loss_type}\"");
        let mut runs = vec![];
        for (name, t) in [
            ("whole", "per_device_train_batch_size = 16"),
            ("split", "per_device_train_batch_size = 8\ngradient_accumulation_steps = 2"),
        ] {
            let training = format!("{t}\nlearning_rate = 1e-2\nmax_steps = 2");
            let out = d.join(format!("{loss_type}-{name}"));
            run_grpo::<Cpu>(&config(&out, &f, &training, &grpo, ""), false, &Default::default()).unwrap();
            runs.push(metrics(&out));
        }
        for (a, b) in runs[0].iter().zip(&runs[1]) {
            let (x, y) = (a.loss.unwrap(), b.loss.unwrap());
            // bnpo normalises per micro-batch (TRL): equal only when micro-batches hold
            // equal token counts, so it is only checked to be of the same size here.
            let tol = if loss_type == "bnpo" { 0.5 * x.abs().max(1e-3) } else { 1e-5 };
            assert!((x - y).abs() <= tol, "{loss_type} step {}: {x} vs {y}", a.step);
            assert!(
                (a.grad_norm - b.grad_norm).abs() <= if loss_type == "bnpo" { 1.0 } else { 1e-4 },
                "{loss_type}: grad norms {} vs {}",
                a.grad_norm,
                b.grad_norm
            );
        }
    }
    std::fs::remove_dir_all(&d).ok();
}
