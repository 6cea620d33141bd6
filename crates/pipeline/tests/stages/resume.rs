//! Every pairwise stage through the one loop: a run cut after its step-2 checkpoint and
//! resumed logs the same losses and ends with the same weights as an uninterrupted run.

use crate::common::{metrics, root, tmp};
use std::path::Path;

use align_model::backend::Cpu;
use align_pipeline::preference::{PairwiseStage, PreferenceConfig, run_preference};

fn config(out: &Path, section: &str) -> PreferenceConfig {
    let r = root();
    let data = r.join("fixtures/data/piqa_head.jsonl");
    let text = format!(
        r#"output_dir = "{out}"
[model]
path = "{model}"
[data]
path = "{data}"
adapter = "piqa_preference"
limit = 16
[tokenize]
max_length = 128
[training]
per_device_train_batch_size = 2
gradient_accumulation_steps = 2
learning_rate = 1e-3
max_steps = 4
save_steps = 2
logging_steps = 1
{section}"#,
        out = out.display(),
        model = r.join("fixtures/models/llama-tied").display(),
        data = data.display(),
    );
    toml::from_str(&text).unwrap()
}

#[test]
fn every_pairwise_stage_resumes_to_the_same_numbers() {
    let d = tmp("pairwise-resume");
    for (name, stage, section) in [
        ("reward", PairwiseStage::Reward, "[reward]\n"),
        ("dpo", PairwiseStage::Dpo, "[dpo]\n"),
        ("orpo", PairwiseStage::Orpo, "[orpo]\n"),
        ("simpo", PairwiseStage::Simpo, "[simpo]\nsft_weight = 0.5\n"),
    ] {
        let whole = config(&d.join(format!("{name}-whole")), section);
        run_preference::<Cpu>(&whole, stage, false, &Default::default()).unwrap();
        let cut = config(&d.join(format!("{name}-cut")), section);
        run_preference::<Cpu>(&cut, stage, false, &Default::default()).unwrap();
        std::fs::remove_dir_all(d.join(format!("{name}-cut/final"))).unwrap();
        run_preference::<Cpu>(&cut, stage, true, &Default::default()).unwrap();
        let (a, b) = (metrics(&d.join(format!("{name}-whole"))), metrics(&d.join(format!("{name}-cut"))));
        assert_eq!(a.len(), 4, "{name}");
        assert_eq!(a.len(), b.len(), "{name}");
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.loss, y.loss, "{name} step {}", x.step);
        }
        let w = |p: String| std::fs::read(d.join(p).join("model.safetensors")).unwrap();
        assert!(w(format!("{name}-whole/final")) == w(format!("{name}-cut/final")), "{name}: the same weights");
    }
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn moments_the_model_does_not_train_are_refused_on_resume() {
    use align_model::WeightSource;
    // A checkpoint whose optimizer keys another layout (e.g. written by another version):
    // resuming would restart that parameter's moments from zero without a word.
    let d = tmp("stray-moments");
    let cfg = config(&d.join("run"), "[dpo]\n");
    run_preference::<Cpu>(&cfg, PairwiseStage::Dpo, false, &Default::default()).unwrap();
    std::fs::remove_dir_all(d.join("run/final")).unwrap();
    let step = d.join("run/checkpoints/step-2/optimizer.safetensors");
    let mut src = align_model::SafetensorsSource::open_files(std::slice::from_ref(&step)).unwrap();
    let mut renamed = align_model::TensorMap::default();
    for name in src.names() {
        let t = src.load(&name).unwrap();
        renamed.0.insert(name.replace("self_attn.q_proj.linear.weight", "self_attn.c_attn.linear.weight"), t);
    }
    drop(src);
    align_model::weights::save_safetensors(&renamed, &step).unwrap();
    let err = format!("{:#}", run_preference::<Cpu>(&cfg, PairwiseStage::Dpo, true, &Default::default()).unwrap_err());
    assert!(err.contains("optimizer.safetensors") && err.contains("c_attn") && err.contains("does not train"), "{err}");
    std::fs::remove_dir_all(&d).ok();
}
