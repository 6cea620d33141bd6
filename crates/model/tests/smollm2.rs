//! The real model: SmolLM2-135M-Instruct's Q4_1 GGUF (fetched by `cargo xtask fetch
//! smollm2`; `cargo xtask test` passes its path in `ALIGN_SMOLLM2_GGUF`). Log-probs must
//! match an independent implementation of the same dequantised weights — transformers'
//! own GGUF loader, scored in float64 (fixtures/smollm2/reference.json, made by
//! xtask/scripts/smollm2_reference.py) — and our GGUF tokenizer must reproduce its token ids.

use std::path::{Path, PathBuf};

use align_model::backend::Cpu;
use align_model::burn::tensor::activation::log_softmax;
use align_model::{Heads, TokenBatch, load_pretrained};
use serde_json::Value;

fn gguf_path() -> PathBuf {
    if let Some(p) = std::env::var_os("ALIGN_SMOLLM2_GGUF") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("ALIGN_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache"))
            .join("align")
    });
    let p = cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run `cargo xtask fetch smollm2` (or `cargo xtask test`)", p.display());
    p
}

#[test]
fn smollm2_logprobs_match_transformers_on_the_dequantised_gguf() {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/smollm2/reference.json"))
            .unwrap(),
    )
    .unwrap();
    let device = Default::default();
    let m = load_pretrained::<Cpu>(&gguf_path(), Heads::LM, &device).unwrap();
    let c = &m.model.config;
    assert_eq!((c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads), (30, 576, 9, 3));
    assert!(c.tie_word_embeddings);
    let mut worst = 0f64;
    for row in reference["rows"].as_array().unwrap() {
        let ids: Vec<u32> = row["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let (p, comp) = (row["prompt"].as_str().unwrap(), row["completion"].as_str().unwrap());
        assert_eq!(m.tokenizer.encode(&format!("{p}{comp}"), false).unwrap(), ids, "tokens of {p:?}");
        let plen = row["prompt_len"].as_u64().unwrap() as usize;
        let logp: Vec<f32> =
            log_softmax(m.model.forward(&TokenBatch::single(&ids, &device)), 2).into_data().to_vec().unwrap();
        let v = c.vocab_size;
        for (k, want) in row["completion_logprobs"].as_array().unwrap().iter().enumerate() {
            let pos = plen + k;
            let got = logp[(pos - 1) * v + ids[pos] as usize] as f64;
            let d = (got - want.as_f64().unwrap()).abs();
            worst = worst.max(d);
            assert!(d < 1e-3, "{p:?} token {k}: ours {got}, transformers {want} (|Δ| {d:e})");
        }
    }
    eprintln!("SmolLM2-135M: max |Δ log-prob| vs transformers (float64) = {worst:.2e}");
    assert!(worst < 2e-4, "worst |Δ| {worst:e}");
}

#[test]
fn smollm2_answers_paris() {
    let device = Default::default();
    let m = load_pretrained::<Cpu>(&gguf_path(), Heads::LM, &device).unwrap();
    let template = m.tokenizer.chat_template.as_ref().expect("SmolLM2's GGUF carries a chat template");
    let prompt = template
        .render(&[align_model::ChatMessage::new("user", "What is the capital of France?")], true, None)
        .unwrap();
    assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt:?}");
    let ids = m.tokenizer.encode(&prompt, false).unwrap();
    // Greedy decoding by hand with the KV cache (align-rollout builds on this).
    let mut cache = m.model.new_cache();
    let mut h = m.model.forward_hidden(&TokenBatch::single(&ids, &device), Some(&mut cache));
    let end = m.tokenizer.token_to_id("<|im_end|>").unwrap();
    let mut out = Vec::new();
    for step in 0..24 {
        let t = h.dims()[1];
        let next = m.model.logits(h.narrow(1, t - 1, 1)).argmax(2).into_data().convert::<i64>().to_vec::<i64>().unwrap()
            [0] as u32;
        if next == end {
            break;
        }
        out.push(next);
        h = m
            .model
            .forward_hidden(&TokenBatch::next_tokens(&[next], &[(ids.len() + step) as i64], &device), Some(&mut cache));
    }
    let text = m.tokenizer.decode(&out, true).unwrap();
    assert!(text.contains("Paris"), "{text:?}");
}
