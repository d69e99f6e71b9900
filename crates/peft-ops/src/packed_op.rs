//! `x · Wᵀ` against a packed (4-bit) weight as one differentiable operation, so that the
//! de-quantised weight never outlives the call: the forward pass de-quantises, multiplies and
//! drops it; the backward pass de-quantises again for `∂x = ∂y · W`. (A plain `matmul` with a
//! de-quantised constant would keep every layer's dense weight alive in the autodiff graph
//! until the backward pass — as much memory as the f32 model.)
//!
//! Implemented as a burn backend extension for the CPU backend (Flex) and autodiff over any
//! backend; other backends use the plain path (see [`packed_linear`]).

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

/// The packed weight handed to the operation (an ordinary, non-tensor argument), and what the
/// operation computes around the product.
#[derive(Clone)]
pub struct PackedHandle {
    /// The weight.
    pub weight: Arc<dyn PackedWeight>,
    /// `Some` under bf16 compute: the operation is a whole bf16 linear layer (see
    /// [`Bf16Layer`]); `None`: the f32 product `x · Wᵀ`.
    pub bf16: Option<Bf16Layer>,
}

/// A linear layer computed in bf16 as one operation (docs/PRECISION.md):
///
/// ```text
/// forward   y  = round(round(x) · round(W)ᵀ + round(b))      (f32 accumulation)
/// backward  ∂x = round(round(∂y) · round(W))
/// ```
///
/// — what PyTorch computes for `F.linear(x.to(bf16), W.to(bf16), b.to(bf16)).to(f32)`, gradients
/// included, without the four casts and the bias addition as separate passes over the
/// activations.
#[derive(Clone, Debug, Default)]
pub struct Bf16Layer {
    /// The frozen bias `[out]`, already rounded to bf16, added before the output's rounding.
    pub bias: Option<Arc<[f32]>>,
    /// Round the output to bf16. `false` when the caller adds a trainable bias itself and then
    /// rounds (the backward pass rounds the incoming gradient either way: rounding a gradient
    /// that is already bf16 changes nothing).
    pub round_output: bool,
}

impl std::fmt::Debug for PackedHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedHandle({:?}, bf16: {:?})",
            self.weight.shape(),
            self.bf16
        )
    }
}

/// Backends that multiply by a packed weight without keeping its dense copy.
#[backend_extension(Autodiff, Flex)]
pub trait PackedMatmulBackend: Backend {
    /// `x: [rows, in]` → `x · Wᵀ: [rows, out]` for a packed `W: [out, in]` (a whole bf16 layer
    /// when the handle says so).
    fn packed_matmul(x: FloatTensor<Self>, weight: PackedHandle) -> FloatTensor<Self>;
}

/// `W` as `[out, in]` on `device`, in f32 (its values rounded to bf16 under bf16 compute).
fn dense<B: Backend>(handle: &PackedHandle, device: &B::Device) -> FloatTensor<B> {
    let values = match handle.bf16 {
        Some(_) => handle.weight.dequantize_bf16_rounded(),
        None => handle.weight.dequantize(),
    };
    B::float_from_data(TensorData::new(values, handle.weight.shape()), device)
}

/// `x` rounded to bf16 and widened back, with the backend's casts (the path off the host).
fn round_tensor<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    use burn::tensor::DType;
    B::float_cast(B::float_cast(x, DType::BF16.into()), DType::F32.into())
}

