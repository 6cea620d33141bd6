//! Low-rank adapters (LoRA, Hu et al. 2021, arXiv:2106.09685) over the block projections of
//! an align-model network, in PEFT's layout so adapters move between align, PEFT and vLLM.
//!
//! `y = W x + (alpha / r) · B A dropout(x)` with `A: [r, in]` (Kaiming-uniform, as PEFT) and
//! `B: [out, r]` (zeros), so a fresh adapter leaves the model unchanged. The base weights
//! are frozen (no gradient, so no optimizer state); only A and B train and only they are
//! saved (`adapter_config.json` + `adapter_model.safetensors`, keys
//! `base_model.model.<module>.lora_A.weight`).
//!
//! GPT-2's block projections are Conv1D modules (`attn.c_attn`, `attn.c_proj`, `mlp.c_fc`,
//! `mlp.c_proj`), all of them targets (`"all-linear"` included), as in PEFT. PEFT marks such
//! adapters `fan_in_fan_out: true`: the flag only says that the Conv1D base weight is stored
//! `[in, out]`, so the merged delta is `(B A)ᵀ`; the adapter tensors themselves keep the
//! `nn.Linear` layout (`A: [r, in]`, `B: [out, r]`). Our base weights are `[in, out]` for
//! every architecture, so merging is the same product everywhere; the flag is written `true`
//! for GPT-2 and, as PEFT does (it overrides the flag by module type), not needed on load.
//! The fused `c_attn` is one module with one adapter, exactly as in PEFT: one `A` shared by
//! q, k and v, and `B: [3 · hidden, r]` whose rows are the q, k and v blocks in that order.

use std::collections::BTreeMap;
use std::path::Path;

use align_model::burn::module::{Module, Param};
use align_model::burn::nn::DropoutConfig;
use align_model::burn::tensor::backend::Backend;
use align_model::burn::tensor::{Tensor, TensorData};
use align_model::weights::{HostTensor, SafetensorsSource, TensorMap, WeightSource, save_safetensors, write_atomic};
use align_model::{Architecture, LowRank, ModelError, Transformer};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Model(#[from] ModelError),
}

pub type Result<T, E = LoraError> = std::result::Result<T, E>;

/// Which projections get an adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// `"all-linear"`: every block projection (PEFT's shorthand; never the LM head).
    Shorthand(String),
    /// Names matched as PEFT does: equal to the module name or a dot-separated suffix of it
    /// (`"q_proj"` matches `model.layers.3.self_attn.q_proj`).
    Names(Vec<String>),
}

/// `[lora]` of a stage config (PEFT's names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// Rank. Default 8.
    pub r: usize,
    /// Scale numerator: the delta is multiplied by `lora_alpha / r`. Default 16.
    pub lora_alpha: f64,
    /// Dropout on the adapter's input during training. Default 0.05.
    pub lora_dropout: f64,
    /// Default `"all-linear"`.
    pub target_modules: TargetModules,
    /// Scale by `lora_alpha / sqrt(r)` instead (rsLoRA). Default false.
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            target_modules: TargetModules::Shorthand("all-linear".into()),
            use_rslora: false,
        }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        if self.use_rslora { self.lora_alpha / (self.r as f64).sqrt() } else { self.lora_alpha / self.r as f64 }
    }

    fn matches(&self, module: &str) -> Result<bool> {
        match &self.target_modules {
            TargetModules::Shorthand(s) if s == "all-linear" => Ok(true),
            TargetModules::Shorthand(s) => Err(LoraError::Config(format!(
                "target_modules = {s:?}: a single string must be \"all-linear\" (give a list of names otherwise)"
            ))),
            TargetModules::Names(names) => Ok(names.iter().any(|n| module == n || module.ends_with(&format!(".{n}")))),
        }
    }

    fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(LoraError::Config("lora r must be at least 1".into()));
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return Err(LoraError::Config(format!("lora_alpha {} must be a positive number", self.lora_alpha)));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(LoraError::Config(format!("lora_dropout {} must be in [0, 1)", self.lora_dropout)));
        }
        Ok(())
    }
}

/// Deterministic uniform numbers for adapter init (independent of global RNG state).
fn uniform(seed: u64, n: usize, bound: f64) -> Vec<f32> {
    let mut rng = align_model::SplitMix64::new(seed);
    (0..n).map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32).collect()
}

