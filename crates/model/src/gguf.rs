//! GGUF (llama.cpp's single-file format), versions 2 and 3: metadata, tensor directory,
//! dequantisation of F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K and Q6_K to f32, and the map
//! from llama.cpp tensor names to Hugging Face ones (undoing the q/k row permutation that
//! llama.cpp's converter applies to Llama-architecture checkpoints).
//!
//! Every read is bounds-checked: a truncated or corrupt file is an error naming the file
//! and what was being read, never a panic.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use align_kernels::PackedMatrix;
use align_kernels::quant::GgmlBlock;
use half::{bf16, f16};
use memmap2::Mmap;

use crate::config::{Architecture, ModelConfig, RopeConfig, RopeScaling};
use crate::error::{ModelError, Result};
use crate::weights::{HostTensor, WeightSource};

/// A GGUF metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    pub fn as_u64(&self) -> Option<u64> {
        Some(match *self {
            MetaValue::U8(v) => v as u64,
            MetaValue::U16(v) => v as u64,
            MetaValue::U32(v) => v as u64,
            MetaValue::U64(v) => v,
            MetaValue::I8(v) if v >= 0 => v as u64,
            MetaValue::I16(v) if v >= 0 => v as u64,
            MetaValue::I32(v) if v >= 0 => v as u64,
            MetaValue::I64(v) if v >= 0 => v as u64,
            _ => return None,
        })
    }
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            MetaValue::I8(v) => v as i64,
            MetaValue::I16(v) => v as i64,
            MetaValue::I32(v) => v as i64,
            MetaValue::I64(v) => v,
            _ => return self.as_u64().and_then(|v| i64::try_from(v).ok()),
        })
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            MetaValue::Bool(b) => Some(*b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml tensor types this reader dequantises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q6K,
    BF16,
}

impl GgmlType {
    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// The quantised block type, for the types that have blocks.
    pub fn block_type(self) -> Option<GgmlBlock> {
        Some(match self {
            GgmlType::Q4_0 => GgmlBlock::Q4_0,
            GgmlType::Q4_1 => GgmlBlock::Q4_1,
            GgmlType::Q8_0 => GgmlBlock::Q8_0,
            GgmlType::Q4K => GgmlBlock::Q4K,
            GgmlType::Q6K => GgmlBlock::Q6K,
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => return None,
        })
    }

    /// (elements per block, bytes per block)
    fn block(self) -> (usize, usize) {
        match self.block_type() {
            Some(block) => block.size(),
            None if self == GgmlType::F32 => (1, 4),
            None => (1, 2), // F16, BF16
        }
    }
}

fn ggml_type_name(id: u32) -> &'static str {
    match id {
        6 => "Q5_0",
        7 => "Q5_1",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        13 => "Q5_K",
        15 => "Q8_K",
        16..=23 => "an IQ type",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        _ => "unknown",
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the fastest-varying (a PyTorch `[out, in]` matrix is `[in, out]`).
    pub dims: Vec<u64>,
    pub type_id: u32,
    /// Absolute offset of the data in the file.
    pub offset: usize,
}

