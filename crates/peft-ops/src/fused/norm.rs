//! LayerNorm and RMSNorm over the last dimension: the per-row statistics are kept for the
//! backward pass, which also yields the weight's (and bias's) gradients.

use burn::backend::autodiff::{
    Autodiff,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Dispatch, Flex};
use burn::tensor::{DType, Shape, Tensor};

use super::{FusedBackend, FusedKernels, fused_path, values};
use crate::host::{written_f32, zeros_f32};
use crate::kernels;

/// `∂x` of a normalisation and, when asked, `(∂weight, ∂bias)`.
pub type NormGrads<B> = (FloatTensor<B>, Option<(FloatTensor<B>, FloatTensor<B>)>);

/// The last dimension of `x` and the number of rows before it.
fn rows_of(x: &FlexTensor) -> (usize, usize) {
    let shape = x.layout().shape();
    let dim = shape[shape.num_dims() - 1];
    (shape.num_elements() / dim.max(1), dim)
}

pub(super) fn flex_norm(
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

pub(super) fn flex_norm_backward(
    x: FlexTensor,
    weight: FlexTensor,
    stats: FlexTensor,
    grad: FlexTensor,
    rms: bool,
    params: bool,
) -> NormGrads<Flex> {
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

pub(super) fn autodiff<B: FusedBackend + FusedKernels, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    weight: FloatTensor<Autodiff<B, C>>,
    bias: FloatTensor<Autodiff<B, C>>,
    eps: f32,
    rms: bool,
) -> FloatTensor<Autodiff<B, C>> {
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
