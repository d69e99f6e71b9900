//! Reading and writing safetensors files: single files, sharded checkpoints and atomic writes.
//!
//! Weights are held on the host as raw bytes and converted to `f32` on request: the models compute
//! in `f32`, and f16/bf16 checkpoints are widened exactly.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::error::{PeftError, Result};

/// A host tensor: shape plus little-endian bytes of one dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// The element type.
    pub dtype: Dtype,
    /// The shape, outermost dimension first (PyTorch order).
    pub shape: Vec<usize>,
    /// `numel · size_of(dtype)` bytes.
    pub data: Vec<u8>,
}

impl HostTensor {
    /// An `f32` tensor.
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Self {
        Self {
            dtype: Dtype::F32,
            shape,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// An `i64` tensor.
    pub fn from_i64(shape: Vec<usize>, values: &[i64]) -> Self {
        Self {
            dtype: Dtype::I64,
            shape,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

impl safetensors::View for &HostTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Converts raw little-endian bytes of a float dtype to `f32`.
///
/// Returns `None` for dtypes that are not floating point.
pub fn bytes_to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    let out = match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("chunks of 8")) as f32)
            .collect(),
        _ => return None,
    };
    Some(out)
}

/// Converts raw little-endian bytes of an integer dtype to `i64`.
pub fn bytes_to_i64(dtype: Dtype, bytes: &[u8]) -> Option<Vec<i64>> {
    let out = match dtype {
        Dtype::I64 => bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("chunks of 8")))
            .collect(),
        Dtype::I32 => bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
            .collect(),
        Dtype::U8 => bytes.iter().map(|&b| b as i64).collect(),
        _ => return None,
    };
    Some(out)
}

/// One or more safetensors files read into memory, addressed by tensor name.
///
/// A sharded checkpoint (`model.safetensors.index.json`) is read shard by shard; each key is
/// looked up in the shard the index names.
#[derive(Debug)]
pub struct TensorStore {
    files: Vec<(PathBuf, Vec<u8>)>,
    /// tensor name → (file index, dtype, shape, byte range inside that file's buffer)
    entries: BTreeMap<String, Entry>,
}

#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

impl TensorStore {
    /// Reads one safetensors file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let mut store = Self {
            files: Vec::new(),
            entries: BTreeMap::new(),
        };
        store.add_file(path.as_ref())?;
        Ok(store)
    }

    /// Parses safetensors bytes that are already in memory; `label` names them in errors.
    pub fn from_bytes(label: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self> {
        let mut store = Self {
            files: Vec::new(),
            entries: BTreeMap::new(),
        };
        store.add_bytes(label.into(), bytes)?;
        Ok(store)
    }

    /// Reads the weights of a Hugging Face model folder: `model.safetensors`, or the shards that
    /// `model.safetensors.index.json` lists.
    pub fn open_model_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Self::open(single);
        }
        let index_path = dir.join("model.safetensors.index.json");
        if !index_path.is_file() {
            return Err(PeftError::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors nor model.safetensors.index.json in the folder",
                ),
            ));
        }
        let text =
            std::fs::read_to_string(&index_path).map_err(|e| PeftError::io(&index_path, e))?;
        let index: ShardIndex =
            serde_json::from_str(&text).map_err(|e| PeftError::json(&index_path, e))?;
        let mut shards: Vec<&String> = index.weight_map.values().collect();
        shards.sort();
        shards.dedup();
        let mut store = Self {
            files: Vec::new(),
            entries: BTreeMap::new(),
        };
        for shard in shards {
            if shard.contains("..") || shard.contains('/') || shard.contains('\\') {
                return Err(PeftError::config(
                    index_path.display().to_string(),
                    "weight_map",
                    format!("shard name `{shard}` must be a file name inside the model folder"),
                ));
            }
            store.add_file(&dir.join(shard))?;
        }
        for (key, shard) in &index.weight_map {
            let entry = store.entries.get(key);
            let in_named_shard =
                entry.is_some_and(|e| store.files[e.file].0.file_name() == Some(shard.as_ref()));
            if !in_named_shard {
                return Err(PeftError::MissingTensor {
                    path: dir.join(shard),
                    key: key.clone(),
                });
            }
        }
        Ok(store)
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| PeftError::io(path, e))?;
        self.add_bytes(path.to_path_buf(), bytes)
    }

    fn add_bytes(&mut self, path: PathBuf, bytes: Vec<u8>) -> Result<()> {
        let file = self.files.len();
        let mut new_entries = Vec::new();
        {
            let parsed = SafeTensors::deserialize(&bytes).map_err(|e| PeftError::Safetensors {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            let base = bytes.as_ptr() as usize;
            for (name, view) in parsed.iter() {
                let data = view.data();
                let start = data.as_ptr() as usize - base;
                new_entries.push((
                    name.to_string(),
                    Entry {
                        file,
                        dtype: view.dtype(),
                        shape: view.shape().to_vec(),
                        start,
                        end: start + data.len(),
                    },
                ));
            }
        }
        self.files.push((path, bytes));
        self.entries.extend(new_entries);
        Ok(())
    }

    /// The path shown in errors: the single file, or the first shard's folder.
    pub fn label(&self) -> PathBuf {
        match self.files.as_slice() {
            [(path, _)] => path.clone(),
            [(path, _), ..] => path.parent().map(Path::to_path_buf).unwrap_or_default(),
            [] => PathBuf::new(),
        }
    }

    /// All tensor names, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    fn entry(&self, key: &str) -> Result<&Entry> {
        self.entries
            .get(key)
            .ok_or_else(|| PeftError::MissingTensor {
                path: self.label(),
                key: key.to_string(),
            })
    }

    /// The shape of a tensor.
    pub fn shape(&self, key: &str) -> Result<&[usize]> {
        Ok(&self.entry(key)?.shape)
    }

    /// The dtype of a tensor.
    pub fn dtype(&self, key: &str) -> Result<Dtype> {
        Ok(self.entry(key)?.dtype)
    }

    /// The raw tensor.
    pub fn get(&self, key: &str) -> Result<HostTensor> {
        let e = self.entry(key)?;
        Ok(HostTensor {
            dtype: e.dtype,
            shape: e.shape.clone(),
            data: self.files[e.file].1[e.start..e.end].to_vec(),
        })
    }

    /// A floating-point tensor widened to `f32`, with its shape.
    pub fn f32(&self, key: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let e = self.entry(key)?;
        let bytes = &self.files[e.file].1[e.start..e.end];
        let values = bytes_to_f32(e.dtype, bytes).ok_or_else(|| PeftError::UnsupportedDtype {
            path: self.files[e.file].0.clone(),
            key: key.to_string(),
            dtype: format!("{:?}", e.dtype),
        })?;
        Ok((values, e.shape.clone()))
    }

    /// A floating-point tensor that must have exactly `expected` as its shape.
    pub fn f32_shaped(&self, key: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let (values, shape) = self.f32(key)?;
        if shape != expected {
            return Err(PeftError::ShapeMismatch {
                path: self.files[self.entry(key)?.file].0.clone(),
                key: key.to_string(),
                expected: expected.to_vec(),
                found: shape,
            });
        }
        Ok(values)
    }

    /// An integer tensor widened to `i64`, with its shape.
    pub fn i64(&self, key: &str) -> Result<(Vec<i64>, Vec<usize>)> {
        let e = self.entry(key)?;
        let bytes = &self.files[e.file].1[e.start..e.end];
        let values = bytes_to_i64(e.dtype, bytes).ok_or_else(|| PeftError::UnsupportedDtype {
            path: self.files[e.file].0.clone(),
            key: key.to_string(),
            dtype: format!("{:?}", e.dtype),
        })?;
        Ok((values, e.shape.clone()))
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, fsync'd, then
/// renamed over the target, so that a crash never leaves a half-written file behind.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let path = path.as_ref();
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            // Persist the rename itself; not every platform allows fsync on a folder.
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        PeftError::io(path, e)
    })
}

