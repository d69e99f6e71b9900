//! Dot products and the few-row products: a weight read once for every input row (decoding,
//! bf16 weights widened in registers).

use super::*;

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
pub(super) const DOT_LANES: usize = 16;
/// Input rows sharing each widened weight chunk in [`dot_rows_bf16`].
pub(super) const DOT_ROWS: usize = 4;

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
pub(super) const FEW_ROWS_BLOCK: usize = 64;

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
