//! Multiple choice as lm-eval defines it: the tokenisation split, the built-in PIQA task,
//! TOML tasks with labels and few-shot examples, and — on the real SmolLM2 — per-item
//! log-likelihoods against lm-eval's own run on transformers
//! (fixtures/eval/piqa_smollm2_lm_eval.jsonl, made by xtask/scripts/piqa_reference.py).

use std::path::{Path, PathBuf};

use align_data::{DatasetConfig, RecordReader};
use align_eval::multiple_choice::{encode_pair, mean_with_stderr};
use align_eval::{McTask, load_items, score_items};
use align_model::backend::Cpu;
use align_model::{Heads, Tokenizer, load_pretrained};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&root().join("fixtures/models/llama-tied")).unwrap()
}

#[test]
fn pair_split_at_the_context_length_with_trailing_spaces_moved() {
    let tok = tokenizer();
    let (ctx, cont) = encode_pair(&tok, "Question: why?\nAnswer:", " Because.").unwrap();
    assert_eq!(ctx, tok.encode("Question: why?\nAnswer:", true).unwrap());
    let whole = tok.encode("Question: why?\nAnswer: Because.", true).unwrap();
    assert_eq!([ctx.clone(), cont.clone()].concat(), whole);
    // A trailing space in the context belongs to the continuation, as in lm-eval.
    let (ctx2, cont2) = encode_pair(&tok, "Question: why?\nAnswer: ", "Because.").unwrap();
    assert_eq!((ctx2, cont2), (ctx, cont));
}

#[test]
fn builtin_piqa_is_the_piqa_adapter() {
    let data = DatasetConfig { limit: Some(10), ..DatasetConfig::new(root().join("fixtures/data/piqa_head.jsonl")) };
    let items = load_items(&McTask::piqa(), &data).unwrap();
    let rows: Vec<_> = RecordReader::open(&data.path).unwrap().take(10).map(|r| r.unwrap()).collect();
    assert_eq!(items.len(), 10);
    for (it, r) in items.iter().zip(&rows) {
        let mc = align_data::adapters::piqa_item(r).unwrap();
        assert_eq!(it.context, mc.context);
        assert_eq!(it.gold, mc.gold);
        let with_delim: Vec<String> = it.choices.iter().map(|c| format!(" {c}")).collect();
        assert_eq!(with_delim, mc.choices);
    }
}

