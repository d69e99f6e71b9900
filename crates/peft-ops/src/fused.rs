//! Fused, differentiable operations for the CPU backend: softmax attention (also over BLOOM's
//! packed qkv projection), LayerNorm/RMSNorm, the rotary embedding, BLOOM's GELU, Llama's
//! `silu(gate)·up` and the loss's cross-entropy, each one pass over memory forward and one
//! backward, with the vectorised kernels of [`crate::kernels`].
//!
//! Composed from burn's element-wise operations these cost several passes each and as many
//! intermediate tensors kept for the backward pass: on the 16M-parameter BLOOM the loss alone
//! took 79 ms and the four GELUs 67 ms of a 470 ms LoRA step (docs/BENCHMARKS.md). On other
//! backends, and for tensors that are not f32, the public functions compose the same math from
//! burn operations (or return `None` for the caller to).

use std::sync::Arc;

use burn::backend::autodiff::{
    Autodiff,
    checkpoint::{
        base::Checkpointer, retro_forward::RetroForward, state::BackwardStates,
        strategy::CheckpointStrategy,
    },
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, Flex, backend_extension};
use burn::tensor::activation::sigmoid;
use burn::tensor::{DType, Shape, Tensor};

use crate::device::runs_cpu_kernels;
use crate::host::{written_f32, zeros_f32};
use crate::kernels;

/// One target class per row for [`FusedBackend::cross_entropy_rows`]; a negative target marks a
/// row that takes no part (PyTorch's `ignore_index`).
#[derive(Clone, Debug)]
pub struct RowTargets(pub Arc<Vec<i64>>);

/// The score adjustments of [`FusedBackend::softmax_attention`] (see [`kernels::ScoreMask`]), held on
/// the host.
#[derive(Clone, Debug)]
pub struct AttentionMask {
    /// Multiplies `q·kᵀ`.
    pub scale: f32,
    /// ALiBi-style bias `[batch, heads, kv_len]`.
    pub bias: Option<Arc<Vec<f32>>>,
    /// `[batch, q_len, kv_len]`: which keys each query may see.
    pub allowed: Arc<Vec<bool>>,
}

impl AttentionMask {
    fn scores(&self) -> kernels::ScoreMask<'_> {
        kernels::ScoreMask {
            scale: self.scale,
            bias: self.bias.as_deref().map(Vec::as_slice),
            allowed: &self.allowed,
        }
    }
}

/// Rotary embedding tables for [`FusedBackend::rope`]: `cos`, `sin`, each `[seq, head_dim]`.
#[derive(Clone, Debug)]
pub struct RopeTables {
    /// Cosines, `[seq, head_dim]`.
    pub cos: Arc<Vec<f32>>,
    /// Sines, `[seq, head_dim]`.
    pub sin: Arc<Vec<f32>>,
}

/// Backends with the fused operations.
#[backend_extension(Autodiff, Flex)]
pub trait FusedBackend: Backend {
    /// Softmax attention: `q: [batch, heads, q_len, head_dim]`, `k`, `v`:
    /// `[batch, kv_heads, kv_len, head_dim]` → `[batch, q_len, heads, head_dim]`.
    fn softmax_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: AttentionMask,
    ) -> FloatTensor<Self>;
    /// [`FusedBackend::softmax_attention`] reading query, key and value from one fused
    /// projection `qkv: [batch, seq, heads, 3, head_dim]` (BLOOM's layout), with one gradient
    /// for it: no slicing, so no slice gradients to scatter back.
    fn packed_qkv_attention(qkv: FloatTensor<Self>, mask: AttentionMask) -> FloatTensor<Self>;
    /// Rotary position embedding of `x: [batch, heads, seq, head_dim]`.
    fn rope(x: FloatTensor<Self>, tables: RopeTables) -> FloatTensor<Self>;
    /// GELU, tanh approximation, element-wise.
    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `silu(gate) · up`, element-wise.
    fn silu_mul(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;
    /// LayerNorm over the last dimension of `x: [.., dim]` with `weight`, `bias`: `[dim]`; with
    /// `rms`, RMSNorm (no mean subtracted, `bias` ignored).
    fn fused_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        eps: f32,
        rms: bool,
    ) -> FloatTensor<Self>;
    /// `logits: [rows, vocab]` → `[rows]`: each row's negative log-likelihood of its target
    /// (0 for ignored rows).
    fn cross_entropy_rows(logits: FloatTensor<Self>, targets: RowTargets) -> FloatTensor<Self>;
}

/// The f32 values of a CPU tensor, in row-major order (copied only when the layout is strided).
fn values(tensor: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match tensor.as_slice::<f32>() {
        Some(slice) => std::borrow::Cow::Borrowed(slice),
        None => std::borrow::Cow::Owned(
            tensor
                .to_contiguous()
                .as_slice::<f32>()
                .map_or_else(Vec::new, <[f32]>::to_vec),
        ),
    }
}

