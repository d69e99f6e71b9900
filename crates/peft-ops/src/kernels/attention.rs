//! Causal attention over strided views: scores, masking, softmax and the weighted sum in
//! blocks of query rows, and its backward pass; the per-head products through BLAS on the
//! calling thread where it can.

use super::*;

/// A strided 4-D view `[d0, d1, rows, cols]` of f32 values (a burn CPU tensor's storage with its
/// layout), read in place by the attention kernels.
#[derive(Clone, Copy, Debug)]
pub struct View4<'a> {
    pub(super) data: &'a [f32],
    pub(super) offset: usize,
    pub(super) strides: [usize; 4],
    pub(super) dims: [usize; 4],
}

/// The strides of a view of `len` elements from `offset`, if all are non-negative and its last
/// element is inside.
pub(super) fn checked_strides(
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
pub(super) unsafe fn small_matmul(
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
    pub(super) fn softmax_scores(row: &mut [f32], allowed: &[bool], bias: Option<&[f32]>, scale: f32) {
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
    pub(super) fn softmax_scores_backward(grad: &mut [f32], probs: &[f32], allowed: &[bool], scale: f32) {
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
pub(super) fn allowed_row<'a>(
    mask: &ScoreMask<'a>,
    dims: &AttentionDims,
    b: usize,
    i: usize,
) -> &'a [bool] {
    let start = (b * dims.q_len + i) * dims.kv_len;
    &mask.allowed[start..start + dims.kv_len]
}

/// A strided 4-D destination `[d0, d1, rows, cols]` that the attention kernels write: its
/// tasks write disjoint `[rows, cols]` matrices of it from several threads, so it holds the
/// address of the exclusively borrowed storage rather than a slice.
#[derive(Debug)]
pub struct ViewMut4<'a> {
    pub(super) base: usize,
    pub(super) strides: [usize; 4],
    pub(super) dims: [usize; 4],
    pub(super) _borrow: std::marker::PhantomData<&'a mut [f32]>,
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
pub(super) const QUERY_BLOCK: usize = 32;

/// For each block of [`QUERY_BLOCK`] query rows of each batch row, the keys its rows can see
/// (`[batch, blocks]` ranges): from the first key any row of the block sees to one past the
/// last, or every key when a row sees none (it attends uniformly to all).
///
/// With a causal mask about half of the score and product work lies past the ends, and is
/// skipped. The keys before the start are left padding (or outside a sliding window) for every
/// row of the block: skipping them makes a padded row's sums run over exactly the keys, in the
/// same order, as the row alone would, so a sequence's results do not depend on the batch it
/// shares.
pub(super) fn block_ranges(
    mask: &ScoreMask<'_>,
    dims: &AttentionDims,
) -> Vec<std::ops::Range<usize>> {
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
