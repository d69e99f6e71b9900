//! The loss's cross-entropy per row, its gradient `softmax − onehot` computed with the forward
//! pass from the same exponentials and kept, scaled by `∂loss` in the backward pass.

use burn::backend::autodiff::{
    Autodiff,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use std::sync::Arc;

use burn::backend::Dispatch;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::tensor::{Shape, Tensor};

use super::{FusedBackend, FusedKernels, fused_path, values};
use crate::host::zeros_f32;
use crate::kernels;

/// One target class per row for [`FusedBackend::cross_entropy_rows`]; a negative target marks a
/// row that takes no part (PyTorch's `ignore_index`).
#[derive(Clone, Debug)]
pub struct RowTargets(pub Arc<Vec<i64>>);

/// Per-row losses `[rows]`; with `gradient` (`[rows, vocab]`), each row's gradient written into
/// it from the same exponentials.
pub(super) fn flex_cross_entropy(
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

pub(super) fn flex_cross_entropy_with_gradient(
    logits: FlexTensor,
    targets: &RowTargets,
) -> (FlexTensor, FlexTensor) {
    let mut probs = zeros_f32(logits.layout().shape().clone());
    let nll = flex_cross_entropy(&logits, targets, Some(&mut probs));
    (nll, probs)
}

pub(super) fn flex_scale_rows(values: FlexTensor, by: FlexTensor) -> FlexTensor {
    let width = values.layout().shape()[1];
    let mut values = if values.is_contiguous() && values.is_unique() {
        values
    } else {
        values.to_contiguous()
    };
    kernels::scale_rows(values.storage_mut::<f32>(), width, &self::values(&by));
    values
}

pub(super) fn autodiff<B: FusedBackend + FusedKernels, C: CheckpointStrategy>(
    logits: FloatTensor<Autodiff<B, C>>,
    targets: RowTargets,
) -> FloatTensor<Autodiff<B, C>> {
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
            let (nll, probs) = B::cross_entropy_with_gradient(logits.into_primitive(), &targets);
            prep.finish(probs, nll)
        }
        OpsKind::UnTracked(prep) => {
            prep.finish(B::cross_entropy_rows(logits.into_primitive(), targets))
        }
    }
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
