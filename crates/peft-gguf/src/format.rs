//! The GGUF container (version 3), as ggml's `gguf.cpp` reads it: a header, typed metadata, the
//! tensor table, then the tensor data, each piece aligned to `general.alignment` (32 bytes unless
//! the file says otherwise). Little-endian throughout.
//!
//! [`GgufWriter`] streams: the header and the tensor table are written from sizes known up front,
//! then each tensor's bytes as they are produced, so only one tensor is in memory at a time.
//! [`GgufFile`] parses a whole file held in memory with every length and offset checked against
//! the bytes that are there.

use std::io::Write;
use std::path::{Path, PathBuf};

use peft_tensors::FileBytes;

use crate::error::{GgufError, Result};
pub use crate::quant::GgmlType;

/// `GGUF`, the file's first four bytes.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// The container version written (and the only one read).
pub const VERSION: u32 = 3;
/// The data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// The type tag of a metadata value (`enum gguf_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    /// `u8`.
    U8 = 0,
    /// `i8`.
    I8 = 1,
    /// `u16`.
    U16 = 2,
    /// `i16`.
    I16 = 3,
    /// `u32`.
    U32 = 4,
    /// `i32`.
    I32 = 5,
    /// `f32`.
    F32 = 6,
    /// One byte, 0 or 1.
    Bool = 7,
    /// A `u64` length and UTF-8 bytes.
    String = 8,
    /// An element type, a `u64` count and the elements.
    Array = 9,
    /// `u64`.
    U64 = 10,
    /// `i64`.
    I64 = 11,
    /// `f64`.
    F64 = 12,
}

impl ValueType {
    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::U8,
            1 => Self::I8,
            2 => Self::U16,
            3 => Self::I16,
            4 => Self::U32,
            5 => Self::I32,
            6 => Self::F32,
            7 => Self::Bool,
            8 => Self::String,
            9 => Self::Array,
            10 => Self::U64,
            11 => Self::I64,
            12 => Self::F64,
            _ => return None,
        })
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `u8`.
    U8(u8),
    /// `i8`.
    I8(i8),
    /// `u16`.
    U16(u16),
    /// `i16`.
    I16(i16),
    /// `u32`.
    U32(u32),
    /// `i32`.
    I32(i32),
    /// `f32`.
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// A string.
    String(String),
    /// A homogeneous array: the element type and the elements (none of them arrays).
    Array(ValueType, Vec<Value>),
    /// `u64`.
    U64(u64),
    /// `i64`.
    I64(i64),
    /// `f64`.
    F64(f64),
}

impl Value {
    /// The value's type tag.
    pub fn value_type(&self) -> ValueType {
        match self {
            Self::U8(_) => ValueType::U8,
            Self::I8(_) => ValueType::I8,
            Self::U16(_) => ValueType::U16,
            Self::I16(_) => ValueType::I16,
            Self::U32(_) => ValueType::U32,
            Self::I32(_) => ValueType::I32,
            Self::F32(_) => ValueType::F32,
            Self::Bool(_) => ValueType::Bool,
            Self::String(_) => ValueType::String,
            Self::Array(..) => ValueType::Array,
            Self::U64(_) => ValueType::U64,
            Self::I64(_) => ValueType::I64,
            Self::F64(_) => ValueType::F64,
        }
    }

