//! `[training] report_to`: the TensorBoard event files hold metrics.jsonl's rows (every
//! key a tag, at the row's step, the same values to f32), a resumed run's events hold each
//! step once per tag, and an unknown dashboard is refused by name.

use crate::common::{root, stage_head, tmp};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use align_model::backend::Cpu;
use align_pipeline::config::StageConfig;
use align_pipeline::sft::run_sft;
use tfrecord::protobuf::event::What;
use tfrecord::protobuf::summary::value::Value as Payload;
use tfrecord::{EventIter, RecordReaderConfig};

/// SFT on 8 GSM8K rows with 4 more held out: 4 steps, a row per step, evaluated before
/// training and every 2 steps, a checkpoint at step 2; `extra` ends `[training]`.
fn config(out: &Path, extra: &str) -> StageConfig {
    let head = stage_head(out, "fixtures/data/gsm8k_train_head.jsonl", "gsm8k_sft", 8);
    let text = format!(
        "{head}[eval_data]\npath = \"{data}\"\nadapter = \"gsm8k_sft\"\nskip = 8\nlimit = 4\n\
         [tokenize]\nmax_length = 128\nmax_prompt_length = 64\n\
         [training]\nper_device_train_batch_size = 2\nlearning_rate = 1e-3\nmax_steps = 4\nlogging_steps = 1\n\
         eval_steps = 2\neval_on_start = true\nsave_steps = 2\nlr_scheduler_type = \"cosine\"\n{extra}",
        data = root().join("fixtures/data/gsm8k_train_head.jsonl").display(),
    );
    toml::from_str(&text).unwrap()
}

/// The run directory's event files (TensorBoard reads those whose name holds `tfevents`).
fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains("tfevents"))
        .collect();
    files.sort();
    files
}

/// Every scalar of the event files, read with tfrecord's reader: tag → [(step, value)].
fn scalars(dir: &Path) -> BTreeMap<String, Vec<(i64, f32)>> {
    let mut out: BTreeMap<String, Vec<(i64, f32)>> = BTreeMap::new();
    for path in event_files(dir) {
        for event in EventIter::open(&path, RecordReaderConfig { check_integrity: true }).unwrap() {
            let event = event.unwrap();
            let Some(What::Summary(summary)) = event.what else { continue };
            for v in summary.value {
                let Some(Payload::SimpleValue(x)) = v.value else { panic!("{}: not a scalar", v.tag) };
                out.entry(v.tag).or_default().push((event.step, x));
            }
        }
    }
    out
}

/// metrics.jsonl as TensorBoard should show it: key → [(step, value as f32)].
fn jsonl_scalars(dir: &Path) -> BTreeMap<String, Vec<(i64, f32)>> {
    let mut out: BTreeMap<String, Vec<(i64, f32)>> = BTreeMap::new();
    for line in std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap().lines() {
        let row: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line).unwrap();
        let step = row["step"].as_i64().unwrap();
        for (k, v) in row.iter().filter(|(k, _)| *k != "step") {
            out.entry(k.clone()).or_default().push((step, v.as_f64().unwrap() as f32));
        }
    }
    out
}

