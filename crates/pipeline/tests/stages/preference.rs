//! The pairwise stages on a tiny checkpoint: DPO's three reference modes agree (and start
//! at ln 2), the reward model learns and its HF export scores exactly as it was evaluated,
//! ORPO and SimPO lower their losses, and a config is never run as another stage.

use crate::common::{metrics, root, tmp};
use std::path::Path;

use align_model::backend::Cpu;
use align_model::{Heads, load_pretrained};
use align_pipeline::preference::{PairwiseStage, PreferenceConfig, run_preference, score_dataset};

/// 16 PIQA train pairs, 8 held out; `extra` appends sections.
fn config(out: &Path, training: &str, extra: &str) -> PreferenceConfig {
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
[eval_data]
path = "{data}"
adapter = "piqa_preference"
skip = 16
limit = 8
[tokenize]
max_length = 128
[training]
logging_steps = 1
save_steps = 0
eval_on_start = true
lr_scheduler_type = "constant"
{training}
{extra}"#,
        out = out.display(),
        model = r.join("fixtures/models/llama-tied").display(),
        data = data.display(),
    );
    toml::from_str(&text).unwrap()
}

const LORA: &str = "[lora]\nr = 8\nlora_alpha = 16\nlora_dropout = 0.0\ntarget_modules = \"all-linear\"\n";

