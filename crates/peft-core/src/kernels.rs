//! Slice kernels behind [`crate::fused`]: the element-wise and row-wise work of a training step
//! done in one pass over memory, with an `exp` the compiler can vectorise.
//!
//! Every kernel is compiled three times — AVX-512, AVX2 + FMA and the baseline — and the widest
//! the CPU supports is picked at run time (the build itself targets baseline x86-64), and runs on
//! rayon's pool in chunks, as burn's CPU backend does.

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

/// √(2/π), the GELU tanh approximation's constant.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The cubic term's coefficient in the GELU tanh approximation.
const GELU_CUBIC: f32 = 0.044_715;

/// `σ(2z)` for GELU's `z = √(2/π)·(x + 0.044715·x³)`: `½(1 + tanh z)`.
#[inline(always)]
fn gelu_gate(x: f32) -> f32 {
    let z = SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x);
    1.0 / (1.0 + exp(-2.0 * z))
}

multiversion! {
    fn gelu_tanh_chunk(x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x * gelu_gate(x);
        }
    }
}

multiversion! {
    fn gelu_tanh_backward_chunk(x: &[f32], grad: &[f32], out: &mut [f32]) {
        for ((out, &x), &g) in out.iter_mut().zip(x).zip(grad) {
            let s = gelu_gate(x);
            // d/dx [x·σ(2z)] = σ + x·σ(1−σ)·2·dz/dx
            let dz = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x * x);
            *out = g * (s + x * s * (1.0 - s) * 2.0 * dz);
        }
    }
}

/// GELU with the tanh approximation (BLOOM's `bloom_gelu_forward`), `y = x·σ(2z)`.
pub fn gelu_tanh(x: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| gelu_tanh_chunk(x, y));
}

/// `∂x = ∂y · gelu'(x)` for [`gelu_tanh`].
pub fn gelu_tanh_backward(x: &[f32], grad: &[f32], out: &mut [f32]) {
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(grad.par_chunks(CHUNK)))
        .for_each(|(out, (x, g))| gelu_tanh_backward_chunk(x, g, out));
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

multiversion! {
    /// `exps[i] = e^(row[i] − max)`; returns `(max, Σ exps)`.
    fn shifted_exps(row: &[f32], exps: &mut [f32]) -> (f32, f32) {
        let max = max_of(row);
        let mut acc = [0.0f32; LANES];
        let mut outs = exps.chunks_exact_mut(LANES);
        let mut ins = row.chunks_exact(LANES);
        for (out, chunk) in (&mut outs).zip(&mut ins) {
            for ((a, e), &v) in acc.iter_mut().zip(out.iter_mut()).zip(chunk) {
                *e = exp(v - max);
                *a += *e;
            }
        }
        let mut sum: f32 = acc.iter().sum();
        for (e, &v) in outs.into_remainder().iter_mut().zip(ins.remainder()) {
            *e = exp(v - max);
            sum += *e;
        }
        (max, sum)
    }
}

multiversion! {
    /// `(max, Σ e^(row[i] − max))` without storing the exponentials.
    fn shifted_exp_sum(row: &[f32]) -> (f32, f32) {
        let max = max_of(row);
        let mut acc = [0.0f32; LANES];
        let chunks = row.chunks_exact(LANES);
        let rest = chunks.remainder();
        for chunk in chunks {
            for (a, &v) in acc.iter_mut().zip(chunk) {
                *a += exp(v - max);
            }
        }
        let sum = acc.iter().sum::<f32>() + rest.iter().map(|&v| exp(v - max)).sum::<f32>();
        (max, sum)
    }
}

multiversion! {
    fn scale(values: &mut [f32], by: f32) {
        for v in values {
            *v *= by;
        }
    }
}

/// Per-row cross-entropy of `logits: [rows, vocab]` (row-major) against `targets: [rows]`:
/// `nll[r] = logsumexp(logits[r]) − logits[r][targets[r]]`, 0 for a row whose target is
/// negative (ignored). With `probs` (`[rows, vocab]`), also writes the gradient of `nll[r]` with
/// respect to the row, `softmax(logits[r]) − onehot(targets[r])` (zeros for ignored rows), from
/// the same exponentials.
///
/// A target at or above `vocab` gives a NaN loss (and a zero gradient).
pub fn cross_entropy_rows(
    logits: &[f32],
    vocab: usize,
    targets: &[i64],
    nll: &mut [f32],
    probs: Option<&mut [f32]>,
) {
    let row = |r: usize, nll: &mut f32, probs: Option<&mut [f32]>| {
        let values = &logits[r * vocab..(r + 1) * vocab];
        let target = targets[r];
        let ignored = target < 0;
        if target >= vocab as i64 {
            // Not a class of this vocabulary: a NaN loss, and no gradient, rather than a panic.
            *nll = f32::NAN;
            if let Some(p) = probs {
                p.fill(0.0);
            }
            return;
        }
        let (max, sum) = match probs {
            Some(p) if ignored => {
                p.fill(0.0);
                (0.0, 1.0)
            }
            Some(p) => {
                let (max, sum) = shifted_exps(values, p);
                scale(p, 1.0 / sum);
                p[target as usize] -= 1.0;
                (max, sum)
            }
            None if ignored => (0.0, 1.0),
            None => shifted_exp_sum(values),
        };
        *nll = if ignored {
            0.0
        } else {
            max + sum.ln() - values[target as usize]
        };
    };
    match probs {
        Some(probs) => nll
            .par_iter_mut()
            .zip(probs.par_chunks_mut(vocab.max(1)))
            .enumerate()
            .for_each(|(r, (nll, p))| row(r, nll, Some(p))),
        None => nll
            .par_iter_mut()
            .enumerate()
            .for_each(|(r, nll)| row(r, nll, None)),
    }
}

/// `values[r][..] *= by[r]` for `values: [rows, width]`.
pub fn scale_rows(values: &mut [f32], width: usize, by: &[f32]) {
    values
        .par_chunks_mut(width.max(1))
        .zip(by.par_iter())
        .for_each(|(row, &s)| scale(row, s));
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn gelu_matches_the_tanh_formula_and_its_derivative() {
        let x: Vec<f32> = (-400..400).map(|i| i as f32 * 0.025).collect();
        let mut y = vec![0.0; x.len()];
        gelu_tanh(&x, &mut y);
        let gelu = |x: f64| {
            0.5 * x * (1.0 + (0.797_884_560_802_865_4 * (x + 0.044715 * x.powi(3))).tanh())
        };
        for (&x, &y) in x.iter().zip(&y) {
            assert!((y as f64 - gelu(x as f64)).abs() < 1e-6, "gelu({x}) = {y}");
        }
        let ones = vec![1.0; x.len()];
        let mut dx = vec![0.0; x.len()];
        gelu_tanh_backward(&x, &ones, &mut dx);
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