fn forward<B: BlasMatmulBackend>(x: FloatTensor<B>, handle: &PackedHandle) -> FloatTensor<B> {
    let device = x.device();
    let [rows, _] = x.shape().dims();
    let [d_out, _] = handle.weight.shape();
    let out = crate::host::with_host_f32::<B, _>(&x, |values| match &handle.bf16 {
        None => forward_f32(values, rows, handle),
        Some(layer) => Some(forward_bf16(values, rows, handle, layer)),
    });
    if let Some(Some(out)) = out {
        return B::float_from_data(TensorData::new(out, [rows, d_out]), &device);
    }
    let Some(layer) = &handle.bf16 else {
        return B::blas_matmul(x, B::float_transpose(dense::<B>(handle, &device)));
    };
    // Not reached on the CPU backend (its values are always readable): the same layer from
    // tensor operations.
    let mut out = B::blas_matmul(
        round_tensor::<B>(x),
        B::float_transpose(dense::<B>(handle, &device)),
    );
    if let Some(bias) = &layer.bias {
        let bias = B::float_from_data(TensorData::new(bias.to_vec(), [1, d_out]), &device);
        out = B::float_add(out, bias);
    }
    match layer.round_output {
        true => round_tensor::<B>(out),
        false => out,
    }
}

/// f32 compute: `x · Wᵀ` straight from the packed values for a decoding step's few rows, else
/// block by block.
fn forward_f32(x: &[f32], rows: usize, handle: &PackedHandle) -> Option<Vec<f32>> {
    (rows <= crate::half::HALF_DIRECT_MAX_ROWS)
        .then(|| handle.weight.matmul_few_rows(x, rows))
        .flatten()
        .or_else(|| blocked_forward(x, rows, handle))
}

/// bf16 compute: the input rounded to bf16 once, the product (straight from a bf16-held weight
/// for the fewest rows, else on the CPU's bf16 units through oneDNN, else f32 GEMMs of the
/// rounded operands), then bias and rounding in one pass over the output.
fn forward_bf16(x: &[f32], rows: usize, handle: &PackedHandle, layer: &Bf16Layer) -> Vec<f32> {
    let bits = crate::onednn::to_bf16_bits(x);
    let direct = rows <= crate::precision::DIRECT_PRODUCT_MAX_ROWS && !rounds_to_bf16(handle);
    let mut out = match direct {
        true => handle.weight.matmul_few_rows(&widen_bits(&bits), rows),
        false => None,
    }
    .unwrap_or_else(|| bf16_times(&bits, rows, handle, Direction::Forward));
    finish_bf16(&mut out, layer.bias.as_deref(), layer.round_output);
    out
}

/// bf16 bit patterns widened to f32 (exact).
pub(crate) fn widen_bits(bits: &[u16]) -> Vec<f32> {
    bits.iter()
        .map(|&b| f32::from_bits(u32::from(b) << 16))
        .collect()
}

/// Adds `bias` to every row of `out` and rounds each value to bf16 when asked, in one parallel
/// pass.
pub(crate) fn finish_bf16(out: &mut [f32], bias: Option<&[f32]>, round: bool) {
    match bias {
        Some(bias) if round => crate::kernels::add_bias_round_bf16(out, bias),
        Some(bias) if !bias.is_empty() => {
            use rayon::prelude::*;
            out.par_chunks_mut(bias.len()).for_each(|row| {
                for (v, b) in row.iter_mut().zip(bias) {
                    *v += b;
                }
            })
        }
        _ if round => crate::kernels::round_bf16_in_place(out),
        _ => {}
    }
}

/// `∂x = ∂y · W` for `grad: [rows, out]`: block by block where the format allows, else through
/// the whole de-quantised weight; under bf16 compute the gradient is rounded before the product
/// and `∂x` after it.
fn backward<B: BlasMatmulBackend>(grad: FloatTensor<B>, handle: &PackedHandle) -> FloatTensor<B> {
    let device = grad.device();
    let [rows, _] = grad.shape().dims();
    let [_, d_in] = handle.weight.shape();
    let out = crate::host::with_host_f32::<B, _>(&grad, |values| match handle.bf16 {
        None => blocked_backward(values, rows, handle),
        Some(_) => {
            let bits = crate::onednn::to_bf16_bits(values);
            let mut out = bf16_times(&bits, rows, handle, Direction::Backward);
            finish_bf16(&mut out, None, true);
            Some(out)
        }
    });
    if let Some(Some(out)) = out {
        return B::float_from_data(TensorData::new(out, [rows, d_in]), &device);
    }
    match handle.bf16 {
        None => B::blas_matmul(grad, dense::<B>(handle, &device)),
        Some(_) => round_tensor::<B>(B::blas_matmul(
            round_tensor::<B>(grad),
            dense::<B>(handle, &device),
        )),
    }
}