thread_local! {
    /// Activation forward passes run on this thread (see [`activation_forward_calls`]).
    static ACTIVATION_CALLS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many fused MLP activation forward passes (GELU, `silu(gate) · up`) this thread has run,
/// recomputations during a backward pass included: the count that shows gradient
/// checkpointing recomputing activations instead of keeping them (per thread, so that
/// parallel tests do not mix).
pub fn activation_forward_calls() -> u64 {
    ACTIVATION_CALLS.with(std::cell::Cell::get)
}

fn count_activation() {
    ACTIVATION_CALLS.with(|c| c.set(c.get() + 1));
}

fn flex_gelu(x: &FlexTensor) -> FlexTensor {
    count_activation();
    let x_values = values(x);
    let shape = x.layout().shape().clone();
    // SAFETY: `gelu_tanh` writes every element of an output as long as its input, and only
    // values.
    unsafe { written_f32(shape, x_values.len(), |y| kernels::gelu_tanh(&x_values, y)) }
}

fn flex_gelu_backward(x: &FlexTensor, grad: &FlexTensor) -> FlexTensor {
    let (x_values, grad_values) = (values(x), values(grad));
    let shape = x.layout().shape().clone();
    let len = x_values.len().min(grad_values.len());
    // SAFETY: `gelu_tanh_backward` writes every element of an output as long as both its inputs,
    // and only values.
    unsafe {
        written_f32(shape, len, |out| {
            kernels::gelu_tanh_backward(&x_values, &grad_values, out)
        })
    }
}

fn flex_rope(x: FlexTensor, tables: &RopeTables, inverse: bool) -> FlexTensor {
    let x = viewable(x);
    let mut out = zeros_f32(x.layout().shape().clone());
    if let Some(view) = view4(&x) {
        kernels::rope(
            view,
            &tables.cos,
            &tables.sin,
            out.storage_mut::<f32>(),
            inverse,
        );
    }
    out
}

fn flex_silu_mul(gate: &FlexTensor, up: &FlexTensor) -> FlexTensor {
    count_activation();
    let mut out = zeros_f32(gate.layout().shape().clone());
    kernels::silu_mul(&values(gate), &values(up), out.storage_mut::<f32>());
    out
}

/// The last dimension of `x` and the number of rows before it.
fn rows_of(x: &FlexTensor) -> (usize, usize) {
    let shape = x.layout().shape();
    let dim = shape[shape.num_dims() - 1];
    (shape.num_elements() / dim.max(1), dim)
}

fn flex_norm(
    x: &FlexTensor,
    weight: &FlexTensor,
    bias: Option<&FlexTensor>,
    eps: f32,
    rms: bool,
) -> (FlexTensor, FlexTensor) {
    let (rows, dim) = rows_of(x);
    let mut stats = zeros_f32(Shape::new([rows, 2]));
    let (w, b) = (values(weight), bias.map(values));
    let norm = kernels::Norm {
        weight: &w,
        bias: b.as_deref(),
        eps,
        rms,
    };
    let x_values = values(x);
    let stats_values = stats.storage_mut::<f32>();
    // SAFETY: `norm` writes every element of an output as long as its input (whole rows of
    // `dim`), and only values.
    let out = unsafe {
        written_f32(x.layout().shape().clone(), x_values.len(), |y| {
            kernels::norm(&x_values, dim, &norm, y, stats_values)
        })
    };
    (out, stats)
}

/// Per-row losses `[rows]`; with `gradient` (`[rows, vocab]`), each row's gradient written into
/// it from the same exponentials.
fn flex_cross_entropy(
    logits: &FlexTensor,
    targets: &RowTargets,
    gradient: Option<&mut FlexTensor>,
) -> FlexTensor {
    let shape = logits.layout().shape();
    let (rows, vocab) = (shape[0], shape[1]);
    let mut nll = zeros_f32(Shape::new([rows]));
    kernels::cross_entropy_rows(
        &values(logits),
        vocab,
        &targets.0,
        nll.storage_mut::<f32>(),
        gradient.map(|g| g.storage_mut::<f32>()),
    );
    nll
}

/// `∂x` of a normalisation and, when asked, `(∂weight, ∂bias)`.
pub type NormGrads<B> = (FloatTensor<B>, Option<(FloatTensor<B>, FloatTensor<B>)>);

/// The kernels on the backend autodiff runs over (only the CPU backend has them).
pub trait FusedKernels: Backend {
    /// `∂x` of [`FusedBackend::gelu_tanh`] from its input and `∂y`.
    fn gelu_tanh_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
    /// The per-row losses and their gradients `softmax − onehot`.
    fn cross_entropy_with_gradient(
        logits: FloatTensor<Self>,
        targets: &RowTargets,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// `values[r][..] · by[r]` for `values: [rows, width]`, `by: [rows]`.
    fn scale_rows(values: FloatTensor<Self>, by: FloatTensor<Self>) -> FloatTensor<Self>;
    /// [`FusedBackend::softmax_attention`] and its probabilities `[batch, heads, q_len, kv_len]`.
    fn attention_with_probs(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: &AttentionMask,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// `∂x` of [`FusedBackend::rope`] from `∂out`.
    fn rope_backward(grad: FloatTensor<Self>, tables: &RopeTables) -> FloatTensor<Self>;
    /// `(∂gate, ∂up)` of [`FusedBackend::silu_mul`].
    fn silu_mul_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// A normalisation (LayerNorm with `bias`, RMSNorm without and with `rms`) and its per-row
    /// statistics `[rows, 2]`.
    fn norm_with_stats(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        eps: f32,
        rms: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// `∂x` of a normalisation, and with `params` also `(∂weight, ∂bias)`.
    fn norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        rms: bool,
        params: bool,
    ) -> NormGrads<Self>;
    /// [`FusedBackend::packed_qkv_attention`] and its probabilities.
    fn packed_qkv_attention_with_probs(
        qkv: FloatTensor<Self>,
        mask: &AttentionMask,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// `∂qkv` of [`FusedBackend::packed_qkv_attention`] from `∂out`.
    fn packed_qkv_attention_backward(
        qkv: FloatTensor<Self>,
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        mask: &AttentionMask,
    ) -> FloatTensor<Self>;
    /// `[∂q, ∂k, ∂v]` of [`FusedBackend::softmax_attention`] from `∂out: [batch, q_len, heads, head_dim]`.
    fn attention_backward(
        qkv: [FloatTensor<Self>; 3],
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        mask: &AttentionMask,
    ) -> [FloatTensor<Self>; 3];
}

/// `tensor`, made contiguous if its layout is not one [`kernels::View4`] reads.
fn viewable(tensor: FlexTensor) -> FlexTensor {
    if view4(&tensor).is_some() {
        tensor
    } else {
        tensor.to_contiguous()
    }
}

fn dims4(tensor: &FlexTensor) -> [usize; 4] {
    let shape = tensor.layout().shape();
    [shape[0], shape[1], shape[2], shape[3]]
}

fn view4(tensor: &FlexTensor) -> Option<kernels::View4<'_>> {
    let layout = tensor.layout();
    kernels::View4::new(
        tensor.storage::<f32>(),
        layout.start_offset(),
        layout.strides(),
        dims4(tensor),
    )
}

fn attention_dims(q: &FlexTensor, k: &FlexTensor) -> kernels::AttentionDims {
    let [batch, heads, q_len, head_dim] = dims4(q);
    let [_, kv_heads, kv_len, _] = dims4(k);
    kernels::AttentionDims {
        batch,
        heads,
        kv_heads,
        q_len,
        kv_len,
        head_dim,
    }
}

/// The attention output `[batch, q_len, heads, head_dim]` and probabilities for views of q, k, v.
fn flex_attention_views(
    dims: kernels::AttentionDims,
    views: (kernels::View4<'_>, kernels::View4<'_>, kernels::View4<'_>),
    mask: &AttentionMask,
) -> (FlexTensor, FlexTensor) {
    let kernels::AttentionDims {
        batch,
        heads,
        q_len,
        kv_len,
        head_dim,
        ..
    } = dims;
    let mut probs = zeros_f32(Shape::new([batch, heads, q_len, kv_len]));
    let mut out = zeros_f32(Shape::new([batch, q_len, heads, head_dim]));
    // Written per head: [batch, heads, q_len, head_dim] over the [batch, q_len, heads, head_dim]
    // storage.
    let out_strides = [q_len * heads * head_dim, head_dim, heads * head_dim, 1].map(|s| s as isize);
    let out_dims = [batch, heads, q_len, head_dim];
    if let Some(out_view) =
        kernels::ViewMut4::new(out.storage_mut::<f32>(), 0, &out_strides, out_dims)
    {
        kernels::attention(
            dims,
            views,
            mask.scores(),
            probs.storage_mut::<f32>(),
            out_view,
        );
    }
    (out, probs)
}

fn flex_attention(
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    mask: &AttentionMask,
) -> (FlexTensor, FlexTensor) {
    let (q, k, v) = (viewable(q), viewable(k), viewable(v));
    let dims = attention_dims(&q, &k);
    match (view4(&q), view4(&k), view4(&v)) {
        (Some(qv), Some(kv), Some(vv)) => flex_attention_views(dims, (qv, kv, vv), mask),
        // `viewable` made each of them readable.
        _ => unreachable!("contiguous tensors are always viewable"),
    }
}

/// `[batch, seq, heads, 3, head_dim]` (BLOOM's fused query/key/value projection): its sizes,
/// and how to view its query, key and value parts as `[batch, heads, seq, head_dim]`.
fn packed_qkv_layout(qkv: &FlexTensor) -> (kernels::AttentionDims, [usize; 3], [isize; 4]) {
    let shape = qkv.layout().shape();
    let (batch, seq, heads, head_dim) = (shape[0], shape[1], shape[2], shape[4]);
    let s = qkv.layout().strides();
    let start = qkv.layout().start_offset();
    let offsets = [0, 1, 2].map(|i| start + i * s[3].max(0) as usize);
    let dims = kernels::AttentionDims {
        batch,
        heads,
        kv_heads: heads,
        q_len: seq,
        kv_len: seq,
        head_dim,
    };
    (dims, offsets, [s[0], s[2], s[1], s[4]])
}

/// `qkv`, made contiguous if a stride is negative (the only layout its views cannot read).
fn packed_viewable(qkv: FlexTensor) -> FlexTensor {
    if qkv.layout().strides().iter().all(|&s| s >= 0) {
        qkv
    } else {
        qkv.to_contiguous()
    }
}

fn packed_views(qkv: &FlexTensor) -> Option<[kernels::View4<'_>; 3]> {
    let (dims, offsets, strides) = packed_qkv_layout(qkv);
    let view_dims = [dims.batch, dims.heads, dims.q_len, dims.head_dim];
    let data = qkv.storage::<f32>();
    let [q, k, v] = offsets.map(|o| kernels::View4::new(data, o, &strides, view_dims));
    Some([q?, k?, v?])
}

fn flex_packed_attention(qkv: FlexTensor, mask: &AttentionMask) -> (FlexTensor, FlexTensor) {
    let qkv = packed_viewable(qkv);
    let (dims, _, _) = packed_qkv_layout(&qkv);
    match packed_views(&qkv) {
        Some([q, k, v]) => flex_attention_views(dims, (q, k, v), mask),
        None => unreachable!("non-negative strides of a tensor's own storage are viewable"),
    }
}

/// `∂out` (`[batch, q_len, heads, head_dim]`) viewed per head, and the probabilities.
fn backward_inputs(grad: FlexTensor, probs: FlexTensor) -> (FlexTensor, FlexTensor) {
    (
        viewable(viewable(grad).transpose(1, 2)),
        probs.to_contiguous(),
    )
}

impl FusedBackend for Flex {
    fn softmax_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: AttentionMask,
    ) -> FloatTensor<Self> {
        flex_attention(q, k, v, &mask).0
    }

    fn packed_qkv_attention(qkv: FloatTensor<Self>, mask: AttentionMask) -> FloatTensor<Self> {
        flex_packed_attention(qkv, &mask).0
    }

    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        flex_gelu(&x)
    }

    fn cross_entropy_rows(logits: FloatTensor<Self>, targets: RowTargets) -> FloatTensor<Self> {
        flex_cross_entropy(&logits, &targets, None)
    }

    fn silu_mul(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        flex_silu_mul(&gate, &up)
    }

    fn rope(x: FloatTensor<Self>, tables: RopeTables) -> FloatTensor<Self> {
        flex_rope(x, &tables, false)
    }

    fn fused_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        eps: f32,
        rms: bool,
    ) -> FloatTensor<Self> {
        let bias = (!rms).then_some(&bias);
        flex_norm(&x, &weight, bias, eps, rms).0
    }
}

impl FusedKernels for Flex {
    fn gelu_tanh_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        flex_gelu_backward(&x, &grad)
    }

    fn cross_entropy_with_gradient(
        logits: FloatTensor<Self>,
        targets: &RowTargets,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let mut probs = zeros_f32(logits.layout().shape().clone());
        let nll = flex_cross_entropy(&logits, targets, Some(&mut probs));
        (nll, probs)
    }

    fn scale_rows(values: FloatTensor<Self>, by: FloatTensor<Self>) -> FloatTensor<Self> {
        let width = values.layout().shape()[1];
        let mut values = if values.is_contiguous() && values.is_unique() {
            values
        } else {
            values.to_contiguous()
        };
        kernels::scale_rows(values.storage_mut::<f32>(), width, &self::values(&by));
        values
    }

    fn attention_with_probs(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: &AttentionMask,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        flex_attention(q, k, v, mask)
    }

    fn rope_backward(grad: FloatTensor<Self>, tables: &RopeTables) -> FloatTensor<Self> {
        flex_rope(grad, tables, true)
    }

    fn silu_mul_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let mut d_gate = zeros_f32(gate.layout().shape().clone());
        let mut d_up = zeros_f32(up.layout().shape().clone());
        kernels::silu_mul_backward(
            &values(&gate),
            &values(&up),
            &values(&grad),
            d_gate.storage_mut::<f32>(),
            d_up.storage_mut::<f32>(),
        );
        (d_gate, d_up)
    }

    fn norm_with_stats(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        eps: f32,
        rms: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        flex_norm(&x, &weight, bias.as_ref(), eps, rms)
    }

    fn norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        rms: bool,
        params: bool,
    ) -> NormGrads<Self> {
        let (_, dim) = rows_of(&x);
        let w = values(&weight);
        let norm = kernels::Norm {
            weight: &w,
            bias: None,
            eps: 0.0,
            rms,
        };
        let mut param_grads =
            params.then(|| (zeros_f32(Shape::new([dim])), zeros_f32(Shape::new([dim]))));
        let (x_values, grad_values, stats_values) = (values(&x), values(&grad), values(&stats));
        // Every row of x needs its gradient's row and its two statistics.
        let len = match stats_values.len() / 2 * dim >= x_values.len() {
            true => x_values.len().min(grad_values.len()),
            false => usize::MAX,
        };
        // SAFETY: `norm_backward` writes every element of `dx` as long as both its inputs when
        // every row has its statistics, and only values.
        let dx = unsafe {
            written_f32(x.layout().shape().clone(), len, |dx| {
                kernels::norm_backward(
                    &x_values,
                    &grad_values,
                    dim,
                    &norm,
                    &stats_values,
                    dx,
                    param_grads
                        .as_mut()
                        .map(|(dw, db)| (dw.storage_mut::<f32>(), db.storage_mut::<f32>())),
                )
            })
        };
        (dx, param_grads)
    }

    fn attention_backward(
        [q, k, v]: [FloatTensor<Self>; 3],
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        mask: &AttentionMask,
    ) -> [FloatTensor<Self>; 3] {
        let (q, k, v) = (viewable(q), viewable(k), viewable(v));
        let (grad, probs) = backward_inputs(grad, probs);
        let dims = attention_dims(&q, &k);
        let mut dq = zeros_f32(q.layout().shape().clone());
        let mut dk = zeros_f32(k.layout().shape().clone());
        let mut dv = zeros_f32(v.layout().shape().clone());
        let (q_dims, kv_dims) = (dims4(&q), dims4(&k));
        if let (Some(qv), Some(kv), Some(vv), Some(gv), Some(p), Some(dq), Some(dk), Some(dv)) = (
            view4(&q),
            view4(&k),
            view4(&v),
            view4(&grad),
            probs.as_slice::<f32>(),
            kernels::ViewMut4::contiguous(dq.storage_mut::<f32>(), q_dims),
            kernels::ViewMut4::contiguous(dk.storage_mut::<f32>(), kv_dims),
            kernels::ViewMut4::contiguous(dv.storage_mut::<f32>(), kv_dims),
        ) {
            let grads = kernels::AttentionGrads { dq, dk, dv };
            kernels::attention_backward(dims, (qv, kv, vv), mask.scores(), p, gv, grads);
        }
        [dq, dk, dv]
    }

    fn packed_qkv_attention_with_probs(
        qkv: FloatTensor<Self>,
        mask: &AttentionMask,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        flex_packed_attention(qkv, mask)
    }

    fn packed_qkv_attention_backward(
        qkv: FloatTensor<Self>,
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        mask: &AttentionMask,
    ) -> FloatTensor<Self> {
        let qkv = packed_viewable(qkv);
        let (grad, probs) = backward_inputs(grad, probs);
        let (dims, _, _) = packed_qkv_layout(&qkv);
        let kernels::AttentionDims {
            batch,
            heads,
            q_len: seq,
            head_dim,
            ..
        } = dims;
        // ∂qkv in the input's [batch, seq, heads, 3, head_dim] order, its three parts written
        // in place by the kernel through three interleaved views.
        let mut dqkv = zeros_f32(Shape::new([batch, seq, heads, 3, head_dim]));
        let strides = [
            seq * heads * 3 * head_dim,
            3 * head_dim,
            heads * 3 * head_dim,
            1,
        ]
        .map(|s| s as isize);
        let view_dims = [batch, heads, seq, head_dim];
        let storage = dqkv.storage_mut::<f32>();
        let (base, len) = (storage.as_mut_ptr(), storage.len());
        // SAFETY: the three views map disjoint elements of `dqkv`'s storage (offsets 0,
        // head_dim and 2 · head_dim within each group of 3 · head_dim), which outlives the kernel
        // call below and which nothing else touches meanwhile.
        let part = |i: usize| unsafe {
            kernels::ViewMut4::from_raw_parts(base, len, i * head_dim, &strides, view_dims)
        };
        if let (Some([q, k, v]), Some(gv), Some(p), Some(dq), Some(dk), Some(dv)) = (
            packed_views(&qkv),
            view4(&grad),
            probs.as_slice::<f32>(),
            part(0),
            part(1),
            part(2),
        ) {
            let grads = kernels::AttentionGrads { dq, dk, dv };
            kernels::attention_backward(dims, (q, k, v), mask.scores(), p, gv, grads);
        }
        dqkv
    }
}

