//! Llama's gated feed-forward `silu(gate) · up`, element-wise; under gradient checkpointing its
//! output is recomputed from the inputs instead of kept.

use burn::backend::Dispatch;
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
use burn::tensor::{DType, Tensor};

use super::{FusedBackend, FusedKernels, count_activation, fused_path, values};
use crate::host::zeros_f32;
use crate::kernels;

pub(super) fn flex_silu_mul(gate: &FlexTensor, up: &FlexTensor) -> FlexTensor {
    count_activation();
    let mut out = zeros_f32(gate.layout().shape().clone());
    kernels::silu_mul(&values(gate), &values(up), out.storage_mut::<f32>());
    out
}

pub(super) fn flex_silu_mul_backward(
    gate: FlexTensor,
    up: FlexTensor,
    grad: FlexTensor,
) -> (FlexTensor, FlexTensor) {
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

pub(super) fn autodiff<B: FusedBackend + FusedKernels, C: CheckpointStrategy>(
    gate: FloatTensor<Autodiff<B, C>>,
    up: FloatTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
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
        fn forward(&self, states: &mut BackwardStates, out_node: burn::backend::autodiff::NodeId) {
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
