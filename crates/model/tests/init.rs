//! A model initialised from a config alone (the built-in demo's start): HF's layout and
//! names, transformers' init statistics, reproducible from its seed.

use std::path::Path;

use align_model::backend::Cpu;
use align_model::burn::tensor::Tensor;
use align_model::{Heads, HfHead, ModelConfig, SafetensorsSource, TokenBatch, WeightSource, export, init_random};

fn config() -> ModelConfig {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/llama-untied");
    ModelConfig::from_file(&dir.join("config.json")).unwrap()
}

fn logits(m: &align_model::Transformer<Cpu>) -> Vec<f32> {
    let t: Tensor<Cpu, 3> = m.forward(&TokenBatch::single(&[1, 5, 9, 42], &Default::default()));
    t.into_data().convert::<f32>().to_vec().unwrap()
}

#[test]
fn random_init_has_hf_names_and_transformers_statistics() {
    let c = config();
    let d = Default::default();
    let a = init_random::<Cpu>(&c, Heads::LM, 0.02, 7, &d).unwrap();
    let b = init_random::<Cpu>(&c, Heads::LM, 0.02, 7, &d).unwrap();
    let other = init_random::<Cpu>(&c, Heads::LM, 0.02, 8, &d).unwrap();
    let (la, lb, lo) = (logits(&a), logits(&b), logits(&other));
    assert!(la.iter().all(|x| x.is_finite()));
    assert_eq!(la, lb, "one seed, one model");
    assert_ne!(la, lo);
    // The same tensors, by name and shape, as the transformers checkpoint of this config.
    let ours = export(&a, HfHead::CausalLm).unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/llama-untied");
    let mut theirs = SafetensorsSource::open_files(&[dir.join("model.safetensors")]).unwrap();
    assert_eq!(ours.0.keys().cloned().collect::<Vec<_>>(), theirs.names());
    for (k, t) in &ours.0 {
        assert_eq!(t.shape, theirs.load(k).unwrap().shape, "{k}");
        let n = t.data.len() as f64;
        let mean = t.data.iter().map(|&x| x as f64).sum::<f64>() / n;
        let std = (t.data.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        if k.contains("norm") {
            assert!(t.data.iter().all(|&x| x == 1.0), "{k}: norms start at one");
        } else {
            assert!((std - 0.02).abs() < 0.002 && mean.abs() < 0.002, "{k}: mean {mean}, std {std}");
        }
    }
}
