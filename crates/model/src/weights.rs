//! Named host tensors in and out of Hugging Face safetensors files.
//!
//! A [`WeightSource`] hands out tensors by their HF name, converting to f32 one tensor at a
//! time, so a checkpoint is never held twice in memory.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::error::{ModelError, Result};

/// A dense f32 tensor on the host, row-major, with a PyTorch-order shape.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        HostTensor { shape, data }
    }

    /// Transpose a 2-D tensor (HF `[out, in]` <-> Burn `[in, out]`).
    pub fn transposed(&self) -> HostTensor {
        let [r, c] = [self.shape[0], self.shape[1]];
        let mut out = vec![0f32; r * c];
        for i in 0..r {
            for j in 0..c {
                out[j * r + i] = self.data[i * c + j];
            }
        }
        HostTensor::new(vec![c, r], out)
    }

    fn le_bytes(&self) -> Vec<u8> {
        self.data.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
}

/// Where a model's tensors come from, addressed by HF tensor name.
pub trait WeightSource {
    /// Whether the checkpoint has a tensor of this name.
    fn contains(&self, name: &str) -> bool;
    /// The tensor, converted to f32.
    fn load(&mut self, name: &str) -> Result<HostTensor>;
    /// Every tensor name, sorted.
    fn names(&self) -> Vec<String>;
    /// A source that makes tensors up (a random initialisation) rather than reading them:
    /// nothing to check against.
    fn is_generated(&self) -> bool {
        false
    }
    /// The tensor in the file's own quantised blocks, `[out, in]` = `shape`, where the file
    /// stores it so (GGUF's block types); `None` for a dense tensor.
    fn load_packed(&mut self, _name: &str, _shape: &[usize; 2]) -> Option<Result<align_kernels::PackedMatrix>> {
        None
    }

    /// Load a tensor and check its shape.
    fn load_shaped(&mut self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let t = self.load(name)?;
        if t.shape != shape {
            return Err(ModelError::tensor(name, format!("expected shape {shape:?}, found {:?}", t.shape)));
        }
        Ok(t)
    }
}

/// An in-memory set of tensors (what `save_safetensors` writes, what tests build).
#[derive(Debug, Default, Clone)]
pub struct TensorMap(pub BTreeMap<String, HostTensor>);

impl WeightSource for TensorMap {
    fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
    fn load(&mut self, name: &str) -> Result<HostTensor> {
        self.0.get(name).cloned().ok_or_else(|| ModelError::tensor(name, "not in the checkpoint"))
    }
    fn names(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }
}

/// One or more memory-mapped safetensors files (a single `model.safetensors`, or the
/// shards named by `model.safetensors.index.json`).
pub struct SafetensorsSource {
    files: Vec<(PathBuf, Mmap)>,
    /// tensor name -> index into `files`
    index: HashMap<String, usize>,
}

impl SafetensorsSource {
    /// Open a checkpoint directory: `model.safetensors`, or the sharded index.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.exists() {
            Self::open_files(&[single])
        } else if index.exists() {
            Self::open_index(&index)
        } else {
            Err(ModelError::format(dir, "no model.safetensors or model.safetensors.index.json"))
        }
    }

    /// Open a sharded checkpoint from its `model.safetensors.index.json`.
    pub fn open_index(index_path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index_path).map_err(|e| ModelError::io(index_path, e))?;
        let json: Value =
            serde_json::from_str(&text).map_err(|e| ModelError::format(index_path, format!("invalid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| ModelError::format(index_path, "field `weight_map`: missing or not an object"))?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut shards: Vec<String> = Vec::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| {
                ModelError::format(index_path, format!("field `weight_map.{name}`: expected a file name"))
            })?;
            if !shards.iter().any(|s| s == file) {
                shards.push(file.to_string());
            }
        }
        shards.sort();
        let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
        let source = Self::open_files(&paths)?;
        for name in map.keys() {
            if !source.index.contains_key(name) {
                return Err(ModelError::format(
                    index_path,
                    format!("tensor `{name}` is listed in weight_map but absent from its shard"),
                ));
            }
        }
        Ok(source)
    }

    /// Open explicit safetensors files; a tensor name may appear in only one of them.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
            // SAFETY: the map is read-only and lives as long as `self`; a checkpoint file
            // changed underneath a running process is outside what we defend against.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
            let st = SafeTensors::deserialize(&mmap)
                .map_err(|e| ModelError::format(path, format!("not a valid safetensors file: {e}")))?;
            for name in st.names() {
                if index.insert(name.to_string(), i).is_some() {
                    return Err(ModelError::format(path, format!("tensor `{name}` appears in two shards")));
                }
            }
            files.push((path.clone(), mmap));
        }
        Ok(SafetensorsSource { files, index })
    }
}

impl WeightSource for SafetensorsSource {
    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn load(&mut self, name: &str) -> Result<HostTensor> {
        let &i = self.index.get(name).ok_or_else(|| ModelError::tensor(name, "not in the checkpoint"))?;
        let (path, mmap) = &self.files[i];
        let st = SafeTensors::deserialize(mmap)
            .map_err(|e| ModelError::format(path, format!("not a valid safetensors file: {e}")))?;
        let view = st.tensor(name).map_err(|e| ModelError::format(path, format!("tensor `{name}`: {e}")))?;
        let bytes = view.data();
        let data = match view.dtype() {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::F64 => {
                bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8-byte chunk")) as f32).collect()
            }
            other => {
                return Err(ModelError::format(
                    path,
                    format!("tensor `{name}`: dtype {other:?} is not supported (F32, F16, BF16, F64)"),
                ));
            }
        };
        Ok(HostTensor::new(view.shape().to_vec(), data))
    }

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.index.keys().cloned().collect();
        v.sort();
        v
    }
}

struct F32View<'a> {
    shape: &'a [usize],
    bytes: Vec<u8>,
}

impl safetensors::View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Write tensors as one f32 safetensors file with `{"format": "pt"}` metadata (what
/// transformers expects), atomically: a temporary file renamed into place.
pub fn save_safetensors(tensors: &TensorMap, path: &Path) -> Result<()> {
    let views: Vec<(String, F32View)> =
        tensors.0.iter().map(|(n, t)| (n.clone(), F32View { shape: &t.shape, bytes: t.le_bytes() })).collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let tmp = tmp_path(path);
    safetensors::serialize_to_file(views, Some(meta), &tmp)
        .map_err(|e| ModelError::format(&tmp, format!("writing safetensors: {e}")))?;
    // safetensors creates its file 0600; weights are shared like every other file we write.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).map_err(|e| ModelError::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
}

/// Write a text file atomically.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    std::fs::write(&tmp, contents).map_err(|e| ModelError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}
