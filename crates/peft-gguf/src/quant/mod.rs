//! ggml's storage types, written bit for bit as llama.cpp writes them and read as ggml reads
//! them. The float types and `Q8_0` as `convert_hf_to_gguf.py`'s `gguf-py` computes them (which
//! it states equal ggml's reference C code); the 4- to 6-bit types as `llama-quantize` computes
//! them without an importance matrix (`legacy.rs`: `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`; `kquant.rs`:
//! `Q4_K`, `Q5_K`, `Q6_K`):
//!
//! - `F16`: IEEE half, round to nearest even (numpy's `astype(float16)`).
//! - `BF16`: ggml's `ggml_compute_fp32_to_bf16`: NaN made quiet, then round to nearest even.
//! - `Q8_0`: blocks of 32 values; `d = max|x| / 127` (f32), `q = round(x · (1/d))` with ties
//!   away from zero; stored as `d` in f16 then the 32 `i8`.

use half::f16;
use rayon::prelude::*;

mod kquant;
mod legacy;

/// A ggml tensor type: how a row of numbers is stored (named as ggml names them).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// IEEE single precision.
    F32,
    /// IEEE half precision.
    F16,
    /// Blocks of 32: an f16 scale and 32 signed bytes (34 bytes a block).
    Q8_0,
    /// bfloat16.
    Bf16,
    /// Blocks of 32: an f16 scale and 32 4-bit codes, offset 8 (18 bytes).
    Q4_0,
    /// Blocks of 32: f16 scale and minimum, 32 4-bit codes (20 bytes).
    Q4_1,
    /// Blocks of 32: an f16 scale, 32 5-bit codes offset 16 (22 bytes).
    Q5_0,
    /// Blocks of 32: f16 scale and minimum, 32 5-bit codes (24 bytes).
    Q5_1,
    /// Super-blocks of 256: f16 scale and minimum, 8 6-bit sub-scales and sub-minima, 4-bit
    /// codes (144 bytes).
    Q4_K,
    /// As Q4_K with 5-bit codes (176 bytes).
    Q5_K,
    /// Super-blocks of 256: 16 8-bit sub-scales, 6-bit codes offset 32, an f16 scale (210
    /// bytes).
    Q6_K,
}

impl GgmlType {
    /// ggml's number for the type (`enum ggml_type`).
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 8,
            Self::Bf16 => 30,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
        }
    }

    /// The type with ggml's number `id`, if this crate knows it.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            8 => Self::Q8_0,
            30 => Self::Bf16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            _ => return None,
        })
    }

    /// Values per block (1 for the float types).
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::Bf16 => 1,
            Self::Q8_0 | Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 => 32,
            Self::Q4_K | Self::Q5_K | Self::Q6_K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
            Self::Q8_0 => 34,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q4_K => 144,
            Self::Q5_K => 176,
            Self::Q6_K => 210,
        }
    }

    /// Bytes of a tensor of `numel` values whose rows are `row` long (`row` a multiple of the
    /// block size), or `None` where the rows do not split into blocks.
    pub fn bytes_for(self, numel: usize, row: usize) -> Option<usize> {
        let block = self.block_size();
        if !row.is_multiple_of(block) {
            return None;
        }
        Some(numel / block * self.block_bytes())
    }
}

/// `f32` → bf16 bits exactly as ggml rounds.
pub fn bf16_bits(x: f32) -> u16 {
    let mut n = x.to_bits();
    if n & 0x7fff_ffff > 0x7f80_0000 {
        n = (n & 0xffff_0000) | (64 << 16);
    }
    ((u64::from(n) + 0x7fff + u64::from((n >> 16) & 1)) >> 16) as u16
}

/// Blocks encoded by one parallel task (64 k-quant super-blocks: 16,384 values).
const BLOCKS_PER_TASK: usize = 64;

/// One Q8_0 block of 32 values → 34 bytes.
fn q8_0_block(block: &[f32], out: &mut Vec<u8>) {
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    out.extend(f16::from_f32(d).to_le_bytes());
    out.extend(block.iter().map(|&v| (v * id).round() as i8 as u8));
}

