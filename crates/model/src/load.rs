//! Building a [`Transformer`] from named tensors, and turning one back into HF-named tensors.
//!
//! Names are transformers' own (`model.layers.N.self_attn.q_proj.weight`, GPT-2's
//! `transformer.h.N.attn.c_attn.weight`, …), so what we save loads in transformers and what
//! transformers saves loads here. HF `nn.Linear` weights are `[out, in]`; Burn's `Linear`
//! keeps `[in, out]`, so matrices are transposed on the way in and out. GPT-2's Conv1D is
//! already `[in, out]`; its fused `c_attn` stays one projection (`Attention::qkv_proj`).

use std::collections::HashSet;

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::config::{Architecture, HfHead, ModelConfig};
use crate::error::{ModelError, Result};
use crate::names::{BlockPart, NameTable};
use crate::transformer::{Attention, Block, Mlp, Norm, Proj, Transformer, rope_inv_freq};
use crate::weights::{HostTensor, TensorMap, WeightSource};
use align_kernels::{PackedMatrix, QuantFormat};

/// Which heads to build besides the trunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Heads {
    /// The language-model head (tied or `lm_head.weight`).
    pub lm: bool,
    /// `score.weight`: loaded if present, else freshly initialised (a new reward head).
    pub score: bool,
    /// `v_head.summary.{weight,bias}`: loaded if present, else freshly initialised.
    pub value: bool,
}

impl Heads {
    pub const LM: Heads = Heads { lm: true, score: false, value: false };
}

struct Loader<'a, B: Backend> {
    src: &'a mut dyn WeightSource,
    device: &'a B::Device,
    storage: BaseStorage,
}

/// How the block projections' base weights are stored. Anything but `Dense` is for a
/// frozen base under LoRA (QLoRA): the weights take no gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BaseStorage {
    /// f32, as every other tensor.
    #[default]
    Dense,
    /// Quantised on load to this format.
    Quantize(QuantFormat),
    /// A GGUF file's own blocks as loaded (tensors stored in F32/F16/BF16 stay dense).
    Gguf,
}

impl<B: Backend> Loader<'_, B> {
    fn host(&mut self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        self.src.load_shaped(name, shape)
    }

    fn param1(t: HostTensor, device: &B::Device) -> Param<Tensor<B, 1>> {
        Param::from_tensor(Tensor::from_data(TensorData::new(t.data, t.shape), device))
    }

    fn param2(t: HostTensor, device: &B::Device) -> Param<Tensor<B, 2>> {
        Param::from_tensor(Tensor::from_data(TensorData::new(t.data, t.shape), device))
    }

    fn vector(&mut self, name: &str, n: usize) -> Result<Param<Tensor<B, 1>>> {
        let t = self.host(name, &[n])?;
        Ok(Self::param1(t, self.device))
    }

    /// An HF `nn.Linear` (`[out, in]` weight, optional `[out]` bias).
    fn linear(&mut self, name: &str, d_in: usize, d_out: usize, bias: bool) -> Result<Linear<B>> {
        let w = self.host(&format!("{name}.weight"), &[d_out, d_in])?.transposed();
        let bias = if bias { Some(self.vector(&format!("{name}.bias"), d_out)?) } else { None };
        Ok(Linear { weight: Self::param2(w, self.device), bias })
    }

    /// A block projection: an HF `nn.Linear`, or GPT-2's Conv1D (`[in, out]` weight),
    /// stored as `self.storage` says.
    fn proj(&mut self, name: &str, d_in: usize, d_out: usize, bias: bool, conv1d: bool) -> Result<Proj<B>> {
        let packed = match self.storage {
            BaseStorage::Dense => None,
            BaseStorage::Gguf => self.src.load_packed(&format!("{name}.weight"), &[d_out, d_in]).transpose()?,
            BaseStorage::Quantize(format) => {
                let w = if conv1d {
                    self.host(&format!("{name}.weight"), &[d_in, d_out])?.transposed()
                } else {
                    self.host(&format!("{name}.weight"), &[d_out, d_in])?
                };
                Some(quantize(&format!("{name}.weight"), format, w)?)
            }
        };
        match packed {
            Some(w) => {
                let bias = if bias { Some(self.vector(&format!("{name}.bias"), d_out)?) } else { None };
                Ok(Proj::packed(w, bias))
            }
            None if conv1d => Ok(Proj::new(self.conv1d(name, d_in, d_out)?)),
            None => Ok(Proj::new(self.linear(name, d_in, d_out, bias)?)),
        }
    }

    /// A GPT-2 Conv1D (`[in, out]` weight and `[out]` bias).
    fn conv1d(&mut self, name: &str, d_in: usize, d_out: usize) -> Result<Linear<B>> {
        let w = self.host(&format!("{name}.weight"), &[d_in, d_out])?;
        let b = self.vector(&format!("{name}.bias"), d_out)?;
        Ok(Linear { weight: Self::param2(w, self.device), bias: Some(b) })
    }

    fn norm(&mut self, name: &str, n: usize, eps: f64, layer_norm: bool) -> Result<Norm<B>> {
        Ok(Norm {
            weight: self.vector(&format!("{name}.weight"), n)?,
            bias: if layer_norm { Some(self.vector(&format!("{name}.bias"), n)?) } else { None },
            eps,
            center: layer_norm,
        })
    }
}

