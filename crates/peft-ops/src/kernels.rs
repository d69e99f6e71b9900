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
    fn gelu_tanh_chunk(x: &[f32], y: &mut [MaybeUninit<f32>]) {
        for (y, &x) in y.iter_mut().zip(x) {
            y.write(x * gelu_gate(x));
        }
    }
}

multiversion! {
    fn gelu_tanh_backward_chunk(x: &[f32], grad: &[f32], out: &mut [MaybeUninit<f32>]) {
        for ((out, &x), &g) in out.iter_mut().zip(x).zip(grad) {
            let s = gelu_gate(x);
            // d/dx [x·σ(2z)] = σ + x·σ(1−σ)·2·dz/dx
            let dz = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x * x);
            out.write(g * (s + x * s * (1.0 - s) * 2.0 * dz));
        }
    }
}

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
    fn bf16_bits_chunk(values: &[f32], bits: &mut [u16]) {
        for (b, &v) in bits.iter_mut().zip(values) {
            *b = bf16_bits(v);
        }
    }
}

multiversion! {
    fn round_bf16_chunk(values: &mut [f32]) {
        for v in values {
            *v = f32::from_bits(u32::from(bf16_bits(*v)) << 16);
        }
    }
}

multiversion! {
    fn add_round_bf16_row(row: &mut [f32], bias: &[f32]) {
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

/// GELU with the tanh approximation (BLOOM's `bloom_gelu_forward`), `y = x·σ(2z)`. Writes every
/// element of `y` when it is as long as `x` (it need not be initialised).
pub fn gelu_tanh(x: &[f32], y: &mut [MaybeUninit<f32>]) {
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| gelu_tanh_chunk(x, y));
}

/// `∂x = ∂y · gelu'(x)` for [`gelu_tanh`]. Writes every element of `out` when `x`, `grad` and
/// `out` are equally long.
pub fn gelu_tanh_backward(x: &[f32], grad: &[f32], out: &mut [MaybeUninit<f32>]) {
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
    /// `Σ a[i]·b[i]` over the common length with eight independent accumulators, summed in
    /// order at the end: the same summation order on every CPU (the wider variants only
    /// vectorise it), so a result never depends on which variant ran.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (a, b) = (&a[..n], &b[..n]);
        let mut acc = [0.0f32; 8];
        let (a8, a_rest) = a.split_at(n / 8 * 8);
        let (b8, b_rest) = b.split_at(n / 8 * 8);
        for (ca, cb) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
            for k in 0..8 {
                acc[k] += ca[k] * cb[k];
            }
        }
        let mut sum = acc.iter().sum::<f32>();
        for (x, y) in a_rest.iter().zip(b_rest) {
            sum += x * y;
        }
        sum
    }
}

/// Accumulator lanes of [`dot_rows_bf16`]: one AVX-512 register of f32.
const DOT_LANES: usize = 16;
/// Input rows sharing each widened weight chunk in [`dot_rows_bf16`].
const DOT_ROWS: usize = 4;

multiversion! {
    /// `out[r] = Σ_p x[r·k + p] · w[p]` for `rows` input rows against one bf16 weight row `w`
    /// (bit patterns, widened exactly in registers). Each row keeps 16 accumulator lanes updated
    /// by fused multiply-adds (`f32::mul_add`: one rounding, the same bits with or without FMA
    /// hardware) and sums them in order at the end, so a row's result never depends on which
    /// other rows share the weight loads (a decoding row alone equals itself in a batch) nor on
    /// the CPU's vector width. Rows go four at a time through each widened chunk of `w`.
    pub fn dot_rows_bf16(x: &[f32], rows: usize, w: &[u16], out: &mut [f32]) {
        let k = w.len();
        let full = k / DOT_LANES * DOT_LANES;
        let widen = |b: u16| f32::from_bits(u32::from(b) << 16);
        for first in (0..rows).step_by(DOT_ROWS) {
            let group = DOT_ROWS.min(rows - first);
            let mut acc = [[0.0f32; DOT_LANES]; DOT_ROWS];
            for p in (0..full).step_by(DOT_LANES) {
                let mut wv = [0.0f32; DOT_LANES];
                for (v, b) in wv.iter_mut().zip(&w[p..p + DOT_LANES]) {
                    *v = widen(*b);
                }
                for (g, acc) in acc.iter_mut().enumerate().take(group) {
                    let xr = &x[(first + g) * k + p..(first + g) * k + p + DOT_LANES];
                    for lane in 0..DOT_LANES {
                        acc[lane] = xr[lane].mul_add(wv[lane], acc[lane]);
                    }
                }
            }
            for (g, acc) in acc.iter().enumerate().take(group) {
                let xr = &x[(first + g) * k..(first + g + 1) * k];
                let mut sum = acc.iter().sum::<f32>();
                for (a, b) in xr[full..].iter().zip(&w[full..]) {
                    sum = a.mul_add(widen(*b), sum);
                }
                out[first + g] = sum;
            }
        }
    }
}

