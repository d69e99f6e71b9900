//! Frozen weights held in a 16-bit float format (bf16 or f16) on the host and widened to f32,
//! exactly, for each product: bf16 compute's dense weights, and a bf16/f16 checkpoint's weights
//! held as stored under f32 compute. [`HalfWeight`] is a [`PackedWeight`], so it goes through
//! the packed-weight operation ([`crate::packed_op`]) like a 4-bit weight.

use safetensors::Dtype;

use crate::kernels::{by_output_features, dot, dot_rows_bf16, round_to_bf16_bits};
use crate::packed::PackedWeight;
use peft_tensors::HostTensor;
use peft_tensors::{PeftError, Result};

/// The two 16-bit float formats a frozen weight can be held in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfDtype {
    /// bfloat16: the upper half of an f32.
    Bf16,
    /// IEEE half precision.
    F16,
}

impl HalfDtype {
    /// The format of a checkpoint tensor's dtype, if it is a 16-bit float.
    pub fn from_safetensors(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::BF16 => Some(HalfDtype::Bf16),
            Dtype::F16 => Some(HalfDtype::F16),
            _ => None,
        }
    }

    /// The checkpoint dtype of this format.
    pub fn safetensors(self) -> Dtype {
        match self {
            HalfDtype::Bf16 => Dtype::BF16,
            HalfDtype::F16 => Dtype::F16,
        }
    }
}

/// A frozen `[out, in]` weight held in a 16-bit float format on the host (the CPU backend's
/// memory) and widened to f32 — exactly — for each product: bf16 compute's weights, and the
/// weights of a bf16/f16 checkpoint held as stored under f32 compute (half the memory of an f32
/// copy, the same products).
#[derive(Debug, Clone)]
pub struct HalfWeight {
    shape: [usize; 2],
    dtype: HalfDtype,
    bits: HalfBits,
}

/// Where a [`HalfWeight`]'s 16-bit values live.
#[derive(Debug, Clone)]
enum HalfBits {
    /// In memory of its own.
    Owned(Vec<u16>),
    /// In the checkpoint file's mapping, as stored (little-endian, 2-byte aligned: checked when
    /// built, on little-endian machines only).
    Mapped(peft_tensors::MappedBytes),
}

impl HalfBits {
    fn as_slice(&self) -> &[u16] {
        match self {
            HalfBits::Owned(bits) => bits,
            HalfBits::Mapped(bytes) => {
                let bytes = bytes.as_slice();
                // SAFETY: `from_mapped` built this variant only for a 2-byte-aligned, even-length
                // byte range on a little-endian machine, where those bytes are exactly the u16
                // values; the mapping is read-only and lives as long as `bytes`.
                unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<u16>(), bytes.len() / 2) }
            }
        }
    }
}

impl HalfWeight {
    /// Rounds `values` (row-major `[out, in]`) to bf16, to nearest with ties to even.
    pub fn bf16_from_f32(shape: [usize; 2], values: &[f32]) -> Result<Self> {
        check_len(shape, values.len())?;
        Ok(Self {
            shape,
            dtype: HalfDtype::Bf16,
            bits: HalfBits::Owned({
                let mut bits = vec![0u16; values.len()];
                round_to_bf16_bits(values, &mut bits);
                bits
            }),
        })
    }

