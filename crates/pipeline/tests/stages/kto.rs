//! KTO on a tiny checkpoint: PIQA pairs unpaired into desirable and undesirable
//! completions; the policy starts as its reference (every loss ½, the reference point 0),
//! the loss falls and the implied rewards separate; a killed run resumes to the same
//! numbers; a micro-batch of one is refused.

use crate::common::{metrics, root, tmp};
use std::path::Path;

use align_model::backend::Cpu;
use align_pipeline::config::StageConfig;
use align_pipeline::kto::run_kto;

/// 16 PIQA pairs (32 labelled completions), 4 pairs held out.
fn config(out: &Path, training: &str, extra: &str) -> StageConfig {
    let r = root();
    let data = r.join("fixtures/data/piqa_head.jsonl");
    let text = format!(
        r#"output_dir = "{out}"
[model]
path = "{model}"
[data]
path = "{data}"
adapter = "piqa_preference"
limit = 16
[eval_data]
path = "{data}"
adapter = "piqa_preference"
skip = 16
limit = 4
[tokenize]
max_length = 128
[training]
logging_steps = 1
lr_scheduler_type = "constant"
{training}
{extra}"#,
        out = out.display(),
        model = r.join("fixtures/models/llama-tied").display(),
        data = data.display(),
    );
    toml::from_str(&text).unwrap()
}

const LORA: &str = "[lora]\nr = 8\nlora_alpha = 16\nlora_dropout = 0.0\ntarget_modules = \"all-linear\"\n";

#[test]
fn kto_starts_at_one_half_and_learns() {
    let d = tmp("kto-learn");
    // One micro-batch of all 32 completions: every step sees the same data.
    let training = "per_device_train_batch_size = 32\nlearning_rate = 1e-3\nmax_steps = 5\neval_steps = 5\neval_on_start = true\nsave_steps = 0";
    let cfg = config(&d.join("run"), training, &format!("{LORA}[kto]\nbeta = 0.1\n"));
    run_kto::<Cpu>(&cfg, false, &Default::default()).unwrap();
    let m = metrics(&d.join("run"));
    // Policy = reference (LoRA's B is zero): every log-ratio is 0, so z₀ = 0 and each loss 1 − σ(0).
    assert!((m[0].eval_loss.unwrap() - 0.5).abs() < 1e-6, "{:?}", m[0]);
    assert!((m[1].loss.unwrap() - 0.5).abs() < 1e-6, "{:?}", m[1]);
    assert!(m[1].extra["kl"].abs() < 1e-6, "{:?}", m[1].extra);
    let losses: Vec<f64> = m[1..].iter().map(|r| r.loss.unwrap()).collect();
    eprintln!("kto losses {losses:?}, margins {}", m.last().unwrap().extra["rewards/margins"]);
    assert!(losses[4] < losses[0] - 1e-3, "{losses:?}");
    let last = m.last().unwrap();
    assert!(last.extra["rewards/margins"] > 0.0, "{:?}", last.extra);
    for k in ["rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "eval_kl"] {
        assert!(last.extra.contains_key(k), "{k}: {:?}", last.extra.keys());
    }
    assert!(d.join("run/final/adapter_model.safetensors").exists());
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn a_killed_run_resumes_to_the_same_numbers() {
    let d = tmp("kto-resume");
    let training = "per_device_train_batch_size = 4\ngradient_accumulation_steps = 2\nlearning_rate = 1e-3\nmax_steps = 4\nsave_steps = 2";
    let extra = "[kto]\ndesirable_weight = 1.2\nundesirable_weight = 0.9\n";
    let whole = config(&d.join("whole"), training, extra);
    run_kto::<Cpu>(&whole, false, &Default::default()).unwrap();
    let cut = config(&d.join("cut"), training, extra);
    run_kto::<Cpu>(&cut, false, &Default::default()).unwrap();
    std::fs::remove_dir_all(d.join("cut/final")).unwrap();
    assert!(run_kto::<Cpu>(&cut, false, &Default::default()).is_err(), "refuses to overwrite without --resume");
    run_kto::<Cpu>(&cut, true, &Default::default()).unwrap();
    let (a, b) = (metrics(&d.join("whole")), metrics(&d.join("cut")));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.loss, y.loss, "step {}", x.step);
        assert_eq!(x.extra["kl"], y.extra["kl"], "step {}", x.step);
    }
    let w = |p: &str| std::fs::read(d.join(p)).unwrap();
    assert!(w("whole/final/model.safetensors") == w("cut/final/model.safetensors"));
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn a_micro_batch_of_one_has_no_kl_estimate() {
    let d = tmp("kto-bad");
    let cfg = config(&d.join("run"), "per_device_train_batch_size = 1", "[kto]\n");
    let e = run_kto::<Cpu>(&cfg, false, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("per_device_train_batch_size"), "{e}");
    // apo_zero_unpaired has no reference point: one example per micro-batch is fine.
    let cfg = config(
        &d.join("apo"),
        "per_device_train_batch_size = 1\nmax_steps = 1",
        "[kto]\nloss_type = \"apo_zero_unpaired\"\n",
    );
    run_kto::<Cpu>(&cfg, false, &Default::default()).unwrap();
    std::fs::remove_dir_all(&d).ok();
}