impl<B: FusedBackend + FusedKernels, C: CheckpointStrategy> FusedBackend for Autodiff<B, C> {
    fn rope(x: FloatTensor<Self>, tables: RopeTables) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct RopeBackward;

        impl<B: FusedKernels> Backward<B, 1> for RopeBackward {
            // Linear in x: only the tables are needed.
            type State = RopeTables;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let grad = grads.consume::<B>(&ops.node);
                if let [Some(node)] = ops.parents {
                    grads.register::<B>(node.id, B::rope_backward(grad, &ops.state));
                }
            }
        }

        match RopeBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::rope(x.into_primitive(), tables.clone());
                prep.finish(tables, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rope(x.into_primitive(), tables)),
        }
    }

    fn packed_qkv_attention(qkv: FloatTensor<Self>, mask: AttentionMask) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct PackedAttentionBackward;

        impl<B: FusedKernels> Backward<B, 1> for PackedAttentionBackward {
            // qkv (checkpointed), the probabilities, the mask.
            type State = (
                burn::backend::autodiff::NodeId,
                B::FloatTensorPrimitive,
                AttentionMask,
            );

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let (id, probs, mask) = ops.state;
                let qkv = checkpointer.retrieve_node_output(id);
                let grad = grads.consume::<B>(&ops.node);
                if let [Some(node)] = ops.parents {
                    let g = B::packed_qkv_attention_backward(qkv, probs, grad, &mask);
                    grads.register::<B>(node.id, g);
                }
            }
        }

        match PackedAttentionBackward
            .prepare::<C>([qkv.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let id = prep.checkpoint(&qkv);
                let (out, probs) = B::packed_qkv_attention_with_probs(qkv.into_primitive(), &mask);
                prep.finish((id, probs, mask), out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::packed_qkv_attention(qkv.into_primitive(), mask))
            }
        }
    }

    fn softmax_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: AttentionMask,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct AttentionBackward;

        impl<B: FusedKernels> Backward<B, 3> for AttentionBackward {
            // q, k, v (checkpointed), the probabilities, the mask.
            type State = (
                [burn::backend::autodiff::NodeId; 3],
                B::FloatTensorPrimitive,
                AttentionMask,
            );

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let (ids, probs, mask) = ops.state;
                let inputs = ids.map(|id| checkpointer.retrieve_node_output(id));
                let grad = grads.consume::<B>(&ops.node);
                if ops.parents.iter().all(Option::is_none) {
                    return;
                }
                let input_grads = B::attention_backward(inputs, probs, grad, &mask);
                for (parent, g) in ops.parents.into_iter().zip(input_grads) {
                    if let Some(node) = parent {
                        grads.register::<B>(node.id, g);
                    }
                }
            }
        }

        match AttentionBackward
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let ids = [
                    prep.checkpoint(&q),
                    prep.checkpoint(&k),
                    prep.checkpoint(&v),
                ];
                let (out, probs) = B::attention_with_probs(
                    q.into_primitive(),
                    k.into_primitive(),
                    v.into_primitive(),
                    &mask,
                );
                prep.finish((ids, probs, mask), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::softmax_attention(
                q.into_primitive(),
                k.into_primitive(),
                v.into_primitive(),
                mask,
            )),
        }
    }

    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GeluBackward;

        impl<B: FusedKernels> Backward<B, 1> for GeluBackward {
            type State = burn::backend::autodiff::NodeId;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let x: B::FloatTensorPrimitive = checkpointer.retrieve_node_output(ops.state);
                let grad = grads.consume::<B>(&ops.node);
                if let [Some(node)] = ops.parents {
                    grads.register::<B>(node.id, B::gelu_tanh_backward(x, grad));
                }
            }
        }

        /// Recomputes the output from the input when gradient checkpointing dropped it: GELU is
        /// element-wise (memory-bound), so with `gradient_checkpointing()` its `[.., 4·hidden]`
        /// output is not kept for the backward pass of what reads it (an adapted
        /// `dense_4h_to_h` / `down_proj`) but computed again.
        #[derive(Debug)]
        struct RetroGelu<B> {
            input: burn::backend::autodiff::NodeId,
            _backend: std::marker::PhantomData<B>,
        }

        impl<B: FusedBackend> RetroForward for RetroGelu<B> {
            fn forward(
                &self,
                states: &mut BackwardStates,
                out_node: burn::backend::autodiff::NodeId,
            ) {
                let x = states.get_state::<B::FloatTensorPrimitive>(&self.input);
                states.save(out_node, B::gelu_tanh(x));
            }
        }

        let retro = RetroGelu::<B> {
            input: x.id(),
            _backend: std::marker::PhantomData,
        };
        match GeluBackward
            .prepare::<C>([x.node()])
            .memory_bound()
            .retro_forward(retro)
            .parents([&x])
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = prep.checkpoint(&x);
                prep.finish(state, B::gelu_tanh(x.into_primitive()))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gelu_tanh(x.into_primitive())),
        }
    }

    fn silu_mul(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SiluMulBackward;

        impl<B: FusedKernels> Backward<B, 2> for SiluMulBackward {
            type State = [burn::backend::autodiff::NodeId; 2];

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let [gate, up] = ops.state.map(|id| checkpointer.retrieve_node_output(id));
                let grad = grads.consume::<B>(&ops.node);
                let (d_gate, d_up) = B::silu_mul_backward(gate, up, grad);
                let [node_gate, node_up] = ops.parents;
                if let Some(node) = node_gate {
                    grads.register::<B>(node.id, d_gate);
                }
                if let Some(node) = node_up {
                    grads.register::<B>(node.id, d_up);
                }
            }
        }

        /// Recomputes the output from the inputs when gradient checkpointing dropped it (as
        /// GELU's: element-wise, so memory-bound; its output feeds an adapted `down_proj`).
        #[derive(Debug)]
        struct RetroSiluMul<B> {
            inputs: [burn::backend::autodiff::NodeId; 2],
            _backend: std::marker::PhantomData<B>,
        }

        impl<B: FusedBackend> RetroForward for RetroSiluMul<B> {
            fn forward(
                &self,
                states: &mut BackwardStates,
                out_node: burn::backend::autodiff::NodeId,
            ) {
                let [gate, up] = self
                    .inputs
                    .map(|id| states.get_state::<B::FloatTensorPrimitive>(&id));
                states.save(out_node, B::silu_mul(gate, up));
            }
        }

        let retro = RetroSiluMul::<B> {
            inputs: [gate.id(), up.id()],
            _backend: std::marker::PhantomData,
        };
        match SiluMulBackward
            .prepare::<C>([gate.node(), up.node()])
            .memory_bound()
            .retro_forward(retro)
            .parents([&gate, &up])
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = [prep.checkpoint(&gate), prep.checkpoint(&up)];
                prep.finish(
                    state,
                    B::silu_mul(gate.into_primitive(), up.into_primitive()),
                )
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::silu_mul(gate.into_primitive(), up.into_primitive()))
            }
        }
    }

    fn fused_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        eps: f32,
        rms: bool,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct NormBackward;

        impl<B: FusedKernels> Backward<B, 3> for NormBackward {
            // x and the weight (checkpointed), the per-row statistics, RMSNorm or not.
            type State = (
                [burn::backend::autodiff::NodeId; 2],
                B::FloatTensorPrimitive,
                bool,
            );

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let ([x, weight], stats, rms) = ops.state;
                let [x, weight] = [x, weight].map(|id| checkpointer.retrieve_node_output(id));
                let grad = grads.consume::<B>(&ops.node);
                let [node_x, node_w, node_b] = ops.parents;
                let params = node_w.is_some() || node_b.is_some();
                let (dx, param_grads) = B::norm_backward(x, weight, stats, grad, rms, params);
                if let Some(node) = node_x {
                    grads.register::<B>(node.id, dx);
                }
                if let Some((dw, db)) = param_grads {
                    if let Some(node) = node_w {
                        grads.register::<B>(node.id, dw);
                    }
                    if let Some(node) = node_b.filter(|_| !rms) {
                        grads.register::<B>(node.id, db);
                    }
                }
            }
        }

        match NormBackward
            .prepare::<C>([x.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let ids = [prep.checkpoint(&x), prep.checkpoint(&weight)];
                let bias = (!rms).then(|| bias.into_primitive());
                let (out, stats) =
                    B::norm_with_stats(x.into_primitive(), weight.into_primitive(), bias, eps, rms);
                prep.finish((ids, stats, rms), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_norm(
                x.into_primitive(),
                weight.into_primitive(),
                bias.into_primitive(),
                eps,
                rms,
            )),
        }
    }

    fn cross_entropy_rows(logits: FloatTensor<Self>, targets: RowTargets) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct CrossEntropyBackward;

        impl<B: FusedKernels> Backward<B, 1> for CrossEntropyBackward {
            // ∂nll[r]/∂logits[r], computed with the forward pass from the same exponentials.
            type State = B::FloatTensorPrimitive;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let grad = grads.consume::<B>(&ops.node);
                if let [Some(node)] = ops.parents {
                    grads.register::<B>(node.id, B::scale_rows(ops.state, grad));
                }
            }
        }

        match CrossEntropyBackward
            .prepare::<C>([logits.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (nll, probs) =
                    B::cross_entropy_with_gradient(logits.into_primitive(), &targets);
                prep.finish(probs, nll)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::cross_entropy_rows(logits.into_primitive(), targets))
            }
        }
    }
}