impl GgufTensorInfo {
    /// Shape in PyTorch order (slowest first).
    pub fn torch_shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: BTreeMap<String, GgufTensorInfo>,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            ModelError::format(
                self.path,
                format!("truncated GGUF: {what} needs {n} bytes at offset {}, file has {}", self.pos, self.buf.len()),
            )
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }
    fn len(&mut self, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        // A length can never exceed what is left of the file: reject before allocating.
        if n > (self.buf.len() - self.pos) as u64 {
            return Err(ModelError::format(
                self.path,
                format!("corrupt GGUF: {what} claims length {n} at offset {}, beyond the end of the file", self.pos),
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| ModelError::format(self.path, format!("corrupt GGUF: {what} is not UTF-8")))
    }
    fn value(&mut self, type_id: u32, what: &str, depth: usize) -> Result<MetaValue> {
        Ok(match type_id {
            0 => MetaValue::U8(self.u8(what)?),
            1 => MetaValue::I8(self.u8(what)? as i8),
            2 => MetaValue::U16(self.u16(what)?),
            3 => MetaValue::I16(self.u16(what)? as i16),
            4 => MetaValue::U32(self.u32(what)?),
            5 => MetaValue::I32(self.u32(what)? as i32),
            6 => MetaValue::F32(f32::from_bits(self.u32(what)?)),
            7 => MetaValue::Bool(self.u8(what)? != 0),
            8 => MetaValue::String(self.string(what)?),
            9 if depth < 4 => {
                let item_type = self.u32(what)?;
                let n = self.len(what)?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(item_type, what, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64(what)?),
            11 => MetaValue::I64(self.u64(what)? as i64),
            12 => MetaValue::F64(f64::from_bits(self.u64(what)?)),
            t => {
                return Err(ModelError::format(
                    self.path,
                    format!("corrupt GGUF: {what} has unknown value type {t} at offset {}", self.pos),
                ));
            }
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: read-only map owned by `self`; see SafetensorsSource.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let mut r = Reader { buf: &mmap, pos: 0, path };
        if r.take(4, "magic")? != b"GGUF" {
            return Err(ModelError::format(path, "not a GGUF file (magic is not \"GGUF\")"));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(ModelError::format(path, format!("GGUF version {version} is not supported (2, 3)")));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(&format!("metadata key #{i}"))?;
            let t = r.u32(&format!("type of `{key}`"))?;
            let v = r.value(t, &format!("metadata `{key}`"), 0)?;
            metadata.insert(key, v);
        }
        let mut infos = Vec::new();
        for i in 0..n_tensors {
            let name = r.string(&format!("name of tensor #{i}"))?;
            let n_dims = r.u32(&format!("dims of `{name}`"))?;
            if n_dims == 0 || n_dims > 4 {
                return Err(ModelError::format(path, format!("corrupt GGUF: tensor `{name}` has {n_dims} dims")));
            }
            let dims = (0..n_dims).map(|_| r.u64(&format!("dims of `{name}`"))).collect::<Result<Vec<_>>>()?;
            let type_id = r.u32(&format!("type of `{name}`"))?;
            let offset = r.u64(&format!("offset of `{name}`"))?;
            infos.push((name, dims, type_id, offset));
        }
        let alignment = metadata.get("general.alignment").and_then(MetaValue::as_u64).unwrap_or(32) as usize;
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(ModelError::format(path, format!("corrupt GGUF: general.alignment = {alignment}")));
        }
        let data_start = r.pos.next_multiple_of(alignment);
        let mut tensors = BTreeMap::new();
        for (name, dims, type_id, offset) in infos {
            let offset = data_start
                .checked_add(offset as usize)
                .ok_or_else(|| ModelError::format(path, format!("corrupt GGUF: tensor `{name}` offset overflows")))?;
            let info = GgufTensorInfo { name: name.clone(), dims, type_id, offset };
            // Check the extent now so a truncated file fails at open, naming the tensor.
            if let Some(ty) = GgmlType::from_id(type_id) {
                let n = tensor_bytes(&info, ty).ok_or_else(|| {
                    ModelError::format(path, format!("corrupt GGUF: tensor `{name}` has an impossible size"))
                })?;
                if offset.checked_add(n).is_none_or(|end| end > mmap.len()) {
                    return Err(ModelError::format(
                        path,
                        format!(
                            "truncated GGUF: tensor `{name}` needs bytes {offset}..{} but the file has {}",
                            offset.saturating_add(n),
                            mmap.len()
                        ),
                    ));
                }
            }
            tensors.insert(name, info);
        }
        Ok(GgufFile { path: path.to_path_buf(), mmap, version, metadata, tensors })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// `general.architecture` (e.g. "llama", "qwen2").
    pub fn architecture(&self) -> Result<&str> {
        self.meta("general.architecture")
            .and_then(MetaValue::as_str)
            .ok_or_else(|| ModelError::format(&self.path, "metadata `general.architecture` missing"))
    }

    /// A tensor's quantised blocks as stored, with its PyTorch-order shape; `None` when it
    /// is absent or not block-quantised.
    pub fn blocks(&self, name: &str) -> Option<(GgmlBlock, Vec<usize>, &[u8])> {
        let info = self.tensors.get(name)?;
        let ty = GgmlType::from_id(info.type_id)?;
        let block = ty.block_type()?;
        let n_bytes = tensor_bytes(info, ty)?;
        Some((block, info.torch_shape(), &self.mmap[info.offset..info.offset + n_bytes]))
    }

    /// Dequantise a tensor by its GGUF name, in PyTorch shape order.
    pub fn dequantize(&self, name: &str) -> Result<HostTensor> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::format(&self.path, format!("tensor `{name}` not in the file")))?;
        let ty = GgmlType::from_id(info.type_id).ok_or_else(|| {
            ModelError::format(
                &self.path,
                format!(
                    "tensor `{name}`: ggml type {} ({}) is not supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)",
                    info.type_id,
                    ggml_type_name(info.type_id)
                ),
            )
        })?;
        let n_bytes = tensor_bytes(info, ty).expect("checked at open");
        let bytes = &self.mmap[info.offset..info.offset + n_bytes];
        let n: usize = info.dims.iter().map(|&d| d as usize).product();
        Ok(HostTensor::new(info.torch_shape(), dequantize(ty, bytes, n)))
    }
}

fn tensor_bytes(info: &GgufTensorInfo, ty: GgmlType) -> Option<usize> {
    let (block, bytes) = ty.block();
    let n = info.dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?))?;
    // Quantised rows are whole blocks.
    if !(info.dims[0] as usize).is_multiple_of(block) {
        return None;
    }
    (n / block).checked_mul(bytes)
}

