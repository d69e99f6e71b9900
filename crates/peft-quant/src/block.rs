//! Blockwise 4-bit quantisation (`bitsandbytes.functional.quantize_4bit` / `dequantize_4bit`).

use half::{bf16, f16};
use rayon::prelude::*;

use crate::codebook::{Codebook4, DynamicEncoder, dynamic_map};
use crate::error::{QuantError, Result};
use crate::torch_sum::torch_mean;

/// The 4-bit data type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantType {
    /// 4-bit NormalFloat.
    Nf4,
    /// 4-bit float (1 sign, 2 exponent, 1 mantissa bit).
    Fp4,
}

impl QuantType {
    /// `"nf4"` / `"fp4"`, as bitsandbytes spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// The code book.
    pub fn codebook(self) -> Codebook4 {
        match self {
            QuantType::Nf4 => Codebook4::nf4(),
            QuantType::Fp4 => Codebook4::fp4(),
        }
    }
}

impl std::str::FromStr for QuantType {
    type Err = QuantError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            other => Err(QuantError::UnknownQuantType(other.to_string())),
        }
    }
}

/// The dtype the weight had before quantisation; de-quantisation gives it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceDtype {
    /// `torch.float32`.
    F32,
    /// `torch.bfloat16`.
    Bf16,
    /// `torch.float16`.
    F16,
}

impl SourceDtype {
    /// The source dtype of a safetensors float dtype; `None` for any other dtype.
    pub fn from_safetensors(dtype: safetensors::Dtype) -> Option<Self> {
        match dtype {
            safetensors::Dtype::F32 => Some(SourceDtype::F32),
            safetensors::Dtype::BF16 => Some(SourceDtype::Bf16),
            safetensors::Dtype::F16 => Some(SourceDtype::F16),
            _ => None,
        }
    }

    /// The name bitsandbytes writes in the quant state (`str(dtype).strip("torch.")`).
    pub fn as_str(self) -> &'static str {
        match self {
            SourceDtype::F32 => "float32",
            SourceDtype::Bf16 => "bfloat16",
            SourceDtype::F16 => "float16",
        }
    }
}

impl std::str::FromStr for SourceDtype {
    type Err = QuantError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "float32" => Ok(SourceDtype::F32),
            "bfloat16" => Ok(SourceDtype::Bf16),
            "float16" => Ok(SourceDtype::F16),
            other => Err(QuantError::UnsupportedDtype(other.to_string())),
        }
    }
}

/// How to quantise: bitsandbytes' `quant_type`, `blocksize` and `compress_statistics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantConfig {
    /// NF4 or FP4.
    pub quant_type: QuantType,
    /// Elements sharing one absmax: a power of two from 32 to 4096 (bitsandbytes' default 64).
    pub blocksize: usize,
    /// Double quantisation: the absmax statistics themselves stored as 8-bit codes.
    pub double_quant: bool,
}

impl Default for QuantConfig {
    /// NF4, blocksize 64, double quantisation: the QLoRA paper's setting.
    fn default() -> Self {
        Self {
            quant_type: QuantType::Nf4,
            blocksize: 64,
            double_quant: true,
        }
    }
}

impl QuantConfig {
    /// Checks the block size.
    pub fn validate(&self) -> Result<()> {
        check_blocksize(self.blocksize)
    }
}

/// bitsandbytes accepts 32, 64, …, 4096.
pub fn check_blocksize(blocksize: usize) -> Result<()> {
    if blocksize.is_power_of_two() && (32..=4096).contains(&blocksize) {
        Ok(())
    } else {
        Err(QuantError::InvalidBlocksize(blocksize))
    }
}

/// Block size of the second-level (double) quantisation, fixed by bitsandbytes.
pub const NESTED_BLOCKSIZE: usize = 256;

/// The per-block scales of a 4-bit tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 per block.
    Plain(Vec<f32>),
    /// Double quantisation: `absmax[i] = map[codes[i]] · nested_absmax[i / 256] + offset`.
    Nested {
        /// 8-bit codes into the dynamic map, one per block.
        codes: Vec<u8>,
        /// One f32 scale per 256 blocks.
        nested_absmax: Vec<f32>,
        /// The mean absmax subtracted before quantising.
        offset: f32,
        /// The 256-entry map (`nested_quant_map`).
        map: Box<[f32; 256]>,
    },
}