/// Whether the fused path applies: the CPU backend and f32 values.
fn fused_path<const D: usize>(x: &Tensor<D>) -> bool {
    x.dtype() == DType::F32 && runs_cpu_kernels(&x.device())
}

/// Whether the fused operations run for `tensor` (f32 on the CPU backend), so that callers on
/// other backends need not read masks or labels back to the host.
pub fn is_fused<const D: usize>(tensor: &Tensor<D>) -> bool {
    fused_path(tensor)
}

/// GELU with the tanh approximation (BLOOM's `bloom_gelu_forward`,
/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`), element-wise on `[..]`.
pub fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if fused_path(&x) {
        return Tensor::from_dispatch(<Dispatch as FusedBackend>::gelu_tanh(x.into_dispatch()));
    }
    composed_gelu_tanh(x)
}

/// [`gelu_tanh`] from burn operations (any backend), as `x · σ(2z)`: the same function, one
/// `exp` per element where `tanh` costs more.
fn composed_gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
    let cube = x.clone() * x.clone() * x.clone();
    let z = (x.clone() + cube * 0.044715) * (2.0 * SQRT_2_OVER_PI);
    x * sigmoid(z)
}

/// Rotary position embedding `x·cos + rotate_half(x)·sin` of `x: [batch, heads, seq,
/// head_dim]` with host tables `cos`, `sin`: `[seq, head_dim]`; `None` off the fused path.
pub fn rope(x: Tensor<4>, cos: &Arc<Vec<f32>>, sin: &Arc<Vec<f32>>) -> Option<Tensor<4>> {
    let [_, _, seq, head_dim] = x.dims();
    let fits = fused_path(&x)
        && head_dim % 2 == 0
        && cos.len() == seq * head_dim
        && sin.len() == seq * head_dim;
    if !fits {
        return None;
    }
    let tables = RopeTables {
        cos: cos.clone(),
        sin: sin.clone(),
    };
    Some(Tensor::from_dispatch(<Dispatch as FusedBackend>::rope(
        x.into_dispatch(),
        tables,
    )))
}

/// `silu(gate) · up` (Llama's gated feed-forward), element-wise; `None` off the fused path.
pub fn silu_mul<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Option<Tensor<D>> {
    if !(fused_path(&gate) && up.dtype() == DType::F32 && gate.dims() == up.dims()) {
        return None;
    }
    Some(Tensor::from_dispatch(<Dispatch as FusedBackend>::silu_mul(
        gate.into_dispatch(),
        up.into_dispatch(),
    )))
}

/// Whether a normalisation of `x` with these `[dim]` parameters can run fused.
fn norm_fits<const D: usize>(x: &Tensor<D>, params: &[&Tensor<1>]) -> bool {
    let dim = x.dims()[D - 1];
    fused_path(x)
        && params
            .iter()
            .all(|p| p.dtype() == DType::F32 && p.dims() == [dim])
}

/// LayerNorm over the last dimension, `(x − mean) / √(var + eps) · weight + bias` (biased
/// variance, as PyTorch); `None` off the fused path.
pub fn layer_norm<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<1>,
    bias: Tensor<1>,
    eps: f64,
) -> Option<Tensor<D>> {
    if !norm_fits(&x, &[&weight, &bias]) {
        return None;
    }
    Some(Tensor::from_dispatch(
        <Dispatch as FusedBackend>::fused_norm(
            x.into_dispatch(),
            weight.into_dispatch(),
            bias.into_dispatch(),
            eps as f32,
            false,
        ),
    ))
}