/// Dequantise `n` elements of type `ty` from `bytes` (exactly the tensor's extent).
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    match ty {
        GgmlType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        GgmlType::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        GgmlType::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        _ => {
            let mut out = vec![0f32; n];
            if let Some(block) = ty.block_type() {
                block.dequantize(bytes, &mut out);
            }
            out
        }
    }
}

/// Read a `ModelConfig` from GGUF metadata (the `{arch}.*` keys).
pub fn config_from_gguf(g: &GgufFile) -> Result<ModelConfig> {
    let arch_name = g.architecture()?.to_string();
    let architecture = match arch_name.as_str() {
        "llama" => Architecture::Llama,
        "mistral" => Architecture::Mistral,
        "qwen2" => Architecture::Qwen2,
        "qwen3" => Architecture::Qwen3,
        "gpt2" => Architecture::Gpt2,
        other => {
            return Err(ModelError::format(
                g.path(),
                format!("general.architecture {other:?} is not supported (llama, mistral, qwen2, qwen3, gpt2)"),
            ));
        }
    };
    let key = |k: &str| format!("{arch_name}.{k}");
    let get_u = |k: &str| -> Result<usize> {
        g.meta(&key(k))
            .and_then(MetaValue::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| ModelError::format(g.path(), format!("metadata `{}` missing or not an integer", key(k))))
    };
    let opt_u = |k: &str| g.meta(&key(k)).and_then(MetaValue::as_u64).map(|v| v as usize);
    let opt_f = |k: &str| g.meta(&key(k)).and_then(MetaValue::as_f64);
    let hidden_size = get_u("embedding_length")?;
    let heads = get_u("attention.head_count")?;
    let kv_heads = opt_u("attention.head_count_kv").unwrap_or(heads);
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(ModelError::format(g.path(), format!("head counts {heads}/{kv_heads} are inconsistent")));
    }
    let head_dim = opt_u("attention.key_length").unwrap_or(hidden_size / heads);
    let vocab_size =
        match opt_u("vocab_size") {
            Some(v) => v,
            None => g.meta("tokenizer.ggml.tokens").and_then(MetaValue::as_array).map(<[MetaValue]>::len).ok_or_else(
                || ModelError::format(g.path(), "neither vocab_size nor tokenizer.ggml.tokens in metadata"),
            )?,
        };
    let is_gpt2 = architecture == Architecture::Gpt2;
    let rope = (!is_gpt2).then(|| {
        let scaling = match g.meta(&key("rope.scaling.type")).and_then(MetaValue::as_str) {
            Some("linear") => RopeScaling::Linear { factor: opt_f("rope.scaling.factor").unwrap_or(1.0) },
            _ => RopeScaling::Default,
        };
        RopeConfig { theta: opt_f("rope.freq_base").unwrap_or(10_000.0), scaling }
    });
    let token = |k: &str| g.meta(k).and_then(MetaValue::as_u64).map(|v| v as u32);
    let (attention_bias, attention_out_bias) = match architecture {
        Architecture::Qwen2 => (true, false),
        Architecture::Gpt2 => (true, true),
        _ => {
            let b = g.tensors.contains_key("blk.0.attn_q.bias");
            (b, g.tensors.contains_key("blk.0.attn_output.bias"))
        }
    };
    let c = ModelConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size: get_u("feed_forward_length")?,
        num_hidden_layers: get_u("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        max_position_embeddings: opt_u("context_length").unwrap_or(2048),
        norm_eps: if is_gpt2 {
            opt_f("attention.layer_norm_epsilon").unwrap_or(1e-5)
        } else {
            opt_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-6)
        },
        rope,
        tie_word_embeddings: !g.tensors.contains_key("output.weight"),
        attention_bias,
        attention_out_bias,
        mlp_bias: is_gpt2 || g.tensors.contains_key("blk.0.ffn_up.bias"),
        qk_norm: architecture == Architecture::Qwen3,
        hidden_act: if is_gpt2 { "gelu_new" } else { "silu" }.into(),
        dtype: None,
        bos_token_id: token("tokenizer.ggml.bos_token_id"),
        eos_token_ids: token("tokenizer.ggml.eos_token_id").into_iter().collect(),
        pad_token_id: token("tokenizer.ggml.padding_token_id"),
        num_labels: 1,
    };
    // Metadata is as untrusted as a config.json: the same checks, before any allocation.
    c.validate().map_err(|e| e.in_file(g.path()))?;
    Ok(c)
}