/// `w` (`[out, in]`) packed as `format`; an error names the tensor.
fn quantize(name: &str, format: QuantFormat, w: HostTensor) -> Result<PackedMatrix> {
    let [rows, cols] = [w.shape[0], w.shape[1]];
    PackedMatrix::quantize(format, rows, cols, &w.data)
        .map_err(|e| ModelError::tensor(name, format!("cannot be stored as {format}: {e}")))
}

/// A fresh linear layer `[d_in, d_out]` with N(0, std²) weights, as transformers
/// initialises new heads (`initializer_range` 0.02), and a zero bias if asked.
pub fn new_head<B: Backend>(d_in: usize, d_out: usize, bias: bool, seed: u64, device: &B::Device) -> Linear<B> {
    // Not the global RNG: two runs with one seed start identically.
    let mut rng = crate::rng::SplitMix64::new(seed);
    let w: Vec<f32> = (0..d_in * d_out).map(|_| (0.02 * rng.normal()) as f32).collect();
    Linear {
        weight: Param::from_tensor(Tensor::from_data(TensorData::new(w, [d_in, d_out]), device)),
        bias: bias.then(|| Param::from_tensor(Tensor::zeros([d_out], device))),
    }
}

/// Build the network from HF-named tensors.
///
/// The checkpoint must match the config exactly: the config is validated first; a config
/// with more layers than the checkpoint fails before anything is allocated; every tensor
/// is checked for shape and finiteness as it loads; and a checkpoint tensor the network
/// does not use is an error (a config with fewer layers than its checkpoint), or a warning
/// for heads the caller did not ask for. transformers' buffers (rotary caches, GPT-2's
/// causal masks) are ignored as transformers ignores them.
pub fn build<B: Backend>(
    config: &ModelConfig,
    src: &mut dyn WeightSource,
    heads: Heads,
    device: &B::Device,
) -> Result<Transformer<B>> {
    build_stored(config, src, heads, BaseStorage::Dense, device)
}

/// [`build`], with the block projections' base weights stored as `storage` says.
pub fn build_stored<B: Backend>(
    config: &ModelConfig,
    src: &mut dyn WeightSource,
    heads: Heads,
    storage: BaseStorage,
    device: &B::Device,
) -> Result<Transformer<B>> {
    config.validate()?;
    let names = NameTable::of(config.architecture);
    let available = src.names();
    let random = src.is_generated();
    if !random {
        // Checked before the layer loop, so an absurd layer count fails instead of allocating.
        let last = format!("{}.weight", names.block(config.num_hidden_layers - 1, BlockPart::InputNorm));
        if !src.contains(&last) {
            return Err(ModelError::config(format!(
                "field `num_hidden_layers`: {} layers, but the checkpoint has no `{last}`",
                config.num_hidden_layers
            )));
        }
    }
    let mut tracked = Tracked { src, used: HashSet::new(), random };
    let model = build_from(config, &mut tracked, heads, storage, device)?;
    let used = tracked.used;
    report_unused(config, heads, available.into_iter().filter(|n| !used.contains(n)).collect())?;
    Ok(model)
}

