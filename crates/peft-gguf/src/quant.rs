//! The storage types llama.cpp's `convert_hf_to_gguf.py` writes, bit for bit as its `gguf-py`
//! computes them (which it states equal ggml's reference C code):
//!
//! - `F16`: IEEE half, round to nearest even (numpy's `astype(float16)`).
//! - `BF16`: ggml's `ggml_compute_fp32_to_bf16`: NaN made quiet, then round to nearest even.
//! - `Q8_0`: blocks of 32 values; `d = max|x| / 127` (f32), `q = round(x · (1/d))` with ties
//!   away from zero; stored as `d` in f16 then the 32 `i8`.

use half::f16;

/// A ggml tensor type: how a row of numbers is stored.
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
}

impl GgmlType {
    /// ggml's number for the type (`enum ggml_type`).
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 8,
            Self::Bf16 => 30,
        }
    }

    /// The type with ggml's number `id`, if this crate knows it.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            8 => Self::Q8_0,
            30 => Self::Bf16,
            _ => return None,
        })
    }

    /// Values per block (1 for the float types).
    pub fn block_size(self) -> usize {
        match self {
            Self::Q8_0 => 32,
            _ => 1,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
            Self::Q8_0 => 34,
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

/// One Q8_0 block of 32 values → 34 bytes.
fn q8_0_block(block: &[f32], out: &mut Vec<u8>) {
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    out.extend(f16::from_f32(d).to_le_bytes());
    out.extend(block.iter().map(|&v| (v * id).round() as i8 as u8));
}

/// Encodes row-major `values` (rows of `row` values) as `ggml_type`.
///
/// # Panics
/// Never on a row length the type accepts; a Q8_0 row must be a multiple of 32 (checked by
/// [`crate::format::GgufWriter::add_tensor`] before any data is produced).
pub fn encode(ggml_type: GgmlType, values: &[f32]) -> Vec<u8> {
    match ggml_type {
        GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        GgmlType::Bf16 => values
            .iter()
            .flat_map(|&v| bf16_bits(v).to_le_bytes())
            .collect(),
        GgmlType::Q8_0 => {
            let mut out = Vec::with_capacity(values.len() / 32 * 34);
            for block in values.chunks(32) {
                q8_0_block(block, &mut out);
            }
            out
        }
    }
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
        let bytes = encode(GgmlType::Q8_0, &block);
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
        assert_eq!(encode(GgmlType::Q8_0, &[0.0; 32]), vec![0u8; 34]);
    }

    #[test]
    fn float_types_round_trip() {
        let values = [0.0f32, 1.5, -2.25, 256.0];
        for t in [GgmlType::F32, GgmlType::F16, GgmlType::Bf16] {
            assert_eq!(decode(t, &encode(t, &values)), values, "{t:?}");
        }
    }
}
