//! The output projection and the cross-entropy in one operation over blocks of rows, so that the
//! `[tokens, vocab]` logits and their gradient never exist whole (Liger-Kernel's fused linear
//! cross-entropy). At real vocabularies (46 k for BLOOM, 128–152 k for Llama 3 and Qwen) those
//! two tensors are the largest of a training step.
//!
//! The forward pass computes each block's logits, its per-row losses and — when the hidden
//! states need a gradient — the block's `∂loss/∂hidden` for a unit upstream gradient, then lets
//! the logits go. The per-row loss is linear in its upstream gradient, so the backward pass only
//! scales those rows: the products are the same two as without chunking (`h·W` and `∂z·Wᵀ`),
//! nothing is recomputed. The projection must be frozen (no gradient for `W`), which it is in
//! every adapter method unless `lm_head` itself is trained (then the caller computes the loss
//! from whole logits).
//!
//! Implemented as a backend extension for the CPU backend (Flex) and autodiff over it; other
//! backends take the composed path (see [`linear_cross_entropy_rows`]).

use std::sync::Arc;

use burn::backend::autodiff::{
    Autodiff,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::tensor::{Tensor, TensorData};

use crate::matmul::BlasMatmulBackend;
use crate::packed::PackedWeight;

/// Logit elements per block by default: 32 Mi (128 MiB of f32) — large blocks keep the number
/// of passes over the `[hidden, vocab]` weight small (each block reads all of it).
pub const BLOCK_LOGITS: usize = 1 << 25;

/// What the operation needs besides its tensors.
#[derive(Debug, Clone)]
pub struct CrossEntropyTargets {
    /// One target id per row; a negative id is ignored (loss 0, no gradient), an id at or past
    /// the vocabulary gives a NaN loss.
    pub targets: Arc<Vec<i64>>,
    /// Final-logit soft-capping `cap · tanh(z / cap)` before the softmax (Gemma 2).
    pub softcap: Option<f32>,
    /// Logit elements computed at once (rows per block = this / vocab, at least one).
    pub block_logits: usize,
}

/// A frozen output projection computed in bf16 (an ordinary, non-tensor argument): its weight
/// `[vocab, h]` — a bf16-held `lm_head`, or a bf16 copy of a tied embedding table — whose
/// values are rounded to bf16.
#[derive(Clone, Debug)]
pub struct Bf16Projection(pub Arc<dyn PackedWeight>);

/// Backends with the fused projection + cross-entropy.
#[backend_extension(Autodiff, Flex)]
pub trait LinearCrossEntropyBackend: Backend {
    /// `hidden: [rows, h]`, `weight: [h, vocab]` (frozen) → each row's negative
    /// log-likelihood of its target, `[rows]` (0 for ignored rows).
    fn linear_cross_entropy(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: CrossEntropyTargets,
    ) -> FloatTensor<Self>;

    /// The same loss with the projection in bf16, as `torch.autocast` computes `lm_head`:
    /// `z = round(round(hidden) · Wᵀ)` (f32 accumulation; the loss itself in f32) and
    /// `∂hidden = round(round(∂z) · W)`.
    fn bf16_linear_cross_entropy(
        hidden: FloatTensor<Self>,
        weight: Bf16Projection,
        targets: CrossEntropyTargets,
    ) -> FloatTensor<Self>;
}

/// Row-block results: the losses, and `∂loss/∂hidden` for unit upstream gradients if asked.
fn blocks<B: BlasMatmulBackend>(
    hidden: FloatTensor<B>,
    weight: FloatTensor<B>,
    targets: &CrossEntropyTargets,
    with_grad: bool,
) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
    let device = hidden.device();
    let [rows, h] = hidden.shape().dims();
    let vocab = weight.shape().dims::<2>()[1];
    let block = (targets.block_logits / vocab.max(1)).clamp(1, rows.max(1));
    let mut losses = vec![0.0f32; rows];
    let mut grad_parts = Vec::new();
    for start in (0..rows).step_by(block) {
        let end = (start + block).min(rows);
        let h_block = B::float_slice(
            hidden.clone(),
            &[
                burn::tensor::Slice::from(start..end),
                burn::tensor::Slice::from(0..h),
            ],
        );
        let logits = B::blas_matmul(h_block, weight.clone());
        let mut z = crate::host::host_values::<B>(&logits).unwrap_or_default();
        if z.len() != (end - start) * vocab {
            // Unreadable logits (not reached on the CPU backend): NaN losses, no panic.
            losses[start..end].fill(f32::NAN);
            z = vec![0.0; (end - start) * vocab];
        } else {
            use rayon::prelude::*;
            z.par_chunks_mut(vocab)
                .zip(losses[start..end].par_iter_mut())
                .zip(targets.targets[start..end].par_iter())
                .for_each(|((row, loss), &target)| {
                    *loss = row_loss(row, target, targets.softcap);
                });
        }
        if with_grad {
            // `z` now holds each row's ∂loss/∂z (zero for ignored rows).
            let dz = B::float_from_data(TensorData::new(z, [end - start, vocab]), &device);
            grad_parts.push(B::blas_matmul(dz, B::float_transpose(weight.clone())));
        }
    }
    let losses = B::float_from_data(TensorData::new(losses, [rows]), &device);
    let grad = with_grad.then(|| {
        if grad_parts.len() == 1 {
            grad_parts.remove(0)
        } else {
            B::float_cat(grad_parts, 0)
        }
    });
    (losses, grad)
}

