//! GGUF dequantisation against llama.cpp's own Python reader (`gguf` package): one tensor
//! of every supported ggml type (fixtures/gguf, made by xtask/scripts/gguf_quant_reference.py).

use std::path::Path;

use align_model::gguf::GgufFile;
use serde_json::Value;

#[test]
fn every_type_dequantises_like_gguf_py() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gguf");
    let g = GgufFile::open(&dir.join("quant_types.gguf")).unwrap();
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("quant_types.expected.json")).unwrap()).unwrap();
    let cases = expected.as_object().unwrap();
    assert_eq!(cases.len(), 8);
    for (name, case) in cases {
        let t = g.dequantize(name).unwrap();
        let shape: Vec<usize> =
            case["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        assert_eq!(t.shape, shape, "{name}");
        let want: Vec<f64> = case["values"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        for (i, (a, b)) in t.data.iter().zip(&want).enumerate() {
            assert!(
                (*a as f64 - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{name} ({}) element {i}: {a} vs {b}",
                case["type"]
            );
        }
    }
}

#[test]
fn truncated_file_names_the_tensor() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gguf");
    let bytes = std::fs::read(dir.join("quant_types.gguf")).unwrap();
    let tmp = std::env::temp_dir().join(format!("align-trunc-{}.gguf", std::process::id()));
    std::fs::write(&tmp, &bytes[..bytes.len() - 100]).unwrap();
    let err = GgufFile::open(&tmp).err().expect("truncated file must fail").to_string();
    std::fs::remove_file(&tmp).ok();
    assert!(err.contains("truncated") && err.contains("t_q6_k"), "{err}");
}

// Packed (quantised) bases: the same values in another storage.

use align_model::backend::Cpu;
use align_model::burn::tensor::Tensor;
use align_model::quant::{GgmlBlock, QuantFormat};
use align_model::{BaseStorage, Heads, TokenBatch, Transformer, build_stored, load_pretrained_stored, save_pretrained};

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn logits(m: &Transformer<Cpu>, ids: &[u32]) -> Vec<f32> {
    let out: Tensor<Cpu, 3> = m.forward(&TokenBatch::single(ids, &Default::default()));
    out.into_data().to_vec().unwrap()
}

/// The largest difference relative to the largest magnitude of `want`.
fn rel_diff(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale
}

const IDS: [u32; 12] = [5, 77, 123, 9, 300, 42, 8, 500, 17, 260, 61, 3];

#[test]
fn every_block_type_packs_as_it_dequantises() {
    let g = GgufFile::open(&fixtures().join("gguf/quant_types.gguf")).unwrap();
    let mut blocks = 0;
    for name in g.tensors.keys() {
        let Some((block, shape, bytes)) = g.blocks(name) else { continue };
        let packed = align_model::quant::PackedMatrix::from_ggml(block, shape[0], shape[1], bytes.to_vec()).unwrap();
        assert_eq!(packed.dequantize(), g.dequantize(name).unwrap().data, "{name}");
        assert_eq!(packed.stored_bytes(), bytes.len());
        blocks += 1;
    }
    assert_eq!(blocks, 5, "Q8_0, Q4_0, Q4_1, Q4_K and Q6_K");
}

#[test]
fn gguf_native_base_matches_the_dequantised_base() {
    let path = fixtures().join("gguf/llama-untied-mixed.gguf");
    let device = Default::default();
    let dense = load_pretrained_stored::<Cpu>(&path, Heads::LM, BaseStorage::Dense, &device).unwrap().model;
    let native = load_pretrained_stored::<Cpu>(&path, Heads::LM, BaseStorage::Gguf, &device).unwrap().model;
    // 2 layers × 7 projections, each kept in its file's blocks (Q8_0, Q4_1, Q4_0).
    let (packed, bytes) = native.packed_size();
    assert_eq!(packed, 14);
    let values = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3);
    assert!(bytes < values, "{bytes} bytes for {values} values");
    assert_eq!(dense.packed_size(), (0, 0));
    let diff = rel_diff(&logits(&native, &IDS), &logits(&dense, &IDS));
    assert!(diff < 1e-5, "GGUF-native vs dequantised logits: {diff}");
    // And both are the checkpoint the file was made from, up to the quantisation error.
    let hf = align_model::load_pretrained::<Cpu>(&fixtures().join("models/llama-untied"), Heads::LM, &device).unwrap();
    let diff = rel_diff(&logits(&dense, &IDS), &logits(&hf.model, &IDS));
    eprintln!("dequantised GGUF vs the f32 checkpoint: {diff}");
    assert!(diff > 0.0 && diff < 0.5, "dequantised GGUF vs the f32 checkpoint: {diff}");
}