/// Which product of a linear layer: `x · Wᵀ` or `∂y · W`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Direction {
    Forward,
    Backward,
}

/// Under bf16 compute, the product of `a` (bf16 bit patterns, `[rows, in]` forward or
/// `[rows, out]` backward) with the weight's values rounded to bf16: on the CPU's bf16 units
/// through oneDNN, else as f32 GEMMs of the rounded operands (block by block where the format
/// allows, else through the whole rounded weight). The one bf16 product of the linear layers
/// and of the chunked loss's bf16 projection.
pub(crate) fn bf16_times(
    a: &[u16],
    rows: usize,
    handle: &PackedHandle,
    direction: Direction,
) -> Vec<f32> {
    if let Some(out) = bf16_product(a, rows, handle, direction) {
        return out;
    }
    let a = widen_bits(a);
    let blocked = match direction {
        Direction::Forward => blocked_forward(&a, rows, handle),
        Direction::Backward => blocked_backward(&a, rows, handle),
    };
    blocked.unwrap_or_else(|| {
        let [d_out, d_in] = handle.weight.shape();
        let w = handle.weight.dequantize_bf16_rounded();
        let (n, k, transposed) = match direction {
            Direction::Forward => (d_out, d_in, true),
            Direction::Backward => (d_in, d_out, false),
        };
        let mut out = vec![0.0f32; rows * n];
        crate::matmul::sgemm_host((rows, n, k), &a, k, &w, d_in, transposed, 0.0, &mut out, n);
        out
    })
}

/// Under bf16 compute, the product on the CPU's bf16 units through oneDNN: `a · Wᵀ` for
/// `a: [rows, in]` (forward) or `a · W` for `a: [rows, out]` (backward), `a` given as bf16 bit
/// patterns and the weight read as stored when it is bf16, else de-quantised and rounded to
/// bf16 for this product only. `None` without oneDNN or for a shape it refuses.
fn bf16_product(
    a: &[u16],
    rows: usize,
    handle: &PackedHandle,
    direction: Direction,
) -> Option<Vec<f32>> {
    handle.bf16.as_ref()?;
    let dnn = crate::onednn::onednn()?;
    let [d_out, d_in] = handle.weight.shape();
    let (k, n, layout) = match direction {
        Direction::Forward => (d_in, d_out, crate::onednn::WeightLayout::NK),
        Direction::Backward => (d_out, d_in, crate::onednn::WeightLayout::KN),
    };
    let weights = bf16_bits_of(handle.weight.as_ref());
    match dnn.matmul_bf16_vec(a, &weights, layout, (rows, k, n)) {
        Ok(out) => Some(out),
        Err(e) => {
            tracing::debug!("bf16 product through f32 GEMM instead: {e}");
            None
        }
    }
}

/// A weight's values rounded to bf16 as bit patterns, `[out, in]`: as stored for a bf16-held
/// weight, else de-quantised and rounded once.
pub(crate) fn bf16_bits_of(weight: &dyn PackedWeight) -> std::borrow::Cow<'_, [u16]> {
    match weight.bf16_bits() {
        Some(bits) => std::borrow::Cow::Borrowed(bits),
        None => std::borrow::Cow::Owned(bf16_weight(weight)),
    }
}