fn param<B: Backend>(data: Vec<f32>, shape: [usize; 2], device: &B::Device) -> Param<Tensor<B, 2>> {
    Param::from_tensor(Tensor::from_data(TensorData::new(data, shape), device))
}

/// Freeze the whole model, then attach trainable adapters to the matching projections.
/// Returns the model and the names of the adapted modules. Errors if nothing matches.
pub fn attach<B: Backend>(model: Transformer<B>, cfg: &LoraConfig, seed: u64) -> Result<(Transformer<B>, Vec<String>)> {
    cfg.validate()?;
    let mut model = model.no_grad();
    let device = model.embed_tokens.val().device();
    let mut names = Vec::new();
    for (k, (name, proj)) in model.projections_mut().into_iter().enumerate() {
        if !cfg.matches(&name)? {
            continue;
        }
        let [d_in, d_out] = proj.dims();
        // A rank above the layer's smaller side adds parameters and no expressiveness.
        if cfg.r > d_in.min(d_out) {
            return Err(LoraError::Config(format!(
                "lora r = {} is larger than `{name}` ({d_in} → {d_out}): r must be at most {}",
                cfg.r,
                d_in.min(d_out)
            )));
        }
        // PEFT: kaiming_uniform_(A, a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)); B = 0.
        let a = uniform(
            seed ^ (k as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407),
            d_in * cfg.r,
            1.0 / (d_in as f64).sqrt(),
        );
        proj.adapter = Some(LowRank {
            a: param(a, [d_in, cfg.r], &device),
            b: param(vec![0.0; cfg.r * d_out], [cfg.r, d_out], &device),
            scale: cfg.scale(),
            dropout: DropoutConfig::new(cfg.lora_dropout).init(),
            enabled: true,
            merged: false,
        });
        names.push(name);
    }
    if names.is_empty() {
        return Err(LoraError::Config(format!(
            "target_modules {:?} match no projection of the model",
            cfg.target_modules
        )));
    }
    Ok((model, names))
}

fn peft_key(module: &str, which: &str) -> String {
    format!("base_model.model.{module}.lora_{which}.weight")
}

/// Save the adapters in PEFT layout into `dir`.
pub fn save_peft<B: Backend>(model: &mut Transformer<B>, cfg: &LoraConfig, base_model: &str, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut tensors = TensorMap::default();
    let mut modules = Vec::new();
    for (name, proj) in model.projections_mut() {
        let Some(ad) = &proj.adapter else { continue };
        let host = |t: Tensor<B, 2>| -> Result<HostTensor> {
            let shape = t.dims().to_vec();
            let data =
                t.into_data().convert::<f32>().to_vec::<f32>().map_err(|e| LoraError::Config(format!("{e:?}")))?;
            Ok(HostTensor::new(shape, data))
        };
        // Burn keeps [in, r] / [r, out]; PEFT's nn.Linear weights are [r, in] / [out, r].
        tensors.0.insert(peft_key(&name, "A"), host(ad.a.val())?.transposed());
        tensors.0.insert(peft_key(&name, "B"), host(ad.b.val())?.transposed());
        modules.push(name);
    }
    if modules.is_empty() {
        return Err(LoraError::Config("the model has no adapters to save".into()));
    }
    save_safetensors(&tensors, &dir.join("adapter_model.safetensors"))?;
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": modules,
        "use_rslora": cfg.use_rslora,
        "bias": "none",
        // GPT-2's projections are Conv1D: PEFT writes true for them (see the module doc).
        "fan_in_fan_out": model.config.architecture == Architecture::Gpt2,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
    });
    write_atomic(&dir.join("adapter_config.json"), serde_json::to_string_pretty(&config).expect("JSON").as_bytes())?;
    Ok(())
}