/// RMSNorm over the last dimension, `x / √(mean(x²) + eps) · weight`; `None` off the fused path.
pub fn rms_norm<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f64) -> Option<Tensor<D>> {
    if !norm_fits(&x, &[&weight]) {
        return None;
    }
    // The kernel ignores the bias of an RMSNorm; the operation's signature has one.
    let no_bias = Tensor::<1>::zeros(weight.dims(), &weight.device());
    Some(Tensor::from_dispatch(
        <Dispatch as FusedBackend>::fused_norm(
            x.into_dispatch(),
            weight.into_dispatch(),
            no_bias.into_dispatch(),
            eps as f32,
            true,
        ),
    ))
}

/// Softmax attention in one operation on the CPU backend (f32); `None` elsewhere, for the caller
/// to compose it. `q: [batch, heads, q_len, head_dim]`, `k`, `v`:
/// `[batch, kv_heads, kv_len, head_dim]` with `kv_heads` dividing `heads` (grouped-query
/// attention reads key/value head `h / (heads / kv_heads)` for query head `h`, without repeating
/// them), `scale` on `q·kᵀ`, `bias: [batch, heads, kv_len]` added to every query's scores,
/// `allowed: [batch, q_len, kv_len]`. Returns `[batch, q_len, heads, head_dim]`.
///
/// The probabilities `[batch, heads, q_len, kv_len]` are kept for the backward pass, which
/// recomputes nothing else; a query that may see no key attends uniformly to all of them, with
/// no gradient (transformers' eager attention on a fully masked row).
pub fn attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    scale: f32,
    bias: Option<Vec<f32>>,
    allowed: Vec<bool>,
) -> Option<Tensor<4>> {
    if !fused_path(&q) || k.dtype() != DType::F32 || v.dtype() != DType::F32 {
        return None;
    }
    let [batch, heads, q_len, head_dim] = q.dims();
    let [kb, kv_heads, kv_len, kd] = k.dims();
    let consistent = kb == batch
        && kd == head_dim
        && v.dims() == [batch, kv_heads, kv_len, head_dim]
        && kv_heads > 0
        && heads % kv_heads == 0
        && allowed.len() == batch * q_len * kv_len
        && bias
            .as_ref()
            .is_none_or(|b| b.len() == batch * heads * kv_len);
    if !consistent {
        return None;
    }
    let mask = AttentionMask {
        scale,
        bias: bias.map(Arc::new),
        allowed: Arc::new(allowed),
    };
    Some(Tensor::from_dispatch(
        <Dispatch as FusedBackend>::softmax_attention(
            q.into_dispatch(),
            k.into_dispatch(),
            v.into_dispatch(),
            mask,
        ),
    ))
}