impl Absmax {
    /// Number of blocks described.
    pub fn len(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len(),
            Absmax::Nested { codes, .. } => codes.len(),
        }
    }

    /// Whether there are no blocks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The f32 scale of block `b` (as [`to_f32`](Self::to_f32) computes it).
    pub fn at(&self, b: usize) -> f32 {
        match self {
            Absmax::Plain(v) => v[b],
            Absmax::Nested {
                codes,
                nested_absmax,
                offset,
                map,
            } => map[codes[b] as usize] * nested_absmax[b / NESTED_BLOCKSIZE] + offset,
        }
    }

    /// The f32 scales, de-quantising them when nested (as `dequantize_blockwise` then `+= offset`).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Absmax::Plain(v) => v.clone(),
            Absmax::Nested {
                codes,
                nested_absmax,
                offset,
                map,
            } => codes
                .iter()
                .enumerate()
                .map(|(i, &c)| map[c as usize] * nested_absmax[i / NESTED_BLOCKSIZE] + offset)
                .collect(),
        }
    }

    /// Bytes held (codes + scales).
    pub fn storage_bytes(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len() * 4,
            Absmax::Nested {
                codes,
                nested_absmax,
                ..
            } => codes.len() + nested_absmax.len() * 4 + 4,
        }
    }
}

/// A tensor in bitsandbytes' 4-bit form.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized4bit {
    /// Two codes per byte, element `2i` in the high nibble; `ceil(numel / 2)` bytes.
    pub packed: Vec<u8>,
    /// Per-block scales.
    pub absmax: Absmax,
    /// The original shape (PyTorch order).
    pub shape: Vec<usize>,
    /// The original dtype.
    pub dtype: SourceDtype,
    /// Elements per block.
    pub blocksize: usize,
    /// NF4 or FP4.
    pub quant_type: QuantType,
}

/// Largest magnitude of a block, as `abs().max()`.
fn block_absmax(block: &[f32]) -> f32 {
    block.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

impl Quantized4bit {
    /// Quantises `values` (row-major, `shape`), as `quantize_4bit` does on CPU. `dtype` records
    /// what the values were before widening to f32 (bf16/f16 widen exactly).
    pub fn quantize(
        values: &[f32],
        shape: &[usize],
        dtype: SourceDtype,
        config: QuantConfig,
    ) -> Result<Self> {
        config.validate()?;
        let numel: usize = shape.iter().product();
        if numel != values.len() {
            return Err(QuantError::SizeMismatch {
                name: "input".into(),
                what: "values",
                found: values.len(),
                expected: numel,
            });
        }
        let book = config.quant_type.codebook();
        let blocksize = config.blocksize;
        let absmax: Vec<f32> = values.par_chunks(blocksize).map(block_absmax).collect();
        // Codes per block; full blocks scale by a reciprocal, the final partial block divides
        // (the two expressions of bitsandbytes' reference kernel, which round differently).
        let full_blocks = numel / blocksize;
        let mut codes = vec![0u8; numel + numel % 2];
        codes[..numel]
            .par_chunks_mut(blocksize)
            .zip(values.par_chunks(blocksize))
            .enumerate()
            .for_each(|(b, (out, block))| {
                let am = absmax[b].max(1e-38);
                if b < full_blocks {
                    let inv = 1.0 / am;
                    for (o, v) in out.iter_mut().zip(block) {
                        *o = book.encode((v * inv).clamp(-1.0, 1.0));
                    }
                } else {
                    for (o, v) in out.iter_mut().zip(block) {
                        *o = book.encode((v / am).clamp(-1.0, 1.0));
                    }
                }
            });
        // An odd element count pads with a zero, which encodes like any 0.0.
        if numel % 2 == 1 {
            codes[numel] = book.encode(0.0);
        }
        let packed = codes.par_chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
        let absmax = if config.double_quant {
            nest(&absmax)
        } else {
            Absmax::Plain(absmax)
        };
        Ok(Self {
            packed,
            absmax,
            shape: shape.to_vec(),
            dtype,
            blocksize,
            quant_type: config.quant_type,
        })
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Checks that packed bytes and statistics fit the shape and block size.
    pub fn validate(&self, name: &str) -> Result<()> {
        check_blocksize(self.blocksize)?;
        let numel = self.numel();
        let expected_bytes = numel.div_ceil(2);
        if self.packed.len() != expected_bytes {
            return Err(QuantError::SizeMismatch {
                name: name.into(),
                what: "packed weight",
                found: self.packed.len(),
                expected: expected_bytes,
            });
        }
        let blocks = numel.div_ceil(self.blocksize);
        if self.absmax.len() != blocks {
            return Err(QuantError::SizeMismatch {
                name: name.into(),
                what: "absmax",
                found: self.absmax.len(),
                expected: blocks,
            });
        }
        if let Absmax::Nested { nested_absmax, .. } = &self.absmax {
            let nested = blocks.div_ceil(NESTED_BLOCKSIZE);
            if nested_absmax.len() != nested {
                return Err(QuantError::SizeMismatch {
                    name: name.into(),
                    what: "nested_absmax",
                    found: nested_absmax.len(),
                    expected: nested,
                });
            }
        }
        Ok(())
    }

    /// De-quantised values in f32 (`code[q] · absmax[i / blocksize]`, one f32 product each).
    pub fn dequantize_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.numel()];
        self.dequantize_into(&mut out);
        out
    }

    /// De-quantises into `out` (`numel` elements), in parallel over blocks.
    pub fn dequantize_into(&self, out: &mut [f32]) {
        let values = self.quant_type.codebook().values;
        let absmax = self.absmax.to_f32();
        let blocksize = self.blocksize;
        out.par_chunks_mut(blocksize)
            .enumerate()
            .for_each(|(b, block)| {
                let table = values.map(|v| v * absmax[b]);
                let start = b * blocksize;
                self.decode_run(start..start + block.len(), block, &table);
            });
    }

    /// De-quantised to bf16 (the f32 product rounded to nearest even).
    pub fn dequantize_bf16(&self) -> Vec<bf16> {
        self.dequantize_f32()
            .into_par_iter()
            .map(bf16::from_f32)
            .collect()
    }

    /// De-quantised to f16 (the f32 product rounded to nearest even).
    pub fn dequantize_f16(&self) -> Vec<f16> {
        self.dequantize_f32()
            .into_par_iter()
            .map(f16::from_f32)
            .collect()
    }

    /// Bytes held: packed codes plus statistics.
    pub fn storage_bytes(&self) -> usize {
        self.packed.len() + self.absmax.storage_bytes()
    }

    /// Resident bits per element.
    pub fn bits_per_param(&self) -> f64 {
        self.storage_bytes() as f64 * 8.0 / self.numel().max(1) as f64
    }
}

