//! The rotary position embedding: linear in its input, so the backward pass is the inverse
//! rotation and needs only the tables.

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
use burn::tensor::Tensor;

use super::{FusedBackend, FusedKernels, fused_path, view4, viewable};
use crate::host::zeros_f32;
use crate::kernels;

/// Rotary embedding tables for [`FusedBackend::rope`]: `cos`, `sin`, each `[seq, head_dim]`.
#[derive(Clone, Debug)]
pub struct RopeTables {
    /// Cosines, `[seq, head_dim]`.
    pub cos: Arc<Vec<f32>>,
    /// Sines, `[seq, head_dim]`.
    pub sin: Arc<Vec<f32>>,
}

pub(super) fn flex_rope(x: FlexTensor, tables: &RopeTables, inverse: bool) -> FlexTensor {
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

pub(super) fn autodiff<B: FusedBackend + FusedKernels, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    tables: RopeTables,
) -> FloatTensor<Autodiff<B, C>> {
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
