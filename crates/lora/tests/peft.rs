//! PEFT parity: an adapter made by PEFT (fixtures/adapters, xtask/scripts/make_peft_adapter.py)
//! loads onto the base and matches PEFT's float64 log-probs within 1e-4 (Llama, and GPT-2's
//! Conv1D `fan_in_fan_out` adapters with the fused `c_attn`); merge / unmerge / disable
//! behave; what we save has PEFT's keys and reloads identically; and, where a Python with
//! PEFT is at hand, PEFT loads what we save and scores as we do.

use std::path::{Path, PathBuf};
use std::process::Command;

use align_lora::{LoraConfig, TargetModules, attach, load_peft, merge, merge_and_unload, save_peft, unmerge};
use align_model::backend::Cpu;
use align_model::burn::module::Param;
use align_model::burn::tensor::activation::log_softmax;
use align_model::burn::tensor::{Tensor, TensorData};
use align_model::{Heads, HfHead, TokenBatch, Transformer, WeightSource, load_pretrained, save_pretrained};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn load(name: &str) -> Transformer<Cpu> {
    load_pretrained::<Cpu>(&root().join("models").join(name), Heads::LM, &Default::default()).unwrap().model
}

fn base() -> Transformer<Cpu> {
    load("llama-untied")
}

fn logits(m: &Transformer<Cpu>, ids: &[u32]) -> Vec<f32> {
    m.forward(&TokenBatch::single(ids, &Default::default())).into_data().to_vec().unwrap()
}

