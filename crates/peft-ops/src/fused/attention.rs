//! Softmax attention, over separate query/key/value tensors or BLOOM's packed `qkv`
//! projection: the probabilities are kept for the backward pass, which recomputes nothing else.

use std::sync::Arc;

use burn::backend::Dispatch;
use burn::backend::autodiff::{
    Autodiff,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::tensor::{DType, Shape, Tensor};

use super::{FusedBackend, FusedKernels, dims4, fused_path, view4, viewable};
use crate::host::zeros_f32;
use crate::kernels;

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

pub(super) fn flex_attention(
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

pub(super) fn flex_packed_attention(
    qkv: FlexTensor,
    mask: &AttentionMask,
) -> (FlexTensor, FlexTensor) {
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

pub(super) fn flex_attention_backward(
    [q, k, v]: [FlexTensor; 3],
    probs: FlexTensor,
    grad: FlexTensor,
    mask: &AttentionMask,
) -> [FlexTensor; 3] {
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

pub(super) fn flex_packed_qkv_attention_backward(
    qkv: FlexTensor,
    probs: FlexTensor,
    grad: FlexTensor,
    mask: &AttentionMask,
) -> FlexTensor {
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

pub(super) fn autodiff_attention<B: FusedBackend + FusedKernels, C: CheckpointStrategy>(
    q: FloatTensor<Autodiff<B, C>>,
    k: FloatTensor<Autodiff<B, C>>,
    v: FloatTensor<Autodiff<B, C>>,
    mask: AttentionMask,
) -> FloatTensor<Autodiff<B, C>> {
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

pub(super) fn autodiff_packed<B: FusedBackend + FusedKernels, C: CheckpointStrategy>(
    qkv: FloatTensor<Autodiff<B, C>>,
    mask: AttentionMask,
) -> FloatTensor<Autodiff<B, C>> {
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
