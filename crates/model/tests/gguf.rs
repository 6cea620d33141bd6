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