/// `[rows, n]` row-major, computed output feature by output feature: `fill(state, o, out)`
/// writes feature `o`'s value for every input row (row `r` at `out[r]`). Blocks of `block`
/// features run in parallel, each task with its own `init()` state (a scratch buffer, or
/// nothing), and the result is transposed into row order once at the end. The shape of every
/// few-row product that reads each weight row once for all input rows.
pub fn by_output_features<S>(
    rows: usize,
    n: usize,
    block: usize,
    init: impl Fn() -> S + Sync + Send,
    fill: impl Fn(&mut S, usize, &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    let rows = rows.max(1);
    let mut out_t = vec![0.0f32; n * rows];
    out_t
        .par_chunks_mut(block.max(1) * rows)
        .enumerate()
        .for_each_init(init, |state, (b, out)| {
            for (j, out) in out.chunks_mut(rows).enumerate() {
                fill(state, b * block + j, out);
            }
        });
    let mut out = vec![0.0f32; rows * n];
    for (o, values) in out_t.chunks(rows).enumerate() {
        for (r, v) in values.iter().enumerate() {
            out[r * n + o] = *v;
        }
    }
    out
}

/// Output features per parallel task of [`few_rows_times_transposed`].
const FEW_ROWS_BLOCK: usize = 64;

/// `x · Wᵀ` for a few input rows `x: [rows, k]` and a row-major `W: [n, k]` (a linear layer's
/// `[out, in]` weight, or a tied embedding table as `lm_head`): each output is one [`dot`] of
/// an input row with a weight row, so a row's result does not depend on how many rows are
/// multiplied with it (a decoding step alone equals the same step in a batch, bit for bit), and
/// each weight row is read once for all input rows. `[rows, n]` row-major.
pub fn few_rows_times_transposed(
    x: &[f32],
    rows: usize,
    w: &[f32],
    n: usize,
    k: usize,
) -> Vec<f32> {
    by_output_features(
        rows,
        n,
        FEW_ROWS_BLOCK,
        || (),
        |_, o, out| {
            let weight_row = &w[o * k..(o + 1) * k];
            for (r, value) in out.iter_mut().enumerate() {
                *value = dot(&x[r * k..(r + 1) * k], weight_row);
            }
        },
    )
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

/// `row[i] ← e^(row[i] − max)` in place; returns `(max, Σ)`. Inlined into its callers so that it
/// vectorises for their target features (as [`max_of`]).
#[inline(always)]
fn exps_shifted_by_max(row: &mut [f32]) -> (f32, f32) {
    let max = max_of(row);
    let mut acc = [0.0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (a, v) in acc.iter_mut().zip(chunk.iter_mut()) {
            *v = exp(*v - max);
            *a += *v;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp(*v - max);
        sum += *v;
    }
    (max, sum)
}

multiversion! {
    /// [`exps_shifted_by_max`] compiled for the CPU's vector units.
    fn shifted_exps_in_place(row: &mut [f32]) -> (f32, f32) {
        exps_shifted_by_max(row)
    }
}

/// One row's cross-entropy against `target` (a class of the row), the row overwritten with its
/// gradient `softmax(row) − onehot(target)` — [`cross_entropy_rows`]' row in place, for the
/// chunked loss (the same vectorised exponentials).
pub fn cross_entropy_row_in_place(row: &mut [f32], target: usize) -> f32 {
    let value = row[target];
    let (max, sum) = shifted_exps_in_place(row);
    scale(row, 1.0 / sum);
    row[target] -= 1.0;
    max + sum.ln() - value
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

multiversion! {
    fn silu_mul_chunk(gate: &[f32], up: &[f32], y: &mut [f32]) {
        for ((y, &g), &u) in y.iter_mut().zip(gate).zip(up) {
            *y = g / (1.0 + exp(-g)) * u;
        }
    }
}

multiversion! {
    fn silu_mul_backward_chunk(
        gate: &[f32],
        up: &[f32],
        grad: &[f32],
        d_gate: &mut [f32],
        d_up: &mut [f32],
    ) {
        let rows = d_gate.iter_mut().zip(d_up.iter_mut()).zip(gate).zip(up).zip(grad);
        for ((((dg, du), &g), &u), &o) in rows {
            let s = 1.0 / (1.0 + exp(-g));
            *du = o * g * s;
            // d/dg [g·σ(g)] = σ + g·σ(1−σ)
            *dg = o * u * (s + g * s * (1.0 - s));
        }
    }
}

/// Llama's gated feed-forward activation `y = silu(gate) · up`, element-wise.
pub fn silu_mul(gate: &[f32], up: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(y, (g, u))| silu_mul_chunk(g, u, y));
}

/// `∂gate`, `∂up` of [`silu_mul`] from `∂y`.
pub fn silu_mul_backward(
    gate: &[f32],
    up: &[f32],
    grad: &[f32],
    d_gate: &mut [f32],
    d_up: &mut [f32],
) {
    d_gate
        .par_chunks_mut(CHUNK)
        .zip(d_up.par_chunks_mut(CHUNK))
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .zip(grad.par_chunks(CHUNK))
        .for_each(|(((dg, du), (g, u)), o)| silu_mul_backward_chunk(g, u, o, dg, du));
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

/// Parameters of a normalisation over the last dimension: LayerNorm (`(x − mean) / σ · w + b`)
/// or RMSNorm (`x / rms · w`).
#[derive(Clone, Copy, Debug)]
pub struct Norm<'a> {
    /// Scale, `[dim]`.
    pub weight: &'a [f32],
    /// Shift, `[dim]` (LayerNorm only).
    pub bias: Option<&'a [f32]>,
    /// Added to the variance (or mean square).
    pub eps: f32,
    /// RMSNorm: no mean subtracted, no shift.
    pub rms: bool,
}

multiversion! {
    /// One row: writes `y`, returns `(mean, 1/σ)` (mean 0 for RMSNorm).
    fn norm_row(x: &[f32], y: &mut [MaybeUninit<f32>], norm: &Norm<'_>) -> (f32, f32) {
        let n = x.len() as f32;
        let mean = if norm.rms { 0.0 } else { sum_of(x.iter().copied()) / n };
        let var = sum_of(x.iter().map(|&v| (v - mean) * (v - mean))) / n;
        let rstd = 1.0 / (var + norm.eps).sqrt();
        match norm.bias {
            Some(b) => {
                for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(norm.weight).zip(b) {
                    y.write((x - mean) * rstd * w + b);
                }
            }
            None => {
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(norm.weight) {
                    y.write((x - mean) * rstd * w);
                }
            }
        }
        (mean, rstd)
    }
}

multiversion! {
    /// One row's `∂x`: `1/σ · (ĝ − mean(ĝ) − x̂ · mean(ĝ ⊙ x̂))` with `ĝ = ∂y ⊙ w`, `x̂` the
    /// normalised row (no `mean(ĝ)` term for RMSNorm).
    fn norm_row_backward(
        x: &[f32],
        grad: &[f32],
        dx: &mut [MaybeUninit<f32>],
        norm: &Norm<'_>,
        stats: (f32, f32),
    ) {
        let (mean, rstd) = stats;
        let n = x.len() as f32;
        let w = norm.weight;
        let g_mean = if norm.rms {
            0.0
        } else {
            sum_of(grad.iter().zip(w).map(|(&g, &w)| g * w)) / n
        };
        let gx_mean = sum_of(
            grad.iter().zip(w).zip(x).map(|((&g, &w), &x)| g * w * (x - mean) * rstd),
        ) / n;
        for (((dx, &g), &w), &x) in dx.iter_mut().zip(grad).zip(w).zip(x) {
            let x_hat = (x - mean) * rstd;
            dx.write(rstd * (g * w - g_mean - x_hat * gx_mean));
        }
    }
}

multiversion! {
    /// `dw += ∂y ⊙ x̂`, `db += ∂y` for one row.
    fn norm_row_param_grads(
        x: &[f32],
        grad: &[f32],
        stats: (f32, f32),
        dw: &mut [f32],
        db: &mut [f32],
    ) {
        let (mean, rstd) = stats;
        for (((dw, db), &g), &x) in dw.iter_mut().zip(db.iter_mut()).zip(grad).zip(x) {
            *dw += g * (x - mean) * rstd;
            *db += g;
        }
    }
}

/// Rows per parallel task of the normalisations.
const NORM_ROWS: usize = 16;

/// Normalises each `dim`-wide row of `x` into `y`; writes each row's `(mean, 1/σ)` into
/// `stats: [rows, 2]` for the backward pass. Writes every element of `y` when it is as long as
/// `x` (it need not be initialised).
pub fn norm(x: &[f32], dim: usize, norm: &Norm<'_>, y: &mut [MaybeUninit<f32>], stats: &mut [f32]) {
    let dim = dim.max(1);
    y.par_chunks_mut(dim * NORM_ROWS)
        .zip(x.par_chunks(dim * NORM_ROWS))
        .zip(stats.par_chunks_mut(2 * NORM_ROWS))
        .for_each(|((y, x), stats)| {
            for ((y, x), st) in y
                .chunks_mut(dim)
                .zip(x.chunks(dim))
                .zip(stats.chunks_mut(2))
            {
                let (mean, rstd) = norm_row(x, y, norm);
                st[0] = mean;
                st[1] = rstd;
            }
        });
}

/// Gradients of [`norm`]: `dx` always (every element written when `x`, `grad` and `dx` are
/// equally long); `dw` (`∂y ⊙ x̂` summed over rows) and `db` (`∂y` summed) when asked.
#[allow(clippy::too_many_arguments)]
pub fn norm_backward(
    x: &[f32],
    grad: &[f32],
    dim: usize,
    norm: &Norm<'_>,
    stats: &[f32],
    dx: &mut [MaybeUninit<f32>],
    params: Option<(&mut [f32], &mut [f32])>,
) {
    let dim = dim.max(1);
    dx.par_chunks_mut(dim * NORM_ROWS)
        .zip(x.par_chunks(dim * NORM_ROWS))
        .zip(grad.par_chunks(dim * NORM_ROWS))
        .zip(stats.par_chunks(2 * NORM_ROWS))
        .for_each(|(((dx, x), g), st)| {
            let rows = dx.chunks_mut(dim).zip(x.chunks(dim)).zip(g.chunks(dim));
            for (((dx, x), g), st) in rows.zip(st.chunks(2)) {
                norm_row_backward(x, g, dx, norm, (st[0], st[1]));
            }
        });
    if let Some((dw, db)) = params {
        // Per-task partial sums, added up at the end: no task writes another's memory.
        let (w, b) = x
            .par_chunks(dim * NORM_ROWS * 8)
            .zip(grad.par_chunks(dim * NORM_ROWS * 8))
            .zip(stats.par_chunks(2 * NORM_ROWS * 8))
            .map(|((x, g), st)| {
                let (mut w, mut b) = (vec![0.0f32; dim], vec![0.0f32; dim]);
                for ((x, g), st) in x.chunks(dim).zip(g.chunks(dim)).zip(st.chunks(2)) {
                    norm_row_param_grads(x, g, (st[0], st[1]), &mut w, &mut b);
                }
                (w, b)
            })
            .reduce(
                || (vec![0.0f32; dim], vec![0.0f32; dim]),
                |(mut w, mut b), (w2, b2)| {
                    w.iter_mut().zip(&w2).for_each(|(a, v)| *a += v);
                    b.iter_mut().zip(&b2).for_each(|(a, v)| *a += v);
                    (w, b)
                },
            );
        dw.copy_from_slice(&w);
        db.copy_from_slice(&b);
    }
}

multiversion! {
    /// One `head_dim` row of rotary position embedding: `x·cos + rotate_half(x)·sin`, or with
    /// `inverse` its transpose (the backward pass: `g·cos + rotate_halfᵀ(g·sin)`).
    fn rope_row(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32], inverse: bool) {
        let half = x.len() / 2;
        let (x1, x2) = x.split_at(half);
        let (c1, c2) = cos.split_at(half);
        let (s1, s2) = sin.split_at(half);
        let (o1, o2) = out.split_at_mut(half);
        if inverse {
            for j in 0..half {
                o1[j] = x1[j] * c1[j] + x2[j] * s2[j];
                o2[j] = x2[j] * c2[j] - x1[j] * s1[j];
            }
        } else {
            for j in 0..half {
                o1[j] = x1[j] * c1[j] - x2[j] * s1[j];
                o2[j] = x2[j] * c2[j] + x1[j] * s2[j];
            }
        }
    }
}

/// Rotary position embedding (Llama's `apply_rotary_pos_emb`) of `x: [batch, heads, seq,
/// head_dim]` (any strides) with tables `cos`, `sin`: `[seq, head_dim]`, into contiguous `out`;
/// with `inverse` the backward pass (`x` is then `∂out`, `out` is `∂x`).
pub fn rope(x: View4<'_>, cos: &[f32], sin: &[f32], out: &mut [f32], inverse: bool) {
    let [_, heads, seq, head_dim] = x.dims;
    out.par_chunks_mut((seq * head_dim).max(1))
        .enumerate()
        .for_each(|(bh, block)| {
            let (b, h) = (bh / heads, bh % heads);
            let start = x.offset + b * x.strides[0] + h * x.strides[1];
            let mut row = vec![0.0f32; head_dim];
            for (p, out_row) in block.chunks_mut(head_dim.max(1)).enumerate() {
                let first = start + p * x.strides[2];
                let x_row: &[f32] = if x.strides[3] == 1 {
                    &x.data[first..first + head_dim]
                } else {
                    for (j, r) in row.iter_mut().enumerate() {
                        *r = x.data[first + j * x.strides[3]];
                    }
                    &row
                };
                let table = p * head_dim..(p + 1) * head_dim;
                rope_row(x_row, &cos[table.clone()], &sin[table], out_row, inverse);
            }
        });
}

/// A strided 4-D view `[d0, d1, rows, cols]` of f32 values (a burn CPU tensor's storage with its
/// layout), read in place by the attention kernels.
#[derive(Clone, Copy, Debug)]
pub struct View4<'a> {
    data: &'a [f32],
    offset: usize,
    strides: [usize; 4],
    dims: [usize; 4],
}

/// The strides of a view of `len` elements from `offset`, if all are non-negative and its last
/// element is inside.
fn checked_strides(
    len: usize,
    offset: usize,
    strides: &[isize],
    dims: [usize; 4],
) -> Option<[usize; 4]> {
    let strides: Vec<usize> = strides
        .iter()
        .map(|&s| usize::try_from(s).ok())
        .collect::<Option<_>>()?;
    let strides: [usize; 4] = strides.try_into().ok()?;
    if dims.contains(&0) {
        return Some(strides);
    }
    let last = offset
        + dims
            .iter()
            .zip(&strides)
            .map(|(d, s)| (d - 1) * s)
            .sum::<usize>();
    (last < len).then_some(strides)
}

impl<'a> View4<'a> {
    /// A view of `data` from `offset` with `strides` (elements); `None` when a stride is negative
    /// or the view would reach past `data`.
    pub fn new(
        data: &'a [f32],
        offset: usize,
        strides: &[isize],
        dims: [usize; 4],
    ) -> Option<Self> {
        let strides = checked_strides(data.len(), offset, strides, dims)?;
        Some(Self {
            data,
            offset,
            strides,
            dims,
        })
    }

    /// The `[rows, cols]` matrix at `[i0, i1]`: its first element and row/column strides.
    fn matrix(&self, i0: usize, i1: usize) -> (*const f32, isize, isize) {
        debug_assert!(i0 < self.dims[0] && i1 < self.dims[1]);
        let start = self.offset + i0 * self.strides[0] + i1 * self.strides[1];
        // In bounds: `new` checked the view's last element.
        let ptr = self.data[start..].as_ptr();
        (ptr, self.strides[2] as isize, self.strides[3] as isize)
    }
}

/// What the attention scores get besides `q·kᵀ`: a scale, an optional bias per key (ALiBi) and
/// which keys each query may see.
#[derive(Clone, Copy, Debug)]
pub struct ScoreMask<'a> {
    /// Multiplies `q·kᵀ`.
    pub scale: f32,
    /// Added after scaling, `[batch, heads, kv_len]` (the same for every query).
    pub bias: Option<&'a [f32]>,
    /// `[batch, q_len, kv_len]`, the same for every head; a query that may see no key attends
    /// uniformly to all (what a softmax over scores all set to the dtype's minimum gives, as in
    /// transformers' eager attention), with no gradient.
    pub allowed: &'a [bool],
}

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]` for strided matrices, on the calling thread: through
/// OpenBLAS where it can ([`crate::blas::sgemm_on_this_thread`]), else with the `gemm` crate.
///
/// # Safety
/// As [`strided_matmul`]'s.
unsafe fn small_matmul(
    dims: (usize, usize, usize),
    dst: *mut f32,
    dst_strides: (isize, isize),
    accumulate: bool,
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
) {
    // SAFETY: the caller's contract.
    let done = unsafe {
        crate::blas::sgemm_on_this_thread(
            dims,
            (dst, dst_strides.0, dst_strides.1),
            accumulate,
            lhs,
            rhs,
        )
    };
    if done {
        return;
    }
    // SAFETY: the caller's contract.
    unsafe {
        strided_matmul(
            dims,
            dst,
            dst_strides,
            accumulate,
            lhs,
            rhs,
            gemm::Parallelism::None,
        )
    }
}

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]` for strided matrices (`(pointer, row stride, column
/// stride)`) with the `gemm` crate, on `parallelism`'s threads.
///
/// # Safety
/// Each pointer with its strides must address a matrix of the given size inside one live
/// allocation, and `dst` must not overlap `lhs` or `rhs` or be written by another thread.
pub(crate) unsafe fn strided_matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_rs, dst_cs): (isize, isize),
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): (*const f32, isize, isize),
    (rhs, rhs_rs, rhs_cs): (*const f32, isize, isize),
    parallelism: gemm::Parallelism,
) {
    // SAFETY: the caller's contract; gemm reads `dst` only with `accumulate`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs,
            dst_rs,
            accumulate,
            lhs,
            lhs_cs,
            lhs_rs,
            rhs,
            rhs_cs,
            rhs_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

multiversion! {
    /// One row of scores to probabilities in place: scale, bias, mask, softmax.
    fn softmax_scores(row: &mut [f32], allowed: &[bool], bias: Option<&[f32]>, scale: f32) {
        if !allowed.iter().any(|&a| a) {
            let uniform = 1.0 / row.len() as f32;
            row.fill(uniform);
            return;
        }
        match bias {
            Some(bias) => {
                for ((s, &a), &b) in row.iter_mut().zip(allowed).zip(bias) {
                    *s = if a { *s * scale + b } else { f32::NEG_INFINITY };
                }
            }
            None => {
                for (s, &a) in row.iter_mut().zip(allowed) {
                    *s = if a { *s * scale } else { f32::NEG_INFINITY };
                }
            }
        }
        let (_, sum) = exps_shifted_by_max(row);
        let inv = 1.0 / sum;
        for s in row.iter_mut() {
            *s *= inv;
        }
    }
}

multiversion! {
    /// `∂scores` from `∂probs` (in place) and the probabilities of one row:
    /// `scale · p ⊙ (∂p − Σ ∂p ⊙ p)`; nothing flows through a row that saw no key.
    fn softmax_scores_backward(grad: &mut [f32], probs: &[f32], allowed: &[bool], scale: f32) {
        if !allowed.iter().any(|&a| a) {
            grad.fill(0.0);
            return;
        }
        let mut acc = [0.0f32; LANES];
        let chunks = grad.chunks_exact(LANES).zip(probs.chunks_exact(LANES));
        for (g, p) in chunks {
            for ((a, &g), &p) in acc.iter_mut().zip(g).zip(p) {
                *a += g * p;
            }
        }
        let tail = grad.len() / LANES * LANES;
        let dot = acc.iter().sum::<f32>()
            + grad[tail..].iter().zip(&probs[tail..]).map(|(g, p)| g * p).sum::<f32>();
        for (g, &p) in grad.iter_mut().zip(probs) {
            *g = scale * p * (*g - dot);
        }
    }
}

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionDims {
    /// Batch size.
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; divides `heads` (query head `h` reads key/value head
    /// `h / (heads / kv_heads)`).
    pub kv_heads: usize,
    /// Query positions.
    pub q_len: usize,
    /// Key/value positions.
    pub kv_len: usize,
    /// Features per head.
    pub head_dim: usize,
}

impl AttentionDims {
    /// Query heads per key/value head.
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// The `allowed` row of query `i` in batch row `b`.
fn allowed_row<'a>(mask: &ScoreMask<'a>, dims: &AttentionDims, b: usize, i: usize) -> &'a [bool] {
    let start = (b * dims.q_len + i) * dims.kv_len;
    &mask.allowed[start..start + dims.kv_len]
}

/// A strided 4-D destination `[d0, d1, rows, cols]` that the attention kernels write: its
/// tasks write disjoint `[rows, cols]` matrices of it from several threads, so it holds the
/// address of the exclusively borrowed storage rather than a slice.
#[derive(Debug)]
pub struct ViewMut4<'a> {
    base: usize,
    strides: [usize; 4],
    dims: [usize; 4],
    _borrow: std::marker::PhantomData<&'a mut [f32]>,
}