/// [`blocks`] with the projection in bf16, on the host: each block's hidden rows rounded to
/// bf16, `z = round(h · Wᵀ)` and `∂h = round(round(∂z) · W)` through the packed operation's bf16
/// product (oneDNN on the CPU's bf16 units, or f32 GEMMs of the rounded operands without it:
/// same numerics, f32 speed).
fn bf16_blocks<B: Backend>(
    hidden: FloatTensor<B>,
    weight: &Bf16Projection,
    targets: &CrossEntropyTargets,
    with_grad: bool,
) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
    use crate::onednn::to_bf16_bits;
    use crate::packed_op::{Bf16Layer, Direction, PackedHandle, bf16_times};
    use rayon::prelude::*;
    let device = hidden.device();
    let [rows, h] = hidden.shape().dims();
    let [vocab, _] = weight.0.shape();
    // The projection is a bf16 linear layer's weight `[out = vocab, in = h]`: its products are
    // the packed operation's.
    let handle = PackedHandle {
        weight: weight.0.clone(),
        bf16: Some(Bf16Layer::default()),
    };
    let block = (targets.block_logits / vocab.max(1)).clamp(1, rows.max(1));
    let mut losses = vec![0.0f32; rows];
    let mut grad = with_grad.then(|| Vec::<f32>::with_capacity(rows * h));
    let read = crate::host::with_host_f32::<B, _>(&hidden, |hidden| {
        for start in (0..rows).step_by(block) {
            let end = (start + block).min(rows);
            let m = end - start;
            let a = to_bf16_bits(&hidden[start * h..end * h]);
            let mut z = bf16_times(&a, m, &handle, Direction::Forward);
            crate::packed_op::finish_bf16(&mut z, None, true);
            z.par_chunks_mut(vocab)
                .zip(losses[start..end].par_iter_mut())
                .zip(targets.targets[start..end].par_iter())
                .for_each(|((row, loss), &target)| {
                    *loss = row_loss(row, target, targets.softcap);
                });
            if let Some(grad) = grad.as_mut() {
                let dz = to_bf16_bits(&z);
                let mut dh = bf16_times(&dz, m, &handle, Direction::Backward);
                crate::packed_op::finish_bf16(&mut dh, None, true);
                grad.extend_from_slice(&dh);
            }
        }
    });
    if read.is_none() {
        // Unreadable hidden states (not reached on the CPU backend): NaN losses, no panic.
        losses.fill(f32::NAN);
        if let Some(grad) = grad.as_mut() {
            grad.resize(rows * h, 0.0);
        }
    }
    let losses = B::float_from_data(TensorData::new(losses, [rows]), &device);
    let grad = grad.map(|g| B::float_from_data(TensorData::new(g, [rows, h]), &device));
    (losses, grad)
}

/// One row: its loss, and the row overwritten with `∂loss/∂z` (softmax − one-hot, through the
/// soft-cap's derivative `1 − (z'/cap)²`). An ignored row becomes zeros; a target outside the
/// vocabulary gives NaN (as the whole-logits loss does).
fn row_loss(z: &mut [f32], target: i64, softcap: Option<f32>) -> f32 {
    let Ok(t) = usize::try_from(target) else {
        z.fill(0.0);
        return 0.0;
    };
    if t >= z.len() {
        z.fill(0.0);
        return f32::NAN;
    }
    let Some(cap) = softcap else {
        return crate::kernels::cross_entropy_row_in_place(z, t);
    };
    for v in z.iter_mut() {
        *v = cap * (*v / cap).tanh();
    }
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = z.iter().map(|v| (v - max).exp()).sum();
    let lse = max + sum.ln();
    let loss = lse - z[t];
    for (i, v) in z.iter_mut().enumerate() {
        let capped = *v;
        let p = (capped - lse).exp() - if i == t { 1.0 } else { 0.0 };
        *v = p * (1.0 - (capped / cap) * (capped / cap));
    }
    loss
}

