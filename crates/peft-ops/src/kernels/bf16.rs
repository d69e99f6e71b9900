//! Rounding f32 values to bf16 (to nearest, ties to even): bit patterns, in place, with a bias.

use super::*;

/// `v` rounded to the nearest bf16, ties to even, as its bit pattern — `half::bf16::from_f32`'s
/// result (a NaN stays a NaN, made quiet) without branches, so that loops over it vectorise.
#[inline(always)]
pub fn bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    let rounded = (x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16) as u16;
    let quiet_nan = ((x >> 16) | 0x40) as u16;
    if v.is_nan() { quiet_nan } else { rounded }
}

multiversion! {
    pub(super) fn bf16_bits_chunk(values: &[f32], bits: &mut [u16]) {
        for (b, &v) in bits.iter_mut().zip(values) {
            *b = bf16_bits(v);
        }
    }
}

multiversion! {
    pub(super) fn round_bf16_chunk(values: &mut [f32]) {
        for v in values {
            *v = f32::from_bits(u32::from(bf16_bits(*v)) << 16);
        }
    }
}

multiversion! {
    pub(super) fn add_round_bf16_row(row: &mut [f32], bias: &[f32]) {
        for (v, &b) in row.iter_mut().zip(bias) {
            *v = f32::from_bits(u32::from(bf16_bits(*v + b)) << 16);
        }
    }
}

/// `bits[i]` = `values[i]` rounded to bf16 ([`bf16_bits`]), on every core.
pub fn round_to_bf16_bits(values: &[f32], bits: &mut [u16]) {
    bits.par_chunks_mut(CHUNK)
        .zip(values.par_chunks(CHUNK))
        .for_each(|(bits, values)| bf16_bits_chunk(values, bits));
}

/// Each value rounded to bf16 in place (and widened back: exact), on every core.
pub fn round_bf16_in_place(values: &mut [f32]) {
    values.par_chunks_mut(CHUNK).for_each(round_bf16_chunk);
}

/// `bias` added to every row of `values` (`bias.len()` wide) and each sum rounded to bf16, on
/// every core: a bf16 linear layer's output (the bias before the one rounding).
pub fn add_bias_round_bf16(values: &mut [f32], bias: &[f32]) {
    if bias.is_empty() {
        return;
    }
    let rows_per_chunk = (CHUNK / bias.len()).max(1);
    values
        .par_chunks_mut(rows_per_chunk * bias.len())
        .for_each(|rows| {
            for row in rows.chunks_mut(bias.len()) {
                add_round_bf16_row(row, bias);
            }
        });
}