impl<'a> ViewMut4<'a> {
    /// A view of `data` from `offset` with `strides` (elements); `None` when a stride is negative
    /// or the view would reach past `data`. Distinct indices must map to distinct elements (any
    /// layout a tensor has), since tasks write different indices concurrently.
    pub fn new(
        data: &'a mut [f32],
        offset: usize,
        strides: &[isize],
        dims: [usize; 4],
    ) -> Option<Self> {
        // SAFETY: `data` is exclusively borrowed for 'a.
        unsafe { Self::from_raw_parts(data.as_mut_ptr(), data.len(), offset, strides, dims) }
    }

    /// [`ViewMut4::new`] over `len` elements at `data`, for several views that interleave in
    /// one buffer (each maps elements the others do not).
    ///
    /// # Safety
    /// `data` must be valid for writes of `len` elements for 'a, and nothing but views whose
    /// elements are disjoint from this one's may access them meanwhile.
    pub unsafe fn from_raw_parts(
        data: *mut f32,
        len: usize,
        offset: usize,
        strides: &[isize],
        dims: [usize; 4],
    ) -> Option<Self> {
        let strides = checked_strides(len, offset, strides, dims)?;
        Some(Self {
            base: data.wrapping_add(offset) as usize,
            strides,
            dims,
            _borrow: std::marker::PhantomData,
        })
    }

