//! `ModelConfig`: the subset of a Hugging Face `config.json` that defines the network.
//!
//! Both transformers 4.x keys (`rope_theta`, `rope_scaling`, `torch_dtype`) and 5.x keys
//! (`rope_parameters`, `dtype`) are accepted; GPT-2's own names (`n_embd`, `n_layer`, …)
//! are read too. Unknown keys are ignored: `config.json` is someone else's format.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::error::{ModelError, Result};

/// The network families one `Transformer` implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    /// Llama 2/3, SmolLM, DeepSeek dense: RMSNorm, SwiGLU, RoPE, optional attention bias.
    Llama,
    /// Mistral: Llama's block (sliding window is not used at the lengths we train).
    Mistral,
    /// Qwen2/2.5: q/k/v projections carry a bias, o_proj does not.
    Qwen2,
    /// Qwen3: no attention bias, RMSNorm on each head of q and k before RoPE.
    Qwen3,
    /// GPT-2: LayerNorm, learned positions, gelu_new MLP, Conv1D weight layout on disk.
    Gpt2,
}

impl Architecture {
    /// The class name transformers writes in `architectures` for a causal LM.
    pub fn hf_causal_lm_class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
            Architecture::Gpt2 => "GPT2LMHeadModel",
        }
    }

    /// The class name for a sequence-classification (reward model) checkpoint.
    pub fn hf_sequence_classification_class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForSequenceClassification",
            Architecture::Mistral => "MistralForSequenceClassification",
            Architecture::Qwen2 => "Qwen2ForSequenceClassification",
            Architecture::Qwen3 => "Qwen3ForSequenceClassification",
            Architecture::Gpt2 => "GPT2ForSequenceClassification",
        }
    }

    /// transformers' `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Gpt2 => "gpt2",
        }
    }

    fn from_model_type(model_type: &str) -> Option<Self> {
        Some(match model_type {
            "llama" | "smollm" | "smollm2" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            "qwen3" => Architecture::Qwen3,
            "gpt2" => Architecture::Gpt2,
            _ => return None,
        })
    }

    fn from_class(class: &str) -> Option<Self> {
        let prefix = [
            ("Llama", Architecture::Llama),
            ("Mistral", Architecture::Mistral),
            ("Qwen2", Architecture::Qwen2),
            ("Qwen3", Architecture::Qwen3),
            ("GPT2", Architecture::Gpt2),
        ];
        prefix
            .iter()
            .find(|(p, _)| {
                class.starts_with(p)
                    && class[p.len()..]
                        .strip_prefix("For")
                        .or_else(|| class[p.len()..].strip_prefix("LMHead"))
                        .or_else(|| class[p.len()..].strip_prefix("Model"))
                        .is_some()
            })
            .map(|(_, a)| *a)
    }
}

/// Rotary position embedding frequencies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// How RoPE's inverse frequencies are rescaled for long context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// `inv_freq[i] = theta^(-2i/d)`.
    Default,
    /// Llama 3.1's piecewise rescaling of long wavelengths.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
}

/// The network's shape, as `config.json` describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon (LayerNorm epsilon for GPT-2).
    pub norm_eps: f64,
    /// `None` for GPT-2, which learns absolute positions instead.
    pub rope: Option<RopeConfig>,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v (and o for Llama's `attention_bias`).
    pub attention_bias: bool,
    /// Bias on o_proj: Llama's `attention_bias` covers it, Qwen2 has none.
    pub attention_out_bias: bool,
    pub mlp_bias: bool,
    /// Qwen3's per-head RMSNorm on q and k.
    pub qk_norm: bool,
    pub hidden_act: String,
    /// `torch_dtype` / `dtype` as written (e.g. "bfloat16"); informational.
    pub dtype: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// Labels of a sequence-classification head (1 for a reward model).
    pub num_labels: usize,
}

