//! Slice kernels behind [`crate::fused`]: the element-wise and row-wise work of a training step
//! done in one pass over memory, with an `exp` the compiler can vectorise.
//!
//! Every kernel is compiled three times — AVX-512, AVX2 + FMA and the baseline — and the widest
//! the CPU supports is picked at run time (the build itself targets baseline x86-64), and runs on
//! rayon's pool in chunks, as burn's CPU backend does.

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// Elements per parallel chunk of the element-wise kernels: large enough that scheduling costs
/// nothing next to the work, small enough that both cores get a share of a `[512, 2048]` tensor.
const CHUNK: usize = 1 << 14;

/// Compiles `kernel` for AVX-512, for AVX2 + FMA and for the baseline, and defines `$name` to
/// call the widest variant this CPU runs. The body is an `#[inline(always)]` function, so each
/// variant is compiled (and auto-vectorised) with its own target features.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn kernel($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                fn v4($($arg: $ty),*) $(-> $ret)? {
                    kernel($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn v3($($arg: $ty),*) $(-> $ret)? {
                    kernel($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU supports every feature `v4` is compiled with.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports every feature `v3` is compiled with.
                    return unsafe { v3($($arg),*) };
                }
            }
            kernel($($arg),*)
        }
    };
}

/// `eˣ` in f32 without branches or calls, so that loops over it vectorise: `x = n·ln2 + r` with
/// `|r| ≤ ln2/2`, `eʳ` by its degree-7 Taylor polynomial, `2ⁿ` built in exponent bits.
/// Relative error below 2.5e-7 (2 ulp) over the whole range; `x < -87.33` gives 0 (the result
/// would be subnormal), `x > 88.72` gives +∞, NaN gives NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that `n · LN2_HI` is exact for |n| < 2^9.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 · 2^23: adding it rounds to an integer, held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.clamp(-87.33, 88.72);
    let shifted = clamped * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let exponent = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    // 2ⁿ as two factors: n reaches 128 near the top of the range, past f32's largest exponent.
    let half = exponent >> 1;
    let y = p
        * f32::from_bits(((half + 127) << 23) as u32)
        * f32::from_bits(((exponent - half + 127) << 23) as u32);
    if x < -87.33 {
        0.0
    } else if x > 88.72 {
        f32::INFINITY
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// Lanes of the vectorised reductions: independent partial results the compiler can keep in
/// one AVX-512 register (a plain running sum is a serial chain it may not reorder).
const LANES: usize = 16;

/// The largest value of `row` (−∞ for an empty row; NaN-ignoring, as `f32::max`).
#[inline(always)]
fn max_of(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = a.max(v);
        }
    }
    rest.iter()
        .chain(&acc)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// Σ of a row with [`LANES`] partial sums.
#[inline(always)]
fn sum_of(values: impl Iterator<Item = f32>) -> f32 {
    let mut acc = [0.0f32; LANES];
    for (i, v) in values.enumerate() {
        acc[i % LANES] += v;
    }
    acc.iter().sum()
}

mod attention;
mod bf16;
mod dot;
mod gelu;
mod norm;
mod rope;
mod rows;
mod silu;

pub use attention::*;
pub use bf16::*;
pub use dot::*;
pub use gelu::*;
pub use norm::*;
pub use rope::*;
pub use rows::*;
pub use silu::*;

#[cfg(test)]
mod tests {
    use super::*;

    /// `len` values written by `fill` into a buffer of NaNs (so an element it leaves shows).
    fn written(len: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
        let mut buffer = vec![MaybeUninit::new(f32::NAN); len];
        fill(&mut buffer);
        // SAFETY: every element was initialised (to NaN) before `fill` ran.
        buffer.iter().map(|v| unsafe { v.assume_init() }).collect()
    }

