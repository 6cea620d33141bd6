//! PEFT parity: an adapter made by PEFT (fixtures/adapters, xtask/scripts/make_peft_adapter.py)
//! loads onto the base and matches PEFT's float64 log-probs within 1e-4; merge / unmerge /
//! disable behave; what we save has PEFT's keys and reloads identically.

use std::path::{Path, PathBuf};

use align_lora::{LoraConfig, attach, load_peft, merge, merge_and_unload, save_peft, unmerge};
use align_model::backend::Cpu;
use align_model::burn::tensor::activation::log_softmax;
use align_model::{Heads, TokenBatch, Transformer, WeightSource, load_pretrained};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn base() -> Transformer<Cpu> {
    load_pretrained::<Cpu>(&root().join("models/llama-untied"), Heads::LM, &Default::default()).unwrap().model
}

fn logits(m: &Transformer<Cpu>, ids: &[u32]) -> Vec<f32> {
    m.forward(&TokenBatch::single(ids, &Default::default())).into_data().to_vec().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn peft_adapter_matches_peft_logprobs() {
    let dir = root().join("adapters/llama-untied-lora");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let (m, cfg) = load_peft(base(), &dir).unwrap();
    assert_eq!((cfg.r, cfg.lora_alpha), (4, 8.0));
    let plain = base();
    let mut worst = 0f64;
    for row in reference["rows"].as_array().unwrap() {
        let ids: Vec<u32> = row["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let lp: Vec<f32> =
            log_softmax(m.forward(&TokenBatch::single(&ids, &Default::default())), 2).into_data().to_vec().unwrap();
        let v = lp.len() / ids.len();
        for (t, want) in row["next_token_logprobs"].as_array().unwrap().iter().enumerate() {
            let got = lp[t * v + ids[t + 1] as usize] as f64;
            let d = (got - want.as_f64().unwrap()).abs();
            worst = worst.max(d);
            assert!(d < 1e-4, "token {t}: ours {got}, PEFT {want}");
        }
        // the adapter really changes the model
        assert!(max_diff(&logits(&m, &ids), &logits(&plain, &ids)) > 1e-2);
    }
    eprintln!("PEFT adapter: max |Δ log-prob| = {worst:.2e}");
}

#[test]
fn merge_unmerge_disable_and_save() {
    let dir = root().join("adapters/llama-untied-lora");
    let (mut m, cfg) = load_peft(base(), &dir).unwrap();
    let ids: Vec<u32> = (5..40).collect();
    let adapted = logits(&m, &ids);
    let plain = logits(&base(), &ids);

    m.set_adapters_enabled(false);
    assert_eq!(logits(&m, &ids), plain, "disabled adapters give the base model exactly");
    m.set_adapters_enabled(true);

    merge(&mut m);
    assert!(max_diff(&logits(&m, &ids), &adapted) < 1e-4, "merged == adapted");
    unmerge(&mut m);
    assert!(max_diff(&logits(&m, &ids), &adapted) < 1e-4, "unmerged == adapted");
    m.set_adapters_enabled(false);
    assert!(max_diff(&logits(&m, &ids), &plain) < 1e-5, "unmerge restores the base weights");
    m.set_adapters_enabled(true);

    // Save in PEFT layout: same keys and shapes as PEFT wrote; reload gives the same model.
    let out = std::env::temp_dir().join(format!("align-lora-{}", std::process::id()));
    save_peft(&mut m, &cfg, "fixtures/models/llama-untied", &out).unwrap();
    let ours = align_model::SafetensorsSource::open_files(&[out.join("adapter_model.safetensors")]).unwrap();
    let peft = align_model::SafetensorsSource::open_files(&[dir.join("adapter_model.safetensors")]).unwrap();
    assert_eq!(ours.names(), peft.names());
    let (back, _) = load_peft(base(), &out).unwrap();
    assert_eq!(logits(&back, &ids), adapted);

    let merged = merge_and_unload(m);
    assert!(max_diff(&logits(&merged, &ids), &adapted) < 1e-4);
    assert!(merged.layers[0].self_attn.q_proj.adapter.is_none());
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn fresh_adapters_leave_the_model_unchanged_and_only_they_train() {
    use align_model::burn::module::Module;
    let cfg = LoraConfig {
        target_modules: align_lora::TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
        ..Default::default()
    };
    let (m, names) = attach(base(), &cfg, 1).unwrap();
    assert_eq!(names.len(), 4, "{names:?}");
    assert!(names.iter().all(|n| n.ends_with("q_proj") || n.ends_with("v_proj")));
    let ids: Vec<u32> = (1..30).collect();
    assert_eq!(logits(&m, &ids), logits(&base(), &ids));
    // Trainability is an autodiff property: check on the autodiff backend.
    type Ad = align_model::backend::Autodiff<Cpu>;
    let ad_base =
        load_pretrained::<Ad>(&root().join("models/llama-untied"), Heads::LM, &Default::default()).unwrap().model;
    let (m, _) = attach(ad_base, &cfg, 1).unwrap();
    // Trainable parameters: the adapters alone.
    struct Count(usize);
    impl<B: align_model::burn::tensor::backend::Backend> align_model::burn::module::ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(
            &mut self,
            p: &align_model::burn::module::Param<align_model::burn::tensor::Tensor<B, D>>,
        ) {
            if p.is_require_grad() {
                self.0 += p.val().dims().iter().product::<usize>();
            }
        }
    }
    let mut c = Count(0);
    m.visit(&mut c);
    // 2 layers x (q: 64->64, v: 64->32), r = 8: A [in, 8] + B [8, out]
    assert_eq!(c.0, 2 * ((64 * 8 + 8 * 64) + (64 * 8 + 8 * 32)));
    let bad =
        LoraConfig { target_modules: align_lora::TargetModules::Names(vec!["nope".into()]), ..Default::default() };
    assert!(attach(base(), &bad, 0).unwrap_err().to_string().contains("match no projection"));
}