/// A GGUF file seen as a [`WeightSource`] with HF tensor names.
pub struct GgufSource {
    file: GgufFile,
    config: ModelConfig,
    /// HF name -> GGUF name
    names: BTreeMap<String, String>,
}

impl GgufSource {
    pub fn new(file: GgufFile, config: ModelConfig) -> Self {
        let names =
            file.tensors.keys().filter_map(|g| hf_name(g, config.architecture).map(|h| (h, g.clone()))).collect();
        GgufSource { file, config, names }
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// llama.cpp's converter permutes q/k rows only for the Llama-style RoPE ("NORM")
    /// architectures; Qwen uses NEOX-style RoPE and is stored as in HF.
    fn permuted_heads(&self, hf: &str) -> Option<usize> {
        if !matches!(self.config.architecture, Architecture::Llama | Architecture::Mistral) {
            return None;
        }
        if hf.ends_with("self_attn.q_proj.weight") || hf.ends_with("self_attn.q_proj.bias") {
            Some(self.config.num_attention_heads)
        } else if hf.ends_with("self_attn.k_proj.weight") || hf.ends_with("self_attn.k_proj.bias") {
            Some(self.config.num_key_value_heads)
        } else {
            None
        }
    }
}

/// llama.cpp name -> HF name, from the architecture's name table.
fn hf_name(gguf: &str, arch: Architecture) -> Option<String> {
    crate::names::NameTable::of(arch).hf_from_gguf(gguf)
}

/// Undo llama.cpp's `permute(w, n_head)`: it stores, within each head, the rows of the
/// first and second rotary halves interleaved (`reshape(h, 2, d/2, ..).swapaxes(1, 2)`).
fn unpermute_rows(t: &HostTensor, n_head: usize) -> HostTensor {
    let rows = t.shape[0];
    let width: usize = t.shape[1..].iter().product();
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut out = vec![0f32; t.data.len()];
    for h in 0..n_head {
        for i in 0..half {
            for s in 0..2 {
                let src = h * head_dim + i * 2 + s;
                let dst = h * head_dim + s * half + i;
                out[dst * width..(dst + 1) * width].copy_from_slice(&t.data[src * width..(src + 1) * width]);
            }
        }
    }
    HostTensor::new(t.shape.clone(), out)
}

impl WeightSource for GgufSource {
    fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    fn load(&mut self, name: &str) -> Result<HostTensor> {
        let g = self.names.get(name).ok_or_else(|| ModelError::tensor(name, "not in the GGUF file"))?;
        let t = self.file.dequantize(g)?;
        let t = match self.permuted_heads(name) {
            Some(n_head) => {
                check_heads(name, t.shape[0], n_head)?;
                unpermute_rows(&t, n_head)
            }
            None => t,
        };
        // GGUF stores GPT-2's Conv1D weights like nn.Linear ([out, in]); HF keeps Conv1D's [in, out].
        if self.config.architecture == Architecture::Gpt2 && t.shape.len() == 2 && name.contains(".h.") {
            return Ok(t.transposed());
        }
        Ok(t)
    }

