//! BLOOM's GELU (tanh approximation), element-wise; under gradient checkpointing its output is
//! recomputed from the input instead of kept.

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
use burn::tensor::Tensor;
use burn::tensor::activation::sigmoid;

use super::{FusedBackend, FusedKernels, count_activation, fused_path, values};
use crate::host::written_f32;
use crate::kernels;

pub(super) fn flex_gelu(x: &FlexTensor) -> FlexTensor {
    count_activation();
    let x_values = values(x);
    let shape = x.layout().shape().clone();
    // SAFETY: `gelu_tanh` writes every element of an output as long as its input, and only
    // values.
    unsafe { written_f32(shape, x_values.len(), |y| kernels::gelu_tanh(&x_values, y)) }
}

pub(super) fn flex_gelu_backward(x: &FlexTensor, grad: &FlexTensor) -> FlexTensor {
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

pub(super) fn autodiff<B: FusedBackend + FusedKernels, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
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
        fn forward(&self, states: &mut BackwardStates, out_node: burn::backend::autodiff::NodeId) {
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
pub(super) fn composed_gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
    let cube = x.clone() * x.clone() * x.clone();
    let z = (x.clone() + cube * 0.044715) * (2.0 * SQRT_2_OVER_PI);
    x * sigmoid(z)
}