impl ModelConfig {
    /// Read `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| e.in_file(path))
    }

    /// Parse the text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| ModelError::config(format!("invalid JSON: {e}")))?;
        let obj = value.as_object().ok_or_else(|| ModelError::config("config.json is not a JSON object"))?;
        Self::from_json(obj)
    }

    fn from_json(obj: &Map<String, Value>) -> Result<Self> {
        let architecture = detect_architecture(obj)?;
        let is_gpt2 = architecture == Architecture::Gpt2;
        let usize_key = |keys: &[&str]| -> Result<Option<usize>> {
            for k in keys {
                if let Some(v) = obj.get(*k).filter(|v| !v.is_null()) {
                    return v
                        .as_u64()
                        .map(|n| Some(n as usize))
                        .ok_or_else(|| ModelError::config(format!("field `{k}`: expected an integer, found {v}")));
                }
            }
            Ok(None)
        };
        let required = |keys: &[&str]| -> Result<usize> {
            usize_key(keys)?.ok_or_else(|| ModelError::config(format!("missing field `{}`", keys[0])))
        };
        let f64_key = |k: &str| -> Result<Option<f64>> {
            match obj.get(k).filter(|v| !v.is_null()) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| ModelError::config(format!("field `{k}`: expected a number, found {v}"))),
            }
        };
        let bool_key = |k: &str, default: bool| -> Result<bool> {
            match obj.get(k).filter(|v| !v.is_null()) {
                None => Ok(default),
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| ModelError::config(format!("field `{k}`: expected true/false, found {v}"))),
            }
        };

        let hidden_size = required(&["hidden_size", "n_embd"])?;
        let num_attention_heads = required(&["num_attention_heads", "n_head"])?;
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 && usize_key(&["head_dim"])?.is_none() {
            return Err(ModelError::config(format!(
                "hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}"
            )));
        }
        let num_key_value_heads = usize_key(&["num_key_value_heads"])?.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(ModelError::config(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
            )));
        }
        let head_dim = usize_key(&["head_dim"])?.unwrap_or(hidden_size / num_attention_heads);
        let intermediate_size = if is_gpt2 {
            match usize_key(&["n_inner"])? {
                Some(n) => n,
                None => hidden_size
                    .checked_mul(4)
                    .ok_or_else(|| ModelError::config(format!("field `n_embd`: {hidden_size} is too large")))?,
            }
        } else {
            required(&["intermediate_size"])?
        };
        let rope = if is_gpt2 { None } else { Some(parse_rope(obj)?) };
        let (attention_bias, attention_out_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            Architecture::Gpt2 => (true, true),
            _ => {
                let b = bool_key("attention_bias", false)?;
                (b, b)
            }
        };
        let eos_token_ids = match obj.get("eos_token_id") {
            None | Some(Value::Null) => vec![],
            Some(Value::Number(n)) => vec![as_token_id(n, "eos_token_id")?],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::Number(n) => as_token_id(n, "eos_token_id"),
                    _ => Err(ModelError::config("field `eos_token_id`: expected integers")),
                })
                .collect::<Result<_>>()?,
            Some(v) => return Err(ModelError::config(format!("field `eos_token_id`: unexpected {v}"))),
        };
        let token = |k: &str| -> Result<Option<u32>> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Number(n)) => as_token_id(n, k).map(Some),
                Some(v) => Err(ModelError::config(format!("field `{k}`: expected an integer, found {v}"))),
            }
        };
        let num_labels = match obj.get("id2label").and_then(Value::as_object) {
            Some(m) if !m.is_empty() => m.len(),
            _ => usize_key(&["num_labels"])?.unwrap_or(1),
        };
        // transformers' PretrainedConfig defaults to tied embeddings; Llama-family configs
        // override that default to false, GPT-2 keeps it.
        let tie_default = is_gpt2;
        Ok(ModelConfig {
            architecture,
            vocab_size: required(&["vocab_size"])?,
            hidden_size,
            intermediate_size,
            num_hidden_layers: required(&["num_hidden_layers", "n_layer"])?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: usize_key(&["max_position_embeddings", "n_positions"])?.unwrap_or(2048),
            norm_eps: if is_gpt2 {
                f64_key("layer_norm_epsilon")?.unwrap_or(1e-5)
            } else {
                f64_key("rms_norm_eps")?.unwrap_or(1e-6)
            },
            rope,
            tie_word_embeddings: bool_key("tie_word_embeddings", tie_default)?,
            attention_bias,
            attention_out_bias,
            mlp_bias: is_gpt2 || bool_key("mlp_bias", false)?,
            qk_norm: architecture == Architecture::Qwen3,
            hidden_act: obj
                .get("hidden_act")
                .or_else(|| obj.get("activation_function"))
                .and_then(Value::as_str)
                .unwrap_or(if is_gpt2 { "gelu_new" } else { "silu" })
                .to_string(),
            dtype: obj.get("dtype").or_else(|| obj.get("torch_dtype")).and_then(Value::as_str).map(str::to_string),
            bos_token_id: token("bos_token_id")?,
            eos_token_ids,
            pad_token_id: token("pad_token_id")?,
            num_labels,
        })
        .and_then(|c| c.validate().map(|()| c))
    }

    /// Refuse a shape or constant the network cannot run with, naming the field: every
    /// loader (config.json, GGUF metadata, a random init) calls this before allocating.
    pub fn validate(&self) -> Result<()> {
        let supported = match self.architecture {
            Architecture::Gpt2 => ["gelu_new", "gelu_pytorch_tanh"].contains(&self.hidden_act.as_str()),
            _ => self.hidden_act == "silu",
        };
        if !supported {
            return Err(ModelError::config(format!(
                "field `hidden_act`: {:?} is not supported for {:?}",
                self.hidden_act, self.architecture
            )));
        }
        if self.rope.is_some() && !self.head_dim.is_multiple_of(2) {
            return Err(ModelError::config(format!("head_dim {} must be even for RoPE", self.head_dim)));
        }
        let positive = [
            ("vocab_size", self.vocab_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
            ("num_labels", self.num_labels),
        ];
        if let Some((field, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(ModelError::config(format!("field `{field}`: must be positive, found 0")));
        }
        if self.parameter_count().is_none() {
            return Err(ModelError::config(format!(
                "the sizes (hidden_size {}, intermediate_size {}, num_attention_heads {} × head_dim {}, vocab_size {}, num_hidden_layers {}) overflow a parameter count",
                self.hidden_size,
                self.intermediate_size,
                self.num_attention_heads,
                self.head_dim,
                self.vocab_size,
                self.num_hidden_layers
            )));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(ModelError::config(format!(
                "field `num_key_value_heads`: {} does not divide num_attention_heads {}",
                self.num_key_value_heads, self.num_attention_heads
            )));
        }
        if self.architecture == Architecture::Gpt2 && self.num_attention_heads * self.head_dim != self.hidden_size {
            return Err(ModelError::config(format!(
                "field `n_head`: {} heads do not divide n_embd {}",
                self.num_attention_heads, self.hidden_size
            )));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(ModelError::config(format!(
                "field `rms_norm_eps`: must be a positive number, found {}",
                self.norm_eps
            )));
        }
        if let Some(rope) = &self.rope {
            if !(rope.theta.is_finite() && rope.theta > 0.0) {
                return Err(ModelError::config(format!(
                    "field `rope_theta`: must be a positive number, found {}",
                    rope.theta
                )));
            }
            let factor = match rope.scaling {
                RopeScaling::Default => 1.0,
                RopeScaling::Linear { factor } | RopeScaling::Llama3 { factor, .. } => factor,
            };
            if !(factor.is_finite() && factor > 0.0) {
                return Err(ModelError::config(format!(
                    "field `rope_scaling.factor`: must be a positive number, found {factor}"
                )));
            }
        }
        let tokens = self.eos_token_ids.iter().map(|&t| ("eos_token_id", t)).chain(
            [("bos_token_id", self.bos_token_id), ("pad_token_id", self.pad_token_id)]
                .into_iter()
                .filter_map(|(k, t)| t.map(|t| (k, t))),
        );
        for (field, id) in tokens {
            if id as usize >= self.vocab_size {
                return Err(ModelError::config(format!(
                    "field `{field}`: token id {id} is beyond the vocabulary (vocab_size {})",
                    self.vocab_size
                )));
            }
        }
        Ok(())
    }

    /// Parameters of the trunk and an untied LM head (checked arithmetic: `None` when a
    /// size is absurd).
    pub fn parameter_count(&self) -> Option<u64> {
        let m = |a: usize, b: usize| (a as u64).checked_mul(b as u64);
        let h = self.hidden_size;
        let q = self.num_attention_heads.checked_mul(self.head_dim)?;
        let kv = self.num_key_value_heads.checked_mul(self.head_dim)?;
        let attention = m(h, q)?.checked_mul(2)?.checked_add(m(h, kv)?.checked_mul(2)?)?;
        let mlp = m(h, self.intermediate_size)?.checked_mul(3)?;
        let layer = attention.checked_add(mlp)?.checked_add(m(h, 4)?)?;
        let embed = m(self.vocab_size, h)?.checked_mul(if self.tie_word_embeddings { 1 } else { 2 })?;
        let positions = if self.architecture == Architecture::Gpt2 { m(self.max_position_embeddings, h)? } else { 0 };
        layer.checked_mul(self.num_hidden_layers as u64)?.checked_add(embed)?.checked_add(positions)
    }

    /// Query heads sharing one key/value head.
    pub fn gqa_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// A `config.json` in transformers 5.x layout (also readable by 4.x, which takes
    /// `rope_theta` from the top level: both are written).
    pub fn to_hf_json(&self, head: HfHead) -> Value {
        let arch = self.architecture;
        let class = match head {
            HfHead::CausalLm => arch.hf_causal_lm_class(),
            HfHead::SequenceClassification => arch.hf_sequence_classification_class(),
        };
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        let mut out = if arch == Architecture::Gpt2 {
            json!({
                "n_embd": self.hidden_size,
                "n_layer": self.num_hidden_layers,
                "n_head": self.num_attention_heads,
                "n_inner": self.intermediate_size,
                "n_positions": self.max_position_embeddings,
                "n_ctx": self.max_position_embeddings,
                "layer_norm_epsilon": self.norm_eps,
                "activation_function": self.hidden_act,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            })
        } else {
            let mut o = json!({
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "head_dim": self.head_dim,
                "max_position_embeddings": self.max_position_embeddings,
                "rms_norm_eps": self.norm_eps,
                "hidden_act": self.hidden_act,
            });
            if let Some(rope) = &self.rope {
                let mut params = match &rope.scaling {
                    RopeScaling::Default => json!({"rope_type": "default"}),
                    RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings,
                    } => json!({
                        "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                        "high_freq_factor": high_freq_factor,
                        "original_max_position_embeddings": original_max_position_embeddings,
                    }),
                };
                params["rope_theta"] = json!(rope.theta);
                o["rope_theta"] = json!(rope.theta);
                o["rope_parameters"] = params;
            }
            if matches!(arch, Architecture::Llama | Architecture::Mistral) {
                o["attention_bias"] = json!(self.attention_bias);
                o["mlp_bias"] = json!(self.mlp_bias);
            }
            o
        };
        let o = out.as_object_mut().expect("object literal");
        o.insert("architectures".into(), json!([class]));
        o.insert("model_type".into(), json!(arch.model_type()));
        o.insert("vocab_size".into(), json!(self.vocab_size));
        o.insert("tie_word_embeddings".into(), json!(self.tie_word_embeddings));
        o.insert("bos_token_id".into(), json!(self.bos_token_id));
        o.insert("eos_token_id".into(), eos);
        o.insert("pad_token_id".into(), json!(self.pad_token_id));
        o.insert("dtype".into(), json!("float32"));
        if head == HfHead::SequenceClassification {
            o.insert("num_labels".into(), json!(self.num_labels));
            let labels: Map<String, Value> =
                (0..self.num_labels).map(|i| (i.to_string(), json!(format!("LABEL_{i}")))).collect();
            o.insert("id2label".into(), Value::Object(labels.clone()));
            let label2id: Map<String, Value> = (0..self.num_labels).map(|i| (format!("LABEL_{i}"), json!(i))).collect();
            o.insert("label2id".into(), Value::Object(label2id));
        }
        out
    }
}