    /// An array of strings.
    pub fn strings<S: Into<String>>(items: impl IntoIterator<Item = S>) -> Self {
        Self::Array(
            ValueType::String,
            items.into_iter().map(|s| Self::String(s.into())).collect(),
        )
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The number as `u64`, if this is an unsigned or non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::U8(v) => out.push(*v),
            Self::I8(v) => out.extend(v.to_le_bytes()),
            Self::U16(v) => out.extend(v.to_le_bytes()),
            Self::I16(v) => out.extend(v.to_le_bytes()),
            Self::U32(v) => out.extend(v.to_le_bytes()),
            Self::I32(v) => out.extend(v.to_le_bytes()),
            Self::F32(v) => out.extend(v.to_le_bytes()),
            Self::Bool(v) => out.push(u8::from(*v)),
            Self::String(s) => encode_str(s, out),
            Self::Array(element, items) => {
                out.extend((*element as u32).to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for item in items {
                    item.encode(out);
                }
            }
            Self::U64(v) => out.extend(v.to_le_bytes()),
            Self::I64(v) => out.extend(v.to_le_bytes()),
            Self::F64(v) => out.extend(v.to_le_bytes()),
        }
    }
}

fn encode_str(s: &str, out: &mut Vec<u8>) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// One tensor of a GGUF file: its name, its dimensions in ggml's order (`ne[0]` the innermost,
/// the reverse of PyTorch's shape), its type and where its bytes start in the data section.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The GGUF tensor name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions, innermost first.
    pub dims: Vec<u64>,
    /// Storage type.
    pub ggml_type: GgmlType,
    /// Byte offset inside the data section (a multiple of the alignment).
    pub offset: u64,
}

impl TensorInfo {
    /// The shape in PyTorch's order (outermost first).
    pub fn torch_shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of values.
    pub fn numel(&self) -> usize {
        self.dims.iter().map(|&d| d as usize).product()
    }

    /// Bytes of data, or `None` where the innermost dimension does not split into blocks.
    pub fn byte_len(&self) -> Option<usize> {
        let row = self.dims.first().copied().unwrap_or(1) as usize;
        self.ggml_type.bytes_for(self.numel(), row)
    }
}

fn pad_to(len: u64, alignment: u64) -> u64 {
    len.div_ceil(alignment) * alignment
}