#[test]
fn tensorboard_events_hold_the_metrics_jsonl_rows() {
    let d = tmp("tb-rows");
    let run = d.join("run");
    run_sft::<Cpu>(&config(&run, "report_to = [\"jsonl\", \"tensorboard\"]\n"), false, &Default::default()).unwrap();
    assert_eq!(event_files(&run).len(), 1, "one event file beside metrics.jsonl");
    let (events, jsonl) = (scalars(&run), jsonl_scalars(&run));
    assert_eq!(events, jsonl, "every metrics.jsonl key is a tag with the same steps and values");
    let steps = |tag: &str| events[tag].iter().map(|(s, _)| *s).collect::<Vec<_>>();
    assert_eq!(steps("loss"), [1, 2, 3, 4]);
    assert_eq!(steps("eval_loss"), [0, 2, 4], "the evaluation before training is step 0");
    for tag in ["learning_rate", "grad_norm", "tokens_per_second", "epoch", "train_tokens_per_second"] {
        assert!(events.contains_key(tag), "{tag}: {:?}", events.keys());
    }
    // The default writes them too; "none" writes none (and removes a former run's).
    let default_run = d.join("default");
    run_sft::<Cpu>(&config(&default_run, ""), false, &Default::default()).unwrap();
    assert_eq!(scalars(&default_run)["loss"].len(), 4);
    run_sft::<Cpu>(&config(&default_run, "report_to = \"none\"\n"), false, &Default::default())
        .expect_err("checkpoints exist: a fresh start over them is refused");
    std::fs::remove_dir_all(default_run.join("checkpoints")).unwrap();
    run_sft::<Cpu>(&config(&default_run, "report_to = \"none\"\n"), false, &Default::default()).unwrap();
    assert!(event_files(&default_run).is_empty(), "{:?}", event_files(&default_run));
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn a_resumed_run_logs_each_step_once_per_tag() {
    let d = tmp("tb-resume");
    let training = "report_to = [\"tensorboard\"]\n";
    let whole = d.join("whole");
    run_sft::<Cpu>(&config(&whole, training), false, &Default::default()).unwrap();
    // A run that went to the end, its final/ removed, a record cut short by a kill appended:
    // --resume continues from the step-2 checkpoint and redoes steps 3 and 4.
    let cut = d.join("cut");
    run_sft::<Cpu>(&config(&cut, training), false, &Default::default()).unwrap();
    std::fs::remove_dir_all(cut.join("final")).unwrap();
    let file = event_files(&cut).pop().unwrap();
    let whole_record = std::fs::read(&file).unwrap();
    std::fs::OpenOptions::new().append(true).open(&file).unwrap().write_all(&whole_record[..20]).unwrap();
    run_sft::<Cpu>(&config(&cut, training), true, &Default::default()).unwrap();

    assert_eq!(event_files(&cut), [file], "the resumed run appends to the cut-back file");
    let (a, b) = (scalars(&whole), scalars(&cut));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (tag, points) in &b {
        let steps: Vec<i64> = points.iter().map(|(s, _)| *s).collect();
        let mut once = steps.clone();
        once.dedup();
        assert_eq!(steps, once, "{tag}: each step once, in order");
        assert_eq!(steps, a[tag].iter().map(|(s, _)| *s).collect::<Vec<_>>(), "{tag}");
    }
    assert_eq!(b["loss"], a["loss"], "the resumed losses are the uninterrupted run's");
    assert_eq!(b, jsonl_scalars(&cut), "the events match the resumed metrics.jsonl");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn report_to_accepts_trl_names_and_refuses_others_by_name() {
    let d = tmp("tb-config");
    let parse = |line: &str| -> Result<StageConfig, String> {
        let head = stage_head(&d.join("run"), "fixtures/data/gsm8k_train_head.jsonl", "gsm8k_sft", 8);
        toml::from_str(&format!("{head}[training]\n{line}\n")).map_err(|e| e.to_string())
    };
    let tensorboard = |line: &str| parse(line).unwrap().training.report_to.tensorboard;
    assert!(tensorboard(""), "the default feeds TensorBoard");
    assert!(tensorboard("report_to = [\"jsonl\", \"tensorboard\"]"));
    assert!(tensorboard("report_to = \"tensorboard\""));
    assert!(tensorboard("report_to = \"all\""));
    assert!(!tensorboard("report_to = [\"jsonl\"]"));
    assert!(!tensorboard("report_to = \"none\""));
    assert!(!tensorboard("report_to = [\"none\"]"));
    assert!(!tensorboard("report_to = []"));
    for (line, says) in [
        ("report_to = [\"wandb\"]", "unknown value \"wandb\""),
        ("report_to = \"tensorbord\"", "unknown value \"tensorbord\""),
        ("report_to = [\"none\", \"tensorboard\"]", "stands alone"),
        ("report_to = 3", "a name or a list of names"),
    ] {
        let e = parse(line).expect_err(line);
        assert!(e.contains("[training] report_to") && e.contains(says), "{line}: {e}");
        if says.starts_with("unknown") {
            assert!(e.contains(r#""jsonl", "tensorboard", "all", "none""#), "{line}: the accepted names: {e}");
        }
    }
    // Serialised (a pipeline's resolved config) as the list it means, and read back.
    let cfg = parse("report_to = \"all\"").unwrap();
    let text = toml::to_string(&cfg).unwrap();
    assert!(text.contains(r#"report_to = ["jsonl", "tensorboard"]"#), "{text}");
    assert_eq!(toml::from_str::<StageConfig>(&text).unwrap(), cfg);
    std::fs::remove_dir_all(&d).ok();
}
