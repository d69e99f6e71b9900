//! Reading and writing safetensors files: single files, sharded checkpoints and atomic writes.
//!
//! Checkpoint files are memory-mapped, not read: a tensor's bytes are touched only when it is
//! converted, and the pages of a tensor already converted are handed back to the kernel
//! ([`TensorStore::release`]), so loading a model never holds the file and the model at once —
//! the peak is the loaded model plus about one tensor. Values are converted to `f32` on request
//! (f16/bf16 widen exactly) or read as stored ([`TensorStore::raw`]).

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

    /// The values of an `f32` tensor ([`Self::from_f32`]'s inverse); `None` for another dtype.
    pub fn f32_values(&self) -> Option<Vec<f32>> {
        (self.dtype == Dtype::F32).then(|| {
            self.data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        })
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

/// The bytes of one file read as a whole (a safetensors checkpoint, a GGUF file): mapped from
/// disk (shared, so that a tensor's bytes can outlive the store: [`TensorStore::mapped`]), or
/// owned (parsed from memory).
#[derive(Debug)]
pub enum FileBytes {
    /// A read-only memory map of the file.
    Mapped(std::sync::Arc<memmap2::Mmap>),
    /// Bytes in memory (an empty file, or bytes that never were a file).
    Owned(Vec<u8>),
}

/// One tensor's bytes inside a memory-mapped checkpoint file, kept mapped for as long as this
/// handle lives (the file's mapping is shared and reference-counted): a frozen weight read as
/// stored with no copy, as safetensors' zero-copy load does. The file must not be modified while
/// a handle lives.
#[derive(Debug, Clone)]
pub struct MappedBytes {
    map: std::sync::Arc<memmap2::Mmap>,
    start: usize,
    end: usize,
}

impl MappedBytes {
    /// The tensor's bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.map[self.start..self.end]
    }
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(map) => map,
            FileBytes::Owned(bytes) => bytes,
        }
    }
}

impl FileBytes {
    /// Memory-maps the file at `path` read-only (an empty file, which cannot be mapped, as empty
    /// bytes). The file must not change while the bytes are in use, as for every memory-mapped
    /// checkpoint reader.
    pub fn map(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| PeftError::io(path, e))?;
        if file.metadata().map_err(|e| PeftError::io(path, e))?.len() == 0 {
            return Ok(FileBytes::Owned(Vec::new()));
        }
        // SAFETY: the map is read-only; the caller does not change the file while it is in use
        // (documented above and on `TensorStore`).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| PeftError::io(path, e))?;
        Ok(FileBytes::Mapped(std::sync::Arc::new(map)))
    }

    /// Gives the resident pages of `start..end` back to the kernel (mapped files only). The
    /// mapping is read-only and file-backed, so a later read faults the same bytes back in.
    fn release(&self, start: usize, end: usize) {
        #[cfg(unix)]
        if let FileBytes::Mapped(map) = self
            && end > start
        {
            // SAFETY: a read-only shared file mapping: MADV_DONTNEED drops resident pages
            // without changing what the bytes read as (no slice of them is being written).
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
            };
        }
        #[cfg(not(unix))]
        let _ = (start, end);
    }
}