/// A source that records which tensors were read and refuses non-finite values.
struct Tracked<'a> {
    src: &'a mut dyn WeightSource,
    used: HashSet<String>,
    /// A random initialisation (no names): nothing to check.
    random: bool,
}

impl WeightSource for Tracked<'_> {
    fn contains(&self, name: &str) -> bool {
        self.src.contains(name)
    }
    fn load(&mut self, name: &str) -> Result<HostTensor> {
        self.used.insert(name.to_string());
        let t = self.src.load(name)?;
        let bad = t.data.iter().filter(|x| !x.is_finite()).count();
        if bad > 0 {
            return Err(ModelError::tensor(name, format!("{bad} of {} values are NaN or infinite", t.data.len())));
        }
        Ok(t)
    }
    fn load_shaped(&mut self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        if self.random {
            return self.src.load_shaped(name, shape);
        }
        let t = self.load(name)?;
        if t.shape != shape {
            return Err(ModelError::tensor(name, format!("expected shape {shape:?}, found {:?}", t.shape)));
        }
        Ok(t)
    }
    fn names(&self) -> Vec<String> {
        self.src.names()
    }
    fn load_packed(&mut self, name: &str, shape: &[usize; 2]) -> Option<Result<PackedMatrix>> {
        let packed = self.src.load_packed(name, shape)?;
        self.used.insert(name.to_string());
        Some(packed)
    }
}

/// Checkpoint tensors the network did not read: buffers transformers also ignores pass,
/// heads the caller did not ask for are a warning, anything else is an error.
fn report_unused(config: &ModelConfig, heads: Heads, unused: Vec<String>) -> Result<()> {
    let buffer =
        |n: &str| n.ends_with("rotary_emb.inv_freq") || n.ends_with(".attn.bias") || n.ends_with(".attn.masked_bias");
    let head = |n: &str| n.starts_with("score.") || n.starts_with("v_head.") || n == "lm_head.weight";
    let (heads_unused, other): (Vec<String>, Vec<String>) =
        unused.into_iter().filter(|n| !buffer(n)).partition(|n| head(n));
    if !heads_unused.is_empty() {
        tracing::warn!(
            "checkpoint tensors not used (heads this model is not built with: {heads:?}): {}",
            heads_unused.join(", ")
        );
    }
    if other.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = other.iter().take(8).map(String::as_str).collect();
    let more =
        if other.len() > shown.len() { format!(" and {} more", other.len() - shown.len()) } else { String::new() };
    Err(ModelError::config(format!(
        "{} checkpoint tensors are not part of a {:?} network of {} layers (does `num_hidden_layers` match the checkpoint?): {}{more}",
        other.len(),
        config.architecture,
        config.num_hidden_layers,
        shown.join(", ")
    )))
}

