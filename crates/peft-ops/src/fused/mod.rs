//! Fused, differentiable operations for the CPU backend: softmax attention (also over BLOOM's
//! packed qkv projection), LayerNorm/RMSNorm, the rotary embedding, BLOOM's GELU, Llama's
//! `silu(gate)·up` and the loss's cross-entropy, each one pass over memory forward and one
//! backward, with the vectorised kernels of [`crate::kernels`].
//!
//! Composed from burn's element-wise operations these cost several passes each and as many
//! intermediate tensors kept for the backward pass (what that cost on the small BLOOM, and what
//! fusing saved: docs/BENCHMARKS.md). On other backends, and for tensors that are not f32, the
//! public functions compose the same math from burn operations (or return `None` for the caller
//! to).
//!
//! One file per operation, each with its CPU forward and backward (over [`FlexTensor`]), its
//! autodiff node (`autodiff`: the backward step and, for the element-wise ones, the forward
//! recomputed under gradient checkpointing) and its public function over [`Tensor`]. This file
//! holds the two backend traits that burn's `backend_extension` needs whole, and their
//! implementations, one line per operation, calling into those files. A new operation is a new
//! file, its declaration in [`FusedBackend`] (and, when its backward needs a kernel of its own,
//! in [`FusedKernels`]), and one line in each implementation.

mod attention;
mod cross_entropy;
mod gelu;
mod norm;
mod rope;
mod silu_mul;

pub use attention::{AttentionMask, attention, packed_qkv_attention};
pub use cross_entropy::{RowTargets, cross_entropy_rows};
pub use gelu::gelu_tanh;
pub use norm::{NormGrads, layer_norm, rms_norm};
pub use rope::{RopeTables, rope};
pub use silu_mul::silu_mul;

use burn::backend::autodiff::{Autodiff, checkpoint::strategy::CheckpointStrategy};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Flex, backend_extension};
use burn::tensor::{DType, Tensor};

use crate::device::runs_cpu_kernels;
use crate::kernels;

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

impl FusedBackend for Flex {
    fn softmax_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: AttentionMask,
    ) -> FloatTensor<Self> {
        attention::flex_attention(q, k, v, &mask).0
    }

    fn packed_qkv_attention(qkv: FloatTensor<Self>, mask: AttentionMask) -> FloatTensor<Self> {
        attention::flex_packed_attention(qkv, &mask).0
    }

    fn rope(x: FloatTensor<Self>, tables: RopeTables) -> FloatTensor<Self> {
        rope::flex_rope(x, &tables, false)
    }

    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        gelu::flex_gelu(&x)
    }

    fn silu_mul(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        silu_mul::flex_silu_mul(&gate, &up)
    }

    fn fused_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        eps: f32,
        rms: bool,
    ) -> FloatTensor<Self> {
        let bias = (!rms).then_some(&bias);
        norm::flex_norm(&x, &weight, bias, eps, rms).0
    }

    fn cross_entropy_rows(logits: FloatTensor<Self>, targets: RowTargets) -> FloatTensor<Self> {
        cross_entropy::flex_cross_entropy(&logits, &targets, None)
    }
}

impl FusedKernels for Flex {
    fn gelu_tanh_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        gelu::flex_gelu_backward(&x, &grad)
    }

    fn cross_entropy_with_gradient(
        logits: FloatTensor<Self>,
        targets: &RowTargets,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        cross_entropy::flex_cross_entropy_with_gradient(logits, targets)
    }

    fn scale_rows(values: FloatTensor<Self>, by: FloatTensor<Self>) -> FloatTensor<Self> {
        cross_entropy::flex_scale_rows(values, by)
    }

    fn attention_with_probs(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: &AttentionMask,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        attention::flex_attention(q, k, v, mask)
    }

    fn rope_backward(grad: FloatTensor<Self>, tables: &RopeTables) -> FloatTensor<Self> {
        rope::flex_rope(grad, tables, true)
    }

    fn silu_mul_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        silu_mul::flex_silu_mul_backward(gate, up, grad)
    }

    fn norm_with_stats(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        eps: f32,
        rms: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        norm::flex_norm(&x, &weight, bias.as_ref(), eps, rms)
    }

    fn norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        rms: bool,
        params: bool,
    ) -> NormGrads<Self> {
        norm::flex_norm_backward(x, weight, stats, grad, rms, params)
    }

    fn packed_qkv_attention_with_probs(
        qkv: FloatTensor<Self>,
        mask: &AttentionMask,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        attention::flex_packed_attention(qkv, mask)
    }

    fn packed_qkv_attention_backward(
        qkv: FloatTensor<Self>,
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        mask: &AttentionMask,
    ) -> FloatTensor<Self> {
        attention::flex_packed_qkv_attention_backward(qkv, probs, grad, mask)
    }

    fn attention_backward(
        qkv: [FloatTensor<Self>; 3],
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        mask: &AttentionMask,
    ) -> [FloatTensor<Self>; 3] {
        attention::flex_attention_backward(qkv, probs, grad, mask)
    }
}

impl<B: FusedBackend + FusedKernels, C: CheckpointStrategy> FusedBackend for Autodiff<B, C> {
    fn softmax_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: AttentionMask,
    ) -> FloatTensor<Self> {
        attention::autodiff_attention::<B, C>(q, k, v, mask)
    }

    fn packed_qkv_attention(qkv: FloatTensor<Self>, mask: AttentionMask) -> FloatTensor<Self> {
        attention::autodiff_packed::<B, C>(qkv, mask)
    }

    fn rope(x: FloatTensor<Self>, tables: RopeTables) -> FloatTensor<Self> {
        rope::autodiff::<B, C>(x, tables)
    }

    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        gelu::autodiff::<B, C>(x)
    }

    fn silu_mul(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        silu_mul::autodiff::<B, C>(gate, up)
    }

    fn fused_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        eps: f32,
        rms: bool,
    ) -> FloatTensor<Self> {
        norm::autodiff::<B, C>(x, weight, bias, eps, rms)
    }

    fn cross_entropy_rows(logits: FloatTensor<Self>, targets: RowTargets) -> FloatTensor<Self> {
        cross_entropy::autodiff::<B, C>(logits, targets)
    }
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

/// Whether the fused path applies: the CPU backend and f32 values.
fn fused_path<const D: usize>(x: &Tensor<D>) -> bool {
    x.dtype() == DType::F32 && runs_cpu_kernels(&x.device())
}

/// Whether the fused operations run for `tensor` (f32 on the CPU backend), so that callers on
/// other backends need not read masks or labels back to the host.
pub fn is_fused<const D: usize>(tensor: &Tensor<D>) -> bool {
    fused_path(tensor)
}

#[cfg(test)]
mod tests {
    use super::gelu::composed_gelu_tanh;
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
