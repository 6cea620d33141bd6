//! Tokenizer fixtures: llama.cpp's vocab test vectors (every `*.gguf.inp`/`*.gguf.out` pair
//! in `fixtures/tokenizers/llama.cpp-vocab`, discovered, so adding a pair adds cases) and
//! the Qwen3 `tokenizer.json` with its chat template, against transformers' outputs.

use std::path::{Path, PathBuf};

use align_model::gguf::GgufFile;
use align_model::{ChatMessage, Tokenizer};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tokenizers")
}

#[test]
fn llama_cpp_vocab_vectors() {
    let dir = fixtures().join("llama.cpp-vocab");
    let mut pairs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".gguf.inp"))
        .collect();
    pairs.sort();
    assert!(pairs.len() >= 3, "{pairs:?}");
    let mut total = 0;
    for inp in pairs {
        let gguf = PathBuf::from(inp.to_string_lossy().trim_end_matches(".inp").to_string());
        let out = PathBuf::from(format!("{}.out", gguf.display()));
        let tok = Tokenizer::from_gguf(&GgufFile::open(&gguf).unwrap()).unwrap_or_else(|e| panic!("{e}"));
        let inputs = std::fs::read_to_string(&inp).unwrap();
        let texts: Vec<&str> = inputs.split("\n__ggml_vocab_test__\n").collect();
        let expected = std::fs::read_to_string(&out).unwrap();
        let expected: Vec<&str> = expected.lines().collect();
        // The .inp file ends with a separator line; the last split piece is empty.
        let texts = &texts[..expected.len()];
        let mut failures = Vec::new();
        for (text, want) in texts.iter().zip(&expected) {
            let want: Vec<u32> = want.split_whitespace().map(|x| x.parse().unwrap()).collect();
            let got = tok.encode(text, false).unwrap();
            if got != want {
                failures.push(format!("{text:?}: got {got:?}, want {want:?}"));
            }
            total += 1;
        }
        assert!(
            failures.is_empty(),
            "{}: {} of {} cases differ:\n{}",
            gguf.display(),
            failures.len(),
            texts.len(),
            failures.join("\n")
        );
        assert_eq!(texts.len(), 46, "{}", inp.display());
    }
    assert_eq!(total, 138);
}

#[test]
fn qwen3_tokenizer_json_and_chat_template() {
    let dir = fixtures().join("qwen3-hf");
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    for case in expected["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(ids, want, "{text:?}");
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "round trip of {text:?}");
    }
    let template = tok.chat_template.as_ref().expect("Qwen3 ships a chat template");
    for (name, case) in expected["chat"].as_object().unwrap() {
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let extra = case.get("enable_thinking").map(|v| serde_json::json!({ "enable_thinking": v }));
        let got = template.render(&messages, case["add_generation_prompt"].as_bool().unwrap(), extra.as_ref()).unwrap();
        assert_eq!(got, case["rendered"].as_str().unwrap(), "conversation {name}");
    }
}

/// Every `fixtures/chat_templates/NAME.jinja` renders each conversation of
/// `NAME.expected.json` exactly as transformers does (Llama 3, Qwen2 from GGUF metadata).
#[test]
fn chat_templates_render_like_transformers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/chat_templates");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "jinja") {
            continue;
        }
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(path.with_extension("expected.json")).unwrap()).unwrap();
        let t = align_model::ChatTemplate::new(
            &std::fs::read_to_string(&path).unwrap(),
            expected["bos_token"].as_str().map(str::to_string),
            expected["eos_token"].as_str().map(str::to_string),
        )
        .unwrap();
        for case in expected["cases"].as_array().unwrap() {
            let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
            let got = t.render(&messages, case["add_generation_prompt"].as_bool().unwrap(), None).unwrap();
            assert_eq!(got, case["rendered"].as_str().unwrap(), "{}", path.display());
            n += 1;
        }
    }
    assert!(n >= 4, "{n} cases");
}

/// The demo's word-level tokenizer: exact round trips of single-spaced text, unknown words
/// to `<unk>`, special ids, and the same tokenizer after save + load.
#[test]
fn word_level_tokenizer_round_trips() {
    let words = ["Ann", "has", "3", "apples", ".", "</think>", "<answer>", "</answer>", "has"];
    let t = align_model::Tokenizer::word_level(&words).unwrap();
    let text = "Ann has 3 apples . </think> <answer> 3 </answer>";
    let ids = t.encode(text, false).unwrap();
    assert_eq!(ids, vec![3, 4, 5, 6, 7, 8, 9, 5, 10]);
    assert_eq!(t.decode(&ids, true).unwrap(), text);
    assert_eq!(t.encode("Ann has 4", false).unwrap(), vec![3, 4, 0]);
    assert_eq!((t.eos_token_id, t.pad_token_id, t.vocab_size()), (Some(2), Some(1), 11));
    assert_eq!(t.decode(&[3, 2, 1], true).unwrap(), "Ann", "specials are skipped");
    let dir = std::env::temp_dir().join(format!("align-wordlevel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    t.save(&dir).unwrap();
    let back = align_model::Tokenizer::from_dir(&dir).unwrap();
    assert_eq!(back.encode(text, false).unwrap(), ids);
    assert_eq!((back.eos_token_id, back.pad_token_id), (Some(2), Some(1)));
    std::fs::remove_dir_all(&dir).ok();
    assert!(align_model::Tokenizer::word_level(&["two words"]).is_err());
}