impl LinearCrossEntropyBackend for Flex {
    fn linear_cross_entropy(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: CrossEntropyTargets,
    ) -> FloatTensor<Self> {
        blocks::<Flex>(hidden, weight, &targets, false).0
    }

    fn bf16_linear_cross_entropy(
        hidden: FloatTensor<Self>,
        weight: Bf16Projection,
        targets: CrossEntropyTargets,
    ) -> FloatTensor<Self> {
        bf16_blocks::<Flex>(hidden, &weight, &targets, false).0
    }
}

/// The backward pass of both fused losses: the forward pass kept `∂loss_i/∂hidden_i` for a unit
/// upstream gradient, `[rows, h]`; the upstream gradient scales its rows.
#[derive(Debug)]
struct LinearCrossEntropyBackward;

impl<B: Backend> Backward<B, 1> for LinearCrossEntropyBackward {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_hidden] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = node_hidden {
            let rows = grad.shape().dims::<1>()[0];
            let scale = B::float_reshape(grad, burn::tensor::Shape::new([rows, 1]));
            grads.register::<B>(node.id, B::float_mul(ops.state, scale));
        }
    }
}

/// The loss of `compute(hidden, with_grad)` (the losses and, when asked, the unit-upstream
/// gradient) as one tracked operation of `hidden`.
fn tracked<B: Backend, C: CheckpointStrategy>(
    hidden: FloatTensor<Autodiff<B, C>>,
    compute: impl Fn(FloatTensor<B>, bool) -> (FloatTensor<B>, Option<FloatTensor<B>>),
) -> FloatTensor<Autodiff<B, C>> {
    match LinearCrossEntropyBackward
        .prepare::<C>([hidden.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => match compute(hidden.into_primitive(), true) {
            (losses, Some(grad)) => prep.finish(grad, losses),
            // Not reached: `with_grad` always yields a gradient.
            (_, None) => unreachable!("gradient requested"),
        },
        OpsKind::UnTracked(prep) => prep.finish(compute(hidden.into_primitive(), false).0),
    }
}

impl<B: BlasMatmulBackend, C: CheckpointStrategy> LinearCrossEntropyBackend for Autodiff<B, C> {
    fn linear_cross_entropy(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: CrossEntropyTargets,
    ) -> FloatTensor<Self> {
        let weight = weight.into_primitive();
        tracked::<B, C>(hidden, |hidden, with_grad| {
            blocks::<B>(hidden, weight.clone(), &targets, with_grad)
        })
    }

    fn bf16_linear_cross_entropy(
        hidden: FloatTensor<Self>,
        weight: Bf16Projection,
        targets: CrossEntropyTargets,
    ) -> FloatTensor<Self> {
        tracked::<B, C>(hidden, |hidden, with_grad| {
            bf16_blocks::<B>(hidden, &weight, &targets, with_grad)
        })
    }
}

/// Each row's loss of `hidden: [rows, h] · weight: [h, vocab]` against `targets` through the
/// fused operation, or `None` off the CPU backend (the caller computes whole logits).
pub fn linear_cross_entropy_rows(
    hidden: Tensor<2>,
    weight: Tensor<2>,
    targets: CrossEntropyTargets,
) -> Option<Tensor<1>> {
    if !crate::device::runs_cpu_kernels(&hidden.device()) {
        return None;
    }
    Some(Tensor::<1>::from_dispatch(
        <Dispatch as LinearCrossEntropyBackend>::linear_cross_entropy(
            hidden.into_dispatch(),
            weight.detach().into_dispatch(),
            targets,
        ),
    ))
}

/// [`linear_cross_entropy_rows`] with the projection `weight: [vocab, h]` computed in bf16
/// ([`LinearCrossEntropyBackend::bf16_linear_cross_entropy`]); `None` off the CPU backend.
pub fn bf16_linear_cross_entropy_rows(
    hidden: Tensor<2>,
    weight: Arc<dyn PackedWeight>,
    targets: CrossEntropyTargets,
) -> Option<Tensor<1>> {
    if !crate::device::runs_cpu_kernels(&hidden.device()) {
        return None;
    }
    Some(Tensor::<1>::from_dispatch(
        <Dispatch as LinearCrossEntropyBackend>::bf16_linear_cross_entropy(
            hidden.into_dispatch(),
            Bf16Projection(weight),
            targets,
        ),
    ))
}