/// Encodes row-major `values` as `ggml_type` (rows a multiple of the block size, as
/// [`crate::format::GgufWriter::add_tensor`] checks); a count of values that does not split into
/// whole blocks is refused.
pub fn encode(ggml_type: GgmlType, values: &[f32]) -> crate::Result<Vec<u8>> {
    if !values.len().is_multiple_of(ggml_type.block_size()) {
        return Err(crate::GgufError::Unsupported(format!(
            "{} values do not split into {ggml_type:?} blocks of {}",
            values.len(),
            ggml_type.block_size()
        )));
    }
    Ok(match ggml_type {
        GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        GgmlType::Bf16 => values
            .iter()
            .flat_map(|&v| bf16_bits(v).to_le_bytes())
            .collect(),
        t => {
            // Blocks are independent: runs of them are encoded in parallel and joined in order,
            // so the bytes do not depend on the thread count.
            let run = t.block_size() * BLOCKS_PER_TASK;
            let pieces: Vec<Vec<u8>> = values
                .par_chunks(run)
                .map(|values| {
                    let mut out =
                        Vec::with_capacity(values.len() / t.block_size() * t.block_bytes());
                    for block in values.chunks_exact(t.block_size()) {
                        match t {
                            GgmlType::Q8_0 => q8_0_block(block, &mut out),
                            GgmlType::Q4_K | GgmlType::Q5_K => {
                                kquant::encode_q4_q5_k(t == GgmlType::Q5_K, block, &mut out)
                            }
                            GgmlType::Q6_K => kquant::encode_q6_k(block, &mut out),
                            _ => legacy::encode_block(t, block, &mut out),
                        }
                    }
                    out
                })
                .collect();
            pieces.concat()
        }
    })
}

/// Decodes stored bytes of `ggml_type` to `f32` values (ggml's de-quantisation).
pub fn decode(ggml_type: GgmlType, bytes: &[u8]) -> Vec<f32> {
    match ggml_type {
        GgmlType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        GgmlType::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        GgmlType::Bf16 => bytes
            .chunks_exact(2)
            .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
            .collect(),
        GgmlType::Q8_0 => bytes
            .chunks_exact(34)
            .flat_map(|b| {
                let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                b[2..].iter().map(move |&q| f32::from(q as i8) * d)
            })
            .collect(),
        t => {
            let mut out = Vec::with_capacity(bytes.len() / t.block_bytes() * t.block_size());
            for b in bytes.chunks_exact(t.block_bytes()) {
                match t {
                    GgmlType::Q4_K | GgmlType::Q5_K => {
                        kquant::decode_q4_q5_k(t == GgmlType::Q5_K, b, &mut out)
                    }
                    GgmlType::Q6_K => kquant::decode_q6_k(b, &mut out),
                    _ => legacy::decode_block(t, b, &mut out),
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even_and_keeps_nan_quiet() {
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(bf16_bits(1.0 + 2f32.powi(-8)), 0x3f80);
        // 1 + 3·2^-8 is halfway too: rounds up to the even 1 + 2^-6.
        assert_eq!(bf16_bits(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        assert_eq!(bf16_bits(-2.0), 0xc000);
        // A signalling NaN becomes a quiet one, never infinity.
        assert_eq!(bf16_bits(f32::from_bits(0x7f80_0001)), 0x7fc0);
    }

    #[test]
    fn q8_0_matches_the_reference_formula_by_hand() {
        let mut block = [0f32; 32];
        block[0] = 1.27;
        block[1] = -0.635;
        block[2] = 0.004;
        let bytes = encode(GgmlType::Q8_0, &block).unwrap();
        assert_eq!(bytes.len(), 34);
        let d = 1.27f32 / 127.0;
        assert_eq!(&bytes[..2], &f16::from_f32(d).to_le_bytes());
        let id = 1.0 / d;
        assert_eq!(bytes[2] as i8, (1.27f32 * id).round() as i8);
        assert_eq!(bytes[3] as i8, (-0.635f32 * id).round() as i8);
        assert_eq!(bytes[4] as i8, 0);
        assert_eq!(bytes[5] as i8, 0);
        let back = decode(GgmlType::Q8_0, &bytes);
        assert!((back[0] - 1.27).abs() < 1e-3);
        // An all-zero block has scale 0 and zero codes.
        assert_eq!(encode(GgmlType::Q8_0, &[0.0; 32]).unwrap(), vec![0u8; 34]);
        assert!(encode(GgmlType::Q4_K, &[0.0; 255]).is_err());
    }

    #[test]
    fn float_types_round_trip() {
        let values = [0.0f32, 1.5, -2.25, 256.0];
        for t in [GgmlType::F32, GgmlType::F16, GgmlType::Bf16] {
            assert_eq!(decode(t, &encode(t, &values).unwrap()), values, "{t:?}");
        }
    }
}