/// Which transformers class a saved checkpoint is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfHead {
    CausalLm,
    SequenceClassification,
}

fn as_token_id(n: &serde_json::Number, key: &str) -> Result<u32> {
    n.as_u64()
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| ModelError::config(format!("field `{key}`: {n} is not a token id")))
}

fn detect_architecture(obj: &Map<String, Value>) -> Result<Architecture> {
    if let Some(classes) = obj.get("architectures").and_then(Value::as_array) {
        for c in classes.iter().filter_map(Value::as_str) {
            if let Some(a) = Architecture::from_class(c) {
                return Ok(a);
            }
        }
        if let Some(c) = classes.first().and_then(Value::as_str)
            && obj.get("model_type").and_then(Value::as_str).and_then(Architecture::from_model_type).is_none()
        {
            return Err(ModelError::config(format!(
                "field `architectures`: {c} is not supported (supported: Llama, Mistral, Qwen2, Qwen3, GPT-2)"
            )));
        }
    }
    match obj.get("model_type").and_then(Value::as_str) {
        Some(t) => Architecture::from_model_type(t).ok_or_else(|| {
            ModelError::config(format!(
                "field `model_type`: {t:?} is not supported (supported: llama, mistral, qwen2, qwen3, gpt2)"
            ))
        }),
        None => Err(ModelError::config("neither `architectures` nor `model_type` is present")),
    }
}