/// The log-prob of every next token of `ids`.
fn next_logprobs(m: &Transformer<Cpu>, ids: &[u32]) -> Vec<f64> {
    let lp: Vec<f32> =
        log_softmax(m.forward(&TokenBatch::single(ids, &Default::default())), 2).into_data().to_vec().unwrap();
    let v = lp.len() / ids.len();
    (0..ids.len() - 1).map(|t| lp[t * v + ids[t + 1] as usize] as f64).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Loads the PEFT adapter `dir` (r 4, alpha 8) onto `model` and checks its log-probs against
/// PEFT's float64 ones in `dir/reference.json`; returns the largest difference.
fn matches_reference(model: &str, adapter: &str) -> f64 {
    let dir = root().join("adapters").join(adapter);
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let (m, cfg) = load_peft(load(model), &dir).unwrap();
    assert_eq!((cfg.r, cfg.lora_alpha), (4, 8.0));
    let plain = load(model);
    let mut worst = 0f64;
    for row in reference["rows"].as_array().unwrap() {
        let ids: Vec<u32> = row["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let ours = next_logprobs(&m, &ids);
        for (t, (got, want)) in ours.iter().zip(row["next_token_logprobs"].as_array().unwrap()).enumerate() {
            let d = (got - want.as_f64().unwrap()).abs();
            worst = worst.max(d);
            assert!(d < 1e-4, "{adapter}: token {t}: ours {got}, PEFT {want}");
        }
        // the adapter really changes the model
        assert!(max_diff(&logits(&m, &ids), &logits(&plain, &ids)) > 1e-2);
    }
    worst
}

#[test]
fn peft_adapter_matches_peft_logprobs() {
    let worst = matches_reference("llama-untied", "llama-untied-lora");
    eprintln!("PEFT adapter: max |Δ log-prob| = {worst:.2e}");
}

/// GPT-2: PEFT's `fan_in_fan_out` adapter on the Conv1D `c_attn` (fused q/k/v: one A, B of
/// 3 · hidden rows), `attn.c_proj`, `mlp.c_fc` and `mlp.c_proj`.
#[test]
fn gpt2_conv1d_peft_adapter_matches_peft_logprobs() {
    let worst = matches_reference("gpt2", "gpt2-lora");
    eprintln!("PEFT GPT-2 adapter: max |Δ log-prob| = {worst:.2e}");
    let (mut m, _) = load_peft(load("gpt2"), &root().join("adapters/gpt2-lora")).unwrap();
    let names: Vec<String> =
        m.projections_mut().into_iter().filter(|(_, p)| p.adapter.is_some()).map(|(n, _)| n).collect();
    assert_eq!(names.len(), 8, "{names:?}");
    let c_attn = m.layers[0].self_attn.qkv_proj.as_ref().unwrap().adapter.as_ref().unwrap();
    assert_eq!((c_attn.a.dims(), c_attn.b.dims()), ([64, 4], [4, 192]), "one A shared by q, k and v");
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
    assert!(merged.layers[0].self_attn.q_proj.as_ref().is_some_and(|p| p.adapter.is_none()));
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

/// The Python that xtask/scripts' usage lines name (`$VENV/bin/python`, `/work/venv` without
/// `VENV`); `None` where there is none, and the PEFT cross-checks are skipped.
fn python() -> Option<PathBuf> {
    let venv = std::env::var_os("VENV").map_or_else(|| PathBuf::from("/work/venv"), PathBuf::from);
    let python = venv.join("bin/python");
    python.exists().then_some(python)
}

/// Float64 next-token log-probs of `seqs` under transformers, with a PEFT adapter where a
/// case has one (`xtask/scripts/peft_logprobs.py`): one list per case and sequence. `None`
/// (skipped, said on stderr) without a Python, or one without transformers and PEFT.
fn python_logprobs(cases: &[(&Path, Option<&Path>)], seqs: &[Vec<u32>], scratch: &Path) -> Option<Vec<Vec<Vec<f64>>>> {
    let Some(python) = python() else {
        eprintln!("skipped the PEFT cross-check: no Python at $VENV/bin/python or /work/venv/bin/python");
        return None;
    };
    let ids = scratch.join("ids.json");
    std::fs::write(&ids, serde_json::to_string(seqs).unwrap()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../xtask/scripts/peft_logprobs.py");
    let mut cmd = Command::new(&python);
    cmd.arg(script).arg("--ids").arg(&ids);
    for (base, adapter) in cases {
        let case = match adapter {
            Some(a) => format!("{}:{}", base.display(), a.display()),
            None => base.display().to_string(),
        };
        cmd.arg("--case").arg(case);
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stderr.contains("ModuleNotFoundError") {
        eprintln!("skipped the PEFT cross-check: {} lacks transformers or PEFT", python.display());
        return None;
    }
    assert!(out.status.success(), "{}: {stderr}", python.display());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    Some(serde_json::from_value(v["cases"].clone()).unwrap())
}

fn worst_diff(ours: &[Vec<f64>], theirs: &[Vec<f64>], what: &str) -> f64 {
    let mut worst = 0f64;
    for (s, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert_eq!(a.len(), b.len());
        for (t, (x, y)) in a.iter().zip(b).enumerate() {
            let d = (x - y).abs();
            assert!(d < 1e-4, "{what}: sequence {s} token {t}: ours {x}, theirs {y}");
            worst = worst.max(d);
        }
    }
    worst
}

/// GPT-2 adapters of our own (all-linear: the fused Conv1D `c_attn` included) with random
/// non-zero B: merge / unmerge / disable; saved with PEFT's keys, shapes and `fan_in_fan_out`;
/// reloaded identically; merged into the `[in, out]` Conv1D weights and exported. Where a
/// Python with PEFT is at hand, PEFT scores our adapter on the same base, and transformers our
/// merged export, as we do (1e-4).
#[test]
fn gpt2_adapters_we_make_load_in_peft_and_merge_into_conv1d_weights() {
    let cfg = LoraConfig { r: 4, lora_alpha: 8.0, lora_dropout: 0.0, ..Default::default() };
    let (mut m, names) = attach(load("gpt2"), &cfg, 3).unwrap();
    assert_eq!(names.len(), 8, "{names:?}");
    assert!(names.contains(&"transformer.h.1.attn.c_attn".to_string()), "{names:?}");
    // A trained adapter: random non-zero B (a fresh one is zero).
    let mut rng = align_model::SplitMix64::new(11);
    for (_, p) in m.projections_mut() {
        let ad = p.adapter.as_mut().unwrap();
        let [r, out] = ad.b.dims();
        let b: Vec<f32> = (0..r * out).map(|_| (rng.uniform() - 0.5) as f32).collect();
        ad.b = Param::from_tensor(Tensor::from_data(TensorData::new(b, [r, out]), &Default::default()));
    }
    let seqs: Vec<Vec<u32>> = vec![(5..40).collect(), vec![17, 300, 2, 99, 64, 511, 8, 8, 150, 42, 7]];
    let adapted: Vec<Vec<f32>> = seqs.iter().map(|s| logits(&m, s)).collect();
    let ours: Vec<Vec<f64>> = seqs.iter().map(|s| next_logprobs(&m, s)).collect();
    let plain = logits(&load("gpt2"), &seqs[0]);
    assert!(max_diff(&adapted[0], &plain) > 1e-2, "the adapter changes the model");

    m.set_adapters_enabled(false);
    assert_eq!(logits(&m, &seqs[0]), plain, "disabled adapters give the base model exactly");
    m.set_adapters_enabled(true);
    merge(&mut m);
    assert!(max_diff(&logits(&m, &seqs[0]), &adapted[0]) < 1e-4, "merged == adapted");
    unmerge(&mut m);
    assert!(max_diff(&logits(&m, &seqs[0]), &adapted[0]) < 1e-4, "unmerged == adapted");
    m.set_adapters_enabled(false);
    assert!(max_diff(&logits(&m, &seqs[0]), &plain) < 1e-5, "unmerge restores the base weights");
    m.set_adapters_enabled(true);

    let out = std::env::temp_dir().join(format!("align-lora-gpt2-{}", std::process::id()));
    std::fs::remove_dir_all(&out).ok();
    let adapter = out.join("adapter");
    save_peft(&mut m, &cfg, "fixtures/models/gpt2", &adapter).unwrap();
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["fan_in_fan_out"], true, "PEFT's flag for Conv1D");
    assert!(config["target_modules"].as_array().unwrap().contains(&"transformer.h.0.attn.c_attn".into()));
    // PEFT's own keys and shapes (the PEFT-made fixture adapts the same modules).
    let mut ours_st = align_model::SafetensorsSource::open_files(&[adapter.join("adapter_model.safetensors")]).unwrap();
    let peft_st =
        align_model::SafetensorsSource::open_files(&[root().join("adapters/gpt2-lora/adapter_model.safetensors")])
            .unwrap();
    assert_eq!(ours_st.names(), peft_st.names());
    assert_eq!(ours_st.load("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight").unwrap().shape, [4, 64]);
    assert_eq!(ours_st.load("base_model.model.transformer.h.0.attn.c_attn.lora_B.weight").unwrap().shape, [192, 4]);
    assert_eq!(ours_st.load("base_model.model.transformer.h.0.mlp.c_proj.lora_A.weight").unwrap().shape, [4, 256]);
    let (back, back_cfg) = load_peft(load("gpt2"), &adapter).unwrap();
    assert_eq!((back_cfg.r, back_cfg.lora_alpha, back_cfg.use_rslora), (4, 8.0, false));
    assert_eq!(logits(&back, &seqs[0]), adapted[0], "reloaded == saved");

    // Merged into the Conv1D weights and exported as transformers' GPT-2.
    let merged = merge_and_unload(m);
    assert!(max_diff(&logits(&merged, &seqs[0]), &adapted[0]) < 1e-4);
    let tokenizer =
        load_pretrained::<Cpu>(&root().join("models/gpt2"), Heads::LM, &Default::default()).unwrap().tokenizer;
    let merged_dir = out.join("merged");
    save_pretrained(&merged, Some(&tokenizer), HfHead::CausalLm, &merged_dir).unwrap();
    let reloaded = load_pretrained::<Cpu>(&merged_dir, Heads::LM, &Default::default()).unwrap().model;
    assert!(reloaded.layers[0].self_attn.qkv_proj.as_ref().unwrap().adapter.is_none());
    assert!(max_diff(&logits(&reloaded, &seqs[0]), &adapted[0]) < 1e-4, "exported merged == adapted");

    let gpt2 = root().join("models/gpt2");
    if let Some(theirs) = python_logprobs(&[(&gpt2, Some(&adapter)), (&merged_dir, None)], &seqs, &out) {
        let d_peft = worst_diff(&ours, &theirs[0], "PEFT on our adapter");
        let d_merged = worst_diff(&ours, &theirs[1], "transformers on our merged export");
        eprintln!("our GPT-2 adapter in PEFT: max |Δ log-prob| = {d_peft:.2e}; merged export: {d_merged:.2e}");
    }
    std::fs::remove_dir_all(&out).ok();
}

/// `target_modules = ["c_attn"]` on GPT-2: one adapter per block on the fused q/k/v, one A
/// shared by q, k and v (PEFT's parameter count), trainable alone, the model unchanged.
#[test]
fn gpt2_c_attn_is_one_adapter_with_a_shared_a() {
    use align_model::burn::module::{Module, ModuleVisitor};
    let cfg = LoraConfig { target_modules: TargetModules::Names(vec!["c_attn".into()]), ..Default::default() };
    let (m, names) = attach(load("gpt2"), &cfg, 1).unwrap();
    assert_eq!(names, ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]);
    let ids: Vec<u32> = (1..30).collect();
    assert_eq!(logits(&m, &ids), logits(&load("gpt2"), &ids));
    type Ad = align_model::backend::Autodiff<Cpu>;
    let ad_base = load_pretrained::<Ad>(&root().join("models/gpt2"), Heads::LM, &Default::default()).unwrap().model;
    let (m, _) = attach(ad_base, &cfg, 1).unwrap();
    struct Count(usize);
    impl<B: align_model::burn::tensor::backend::Backend> ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if p.is_require_grad() {
                self.0 += p.val().dims().iter().product::<usize>();
            }
        }
    }
    let mut c = Count(0);
    m.visit(&mut c);
    // 2 layers × (A [64, 8] + B [8, 3 · 64]), r = 8
    assert_eq!(c.0, 2 * (64 * 8 + 8 * 192));
}

/// A GPT-2 adapter whose fused `c_attn` B is not `[3 · hidden, r]` (one block of q/k/v only)
/// is refused with the file and the tensor named.
#[test]
fn gpt2_adapter_with_a_wrong_c_attn_shape_names_file_and_tensor() {
    let dir = std::env::temp_dir().join(format!("align-lora-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = root().join("adapters/gpt2-lora");
    std::fs::copy(src.join("adapter_config.json"), dir.join("adapter_config.json")).unwrap();
    let mut st = align_model::SafetensorsSource::open_files(&[src.join("adapter_model.safetensors")]).unwrap();
    let mut map = align_model::TensorMap::default();
    for name in st.names() {
        map.0.insert(name.clone(), st.load(&name).unwrap());
    }
    let key = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight";
    let b = map.0.get_mut(key).unwrap();
    *b = align_model::HostTensor::new(vec![64, 4], b.data[..64 * 4].to_vec());
    align_model::weights::save_safetensors(&map, &dir.join("adapter_model.safetensors")).unwrap();
    let err = load_peft(load("gpt2"), &dir).unwrap_err().to_string();
    assert!(err.contains(key) && err.contains("adapter_model.safetensors") && err.contains("[192, 4]"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A PEFT adapter on a quantised (QLoRA) base, Llama and GPT-2: merging dequantises the
/// packed projections into dense ones and computes what the packed base plus the adapter
/// did; the merged model exports and reloads as a plain checkpoint.
#[test]
fn adapters_on_a_packed_base_merge_into_dense_weights() {
    use align_model::quant::QuantFormat;
    use align_model::{BaseStorage, HfHead, load_pretrained_stored, save_pretrained};
    let nf4 = BaseStorage::Quantize(QuantFormat::Nf4 { double_quant: true });
    for (model, adapter) in [("llama-untied", "llama-untied-lora"), ("gpt2", "gpt2-lora")] {
        let device = Default::default();
        let pre = load_pretrained_stored::<Cpu>(&root().join("models").join(model), Heads::LM, nf4, &device).unwrap();
        let packed = pre.model.packed_size().0;
        assert!(packed > 0);
        let (m, _) = load_peft(pre.model, &root().join("adapters").join(adapter)).unwrap();
        let ids = [5u32, 77, 123, 9, 300, 42, 8];
        let adapted = logits(&m, &ids);
        let merged = merge_and_unload(m);
        assert_eq!(merged.packed_size().0, 0, "{model}: every adapted projection is dense once merged");
        let d = max_diff(&logits(&merged, &ids), &adapted);
        assert!(d < 1e-4, "{model}: merged vs packed + adapter {d}");
        let dir = std::env::temp_dir().join(format!("align-qlora-merge-{model}-{}", std::process::id()));
        save_pretrained(&merged, Some(&pre.tokenizer), HfHead::CausalLm, &dir).unwrap();
        let back = load_pretrained::<Cpu>(&dir, Heads::LM, &device).unwrap().model;
        assert!(max_diff(&logits(&back, &ids), &adapted) < 1e-4, "{model}: the export reloads");
        std::fs::remove_dir_all(&dir).ok();
    }
}
