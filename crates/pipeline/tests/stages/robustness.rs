//! Inputs a careless or adversarial user gives: each ends in a clear error naming the file
//! and field, or runs with a warning where transformers would too; never a panic and never
//! a silently different run. Tiny fixture checkpoints only.

use crate::common::{metrics, root, tmp};
use std::path::Path;
use std::process::Command;

use align_model::backend::Cpu;
use align_model::{Heads, load_pretrained};
use align_pipeline::config::StageConfig;
use align_pipeline::sft::run_sft;
use align_pipeline::train::StepMetrics;

/// An SFT config on the fixture checkpoint `model` over `data` (prompt/completion JSONL)
/// with `extra` lines.
fn sft_text(out: &Path, model: &str, data: &Path, extra: &str) -> String {
    let model = root().join("fixtures/models").join(model);
    let lines = [
        format!("output_dir = {:?}", out.display().to_string()),
        format!("[model]\npath = {:?}", model.display().to_string()),
        format!("[data]\npath = {:?}", data.display().to_string()),
    ];
    format!("{}\n{extra}", lines.join("\n"))
}

fn rows(dir: &Path, n: usize) -> std::path::PathBuf {
    let path = dir.join("rows.jsonl");
    let text: String = (0..n)
        .map(|i| {
            format!("{{\"prompt\": \"Question {i}: what is {i} plus one?\", \"completion\": \" It is {}.\"}}\n", i + 1)
        })
        .collect();
    std::fs::write(&path, text).unwrap();
    path
}

fn parse(text: &str) -> StageConfig {
    toml::from_str(text).unwrap()
}