/// RoPE from 5.x `rope_parameters`, or 4.x top-level `rope_theta` + `rope_scaling`.
fn parse_rope(obj: &Map<String, Value>) -> Result<RopeConfig> {
    let params = obj.get("rope_parameters").filter(|v| !v.is_null());
    let scaling = obj.get("rope_scaling").filter(|v| !v.is_null());
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .or_else(|| obj.get("rope_theta"))
        .map(|v| {
            v.as_f64().ok_or_else(|| ModelError::config(format!("field `rope_theta`: expected a number, found {v}")))
        })
        .transpose()?
        .unwrap_or(10_000.0);
    let spec = params.or(scaling);
    let field = if params.is_some() { "rope_parameters" } else { "rope_scaling" };
    let scaling = match spec {
        None => RopeScaling::Default,
        Some(s) => {
            let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
            let num = |k: &str| -> Result<f64> {
                s.get(k)
                    .and_then(Value::as_f64)
                    .ok_or_else(|| ModelError::config(format!("field `{field}.{k}`: missing or not a number")))
            };
            match kind {
                "default" => RopeScaling::Default,
                "linear" => RopeScaling::Linear { factor: num("factor")? },
                "llama3" => RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
                },
                other => {
                    return Err(ModelError::config(format!(
                        "field `{field}.rope_type`: {other:?} is not supported (default, linear, llama3)"
                    )));
                }
            }
        }
    };
    Ok(RopeConfig { theta, scaling })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_transformers_4_keys() {
        let c = ModelConfig::from_json_str(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":10,
            "rope_theta":500000.0,"torch_dtype":"bfloat16","eos_token_id":[1,2],
            "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#,
        )
        .unwrap();
        let rope = c.rope.unwrap();
        assert_eq!(rope.theta, 500000.0);
        assert!(matches!(rope.scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.head_dim, 16);
    }

    #[test]
    fn reads_transformers_5_keys() {
        let c = ModelConfig::from_json_str(
            r#"{"model_type":"qwen2","hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"vocab_size":10,"dtype":"float32",
            "rope_parameters":{"rope_type":"default","rope_theta":1000000.0},"tie_word_embeddings":true}"#,
        )
        .unwrap();
        assert_eq!(c.architecture, Architecture::Qwen2);
        assert_eq!(c.rope.unwrap().theta, 1e6);
        assert!(c.attention_bias && !c.attention_out_bias);
        assert_eq!(c.num_key_value_heads, 4);
    }

    #[test]
    fn errors_name_the_field() {
        let e = ModelConfig::from_json_str(r#"{"model_type":"llama","hidden_size":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("hidden_size"), "{e}");
        let e = ModelConfig::from_json_str(r#"{"architectures":["BertModel"]}"#).unwrap_err();
        assert!(e.to_string().contains("BertModel"), "{e}");
        let e = ModelConfig::from_json_str(
            r#"{"model_type":"llama","hidden_size":64,"intermediate_size":1,"num_hidden_layers":1,
            "num_attention_heads":4,"vocab_size":3,"rope_scaling":{"rope_type":"yarn","factor":2}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("rope_scaling.rope_type"), "{e}");
    }

    #[test]
    fn round_trips_through_hf_json() {
        let c = ModelConfig::from_json_str(
            r#"{"model_type":"qwen3","hidden_size":64,"intermediate_size":128,"head_dim":32,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":10,
            "rope_parameters":{"rope_type":"default","rope_theta":1000000.0}}"#,
        )
        .unwrap();
        let back = ModelConfig::from_json_str(&c.to_hf_json(HfHead::CausalLm).to_string()).unwrap();
        assert_eq!(back.head_dim, 32);
        assert_eq!(back.architecture, Architecture::Qwen3);
        assert_eq!(back.rope, c.rope);
    }
}