/// Threads PyTorch would have used for the mean (it matters above 32768 blocks only).
fn torch_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Double quantisation of the absmax vector: `offset = mean`, then `quantize_blockwise` of
/// `absmax - offset` with the dynamic map in blocks of 256 (bitsandbytes' CPU kernel: per block
/// `max |x|`, then `x · (1 / max)` through [`DynamicEncoder`]; an all-zero block gets code 0).
fn nest(absmax: &[f32]) -> Absmax {
    let offset = torch_mean(absmax, torch_threads());
    let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
    let map = Box::new(dynamic_map());
    let encoder = DynamicEncoder::new(&map);
    let nested_absmax: Vec<f32> = centred.chunks(NESTED_BLOCKSIZE).map(block_absmax).collect();
    let codes = centred
        .par_chunks(NESTED_BLOCKSIZE)
        .zip(nested_absmax.par_iter())
        .flat_map_iter(|(block, &scale)| {
            let encoder = &encoder;
            let inv = if scale == 0.0 { 0.0 } else { 1.0 / scale };
            block.iter().map(move |v| {
                if scale == 0.0 {
                    0
                } else {
                    encoder.encode(v * inv)
                }
            })
        })
        .collect();
    Absmax::Nested {
        codes,
        nested_absmax,
        offset,
        map,
    }
}

impl peft_ops::packed::PackedWeight for Quantized4bit {
    fn shape(&self) -> [usize; 2] {
        match self.shape.as_slice() {
            [rows, cols] => [*rows, *cols],
            other => [1, other.iter().product()],
        }
    }

    fn dequantize(&self) -> Vec<f32> {
        self.dequantize_f32()
    }

    fn storage_bytes(&self) -> usize {
        Quantized4bit::storage_bytes(self)
    }

    fn dequantize_block(
        &self,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        out: &mut [f32],
    ) -> bool {
        let values = self.quant_type.codebook().values;
        // The same f32 products as `dequantize_into`.
        self.decode_block(rows, cols, out, |scale| values.map(|v| v * scale))
    }

    /// One table per 4-bit block: its 16 code values times the block's scale, each product
    /// rounded to bf16 once — exactly `dequantize_block` then the rounding — and then one
    /// lookup per code.
    fn dequantize_block_bf16(
        &self,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        out: &mut [u16],
    ) -> bool {
        let values = self.quant_type.codebook().values;
        self.decode_block(rows, cols, out, |scale| {
            // A loop, not `array::map`, which measured slower (docs/BENCHMARKS.md, "Design measurements").
            let mut table = [0u16; 16];
            for (t, v) in table.iter_mut().zip(values) {
                *t = half::bf16::from_f32(v * scale).to_bits();
            }
            table
        })
    }

