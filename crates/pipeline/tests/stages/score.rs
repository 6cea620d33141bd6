//! `align score` computes the quantities of `ref_logprobs.py`: same split, same ids, same
//! log-probs (1e-4) and sums, on every reference checkpoint, batched with padding.

use std::path::Path;

use align_model::backend::Cpu;
use align_model::{Heads, load_pretrained};
use align_pipeline::score::{read_rows, score_rows};
use serde_json::Value;

#[test]
fn score_matches_reference_logprobs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models");
    let rows = read_rows(&root.join("texts.jsonl")).unwrap();
    for name in ["llama-untied", "qwen2-tied-legacy-rope", "gpt2", "qwen3"] {
        let dir = root.join(name);
        let reference: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        let m = load_pretrained::<Cpu>(&dir, Heads::LM, &Default::default()).unwrap();
        let scored = score_rows(&m.model, &m.tokenizer, &rows, 4).unwrap();
        for (ours, want) in scored.iter().zip(reference["rows"].as_array().unwrap()) {
            assert_eq!(ours.prompt_len as u64, want["prompt_len"].as_u64().unwrap(), "{name}");
            let ids: Vec<u64> = ours.input_ids.iter().map(|&x| x as u64).collect();
            let want_ids: Vec<u64> =
                want["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
            assert_eq!(ids, want_ids, "{name}");
            for (a, b) in ours.completion_logprobs.iter().zip(want["completion_logprobs"].as_array().unwrap()) {
                assert!((*a as f64 - b.as_f64().unwrap()).abs() < 1e-4, "{name}: {a} vs {b}");
            }
            let sum = want["completion_logprob_sum"].as_f64().unwrap();
            assert!(
                (ours.completion_logprob_sum - sum).abs() < 1e-3,
                "{name}: sum {} vs {sum}",
                ours.completion_logprob_sum
            );
        }
    }
}

#[test]
fn bad_rows_name_file_line_and_field() {
    let dir = std::env::temp_dir().join(format!("align-score-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("bad.jsonl");
    std::fs::write(&f, "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\", \"completion\": 3}\n").unwrap();
    let e = read_rows(&f).unwrap_err().to_string();
    assert!(e.contains("bad.jsonl:2") && e.contains("completion"), "{e}");
    std::fs::write(&f, "{\"prompt\": \"a\"}\n").unwrap();
    let e = read_rows(&f).unwrap_err().to_string();
    assert!(e.contains("bad.jsonl:1") && e.contains("completion") && e.contains("missing"), "{e}");
    std::fs::write(&f, "not json\n").unwrap();
    assert!(read_rows(&f).unwrap_err().to_string().contains("bad.jsonl:1"));
    std::fs::remove_dir_all(&dir).ok();
}