/// One or more safetensors files, memory-mapped and addressed by tensor name.
///
/// A sharded checkpoint (`model.safetensors.index.json`) is mapped shard by shard; each key is
/// looked up in the shard the index names. The files must not be modified while the store is
/// open (as with any memory-mapped checkpoint, e.g. safetensors' `safe_open`).
#[derive(Debug)]
pub struct TensorStore {
    files: Vec<(PathBuf, FileBytes)>,
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
    /// Opens (memory-maps) one safetensors file.
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
        store.add_bytes(label.into(), FileBytes::Owned(bytes))?;
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
        // An empty file is read as empty bytes: an invalid safetensors file, said by the parser.
        self.add_bytes(path.to_path_buf(), FileBytes::map(path)?)
    }

    fn add_bytes(&mut self, path: PathBuf, bytes: FileBytes) -> Result<()> {
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

    /// The raw tensor (a copy of its bytes; the mapped pages are released after copying).
    pub fn get(&self, key: &str) -> Result<HostTensor> {
        let e = self.entry(key)?;
        let tensor = HostTensor {
            dtype: e.dtype,
            shape: e.shape.clone(),
            data: self.files[e.file].1[e.start..e.end].to_vec(),
        };
        self.release(key);
        Ok(tensor)
    }

    /// The stored little-endian bytes of a tensor, its dtype and shape, without copying. Call
    /// [`release`](Self::release) once they are converted, so that their pages do not stay
    /// resident.
    pub fn raw(&self, key: &str) -> Result<(&[u8], Dtype, &[usize])> {
        let e = self.entry(key)?;
        Ok((&self.files[e.file].1[e.start..e.end], e.dtype, &e.shape))
    }

    /// A tensor's bytes as a handle that keeps them mapped after the store is dropped, for a
    /// tensor used as stored (a frozen bf16 weight); `None` for stores parsed from memory. The
    /// kernel is asked to read the bytes ahead (`MADV_WILLNEED`), so that loading returns at once
    /// and the first products do not wait for the disk page by page.
    pub fn mapped(&self, key: &str) -> Result<Option<MappedBytes>> {
        let e = self.entry(key)?;
        Ok(match &self.files[e.file].1 {
            FileBytes::Mapped(map) => Some(MappedBytes {
                map: {
                    #[cfg(unix)]
                    let _ = map.advise_range(memmap2::Advice::WillNeed, e.start, e.end - e.start);
                    map.clone()
                },
                start: e.start,
                end: e.end,
            }),
            FileBytes::Owned(_) => None,
        })
    }

    /// Hands the resident pages of a tensor's bytes back to the kernel (a no-op for stores
    /// parsed from memory and for unknown keys). Reading the tensor again reads the file again.
    pub fn release(&self, key: &str) {
        if let Some(e) = self.entries.get(key) {
            self.files[e.file].1.release(e.start, e.end);
        }
    }

    /// A floating-point tensor widened to `f32`, with its shape (its mapped pages released).
    pub fn f32(&self, key: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let e = self.entry(key)?;
        let bytes = &self.files[e.file].1[e.start..e.end];
        let values = bytes_to_f32(e.dtype, bytes).ok_or_else(|| PeftError::UnsupportedDtype {
            path: self.files[e.file].0.clone(),
            key: key.to_string(),
            dtype: format!("{:?}", e.dtype),
        })?;
        self.release(key);
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
        self.release(key);
        Ok((values, e.shape.clone()))
    }
}

/// The folder of `path` and a temporary name beside it (`.<name>.tmp-<pid>`) to write to
/// before renaming over `path`: same folder, so the rename is atomic.
pub fn staging_path(path: &Path) -> (PathBuf, PathBuf) {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    (dir, tmp)
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, fsync'd, then
/// renamed over the target, so that a crash never leaves a half-written file behind.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let path = path.as_ref();
    let (dir, tmp) = staging_path(path);
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

/// Puts the complete folder `staged` at `target`, replacing a folder already there without a
/// moment in which `target` is missing or half-written: on Linux the two are exchanged in one
/// `renameat2(RENAME_EXCHANGE)` and the old folder (now at `staged`) is removed; elsewhere, or
/// where the file system cannot exchange, the old folder is first moved aside, so a crash leaves
/// it whole under `.{name}.old-{pid}` beside the new one.
pub fn replace_dir(staged: &Path, target: &Path) -> Result<()> {
    let result = (|| {
        if !target.exists() {
            return std::fs::rename(staged, target);
        }
        #[cfg(target_os = "linux")]
        if exchange(staged, target)? {
            return std::fs::remove_dir_all(staged);
        }
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let aside = target.with_file_name(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(target, &aside)?;
        std::fs::rename(staged, target)?;
        std::fs::remove_dir_all(&aside)
    })();
    result.map_err(|e| PeftError::io(target, e))
}

/// Exchanges `a` and `b` atomically; `Ok(false)` where the file system does not support it.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call.
    let status = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if status == 0 {
        return Ok(true);
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => Ok(false),
        _ => Err(error),
    }
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

/// transformers' default `max_shard_size` for `save_pretrained` (5.x): `"50GB"`.
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 50_000_000_000;

/// Parses a shard size as transformers does (`"5GB"`, `"500MB"`, decimal units KB/MB/GB/TB) or a
/// plain number of bytes.
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let bad = || {
        PeftError::InvalidInput(format!(
            "size `{text}`: expected bytes or a number with KB, MB, GB or TB (e.g. 5GB)"
        ))
    };
    if let Ok(bytes) = t.parse::<u64>() {
        return Ok(bytes);
    }
    if t.len() < 3 || !t.is_char_boundary(t.len() - 2) {
        return Err(bad());
    }
    let (number, unit) = t.split_at(t.len() - 2);
    let multiplier = match unit.to_ascii_uppercase().as_str() {
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        _ => return Err(bad()),
    };
    let value: f64 = number.trim().parse().map_err(|_| bad())?;
    if !value.is_finite() || value <= 0.0 {
        return Err(bad());
    }
    Ok((value * multiplier) as u64)
}

/// Converts `f32` values to little-endian bytes of `dtype` (f32, f16 or bf16; half types round to
/// nearest, ties to even, as PyTorch's `.to()` does).
pub fn f32_to_bytes(dtype: Dtype, values: &[f32]) -> Result<Vec<u8>> {
    Ok(match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        other => {
            return Err(PeftError::InvalidInput(format!(
                "cannot write floating-point values as {other:?}"
            )));
        }
    })
}