/// Writes a GGUF file to a temporary name beside the target and renames it into place once
/// every tensor is written, so a failed or interrupted export never leaves a partial file under
/// the target's name.
///
/// Add metadata with [`GgufWriter::add`], declare every tensor with [`GgufWriter::add_tensor`],
/// then call [`GgufWriter::write`] with a closure that produces each tensor's bytes in order.
#[derive(Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorInfo>,
    data_len: u64,
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a metadata key.
    pub fn add(&mut self, key: impl Into<String>, value: Value) {
        let key = key.into();
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key, value)),
        }
    }

    /// The metadata added so far, in order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// Declares a tensor of PyTorch shape `shape` stored as `ggml_type`.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        ggml_type: GgmlType,
    ) -> Result<()> {
        let name = name.into();
        let info = TensorInfo {
            dims: shape.iter().rev().map(|&d| d as u64).collect(),
            name,
            ggml_type,
            offset: self.data_len,
        };
        let len = info.byte_len().ok_or_else(|| {
            GgufError::tensor(
                &info.name,
                format!(
                    "rows of {} values do not split into {ggml_type:?} blocks of {}",
                    shape.last().copied().unwrap_or(1),
                    ggml_type.block_size()
                ),
            )
        })?;
        self.data_len = pad_to(self.data_len + len as u64, DEFAULT_ALIGNMENT);
        self.tensors.push(info);
        Ok(())
    }

    /// The tensors declared so far, in order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    fn header(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(MAGIC);
        out.extend(VERSION.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            encode_str(key, &mut out);
            out.extend((value.value_type() as u32).to_le_bytes());
            value.encode(&mut out);
        }
        for info in &self.tensors {
            encode_str(&info.name, &mut out);
            out.extend((info.dims.len() as u32).to_le_bytes());
            for d in &info.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(info.ggml_type.id().to_le_bytes());
            out.extend(info.offset.to_le_bytes());
        }
        let padded = pad_to(out.len() as u64, DEFAULT_ALIGNMENT) as usize;
        out.resize(padded, 0);
        out
    }

    /// Writes the file to `path`: the header, then `produce(index, info)` for each declared
    /// tensor in order, which must return exactly that tensor's bytes.
    pub fn write(
        &self,
        path: &Path,
        mut produce: impl FnMut(usize, &TensorInfo) -> Result<Vec<u8>>,
    ) -> Result<()> {
        let (_, tmp) = peft_tensors::staging_path(path);
        let result = (|| -> Result<()> {
            let file = std::fs::File::create(&tmp).map_err(|e| GgufError::io(&tmp, e))?;
            let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
            let io = |e| GgufError::io(&tmp, e);
            out.write_all(&self.header()).map_err(io)?;
            let mut written = 0u64;
            for (index, info) in self.tensors.iter().enumerate() {
                let bytes = produce(index, info)?;
                let expected = info.byte_len().unwrap_or(0);
                if bytes.len() != expected {
                    return Err(GgufError::tensor(
                        &info.name,
                        format!("produced {} bytes, declared {expected}", bytes.len()),
                    ));
                }
                out.write_all(&bytes).map_err(io)?;
                written += bytes.len() as u64;
                let padded = pad_to(written, DEFAULT_ALIGNMENT);
                out.write_all(&vec![0u8; (padded - written) as usize])
                    .map_err(io)?;
                written = padded;
            }
            let file = out.into_inner().map_err(|e| io(e.into_error()))?;
            file.sync_all().map_err(io)?;
            std::fs::rename(&tmp, path).map_err(|e| GgufError::io(path, e))?;
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// A parsed GGUF file: its metadata, tensor table and bytes.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    bytes: FileBytes,
    /// The metadata, in file order.
    pub metadata: Vec<(String, Value)>,
    /// The tensor table, in file order.
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl Cursor<'_> {
    fn malformed(&self, what: impl std::fmt::Display) -> GgufError {
        GgufError::Malformed {
            path: self.path.to_path_buf(),
            reason: format!("{what} at byte {}", self.pos),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&[u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| self.malformed(format!("{what}: {n} bytes past the end of the file")))?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items each at least `min_item_bytes` long: refused where the rest of the file
    /// could not hold them (a hostile count never reserves memory).
    fn count(&mut self, what: &str, min_item_bytes: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_item_bytes.max(1) as u64) > left {
            return Err(self.malformed(format!("{what} {n} exceeds what the file holds")));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.count(what, 1)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.malformed(format!("{what}: not UTF-8")))
    }

    fn value(&mut self, tag: ValueType, depth: usize) -> Result<Value> {
        Ok(match tag {
            ValueType::U8 => Value::U8(self.array::<1>("u8")?[0]),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array("i8")?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array("u16")?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array("i16")?)),
            ValueType::U32 => Value::U32(self.u32("u32")?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array("i32")?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array("f32")?)),
            ValueType::Bool => match self.array::<1>("bool")?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.malformed(format!("bool value {b}"))),
            },
            ValueType::String => Value::String(self.string("string")?),
            ValueType::U64 => Value::U64(self.u64("u64")?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array("i64")?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array("f64")?)),
            ValueType::Array => {
                if depth > 0 {
                    return Err(self.malformed("an array of arrays"));
                }
                let element = self.value_type("array element type")?;
                let min = match element {
                    ValueType::U8 | ValueType::I8 | ValueType::Bool => 1,
                    ValueType::U16 | ValueType::I16 => 2,
                    ValueType::U32 | ValueType::I32 | ValueType::F32 => 4,
                    _ => 8,
                };
                let n = self.count("array length", min)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(element, depth + 1)?);
                }
                Value::Array(element, items)
            }
        })
    }

    fn value_type(&mut self, what: &str) -> Result<ValueType> {
        let id = self.u32(what)?;
        ValueType::from_id(id).ok_or_else(|| self.malformed(format!("unknown {what} {id}")))
    }
}

