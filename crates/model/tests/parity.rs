//! Forward-pass parity with transformers: every directory under `fixtures/models/` that
//! holds a `reference.json` (float64 log-probs from `ref_logprobs.py`) is a case. Our f32
//! forward must match every completion token's log-prob, and the last position's top-5
//! logits, within 1e-4 absolute; our tokenizer must produce the same ids. The same cases run
//! on each GPU backend compiled in (`--features wgpu` / `cuda`), to the same tolerance.

use std::path::{Path, PathBuf};

use align_model::FusedOps;
use align_model::backend::Cpu;
use align_model::burn::tensor::activation::log_softmax;
use align_model::{Heads, HfHead, TokenBatch, load_pretrained, save_pretrained};
use serde_json::Value;

const TOL: f64 = 1e-4;

/// `ALIGN_REPO_ROOT` relocates the fixtures for the binary `cargo xtask gpu-check` carries
/// to another machine.
fn fixtures() -> PathBuf {
    let root = std::env::var_os("ALIGN_REPO_ROOT");
    root.map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."), PathBuf::from).join("fixtures")
}

fn cases() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures().join("models"))
        .expect("fixtures/models")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("reference.json").exists())
        .collect();
    v.sort();
    assert!(v.len() >= 8, "expected at least 8 reference checkpoints, found {v:?}");
    v
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Max |ours - reference| over every completion log-prob and top-5 logit of one model.
fn check_model<B: FusedOps>(dir: &Path) -> f64 {
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let device = Default::default();
    let m = load_pretrained::<B>(dir, Heads::LM, &device).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut worst = 0f64;
    for row in reference["rows"].as_array().unwrap() {
        let input_ids = ids(&row["input_ids"]);
        let prompt = row["prompt"].as_str().unwrap();
        let completion = row["completion"].as_str().unwrap();
        let ours = m.tokenizer.encode(&format!("{prompt}{completion}"), false).unwrap();
        assert_eq!(ours, input_ids, "{}: tokenisation of {prompt:?}+{completion:?}", dir.display());
        let plen = row["prompt_len"].as_u64().unwrap() as usize;

        let logits = m.model.forward(&TokenBatch::single(&input_ids, &device));
        let t = input_ids.len();
        let logp: Vec<f32> = log_softmax(logits.clone(), 2).into_data().to_vec().unwrap();
        let v = logp.len() / t;
        let expected: Vec<f64> =
            row["completion_logprobs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        for (k, pos) in (plen..t).enumerate() {
            let got = logp[(pos - 1) * v + input_ids[pos] as usize] as f64;
            let d = (got - expected[k]).abs();
            assert!(
                d < TOL,
                "{}: row {prompt:?} token {k}: ours {got}, reference {} (|Δ| {d:e})",
                dir.display(),
                expected[k]
            );
            worst = worst.max(d);
        }
        let raw: Vec<f32> = logits.into_data().to_vec().unwrap();
        let last = &raw[(t - 1) * v..t * v];
        for (id, lg) in ids(&row["last_top5"]["ids"]).iter().zip(row["last_top5"]["logits"].as_array().unwrap()) {
            let d = (last[*id as usize] as f64 - lg.as_f64().unwrap()).abs();
            assert!(d < TOL, "{}: top-5 logit of token {id}: |Δ| {d:e}", dir.display());
            worst = worst.max(d);
        }
    }
    worst
}

/// Every case on backend `B`; prints each model's worst deviation and returns the worst.
fn check_every_model<B: FusedOps>() -> f64 {
    let mut worst = 0f64;
    for dir in cases() {
        let d = check_model::<B>(&dir);
        // One JSON line per checkpoint: `cargo xtask gpu-check`'s report collects them.
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        eprintln!(
            "{}",
            serde_json::json!({"checkpoint": name, "backend": std::any::type_name::<B>(), "max_abs_deviation": d})
        );
        worst = worst.max(d);
    }
    worst
}

#[test]
fn every_reference_checkpoint_matches_transformers() {
    check_every_model::<Cpu>();
}

align_model::gpu_tests!(every_reference_checkpoint_matches_transformers_on_gpu, |G| {
    let worst = check_every_model::<G>();
    eprintln!("worst on {}: {worst:.2e}", std::any::type_name::<G>());
});

/// What we save is what we load: export → save_pretrained → load gives identical logits,
/// with HF tensor names (checked against the original file's names).
#[test]
fn save_pretrained_round_trips_with_hf_names() {
    let device = Default::default();
    for dir in cases() {
        let m = load_pretrained::<Cpu>(&dir, Heads::LM, &device).unwrap();
        let out = std::env::temp_dir().join(format!(
            "align-rt-{}-{}",
            std::process::id(),
            dir.file_name().unwrap().to_string_lossy()
        ));
        save_pretrained(&m.model, Some(&m.tokenizer), HfHead::CausalLm, &out).unwrap();
        let original = align_model::SafetensorsSource::open_dir(&dir).unwrap();
        let saved = align_model::SafetensorsSource::open_dir(&out).unwrap();
        use align_model::WeightSource;
        assert_eq!(saved.names(), original.names(), "{}", dir.display());
        let back = load_pretrained::<Cpu>(&out, Heads::LM, &device).unwrap();
        let ids: Vec<u32> = (1..20).collect();
        let a: Vec<f32> = m.model.forward(&TokenBatch::single(&ids, &device)).into_data().to_vec().unwrap();
        let b: Vec<f32> = back.model.forward(&TokenBatch::single(&ids, &device)).into_data().to_vec().unwrap();
        assert_eq!(a, b, "{}", dir.display());
        std::fs::remove_dir_all(&out).ok();
    }
}

/// A reward model: a new score head on a causal LM, saved in the
/// `…ForSequenceClassification` layout (`score.weight`, `architectures`, `num_labels`) and
/// loaded back with the same head and the same scores; a value head likewise.
#[test]
fn score_and_value_heads_round_trip() {
    let device = Default::default();
    let dir = fixtures().join("models/llama-untied");
    let heads = Heads { lm: false, score: true, value: true };
    let m = load_pretrained::<Cpu>(&dir, heads, &device).unwrap();
    assert!(m.model.lm_head.is_none());
    let out = std::env::temp_dir().join(format!("align-rm-{}", std::process::id()));
    save_pretrained(&m.model, None, HfHead::SequenceClassification, &out).unwrap();
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(cfg["num_labels"], 1);
    std::fs::copy(dir.join("tokenizer.json"), out.join("tokenizer.json")).unwrap();
    let back = load_pretrained::<Cpu>(&out, Heads { lm: false, score: true, value: false }, &device).unwrap();
    let ids: Vec<u32> = (3..30).collect();
    let batch = TokenBatch::single(&ids, &device);
    let a: Vec<f32> = m.model.scores(m.model.forward_hidden(&batch, None)).unwrap().into_data().to_vec().unwrap();
    let b: Vec<f32> = back.model.scores(back.model.forward_hidden(&batch, None)).unwrap().into_data().to_vec().unwrap();
    assert_eq!(a, b);
    assert!(a.iter().any(|x| x.abs() > 1e-4), "a fresh score head is not all zeros");
    let v = m.model.values(m.model.forward_hidden(&batch, None)).unwrap();
    assert_eq!(v.dims(), [1, ids.len()]);
    std::fs::remove_dir_all(&out).ok();
}