/// A tensor of a checkpoint being written: its bytes are produced only when the writer reaches
/// it, so a whole model never sits in memory at once.
pub struct PendingTensor<'a> {
    /// The key.
    pub name: String,
    /// The dtype its bytes are in.
    pub dtype: Dtype,
    /// PyTorch-order shape.
    pub shape: Vec<usize>,
    /// Produces `numel · size_of(dtype)` little-endian bytes.
    pub bytes: Box<dyn Fn() -> Result<Vec<u8>> + 'a>,
}

impl PendingTensor<'_> {
    fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// A [`PendingTensor`] as safetensors' `View`: `data()` produces the bytes; a failure is kept
/// in `error` (the writer then discards the file).
struct LazyView<'t, 'a> {
    tensor: &'t PendingTensor<'a>,
    error: &'t std::cell::RefCell<Option<PeftError>>,
}

impl safetensors::View for LazyView<'_, '_> {
    fn dtype(&self) -> Dtype {
        self.tensor.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.tensor.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let expected = self.tensor.byte_len();
        let bytes = match (self.tensor.bytes)() {
            Ok(bytes) if bytes.len() == expected => bytes,
            Ok(bytes) => {
                self.error
                    .borrow_mut()
                    .get_or_insert(PeftError::InvalidInput(format!(
                        "tensor `{}`: {} bytes produced, {expected} expected",
                        self.tensor.name,
                        bytes.len()
                    )));
                vec![0; expected]
            }
            Err(e) => {
                self.error.borrow_mut().get_or_insert(e);
                vec![0; expected]
            }
        };
        std::borrow::Cow::Owned(bytes)
    }
    fn data_len(&self) -> usize {
        self.tensor.byte_len()
    }
}