    /// A contiguous `[d0, d1, rows, cols]` view of `data`.
    pub fn contiguous(data: &'a mut [f32], dims: [usize; 4]) -> Option<Self> {
        let [_, d1, rows, cols] = dims;
        let strides = [d1 * rows * cols, rows * cols, cols, 1].map(|s| s as isize);
        Self::new(data, 0, &strides, dims)
    }

    /// The `[rows, cols]` matrix at `[i0, i1]`: its first element and row/column strides.
    fn matrix(&self, i0: usize, i1: usize) -> (*mut f32, isize, isize) {
        assert!(i0 < self.dims[0] && i1 < self.dims[1]);
        let start = i0 * self.strides[0] + i1 * self.strides[1];
        // In bounds: `new` checked the view's last element against the storage.
        let ptr = (self.base as *mut f32).wrapping_add(start);
        (ptr, self.strides[2] as isize, self.strides[3] as isize)
    }
}

/// Query rows handled together: a block multiplies only the keys some row of it can see.
const QUERY_BLOCK: usize = 32;

/// For each block of [`QUERY_BLOCK`] query rows of each batch row, the keys its rows can see
/// (`[batch, blocks]` ranges): from the first key any row of the block sees to one past the
/// last, or every key when a row sees none (it attends uniformly to all).
///
/// With a causal mask about half of the score and product work lies past the ends, and is
/// skipped. The keys before the start are left padding (or outside a sliding window) for every
/// row of the block: skipping them makes a padded row's sums run over exactly the keys, in the
/// same order, as the row alone would, so a sequence's results do not depend on the batch it
/// shares.
fn block_ranges(mask: &ScoreMask<'_>, dims: &AttentionDims) -> Vec<std::ops::Range<usize>> {
    let blocks = dims.q_len.div_ceil(QUERY_BLOCK);
    let mut ranges = Vec::with_capacity(dims.batch * blocks);
    for b in 0..dims.batch {
        for block in 0..blocks {
            let rows = block * QUERY_BLOCK..((block + 1) * QUERY_BLOCK).min(dims.q_len);
            let (mut start, mut end) = (dims.kv_len, 0);
            for i in rows {
                let allowed = allowed_row(mask, dims, b, i);
                match (
                    allowed.iter().position(|&a| a),
                    allowed.iter().rposition(|&a| a),
                ) {
                    (Some(first), Some(last)) => {
                        start = start.min(first);
                        end = end.max(last + 1);
                    }
                    _ => (start, end) = (0, dims.kv_len),
                }
            }
            ranges.push(start.min(end)..end);
        }
    }
    ranges
}

