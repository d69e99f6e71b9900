//! ggml's first block types, 32 values a block: `Q4_0` and `Q5_0` (a scale; codes offset by 8 or
//! 16) and `Q4_1` and `Q5_1` (a scale and a minimum). Encoding is ggml's reference code
//! (`quantize_row_q4_0_ref` …), which `llama-quantize` runs when it has no importance matrix;
//! every step is the same f32 operation in the same order, so the bytes are the same.

use half::f16;

use super::GgmlType;

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Codes of 4 or 5 bits per value.
fn bits(t: GgmlType) -> u32 {
    match t {
        GgmlType::Q5_0 | GgmlType::Q5_1 => 5,
        _ => 4,
    }
}

/// Whether the type stores a minimum (`_1`) rather than an offset (`_0`).
fn has_min(t: GgmlType) -> bool {
    matches!(t, GgmlType::Q4_1 | GgmlType::Q5_1)
}

/// One block of 32 values of `t` (one of Q4_0, Q4_1, Q5_0, Q5_1) → its bytes, appended to `out`.
///
/// `_0`: the value of largest magnitude `max` (its sign kept) gives `d = max / -2^(bits-1)`, and
/// each code is `min(2^bits - 1, trunc(x / d + 2^(bits-1) + 0.5))`. `_1`: `d = (max - min) /
/// (2^bits - 1)`, codes `trunc((x - min) / d + 0.5)`. The fifth bits of the 5-bit types go into a
/// 32-bit word, value `j` at bit `j`.
pub(super) fn encode_block(t: GgmlType, x: &[f32], out: &mut Vec<u8>) {
    let levels = (1u32 << bits(t)) as f32;
    let top = (1u8 << bits(t)) - 1;
    let (d, min) = if has_min(t) {
        let (lo, hi) = x
            .iter()
            .fold((f32::MAX, -f32::MAX), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        ((hi - lo) / (levels - 1.0), Some(lo))
    } else {
        let mut amax = 0f32;
        let mut max = 0f32;
        for &v in x {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        (max / -(levels / 2.0), None)
    };
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    // One constant, as ggml adds it (`x0 + 8.5f`): two additions would round twice.
    let offset_and_half = levels / 2.0 + 0.5;
    let code = |v: f32| -> u8 {
        match min {
            // A cast to an unsigned byte, as ggml's `(uint8_t)(x + 0.5f)` (never above 31).
            Some(m) if t == GgmlType::Q5_1 => ((v - m) * id + 0.5) as u8,
            Some(m) => (((v - m) * id + 0.5) as i8 as u8).min(top),
            None => ((v * id + offset_and_half) as i8 as u8).min(top),
        }
    };
    out.extend(f16::from_f32(d).to_le_bytes());
    if let Some(m) = min {
        out.extend(f16::from_f32(m).to_le_bytes());
    }
    let mut qh = 0u32;
    let mut qs = [0u8; 16];
    for j in 0..16 {
        let (c0, c1) = (code(x[j]), code(x[j + 16]));
        qs[j] = (c0 & 0x0F) | ((c1 & 0x0F) << 4);
        qh |= (u32::from(c0 & 0x10) >> 4) << j;
        qh |= (u32::from(c1 & 0x10) >> 4) << (j + 16);
    }
    if bits(t) == 5 {
        out.extend(qh.to_le_bytes());
    }
    out.extend(qs);
}

/// One block of `t` → its 32 values, appended to `out` (ggml's `dequantize_row_q4_0` …).
pub(super) fn decode_block(t: GgmlType, b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let min = has_min(t).then(|| f16_at(b, 2));
    let mut at = if min.is_some() { 4 } else { 2 };
    let qh = if bits(t) == 5 {
        at += 4;
        u32::from_le_bytes([b[at - 4], b[at - 3], b[at - 2], b[at - 1]])
    } else {
        0
    };
    let qs = &b[at..at + 16];
    let offset = if min.is_some() { 0 } else { 1 << (bits(t) - 1) };
    let mut low = [0f32; 16];
    let mut high = [0f32; 16];
    for j in 0..16 {
        let (mut x0, mut x1) = (i32::from(qs[j] & 0x0F), i32::from(qs[j] >> 4));
        if bits(t) == 5 {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-derived Q4_0 block: max magnitude -1.6 (sign kept) gives d = 0.2, so x / d + 8.5
    /// truncates to the codes below.
    #[test]
    fn q4_0_block_by_hand() {
        let mut x = [0f32; 32];
        x[0] = -1.6; // -8 + 8.5 → 0
        x[1] = 1.4; // 7 + 8.5 → 15
        x[16] = 0.3; // 1.5 + 8.5 → 10
        let mut out = Vec::new();
        encode_block(GgmlType::Q4_0, &x, &mut out);
        assert_eq!(out.len(), 18);
        let d = f16::from_le_bytes([out[0], out[1]]).to_f32();
        assert_eq!(d, f16::from_f32(0.2).to_f32());
        assert_eq!(out[2], 10 << 4, "codes 0 (low nibble) and 10 (high)");
        assert_eq!(out[3], 15 | (8 << 4));
        let mut back = Vec::new();
        decode_block(GgmlType::Q4_0, &out, &mut back);
        assert!((back[0] + 1.6).abs() < 1e-3 && (back[16] - 0.4).abs() < 1e-3);
    }

    /// Every type decodes its own encoding to within half a step of the block's scale, but for
    /// the `_0` types' one clipped code: their codes span `-2^(bits-1)..2^(bits-1)-1` steps, so a
    /// value equal in magnitude to the extreme, of the other sign, lands a whole step short.
    #[test]
    fn legacy_types_round_trip_within_a_step() {
        let x: Vec<f32> = (0..32)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.37)
            .collect();
        for t in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
        ] {
            let mut bytes = Vec::new();
            encode_block(t, &x, &mut bytes);
            assert_eq!(bytes.len(), t.block_bytes(), "{t:?}");
            let mut back = Vec::new();
            decode_block(t, &bytes, &mut back);
            let d = f16::from_le_bytes([bytes[0], bytes[1]]).to_f32().abs();
            let mut clipped = 0;
            for (a, b) in x.iter().zip(&back) {
                if (a - b).abs() > d * 0.5 + 1e-3 {
                    assert!(
                        !has_min(t) && (a - b).abs() <= d + 1e-3,
                        "{t:?}: {a} vs {b}"
                    );
                    clipped += 1;
                }
            }
            assert!(clipped <= 3, "{t:?}: {clipped} values a step off");
        }
    }
}
