//! The trainer through the SFT stage: a tiny model overfits a small set; a run killed with
//! SIGKILL mid-way resumes and logs exactly the losses of an uninterrupted run; LoRA SFT
//! saves a PEFT adapter that reloads.

use crate::common::{metrics, root, stage_head, tmp};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use align_model::backend::Cpu;
use align_pipeline::sft::{SftConfig, run_sft};

fn config(out: &Path, extra: &str) -> String {
    let head = stage_head(out, "fixtures/data/gsm8k_train_head.jsonl", "gsm8k_sft", 8);
    format!("{head}[tokenize]\nmax_length = 192\nmax_prompt_length = 96\n{extra}")
}

#[test]
fn tiny_model_overfits_a_small_set() {
    let d = tmp("sft-overfit");
    let text = config(
        &d.join("run"),
        "[training]\nper_device_train_batch_size = 4\nlearning_rate = 3e-3\nmax_steps = 80\nlogging_steps = 10\nsave_steps = 0\nlr_scheduler_type = \"constant\"\n",
    );
    let cfg: SftConfig = toml::from_str(&text).unwrap();
    let final_dir = run_sft::<Cpu>(&cfg, false, &Default::default()).unwrap();
    let m = metrics(&d.join("run"));
    let (first, last) = (m.first().unwrap().loss.unwrap(), m.last().unwrap().loss.unwrap());
    assert!(first > 3.0 && last < 0.1, "loss {first} -> {last}");
    // final/ is an HF checkpoint that loads back
    align_model::load_pretrained::<Cpu>(&final_dir, align_model::Heads::LM, &Default::default()).unwrap();
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn killed_run_resumes_with_identical_losses() {
    let d = tmp("sft-resume");
    let training = "[training]\nper_device_train_batch_size = 2\ngradient_accumulation_steps = 2\nlearning_rate = 1e-3\nmax_steps = 40\nlogging_steps = 1\nsave_steps = 8\nwarmup_ratio = 0.1\nlr_scheduler_type = \"cosine\"\n";
    let full = d.join("full.toml");
    std::fs::write(&full, config(&d.join("full"), training)).unwrap();
    let killed = d.join("killed.toml");
    std::fs::write(&killed, config(&d.join("killed"), training)).unwrap();
    let align = env!("CARGO_BIN_EXE_align");
    let ok = Command::new(align).args(["sft", "--config"]).arg(&full).output().unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));

    let mut child =
        Command::new(align).args(["sft", "--config"]).arg(&killed).stderr(std::process::Stdio::null()).spawn().unwrap();
    let start = Instant::now();
    while !d.join("killed/checkpoints/step-16/trainer_state.json").exists() {
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint appeared");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!d.join("killed/final").exists(), "killed before the end");
    // Starting afresh over existing checkpoints is refused: nothing written is lost.
    let fresh = Command::new(align).args(["sft", "--config"]).arg(&killed).output().unwrap();
    assert!(!fresh.status.success());
    assert!(String::from_utf8_lossy(&fresh.stderr).contains("--resume"), "{}", String::from_utf8_lossy(&fresh.stderr));
    let resumed = Command::new(align).args(["sft", "--resume", "--config"]).arg(&killed).output().unwrap();
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));

    let (a, b) = (metrics(&d.join("full")), metrics(&d.join("killed")));
    assert_eq!(a.len(), 40);
    assert_eq!(b.len(), 40);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.step, y.step);
        for (what, p, q) in [
            ("loss", x.loss.unwrap(), y.loss.unwrap()),
            ("lr", x.learning_rate, y.learning_rate),
            ("grad_norm", x.grad_norm, y.grad_norm),
        ] {
            assert!((p - q).abs() <= 1e-6, "step {}: {what} {p} vs {q}", x.step);
        }
    }
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn packed_lora_sft_writes_a_peft_adapter() {
    let d = tmp("sft-lora");
    let text = config(
        &d.join("run"),
        "[training]\nper_device_train_batch_size = 4\nlearning_rate = 1e-2\nmax_steps = 20\nlogging_steps = 5\nsave_steps = 5\nsave_total_limit = 1\nlr_scheduler_type = \"constant\"\n[lora]\nr = 4\nlora_alpha = 8\nlora_dropout = 0.0\n",
    );
    let text = format!("packing = true\n{text}");
    let cfg: SftConfig = toml::from_str(&text).unwrap();
    let final_dir = run_sft::<Cpu>(&cfg, false, &Default::default()).unwrap();
    assert!(final_dir.join("adapter_model.safetensors").exists() && final_dir.join("adapter_config.json").exists());
    assert!(final_dir.join("tokenizer.json").exists());
    // save_total_limit = 1: only the newest checkpoint (step 15; none is written at the end) stays
    let kept: Vec<usize> = align_pipeline::train::checkpoints(&d.join("run")).into_iter().map(|(s, _)| s).collect();
    assert_eq!(kept, vec![15]);
    let m = metrics(&d.join("run"));
    assert!(m.last().unwrap().loss.unwrap() < m.first().unwrap().loss.unwrap() - 0.5, "{m:?}");
    let base = align_model::load_pretrained::<Cpu>(
        &root().join("fixtures/models/llama-tied"),
        align_model::Heads::LM,
        &Default::default(),
    )
    .unwrap()
    .model;
    let (adapted, cfg) = align_lora::load_peft(base, &final_dir).unwrap();
    assert_eq!(cfg.r, 4);
    assert!(adapted.layers[0].self_attn.q_proj.as_ref().is_some_and(|p| p.adapter.is_some()));
    std::fs::remove_dir_all(&d).ok();
}