/// Writes `tensors` into `dir` as transformers' `save_pretrained` lays them out: one
/// `model.safetensors` when they fit in `max_shard_size` bytes, else
/// `model-0000i-of-0000n.safetensors` shards (filled in the given order, a tensor larger than the
/// limit alone in its shard) plus `model.safetensors.index.json` (`metadata.total_size`,
/// `metadata.total_parameters`, `weight_map`). Tensors are produced and written one at a time;
/// each file is written to a temporary name and renamed into place. Returns the files written.
pub fn save_sharded(
    dir: &Path,
    tensors: &[PendingTensor<'_>],
    max_shard_size: u64,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<PathBuf>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_size = 0u64;
    for (i, tensor) in tensors.iter().enumerate() {
        let size = tensor.byte_len() as u64;
        if size > max_shard_size {
            shards.push(vec![i]);
            continue;
        }
        if current_size + size > max_shard_size && !current.is_empty() {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(i);
        current_size += size;
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    let count = shards.len();
    let names: Vec<String> = if count == 1 {
        vec!["model.safetensors".to_string()]
    } else {
        (1..=count)
            .map(|i| format!("model-{i:05}-of-{count:05}.safetensors"))
            .collect()
    };
    let mut written = Vec::new();
    for (shard, name) in shards.iter().zip(&names) {
        let path = dir.join(name);
        let error = std::cell::RefCell::new(None);
        let views = shard.iter().map(|&i| {
            (
                tensors[i].name.as_str(),
                LazyView {
                    tensor: &tensors[i],
                    error: &error,
                },
            )
        });
        let result = safetensors::serialize_to_file(views, metadata.clone(), &path);
        if let Some(e) = error.into_inner() {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        result.map_err(|e| match e {
            safetensors::SafeTensorError::IoError(io) => PeftError::io(&path, io),
            other => PeftError::Safetensors {
                path: path.clone(),
                reason: other.to_string(),
            },
        })?;
        // safetensors writes through a private temporary file (mode 0600): give the weights
        // the permissions of an ordinary file, as transformers' do.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644));
        }
        written.push(path);
    }
    if count > 1 {
        let mut weight_map = serde_json::Map::new();
        for (shard, name) in shards.iter().zip(&names) {
            for &i in shard {
                weight_map.insert(tensors[i].name.clone(), name.clone().into());
            }
        }
        let total_size: u64 = tensors.iter().map(|t| t.byte_len() as u64).sum();
        let total_parameters: u64 = tensors
            .iter()
            .map(|t| t.shape.iter().product::<usize>() as u64)
            .sum();
        let index = serde_json::json!({
            "metadata": {"total_parameters": total_parameters, "total_size": total_size},
            "weight_map": weight_map,
        });
        let path = dir.join("model.safetensors.index.json");
        let text = serde_json::to_string_pretty(&index).map_err(|e| PeftError::json(&path, e))?;
        write_atomic(&path, format!("{text}\n").as_bytes())?;
        written.push(path);
    }
    Ok(written)
}

/// Fills the folder `dir` through `fill` so that no reader ever sees it half-written: when `dir`
/// does not exist yet, `fill` writes into a temporary sibling folder that is renamed to `dir` at
/// the end (a failure removes it); when `dir` exists (a user's folder may hold other files), the
/// files are written into the temporary folder and then renamed one by one into `dir` (each file
/// whole), after which model weight files of an earlier save that the new one does not replace
/// (`model*.safetensors`, the index) are removed.
pub fn write_folder_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| PeftError::io(parent, e))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| PeftError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| PeftError::io(&tmp, e))?;
    // Errors name the files where they were going (`dir/...`), not the temporary folder.
    let rehome = |path: PathBuf| match path.strip_prefix(&tmp) {
        Ok(rest) => dir.join(rest),
        Err(_) => path,
    };
    let cleanup = |e: PeftError| {
        let _ = std::fs::remove_dir_all(&tmp);
        match e {
            PeftError::Io { path, error } => PeftError::Io {
                path: rehome(path),
                error,
            },
            PeftError::Safetensors { path, reason } => PeftError::Safetensors {
                path: rehome(path),
                reason,
            },
            other => other,
        }
    };
    fill(&tmp).map_err(cleanup)?;
    if !dir.exists() {
        std::fs::rename(&tmp, dir).map_err(|e| cleanup(PeftError::io(dir, e)))?;
    } else {
        let mut new_names = Vec::new();
        let entries = std::fs::read_dir(&tmp).map_err(|e| cleanup(PeftError::io(&tmp, e)))?;
        for entry in entries {
            let entry = entry.map_err(|e| cleanup(PeftError::io(&tmp, e)))?;
            let file_name = entry.file_name();
            let target = dir.join(&file_name);
            std::fs::rename(entry.path(), &target)
                .map_err(|e| cleanup(PeftError::io(&target, e)))?;
            new_names.push(file_name);
        }
        let _ = std::fs::remove_dir_all(&tmp);
        let stale = std::fs::read_dir(dir).map_err(|e| PeftError::io(dir, e))?;
        for entry in stale.flatten() {
            let file_name = entry.file_name();
            let text = file_name.to_string_lossy();
            let weights = text.starts_with("model")
                && (text.ends_with(".safetensors") || text == "model.safetensors.index.json");
            if weights && !new_names.contains(&file_name) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    if let Ok(d) = std::fs::File::open(parent) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `f32_values` gives back what `from_f32` stored, and nothing for another dtype.
    #[test]
    fn f32_values_invert_from_f32() {
        let values = [1.5f32, -0.0, f32::MAX, 3.25e-8];
        let t = HostTensor::from_f32(vec![2, 2], &values);
        assert_eq!(t.f32_values().unwrap(), values);
        assert_eq!(HostTensor::from_i64(vec![1], &[7]).f32_values(), None);
    }

    /// A folder replaced by `replace_dir` holds the new contents only, the staged folder is
    /// gone, nothing is left beside them; a target that does not exist is simply renamed to.
    #[test]
    fn replace_dir_swaps_in_the_new_folder() {
        let dir = tempdir();
        let target = dir.join("checkpoint-4");
        let staged = dir.join(".checkpoint-4.tmp");
        std::fs::create_dir_all(&staged).unwrap();
        std::fs::write(staged.join("a"), "first").unwrap();
        replace_dir(&staged, &target).unwrap();
        assert_eq!(std::fs::read_to_string(target.join("a")).unwrap(), "first");
        std::fs::create_dir_all(&staged).unwrap();
        std::fs::write(staged.join("b"), "second").unwrap();
        replace_dir(&staged, &target).unwrap();
        assert_eq!(std::fs::read_to_string(target.join("b")).unwrap(), "second");
        assert!(!target.join("a").exists());
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("checkpoint-4")]);
    }

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
