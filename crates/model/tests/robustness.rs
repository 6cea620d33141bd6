//! Broken checkpoints end in clear errors naming the file and field, never in a panic, an
//! abort or a silently different network. Each case edits a copy of a tiny fixture.

use std::path::{Path, PathBuf};

use align_model::backend::Cpu;
use align_model::weights::{SafetensorsSource, TensorMap, WeightSource, save_safetensors};
use align_model::{Heads, ModelConfig, Tokenizer, load_pretrained};
use serde_json::{Value, json};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models").join(name)
}

/// A copy of a fixture checkpoint in a fresh directory.
fn copy_of(name: &str, case: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("align-robust-{case}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    dir
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string(&v).unwrap()).unwrap();
}

fn load_error(dir: &Path) -> String {
    match load_pretrained::<Cpu>(dir, Heads::LM, &Default::default()) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// The checkpoint's tensors, edited and written back.
fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut TensorMap)) {
    let path = dir.join("model.safetensors");
    let mut src = SafetensorsSource::open_dir(dir).unwrap();
    let mut map = TensorMap::default();
    for n in src.names() {
        map.0.insert(n.clone(), src.load(&n).unwrap());
    }
    drop(src);
    edit(&mut map);
    save_safetensors(&map, &path).unwrap();
}

#[test]
fn a_tokenizer_token_beyond_the_vocabulary_is_refused_at_load() {
    let dir = copy_of("llama-tied", "added-token");
    edit_json(&dir.join("tokenizer.json"), |t| {
        t["added_tokens"].as_array_mut().unwrap().push(json!({
            "id": 512, "content": "<beyond>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    });
    let e = load_error(&dir);
    assert!(e.contains("tokenizer.json") && e.contains("<beyond>") && e.contains("vocab_size 512"), "{e}");
}

#[test]
fn an_absurd_layer_count_fails_before_allocating() {
    for (case, layers) in [("layers-1e12", json!(1_000_000_000_000u64)), ("layers-max", json!(u64::MAX))] {
        let dir = copy_of("llama-tied", case);
        edit_json(&dir.join("config.json"), |c| c["num_hidden_layers"] = layers.clone());
        let e = load_error(&dir);
        assert!(e.contains("num_hidden_layers") && e.contains("config.json"), "{e}");
    }
}

#[test]
fn a_config_with_fewer_layers_than_its_checkpoint_is_refused() {
    let dir = copy_of("llama-tied", "fewer-layers");
    edit_json(&dir.join("config.json"), |c| c["num_hidden_layers"] = json!(1));
    let e = load_error(&dir);
    assert!(e.contains("model.layers.1.") && e.contains("num_hidden_layers"), "{e}");
}

#[test]
fn unused_tensors_are_errors_except_transformers_own_buffers() {
    let dir = copy_of("llama-tied", "unused");
    edit_tensors(&dir, |m| {
        let inv_freq = align_model::HostTensor::new(vec![4], vec![1.0; 4]);
        m.0.insert("model.layers.0.self_attn.rotary_emb.inv_freq".into(), inv_freq);
    });
    load_pretrained::<Cpu>(&dir, Heads::LM, &Default::default())
        .expect("a rotary cache is ignored, as transformers does");
    edit_tensors(&dir, |m| {
        m.0.insert("model.layers.0.mlp.extra_proj.weight".into(), align_model::HostTensor::new(vec![2], vec![0.0; 2]));
    });
    let e = load_error(&dir);
    assert!(e.contains("model.layers.0.mlp.extra_proj.weight"), "{e}");
}

#[test]
fn non_finite_weights_are_refused() {
    let dir = copy_of("llama-tied", "nan-weights");
    edit_tensors(&dir, |m| {
        let t = m.0.get_mut("model.layers.1.mlp.up_proj.weight").unwrap();
        t.data[7] = f32::NAN;
    });
    let e = load_error(&dir);
    assert!(e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("NaN"), "{e}");
}

#[test]
fn config_values_out_of_range_name_their_field() {
    let cases: [(&str, Value, &str); 6] = [
        ("eos_token_id", json!(512), "eos_token_id"),
        ("bos_token_id", json!(100000), "bos_token_id"),
        ("max_position_embeddings", json!(0), "max_position_embeddings"),
        ("rope_theta", json!(-1.0), "rope_theta"),
        ("rms_norm_eps", json!(0.0), "rms_norm_eps"),
        ("intermediate_size", json!(0), "intermediate_size"),
    ];
    for (field, value, named) in cases {
        let dir = copy_of("llama-tied", &format!("cfg-{field}"));
        edit_json(&dir.join("config.json"), |c| match field {
            // transformers 5 keeps it under rope_parameters.
            "rope_theta" => c["rope_parameters"]["rope_theta"] = value.clone(),
            _ => c[field] = value.clone(),
        });
        let e = load_error(&dir);
        assert!(e.contains(named) && e.contains("config.json"), "{field} = {value}: {e}");
    }
}

#[test]
fn a_random_init_too_large_for_memory_is_refused() {
    let text = std::fs::read_to_string(fixture("llama-tied").join("config.json")).unwrap();
    let mut v: Value = serde_json::from_str(&text).unwrap();
    v["num_hidden_layers"] = json!(1u64 << 20);
    v["hidden_size"] = json!(4096);
    v["num_attention_heads"] = json!(32);
    v["num_key_value_heads"] = json!(32);
    v["head_dim"] = json!(128);
    v["intermediate_size"] = json!(11008);
    let cfg = ModelConfig::from_json_str(&v.to_string()).unwrap();
    let e = match align_model::init_random::<Cpu>(&cfg, Heads::LM, 0.02, 0, &Default::default()) {
        Ok(_) => panic!("a model of 2^20 layers was built"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("parameters need") && e.contains("GiB"), "{e}");
}

#[test]
fn a_broken_chat_template_fails_only_where_it_is_used() {
    let dir = copy_of("llama-tied", "bad-template");
    edit_json(&dir.join("tokenizer_config.json"), |c| {
        c["chat_template"] = json!("{% for m in messages %}{{ m.content ")
    });
    let tok = Tokenizer::from_dir(&dir).expect("loading does not need the template");
    let e = match tok.template() {
        Ok(_) => panic!("a template that does not compile was compiled"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("tokenizer_config.json"), "{e}");
    load_pretrained::<Cpu>(&dir, Heads::LM, &Default::default()).expect("scoring and converting never render");
}

#[cfg(unix)]
#[test]
fn safetensors_are_written_world_readable() {
    use std::os::unix::fs::PermissionsExt;
    let dir = copy_of("llama-tied", "mode");
    edit_tensors(&dir, |_| {});
    let mode = std::fs::metadata(dir.join("model.safetensors")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
}

/// A GGUF file of metadata only (no tensors): `kv` as (key, value) with u32 or string values.
fn gguf_bytes(kv: &[(&str, Value)]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend((kv.len() as u64).to_le_bytes());
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    for (k, v) in kv {
        string(&mut b, k);
        match v {
            Value::String(s) => {
                b.extend(8u32.to_le_bytes());
                string(&mut b, s);
            }
            Value::Number(n) if n.is_u64() => {
                b.extend(4u32.to_le_bytes());
                b.extend((n.as_u64().unwrap() as u32).to_le_bytes());
            }
            other => panic!("only u32 and string values: {other}"),
        }
    }
    b
}

#[test]
fn gguf_metadata_is_validated_like_a_config() {
    use align_model::gguf::{GgufFile, GgufSource, config_from_gguf};
    let dir = std::env::temp_dir().join(format!("align-robust-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base = |edit: (&str, Value)| {
        let mut kv: Vec<(&str, Value)> = vec![
            ("general.architecture", json!("llama")),
            ("llama.embedding_length", json!(64)),
            ("llama.attention.head_count", json!(4)),
            ("llama.feed_forward_length", json!(128)),
            ("llama.block_count", json!(2)),
            ("llama.vocab_size", json!(512)),
            ("llama.context_length", json!(512)),
        ];
        kv.retain(|(k, _)| *k != edit.0);
        kv.push(edit);
        gguf_bytes(&kv)
    };
    let nan = |key: &'static str| {
        // An f32 NaN: written by hand (type 6).
        let mut b = base(("llama.block_count", json!(2)));
        let n_kv = u64::from_le_bytes(b[16..24].try_into().unwrap()) + 1;
        b[16..24].copy_from_slice(&n_kv.to_le_bytes());
        b.extend((key.len() as u64).to_le_bytes());
        b.extend(key.as_bytes());
        b.extend(6u32.to_le_bytes());
        b.extend(f32::NAN.to_le_bytes());
        b
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("blocks-0", base(("llama.block_count", json!(0))), "num_hidden_layers"),
        ("context-0", base(("llama.context_length", json!(0))), "max_position_embeddings"),
        ("rope-nan", nan("llama.rope.freq_base"), "rope_theta"),
        ("eps-nan", nan("llama.attention.layer_norm_rms_epsilon"), "rms_norm_eps"),
    ];
    for (case, bytes, field) in cases {
        let path = dir.join(format!("{case}.gguf"));
        std::fs::write(&path, bytes).unwrap();
        let e = config_from_gguf(&GgufFile::open(&path).unwrap()).unwrap_err().to_string();
        assert!(e.contains(field) && e.contains(&path.display().to_string()), "{case}: {e}");
    }
    // A huge block count passes the value checks and fails before any allocation.
    let path = dir.join("blocks-huge.gguf");
    std::fs::write(&path, base(("llama.block_count", json!(0x7fff_ffffu32)))).unwrap();
    let file = GgufFile::open(&path).unwrap();
    let config = config_from_gguf(&file).unwrap();
    let mut src = GgufSource::new(file, config.clone());
    let e = match align_model::build::<Cpu>(&config, &mut src, Heads::LM, &Default::default()) {
        Ok(_) => panic!("a model of 2^31 layers was built"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("num_hidden_layers") && e.contains("2147483647"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