/// Softmax attention for every batch row and head: `q: [batch, heads, q_len, head_dim]`,
/// `k`, `v`: `[batch, kv_heads, kv_len, head_dim]`, any strides. Writes the probabilities
/// `probs: [batch, heads, q_len, kv_len]` (kept for the backward pass) and the output through
/// `out`, a `[batch, heads, q_len, head_dim]` view (the fused operation lays it out
/// `[batch, q_len, heads, head_dim]` underneath, the order the output projection reads).
pub fn attention(
    dims: AttentionDims,
    (q, k, v): (View4<'_>, View4<'_>, View4<'_>),
    mask: ScoreMask<'_>,
    probs: &mut [f32],
    out: ViewMut4<'_>,
) {
    let AttentionDims {
        heads,
        q_len,
        kv_len,
        head_dim,
        ..
    } = dims;
    let group = dims.group();
    let ranges = block_ranges(&mask, &dims);
    let blocks = q_len.div_ceil(QUERY_BLOCK);
    probs
        .par_chunks_mut((q_len * kv_len).max(1))
        .enumerate()
        .for_each(|(bh, p)| {
            let (b, h) = (bh / heads, bh % heads);
            let (qp, q_rs, q_cs) = q.matrix(b, h);
            let (kp, k_rs, k_cs) = k.matrix(b, h / group);
            let (vp, v_rs, v_cs) = v.matrix(b, h / group);
            let (op, o_rs, o_cs) = out.matrix(b, h);
            let bias = mask.bias.map(|all| &all[bh * kv_len..(bh + 1) * kv_len]);
            for block in 0..blocks {
                let i0 = block * QUERY_BLOCK;
                let rows = QUERY_BLOCK.min(q_len - i0);
                let std::ops::Range { start, end: extent } = ranges[b * blocks + block].clone();
                let seen = extent - start;
                let p_block = &mut p[i0 * kv_len..(i0 + rows) * kv_len];
                // SAFETY: `p_block` is this task's own [rows, kv_len] block of `probs`; q, kᵀ
                // and v lie in views checked by `View4::new` (rows i0.., keys start..extent);
                // head h of batch row b of `out` is written by this task only.
                unsafe {
                    small_matmul(
                        (rows, seen, head_dim),
                        p_block.as_mut_ptr().wrapping_add(start),
                        (kv_len as isize, 1),
                        false,
                        (qp.wrapping_offset(i0 as isize * q_rs), q_rs, q_cs),
                        (kp.wrapping_offset(start as isize * k_rs), k_cs, k_rs),
                    );
                }
                for (r, row) in p_block.chunks_mut(kv_len.max(1)).enumerate() {
                    let allowed = &allowed_row(&mask, &dims, b, i0 + r)[start..extent];
                    let (before, rest) = row.split_at_mut(start);
                    let (seen, unseen) = rest.split_at_mut(extent - start);
                    before.fill(0.0);
                    softmax_scores(seen, allowed, bias.map(|b| &b[start..extent]), mask.scale);
                    unseen.fill(0.0);
                }
                // SAFETY: as above.
                unsafe {
                    small_matmul(
                        (rows, head_dim, seen),
                        op.wrapping_offset(i0 as isize * o_rs),
                        (o_rs, o_cs),
                        false,
                        (p_block.as_ptr().wrapping_add(start), kv_len as isize, 1),
                        (vp.wrapping_offset(start as isize * v_rs), v_rs, v_cs),
                    );
                }
            }
        });
}

/// Where [`attention_backward`] writes: `dq` as `[batch, heads, q_len, head_dim]`, `dk` and `dv`
/// as `[batch, kv_heads, kv_len, head_dim]`, any strides (they may interleave in one buffer, as
/// the gradient of a fused query/key/value projection does).
#[derive(Debug)]
pub struct AttentionGrads<'a> {
    /// `∂q`.
    pub dq: ViewMut4<'a>,
    /// `∂k`.
    pub dk: ViewMut4<'a>,
    /// `∂v`.
    pub dv: ViewMut4<'a>,
}