impl GgufFile {
    /// Memory-maps and parses the file at `path` (the file must not change while it is open).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::parse_bytes(path.to_path_buf(), FileBytes::map(path)?)
    }

    /// Parses GGUF bytes; `path` names them in errors.
    pub fn parse(path: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self> {
        Self::parse_bytes(path.into(), FileBytes::Owned(bytes))
    }

    fn parse_bytes(path: PathBuf, bytes: FileBytes) -> Result<Self> {
        let (metadata, tensors, data_start) = {
            let mut c = Cursor {
                bytes: &bytes,
                pos: 0,
                path: &path,
            };
            if c.take(4, "magic")? != MAGIC {
                return Err(c.malformed("not a GGUF file (magic)"));
            }
            let version = c.u32("version")?;
            if version != VERSION {
                return Err(c.malformed(format!("version {version} (only 3 is read)")));
            }
            // A tensor entry is at least 8 (name length) + 4 + 4 + 8 bytes; a key/value 8 + 4.
            let n_tensors = c.count("tensor count", 24)?;
            let n_kv = c.count("metadata count", 12)?;
            let mut metadata = Vec::with_capacity(n_kv);
            // Names seen so far: ggml's reader refuses a repeated key or tensor name.
            let mut seen = std::collections::HashSet::new();
            for _ in 0..n_kv {
                let key = c.string("key")?;
                if !seen.insert(key.clone()) {
                    return Err(c.malformed(format!("duplicate key `{key}`")));
                }
                let tag = c.value_type("value type")?;
                let value = c.value(tag, 0)?;
                metadata.push((key, value));
            }
            let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
                Some((_, v)) => match v.as_u64() {
                    Some(a) if a > 0 && a.is_power_of_two() => a,
                    _ => return Err(c.malformed("general.alignment is not a power of two")),
                },
                None => DEFAULT_ALIGNMENT,
            };
            let mut tensors = Vec::with_capacity(n_tensors);
            seen.clear();
            for _ in 0..n_tensors {
                let name = c.string("tensor name")?;
                if !seen.insert(name.clone()) {
                    return Err(c.malformed(format!("duplicate tensor `{name}`")));
                }
                let n_dims = c.u32("dimension count")? as usize;
                if n_dims > 4 {
                    return Err(c.malformed(format!("tensor `{name}` has {n_dims} dimensions")));
                }
                let mut dims = Vec::with_capacity(n_dims);
                for _ in 0..n_dims {
                    dims.push(c.u64("dimension")?);
                }
                let type_id = c.u32("tensor type")?;
                let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
                    c.malformed(format!("tensor `{name}` has ggml type {type_id}, not read"))
                })?;
                let offset = c.u64("tensor offset")?;
                if !offset.is_multiple_of(alignment) {
                    return Err(c.malformed(format!("tensor `{name}` offset is not aligned")));
                }
                tensors.push(TensorInfo {
                    name,
                    dims,
                    ggml_type,
                    offset,
                });
            }
            let data_start = pad_to(c.pos as u64, alignment) as usize;
            let data_len = bytes.len().saturating_sub(data_start) as u64;
            for t in &tensors {
                let numel = t
                    .dims
                    .iter()
                    .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                    .filter(|&n| n <= data_len.saturating_mul(8))
                    .ok_or_else(|| c.malformed(format!("tensor `{}` is too large", t.name)))?;
                let len = t
                    .byte_len()
                    .ok_or_else(|| c.malformed(format!("tensor `{}` rows do not split", t.name)))?;
                if numel == 0 || t.offset.saturating_add(len as u64) > data_len {
                    return Err(c.malformed(format!(
                        "tensor `{}` ({len} bytes at {}) lies past the end of the data",
                        t.name, t.offset
                    )));
                }
            }
            (metadata, tensors, data_start)
        };
        Ok(Self {
            path,
            bytes,
            metadata,
            tensors,
            data_start,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// A tensor's table entry by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A tensor's stored bytes.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = self.data_start + info.offset as usize;
        let len = info.byte_len().unwrap_or(0);
        &self.bytes[start..start + len]
    }

    /// A tensor's values as `f32` (de-quantised), in PyTorch's row-major order.
    pub fn tensor_f32(&self, name: &str) -> Option<Vec<f32>> {
        let info = self.tensor(name)?;
        Some(crate::quant::decode(
            info.ggml_type,
            self.tensor_bytes(info),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_file_reads_back_key_for_key_and_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let mut w = GgufWriter::new();
        w.add("general.architecture", Value::String("llama".into()));
        w.add("llama.block_count", Value::U32(2));
        w.add("x.eps", Value::F32(1e-6));
        w.add("tokenizer.ggml.tokens", Value::strings(["a", "bc", "Ġd"]));
        w.add(
            "tokenizer.ggml.token_type",
            Value::Array(ValueType::I32, vec![Value::I32(1), Value::I32(3)]),
        );
        w.add("llama.block_count", Value::U32(3));
        w.add_tensor("a.weight", &[3, 2], GgmlType::F32).unwrap();
        w.add_tensor("b.weight", &[1, 32], GgmlType::Q8_0).unwrap();
        let data: Vec<Vec<u8>> = vec![
            (0..24u8).collect(),
            (0..34u8).map(|b| b.wrapping_mul(7)).collect(),
        ];
        w.write(&path, |i, _| Ok(data[i].clone())).unwrap();
        let file = GgufFile::open(&path).unwrap();
        assert_eq!(file.metadata, w.metadata());
        assert_eq!(file.get("llama.block_count"), Some(&Value::U32(3)));
        assert_eq!(file.tensors, w.tensors());
        assert_eq!(file.tensors[0].dims, vec![2, 3]);
        assert_eq!(file.tensors[1].offset, 32);
        assert_eq!(file.tensor_bytes(&file.tensors[1]), &data[1][..]);
        // No temporary file is left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_failing_producer_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let mut w = GgufWriter::new();
        w.add_tensor("a", &[4], GgmlType::F32).unwrap();
        let err = w.write(&path, |_, _| Ok(vec![0; 3])).unwrap_err();
        assert!(
            err.to_string().contains("produced 3 bytes, declared 16"),
            "{err}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn rows_that_do_not_split_into_blocks_are_refused() {
        let mut w = GgufWriter::new();
        let err = w.add_tensor("a", &[2, 48], GgmlType::Q8_0).unwrap_err();
        assert!(err.to_string().contains("rows of 48 values"), "{err}");
    }

    #[test]
    fn hostile_bytes_are_errors_not_panics() {
        let mut good = Vec::new();
        good.extend(MAGIC);
        good.extend(3u32.to_le_bytes());
        good.extend(0u64.to_le_bytes());
        good.extend(1u64.to_le_bytes());
        encode_str("k", &mut good);
        good.extend(9u32.to_le_bytes());
        good.extend(4u32.to_le_bytes());
        good.extend(u64::MAX.to_le_bytes());
        let err = GgufFile::parse("x", good).unwrap_err().to_string();
        assert!(err.contains("array length"), "{err}");
        let err = GgufFile::parse("x", b"GGML".to_vec())
            .unwrap_err()
            .to_string();
        assert!(err.contains("magic"), "{err}");
        for cut in 0..40 {
            let mut w = Vec::new();
            w.extend(MAGIC);
            w.extend(3u32.to_le_bytes());
            w.extend(1u64.to_le_bytes());
            w.extend(0u64.to_le_bytes());
            encode_str("t", &mut w);
            w.extend(1u32.to_le_bytes());
            w.extend(8u64.to_le_bytes());
            w.extend(0u32.to_le_bytes());
            w.extend(0u64.to_le_bytes());
            w.truncate(cut);
            assert!(GgufFile::parse("x", w).is_err());
        }
    }
}
