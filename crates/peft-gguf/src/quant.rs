//! The storage types llama.cpp's `convert_hf_to_gguf.py` writes, bit for bit as its `gguf-py`
//! computes them (which it states equal ggml's reference C code):
//!
//! - `F16`: IEEE half, round to nearest even (numpy's `astype(float16)`).
//! - `BF16`: ggml's `ggml_compute_fp32_to_bf16`: NaN made quiet, then round to nearest even.
//! - `Q8_0`: blocks of 32 values; `d = max|x| / 127` (f32), `q = round(x · (1/d))` with ties
//!   away from zero; stored as `d` in f16 then the 32 `i8`.

use half::f16;

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
    /// Blocks of 32: an f16 scale and 32 4-bit codes, offset 8 (18 bytes). Read only.
    Q4_0,
    /// Blocks of 32: f16 scale and minimum, 32 4-bit codes (20 bytes). Read only.
    Q4_1,
    /// Blocks of 32: an f16 scale, 32 5-bit codes offset 16 (22 bytes). Read only.
    Q5_0,
    /// Blocks of 32: f16 scale and minimum, 32 5-bit codes (24 bytes). Read only.
    Q5_1,
    /// Super-blocks of 256: f16 scale and minimum, 8 6-bit sub-scales and sub-minima, 4-bit
    /// codes (144 bytes). Read only.
    Q4_K,
    /// As Q4_K with 5-bit codes (176 bytes). Read only.
    Q5_K,
    /// Super-blocks of 256: 16 8-bit sub-scales, 6-bit codes offset 32, an f16 scale (210
    /// bytes). Read only.
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

/// One Q8_0 block of 32 values → 34 bytes.
fn q8_0_block(block: &[f32], out: &mut Vec<u8>) {
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    out.extend(f16::from_f32(d).to_le_bytes());
    out.extend(block.iter().map(|&v| (v * id).round() as i8 as u8));
}

/// Encodes row-major `values` as `ggml_type` (rows a multiple of the block size, as
/// [`crate::format::GgufWriter::add_tensor`] checks). The read-only types are refused.
pub fn encode(ggml_type: GgmlType, values: &[f32]) -> crate::Result<Vec<u8>> {
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
        GgmlType::Q8_0 => {
            let mut out = Vec::with_capacity(values.len() / 32 * 34);
            for block in values.chunks(32) {
                q8_0_block(block, &mut out);
            }
            out
        }
        other => {
            return Err(crate::GgufError::Unsupported(format!(
                "{other:?} is read, not written (f32, f16, bf16 and q8_0 are written)"
            )));
        }
    })
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Q4_K / Q5_K's 6-bit scale and minimum of sub-block `j` (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    let (d, m) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    };
    (f32::from(d), f32::from(m))
}

/// One block of a legacy 32-value type → 32 values (ggml's `dequantize_row_q4_0` …).
fn legacy_block(t: GgmlType, b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let (min, qh, qs) = match t {
        GgmlType::Q4_0 => (None, 0u32, &b[2..18]),
        GgmlType::Q4_1 => (Some(f16_at(b, 2)), 0, &b[4..20]),
        GgmlType::Q5_0 => (
            None,
            u32::from_le_bytes([b[2], b[3], b[4], b[5]]),
            &b[6..22],
        ),
        _ => (
            Some(f16_at(b, 2)),
            u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            &b[8..24],
        ),
    };
    let five = matches!(t, GgmlType::Q5_0 | GgmlType::Q5_1);
    let offset = match t {
        GgmlType::Q4_0 => 8,
        GgmlType::Q5_0 => 16,
        _ => 0,
    };
    let mut low = [0f32; 16];
    let mut high = [0f32; 16];
    for j in 0..16 {
        let (mut x0, mut x1) = (i32::from(qs[j] & 0x0F), i32::from(qs[j] >> 4));
        if five {
            x0 |= (((qh >> j) << 4) & 0x10) as i32;
            x1 |= ((qh >> (j + 12)) & 0x10) as i32;
        }
        let (x0, x1) = ((x0 - offset) as f32, (x1 - offset) as f32);
        match min {
            None => (low[j], high[j]) = (x0 * d, x1 * d),
            Some(m) => (low[j], high[j]) = (x0 * d + m, x1 * d + m),
        }
    }
    out.extend(low);
    out.extend(high);
}

/// One Q4_K or Q5_K super-block → 256 values (ggml's `dequantize_row_q4_K` / `_q5_K`).
fn k4_k5_block(five: bool, b: &[u8], out: &mut Vec<f32>) {
    let (d, min) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let (qh, mut ql) = if five {
        (&b[16..48], &b[48..176])
    } else {
        (&b[0..0], &b[16..144])
    };
    let (mut u1, mut u2) = (1u8, 2u8);
    for is in (0..8).step_by(2) {
        let (sc1, m1) = scale_min_k4(is, scales);
        let (sc2, m2) = scale_min_k4(is + 1, scales);
        let (d1, m1, d2, m2) = (d * sc1, min * m1, d * sc2, min * m2);
        for l in 0..32 {
            let high = if five && qh[l] & u1 != 0 { 16.0 } else { 0.0 };
            out.push(d1 * (f32::from(ql[l] & 0xF) + high) - m1);
        }
        for l in 0..32 {
            let high = if five && qh[l] & u2 != 0 { 16.0 } else { 0.0 };
            out.push(d2 * (f32::from(ql[l] >> 4) + high) - m2);
        }
        ql = &ql[32..];
        u1 <<= 2;
        u2 <<= 2;
    }
}

/// One Q6_K super-block → 256 values (ggml's `dequantize_row_q6_K`).
fn k6_block(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 208);
    let mut block = [0f32; 256];
    for half in 0..2 {
        let ql = &b[half * 64..half * 64 + 64];
        let qh = &b[128 + half * 32..128 + half * 32 + 32];
        let sc = &b[192 + half * 8..192 + half * 8 + 8];
        let y = &mut block[half * 128..half * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = i32::from((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32;
            let q2 = i32::from((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            let s = |k: usize| d * f32::from(sc[is + k] as i8);
            y[l] = s(0) * q1 as f32;
            y[l + 32] = s(2) * q2 as f32;
            y[l + 64] = s(4) * q3 as f32;
            y[l + 96] = s(6) * q4 as f32;
        }
    }
    out.extend(block);
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
        t @ (GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1) => {
            let mut out = Vec::with_capacity(bytes.len() / t.block_bytes() * 32);
            for b in bytes.chunks_exact(t.block_bytes()) {
                legacy_block(t, b, &mut out);
            }
            out
        }
        t @ (GgmlType::Q4_K | GgmlType::Q5_K) => {
            let mut out = Vec::with_capacity(bytes.len() / t.block_bytes() * 256);
            for b in bytes.chunks_exact(t.block_bytes()) {
                k4_k5_block(t == GgmlType::Q5_K, b, &mut out);
            }
            out
        }
        GgmlType::Q6_K => {
            let mut out = Vec::with_capacity(bytes.len() / 210 * 256);
            for b in bytes.chunks_exact(210) {
                k6_block(b, &mut out);
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
        assert!(encode(GgmlType::Q4_K, &[0.0; 256]).is_err());
    }

    #[test]
    fn float_types_round_trip() {
        let values = [0.0f32, 1.5, -2.25, 256.0];
        for t in [GgmlType::F32, GgmlType::F16, GgmlType::Bf16] {
            assert_eq!(decode(t, &encode(t, &values).unwrap()), values, "{t:?}");
        }
    }
}