fn build_from<B: Backend>(
    config: &ModelConfig,
    src: &mut dyn WeightSource,
    heads: Heads,
    storage: BaseStorage,
    device: &B::Device,
) -> Result<Transformer<B>> {
    let c = config;
    let names = NameTable::of(c.architecture);
    let gpt2 = c.architecture == Architecture::Gpt2;
    let (h, q_out, kv_out) = (c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
    let mut l = Loader::<B> { src, device, storage };

    let embed_name = format!("{}.weight", names.trunk(names.embed.0));
    let embed_tokens = Loader::<B>::param2(l.host(&embed_name, &[c.vocab_size, h])?, device);
    let position_embeddings = match names.position_embed {
        Some((wpe, _)) => {
            let t = l.host(&format!("{}.weight", names.trunk(wpe)), &[c.max_position_embeddings, h])?;
            Some(Loader::<B>::param2(t, device))
        }
        None => None,
    };

    let mut layers = Vec::new();
    for i in 0..c.num_hidden_layers {
        let at = |part| names.block(i, part);
        let block = if gpt2 {
            Block {
                input_layernorm: l.norm(&at(BlockPart::InputNorm), h, c.norm_eps, true)?,
                self_attn: Attention {
                    // Conv1D [in, 3 · out]: q, k, v are column blocks, split after the product.
                    qkv_proj: Some(l.proj(&at(BlockPart::Qkv), h, 3 * h, true, true)?),
                    q_proj: None,
                    k_proj: None,
                    v_proj: None,
                    o_proj: l.proj(&at(BlockPart::O), h, h, true, true)?,
                    q_norm: None,
                    k_norm: None,
                    n_heads: c.num_attention_heads,
                    n_kv_heads: c.num_attention_heads,
                    head_dim: c.head_dim,
                },
                post_attention_layernorm: l.norm(&at(BlockPart::PostAttentionNorm), h, c.norm_eps, true)?,
                mlp: Mlp {
                    gate_proj: None,
                    up_proj: l.proj(&at(BlockPart::Up), h, c.intermediate_size, true, true)?,
                    down_proj: l.proj(&at(BlockPart::Down), c.intermediate_size, h, true, true)?,
                },
            }
        } else {
            let qk_norm = |l: &mut Loader<B>, part| -> Result<Option<Norm<B>>> {
                if c.qk_norm { l.norm(&at(part), c.head_dim, c.norm_eps, false).map(Some) } else { Ok(None) }
            };
            Block {
                input_layernorm: l.norm(&at(BlockPart::InputNorm), h, c.norm_eps, false)?,
                self_attn: Attention {
                    qkv_proj: None,
                    q_proj: Some(l.proj(&at(BlockPart::Q), h, q_out, c.attention_bias, false)?),
                    k_proj: Some(l.proj(&at(BlockPart::K), h, kv_out, c.attention_bias, false)?),
                    v_proj: Some(l.proj(&at(BlockPart::V), h, kv_out, c.attention_bias, false)?),
                    o_proj: l.proj(&at(BlockPart::O), q_out, h, c.attention_out_bias, false)?,
                    q_norm: qk_norm(&mut l, BlockPart::QNorm)?,
                    k_norm: qk_norm(&mut l, BlockPart::KNorm)?,
                    n_heads: c.num_attention_heads,
                    n_kv_heads: c.num_key_value_heads,
                    head_dim: c.head_dim,
                },
                post_attention_layernorm: l.norm(&at(BlockPart::PostAttentionNorm), h, c.norm_eps, false)?,
                mlp: Mlp {
                    gate_proj: Some(l.proj(&at(BlockPart::Gate), h, c.intermediate_size, c.mlp_bias, false)?),
                    up_proj: l.proj(&at(BlockPart::Up), h, c.intermediate_size, c.mlp_bias, false)?,
                    down_proj: l.proj(&at(BlockPart::Down), c.intermediate_size, h, c.mlp_bias, false)?,
                },
            }
        };
        layers.push(block);
    }
    let norm = l.norm(&names.trunk(names.final_norm.0), h, c.norm_eps, gpt2)?;

    let lm_head =
        if heads.lm && !c.tie_word_embeddings { Some(l.linear("lm_head", h, c.vocab_size, false)?) } else { None };
    let score = if heads.score {
        Some(if l.src.contains("score.weight") {
            l.linear("score", h, c.num_labels, false)?
        } else {
            new_head(h, c.num_labels, false, 0x5C0E, device)
        })
    } else {
        None
    };
    let value_head = if heads.value {
        Some(if l.src.contains("v_head.summary.weight") {
            l.linear("v_head.summary", h, 1, true)?
        } else {
            new_head(h, 1, true, 0x7A1E, device)
        })
    } else {
        None
    };
    let inv_freq = rope_inv_freq(c).map(|v| {
        let n = v.len();
        Tensor::from_data(TensorData::new(v, [n]), device)
    });
    Ok(Transformer {
        embed_tokens,
        position_embeddings,
        layers,
        norm,
        lm_head,
        score,
        value_head,
        inv_freq,
        config: c.clone(),
    })
}

fn to_host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<HostTensor> {
    let shape = t.dims().to_vec();
    let data =
        t.into_data().convert::<f32>().to_vec::<f32>().map_err(|e| ModelError::tensor("<export>", format!("{e:?}")))?;
    Ok(HostTensor::new(shape, data))
}

/// A projection's base weight on the host, `[in, out]` (a packed one dequantised).
fn proj_weight<B: Backend>(p: &Proj<B>) -> Result<HostTensor> {
    match (&p.linear, &p.packed) {
        (Some(l), _) => to_host(l.weight.val()),
        (None, Some(packed)) => {
            let [out, d_in] = packed.weight.0.shape();
            Ok(HostTensor::new(vec![out, d_in], packed.weight.0.dequantize()).transposed())
        }
        (None, None) => Err(ModelError::tensor("<export>", "a projection without a weight")),
    }
}

/// Every tensor of the network under its HF name, ready for `save_safetensors`.
/// Tied checkpoints omit `lm_head.weight`, as transformers does.
pub fn export<B: Backend>(model: &Transformer<B>, head: HfHead) -> Result<TensorMap> {
    let c = &model.config;
    let names = NameTable::of(c.architecture);
    let gpt2 = c.architecture == Architecture::Gpt2;
    let mut out = TensorMap::default();
    let mut put = |name: String, t: HostTensor| {
        out.0.insert(name, t);
    };
    let linear = |put: &mut dyn FnMut(String, HostTensor), name: &str, l: &Linear<B>, transpose: bool| -> Result<()> {
        let w = to_host(l.weight.val())?;
        put(format!("{name}.weight"), if transpose { w.transposed() } else { w });
        if let Some(b) = &l.bias {
            put(format!("{name}.bias"), to_host(b.val())?);
        }
        Ok(())
    };
    // A block projection (a packed base is written dequantised).
    let proj = |put: &mut dyn FnMut(String, HostTensor), name: &str, p: &Proj<B>, transpose: bool| -> Result<()> {
        let w = proj_weight(p)?;
        put(format!("{name}.weight"), if transpose { w.transposed() } else { w });
        if let Some(b) = p.bias() {
            put(format!("{name}.bias"), to_host(b.val())?);
        }
        Ok(())
    };
    let norm = |put: &mut dyn FnMut(String, HostTensor), name: &str, n: &Norm<B>| -> Result<()> {
        put(format!("{name}.weight"), to_host(n.weight.val())?);
        if let Some(b) = &n.bias {
            put(format!("{name}.bias"), to_host(b.val())?);
        }
        Ok(())
    };

    put(format!("{}.weight", names.trunk(names.embed.0)), to_host(model.embed_tokens.val())?);
    if let (Some(wpe), Some((name, _))) = (&model.position_embeddings, names.position_embed) {
        put(format!("{}.weight", names.trunk(name)), to_host(wpe.val())?);
    }
    for (i, layer) in model.layers.iter().enumerate() {
        let a = &layer.self_attn;
        let at = |part| names.block(i, part);
        norm(&mut put, &at(BlockPart::InputNorm), &layer.input_layernorm)?;
        norm(&mut put, &at(BlockPart::PostAttentionNorm), &layer.post_attention_layernorm)?;
        // HF Linear weights are [out, in]; GPT-2's Conv1D keeps [in, out] as Burn does.
        let qkv = [
            (BlockPart::Qkv, &a.qkv_proj),
            (BlockPart::Q, &a.q_proj),
            (BlockPart::K, &a.k_proj),
            (BlockPart::V, &a.v_proj),
        ];
        for (part, p) in qkv {
            if let Some(p) = p {
                proj(&mut put, &at(part), p, !gpt2)?;
            }
        }
        for (part, n) in [(BlockPart::QNorm, &a.q_norm), (BlockPart::KNorm, &a.k_norm)] {
            if let Some(n) = n {
                norm(&mut put, &at(part), n)?;
            }
        }
        if let Some(g) = &layer.mlp.gate_proj {
            proj(&mut put, &at(BlockPart::Gate), g, !gpt2)?;
        }
        proj(&mut put, &at(BlockPart::O), &a.o_proj, !gpt2)?;
        proj(&mut put, &at(BlockPart::Up), &layer.mlp.up_proj, !gpt2)?;
        proj(&mut put, &at(BlockPart::Down), &layer.mlp.down_proj, !gpt2)?;
    }
    norm(&mut put, &names.trunk(names.final_norm.0), &model.norm)?;
    match head {
        HfHead::CausalLm => {
            if let Some(lm) = &model.lm_head {
                linear(&mut put, "lm_head", lm, true)?;
            }
            if let Some(v) = &model.value_head {
                linear(&mut put, "v_head.summary", v, true)?;
            }
        }
        HfHead::SequenceClassification => {
            let score = model
                .score
                .as_ref()
                .ok_or_else(|| ModelError::tensor("score.weight", "the model was built without a score head"))?;
            linear(&mut put, "score", score, true)?;
        }
    }
    Ok(out)
}

/// The weights of a model that has not been trained yet, as transformers' `_init_weights`
/// makes them for a Llama: matrices and embeddings N(0, std²), norms one, biases zero.
/// Each tensor draws from its own stream (the seed mixed with its name), so a tensor does
/// not depend on the order the model asks for them.
#[derive(Debug, Clone, Copy)]
pub struct RandomInit {
    /// transformers' `initializer_range` (0.02 for most configs).
    pub std: f64,
    pub seed: u64,
}

impl WeightSource for RandomInit {
    fn contains(&self, _name: &str) -> bool {
        false
    }

    fn load(&mut self, name: &str) -> Result<HostTensor> {
        Err(ModelError::tensor(name, "a random initialisation needs the tensor's shape"))
    }

    fn load_shaped(&mut self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let n: usize = shape.iter().product();
        let is_norm = name.contains("norm") || name.contains(".ln_") || name.ends_with("ln_f.weight");
        let data = if name.ends_with(".bias") {
            vec![0.0; n]
        } else if is_norm && shape.len() == 1 {
            vec![1.0; n]
        } else {
            // FNV-1a of the name, mixed with the seed.
            let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
            let mut rng = crate::rng::SplitMix64::new(h ^ self.seed);
            (0..n).map(|_| (self.std * rng.normal()) as f32).collect()
        };
        Ok(HostTensor::new(shape.to_vec(), data))
    }

    fn names(&self) -> Vec<String> {
        vec![]
    }

    fn is_generated(&self) -> bool {
        true
    }
}

/// A freshly initialised model of `config` (the built-in demo's starting point).
pub fn init_random<B: Backend>(
    config: &ModelConfig,
    heads: Heads,
    std: f64,
    seed: u64,
    device: &B::Device,
) -> Result<Transformer<B>> {
    config.validate()?;
    // A random init allocates what the config says: refuse what cannot fit in memory
    // rather than aborting part-way.
    let bytes = config.parameter_count().and_then(|n| n.checked_mul(4));
    if let (Some(total), Some(need)) = (physical_memory(), bytes) {
        if need > total {
            return Err(ModelError::config(format!(
                "the config's {} parameters need {:.1} GiB in f32, more than this machine's {:.1} GiB",
                need / 4,
                need as f64 / (1u64 << 30) as f64,
                total as f64 / (1u64 << 30) as f64
            )));
        }
    } else if bytes.is_none() {
        return Err(ModelError::config("the config's parameter count overflows: check its sizes"));
    }
    build(config, &mut RandomInit { std, seed }, heads, device)
}

/// Physical memory in bytes (Linux's /proc/meminfo), if known.
fn physical_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 =
        text.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    kib.checked_mul(1024)
}
