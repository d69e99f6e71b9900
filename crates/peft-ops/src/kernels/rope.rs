//! Rotary position embeddings over strided `[batch, heads, seq, head_dim]` views.

use super::*;

multiversion! {
    /// One `head_dim` row of rotary position embedding: `x·cos + rotate_half(x)·sin`, or with
    /// `inverse` its transpose (the backward pass: `g·cos + rotate_halfᵀ(g·sin)`).
    pub(super) fn rope_row(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32], inverse: bool) {
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
