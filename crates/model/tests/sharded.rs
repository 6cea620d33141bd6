//! A sharded checkpoint (`model.safetensors.index.json` + shards) loads to the same network
//! as the single file it was split from; a broken index is an error naming the tensor.

use std::path::Path;

use align_model::backend::Cpu;
use align_model::weights::save_safetensors;
use align_model::{Heads, SafetensorsSource, TensorMap, TokenBatch, WeightSource, load_pretrained};

#[test]
fn sharded_index_loads_like_the_single_file() {
    let src_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/qwen2-untied-legacy-rope");
    let out = std::env::temp_dir().join(format!("align-shards-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src_dir.join(f), out.join(f)).unwrap();
    }
    let mut single = SafetensorsSource::open_dir(&src_dir).unwrap();
    let names = single.names();
    let (mut a, mut b) = (TensorMap::default(), TensorMap::default());
    let mut weight_map = serde_json::Map::new();
    for (i, n) in names.iter().enumerate() {
        let (map, file) = if i % 2 == 0 {
            (&mut a, "model-00001-of-00002.safetensors")
        } else {
            (&mut b, "model-00002-of-00002.safetensors")
        };
        map.0.insert(n.clone(), single.load(n).unwrap());
        weight_map.insert(n.clone(), file.into());
    }
    save_safetensors(&a, &out.join("model-00001-of-00002.safetensors")).unwrap();
    save_safetensors(&b, &out.join("model-00002-of-00002.safetensors")).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(out.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let dev = Default::default();
    let ids: Vec<u32> = (10..40).collect();
    let x: Vec<f32> = load_pretrained::<Cpu>(&src_dir, Heads::LM, &dev)
        .unwrap()
        .model
        .forward(&TokenBatch::single(&ids, &dev))
        .into_data()
        .to_vec()
        .unwrap();
    let y: Vec<f32> = load_pretrained::<Cpu>(&out, Heads::LM, &dev)
        .unwrap()
        .model
        .forward(&TokenBatch::single(&ids, &dev))
        .into_data()
        .to_vec()
        .unwrap();
    assert_eq!(x, y);

    // An index naming a tensor its shard lacks is an error that names it.
    weight_map_insert_missing(&out);
    let err = SafetensorsSource::open_dir(&out).err().expect("broken index must fail").to_string();
    assert!(err.contains("model.layers.99.mlp.up_proj.weight") && err.contains("index"), "{err}");
    std::fs::remove_dir_all(&out).ok();
}

fn weight_map_insert_missing(dir: &Path) {
    let p = dir.join("model.safetensors.index.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["weight_map"]["model.layers.99.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors".into();
    std::fs::write(&p, v.to_string()).unwrap();
}
