//! Row-wise softmax work: shifted exponentials, cross-entropy rows (value and gradient in one
//! pass), row scaling.

use super::*;

multiversion! {
    /// `exps[i] = e^(row[i] − max)`; returns `(max, Σ exps)`.
    pub(super) fn shifted_exps(row: &[f32], exps: &mut [f32]) -> (f32, f32) {
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
    pub(super) fn shifted_exp_sum(row: &[f32]) -> (f32, f32) {
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
pub(super) fn exps_shifted_by_max(row: &mut [f32]) -> (f32, f32) {
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
    pub(super) fn shifted_exps_in_place(row: &mut [f32]) -> (f32, f32) {
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
    pub(super) fn scale(values: &mut [f32], by: f32) {
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