#[test]
fn toml_task_with_labels_fewshot_and_errors() {
    let dir = std::env::temp_dir().join(format!("align-mc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("arc.jsonl");
    std::fs::write(
        &data,
        concat!(
            r#"{"question": "Sky colour?", "choices": {"text": ["blue", "green"], "label": ["A", "B"]}, "answerKey": "A"}"#,
            "\n",
            r#"{"question": "Grass colour?", "choices": {"text": ["red", "green"], "label": ["A", "B"]}, "answerKey": "B"}"#,
            "\n",
            r#"{"question": "Snow colour?", "choices": {"text": ["white"], "label": ["A"]}, "answerKey": "C"}"#,
            "\n"
        ),
    )
    .unwrap();
    let task: McTask = toml::from_str(&format!(
        r#"name = "arc-like"
context = "Question: {{{{question}}}}\nAnswer:"
choices_field = "choices.text"
gold = "{{{{answerKey}}}}"
gold_labels = ["A", "B", "C", "D"]
num_fewshot = 1
fewshot_data = "{}""#,
        data.display()
    ))
    .unwrap();
    let items = load_items(&task, &DatasetConfig { skip: 1, limit: Some(1), ..DatasetConfig::new(&data) }).unwrap();
    assert_eq!(items[0].context, "Question: Sky colour?\nAnswer: blue\n\nQuestion: Grass colour?\nAnswer:");
    assert_eq!(items[0].choices, vec!["red", "green"]);
    assert_eq!(items[0].gold, 1);
    // Row 3's gold is label C, which has no choice: an error naming the row.
    let err = load_items(&task, &DatasetConfig::new(&data)).unwrap_err();
    assert!(format!("{err:#}").contains("arc.jsonl:3"), "{err:#}");
    let bad: Result<McTask, _> = toml::from_str("name = \"x\"\ncontext = \"\"\ngold = \"0\"\nshots = 2\n");
    assert!(bad.is_err(), "unknown keys are refused");
    std::fs::remove_dir_all(&dir).ok();
}

/// Running each context once from a KV cache gives the log-likelihoods of whole rows.
#[test]
fn shared_context_scores_equal_whole_rows() {
    let dir = root().join("fixtures/models/llama-untied");
    let m = load_pretrained::<Cpu>(&dir, Heads::LM, &Default::default()).unwrap();
    let mut task = McTask::piqa();
    task.num_fewshot = 2;
    task.fewshot_data = Some(root().join("fixtures/data/piqa_head.jsonl"));
    let data =
        DatasetConfig { skip: 2, limit: Some(6), ..DatasetConfig::new(root().join("fixtures/data/piqa_head.jsonl")) };
    let items = load_items(&task, &data).unwrap();
    let dev = Default::default();
    let whole = score_items(&m.model, &m.tokenizer, &task, &items, 5, false, &dev, |_| {}).unwrap();
    let shared = score_items(&m.model, &m.tokenizer, &task, &items, 5, true, &dev, |_| {}).unwrap();
    for (a, b) in whole.iter().zip(&shared) {
        for (x, y) in a.loglikelihoods.iter().zip(&b.loglikelihoods) {
            assert!((x - y).abs() < 1e-3, "{:?} vs {:?}", a.loglikelihoods, b.loglikelihoods);
        }
        assert_eq!(a.is_greedy, b.is_greedy);
    }
}

#[test]
fn stderr_is_the_sample_std_over_sqrt_n() {
    let s = mean_with_stderr(&[1.0, 0.0, 1.0, 1.0]);
    assert_eq!(s.value, 0.75);
    assert!((s.stderr - (0.25f64 / 4.0).sqrt()).abs() < 1e-12, "{}", s.stderr);
}

fn gguf() -> Option<PathBuf> {
    std::env::var_os("ALIGN_SMOLLM2_GGUF").map(PathBuf::from).filter(|p| p.exists())
}

/// SmolLM2 on the first 100 PIQA items: the same choice as lm-eval on every item that is not
/// a near-tie, and log-likelihoods within 2e-3 (f32 sums of ~40 token log-probs).
#[test]
fn smollm2_piqa_matches_lm_eval() {
    let Some(gguf) = gguf() else {
        eprintln!("ALIGN_SMOLLM2_GGUF not set: run through `cargo xtask test`");
        return;
    };
    let reference: Vec<Value> = std::fs::read_to_string(root().join("fixtures/eval/piqa_smollm2_lm_eval.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &Value| v.get("doc_id").is_some())
        .collect();
    let m = load_pretrained::<Cpu>(&gguf, Heads::LM, &Default::default()).unwrap();
    let data = DatasetConfig {
        limit: Some(100),
        ..DatasetConfig::new(root().join("fixtures/data/piqa_validation_first100.jsonl"))
    };
    let task = McTask::piqa();
    let items = load_items(&task, &data).unwrap();
    let results = score_items(&m.model, &m.tokenizer, &task, &items, 16, false, &Default::default(), |_| {}).unwrap();
    let mut worst = 0.0f64;
    for (r, want) in results.iter().zip(&reference) {
        let lls: Vec<f64> = want["loglikelihoods"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        for (a, b) in r.loglikelihoods.iter().zip(&lls) {
            worst = worst.max((a - b).abs());
        }
        let tie = (lls[0] - lls[1]).abs() < 1e-3;
        assert!(tie || r.acc == want["acc"].as_f64().unwrap(), "item {}: {:?} vs {lls:?}", r.doc_id, r.loglikelihoods);
    }
    eprintln!("max |Δ loglikelihood| vs lm-eval over 100 items: {worst:.2e}");
    assert!(worst < 2e-3, "{worst}");
}