    /// A weight read as stored: little-endian bf16 or f16 bytes of a checkpoint tensor.
    pub fn from_le_bytes(dtype: HalfDtype, shape: [usize; 2], bytes: &[u8]) -> Result<Self> {
        if !bytes.len().is_multiple_of(2) {
            return Err(PeftError::InvalidInput(format!(
                "16-bit weight: {} bytes is not a whole number of values",
                bytes.len()
            )));
        }
        check_len(shape, bytes.len() / 2)?;
        Ok(Self {
            shape,
            dtype,
            bits: HalfBits::Owned(
                bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
        })
    }

    /// A weight read as stored with no copy: its values stay in the checkpoint's mapping (the
    /// file must not change while the weight lives). Where the bytes cannot be used in place (a
    /// big-endian machine, an odd offset) they are copied, as [`Self::from_le_bytes`] does.
    pub fn from_mapped(
        dtype: HalfDtype,
        shape: [usize; 2],
        bytes: peft_tensors::MappedBytes,
    ) -> Result<Self> {
        let slice = bytes.as_slice();
        let in_place = cfg!(target_endian = "little")
            && slice.len().is_multiple_of(2)
            && (slice.as_ptr() as usize).is_multiple_of(std::mem::align_of::<u16>());
        if !in_place {
            return Self::from_le_bytes(dtype, shape, slice);
        }
        check_len(shape, slice.len() / 2)?;
        Ok(Self {
            shape,
            dtype,
            bits: HalfBits::Mapped(bytes),
        })
    }

    /// The stored 16-bit values, row-major `[out, in]`.
    fn bits(&self) -> &[u16] {
        self.bits.as_slice()
    }

    /// Widens `bits` into `out` (same length), exactly.
    fn widen(&self, bits: &[u16], out: &mut [f32]) {
        match self.dtype {
            // A bf16 is the upper half of an f32: a plain shift that vectorises.
            HalfDtype::Bf16 => {
                for (o, b) in out.iter_mut().zip(bits) {
                    *o = f32::from_bits(u32::from(*b) << 16);
                }
            }
            HalfDtype::F16 => {
                for (o, b) in out.iter_mut().zip(bits) {
                    *o = half::f16::from_bits(*b).to_f32();
                }
            }
        }
    }
}

fn check_len(shape: [usize; 2], len: usize) -> Result<()> {
    if len != shape[0] * shape[1] {
        return Err(PeftError::InvalidInput(format!(
            "16-bit weight: {len} values for shape {shape:?}"
        )));
    }
    Ok(())
}

/// Under f32 compute a bf16-held weight is multiplied directly up to this many rows
/// ([`HalfWeight::matmul_rows_direct`]), above it widened to an f32 GEMM: the crossover the
/// `half_product` example measures (docs/BENCHMARKS.md, "Design measurements"). Up to here a
/// row's result is also independent of the batch it is in.
pub const HALF_DIRECT_MAX_ROWS: usize = 32;

impl PackedWeight for HalfWeight {
    fn shape(&self) -> [usize; 2] {
        self.shape
    }

    fn dequantize(&self) -> Vec<f32> {
        use rayon::prelude::*;
        let mut out = vec![0.0f32; self.bits().len()];
        out.par_chunks_mut(1 << 14)
            .zip(self.bits().par_chunks(1 << 14))
            .for_each(|(out, bits)| self.widen(bits, out));
        out
    }

    fn dequantize_bf16_rounded(&self) -> Vec<f32> {
        match self.dtype {
            // Already bf16: no second pass over the weight on every product.
            HalfDtype::Bf16 => self.dequantize(),
            HalfDtype::F16 => {
                let mut values = self.dequantize();
                for v in &mut values {
                    *v = half::bf16::from_f32(*v).to_f32();
                }
                values
            }
        }
    }

    fn storage_bytes(&self) -> usize {
        self.bits().len() * 2
    }

    fn to_tensors(&self, name: &str) -> Vec<(String, HostTensor)> {
        let data = self.bits().iter().flat_map(|v| v.to_le_bytes()).collect();
        let tensor = HostTensor {
            dtype: self.dtype.safetensors(),
            shape: self.shape.to_vec(),
            data,
        };
        vec![(name.to_string(), tensor)]
    }

    fn stored_dtype(&self) -> Option<Dtype> {
        Some(self.dtype.safetensors())
    }

    fn bf16_bits(&self) -> Option<&[u16]> {
        (self.dtype == HalfDtype::Bf16).then_some(self.bits())
    }

    fn dequantize_block(
        &self,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        out: &mut [f32],
    ) -> bool {
        let [d_out, d_in] = self.shape;
        let width = cols.len();
        if rows.end > d_out || cols.end > d_in || out.len() != rows.len() * width {
            return false;
        }
        for (row, out) in rows.zip(out.chunks_mut(width.max(1))) {
            let start = row * d_in;
            self.widen(&self.bits()[start + cols.start..start + cols.end], out);
        }
        true
    }

