//! LoRA on a quantised base (QLoRA): SFT and DPO on an NF4 base and on a GGUF file's own
//! blocks log the losses of the same stage on a dense base holding the same values (the
//! packed base only changes the storage), and the `[model]` quantisation keys are checked.

use crate::common::{metrics, root, tmp};
use std::path::Path;

use align_model::backend::Cpu;
use align_model::{BaseStorage, Heads, HfHead, load_pretrained_stored, save_pretrained};
use align_pipeline::config::StageConfig;
use align_pipeline::preference::{PairwiseStage, PreferenceConfig, run_preference};
use align_pipeline::sft::{SftConfig, run_sft};

const LORA: &str = "[lora]\nr = 4\nlora_alpha = 8\nlora_dropout = 0.0\n";

fn sft_config(out: &Path, model: &Path, model_keys: &str) -> SftConfig {
    let text = format!(
        "output_dir = \"{out}\"\n[model]\npath = \"{model}\"\n{model_keys}\n[data]\npath = \"{data}\"\nadapter = \"gsm8k_sft\"\nlimit = 8\n[tokenize]\nmax_length = 192\nmax_prompt_length = 96\n[training]\nper_device_train_batch_size = 4\nlearning_rate = 1e-2\nmax_steps = 6\nlogging_steps = 1\nsave_steps = 0\nlr_scheduler_type = \"constant\"\n{LORA}",
        out = out.display(),
        model = model.display(),
        data = root().join("fixtures/data/gsm8k_train_head.jsonl").display(),
    );
    toml::from_str(&text).unwrap()
}

fn dpo_config(out: &Path, model: &Path, model_keys: &str) -> PreferenceConfig {
    let data = root().join("fixtures/data/piqa_head.jsonl");
    let text = format!(
        "output_dir = \"{out}\"\n[model]\npath = \"{model}\"\n{model_keys}\n[data]\npath = \"{data}\"\nadapter = \"piqa_preference\"\nlimit = 8\n[tokenize]\nmax_length = 128\n[training]\nper_device_train_batch_size = 8\nlearning_rate = 1e-3\nmax_steps = 3\nlogging_steps = 1\nsave_steps = 0\nlr_scheduler_type = \"constant\"\n{LORA}[dpo]\n",
        out = out.display(),
        model = model.display(),
        data = data.display(),
    );
    toml::from_str(&text).unwrap()
}

/// Each step's loss, of a run in `dir`.
fn losses(dir: &Path) -> Vec<f64> {
    metrics(dir).iter().filter_map(|m| m.loss).collect()
}

fn same_losses(what: &str, packed: &[f64], dense: &[f64]) {
    assert_eq!(packed.len(), dense.len(), "{what}");
    for (p, d) in packed.iter().zip(dense) {
        assert!((p - d).abs() <= 1e-5, "{what}: packed {packed:?} vs dense {dense:?}");
    }
}