    fn names(&self) -> Vec<String> {
        self.names.keys().cloned().collect()
    }

    fn load_packed(&mut self, name: &str, shape: &[usize; 2]) -> Option<Result<PackedMatrix>> {
        let g = self.names.get(name)?;
        let (block, torch_shape, bytes) = self.file.blocks(g)?;
        let bad = |what: String| ModelError::tensor(name, what);
        if torch_shape != shape {
            return Some(Err(bad(format!("expected shape {shape:?}, found {torch_shape:?}"))));
        }
        let packed = match PackedMatrix::from_ggml(block, shape[0], shape[1], bytes.to_vec()) {
            Ok(p) => p,
            Err(e) => return Some(Err(bad(e.to_string()))),
        };
        // llama.cpp permuted q/k rows; rows are whole blocks, so they are reordered as stored.
        Some(match self.permuted_heads(name) {
            Some(n_head) => check_heads(name, shape[0], n_head)
                .and_then(|()| packed.permute_rows(&unpermute_order(shape[0], n_head)).map_err(|e| bad(e.to_string()))),
            None => Ok(packed),
        })
    }
}

/// Heads must split the rows into even halves: checked before the per-head loops, which a
/// corrupt head count would otherwise run billions of times.
fn check_heads(name: &str, rows: usize, n_head: usize) -> Result<()> {
    if n_head == 0 || !rows.is_multiple_of(n_head) || !(rows / n_head).is_multiple_of(2) {
        return Err(ModelError::tensor(
            name,
            format!("{rows} rows do not split into {n_head} heads of even size (attention.head_count)"),
        ));
    }
    Ok(())
}

/// [`unpermute_rows`] as a row order: row `i` of the result is row `order[i]` of the file.
fn unpermute_order(rows: usize, n_head: usize) -> Vec<usize> {
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut order = vec![0; rows];
    for h in 0..n_head {
        for i in 0..half {
            for s in 0..2 {
                order[h * head_dim + s * half + i] = h * head_dim + i * 2 + s;
            }
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: reshape(n_head, 2, hd/2, w).swapaxes(1, 2)
        let (n_head, hd, w) = (2, 4, 3);
        let orig = HostTensor::new(vec![n_head * hd, w], (0..n_head * hd * w).map(|x| x as f32).collect());
        let mut permuted = vec![0f32; orig.data.len()];
        for h in 0..n_head {
            for s in 0..2 {
                for i in 0..hd / 2 {
                    let src = h * hd + s * (hd / 2) + i;
                    let dst = h * hd + i * 2 + s;
                    permuted[dst * w..(dst + 1) * w].copy_from_slice(&orig.data[src * w..(src + 1) * w]);
                }
            }
        }
        let back = unpermute_rows(&HostTensor::new(orig.shape.clone(), permuted), n_head);
        assert_eq!(back, orig);
    }

    #[test]
    fn q4_0_block() {
        let mut b = vec![0u8; 18];
        b[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b[2] = 0x9F; // low nibble 15 -> element 0, high nibble 9 -> element 16
        let v = dequantize(GgmlType::Q4_0, &b, 32);
        assert_eq!(v[0], 0.5 * 7.0);
        assert_eq!(v[16], 0.5 * 1.0);
        assert_eq!(v[1], 0.5 * -8.0);
    }

    #[test]
    fn bad_files_are_errors() {
        let dir = std::env::temp_dir().join(format!("align-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bad.gguf");
        std::fs::write(&p, b"GGUF\x03\x00\x00\x00\x01").unwrap();
        let e = GgufFile::open(&p).err().unwrap().to_string();
        assert!(e.contains("truncated") && e.contains("bad.gguf"), "{e}");
        std::fs::write(&p, b"GGML").unwrap();
        assert!(GgufFile::open(&p).err().unwrap().to_string().contains("magic"));
        // a string length far beyond the file
        let mut b = b"GGUF\x03\x00\x00\x00".to_vec();
        b.extend(0u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(u64::MAX.to_le_bytes());
        std::fs::write(&p, &b).unwrap();
        let e = GgufFile::open(&p).err().unwrap().to_string();
        assert!(e.contains("corrupt"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