/// The weight de-quantised and rounded to bf16 (bit patterns, `[out, in]`) in one parallel pass,
/// each task a few rows ([`PackedWeight::dequantize_block_bf16`]), so that no f32 copy of the
/// whole weight is made.
fn bf16_weight(weight: &dyn PackedWeight) -> Vec<u16> {
    use rayon::prelude::*;
    let [d_out, d_in] = weight.shape();
    let mut bits = vec![0u16; d_out * d_in];
    // ~64 KiB of f32 per task where a format de-quantises to f32 first: rows stay in cache
    // between de-quantising and rounding.
    let rows_per_task = (16_384 / d_in.max(1)).max(1);
    let blocks_ok = bits
        .par_chunks_mut(rows_per_task * d_in.max(1))
        .enumerate()
        .all(|(i, bits)| {
            let start = i * rows_per_task;
            let rows = bits.len() / d_in.max(1);
            weight.dequantize_block_bf16(start..start + rows, 0..d_in, bits)
        });
    if blocks_ok {
        return bits;
    }
    // A format without blocks: the whole weight at once.
    crate::onednn::to_bf16_bits(&weight.dequantize_bf16_rounded())
}

/// Whether the de-quantised values must still be rounded to bf16: bf16 compute over a format
/// not already held in bf16.
fn rounds_to_bf16(handle: &PackedHandle) -> bool {
    handle.bf16.is_some() && handle.weight.stored_dtype() != Some(safetensors::Dtype::BF16)
}

/// Elements of one de-quantised block: 1 Mi f32 (4 MiB, inside the last-level cache), so that
/// a block is multiplied while it is still in cache and no whole dense copy is made, and each
/// BLAS call is large enough to run at full speed.
const BLOCK_ELEMENTS: usize = 1 << 20;

/// How many of `total` rows (or columns) of `length` elements make one block.
fn block_len(length: usize, total: usize) -> usize {
    (BLOCK_ELEMENTS / length.max(1)).clamp(16, total.max(16))
}

/// The block `rows × cols` of the weight de-quantised into `block` (rounded to bf16 for bf16
/// compute); `false` if the format cannot de-quantise blocks.
fn weight_block(
    handle: &PackedHandle,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    block: &mut [f32],
) -> bool {
    // Rows split over the cores (the product that follows uses them all too).
    use rayon::prelude::*;
    let width = cols.len().max(1);
    let per_task = rows
        .len()
        .div_ceil(rayon::current_num_threads().max(1))
        .max(1);
    let all = block
        .par_chunks_mut(per_task * width)
        .enumerate()
        .map(|(i, part)| {
            let start = rows.start + i * per_task;
            let end = (start + per_task).min(rows.end);
            handle
                .weight
                .dequantize_block(start..end, cols.clone(), part)
        })
        .collect::<Vec<bool>>();
    if all.is_empty() || all.contains(&false) {
        return false;
    }
    if rounds_to_bf16(handle) {
        crate::kernels::round_bf16_in_place(block);
    }
    true
}

/// Calls `product(range, block)` for consecutive blocks of the weight's rows (output features),
/// each de-quantised into one reused buffer; `false` if the format cannot de-quantise blocks
/// (then before any call).
fn over_row_blocks(
    handle: &PackedHandle,
    mut product: impl FnMut(std::ops::Range<usize>, &[f32]),
) -> bool {
    let [d_out, d_in] = handle.weight.shape();
    let block = block_len(d_in, d_out);
    let mut buffer = vec![0.0f32; block.min(d_out) * d_in];
    for start in (0..d_out).step_by(block) {
        let end = (start + block).min(d_out);
        let w = &mut buffer[..(end - start) * d_in];
        if !weight_block(handle, start..end, 0..d_in, w) {
            return false;
        }
        product(start..end, w);
    }
    true
}

/// `x: [rows, in]` → `x · Wᵀ: [rows, out]`: each block of output features is one product with
/// the whole `k = in`, written into its columns of the output.
fn blocked_forward(x: &[f32], rows: usize, handle: &PackedHandle) -> Option<Vec<f32>> {
    let [d_out, d_in] = handle.weight.shape();
    let mut out = vec![0.0f32; rows * d_out];
    let done = over_row_blocks(handle, |range, w| {
        let dims = (rows, range.len(), d_in);
        crate::matmul::sgemm_host(
            dims,
            x,
            d_in,
            w,
            d_in,
            true,
            0.0,
            &mut out[range.start..],
            d_out,
        );
    });
    done.then_some(out)
}

