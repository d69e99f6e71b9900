//! ggml's k-quants, super-blocks of 256 values: `Q4_K` and `Q5_K` (eight sub-blocks of 32, each
//! with a 6-bit scale and minimum under an f16 scale and minimum) and `Q6_K` (sixteen sub-blocks
//! of 16, each with an 8-bit scale under an f16 scale).
//!
//! Encoding is ggml's reference code (`quantize_row_q4_K_ref`, `_q5_K_ref`, `_q6_K_ref` with
//! their helpers `make_qkx2_quants` and `make_qx_quants`), which `llama-quantize` runs when it has
//! no importance matrix. It searches over candidate scales, so the bytes depend on every rounding
//! on the way: each step here is the same f32 operation in the same order as the C code, and no
//! step is fused (ggml-base, where that code lives, is built for baseline x86-64 without FMA —
//! checked with `objdump` on llama-cpp-python 0.3.36's `libggml-base.so`: no `vfmadd`).

use half::f16;

/// Values per super-block.
const QK_K: usize = 256;

/// ggml's `GROUP_MAX_EPS`: a group whose largest magnitude is below it is all zeros.
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `nearest_int`: round to nearest, ties to even, by adding 1.5·2^23 and reading the
/// mantissa (exact for |x| < 2^22; beyond that it returns what ggml's returns).
fn nearest_int(x: f32) -> i32 {
    let shifted = x + 12_582_912.0;
    (shifted.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// ggml's `make_qkx2_quants`: codes `l_out` in `0..=nmax` and `(scale, -min)` for values `x`
/// under `weights`, minimising the weighted squared error over the step sizes
/// `(nmax + rmin + rdelta·is) / (max - min)` for `is` in `0..=nstep`, each refined by weighted
/// least squares.
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l_out: &mut [u8],
    (rmin, rdelta, nstep): (f32, f32, i32),
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += weights[i];
        sum_x += weights[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out[..n].fill(0);
        return (0.0, -min);
    }
    let nmax_f = nmax as f32;
    let mut iscale = nmax_f / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l_out[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    let mut aux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax_f) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = l as u8;
            let (w, l) = (weights[i], l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * f32::from(aux[i]) + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l_out[..n].copy_from_slice(&aux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qx_quants` with `rmse_type = 1` (weights `x²`, no importance matrix): signed
/// codes in `-nmax..nmax` stored offset by `nmax` in `l_out`, and the scale, choosing among the
/// step sizes `-(nmax + 0.1·is) / max` for `is` in `-9..=9` the one of least weighted error.
fn make_qx_quants(nmax: i32, x: &[f32], l_out: &mut [u8]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out[..x.len()].fill(0);
        return 0.0;
    }
    let nmax_f = nmax as f32;
    let code = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for &v in x {
            let (w, l) = (v * v, code(iscale, v) as f32);
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let mut iscale = -nmax_f / max;
    for (l, &v) in l_out.iter_mut().zip(x) {
        *l = (code(iscale, v) + nmax) as u8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in (-9..=9).filter(|&is| is != 0) {
        iscale = -(nmax_f + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (l, &v) in l_out.iter_mut().zip(x) {
                *l = (code(iscale, v) + nmax) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
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

/// One super-block of 256 values → Q4_K (144 bytes: f16 `d`, f16 `dmin`, 12 bytes of packed
/// 6-bit scales and minima, 128 bytes of 4-bit codes) or, with `five`, Q5_K (176 bytes: the
/// same, then 32 bytes of fifth bits before the low nibbles).
pub(super) fn encode_q4_q5_k(five: bool, x: &[f32], out: &mut Vec<u8>) {
    let (nmax, search) = if five {
        (31, (-0.5, 0.1, 15))
    } else {
        (15, (-1.0, 0.1, 20))
    };
    let mut codes = [0u8; QK_K];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    let mut weights = [0f32; 32];
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let codes_j = &mut codes[32 * j..32 * j + 32];
        (scales[j], mins[j]) = make_qkx2_quants(nmax, xs, &weights, codes_j, search);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..8 {
        // ggml stores `nearest_int` in a byte (wrapping), then caps it at 63.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    // The codes again, against the scales as stored; a sub-block whose stored scale is zero
    // keeps the codes of the search.
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &packed);
        let dj = d.to_f32() * sc;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m;
        for i in 32 * j..32 * j + 32 {
            codes[i] = nearest_int((x[i] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    out.extend(d.to_le_bytes());
    out.extend(dmin.to_le_bytes());
    out.extend(packed);
    let mut qh = [0u8; 32];
    let mut qs = [0u8; 128];
    for (chunk, n) in (0..QK_K).step_by(64).enumerate() {
        for j in 0..32 {
            let (mut lo, mut hi) = (codes[n + j], codes[n + j + 32]);
            if lo > 15 {
                lo -= 16;
                qh[j] |= 1 << (2 * chunk);
            }
            if hi > 15 {
                hi -= 16;
                qh[j] |= 2 << (2 * chunk);
            }
            qs[32 * chunk + j] = lo | (hi << 4);
        }
    }
    if five {
        out.extend(qh);
    }
    out.extend(qs);
}

/// One super-block of 256 values → Q6_K (210 bytes: 128 bytes of low nibbles, 64 of high
/// 2-bit pairs, 16 signed 8-bit scales, then the f16 `d`).
pub(super) fn encode_q6_k(x: &[f32], out: &mut Vec<u8>) {
    let mut codes = [0u8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        scales[ib] = make_qx_quants(32, &x[16 * ib..16 * ib + 16], &mut codes[16 * ib..]);
        if scales[ib].abs() > max_abs_scale {
            max_abs_scale = scales[ib].abs();
            max_scale = scales[ib];
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        out.extend([0u8; 210]);
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = f16::from_f32(1.0 / iscale);
    let mut sc = [0i8; 16];
    for (s, &scale) in sc.iter_mut().zip(&scales) {
        *s = nearest_int(iscale * scale).min(127) as i8;
    }
    for (j, &s) in sc.iter().enumerate() {
        let dj = d.to_f32() * f32::from(s);
        if dj == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            codes[i] = (nearest_int(x[i] / dj).clamp(-32, 31) + 32) as u8;
        }
    }
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for half in 0..2 {
        let l = &codes[128 * half..128 * half + 128];
        for i in 0..32 {
            ql[64 * half + i] = (l[i] & 0xF) | ((l[i + 64] & 0xF) << 4);
            ql[64 * half + i + 32] = (l[i + 32] & 0xF) | ((l[i + 96] & 0xF) << 4);
            qh[32 * half + i] = (l[i] >> 4)
                | ((l[i + 32] >> 4) << 2)
                | ((l[i + 64] >> 4) << 4)
                | ((l[i + 96] >> 4) << 6);
        }
    }
    out.extend(ql);
    out.extend(qh);
    out.extend(sc.map(|s| s as u8));
    out.extend(d.to_le_bytes());
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// One Q4_K or Q5_K super-block → 256 values (ggml's `dequantize_row_q4_K` / `_q5_K`).
pub(super) fn decode_q4_q5_k(five: bool, b: &[u8], out: &mut Vec<f32>) {
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
pub(super) fn decode_q6_k(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 208);
    let mut block = [0f32; QK_K];
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(3.5), 4);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(-0.4), 0);
        assert_eq!(nearest_int(1234.6), 1235);
    }

    /// Encoding then decoding keeps each value within a fraction of the block's range: the
    /// search can only improve on the plain min/max grid (step = range / nmax).
    #[test]
    fn k_quants_round_trip_within_a_step() {
        let x: Vec<f32> = (0..QK_K)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013 + (i / 32) as f32 * 0.01)
            .collect();
        for (five, bytes, nmax) in [(false, 144, 15.0), (true, 176, 31.0)] {
            let mut enc = Vec::new();
            encode_q4_q5_k(five, &x, &mut enc);
            assert_eq!(enc.len(), bytes);
            let mut back = Vec::new();
            decode_q4_q5_k(five, &enc, &mut back);
            for (j, (a, b)) in x.iter().zip(&back).enumerate() {
                let sub = &x[j / 32 * 32..j / 32 * 32 + 32];
                let range = sub.iter().fold(0f32, |m, v| m.max(*v))
                    - sub.iter().fold(0f32, |m, v| m.min(*v));
                assert!(
                    (a - b).abs() <= range / nmax,
                    "Q{}_K value {j}: {a} vs {b}",
                    if five { 5 } else { 4 }
                );
            }
        }
        let mut enc = Vec::new();
        encode_q6_k(&x, &mut enc);
        assert_eq!(enc.len(), 210);
        let mut back = Vec::new();
        decode_q6_k(&enc, &mut back);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() <= amax / 32.0 * 1.1, "Q6_K: {a} vs {b}");
        }
    }

    /// An all-zero super-block is all zero bytes in Q6_K (ggml's early exit) and decodes to
    /// zeros in every type.
    #[test]
    fn zero_blocks() {
        let zeros = [0f32; QK_K];
        let mut q6 = Vec::new();
        encode_q6_k(&zeros, &mut q6);
        assert_eq!(q6, vec![0u8; 210]);
        for five in [false, true] {
            let mut enc = Vec::new();
            encode_q4_q5_k(five, &zeros, &mut enc);
            let mut back = Vec::new();
            decode_q4_q5_k(five, &enc, &mut back);
            assert!(back.iter().all(|v| *v == 0.0));
        }
    }
}
