//! `silu(gate) · up` (Llama-family MLPs) and its gradients.

use super::*;

multiversion! {
    pub(super) fn silu_mul_chunk(gate: &[f32], up: &[f32], y: &mut [f32]) {
        for ((y, &g), &u) in y.iter_mut().zip(gate).zip(up) {
            *y = g / (1.0 + exp(-g)) * u;
        }
    }
}

multiversion! {
    pub(super) fn silu_mul_backward_chunk(
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
