//! GELU (tanh approximation) and its gradient, element-wise.

use super::*;

/// √(2/π), the GELU tanh approximation's constant.
pub(super) const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The cubic term's coefficient in the GELU tanh approximation.
pub(super) const GELU_CUBIC: f32 = 0.044_715;

/// `σ(2z)` for GELU's `z = √(2/π)·(x + 0.044715·x³)`: `½(1 + tanh z)`.
#[inline(always)]
pub(super) fn gelu_gate(x: f32) -> f32 {
    let z = SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x);
    1.0 / (1.0 + exp(-2.0 * z))
}

multiversion! {
    pub(super) fn gelu_tanh_chunk(x: &[f32], y: &mut [MaybeUninit<f32>]) {
        for (y, &x) in y.iter_mut().zip(x) {
            y.write(x * gelu_gate(x));
        }
    }
}

multiversion! {
    pub(super) fn gelu_tanh_backward_chunk(x: &[f32], grad: &[f32], out: &mut [MaybeUninit<f32>]) {
        for ((out, &x), &g) in out.iter_mut().zip(x).zip(grad) {
            let s = gelu_gate(x);
            // d/dx [x·σ(2z)] = σ + x·σ(1−σ)·2·dz/dx
            let dz = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x * x);
            out.write(g * (s + x * s * (1.0 - s) * 2.0 * dz));
        }
    }
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
