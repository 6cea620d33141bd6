//! Tokenizer fixtures: llama.cpp's vocab test vectors (every `*.gguf.inp`/`*.gguf.out` pair
//! in `fixtures/tokenizers/llama.cpp-vocab`, discovered, so adding a pair adds cases) and
//! the Qwen3 `tokenizer.json` with its chat template, against transformers' outputs; small
//! SentencePiece GGUFs written here for byte fallback, special tokens and metadata errors.

use std::path::{Path, PathBuf};

use align_model::gguf::GgufFile;
use align_model::{ChatMessage, Tokenizer};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tokenizers")
}

/// Every text of each vocabulary encodes to llama.cpp's ids (its `test-tokenizer-0`: no BOS,
/// specials not parsed) and decodes back to itself.
#[test]
fn llama_cpp_vocab_vectors() {
    let dir = fixtures().join("llama.cpp-vocab");
    let mut pairs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".gguf.inp"))
        .collect();
    pairs.sort();
    assert!(pairs.len() >= 4, "{pairs:?}");
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
            let back = tok.decode(&got, false).unwrap();
            if back != *text {
                failures.push(format!("{text:?}: decodes to {back:?}"));
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
    assert_eq!(total, 184);
}

/// A GGUF metadata value for [`gguf_bytes`].
enum Meta {
    U32(u32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    F32s(Vec<f32>),
    I32s(Vec<i32>),
}

/// A GGUF file of metadata only (no tensors).
fn gguf_bytes(kv: &[(&str, Meta)]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend((kv.len() as u64).to_le_bytes());
    fn string(b: &mut Vec<u8>, s: &str) {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    }
    fn array<T>(b: &mut Vec<u8>, item_type: u32, items: &[T], mut put: impl FnMut(&mut Vec<u8>, &T)) {
        b.extend(9u32.to_le_bytes());
        b.extend(item_type.to_le_bytes());
        b.extend((items.len() as u64).to_le_bytes());
        for item in items {
            put(b, item);
        }
    }
    for (k, v) in kv {
        string(&mut b, k);
        match v {
            Meta::U32(n) => {
                b.extend(4u32.to_le_bytes());
                b.extend(n.to_le_bytes());
            }
            Meta::Bool(x) => {
                b.extend(7u32.to_le_bytes());
                b.push(*x as u8);
            }
            Meta::Str(s) => {
                b.extend(8u32.to_le_bytes());
                string(&mut b, s);
            }
            Meta::Strs(items) => array(&mut b, 8, items, |b, s| string(b, s)),
            Meta::F32s(items) => array(&mut b, 6, items, |b, x| b.extend(x.to_le_bytes())),
            Meta::I32s(items) => array(&mut b, 5, items, |b, x| b.extend(x.to_le_bytes())),
        }
    }
    b
}

/// A small SentencePiece ("llama") vocabulary as GGUF metadata: `<unk>`, `<s>`, `</s>`, the
/// 256 byte tokens, then `pieces` with their scores; `edit` replaces or adds keys.
fn spm_metadata(pieces: &[(&str, f32)], edit: Vec<(&'static str, Meta)>) -> Vec<(&'static str, Meta)> {
    let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    let mut types = vec![2, 3, 3];
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    types.extend([6; 256]);
    let mut scores = vec![0.0; tokens.len()];
    for (piece, score) in pieces {
        tokens.push(piece.to_string());
        types.push(1);
        scores.push(*score);
    }
    let mut kv = vec![
        ("tokenizer.ggml.model", Meta::Str("llama".into())),
        ("tokenizer.ggml.tokens", Meta::Strs(tokens)),
        ("tokenizer.ggml.scores", Meta::F32s(scores)),
        ("tokenizer.ggml.token_type", Meta::I32s(types)),
        ("tokenizer.ggml.bos_token_id", Meta::U32(1)),
        ("tokenizer.ggml.eos_token_id", Meta::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Meta::U32(0)),
    ];
    for (key, value) in edit {
        kv.retain(|(k, _)| *k != key);
        kv.push((key, value));
    }
    kv
}

/// The tokenizer of a GGUF file holding `kv`, or the error loading it, with the file's path
/// (removed once read).
fn spm_tokenizer(name: &str, kv: &[(&str, Meta)]) -> (Result<Tokenizer, String>, PathBuf) {
    let path = std::env::temp_dir().join(format!("align-spm-{}-{name}.gguf", std::process::id()));
    std::fs::write(&path, gguf_bytes(kv)).unwrap();
    let tok = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).map_err(|e| e.to_string());
    std::fs::remove_file(&path).ok();
    (tok, path)
}

const FIRST_PIECE: u32 = 3 + 256;

/// Pieces merge best score first (not in id order), and a character outside the vocabulary
/// is spelt as its UTF-8 bytes, which decode back to it.
#[test]
fn sentencepiece_merges_by_score_and_falls_back_to_bytes() {
    let pieces =
        [("▁", -1.0), ("a", -2.0), ("b", -3.0), ("c", -4.0), ("▁a", -9.0), ("bc", -8.0), ("ab", -5.0), ("abc", -6.0)];
    let (tok, _) = spm_tokenizer("merges", &spm_metadata(&pieces, vec![]));
    let tok = tok.unwrap();
    let id = |piece: &str| tok.token_to_id(piece).unwrap();
    // "▁abc": `ab` (-5) beats `bc` (-8) and `▁a` (-9), then `abc` (-6); `▁abc` is no token.
    assert_eq!(tok.encode("abc", false).unwrap(), [id("▁"), id("abc")]);
    // "€" is not a token: its three bytes are.
    let euro = tok.encode("a€", false).unwrap();
    let bytes = [0xE2, 0x82, 0xAC].map(|b| 3 + b);
    assert_eq!(euro, [vec![id("▁a")], bytes.to_vec()].concat());
    assert_eq!(tok.decode(&euro, false).unwrap(), "a€");
    assert_eq!(id("▁"), FIRST_PIECE);
}

/// BOS is added by default (llama.cpp's default for "llama" files) and where
/// `tokenizer.ggml.add_bos_token` says so, EOS where `add_eos_token` does; without
/// `add_space_prefix` no `▁` is prepended.
#[test]
fn sentencepiece_special_tokens_follow_the_metadata() {
    let pieces = [("▁", -1.0), ("a", -2.0), ("▁a", -3.0)];
    let (a, space_a) = (FIRST_PIECE + 1, FIRST_PIECE + 2);
    let (tok, _) = spm_tokenizer("bos-default", &spm_metadata(&pieces, vec![]));
    let tok = tok.unwrap();
    assert_eq!(tok.encode("a", true).unwrap(), [1, space_a]);
    assert_eq!(tok.encode("a", false).unwrap(), [space_a]);
    assert_eq!((tok.bos_token_id, tok.eos_token_id), (Some(1), Some(2)));
    assert_eq!(tok.decode(&[1, space_a], true).unwrap(), "a");

    let edit =
        vec![("tokenizer.ggml.add_bos_token", Meta::Bool(false)), ("tokenizer.ggml.add_eos_token", Meta::Bool(true))];
    let (tok, _) = spm_tokenizer("eos-only", &spm_metadata(&pieces, edit));
    assert_eq!(tok.unwrap().encode("a", true).unwrap(), [space_a, 2]);

    let edit = vec![("tokenizer.ggml.add_space_prefix", Meta::Bool(false))];
    let (tok, _) = spm_tokenizer("no-prefix", &spm_metadata(&pieces, edit));
    let tok = tok.unwrap();
    assert_eq!(tok.encode("a a", true).unwrap(), [1, a, space_a]);
    assert_eq!(tok.decode(&[a, space_a], false).unwrap(), "a a");
}

/// Malformed SentencePiece metadata is an error naming the file and the key.
#[test]
fn sentencepiece_metadata_errors_name_the_file_and_key() {
    let pieces = [("▁", -1.0), ("a", -2.0)];
    let short = vec![0.0; 3 + 256 + 1];
    let cases = [
        ("scores-short", ("tokenizer.ggml.scores", Meta::F32s(short)), "tokenizer.ggml.scores"),
        ("scores-text", ("tokenizer.ggml.scores", Meta::Str("0".into())), "tokenizer.ggml.scores"),
        ("types-short", ("tokenizer.ggml.token_type", Meta::I32s(vec![1; 4])), "tokenizer.ggml.token_type"),
        ("bos-text", ("tokenizer.ggml.bos_token_id", Meta::Str("<s>".into())), "tokenizer.ggml.bos_token_id"),
        ("add-bos-number", ("tokenizer.ggml.add_bos_token", Meta::U32(1)), "tokenizer.ggml.add_bos_token"),
    ];
    for (name, edit, key) in cases {
        let (tok, path) = spm_tokenizer(name, &spm_metadata(&pieces, vec![edit]));
        let Err(e) = tok else { panic!("{name}: loaded") };
        assert!(e.contains(key) && e.contains(&path.display().to_string()), "{name}: {e}");
    }
    let mut tokens: Vec<String> = (0..3 + 256 + 2).map(|i| format!("t{i}")).collect();
    tokens[5] = "t4".into();
    let (tok, path) =
        spm_tokenizer("twice", &spm_metadata(&pieces, vec![("tokenizer.ggml.tokens", Meta::Strs(tokens))]));
    let e = tok.expect_err("a token listed twice is refused");
    assert!(
        e.contains("tokenizer.ggml.tokens") && e.contains("\"t4\"") && e.contains(&path.display().to_string()),
        "{e}"
    );
    // An id past the token list is dropped, as llama.cpp does.
    let edit = vec![("tokenizer.ggml.padding_token_id", Meta::U32(100_000))];
    let (tok, _) = spm_tokenizer("pad-past", &spm_metadata(&pieces, edit));
    assert_eq!(tok.unwrap().pad_token_id, None);
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