/// Gradients of [`attention`] from its inputs, its probabilities and `∂out` (viewed as
/// `[batch, heads, q_len, head_dim]`, any strides), written through `grads`, whose `dk` and `dv`
/// must start zeroed (they are accumulated into).
pub fn attention_backward(
    dims: AttentionDims,
    (q, k, v): (View4<'_>, View4<'_>, View4<'_>),
    mask: ScoreMask<'_>,
    probs: &[f32],
    grad_out: View4<'_>,
    grads: AttentionGrads<'_>,
) {
    let AttentionDims {
        batch,
        heads,
        kv_heads,
        q_len,
        kv_len,
        head_dim,
    } = dims;
    let group = dims.group();
    let ranges = block_ranges(&mask, &dims);
    let blocks = q_len.div_ceil(QUERY_BLOCK);
    // One task per (batch row, key/value head): it alone writes that head's ∂k and ∂v
    // (accumulated over the query heads that read it, into zeroed buffers) and those query
    // heads' ∂q.
    (0..batch * kv_heads).into_par_iter().for_each(|bg| {
        let (b, g) = (bg / kv_heads, bg % kv_heads);
        let (kp, k_rs, k_cs) = k.matrix(b, g);
        let (vp, v_rs, v_cs) = v.matrix(b, g);
        let (dk, dk_rs, dk_cs) = grads.dk.matrix(b, g);
        let (dv, dv_rs, dv_cs) = grads.dv.matrix(b, g);
        let mut dp = vec![0.0f32; QUERY_BLOCK.min(q_len) * kv_len];
        for r in 0..group {
            let h = g * group + r;
            let p_head = &probs[(b * heads + h) * q_len * kv_len..][..q_len * kv_len];
            let (go, go_rs, go_cs) = grad_out.matrix(b, h);
            let (qp, q_rs, q_cs) = q.matrix(b, h);
            let (dq, dq_rs, dq_cs) = grads.dq.matrix(b, h);
            for block in 0..blocks {
                let i0 = block * QUERY_BLOCK;
                let rows = QUERY_BLOCK.min(q_len - i0);
                let extent = ranges[b * blocks + block].end;
                let p = &p_head[i0 * kv_len..(i0 + rows) * kv_len];
                let go = go.wrapping_offset(i0 as isize * go_rs);
                // SAFETY: every operand lies in a checked view (rows i0..i0 + rows, keys
                // ..extent), in `probs` or in `dp`; the destinations (∂q of head h, ∂k and ∂v
                // of group g, in batch row b) are written by this task only.
                unsafe {
                    // ∂v += pᵀ · ∂out
                    small_matmul(
                        (extent, head_dim, rows),
                        dv,
                        (dv_rs, dv_cs),
                        true,
                        (p.as_ptr(), 1, kv_len as isize),
                        (go, go_rs, go_cs),
                    );
                    // ∂p = ∂out · vᵀ
                    small_matmul(
                        (rows, extent, head_dim),
                        dp.as_mut_ptr(),
                        (kv_len as isize, 1),
                        false,
                        (go, go_rs, go_cs),
                        (vp, v_cs, v_rs),
                    );
                }
                let block_rows = dp.chunks_mut(kv_len.max(1)).zip(p.chunks(kv_len.max(1)));
                for (i, (row, p)) in block_rows.take(rows).enumerate() {
                    let allowed = &allowed_row(&mask, &dims, b, i0 + i)[..extent];
                    softmax_scores_backward(&mut row[..extent], &p[..extent], allowed, mask.scale);
                }
                // SAFETY: as above.
                unsafe {
                    // ∂q = ∂s · k
                    small_matmul(
                        (rows, head_dim, extent),
                        dq.wrapping_offset(i0 as isize * dq_rs),
                        (dq_rs, dq_cs),
                        false,
                        (dp.as_ptr(), kv_len as isize, 1),
                        (kp, k_rs, k_cs),
                    );
                    // ∂k += ∂sᵀ · q
                    small_matmul(
                        (extent, head_dim, rows),
                        dk,
                        (dk_rs, dk_cs),
                        true,
                        (dp.as_ptr(), 1, kv_len as isize),
                        (qp.wrapping_offset(i0 as isize * q_rs), q_rs, q_cs),
                    );
                }
            }
        }
    });
}

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