    fn matmul_few_rows(&self, x: &[f32], rows: usize) -> Option<Vec<f32>> {
        if rows > HALF_DIRECT_MAX_ROWS {
            return None;
        }
        self.matmul_rows_direct(x, rows)
    }
}

impl HalfWeight {
    /// `x · Wᵀ` for `x: [rows, in]` as one dot product per output and row, the weight read once
    /// and widened in registers: what [`PackedWeight::matmul_few_rows`] runs for up to
    /// [`HALF_DIRECT_MAX_ROWS`] rows (public so that benchmarks can find the crossover with the
    /// GEMM path at other row counts). `None` for an empty or misshaped `x`.
    pub fn matmul_rows_direct(&self, x: &[f32], rows: usize) -> Option<Vec<f32>> {
        let [d_out, d_in] = self.shape;
        if rows == 0 || x.len() != rows * d_in {
            return None;
        }
        // Output features in blocks, each weight row read once and dotted with every input row.
        const BLOCK: usize = 32;
        let row_bits = |o: usize| &self.bits()[o * d_in..(o + 1) * d_in];
        let out = match self.dtype {
            // Widened in registers, every input row against this weight row at once.
            HalfDtype::Bf16 => by_output_features(
                rows,
                d_out,
                BLOCK,
                || (),
                |_, o, out| dot_rows_bf16(x, rows, row_bits(o), out),
            ),
            // Widened into a per-task row buffer first.
            HalfDtype::F16 => by_output_features(
                rows,
                d_out,
                BLOCK,
                || vec![0.0f32; d_in],
                |row, o, out| {
                    self.widen(row_bits(o), row);
                    for (r, value) in out.iter_mut().enumerate() {
                        *value = dot(&x[r * d_in..(r + 1) * d_in], row);
                    }
                },
            ),
        };
        Some(out)
    }
}

#[cfg(test)]
mod bf16_weight_tests {
    use super::*;

    #[test]
    fn holds_rounded_values_in_two_bytes_each() {
        let w = HalfWeight::bf16_from_f32([2, 2], &[1.0, 1.0 + 2f32.powi(-9), -3.5, 1e-3]).unwrap();
        assert_eq!(w.storage_bytes(), 8);
        assert_eq!(
            w.dequantize(),
            vec![1.0, 1.0, -3.5, half::bf16::from_f32(1e-3).to_f32()]
        );
        let tensors = w.to_tensors("layer.weight");
        assert_eq!(w.dequantize_bf16_rounded(), w.dequantize());
        assert_eq!(tensors[0].0, "layer.weight");
        assert_eq!(tensors[0].1.dtype, Dtype::BF16);
        assert_eq!(tensors[0].1.shape, vec![2, 2]);
        let err = HalfWeight::bf16_from_f32([2, 3], &[0.0; 4])
            .unwrap_err()
            .to_string();
        assert!(err.contains("4 values for shape [2, 3]"), "{err}");
    }

    /// A bf16 weight left in the checkpoint's mapping reads the stored values after the store
    /// is dropped, and equals the copied one in every product.
    #[test]
    fn mapped_weights_read_the_file_in_place() {
        let values = [1.0f32, -2.5, 0.375, 7.0, -0.125, 3.0];
        let bits: Vec<u8> = values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
            .collect();
        let path =
            std::env::temp_dir().join(format!("peft-mapped-{}.safetensors", std::process::id()));
        let mut tensors = std::collections::BTreeMap::new();
        tensors.insert(
            "w".to_string(),
            peft_tensors::HostTensor {
                dtype: Dtype::BF16,
                shape: vec![2, 3],
                data: bits.clone(),
            },
        );
        peft_tensors::save_safetensors(&path, &tensors, None).unwrap();
        let store = peft_tensors::TensorStore::open(&path).unwrap();
        let mapped = store.mapped("w").unwrap().expect("a file is mapped");
        drop(store);
        let w = HalfWeight::from_mapped(HalfDtype::Bf16, [2, 3], mapped).unwrap();
        assert!(matches!(w.bits, HalfBits::Mapped(_)), "read in place");
        let copied = HalfWeight::from_le_bytes(HalfDtype::Bf16, [2, 3], &bits).unwrap();
        assert_eq!(w.dequantize(), values.to_vec());
        assert_eq!(w.dequantize(), copied.dequantize());
        assert_eq!(w.storage_bytes(), 12);
        let err = HalfWeight::from_mapped(
            HalfDtype::Bf16,
            [3, 3],
            peft_tensors::TensorStore::open(&path)
                .unwrap()
                .mapped("w")
                .unwrap()
                .unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("6 values for shape [3, 3]"), "{err}");
        let _ = std::fs::remove_file(&path);
    }
}
