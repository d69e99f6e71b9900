//! LayerNorm and RMSNorm rows (forward with statistics kept, backward with the parameter
//! gradients).

use super::*;

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
    pub(super) fn norm_row(x: &[f32], y: &mut [MaybeUninit<f32>], norm: &Norm<'_>) -> (f32, f32) {
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
    pub(super) fn norm_row_backward(
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
    pub(super) fn norm_row_param_grads(
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
pub(super) const NORM_ROWS: usize = 16;

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