    /// The branch-free rounding is `half`'s, bit for bit: ties both ways, the largest values
    /// (rounding to ∞), subnormals, signed zeros, infinities and NaNs (quiet, payload kept).
    #[test]
    fn bf16_rounding_matches_half() {
        let mut values = vec![
            0.0f32,
            -0.0,
            1.0,
            f32::from_bits(0x3f80_8000), // tie, even below: stays
            f32::from_bits(0x3f81_8000), // tie, odd below: up
            f32::from_bits(0x3f80_8001),
            f32::MAX,
            -f32::MAX,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7f80_0001), // signalling NaN
            f32::from_bits(0xffc0_1234),
        ];
        values.extend((0..100_000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761))));
        let mut bits = vec![0u16; values.len()];
        round_to_bf16_bits(&values, &mut bits);
        let mut rounded = values.clone();
        round_bf16_in_place(&mut rounded);
        for ((&v, &b), &r) in values.iter().zip(&bits).zip(&rounded) {
            let expected = half::bf16::from_f32(v).to_bits();
            assert_eq!(b, expected, "{v:e} ({:#010x})", v.to_bits());
            assert_eq!(r.to_bits(), u32::from(expected) << 16, "{v:e}");
        }
        let bias = [0.5f32, -0.25, 1.0 / 3.0];
        let mut rows: Vec<f32> = (0..12).map(|i| i as f32 / 7.0).collect();
        let expected: Vec<f32> = rows
            .iter()
            .enumerate()
            .map(|(i, &v)| half::bf16::from_f32(v + bias[i % 3]).to_f32())
            .collect();
        add_bias_round_bf16(&mut rows, &bias);
        assert_eq!(rows, expected);
    }

    /// Each row of `dot_rows_bf16` is the same bits whatever rows share the call (groups of
    /// four, a remainder, alone), and close to the f64 value; odd lengths reach the tail loop.
    #[test]
    fn bf16_row_dots_do_not_depend_on_the_other_rows() {
        for k in [0usize, 5, 16, 61, 2048] {
            let rows = 6;
            let x: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.3)
                .collect();
            let bits: Vec<u16> = (0..k)
                .map(|i| half::bf16::from_f32(((i * 53 % 97) as f32 - 48.0) / 3.1).to_bits())
                .collect();
            let mut together = vec![0.0f32; rows];
            dot_rows_bf16(&x, rows, &bits, &mut together);
            for r in 0..rows {
                let mut alone = [0.0f32];
                dot_rows_bf16(&x[r * k..(r + 1) * k], 1, &bits, &mut alone);
                assert_eq!(
                    alone[0].to_bits(),
                    together[r].to_bits(),
                    "k = {k}, row {r}"
                );
                let exact: f64 = (0..k)
                    .map(|p| {
                        f64::from(x[r * k + p])
                            * f64::from(f32::from_bits(u32::from(bits[p]) << 16))
                    })
                    .sum();
                let scale: f64 = (0..k).map(|p| f64::from(x[r * k + p]).abs() * 16.0).sum();
                assert!(
                    (f64::from(alone[0]) - exact).abs() <= 1e-6 * scale.max(1.0),
                    "k = {k}"
                );
            }
        }
    }

    #[test]
    fn exp_is_within_two_ulp_over_the_range() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.5 {
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    /// The normalisation kernels write every element of their outputs (the buffers start as
    /// NaN, the row count is not a multiple of the rows per task): LayerNorm and RMSNorm values
    /// against an f64 reference, and their gradients through the invariances — a LayerNorm
    /// row's `∂x` sums to zero (shifting a row changes nothing), an RMSNorm row's `x · ∂x` is
    /// zero (scaling a row changes nothing, up to `eps`).
    #[test]
    fn norms_write_every_output_element() {
        let (rows, dim) = (37, 19);
        let x: Vec<f32> = (0..rows * dim)
            .map(|i| ((i * 7) % 13) as f32 * 0.3 - 1.7)
            .collect();
        let grad: Vec<f32> = (0..rows * dim)
            .map(|i| ((i * 5) % 11) as f32 * 0.1 - 0.5)
            .collect();
        let w: Vec<f32> = (0..dim).map(|i| 0.5 + i as f32 * 0.1).collect();
        let b: Vec<f32> = (0..dim).map(|i| i as f32 * -0.05).collect();
        for rms in [false, true] {
            let norm = Norm {
                weight: &w,
                bias: (!rms).then_some(&b[..]),
                eps: 1e-9,
                rms,
            };
            let mut stats = vec![f32::NAN; rows * 2];
            let y = written(rows * dim, |y| super::norm(&x, dim, &norm, y, &mut stats));
            let dx = written(rows * dim, |dx| {
                norm_backward(&x, &grad, dim, &norm, &stats, dx, None)
            });
            for r in 0..rows {
                let row = &x[r * dim..(r + 1) * dim];
                let mean = match rms {
                    true => 0.0,
                    false => row.iter().map(|&v| f64::from(v)).sum::<f64>() / dim as f64,
                };
                let var = row
                    .iter()
                    .map(|&v| (f64::from(v) - mean).powi(2))
                    .sum::<f64>()
                    / dim as f64;
                let rstd = 1.0 / (var + 1e-9).sqrt();
                for c in 0..dim {
                    let shift = if rms { 0.0 } else { f64::from(b[c]) };
                    let expected = (f64::from(row[c]) - mean) * rstd * f64::from(w[c]) + shift;
                    let got = f64::from(y[r * dim + c]);
                    assert!((got - expected).abs() < 1e-5, "rms {rms} [{r}, {c}]: {got}");
                }
                let dx_row = &dx[r * dim..(r + 1) * dim];
                assert!(dx_row.iter().all(|v| v.is_finite()), "rms {rms} row {r}");
                let invariant: f64 = match rms {
                    false => dx_row.iter().map(|&d| f64::from(d)).sum(),
                    true => dx_row
                        .iter()
                        .zip(row)
                        .map(|(&d, &v)| f64::from(d * v))
                        .sum(),
                };
                assert!(invariant.abs() < 1e-4, "rms {rms} row {r}: {invariant}");
            }
        }
    }

    #[test]
    fn gelu_matches_the_tanh_formula_and_its_derivative() {
        let x: Vec<f32> = (-400..400).map(|i| i as f32 * 0.025).collect();
        let y = written(x.len(), |y| gelu_tanh(&x, y));
        let gelu = |x: f64| {
            0.5 * x * (1.0 + (0.797_884_560_802_865_4 * (x + 0.044715 * x.powi(3))).tanh())
        };
        for (&x, &y) in x.iter().zip(&y) {
            assert!((y as f64 - gelu(x as f64)).abs() < 1e-6, "gelu({x}) = {y}");
        }
        let ones = vec![1.0; x.len()];
        let dx = written(x.len(), |dx| gelu_tanh_backward(&x, &ones, dx));
        for (&x, &d) in x.iter().zip(&dx) {
            let h = 1e-4;
            let numeric = (gelu(x as f64 + h) - gelu(x as f64 - h)) / (2.0 * h);
            assert!(
                (d as f64 - numeric).abs() < 1e-5,
                "gelu'({x}) = {d}, numeric {numeric}"
            );
        }
    }

    #[test]
    fn cross_entropy_rows_and_gradient_match_the_definition() {
        // rows: target 2, ignored, target 0 (with a large logit to test the max shift).
        let logits = [1.0f32, 2.0, 3.0, 5.0, 5.0, 5.0, 100.0, 0.0, -1.0];
        let targets = [2i64, -100, 0];
        let mut nll = [9.0f32; 3];
        let mut probs = [9.0f32; 9];
        cross_entropy_rows(&logits, 3, &targets, &mut nll, Some(&mut probs));
        let lse0 = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((nll[0] as f64 - (lse0 - 3.0)).abs() < 1e-6);
        assert_eq!(nll[1], 0.0);
        assert!(nll[2].abs() < 1e-6);
        for (i, &v) in [1.0f64, 2.0, 3.0].iter().enumerate() {
            let softmax = (v - lse0).exp();
            let want = softmax - if i == 2 { 1.0 } else { 0.0 };
            assert!((probs[i] as f64 - want).abs() < 1e-6, "{i}: {}", probs[i]);
        }
        assert_eq!(&probs[3..6], &[0.0; 3]);
        // e^-100 and e^-101 are subnormal: flushed to 0 (see `exp`).
        assert!(probs[6].abs() < 1e-6 && probs[7] == 0.0 && probs[8] == 0.0);
        let mut plain = [0.0f32; 3];
        cross_entropy_rows(&logits, 3, &targets, &mut plain, None);
        assert_eq!(plain, nll);
    }
}