/// SFT and DPO with `model_keys` on `packed_model`, and on `dense_model`: equal losses.
fn stages_match(name: &str, packed_model: &Path, model_keys: &str, dense_model: &Path) {
    let d = tmp(name);
    run_sft::<Cpu>(&sft_config(&d.join("sft-packed"), packed_model, model_keys), false, &Default::default()).unwrap();
    run_sft::<Cpu>(&sft_config(&d.join("sft-dense"), dense_model, ""), false, &Default::default()).unwrap();
    let (p, q) = (losses(&d.join("sft-packed")), losses(&d.join("sft-dense")));
    same_losses(&format!("{name} SFT"), &p, &q);
    assert!(p.last().unwrap() < &(p[0] - 0.1), "{name}: SFT must learn, {p:?}");
    assert!(d.join("sft-packed/final/adapter_model.safetensors").exists());

    // DPO's reference is the same base with the adapters off: ln 2 at the first step.
    let run = |dir: &str, model: &Path, keys: &str| {
        let cfg = dpo_config(&d.join(dir), model, keys);
        run_preference::<Cpu>(&cfg, PairwiseStage::Dpo, false, &Default::default()).unwrap();
        losses(&d.join(dir))
    };
    let (p, q) = (run("dpo-packed", packed_model, model_keys), run("dpo-dense", dense_model, ""));
    assert!((p[0] - std::f64::consts::LN_2).abs() < 1e-6, "{name}: DPO starts at ln 2, {p:?}");
    same_losses(&format!("{name} DPO"), &p, &q);
    assert!(p[2] < p[0], "{name}: DPO must learn, {p:?}");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn lora_on_a_gguf_native_base_matches_the_dequantised_base() {
    let gguf = root().join("fixtures/gguf/llama-untied-mixed.gguf");
    // The dense twin is the same file, dequantised to f32 on load.
    stages_match("qlora-gguf", &gguf, "quantize = \"gguf\"", &gguf);
}

#[test]
fn lora_on_an_nf4_base_matches_a_dense_base_of_its_values() {
    let d = tmp("qlora-nf4-base");
    let hf = root().join("fixtures/models/llama-untied");
    let nf4 = align_model::quant::QuantFormat::Nf4 { double_quant: true };
    let packed =
        load_pretrained_stored::<Cpu>(&hf, Heads::LM, BaseStorage::Quantize(nf4), &Default::default()).unwrap();
    // Exported, the NF4 base is dequantised: a dense checkpoint of the same values.
    save_pretrained(&packed.model, Some(&packed.tokenizer), HfHead::CausalLm, &d).unwrap();
    stages_match("qlora-nf4", &hf, "load_in_4bit = true\nbnb_4bit_use_double_quant = true", &d);
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn quantisation_keys_are_checked() {
    let hf = root().join("fixtures/models/llama-untied");
    let parse = |keys: &str, lora: &str| -> anyhow::Result<StageConfig> {
        let text = format!(
            "output_dir = \"/tmp/x\"\n[model]\npath = \"{}\"\n{keys}\n[data]\npath = \"d.jsonl\"\n{lora}",
            hf.display()
        );
        let cfg: StageConfig = toml::from_str(&text)?;
        cfg.validate_fields()?;
        Ok(cfg)
    };
    let err = |keys: &str, lora: &str| format!("{:#}", parse(keys, lora).expect_err(keys));
    assert!(err("quantize = \"nf4\"", "").contains("add a [lora] section"));
    assert!(err("quantize = \"q8_0\"\nload_in_4bit = true", LORA).contains("load_in_4bit"));
    assert!(err("quantize = \"q8_0\"\ndouble_quant = true", LORA).contains("double_quant"));
    assert!(err("quantize = \"gguf\"", LORA).contains("is a directory"));
    let e = err("quantize = \"int3\"", LORA);
    assert!(e.contains("int3") && e.contains("nf4"), "{e}");
    for keys in ["quantize = \"nf4\"", "load_in_4bit = true", "quantize = \"q4_0\"", "quantize = \"q8_0\""] {
        parse(keys, LORA).unwrap();
    }
}

#[test]
fn grpo_samples_and_trains_on_a_packed_base() {
    // Online RL under QLoRA: rollouts run on the packed base (the inner backend's copy),
    // the reference is the packed base with the adapters off.
    let d = tmp("qlora-grpo");
    let f = d.join("prompts.jsonl");
    let rows: String =
        (0..8).map(|i| format!("{{\"prompt\": \"Question {i}: what comes next?\", \"answer\": \"{i}\"}}\n")).collect();
    std::fs::write(&f, rows).unwrap();
    let training = "per_device_train_batch_size = 4\nlearning_rate = 5e-2\nmax_steps = 4\neval_steps = 4";
    let grpo = "num_generations = 4\nmax_completion_length = 8\nstop_strings = [\"e\"]\nrewards = [{ kind = \"length\", max_tokens = 8, cache_tokens = 8 }]\nbeta = 0.1";
    let mut cfg = crate::common::rl_config(&d.join("run"), &f, training, "grpo", grpo, LORA);
    cfg.model.quantize = Some(align_pipeline::config::Quantize::Q8_0);
    align_pipeline::grpo::run_grpo::<Cpu>(&cfg, false, &Default::default()).unwrap();
    let m = metrics(&d.join("run"));
    assert!(m[0].extra["kl"].abs() < 1e-6, "policy = reference before the first update: {:?}", m[0].extra["kl"]);
    assert!(m[3].extra["kl"] > 1e-6, "{:?}", m[3].extra["kl"]);
    assert!(d.join("run/final/adapter_model.safetensors").exists());
    std::fs::remove_dir_all(&d).ok();
}