    fn to_tensors(&self, name: &str) -> Vec<(String, peft_tensors::HostTensor)> {
        Quantized4bit::to_tensors(self, name)
    }

    fn to_device(
        &self,
        device: &burn::tensor::Device,
    ) -> Option<std::sync::Arc<dyn peft_ops::packed::DeviceWeight>> {
        Some(std::sync::Arc::new(crate::device::DeviceCodes::upload(
            &self.code_blocks(),
            device,
        )))
    }
}

impl Quantized4bit {
    /// Walks the block `rows × cols` of the `[out, in]` weight in runs that each lie in one 4-bit
    /// block: `run(b, elements, out)` gets the block's index, the run's range of flat element
    /// indices (element `i` is nibble `i` of `packed`, high nibble first) and the run's part of
    /// `out` (row-major, `rows.len() · cols.len()` values). `false`, before any call, if the
    /// block is out of range or `out` does not fit it.
    fn block_runs<T>(
        &self,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        out: &mut [T],
        mut run: impl FnMut(usize, std::ops::Range<usize>, &mut [T]),
    ) -> bool {
        let [d_out, d_in] = peft_ops::packed::PackedWeight::shape(self);
        let width = cols.len();
        if rows.end > d_out || cols.end > d_in || out.len() != rows.len() * width || width == 0 {
            return false;
        }
        for (row, out) in rows.zip(out.chunks_mut(width)) {
            let (start, end) = (row * d_in + cols.start, row * d_in + cols.end);
            let mut i = start;
            while i < end {
                let b = i / self.blocksize;
                let stop = ((b + 1) * self.blocksize).min(end);
                run(b, i..stop, &mut out[i - start..stop - start]);
                i = stop;
            }
        }
        true
    }

    /// The block `rows × cols` of the weight de-quantised through per-block tables:
    /// `table(scale)` gives a 4-bit block's 16 values from its scale, built once each time the
    /// walk ([`Self::block_runs`]) enters a block, and each run is decoded through it. `false`
    /// as `block_runs`.
    fn decode_block<T: Copy>(
        &self,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        out: &mut [T],
        table: impl Fn(f32) -> [T; 16],
    ) -> bool {
        let mut current: Option<(usize, [T; 16])> = None;
        self.block_runs(rows, cols, out, |b, elements, out| {
            if current.as_ref().is_none_or(|(block, _)| *block != b) {
                current = Some((b, table(self.absmax.at(b))));
            }
            if let Some((_, values)) = &current {
                self.decode_run(elements, out, values);
            }
        })
    }

