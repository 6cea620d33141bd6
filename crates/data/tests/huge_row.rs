//! A huge row costs memory in proportion to `max_length`, not to its size, and gives the
//! tokens it would give whole. (Its own test binary: the peak RSS it reads is this test's.)

use std::path::Path;

use align_data::{Content, Example, ExampleTokenizer, TokenizeConfig, Tokenized, Truncation};
use align_model::Tokenizer;

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/llama-tied")).unwrap()
}

/// Peak resident memory of this process so far, in bytes (Linux).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

fn sequence(t: Tokenized) -> Vec<u32> {
    match t {
        Tokenized::Sequence(s) => s.input_ids,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_50_mb_row_is_tokenised_in_bounded_memory_with_the_tokens_of_the_whole_row() {
    let tok = tokenizer();
    let cfg = TokenizeConfig { max_length: Some(64), ..Default::default() };
    let unit = "The quick brown fox jumps over the lazy dog; 12345 and ünïcödé. ";
    // Exactness first, on a row small enough to tokenise whole.
    let medium = unit.repeat(20_000);
    let whole = tok.encode(&medium, false).unwrap();
    let mut t = ExampleTokenizer::new(&tok, cfg.clone());
    let ids = sequence(t.tokenize(&Example::Text { text: medium }).unwrap());
    assert_eq!(ids, whole[..64].to_vec());

    // A prompt kept by its end keeps the same tail.
    let prompt = unit.repeat(20_000) + "the end";
    let prompt_whole = tok.encode(&prompt, false).unwrap();
    let mut t = ExampleTokenizer::new(
        &tok,
        TokenizeConfig {
            max_length: Some(64),
            max_prompt_length: Some(32),
            prompt_truncation: Truncation::KeepEnd,
            ..cfg.clone()
        },
    );
    let got = t
        .tokenize(&Example::PromptCompletion { prompt: Content::Text(prompt), completion: Content::Text(" ok".into()) })
        .unwrap();
    let ids = sequence(got);
    assert_eq!(ids[..32].to_vec(), prompt_whole[prompt_whole.len() - 32..].to_vec());

    let before = peak_rss();
    let huge = unit.repeat(50 * 1024 * 1024 / unit.len());
    let mut t = ExampleTokenizer::new(&tok, cfg);
    let ids = sequence(t.tokenize(&Example::Text { text: huge }).unwrap());
    assert_eq!(ids.len(), 64);
    if let (Some(a), Some(b)) = (before, peak_rss()) {
        // The 50 MB string itself, plus a bounded tokenisation (was ~200 bytes per byte: 10 GB).
        assert!(b.saturating_sub(a) < 400 << 20, "peak RSS grew by {} MiB", (b - a) >> 20);
    }
}