/// `∂y: [rows, out]` → `∂y · W: [rows, in]`, summed over the blocks of the weight's rows: each
/// block is one product with `k` = the block's rows, accumulated into `∂x` (β = 1).
fn blocked_backward(grad: &[f32], rows: usize, handle: &PackedHandle) -> Option<Vec<f32>> {
    let [d_out, d_in] = handle.weight.shape();
    let mut out = vec![0.0f32; rows * d_in];
    let done = over_row_blocks(handle, |range, w| {
        let beta = if range.start == 0 { 0.0 } else { 1.0 };
        let dims = (rows, d_in, range.len());
        crate::matmul::sgemm_host(
            dims,
            &grad[range.start..],
            d_out,
            w,
            d_in,
            false,
            beta,
            &mut out,
            d_in,
        );
    });
    done.then_some(out)
}

impl PackedMatmulBackend for Flex {
    fn packed_matmul(x: FloatTensor<Self>, weight: PackedHandle) -> FloatTensor<Self> {
        forward::<Flex>(x, &weight)
    }
}

impl<B: BlasMatmulBackend, C: CheckpointStrategy> PackedMatmulBackend for Autodiff<B, C> {
    fn packed_matmul(x: FloatTensor<Self>, weight: PackedHandle) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct PackedMatmulBackward;

        impl<B: BlasMatmulBackend> Backward<B, 1> for PackedMatmulBackward {
            // The packed weight: no dense tensor is kept.
            type State = PackedHandle;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let [node_x] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                if let Some(node) = node_x {
                    // ∂x = ∂y · W, with W de-quantised again for this product only.
                    grads.register::<B>(node.id, backward::<B>(grad, &ops.state));
                }
            }
        }

        match PackedMatmulBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let output = forward::<B>(x.into_primitive(), &weight);
                prep.finish(weight, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward::<B>(x.into_primitive(), &weight)),
        }
    }
}