    /// The 4-bit code of flat element `i` (nibble `i` of `packed`, high nibble first).
    #[inline]
    fn code(&self, i: usize) -> usize {
        let byte = self.packed[i / 2];
        usize::from(if i.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 0x0f
        })
    }

    /// `out[j] = table[code of element elements.start + j]`: whole bytes two codes at a time
    /// (no per-element branch), an odd first or last element as half a byte. The one decoder of
    /// the packed codes; `table` holds a block's 16 de-quantised values (f32, or bf16 bits).
    fn decode_run<T: Copy>(
        &self,
        elements: std::ops::Range<usize>,
        out: &mut [T],
        table: &[T; 16],
    ) {
        let (mut k, stop) = (elements.start, elements.end);
        let mut o = 0;
        if k < stop && !k.is_multiple_of(2) {
            out[0] = table[self.code(k)];
            (k, o) = (k + 1, 1);
        }
        let pairs = stop.saturating_sub(k) / 2;
        for (pair, &byte) in out[o..o + 2 * pairs]
            .chunks_exact_mut(2)
            .zip(&self.packed[k / 2..k / 2 + pairs])
        {
            pair[0] = table[usize::from(byte >> 4)];
            pair[1] = table[usize::from(byte & 0x0f)];
        }
        if k + 2 * pairs < stop {
            out[o + 2 * pairs] = table[self.code(k + 2 * pairs)];
        }
    }

    /// The weight as 4-bit codes and per-block scales (what [`crate::device::DeviceCodes`]
    /// uploads).
    pub fn code_blocks(&self) -> crate::device::CodeBlocks {
        let words = self
            .packed
            .chunks(4)
            .map(|c| {
                let mut b = [0u8; 4];
                b[..c.len()].copy_from_slice(c);
                i32::from_le_bytes(b)
            })
            .collect();
        crate::device::CodeBlocks {
            words,
            absmax: self.absmax.to_f32(),
            codebook: self.quant_type.codebook().values,
            blocksize: self.blocksize,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocksize_must_be_a_power_of_two_in_range() {
        for ok in [32, 64, 4096] {
            assert!(check_blocksize(ok).is_ok());
        }
        for bad in [0, 16, 48, 100, 8192] {
            let err = check_blocksize(bad).unwrap_err();
            assert!(err.to_string().contains(&bad.to_string()), "{err}");
        }
    }

    /// Any block of rows × columns de-quantises to exactly that part of the whole weight, with
    /// plain and double-quantised scales, blocks straddling rows (an odd row width) and the odd
    /// element count's last nibble.
    #[test]
    fn blocks_equal_the_whole_dequantisation() {
        use peft_ops::packed::PackedWeight;
        let (rows, cols) = (7, 301);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| (((i * 7919) % 1013) as f32 - 506.0) / 97.0)
            .collect();
        for double_quant in [false, true] {
            let config = QuantConfig {
                double_quant,
                ..QuantConfig::default()
            };
            let q =
                Quantized4bit::quantize(&values, &[rows, cols], SourceDtype::F32, config).unwrap();
            let whole = q.dequantize_f32();
            for (r, c) in [
                (0..7, 0..301),
                (2..5, 13..200),
                (6..7, 300..301),
                (1..2, 0..1),
            ] {
                let mut out = vec![0.0f32; r.len() * c.len()];
                assert!(q.dequantize_block(r.clone(), c.clone(), &mut out));
                let expected: Vec<f32> = r
                    .clone()
                    .flat_map(|row| whole[row * cols + c.start..row * cols + c.end].to_vec())
                    .collect();
                assert_eq!(
                    out, expected,
                    "rows {r:?}, cols {c:?}, double quant {double_quant}"
                );
                // The bf16 block (a table per 4-bit block) is that block rounded once.
                let mut bits = vec![0u16; out.len()];
                assert!(q.dequantize_block_bf16(r.clone(), c.clone(), &mut bits));
                let rounded: Vec<u16> = expected
                    .iter()
                    .map(|&v| half::bf16::from_f32(v).to_bits())
                    .collect();
                assert_eq!(bits, rounded, "bf16: rows {r:?}, cols {c:?}");
            }
            let mut bits = vec![0u16; 4];
            assert!(!q.dequantize_block_bf16(6..8, 0..2, &mut bits));
            let mut out = vec![0.0f32; 4];
            assert!(
                !q.dequantize_block(6..8, 0..2, &mut out),
                "rows past the end"
            );
        }
    }

    #[test]
    fn round_trip_by_hand() {
        // One block of 4: absmax 2; scaled values -1, -0.5, 0, 1 → NF4 codes 0, 2 (−0.525), 7, 15.
        let q = Quantized4bit::quantize(
            &[-2.0, -1.0, 0.0, 2.0],
            &[2, 2],
            SourceDtype::F32,
            QuantConfig {
                quant_type: QuantType::Nf4,
                blocksize: 32,
                double_quant: false,
            },
        )
        .unwrap();
        assert_eq!(q.packed, vec![0x02, 0x7f]);
        assert_eq!(q.absmax, Absmax::Plain(vec![2.0]));
        assert_eq!(
            q.dequantize_f32(),
            vec![-2.0, NF4_2 * 2.0, 0.0, 2.0],
            "code · absmax"
        );
    }

    const NF4_2: f32 = crate::codebook::NF4[2];

    #[test]
    fn odd_sizes_and_partial_blocks() {
        let values: Vec<f32> = (0..101).map(|i| (i as f32 * 0.37).sin()).collect();
        let q = Quantized4bit::quantize(&values, &[101], SourceDtype::F32, QuantConfig::default())
            .unwrap();
        assert_eq!(q.packed.len(), 51);
        assert_eq!(q.absmax.len(), 2);
        q.validate("x").unwrap();
        let back = q.dequantize_f32();
        let worst = values
            .iter()
            .zip(&back)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(worst < 0.15, "{worst}");
    }

    #[test]
    fn validate_names_the_bad_component() {
        let mut q = Quantized4bit::quantize(
            &[1.0; 128],
            &[128],
            SourceDtype::F32,
            QuantConfig::default(),
        )
        .unwrap();
        q.packed.pop();
        let err = q.validate("w").unwrap_err().to_string();
        assert!(err.contains("packed weight") && err.contains("63"), "{err}");
    }
}