#[test]
fn dpo_reference_modes_agree_and_start_at_ln2() {
    let d = tmp("pref-dpo");
    // One micro-batch of all 16 pairs: every step sees the same data, so the loss must fall.
    let training = "per_device_train_batch_size = 16\nlearning_rate = 1e-3\nmax_steps = 3\neval_steps = 3";
    let runs = [
        ("precomputed", format!("{LORA}[dpo]\nprecompute_ref_log_probs = true\n")),
        ("adapters-disabled", format!("{LORA}[dpo]\n")),
        ("frozen-copy", "[dpo]\n".to_string()),
    ];
    let mut losses = vec![];
    for (name, extra) in &runs {
        let cfg = config(&d.join(name), training, extra);
        run_preference::<Cpu>(&cfg, PairwiseStage::Dpo, false, &Default::default()).unwrap();
        let m = metrics(&d.join(name));
        // Policy = reference before training: every implicit reward is 0, the loss ln 2.
        assert!((m[0].eval_loss.unwrap() - std::f64::consts::LN_2).abs() < 1e-6, "{name}: {:?}", m[0]);
        assert_eq!(m[0].extra["eval_rewards/margins"], 0.0);
        assert!((m[1].loss.unwrap() - std::f64::consts::LN_2).abs() < 1e-6, "{name}: first step {:?}", m[1]);
        let l: Vec<f64> = m.iter().filter_map(|m| m.loss).collect();
        assert!(l[2] < l[0], "{name}: {l:?}");
        assert!(m.last().unwrap().extra["eval_rewards/margins"] != 0.0);
        losses.push(l);
    }
    // The same LoRA policy against a precomputed or an adapters-disabled reference.
    for (a, b) in losses[0].iter().zip(&losses[1]) {
        assert!((a - b).abs() < 1e-5, "{:?} vs {:?}", losses[0], losses[1]);
    }
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn reward_model_learns_and_its_export_scores_as_evaluated() {
    let d = tmp("pref-reward");
    let cfg = config(
        &d.join("rm"),
        "per_device_train_batch_size = 4\nlearning_rate = 3e-3\nmax_steps = 12\neval_steps = 12",
        LORA,
    );
    let final_dir = run_preference::<Cpu>(&cfg, PairwiseStage::Reward, false, &Default::default()).unwrap();
    let m = metrics(&d.join("rm"));
    let train: Vec<f64> = m.iter().filter_map(|m| m.loss).collect();
    assert!(train[train.len() - 1] < train[0] - 0.1, "train loss {train:?}");
    // An HF sequence-classification checkpoint, LoRA merged in.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(final_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(config["num_labels"], 1);
    let rm = load_pretrained::<Cpu>(&final_dir, Heads { lm: false, score: true, value: false }, &Default::default())
        .unwrap();
    let eval = cfg.eval_data.as_ref().unwrap();
    let rows = score_dataset(&rm.model, &rm.tokenizer, eval, &cfg.tokenize, 4, false, &Default::default()).unwrap();
    assert_eq!(rows.len(), 8);
    let acc =
        rows.iter().filter(|r| r["chosen"].as_f64().unwrap() > r["rejected"].as_f64().unwrap()).count() as f64 / 8.0;
    let last = m.last().unwrap();
    assert_eq!(acc, last.extra["eval_rewards/accuracies"], "exported scores disagree with the final eval");
    let chosen = rows.iter().map(|r| r["chosen"].as_f64().unwrap()).sum::<f64>() / 8.0;
    assert!((chosen - last.extra["eval_rewards/chosen"]).abs() < 1e-4, "{chosen} vs {:?}", last.extra);
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn orpo_and_simpo_lower_their_losses() {
    let d = tmp("pref-orpo");
    for (stage, name, extra) in [
        (PairwiseStage::Orpo, "orpo", "[orpo]\nbeta = 0.1\n"),
        (PairwiseStage::Orpo, "orpo-completion-nll", "[orpo]\ncompletion_only_nll = true\n"),
        (PairwiseStage::Simpo, "simpo", "[simpo]\nbeta = 2.0\ngamma = 0.5\n"),
    ] {
        let training = "per_device_train_batch_size = 16\nlearning_rate = 2e-3\nmax_steps = 6\neval_steps = 6";
        let cfg = config(&d.join(name), training, extra);
        run_preference::<Cpu>(&cfg, stage, false, &Default::default()).unwrap();
        let m = metrics(&d.join(name));
        let l: Vec<f64> = m.iter().filter_map(|m| m.loss).collect();
        assert!(l[l.len() - 1] < l[0], "{name}: {l:?}");
        // ORPO's NLL term generalises to held-out rows even on a random model.
        let eval: Vec<f64> = m.iter().filter_map(|m| m.eval_loss).collect();
        assert!(stage == PairwiseStage::Simpo || eval[1] < eval[0], "{name}: eval {eval:?}");
    }
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn a_config_is_never_run_as_another_stage() {
    let d = tmp("pref-wrong");
    let cfg = config(&d.join("x"), "max_steps = 1", "[dpo]\nbeta = 0.2\n");
    let err = run_preference::<Cpu>(&cfg, PairwiseStage::Orpo, false, &Default::default()).unwrap_err();
    assert!(err.to_string().contains("[dpo] section") && err.to_string().contains("orpo stage"), "{err}");
    let err = align_pipeline::sft::run_sft::<Cpu>(&cfg, false, &Default::default()).unwrap_err();
    assert!(err.to_string().contains("[dpo] section") && err.to_string().contains("sft stage"), "{err}");
    let mut packed = config(&d.join("p"), "max_steps = 1", "");
    packed.packing = true;
    let err = run_preference::<Cpu>(&packed, PairwiseStage::Dpo, false, &Default::default()).unwrap_err();
    assert!(err.to_string().contains("packing applies to the sft stage only"), "{err}");
    // and an SFT row is not a pair
    let mut cfg = config(&d.join("y"), "max_steps = 1", "");
    cfg.data = align_data::DatasetConfig::new(root().join("fixtures/data/schemas.jsonl"));
    let tok = load_pretrained::<Cpu>(&cfg.model.path, Heads::LM, &Default::default()).unwrap().tokenizer;
    let err = align_data::preference_pairs(&tok, &cfg.data, &cfg.tokenize, "train").unwrap_err();
    assert!(
        err.to_string().contains("schemas.jsonl:1: the columns") && err.to_string().contains("Preference rows"),
        "{err}"
    );
    std::fs::remove_dir_all(&d).ok();
}

/// The stage configs kept in `pipelines/stages/` stay valid configs of their stage.
#[test]
fn stage_configs_in_pipelines_parse() {
    let cfg = PreferenceConfig::from_file(&root().join("pipelines/stages/dpo-seed.toml")).unwrap();
    match cfg.objective(PairwiseStage::Dpo).unwrap() {
        align_pipeline::preference::Objective::Dpo(d) => assert_eq!((d.beta, d.loss_type), (0.1, Default::default())),
        other => panic!("{other:?}"),
    }
    assert_eq!(cfg.training.gradient_accumulation_steps, 4);
    for f in std::fs::read_dir(root().join("pipelines/stages")).unwrap() {
        let path = f.unwrap().path();
        let cfg = PreferenceConfig::from_file(&path).unwrap_or_else(|e| panic!("{e:#}"));
        if let Some(g) = &cfg.grpo {
            g.plan().unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        }
        if let Some(p) = &cfg.ppo {
            assert!(!p.rewards.is_empty(), "{}", path.display());
        }
    }
}

/// Scores are read where transformers reads them: the last non-pad id, so with pad = EOS
/// (SmolLM2) the token before a trailing EOS.
#[test]
fn score_positions_follow_transformers() {
    use align_data::{TokenizedSequence, pad_right};
    let s = |ids: Vec<u32>| TokenizedSequence { loss_mask: vec![true; ids.len()], input_ids: ids };
    let (a, b) = (s(vec![5, 6, 7, 2]), s(vec![5, 6]));
    let batch = pad_right(&[&a, &b], 2);
    assert_eq!(align_pipeline::preference::score_positions(&batch, Some(2)), vec![2, 1]);
    assert_eq!(align_pipeline::preference::score_positions(&batch, None), vec![3, 1]);
    assert_eq!(align_pipeline::preference::score_positions(&batch, Some(9)), vec![3, 1]);
}

/// `[curriculum]` on DPO: pairs by their chosen + rejected tokens, the shortest first.
#[test]
fn dpo_draws_short_pairs_first_under_a_curriculum() {
    let d = tmp("dpo-curriculum");
    let training = "per_device_train_batch_size = 2\nlearning_rate = 1e-3\nmax_steps = 8";
    let extra = "[dpo]\n[curriculum]\nmeasure = \"length\"\ninitial = 0.25\nduration = 0.5\n";
    let cfg = config(&d.join("run"), training, extra);
    run_preference::<Cpu>(&cfg, PairwiseStage::Dpo, false, &Default::default()).unwrap();
    let m: Vec<_> = metrics(&d.join("run")).into_iter().filter(|r| r.step > 0).collect();
    let lengths: Vec<f64> = m.iter().map(|r| r.extra["curriculum/difficulty"]).collect();
    eprintln!("mean pair length drawn {lengths:?}");
    let late = lengths[4..].iter().sum::<f64>() / 4.0;
    assert!(lengths[0] < late, "first step's pairs {} tokens, the second half's {late}", lengths[0]);
    assert_eq!(m[0].extra["curriculum/competence"], 0.25);
    std::fs::remove_dir_all(&d).ok();
}