/// [`attention`] for a fused query/key/value projection `qkv: [batch, seq, heads, 3, head_dim]`
/// (BLOOM's layout: per head, query, key and value in a row), self-attention without a cache
/// (`q_len = kv_len = seq`); `None` off the fused path. Returns `[batch, seq, heads, head_dim]`.
pub fn packed_qkv_attention(
    qkv: Tensor<5>,
    scale: f32,
    bias: Option<Vec<f32>>,
    allowed: Vec<bool>,
) -> Option<Tensor<4>> {
    if !fused_path(&qkv) {
        return None;
    }
    let [batch, seq, heads, three, _] = qkv.dims();
    let consistent = three == 3
        && allowed.len() == batch * seq * seq
        && bias.as_ref().is_none_or(|b| b.len() == batch * heads * seq);
    if !consistent {
        return None;
    }
    let mask = AttentionMask {
        scale,
        bias: bias.map(Arc::new),
        allowed: Arc::new(allowed),
    };
    Some(Tensor::from_dispatch(
        <Dispatch as FusedBackend>::packed_qkv_attention(qkv.into_dispatch(), mask),
    ))
}

/// Per-row negative log-likelihood of `targets` under `logits: [rows, vocab]` → `[rows]`, 0 for
/// rows whose target is negative, NaN for a target at or above `vocab`. An error when there is
/// not one target per row.
pub fn cross_entropy_rows(logits: Tensor<2>, targets: Vec<i64>) -> peft_tensors::Result<Tensor<1>> {
    let [rows, _] = logits.dims();
    if rows != targets.len() {
        return Err(peft_tensors::PeftError::InvalidInput(format!(
            "cross-entropy: {} targets for {rows} rows of logits",
            targets.len()
        )));
    }
    if fused_path(&logits) {
        return Ok(Tensor::from_dispatch(
            <Dispatch as FusedBackend>::cross_entropy_rows(
                logits.into_dispatch(),
                RowTargets(Arc::new(targets)),
            ),
        ));
    }
    let device = logits.device();
    let [_, vocab] = logits.dims();
    let valid: Vec<f32> = targets
        .iter()
        .map(|&t| match t {
            t if t < 0 => 0.0,
            t if t >= vocab as i64 => f32::NAN,
            _ => 1.0,
        })
        .collect();
    let safe: Vec<i64> = targets
        .iter()
        .map(|&t| t.clamp(0, vocab as i64 - 1))
        .collect();
    let safe = Tensor::<1, burn::tensor::Int>::from_data(
        burn::tensor::TensorData::new(safe, [rows]),
        &device,
    );
    let valid = Tensor::<1>::from_data(burn::tensor::TensorData::new(valid, [rows]), &device);
    let picked = burn::tensor::activation::log_softmax(logits, 1)
        .gather(1, safe.reshape([rows, 1]))
        .reshape([rows]);
    Ok(picked.neg() * valid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};

    /// The fused GELU equals the composed formula, value and gradient, also on a strided input.
    #[test]
    fn fused_gelu_matches_the_composed_one() {
        let device = Device::flex().autodiff();
        let x =
            Tensor::<3>::random([3, 4, 50], Distribution::Normal(0.0, 3.0), &device).require_grad();
        let weights = Tensor::<3>::random([3, 50, 4], Distribution::Default, &device);
        // A transposed view takes the strided path.
        let fused = gelu_tanh(x.clone().swap_dims(1, 2));
        let plain = composed_gelu_tanh(x.clone().swap_dims(1, 2));
        let diff: f32 = (fused.clone() - plain.clone()).abs().max().into_scalar();
        assert!(diff < 1e-5, "values differ by {diff}");
        let gf = x.grad(&(fused * weights.clone()).sum().backward()).unwrap();
        let gc = x.grad(&(plain * weights).sum().backward()).unwrap();
        let diff: f32 = (gf - gc).abs().max().into_scalar();
        assert!(diff < 1e-5, "gradients differ by {diff}");
    }

    /// Without autodiff the fused operations give the same values.
    #[test]
    fn fused_operations_run_without_autodiff() {
        let device = Device::flex();
        let x = Tensor::<2>::from_data([[0.0f32, 1.0, -2.0], [3.0, 0.5, -0.5]], &device);
        let gelu: Vec<f32> = gelu_tanh(x.clone())
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let want = |v: f64| {
            0.5 * v * (1.0 + (0.797_884_560_802_865_4 * (v + 0.044715 * v.powi(3))).tanh())
        };
        for (g, v) in gelu.iter().zip([0.0, 1.0, -2.0, 3.0, 0.5, -0.5]) {
            assert!((*g as f64 - want(v)).abs() < 1e-6);
        }
        assert!(cross_entropy_rows(x.clone(), vec![2]).is_err());
        let nll: Vec<f32> = cross_entropy_rows(x, vec![2, -100])
            .unwrap()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let lse = (1f64 + 1f64.exp() + (-2f64).exp()).ln();
        assert!((nll[0] as f64 - (lse + 2.0)).abs() < 1e-6, "{nll:?}");
        assert_eq!(nll[1], 0.0);
    }

    fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// Fused LayerNorm and RMSNorm equal the composed formulas: values, `∂x`, `∂weight`,
    /// `∂bias` (trainable norms, as BitFit and full fine-tuning have them).
    #[test]
    fn fused_norms_match_the_composed_ones() {
        let device = Device::flex().autodiff();
        let x = Tensor::<3>::random([3, 37, 24], Distribution::Normal(1.0, 2.0), &device)
            .require_grad();
        let w = Tensor::<1>::random([24], Distribution::Normal(1.0, 0.5), &device).require_grad();
        let b = Tensor::<1>::random([24], Distribution::Default, &device).require_grad();
        let r = Tensor::<3>::random([3, 37, 24], Distribution::Default, &device);
        let eps = 1e-5;
        let composed_ln = {
            let (var, mean) = x.clone().var_mean_bias(2);
            (x.clone() - mean).div((var + eps).sqrt()) * w.clone().unsqueeze()
                + b.clone().unsqueeze()
        };
        let fused_ln = layer_norm(x.clone(), w.clone(), b.clone(), eps).unwrap();
        assert!(max_diff(fused_ln.clone(), composed_ln.clone()) < 1e-5);
        let gf = (fused_ln * r.clone()).sum().backward();
        let gc = (composed_ln * r.clone()).sum().backward();
        let d = max_diff(x.grad(&gf).unwrap(), x.grad(&gc).unwrap());
        assert!(d < 1e-4, "layer norm ∂x differs by {d}");
        for (name, t) in [("weight", &w), ("bias", &b)] {
            let d = max_diff(t.grad(&gf).unwrap(), t.grad(&gc).unwrap());
            assert!(d < 1e-4, "layer norm ∂{name} differs by {d}");
        }
        let composed_rms = {
            let ms = x.clone().square().mean_dim(2);
            x.clone() * (ms + eps).sqrt().recip() * w.clone().unsqueeze()
        };
        let fused_rms = rms_norm(x.clone(), w.clone(), eps).unwrap();
        assert!(max_diff(fused_rms.clone(), composed_rms.clone()) < 1e-5);
        let gf = (fused_rms * r.clone()).sum().backward();
        let gc = (composed_rms * r).sum().backward();
        let d = max_diff(x.grad(&gf).unwrap(), x.grad(&gc).unwrap());
        assert!(d < 1e-4, "rms norm ∂x differs by {d}");
        let d = max_diff(w.grad(&gf).unwrap(), w.grad(&gc).unwrap());
        assert!(d < 1e-4, "rms norm ∂weight differs by {d}");
    }

    /// Fused `silu(gate) · up` equals the composed one, with both gradients.
    #[test]
    fn fused_silu_mul_matches_the_composed_one() {
        let device = Device::flex().autodiff();
        let gate =
            Tensor::<3>::random([2, 9, 70], Distribution::Normal(0.0, 3.0), &device).require_grad();
        let up = Tensor::<3>::random([2, 9, 70], Distribution::Default, &device).require_grad();
        let r = Tensor::<3>::random([2, 9, 70], Distribution::Default, &device);
        let fused = silu_mul(gate.clone(), up.clone()).unwrap();
        let composed = burn::tensor::activation::silu(gate.clone()) * up.clone();
        assert!(max_diff(fused.clone(), composed.clone()) < 1e-5);
        let gf = (fused * r.clone()).sum().backward();
        let gc = (composed * r).sum().backward();
        assert!(max_diff(gate.grad(&gf).unwrap(), gate.grad(&gc).unwrap()) < 1e-5);
        assert!(max_diff(up.grad(&gf).unwrap(), up.grad(&gc).unwrap()) < 1e-5);
    }
}