/// Attach the adapters of a PEFT directory (frozen base, trainable adapters). Returns the
/// config it read.
pub fn load_peft<B: Backend>(model: Transformer<B>, dir: &Path) -> Result<(Transformer<B>, LoraConfig)> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| ModelError::format(&cfg_path, format!("invalid JSON: {e}")))?;
    let field = |k: &str| v.get(k).filter(|x| !x.is_null());
    let bad = |k: &str, what: &str| LoraError::Model(ModelError::format(&cfg_path, format!("field `{k}`: {what}")));
    if field("peft_type").and_then(Value::as_str) != Some("LORA") {
        return Err(bad("peft_type", "only \"LORA\" adapters are supported"));
    }
    if field("use_dora").and_then(Value::as_bool) == Some(true) {
        return Err(bad("use_dora", "DoRA is not supported"));
    }
    // `fan_in_fan_out` (GPT-2's Conv1D) changes only how PEFT merges into its base weight,
    // not the adapter tensors, and PEFT sets it from the module type whatever the file says:
    // nothing to do here (see the module doc).
    if field("bias").and_then(Value::as_str).is_some_and(|b| b != "none") {
        return Err(bad("bias", "only \"none\" is supported"));
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if field(k).and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
            return Err(bad(k, "per-module ranks are not supported"));
        }
    }
    let cfg = LoraConfig {
        r: field("r").and_then(Value::as_u64).ok_or_else(|| bad("r", "missing or not an integer"))? as usize,
        lora_alpha: field("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| bad("lora_alpha", "missing or not a number"))?,
        lora_dropout: field("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        target_modules: match field("target_modules") {
            Some(t) => {
                serde_json::from_value(t.clone()).map_err(|_| bad("target_modules", "expected a string or a list"))?
            }
            None => return Err(bad("target_modules", "missing")),
        },
        use_rslora: field("use_rslora").and_then(Value::as_bool).unwrap_or(false),
    };
    let st_path = dir.join("adapter_model.safetensors");
    let mut src = SafetensorsSource::open_files(std::slice::from_ref(&st_path))?;
    let (mut model, names) = attach(model, &cfg, 0)?;
    let device = model.embed_tokens.val().device();
    let mut found: BTreeMap<String, ()> = BTreeMap::new();
    for (name, proj) in model.projections_mut() {
        let Some(ad) = proj.adapter.as_mut() else { continue };
        let (ka, kb) = (peft_key(&name, "A"), peft_key(&name, "B"));
        if !src.contains(&ka) {
            // PEFT matched fewer modules than our suffix rule: leave this one without an adapter.
            proj.adapter = None;
            continue;
        }
        let [d_in, r] = ad.a.dims();
        let d_out = ad.b.dims()[1];
        let a = src.load_shaped(&ka, &[r, d_in]).map_err(|e| e.in_file(&st_path))?.transposed();
        let b = src.load_shaped(&kb, &[d_out, r]).map_err(|e| e.in_file(&st_path))?.transposed();
        ad.a = param(a.data, [d_in, r], &device);
        ad.b = param(b.data, [r, d_out], &device);
        found.insert(name, ());
    }
    for key in src.names() {
        let module = key.strip_prefix("base_model.model.").and_then(|k| k.rsplit_once(".lora_")).map(|(m, _)| m);
        if module.is_none_or(|m| !found.contains_key(m)) {
            return Err(LoraError::Model(ModelError::format(
                &st_path,
                format!("tensor `{key}` has no matching projection in the model (adapted: {} modules)", names.len()),
            )));
        }
    }
    Ok((model, cfg))
}

/// `W ← W + scale · A B` for every adapter (the adapters stay, marked merged, and no longer
/// add their delta in forward). Exact inverse: [`unmerge`].
///
/// A packed (quantised) base is dequantised into a dense weight first: the merge is exact,
/// and the projection stays dense afterwards (unmerging does not re-pack it).
pub fn merge<B: Backend>(model: &mut Transformer<B>) {
    fold_adapters(model, true);
}

/// Undo [`merge`].
pub fn unmerge<B: Backend>(model: &mut Transformer<B>) {
    fold_adapters(model, false);
}

/// Add (`into`) or subtract every adapter's delta `scale · A B` to or from its base weight,
/// where it is not already so.
fn fold_adapters<B: Backend>(model: &mut Transformer<B>, into: bool) {
    let device = model.embed_tokens.val().device();
    for (_, proj) in model.projections_mut() {
        let Some(ad) = proj.adapter.as_ref().filter(|ad| ad.merged != into) else { continue };
        let delta = ad.a.val().matmul(ad.b.val()) * ad.scale;
        let w = if into { proj.base_weight(&device) + delta } else { proj.base_weight(&device) - delta };
        proj.set_base_weight(w);
        if let Some(ad) = proj.adapter.as_mut() {
            ad.merged = into;
        }
    }
}

/// Merge and drop the adapters: a plain model to export as full HF safetensors.
pub fn merge_and_unload<B: Backend>(mut model: Transformer<B>) -> Transformer<B> {
    merge(&mut model);
    for (_, proj) in model.projections_mut() {
        proj.adapter = None;
    }
    model
}