/// Serialises named tensors to safetensors bytes (tensors sorted by name, as PyTorch does).
pub fn serialize(
    tensors: &BTreeMap<String, HostTensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), metadata).map_err(|e| {
        PeftError::Safetensors {
            path: PathBuf::from("<serialise>"),
            reason: e.to_string(),
        }
    })
}

/// Writes named tensors to a safetensors file atomically.
pub fn save_safetensors(
    path: impl AsRef<Path>,
    tensors: &BTreeMap<String, HostTensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let bytes = serialize(tensors, metadata)?;
    write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_f32_and_widens_half_types() {
        let dir = tempdir();
        let path = dir.join("t.safetensors");
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "a".to_string(),
            HostTensor::from_f32(vec![2, 2], &[1.0, -2.5, 3.25, 0.0]),
        );
        let halves: Vec<u8> = [1.5f32, -0.25]
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        tensors.insert(
            "h".to_string(),
            HostTensor {
                dtype: Dtype::F16,
                shape: vec![2],
                data: halves,
            },
        );
        let bf: Vec<u8> = [3.0f32, 1.0 / 128.0]
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        tensors.insert(
            "b".to_string(),
            HostTensor {
                dtype: Dtype::BF16,
                shape: vec![1, 2],
                data: bf,
            },
        );
        save_safetensors(&path, &tensors, None).unwrap();
        let store = TensorStore::open(&path).unwrap();
        assert_eq!(
            store.f32("a").unwrap(),
            (vec![1.0, -2.5, 3.25, 0.0], vec![2, 2])
        );
        assert_eq!(store.f32("h").unwrap().0, vec![1.5, -0.25]);
        assert_eq!(store.f32("b").unwrap().0, vec![3.0, 1.0 / 128.0]);
        assert_eq!(store.keys().collect::<Vec<_>>(), vec!["a", "b", "h"]);
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let dir = tempdir();
        let path = dir.join("t.safetensors");
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "w".to_string(),
            HostTensor::from_f32(vec![3], &[1.0, 2.0, 3.0]),
        );
        save_safetensors(&path, &tensors, None).unwrap();
        let store = TensorStore::open(&path).unwrap();
        let missing = store.f32("nope").unwrap_err().to_string();
        assert!(
            missing.contains("t.safetensors") && missing.contains("`nope`"),
            "{missing}"
        );
        let shape = store.f32_shaped("w", &[4]).unwrap_err().to_string();
        assert!(shape.contains("[3]") && shape.contains("[4]"), "{shape}");

        let bytes = std::fs::read(&path).unwrap();
        let truncated = dir.join("truncated.safetensors");
        std::fs::write(&truncated, &bytes[..bytes.len() - 3]).unwrap();
        let err = TensorStore::open(&truncated).unwrap_err().to_string();
        assert!(err.contains("truncated.safetensors"), "{err}");
        assert!(err.contains("invalid safetensors"), "{err}");
    }

    #[test]
    fn atomic_write_leaves_no_temporary_file() {
        let dir = tempdir();
        let path = dir.join("out.bin");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    fn tempdir() -> PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "peft-core-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