fn sft_error(cfg: &StageConfig) -> String {
    match run_sft::<Cpu>(cfg, false, &Default::default()) {
        Ok(d) => panic!("trained into {}", d.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn training_arguments_out_of_range_are_refused_by_name() {
    let d = tmp("robust-args");
    let data = rows(&d, 4);
    let cases = [
        ("learning_rate = -1e-3", "learning_rate"),
        ("learning_rate = nan", "learning_rate"),
        ("max_steps = 0", "max_steps"),
        ("num_train_epochs = 0.0", "num_train_epochs"),
        ("num_train_epochs = -2.0", "num_train_epochs"),
        ("warmup_ratio = 1.5", "warmup_ratio"),
        ("warmup_ratio = -0.1", "warmup_ratio"),
        ("adam_beta1 = 1.0", "adam_beta1"),
        ("adam_beta2 = 1.2", "adam_beta2"),
        ("max_grad_norm = -1.0", "max_grad_norm"),
        ("weight_decay = -0.01", "weight_decay"),
        ("logging_steps = 0", "logging_steps"),
        ("eval_steps = 0", "eval_steps"),
        ("adam_epsilon = 0.0", "adam_epsilon"),
    ];
    for (line, field) in cases {
        let cfg = parse(&sft_text(&d.join("run"), "llama-tied", &data, &format!("[training]\n{line}\n")));
        let e = sft_error(&cfg);
        assert!(e.contains(&format!("[training] {field}")), "{line}: {e}");
        assert!(!d.join("run/final").exists(), "{line}: nothing may be trained");
    }
    // The file path leads the message when the config comes from a file.
    let file = d.join("bad.toml");
    std::fs::write(&file, sft_text(&d.join("run"), "llama-tied", &data, "[training]\nlearning_rate = -1.0\n")).unwrap();
    let e = format!("{:#}", StageConfig::from_file(&file).unwrap_err());
    assert!(e.contains("bad.toml") && e.contains("learning_rate"), "{e}");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn an_empty_output_dir_and_an_oversized_lora_rank_are_refused() {
    let d = tmp("robust-out");
    let data = rows(&d, 4);
    let mut cfg = parse(&sft_text(&d.join("run"), "llama-tied", &data, "[training]\nmax_steps = 1\n"));
    cfg.output_dir = "".into();
    assert!(sft_error(&cfg).contains("output_dir"));
    let cfg = parse(&sft_text(&d.join("run"), "llama-tied", &data, "[training]\nmax_steps = 1\n[lora]\nr = 4096\n"));
    let e = sft_error(&cfg);
    assert!(e.contains("lora r = 4096") && e.contains("at most"), "{e}");
    // An output directory that cannot be created names itself (a path under a file: root
    // ignores permission bits, so this is the failure every user can reproduce).
    let blocker = d.join("a-file");
    std::fs::write(&blocker, "").unwrap();
    let cfg = parse(&sft_text(&blocker.join("run"), "llama-tied", &data, "[training]\nmax_steps = 1\n"));
    let e = sft_error(&cfg);
    assert!(e.contains(&blocker.join("run").display().to_string()), "{e}");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn a_diverging_run_stops_before_applying_or_saving_a_non_finite_step() {
    let d = tmp("robust-nan");
    let data = rows(&d, 8);
    let training = |lr: &str, skip: usize| {
        format!(
            "[training]\nper_device_train_batch_size = 2\nlearning_rate = {lr}\nmax_steps = 12\nsave_steps = 1\nlogging_steps = 1\nlr_scheduler_type = \"constant\"\nmax_grad_norm = 0.0\nskip_nonfinite_steps = {skip}\n"
        )
    };
    let cfg = parse(&sft_text(&d.join("run"), "llama-tied", &data, &training("1e30", 0)));
    let e = sft_error(&cfg);
    assert!(e.contains("not finite") && e.contains("no weights of it were applied or saved"), "{e}");
    // Every checkpoint left for --resume holds finite weights.
    let ckpts = align_pipeline::train::checkpoint::checkpoints(&d.join("run"));
    for (_, dir) in &ckpts {
        let mut src = align_model::SafetensorsSource::open_dir(dir).unwrap();
        for n in align_model::WeightSource::names(&src) {
            let t = align_model::WeightSource::load(&mut src, &n).unwrap();
            assert!(t.data.iter().all(|x| x.is_finite()), "{}: {n}", dir.display());
        }
    }
    // The logged rows are finite and read back (no null in metrics.jsonl).
    for row in metrics(&d.join("run")) {
        assert!(row.loss.is_some_and(f64::is_finite) && row.grad_norm.is_finite(), "{row:?}");
    }

    // Skipping: the same run allowed 2 non-finite updates in a row stops at the third.
    let cfg = parse(&sft_text(&d.join("skip"), "llama-tied", &data, &training("1e30", 2)));
    let e = sft_error(&cfg);
    let first = e.find("step ").map(|i| &e[i..]).unwrap_or("");
    let stopped: usize = first[5..].split(':').next().unwrap().parse().unwrap();
    let logged = metrics(&d.join("skip"));
    assert!(stopped >= 3, "{e}");
    assert!(logged.iter().all(|r| r.step < stopped), "no row for the stopping step");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn auto_schema_names_the_line_and_field_of_a_broken_row_and_skip_invalid_skips_it() {
    let d = tmp("robust-auto");
    let data = rows(&d, 8);
    let mut text = std::fs::read_to_string(&data).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut edited: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    edited[6] = "{\"prompt\": \"Question 6: what is 6 plus one?\"}".into();
    edited[3] = "{\"prompt\": \"Question 3\", \"completion\": null}".into();
    text = edited.join("\n") + "\n";
    std::fs::write(&data, text).unwrap();
    let cfg = parse(&sft_text(&d.join("run"), "llama-tied", &data, "[training]\nmax_steps = 1\n"));
    let e = sft_error(&cfg);
    assert!(e.contains("rows.jsonl:4") && e.contains("completion"), "{e}");
    let cfg = parse(&sft_text(
        &d.join("run"),
        "llama-tied",
        &data,
        "skip_invalid = true\n[training]\nmax_steps = 1\nper_device_train_batch_size = 2\n",
    ));
    run_sft::<Cpu>(&cfg, false, &Default::default()).expect("the two broken rows are skipped");

    // An empty file names itself, for training and for `align score`.
    let empty = d.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let cfg = parse(&sft_text(&d.join("empty-run"), "llama-tied", &empty, "[training]\nmax_steps = 1\n"));
    let e = sft_error(&cfg);
    assert!(e.contains("empty.jsonl"), "{e}");
    let out = Command::new(env!("CARGO_BIN_EXE_align"))
        .args(["score", "--model"])
        .arg(root().join("fixtures/models/llama-tied"))
        .arg("--data")
        .arg(&empty)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("empty.jsonl"), "{stderr}");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn the_context_length_is_checked_everywhere() {
    let d = tmp("robust-context");
    let gpt2 = root().join("fixtures/models/gpt2");
    let align = env!("CARGO_BIN_EXE_align");
    // generate: 600 new tokens on a 512-position model.
    let out = Command::new(align)
        .args(["generate", "--model"])
        .arg(&gpt2)
        .args(["--prompt", "hello there", "--max-new-tokens", "600"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("max_position_embeddings") && stderr.contains("512"), "{stderr}");
    // score: a row longer than the context names its line.
    let long = d.join("long.jsonl");
    let words = "word ".repeat(2000);
    std::fs::write(
        &long,
        format!(
            "{{\"prompt\": \"a\", \"completion\": \" b\"}}\n{{\"prompt\": \"{words}\", \"completion\": \" end\"}}\n"
        ),
    )
    .unwrap();
    let out = Command::new(align).args(["score", "--model"]).arg(&gpt2).arg("--data").arg(&long).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("long.jsonl:2") && stderr.contains("512 positions"), "{stderr}");
    // sft with the default max_length 1024 on it: rows fit the 512 positions.
    let data = d.join("rows.jsonl");
    std::fs::write(&data, format!("{{\"prompt\": \"{words}\", \"completion\": \" end\"}}\n").repeat(2)).unwrap();
    let cfg = parse(&sft_text(
        &d.join("run"),
        "gpt2",
        &data,
        "[tokenize]\nmax_prompt_length = 400\n[training]\nmax_steps = 1\n",
    ));
    run_sft::<Cpu>(&cfg, false, &Default::default()).expect("max_length is fitted to the model's positions");
    assert!(!d.join("run/final.tmp").exists());
    load_pretrained::<Cpu>(&d.join("run/final"), Heads::LM, &Default::default()).unwrap();
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn sampling_flags_are_validated() {
    let align = env!("CARGO_BIN_EXE_align");
    let model = root().join("fixtures/models/llama-tied");
    for flags in [
        &["--temperature=-1"][..],
        &["--temperature", "nan"],
        &["--temperature", "inf"],
        &["--top-p", "2"],
        &["--top-p", "0"],
        &["--system", "be brief"],
    ] {
        let out = Command::new(align)
            .args(["generate", "--model"])
            .arg(&model)
            .args(["--prompt", "hi", "--max-new-tokens", "2"])
            .args(flags)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} ran");
        assert!(!stderr.contains("panicked"), "{flags:?}: {stderr}");
        let named = flags[0].trim_start_matches("--").split('=').next().unwrap().replace('-', "_");
        assert!(stderr.contains(&named) || stderr.contains("--chat"), "{flags:?}: {stderr}");
    }
}

#[test]
fn metrics_floats_round_trip_exactly() {
    let row = StepMetrics {
        step: 3,
        epoch: 0.1 + 0.2,
        loss: Some(1.234_567_890_123_456_7_f64.next_up()),
        learning_rate: 4.999_999_999_999_999e-5,
        grad_norm: 1.0f64.next_down(),
        tokens_per_second: 1234.5678,
        step_seconds: 0.1,
        eval_loss: None,
        extra: Default::default(),
    };
    let back: StepMetrics = serde_json::from_str(&serde_json::to_string(&row).unwrap()).unwrap();
    assert_eq!(back, row);
    assert_eq!(back.learning_rate.to_bits(), row.learning_rate.to_bits());
}

#[test]
fn a_resumed_metrics_log_is_rewritten_atomically() {
    let d = tmp("robust-truncate");
    let path = d.join("metrics.jsonl");
    let text: String = (1..=30).map(|s| format!("{{\"step\": {s}, \"loss\": 1.0}}\n")).collect();
    std::fs::write(&path, &text).unwrap();
    let kept = align_pipeline::train::truncate_jsonl_after(&path, 19).unwrap();
    assert_eq!(kept.len(), 19);
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        text.lines().take(19).map(|l| format!("{l}\n")).collect::<String>()
    );
    let leftovers: Vec<_> = std::fs::read_dir(&d).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert_eq!(leftovers.len(), 1, "no temporary file is left: {leftovers:?}");
    std::fs::remove_dir_all(&d).ok();
}