/// LoRA SFT on GPT-2, whose projections are Conv1D: `target_modules = ["c_attn"]` (the fused
/// q/k/v, one adapter per block, with dropout) and `"all-linear"` train, and `final/` is a PEFT
/// adapter of the Conv1D modules (`fan_in_fan_out`) that loads back.
#[test]
fn gpt2_lora_sft_trains_the_fused_c_attn() {
    let d = tmp("sft-lora-gpt2");
    let gpt2 = root().join("fixtures/models/gpt2");
    for (name, targets, dropout, adapted) in [("c_attn", "[\"c_attn\"]", 0.05, 2), ("all", "\"all-linear\"", 0.0, 8)] {
        let run = d.join(name);
        // stage_head's model is llama-tied: this one runs on the GPT-2 fixture.
        let text = config(
            &run,
            &format!("[training]\nper_device_train_batch_size = 4\nlearning_rate = 1e-2\nmax_steps = 12\nlogging_steps = 1\nsave_steps = 0\nlr_scheduler_type = \"constant\"\n[lora]\nr = 4\nlora_alpha = 8\nlora_dropout = {dropout}\ntarget_modules = {targets}\n"),
        )
        .replace(&root().join("fixtures/models/llama-tied").display().to_string(), &gpt2.display().to_string());
        let cfg: SftConfig = toml::from_str(&text).unwrap();
        let final_dir = run_sft::<Cpu>(&cfg, false, &Default::default()).unwrap();
        let m = metrics(&run);
        assert!(m.last().unwrap().loss.unwrap() < m.first().unwrap().loss.unwrap() - 0.1, "{name}: {m:?}");
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(final_dir.join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(config["fan_in_fan_out"], true, "{name}");
        let base =
            align_model::load_pretrained::<Cpu>(&gpt2, align_model::Heads::LM, &Default::default()).unwrap().model;
        let (mut trained, _) = align_lora::load_peft(base, &final_dir).unwrap();
        let names: Vec<String> =
            trained.projections_mut().into_iter().filter(|(_, p)| p.adapter.is_some()).map(|(n, _)| n).collect();
        assert_eq!(names.len(), adapted, "{name}: {names:?}");
        let c_attn = trained.layers[1].self_attn.qkv_proj.as_ref().unwrap().adapter.as_ref().unwrap();
        let b: Vec<f32> = c_attn.b.val().into_data().to_vec().unwrap();
        assert!(b.iter().any(|x| x.abs() > 1e-4), "{name}: c_attn's B trained");
    }
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn a_nan_loss_stops_the_run_and_sets_aside_the_checkpoint_that_produced_it() {
    let d = tmp("sft-nan");
    let text = config(
        &d.join("run"),
        "[training]\nper_device_train_batch_size = 4\nlearning_rate = 1e12\nmax_steps = 30\nlogging_steps = 1\nsave_steps = 1\nlr_scheduler_type = \"constant\"\n",
    );
    let cfg: SftConfig = toml::from_str(&text).unwrap();
    let err = run_sft::<Cpu>(&cfg, false, &Default::default()).expect_err("the run must stop").to_string();
    assert!(err.contains("not finite") && err.contains("set aside"), "{err}");
    // Step 1's update was finite but its weights give NaN at step 2: its checkpoint is set
    // aside, so --resume never continues from it.
    assert!(d.join("run/checkpoints/step-1.nonfinite/trainer_state.json").exists(), "{err}");
    assert!(align_pipeline::train::checkpoints(&d.join("run")).is_empty());
    assert!(!d.join("run/final").exists());
    std::fs::remove_dir_all(&d).ok();
}

/// Burn's balanced activation checkpointing changes memory, not the numbers.
#[test]
fn gradient_checkpointing_gives_the_same_losses() {
    let d = tmp("sft-ckpt");
    let training =
        "per_device_train_batch_size = 4\nlearning_rate = 1e-3\nmax_steps = 6\nlogging_steps = 1\nsave_steps = 0\n";
    let mut losses = vec![];
    for (name, gc) in [("plain", false), ("checkpointed", true)] {
        let text = config(&d.join(name), &format!("[training]\n{training}gradient_checkpointing = {gc}\n"));
        let cfg: SftConfig = toml::from_str(&text).unwrap();
        run_sft::<Cpu>(&cfg, false, &Default::default()).unwrap();
        losses.push(metrics(&d.join(name)).iter().map(|m| m.loss.unwrap()).collect::<Vec<_>>());
    }
    assert_eq!(losses[0].len(), 6);
    for (a, b) in losses[0].iter().zip(&losses[1]) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
    std::fs::remove_dir_all(&d).ok();
}

/// bf16 mixed precision: the losses follow the f32 run to bf16 accuracy, the run resumes
/// exactly from a checkpoint (the f32 masters are saved with the optimizer), and `final/`
/// is an f32 checkpoint that loads.
#[test]
fn bf16_training_tracks_f32_and_resumes_exactly() {
    let d = tmp("sft-bf16");
    let training = "per_device_train_batch_size = 4\nlearning_rate = 1e-3\nmax_steps = 6\nlogging_steps = 1\nsave_steps = 3\nlr_scheduler_type = \"constant\"\n";
    let mut losses = vec![];
    for (name, bf16) in [("f32", false), ("bf16", true)] {
        let text = config(&d.join(name), &format!("[training]\n{training}bf16 = {bf16}\n"));
        let cfg: SftConfig = toml::from_str(&text).unwrap();
        run_sft::<Cpu>(&cfg, false, &Default::default()).unwrap();
        losses.push(metrics(&d.join(name)).iter().map(|m| m.loss.unwrap()).collect::<Vec<_>>());
    }
    let (f32_losses, bf16_losses) = (&losses[0], &losses[1]);
    assert_eq!(bf16_losses.len(), 6);
    for (a, b) in f32_losses.iter().zip(bf16_losses) {
        assert!((a - b).abs() / a < 0.03, "f32 {a} vs bf16 {b}");
        assert!(a != b, "bf16 run gave bit-identical losses: not running in bf16");
    }
    assert!(bf16_losses[5] < bf16_losses[0], "{bf16_losses:?}");
    eprintln!("f32 losses  {f32_losses:?}\nbf16 losses {bf16_losses:?}");

    // Resume a copy of the bf16 run from its step-3 checkpoint.
    let src = d.join("bf16");
    let dst = d.join("bf16-resumed");
    std::fs::create_dir_all(dst.join("checkpoints")).unwrap();
    let step3 = src.join("checkpoints/step-3");
    let to = dst.join("checkpoints/step-3");
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(&step3).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    std::fs::copy(src.join("metrics.jsonl"), dst.join("metrics.jsonl")).unwrap();
    let text = config(&dst, &format!("[training]\n{training}bf16 = true\n"));
    let cfg: SftConfig = toml::from_str(&text).unwrap();
    let final_dir = run_sft::<Cpu>(&cfg, true, &Default::default()).unwrap();
    let resumed: Vec<f64> = metrics(&dst).iter().map(|m| m.loss.unwrap()).collect();
    assert_eq!(resumed.len(), 6);
    for (a, b) in bf16_losses.iter().zip(&resumed) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
    align_model::load_pretrained::<Cpu>(&final_dir, align_model::Heads::LM, &Default::default()).unwrap();
    std::fs::remove_dir_all(&d).ok();
}

/// `[curriculum]` by length: the first steps train on the shortest rows, the admitted
/// fraction grows from `initial` to 1 by `duration` of the run, and the rows drawn get
/// longer; other stages refuse the section.
#[test]
fn a_length_curriculum_trains_short_rows_first() {
    let d = tmp("sft-curriculum");
    let training = "[training]\nper_device_train_batch_size = 2\ngradient_accumulation_steps = 2\nlearning_rate = 1e-3\nmax_steps = 16\nlogging_steps = 1\nsave_steps = 0\n";
    let curriculum = "[curriculum]\nmeasure = \"length\"\npacing = \"competence\"\ninitial = 0.2\nduration = 0.5\n";
    // All 32 rows, none cut: their lengths differ (about 70 to 330 tokens).
    let text = config(&d.join("run"), &format!("{training}{curriculum}"))
        .replace("limit = 8", "limit = 32")
        .replace("max_length = 192", "max_length = 512");
    let cfg: SftConfig = toml::from_str(&text).unwrap();
    run_sft::<Cpu>(&cfg, false, &Default::default()).unwrap();
    let m = metrics(&d.join("run"));
    let (competence, difficulty): (Vec<f64>, Vec<f64>) =
        m.iter().map(|r| (r.extra["curriculum/competence"], r.extra["curriculum/difficulty"])).unzip();
    eprintln!("competence {competence:?}\nmean length drawn {difficulty:?}");
    assert!((competence[0] - 0.2).abs() < 1e-12);
    assert!(competence.windows(2).all(|w| w[1] >= w[0]));
    assert_eq!(competence[8..], [1.0; 8]);
    // The first step draws from the shortest 20 %: shorter than any later half's average.
    let late = difficulty[8..].iter().sum::<f64>() / 8.0;
    assert!(difficulty[0] < 0.8 * late, "first step's rows average {} tokens, the second half's {late}", difficulty[0]);

    let dpo: align_pipeline::config::StageConfig =
        toml::from_str(&format!("{}[dpo]\n", text.replace("\"length\"", "\"loss\""))).unwrap();
    let err = align_pipeline::preference::run_preference::<Cpu>(
        &dpo,
        align_pipeline::preference::PairwiseStage::Dpo,
        false,
        &Default::default(),
    )
    .expect_err("the loss measure refused by DPO");
    assert!(format!("{err:#}").contains("only the sft stage measures"), "{err:#}");
    std::fs::remove_dir_all(&d).ok();
}

/// `[curriculum] measure = "loss"`: rows the starting model already predicts well come first,
/// and a run resumed from a checkpoint measures the same difficulties (from the starting
/// model, not the resumed one), so it logs the uninterrupted run's losses.
#[test]
fn a_loss_curriculum_starts_with_what_the_model_knows_and_resumes_exactly() {
    let d = tmp("sft-curriculum-loss");
    let training = "[training]\nper_device_train_batch_size = 2\ngradient_accumulation_steps = 2\nlearning_rate = 1e-3\nmax_steps = 12\nlogging_steps = 1\nsave_steps = 6\n";
    let curriculum = "[curriculum]\nmeasure = \"loss\"\ninitial = 0.2\nduration = 0.5\n";
    let text = |out: &str| {
        config(&d.join(out), &format!("{training}{curriculum}"))
            .replace("limit = 8", "limit = 32")
            .replace("max_length = 192", "max_length = 512")
    };
    let whole: SftConfig = toml::from_str(&text("whole")).unwrap();
    run_sft::<Cpu>(&whole, false, &Default::default()).unwrap();
    let m = metrics(&d.join("whole"));
    let difficulty: Vec<f64> = m.iter().map(|r| r.extra["curriculum/difficulty"]).collect();
    eprintln!("mean starting loss of the rows drawn {difficulty:?}");
    let late = difficulty[6..].iter().sum::<f64>() / 6.0;
    assert!(difficulty[0] < late, "first step's rows {} against the second half's {late}", difficulty[0]);

    let cut: SftConfig = toml::from_str(&text("cut")).unwrap();
    run_sft::<Cpu>(&cut, false, &Default::default()).unwrap();
    std::fs::remove_dir_all(d.join("cut/final")).unwrap();
    let later = d.join("cut/checkpoints/step-12");
    std::fs::remove_dir_all(&later).ok();
    run_sft::<Cpu>(&cut, true, &Default::default()).unwrap();
    let resumed = metrics(&d.join("cut"));
    assert_eq!(m.len(), resumed.len());
    for (a, b) in m.iter().zip(&resumed) {
        assert_eq!((a.step, a.loss), (b.step, b.loss));
        assert_eq!(a.extra["curriculum/difficulty"], b.extra["curriculum/difficulty"]);
    }
    std::fs::remove_dir_all(&d).ok();
}
