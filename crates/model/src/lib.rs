//! The network and its files.
//!
//! - [`ModelConfig`] mirrors HF `config.json` (transformers 4.x and 5.x keys).
//! - [`Transformer`] is the decoder for Llama, Mistral, Qwen2, Qwen3 and GPT-2, generic over
//!   the Burn backend, with LM, score and value heads and a [`KvCache`].
//! - Files: HF safetensors in (single and sharded) and out ([`save_pretrained`]), GGUF in
//!   ([`gguf`]), `tokenizer.json` or a GGUF vocabulary ([`Tokenizer`]), chat templates
//!   ([`ChatTemplate`]).
//!
//! ```no_run
//! use align_model::{backend::Cpu, load_pretrained, Heads};
//! let m = load_pretrained::<Cpu>("model.gguf".as_ref(), Heads::LM, &Default::default()).unwrap();
//! let ids = m.tokenizer.encode("Hello", false).unwrap();
//! ```

pub mod backend;
pub mod chat;
pub mod config;
pub mod error;
pub mod gguf;
pub mod load;
pub mod names;
pub mod rng;
pub mod tokenizer;
pub mod transformer;
pub mod weights;

use std::path::Path;

pub use align_kernels::quant;
pub use align_kernels::{
    AutodiffFusedOps, FusedOps, HeadLogprobs, gpu_tests, lora_linear, masked_attention, rms_norm, rope, swiglu,
};
pub use burn;
use burn::tensor::backend::Backend;

pub use chat::{ChatMessage, ChatTemplate};
pub use config::{Architecture, HfHead, ModelConfig};
pub use error::{ModelError, Result};
pub use load::{BaseStorage, Heads, RandomInit, build, build_stored, export, init_random};
pub use rng::SplitMix64;
pub use tokenizer::Tokenizer;
pub use transformer::{
    BlockContext, KvCache, LowRank, PackedLinear, Proj, TokenBatch, Transformer, cast_float, spread_rows,
};
pub use weights::{HostTensor, SafetensorsSource, TensorMap, WeightSource};

/// A network with its tokenizer, as loaded from disk.
pub struct Pretrained<B: Backend> {
    pub model: Transformer<B>,
    pub tokenizer: Tokenizer,
}

/// Load a model from a GGUF file or an HF directory (`config.json`, safetensors,
/// `tokenizer.json`).
pub fn load_pretrained<B: Backend>(path: &Path, heads: Heads, device: &B::Device) -> Result<Pretrained<B>> {
    load_pretrained_stored(path, heads, BaseStorage::Dense, device)
}

/// [`load_pretrained`] with the block projections' base weights stored as `storage`
/// says (quantised for QLoRA; see [`BaseStorage`]).
pub fn load_pretrained_stored<B: Backend>(
    path: &Path,
    heads: Heads,
    storage: BaseStorage,
    device: &B::Device,
) -> Result<Pretrained<B>> {
    if path.is_dir() {
        if storage == BaseStorage::Gguf {
            return Err(ModelError::format(path, "GGUF-native storage needs a GGUF file, not a directory"));
        }
        let config_path = path.join("config.json");
        let config = ModelConfig::from_file(&config_path)?;
        let mut src = SafetensorsSource::open_dir(path)?;
        // A config error found while building names config.json; a tensor error, the checkpoint.
        let model = build_stored(&config, &mut src, heads, storage, device).map_err(|e| match e {
            ModelError::Config { .. } => e.in_file(&config_path),
            e => e.in_file(path),
        })?;
        let tokenizer = Tokenizer::from_dir(path)?;
        check_vocab(&config, &tokenizer, &path.join("tokenizer.json"))?;
        Ok(Pretrained { model, tokenizer })
    } else {
        let file = gguf::GgufFile::open(path)?;
        let config = gguf::config_from_gguf(&file)?;
        let tokenizer = Tokenizer::from_gguf(&file)?;
        check_vocab(&config, &tokenizer, path)?;
        let mut src = gguf::GgufSource::new(file, config.clone());
        let model = build_stored(&config, &mut src, heads, storage, device).map_err(|e| e.in_file(path))?;
        Ok(Pretrained { model, tokenizer })
    }
}

/// A token the tokenizer can produce must have a row in the embedding: an id beyond
/// `vocab_size` would index past it in the first forward pass.
fn check_vocab(config: &ModelConfig, tokenizer: &Tokenizer, tokenizer_path: &Path) -> Result<()> {
    match tokenizer.max_token_id() {
        Some(id) if id as usize >= config.vocab_size => Err(ModelError::format(
            tokenizer_path,
            format!(
                "token `{}` has id {id}, beyond the model's vocab_size {}: the tokenizer does not belong to this model",
                tokenizer.id_to_token(id).unwrap_or_default(),
                config.vocab_size
            ),
        )),
        _ => Ok(()),
    }
}

/// Write `config.json`, `model.safetensors` (f32, HF names) and the tokenizer files into
/// `dir`, so `AutoModelForCausalLM.from_pretrained(dir)` (or `…ForSequenceClassification`
/// with `HfHead::SequenceClassification`) loads it.
pub fn save_pretrained<B: Backend>(
    model: &Transformer<B>,
    tokenizer: Option<&Tokenizer>,
    head: HfHead,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let tensors = export(model, head)?;
    weights::save_safetensors(&tensors, &dir.join("model.safetensors"))?;
    let config = serde_json::to_string_pretty(&model.config.to_hf_json(head)).expect("JSON value serialises");
    weights::write_atomic(&dir.join("config.json"), config.as_bytes())?;
    if let Some(t) = tokenizer {
        t.save(dir)?;
    }
    Ok(())
}