/// `x: [batch, seq, in]` → `[batch, seq, out]` through the packed operation: `x · Wᵀ` in f32, or
/// with `bf16` the whole bf16 layer ([`Bf16Layer`]: input, weight and output rounded, the bias
/// added before the output's rounding, gradients rounded).
pub fn packed_linear(
    x: Tensor<3>,
    weight: &Arc<dyn PackedWeight>,
    bf16: Option<Bf16Layer>,
) -> Tensor<3> {
    let [batch, seq, d_in] = x.dims();
    let [d_out, _] = weight.shape();
    let rows = x.reshape([batch * seq, d_in]);
    let out = Tensor::<2>::from_dispatch(<Dispatch as PackedMatmulBackend>::packed_matmul(
        rows.into_dispatch(),
        PackedHandle {
            weight: weight.clone(),
            bf16,
        },
    ));
    out.reshape([batch, seq, d_out])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::runs_cpu_kernels;
    use burn::tensor::Device;
    use burn::tensor::Distribution;

    /// A "packed" weight that is simply stored dense, to compare against an ordinary matmul.
    #[derive(Debug)]
    struct Plain {
        shape: [usize; 2],
        values: Vec<f32>,
    }

    impl PackedWeight for Plain {
        fn shape(&self) -> [usize; 2] {
            self.shape
        }
        fn dequantize(&self) -> Vec<f32> {
            self.values.clone()
        }
        fn storage_bytes(&self) -> usize {
            self.values.len() * 4
        }
        fn to_tensors(&self, _: &str) -> Vec<(String, peft_tensors::HostTensor)> {
            Vec::new()
        }
    }

    /// A `[d_out, d_in]` weight of `values`, as a packed weight and its values, with an input
    /// `x: [2, 3, d_in]` that requires gradients and random output weights `r: [2, 3, d_out]`.
    fn case(
        d_in: usize,
        d_out: usize,
        values: Vec<f32>,
        device: &Device,
    ) -> (Arc<dyn PackedWeight>, Vec<f32>, Tensor<3>, Tensor<3>) {
        let weight: Arc<dyn PackedWeight> = Arc::new(Plain {
            shape: [d_out, d_in],
            values: values.clone(),
        });
        let x = Tensor::<3>::random([2, 3, d_in], Distribution::Default, device).require_grad();
        let r = Tensor::<3>::random([2, 3, d_out], Distribution::Default, device);
        (weight, values, x, r)
    }

    #[test]
    fn gradient_matches_a_dense_matmul() {
        let device = Device::flex().autodiff();
        assert!(runs_cpu_kernels(&device));
        let (d_in, d_out) = (6, 5);
        let values = (0..d_in * d_out)
            .map(|i| ((i * 7) % 11) as f32 - 5.0)
            .collect();
        let (weight, values, x, r) = case(d_in, d_out, values, &device);

        let packed = packed_linear(x.clone(), &weight, None);
        let grads = (packed.clone() * r.clone()).sum().backward();
        let g_packed = x.grad(&grads).unwrap();

        let w = Tensor::<2>::from_data(TensorData::new(values, [d_out, d_in]), &device);
        let dense = x.clone().matmul(w.transpose().unsqueeze::<3>());
        let grads = (dense.clone() * r).sum().backward();
        let g_dense = x.grad(&grads).unwrap();

        let diff = |a: Tensor<3>, b: Tensor<3>| -> f32 { (a - b).abs().max().into_scalar() };
        assert!(diff(packed.inner(), dense.inner()) < 1e-5);
        assert!(diff(g_packed, g_dense) < 1e-5);
    }

    /// A 16-bit weight held as stored goes through the product block by block (more rows than a
    /// decoding step; `in` large enough for several blocks, `out` not a multiple of the block)
    /// or row by row (a decoding step's few rows): both equal the dense product of the widened
    /// weight, forward and backward, for bf16 and f16.
    #[test]
    fn half_weight_products_match_the_dense_product() {
        use crate::half::{HalfDtype, HalfWeight};
        let device = Device::flex().autodiff();
        let (d_in, d_out) = (130_001, 70);
        assert!(block_len(d_in, d_out) < d_out / 2, "several blocks");
        let values: Vec<f32> = (0..d_in * d_out)
            .map(|i| (((i * 37) % 101) as f32 - 50.0) / 400.0)
            .collect();
        for dtype in [HalfDtype::Bf16, HalfDtype::F16] {
            let bytes: Vec<u8> = values
                .iter()
                .flat_map(|&v| match dtype {
                    HalfDtype::Bf16 => half::bf16::from_f32(v).to_le_bytes(),
                    HalfDtype::F16 => half::f16::from_f32(v).to_le_bytes(),
                })
                .collect();
            let half = HalfWeight::from_le_bytes(dtype, [d_out, d_in], &bytes).unwrap();
            let widened = half.dequantize();
            let weight: Arc<dyn PackedWeight> = Arc::new(half);
            let w = Tensor::<2>::from_data(TensorData::new(widened, [d_out, d_in]), &device);
            for seq in [9, 1] {
                let x = Tensor::<3>::random([2, seq, d_in], Distribution::Default, &device)
                    .require_grad();
                let r = Tensor::<3>::random([2, seq, d_out], Distribution::Default, &device);
                let packed = packed_linear(x.clone(), &weight, None);
                let g_packed = x
                    .grad(&(packed.clone() * r.clone()).sum().backward())
                    .unwrap();
                let dense = x.clone().matmul(w.clone().transpose().unsqueeze::<3>());
                let g_dense = x.grad(&(dense.clone() * r).sum().backward()).unwrap();
                // Relative to the largest value: sums of 130 001 products in another order.
                let diff = |a: Tensor<3>, b: Tensor<3>| -> f32 {
                    let scale: f32 = b.clone().abs().max().into_scalar();
                    let d: f32 = (a - b).abs().max().into_scalar();
                    d / scale
                };
                let out = diff(packed.inner(), dense.inner());
                assert!(out < 1e-5, "{dtype:?}, {seq} per row: forward {out}");
                let grad = diff(g_packed, g_dense);
                assert!(grad < 1e-5, "{dtype:?}, {seq} per row: gradient {grad}");
            }
        }
    }

    /// bf16 through the packed operation equals the same product written with bf16-rounded
    /// dense tensors, forward and backward, bit for bit — through oneDNN's bf16 kernels where
    /// they are loaded, else through f32 GEMMs. The inputs and output gradients are multiples of
    /// 1/4 and 1/8 and the bf16 weights of 2^-13, so that every sum is exact in f32 and any
    /// order of accumulation gives the same bits.
    #[test]
    fn bf16_product_matches_rounded_dense_tensors() {
        use crate::precision::round_bf16;
        let device = Device::flex().autodiff();
        let (d_in, d_out) = (40, 24);
        let values = (0..d_in * d_out)
            .map(|i| (((i * 37) % 101) as f32 - 50.0) / 37.0)
            .collect();
        let (weight, values, _, _) = case(d_in, d_out, values, &device);
        let exact = |shape: [usize; 3], step: usize, scale: f32| {
            let n = shape.iter().product::<usize>();
            let v = (0..n)
                .map(|i| ((i * step) % 17) as f32 / scale - 8.0 / scale)
                .collect::<Vec<_>>();
            Tensor::<3>::from_data(TensorData::new(v, shape), &device)
        };
        let x = exact([2, 3, d_in], 13, 4.0).require_grad();
        let r = exact([2, 3, d_out], 7, 8.0);
        let runs_before = crate::onednn::products_run();

        // A bias that is not exact in bf16 (so its rounding shows), added before the rounding.
        let bias: Vec<f32> = (0..d_out).map(|i| i as f32 / 8.0 + 1.0 / 1024.0).collect();
        let rounded_bias: Arc<[f32]> = bias
            .iter()
            .map(|&b| half::bf16::from_f32(b).to_f32())
            .collect();
        let layer = Bf16Layer {
            bias: Some(rounded_bias),
            round_output: true,
        };
        let packed = packed_linear(x.clone(), &weight, Some(layer));
        let grads = (packed.clone() * r.clone()).sum().backward();
        let g_packed = x.grad(&grads).unwrap();

        let w = round_bf16(Tensor::<2>::from_data(
            TensorData::new(values, [d_out, d_in]),
            &device,
        ));
        let b = round_bf16(Tensor::<1>::from_data(
            TensorData::new(bias, [d_out]),
            &device,
        ));
        let dense = round_bf16(
            round_bf16(x.clone()).matmul(w.transpose().unsqueeze::<3>()) + b.unsqueeze::<3>(),
        );
        let grads = (dense.clone() * r).sum().backward();
        let g_dense = x.grad(&grads).unwrap();

        let bits =
            |t: Tensor<3>| -> Vec<u32> { t.into_data().iter::<f32>().map(f32::to_bits).collect() };
        assert_eq!(bits(packed.inner()), bits(dense.inner()));
        assert_eq!(bits(g_packed.clone()), bits(g_dense));
        // Forward and backward both went through oneDNN where it is loaded.
        let through_onednn = crate::onednn::products_run() - runs_before;
        let expected = if crate::onednn::onednn().is_some() {
            2
        } else {
            0
        };
        assert_eq!(through_onednn, expected);
        // And bf16 really rounds: every gradient value fits in bf16's 8-bit mantissa.
        assert!(bits(g_packed).iter().all(|b| b & 0xffff == 0));
    }
}