#[test]
fn a_quantised_base_is_the_dense_base_of_its_values() {
    let device = Default::default();
    // Llama: 7 projections per layer; GPT-2: c_attn (fused q/k/v), c_proj, c_fc, c_proj.
    for (model, projections) in [("llama-untied", 14), ("gpt2", 8)] {
        let dir = fixtures().join("models").join(model);
        let hf = align_model::load_pretrained::<Cpu>(&dir, Heads::LM, &device).unwrap();
        let tmp = std::env::temp_dir().join(format!("align-packed-{model}-{}", std::process::id()));
        for format in [
            QuantFormat::Nf4 { double_quant: false },
            QuantFormat::Nf4 { double_quant: true },
            QuantFormat::Ggml(GgmlBlock::Q8_0),
            QuantFormat::Ggml(GgmlBlock::Q4_0),
        ] {
            let q = load_pretrained_stored::<Cpu>(&dir, Heads::LM, BaseStorage::Quantize(format), &device).unwrap();
            assert_eq!(q.model.packed_size().0, projections, "{model} {format}");
            // The export dequantises: loaded back dense, it computes what the packed base does.
            save_pretrained(&q.model, Some(&q.tokenizer), align_model::HfHead::CausalLm, &tmp).unwrap();
            let back = align_model::load_pretrained::<Cpu>(&tmp, Heads::LM, &device).unwrap().model;
            let diff = rel_diff(&logits(&q.model, &IDS), &logits(&back, &IDS));
            assert!(diff < 1e-5, "{model} {format}: packed vs its dense export {diff}");
            // The tiny checkpoints' weights are noise, which 4 bits keep only roughly.
            let error = rel_diff(&logits(&q.model, &IDS), &logits(&hf.model, &IDS));
            let bound = if format == QuantFormat::Ggml(GgmlBlock::Q8_0) { 0.02 } else { 0.5 };
            eprintln!("{model} {format}: logits' quantisation error {error}");
            assert!(error > 0.0 && error < bound, "{model} {format}: quantisation error {error}");
        }
        std::fs::remove_dir_all(&tmp).ok();
    }
}

#[test]
fn quantising_names_the_tensor_that_does_not_fit() {
    // 48 features are not a whole number of Q8_0's blocks of 32 (NF4's blocks run over the
    // flattened matrix, so it takes any shape).
    let device = Default::default();
    let mut cfg = align_model::ModelConfig::from_file(&fixtures().join("models/llama-untied/config.json")).unwrap();
    cfg.hidden_size = 48;
    cfg.num_attention_heads = 3;
    cfg.num_key_value_heads = 3;
    let q8 = BaseStorage::Quantize(QuantFormat::Ggml(GgmlBlock::Q8_0));
    let mut src = align_model::RandomInit { std: 0.02, seed: 1 };
    let err = build_stored::<Cpu>(&cfg, &mut src, Heads::LM, q8, &device).err().unwrap().to_string();
    assert!(err.contains("model.layers.0.self_attn.q_proj.weight") && err.contains("48 columns"), "{err}");
    let nf4 = BaseStorage::Quantize(QuantFormat::Nf4 { double_quant: true });
    let m = build_stored::<Cpu>(&cfg, &mut src, Heads::LM, nf4, &device).unwrap();
    assert_eq!(m.packed_size().0, 14);
}
