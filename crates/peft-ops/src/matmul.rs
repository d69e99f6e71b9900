//! The f32 products of the frozen layers on the CPU backend: [`BlasMatmulBackend`] (burn's
//! backend extension, with its autodiff), [`matmul`], [`linear`] and [`lora_linear`], and the
//! host products [`sgemm_host`]. Each goes through OpenBLAS where it is loaded ([`crate::blas`])
//! and reads strided operands in place; otherwise, and for few-row products, through the
//! pure-Rust kernels ([`crate::kernels`]) or burn's own matmul (other dtypes, other backends).

use burn::backend::autodiff::{
    Autodiff,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::tensor::{DType, Shape, Tensor};

use crate::blas::{Blas, NO_TRANS, ROW_MAJOR, TRANS, blas, blas_view};
use crate::host::zeros_f32;

/// `[c +] lhs: [m, k] · rhs: [k, n]` with `cblas_sgemm`, reading strided operands in place. With
/// `c` (`m · n` values, row-major) BLAS adds the product to it (β = 1): a bias or another
/// product costs no pass of its own; without it C is not zeroed first (β = 0: BLAS writes every
/// element without reading it).
fn sgemm_flex(
    blas: &Blas,
    lhs: FloatTensor<Flex>,
    rhs: FloatTensor<Flex>,
    c: Option<Vec<f32>>,
) -> FloatTensor<Flex> {
    let ([m, k], [_, n]) = (dims2(lhs.layout().shape()), dims2(rhs.layout().shape()));
    let lhs = match blas_view(lhs.layout().strides(), m, k) {
        Some(_) => lhs,
        None => lhs.to_contiguous(),
    };
    let rhs = match blas_view(rhs.layout().strides(), k, n) {
        Some(_) => rhs,
        None => rhs.to_contiguous(),
    };
    let (ta, lda) = blas_view(lhs.layout().strides(), m, k).unwrap_or((NO_TRANS, k as i32));
    let (tb, ldb) = blas_view(rhs.layout().strides(), k, n).unwrap_or((NO_TRANS, n as i32));
    let shape = Shape::new([m, n]);
    let tensor = |values: Vec<f32>| {
        burn::backend::flex::FlexTensor::from_data(burn::tensor::TensorData::new(
            values,
            shape.clone(),
        ))
    };
    if m == 0 || n == 0 || k == 0 {
        return c.map_or_else(|| zeros_f32(shape.clone()), tensor);
    }
    let a = lhs.storage::<f32>()[lhs.layout().start_offset()..].as_ptr();
    let b = rhs.storage::<f32>()[rhs.layout().start_offset()..].as_ptr();
    let (mut values, beta) = match c {
        Some(c) => (c, 1.0),
        None => (Vec::<f32>::with_capacity(m * n), 0.0),
    };
    // What makes the write below sound when C is given.
    assert!(
        values.capacity() >= m * n,
        "C holds fewer than m · n values"
    );
    // SAFETY: `a` and `b` address `[m, k]` and `[k, n]` matrices with the strides checked by
    // `blas_view` inside their storages, `values` has room for the `[m, n]` result (with β = 1
    // it holds C's `m · n` values), which BLAS writes in full (with β = 0 without reading it)
    // before `set_len` makes it readable.
    unsafe {
        (blas.sgemm)(
            ROW_MAJOR,
            ta,
            tb,
            m as i32,
            n as i32,
            k as i32,
            1.0,
            a,
            lda,
            b,
            ldb,
            beta,
            values.as_mut_ptr(),
            n as i32,
        );
        values.set_len(m * n);
    }
    tensor(values)
}

/// `c ← a · op(b) + β · c` on host slices, all row-major: `a: [m, k]` with row stride `lda`;
/// `op(b)` is `b: [n, k]` (stride `ldb`) read transposed when `b_transposed`, else `b: [k, n]`;
/// `c: [m, n]` with row stride `ldc` (a column block of a wider matrix). Through OpenBLAS when it
/// is loaded, else the `gemm` crate on every core.
///
/// # Panics
/// If a slice is shorter than its matrix (a caller bug, not user input).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_host(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    b_transposed: bool,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let (b_rows, b_cols) = if b_transposed { (n, k) } else { (k, n) };
    assert!(
        k == 0
            || (a.len() >= (m - 1) * lda + k
                && lda >= k
                && b.len() >= (b_rows - 1) * ldb + b_cols
                && ldb >= b_cols),
        "sgemm_host: operand slices too short"
    );
    assert!(
        c.len() >= (m - 1) * ldc + n && ldc >= n,
        "sgemm_host: output slice too short"
    );
    if k == 0 {
        for row in c.chunks_mut(ldc).take(m) {
            for v in &mut row[..n] {
                *v *= beta;
            }
        }
        return;
    }
    let fits_i32 = [m, n, k, lda, ldb, ldc]
        .iter()
        .all(|&d| d <= i32::MAX as usize);
    match blas() {
        Some(blas) if fits_i32 => {
            // SAFETY: the slices hold the matrices with these strides (asserted above).
            unsafe {
                (blas.sgemm)(
                    ROW_MAJOR,
                    NO_TRANS,
                    if b_transposed { TRANS } else { NO_TRANS },
                    m as i32,
                    n as i32,
                    k as i32,
                    1.0,
                    a.as_ptr(),
                    lda as i32,
                    b.as_ptr(),
                    ldb as i32,
                    beta,
                    c.as_mut_ptr(),
                    ldc as i32,
                );
            }
        }
        _ => {
            if beta != 0.0 && beta != 1.0 {
                for row in c.chunks_mut(ldc).take(m) {
                    for v in &mut row[..n] {
                        *v *= beta;
                    }
                }
            }
            let (rhs_rs, rhs_cs) = if b_transposed {
                (1, ldb as isize)
            } else {
                (ldb as isize, 1)
            };
            // SAFETY: as above; `c` does not overlap `a` or `b` (distinct borrows).
            unsafe {
                crate::kernels::strided_matmul(
                    (m, n, k),
                    c.as_mut_ptr(),
                    (ldc as isize, 1),
                    beta != 0.0,
                    (a.as_ptr(), lda as isize, 1),
                    (b.as_ptr(), rhs_rs, rhs_cs),
                    gemm::Parallelism::Rayon(0),
                );
            }
        }
    }
}

fn dims2(shape: &Shape) -> [usize; 2] {
    [shape[0], shape[1]]
}

/// Backends with a BLAS-backed 2-D f32 product.
#[backend_extension(Autodiff, Flex)]
pub trait BlasMatmulBackend: Backend {
    /// `lhs: [m, k] · rhs: [k, n]` → `[m, n]`.
    fn blas_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `lhs: [m, k] · rhs: [k, n] + bias: [n]` → `[m, n]`.
    fn blas_matmul_bias(
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// A dense layer with a LoRA update, `x · weight + bias + scale · (x · a) · b` → `[m, out]`
    /// for `x: [m, in]`, `weight: [in, out]`, `bias: [out]`, `a: [in, r]`, `b: [r, out]`.
    fn blas_lora(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self>;
}

/// `out + lhs · rhs`, accumulated by BLAS into `out`'s own values (β = 1) when it takes the
/// product and `out` is an f32 matrix.
fn add_product(
    out: FloatTensor<Flex>,
    lhs: FloatTensor<Flex>,
    rhs: FloatTensor<Flex>,
) -> FloatTensor<Flex> {
    let fits = out.dtype() == DType::F32 && out.layout().shape().num_dims() == 2;
    match blas() {
        // The base product's fresh, unique output gives up its values without a copy.
        Some(blas) if fits && blas_takes(&lhs, &rhs) => {
            match out.into_data().try_into_vec::<f32>() {
                Ok(c) => sgemm_flex(blas, lhs, rhs, Some(c)),
                // Not reached: a dtype other than f32 is the only way this fails (checked).
                Err(e) => unreachable!("f32 values of an f32 tensor: {e:?}"),
            }
        }
        _ => Flex::float_add(out, flex_matmul::<Flex>(lhs, rhs)),
    }
}

/// Whether OpenBLAS takes this product: f32 matrices, not tiny, i32-addressable.
fn blas_takes(lhs: &FloatTensor<Flex>, rhs: &FloatTensor<Flex>) -> bool {
    let f32_2d = lhs.dtype() == DType::F32
        && rhs.dtype() == DType::F32
        && lhs.layout().shape().num_dims() == 2
        && rhs.layout().shape().num_dims() == 2;
    let small = lhs
        .layout()
        .shape()
        .num_elements()
        .max(rhs.layout().shape().num_elements())
        < 4096;
    f32_2d && !small && fits_i32(lhs, rhs)
}

/// `lhs · rhs` through [`crate::kernels::few_rows_times_transposed`] when `lhs` is a few
/// contiguous f32 rows (a decoding step) and `rhs` is the transposed view of a contiguous
/// `[n, k]` matrix (a tied `lm_head`'s embedding table): each row's result is then the same
/// whether it is multiplied alone or in a batch — BLAS's and burn's GEMMs pick kernels, and so
/// summation orders, by the row count — and the table is read once.
fn few_rows_transposed(
    lhs: &FloatTensor<Flex>,
    rhs: &FloatTensor<Flex>,
) -> Option<FloatTensor<Flex>> {
    let ([m, k], [_, n]) = (dims2(lhs.layout().shape()), dims2(rhs.layout().shape()));
    if m == 0
        || m > crate::precision::DIRECT_PRODUCT_MAX_ROWS
        || lhs.dtype() != DType::F32
        || rhs.dtype() != DType::F32
        || rhs.layout().strides() != [1, k as isize]
    {
        return None;
    }
    let x = lhs.as_slice::<f32>()?;
    let start = rhs.layout().start_offset();
    let w = rhs.storage::<f32>().get(start..start + n * k)?;
    let out = crate::kernels::few_rows_times_transposed(x, m, w, n, k);
    Some(burn::backend::flex::FlexTensor::from_data(
        burn::tensor::TensorData::new(out, [m, n]),
    ))
}

impl BlasMatmulBackend for Flex {
    fn blas_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        let two_d = lhs.layout().shape().num_dims() == 2 && rhs.layout().shape().num_dims() == 2;
        if two_d && let Some(out) = few_rows_transposed(&lhs, &rhs) {
            return out;
        }
        match blas() {
            Some(blas) if blas_takes(&lhs, &rhs) => sgemm_flex(blas, lhs, rhs, None),
            _ => flex_matmul::<Flex>(lhs, rhs),
        }
    }

    fn blas_matmul_bias(
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let m = lhs.layout().shape()[0];
        // `as_slice` is `None` unless the bias is contiguous f32.
        let rows = (bias.layout().shape().num_dims() == 1)
            .then(|| bias.as_slice::<f32>())
            .flatten();
        match (blas(), rows) {
            (Some(blas), Some(values)) if blas_takes(&lhs, &rhs) => {
                sgemm_flex(blas, lhs, rhs, Some(values.repeat(m)))
            }
            _ => {
                let n = bias.layout().shape()[0];
                let out = flex_matmul::<Flex>(lhs, rhs);
                Flex::float_add(out, Flex::float_reshape(bias, Shape::new([1, n])))
            }
        }
    }

    fn blas_lora(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        // The scale goes on the rank-r intermediate, the update is added by BLAS in place.
        let low_rank = Flex::float_mul_scalar(
            Self::blas_matmul(x.clone(), a),
            burn::backend::Scalar::Float(f64::from(scale)),
        );
        let out = Self::blas_matmul_bias(x, weight, bias);
        add_product(out, low_rank, b)
    }
}

/// burn's own product (any backend; here the CPU backend's `gemm`).
fn flex_matmul<B: Backend>(lhs: FloatTensor<B>, rhs: FloatTensor<B>) -> FloatTensor<B> {
    B::float_matmul(lhs, rhs)
}

fn fits_i32(lhs: &FloatTensor<Flex>, rhs: &FloatTensor<Flex>) -> bool {
    let max = i32::MAX as usize;
    lhs.storage::<f32>().len() <= max && rhs.storage::<f32>().len() <= max
}

/// The operands a product's backward pass keeps: `lhs` when `rhs` needs a gradient, `rhs` when
/// `lhs` does (as burn's own matmul keeps them).
type KeptOperands = (
    Option<burn::backend::autodiff::NodeId>,
    Option<burn::backend::autodiff::NodeId>,
);

/// Registers `∂lhs = ∂out · rhsᵀ` and `∂rhs = lhsᵀ · ∂out` for whichever of a product's operands
/// (`parents`: their node ids, `None` when untracked) need a gradient.
fn register_product_grads<B: BlasMatmulBackend>(
    grads: &mut Gradients,
    checkpointer: &mut Checkpointer,
    [lhs_node, rhs_node]: [Option<burn::backend::autodiff::NodeId>; 2],
    (lhs, rhs): KeptOperands,
    grad: B::FloatTensorPrimitive,
) {
    let lhs: Option<B::FloatTensorPrimitive> = lhs.map(|id| checkpointer.retrieve_node_output(id));
    let rhs: Option<B::FloatTensorPrimitive> = rhs.map(|id| checkpointer.retrieve_node_output(id));
    if let (Some(node), Some(lhs)) = (rhs_node, lhs) {
        grads.register::<B>(node, B::blas_matmul(B::float_transpose(lhs), grad.clone()));
    }
    if let (Some(node), Some(rhs)) = (lhs_node, rhs) {
        grads.register::<B>(node, B::blas_matmul(grad, B::float_transpose(rhs)));
    }
}

/// `∂bias` of `out = … + bias` for `∂out: [m, n]`: its column sums, `[n]`.
fn bias_grad<B: Backend>(grad: &B::FloatTensorPrimitive) -> B::FloatTensorPrimitive {
    let n = grad.shape()[1];
    B::float_reshape(B::float_sum_dim(grad.clone(), 0), Shape::new([n]))
}

impl<B: BlasMatmulBackend, C: CheckpointStrategy> BlasMatmulBackend for Autodiff<B, C> {
    fn blas_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct BlasMatmulBackward;

        impl<B: BlasMatmulBackend> Backward<B, 2> for BlasMatmulBackward {
            type State = KeptOperands;

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let grad = grads.consume::<B>(&ops.node);
                let parents = ops.parents.map(|p| p.map(|node| node.id));
                register_product_grads::<B>(grads, checkpointer, parents, ops.state, grad);
            }
        }

        let lhs_tracked = lhs.is_tracked();
        let rhs_tracked = rhs.is_tracked();
        match BlasMatmulBackward
            .prepare::<C>([lhs.node(), rhs.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let lhs_state = rhs_tracked.then(|| prep.checkpoint(&lhs));
                let rhs_state = lhs_tracked.then(|| prep.checkpoint(&rhs));
                let out = B::blas_matmul(lhs.into_primitive(), rhs.into_primitive());
                prep.finish((lhs_state, rhs_state), out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::blas_matmul(lhs.into_primitive(), rhs.into_primitive()))
            }
        }
    }

    fn blas_matmul_bias(
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct BlasMatmulBiasBackward;

        impl<B: BlasMatmulBackend> Backward<B, 3> for BlasMatmulBiasBackward {
            // As `blas_matmul`'s; the bias needs nothing kept.
            type State = KeptOperands;

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let grad = grads.consume::<B>(&ops.node);
                let [lhs, rhs, bias] = ops.parents.map(|p| p.map(|node| node.id));
                if let Some(node) = bias {
                    grads.register::<B>(node, bias_grad::<B>(&grad));
                }
                register_product_grads::<B>(grads, checkpointer, [lhs, rhs], ops.state, grad);
            }
        }

        let lhs_tracked = lhs.is_tracked();
        let rhs_tracked = rhs.is_tracked();
        match BlasMatmulBiasBackward
            .prepare::<C>([lhs.node(), rhs.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let lhs_state = rhs_tracked.then(|| prep.checkpoint(&lhs));
                let rhs_state = lhs_tracked.then(|| prep.checkpoint(&rhs));
                let out = B::blas_matmul_bias(
                    lhs.into_primitive(),
                    rhs.into_primitive(),
                    bias.into_primitive(),
                );
                prep.finish((lhs_state, rhs_state), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::blas_matmul_bias(
                lhs.into_primitive(),
                rhs.into_primitive(),
                bias.into_primitive(),
            )),
        }
    }
    fn blas_lora(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct BlasLoraBackward;

        impl<B: BlasMatmulBackend> Backward<B, 5> for BlasLoraBackward {
            // x, weight, a, b (checkpointed) and the scale.
            type State = ([burn::backend::autodiff::NodeId; 4], f32);

            fn backward(
                self,
                ops: Ops<Self::State, 5>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let (ids, scale) = ops.state;
                let [x, weight, a, b]: [B::FloatTensorPrimitive; 4] =
                    ids.map(|id| checkpointer.retrieve_node_output(id));
                let [node_x, node_w, node_bias, node_a, node_b] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let scalar = burn::backend::Scalar::Float(f64::from(scale));
                if let Some(node) = node_bias {
                    grads.register::<B>(node.id, bias_grad::<B>(&grad));
                }
                if let Some(node) = node_w {
                    let g = B::blas_matmul(B::float_transpose(x.clone()), grad.clone());
                    grads.register::<B>(node.id, g);
                }
                // The update's path: u = s · x·a, y += u·b.
                let low_rank_grad = || {
                    B::float_mul_scalar(
                        B::blas_matmul(grad.clone(), B::float_transpose(b.clone())),
                        scalar,
                    )
                };
                let du = (node_a.is_some() || node_x.is_some()).then(low_rank_grad);
                if let Some(node) = node_b {
                    let u = B::float_mul_scalar(B::blas_matmul(x.clone(), a.clone()), scalar);
                    let g = B::blas_matmul(B::float_transpose(u), grad.clone());
                    grads.register::<B>(node.id, g);
                }
                if let (Some(node), Some(du)) = (node_a, du.clone()) {
                    let g = B::blas_matmul(B::float_transpose(x.clone()), du);
                    grads.register::<B>(node.id, g);
                }
                if let (Some(node), Some(du)) = (node_x, du) {
                    let base = B::blas_matmul(grad, B::float_transpose(weight));
                    let g = B::float_add(base, B::blas_matmul(du, B::float_transpose(a)));
                    grads.register::<B>(node.id, g);
                }
            }
        }

        match BlasLoraBackward
            .prepare::<C>([x.node(), weight.node(), bias.node(), a.node(), b.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let ids = [
                    prep.checkpoint(&x),
                    prep.checkpoint(&weight),
                    prep.checkpoint(&a),
                    prep.checkpoint(&b),
                ];
                let out = B::blas_lora(
                    x.into_primitive(),
                    weight.into_primitive(),
                    bias.into_primitive(),
                    a.into_primitive(),
                    b.into_primitive(),
                    scale,
                );
                prep.finish((ids, scale), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::blas_lora(
                x.into_primitive(),
                weight.into_primitive(),
                bias.into_primitive(),
                a.into_primitive(),
                b.into_primitive(),
                scale,
            )),
        }
    }
}

/// `lhs: [m, k] · rhs: [k, n]`: through OpenBLAS on the CPU backend when it is available (see the
/// module docs), burn's matmul otherwise.
pub fn matmul(lhs: Tensor<2>, rhs: Tensor<2>) -> Tensor<2> {
    if !crate::device::runs_cpu_kernels(&lhs.device()) {
        return lhs.matmul(rhs);
    }
    Tensor::from_dispatch(<Dispatch as BlasMatmulBackend>::blas_matmul(
        lhs.into_dispatch(),
        rhs.into_dispatch(),
    ))
}

/// A dense f32 layer with a LoRA update as one operation on the CPU backend:
/// `x · weight + bias + scale · (x · a) · b` for `x: [.., in]`, `weight: [in, out]`,
/// `a: [in, r]`, `b: [r, out]` → `[.., out]`. The update is added by BLAS into the base
/// product's output (no separate pass), and the backward pass computes the gradients of
/// whichever inputs are tracked. `None` off the CPU backend or for other dtypes.
pub fn lora_linear<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    (a, b): (Tensor<2>, Tensor<2>),
    scale: f32,
) -> Option<Tensor<D>> {
    let f32s = [x.dtype(), weight.dtype(), a.dtype(), b.dtype()]
        .iter()
        .chain(bias.as_ref().map(|b| b.dtype()).iter())
        .all(|d| *d == DType::F32);
    if !f32s || !crate::device::runs_cpu_kernels(&x.device()) {
        return None;
    }
    let dims = x.dims();
    let (d_in, d_out) = (dims[D - 1], weight.dims()[1]);
    let rows = dims[..D - 1].iter().product::<usize>();
    let device = x.device();
    let bias = bias.unwrap_or_else(|| Tensor::zeros([d_out], &device));
    let out = Tensor::<2>::from_dispatch(<Dispatch as BlasMatmulBackend>::blas_lora(
        x.reshape([rows, d_in]).into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        a.into_dispatch(),
        b.into_dispatch(),
        scale,
    ));
    let mut out_dims = dims;
    out_dims[D - 1] = d_out;
    Some(out.reshape(out_dims))
}

/// `x: [.., in] · weight: [in, out] (+ bias)` → `[.., out]`, the product through [`matmul`].
pub fn linear<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
) -> Tensor<D> {
    let dims = x.dims();
    let d_in = dims[D - 1];
    let d_out = weight.dims()[1];
    let rows = dims[..D - 1].iter().product::<usize>();
    let x = x.reshape([rows, d_in]);
    let out = match bias {
        Some(b) if crate::device::runs_cpu_kernels(&x.device()) => {
            Tensor::from_dispatch(<Dispatch as BlasMatmulBackend>::blas_matmul_bias(
                x.into_dispatch(),
                weight.into_dispatch(),
                b.into_dispatch(),
            ))
        }
        Some(b) => matmul(x, weight) + b.unsqueeze::<2>(),
        None => matmul(x, weight),
    };
    let mut out_dims = dims;
    out_dims[D - 1] = d_out;
    out.reshape(out_dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blas::sgemm_on_this_thread;
    use crate::host::written_f32;
    use burn::tensor::{Device, Distribution};

    /// Products and gradients through BLAS equal burn's matmul (to f32 rounding), for contiguous
    /// and transposed operands; without OpenBLAS the test still checks the fallback.
    #[test]
    fn matches_burn_matmul_forward_and_backward() {
        let device = Device::flex().autodiff();
        let a = Tensor::<2>::random([70, 90], Distribution::Default, &device).require_grad();
        let w = Tensor::<2>::random([50, 90], Distribution::Default, &device).require_grad();
        let r = Tensor::<2>::random([70, 50], Distribution::Default, &device);
        // `w.transpose()` is a strided view: BLAS reads it with TransB.
        let ours = matmul(a.clone(), w.clone().transpose());
        let grads = (ours.clone() * r.clone()).sum().backward();
        let (ga, gw) = (a.grad(&grads).unwrap(), w.grad(&grads).unwrap());
        let theirs = a.clone().matmul(w.clone().transpose());
        let grads = (theirs.clone() * r).sum().backward();
        let (ta, tw) = (a.grad(&grads).unwrap(), w.grad(&grads).unwrap());
        let max = |x: Tensor<2>| -> f32 { x.abs().max().into_scalar::<f32>() };
        assert!(max(ours.inner() - theirs.inner()) < 1e-4);
        assert!(max(ga - ta) < 1e-4);
        assert!(max(gw - tw) < 1e-4);
        eprintln!("BLAS: {:?}", blas());
    }

    /// The attention kernels' per-thread products: every combination of row-major and
    /// transposed operands and destination, with and without accumulation, products split
    /// into single-threaded pieces (k · m above the limit), against an f64 reference; layouts
    /// BLAS cannot read are refused with nothing written.
    #[test]
    fn products_on_this_thread_match_the_reference_in_every_layout() {
        fn value(i: usize) -> f32 {
            ((i * 37 + 11) % 23) as f32 / 8.0 - 1.4
        }
        for (m, n, k) in [(3, 5, 4), (32, 96, 64), (1, 7, 3), (600, 9, 500)] {
            let lhs: Vec<f32> = (0..m * k).map(value).collect();
            let rhs: Vec<f32> = (0..k * n).map(|i| value(i + 5)).collect();
            let start: Vec<f32> = (0..m * n).map(|i| value(i + 9)).collect();
            for (lhs_t, rhs_t, dst_t, accumulate) in
                (0..16).map(|c| (c & 1 != 0, c & 2 != 0, c & 4 != 0, c & 8 != 0))
            {
                // Stored row-major as given, or as the transpose (column-major strides), each
                // with a padded leading dimension.
                let store = |values: &[f32], rows: usize, cols: usize, t: bool| {
                    let (outer, inner) = if t { (cols, rows) } else { (rows, cols) };
                    let ld = inner + 3;
                    let mut buffer = vec![f32::NAN; outer * ld];
                    for r in 0..rows {
                        for c in 0..cols {
                            let at = if t { c * ld + r } else { r * ld + c };
                            buffer[at] = values[r * cols + c];
                        }
                    }
                    let (rs, cs) = if t {
                        (1, ld as isize)
                    } else {
                        (ld as isize, 1)
                    };
                    (buffer, rs, cs)
                };
                let (a, a_rs, a_cs) = store(&lhs, m, k, lhs_t);
                let (b, b_rs, b_cs) = store(&rhs, k, n, rhs_t);
                let (mut c, c_rs, c_cs) = store(&start, m, n, dst_t);
                // SAFETY: each buffer holds its matrix with these strides.
                let done = unsafe {
                    sgemm_on_this_thread(
                        (m, n, k),
                        (c.as_mut_ptr(), c_rs, c_cs),
                        accumulate,
                        (a.as_ptr(), a_rs, a_cs),
                        (b.as_ptr(), b_rs, b_cs),
                    )
                };
                if blas().is_none() {
                    assert!(!done, "no BLAS, yet the product was taken");
                    continue;
                }
                assert!(done, "{m}×{k}·{k}×{n} layouts {lhs_t} {rhs_t} {dst_t}");
                for i in 0..m {
                    for j in 0..n {
                        let product: f64 = (0..k)
                            .map(|p| f64::from(lhs[i * k + p]) * f64::from(rhs[p * n + j]))
                            .sum();
                        let expected = product
                            + if accumulate {
                                f64::from(start[i * n + j])
                            } else {
                                0.0
                            };
                        let at = if dst_t {
                            j * c_cs as usize + i
                        } else {
                            i * c_rs as usize + j
                        };
                        let got = f64::from(c[at]);
                        assert!(
                            (got - expected).abs() <= 1e-5 * (1.0 + expected.abs()) * k as f64,
                            "{m}×{k}·{k}×{n} [{i}, {j}]: {got} vs {expected}"
                        );
                    }
                }
                // The padding between rows or columns is never written.
                let written = c.iter().filter(|v| !v.is_nan()).count();
                assert_eq!(written, m * n);
            }
        }
        // Neither stride 1: refused, nothing written.
        let (a, b) = (vec![1.0f32; 64], vec![1.0f32; 64]);
        let mut c = vec![7.0f32; 64];
        // SAFETY: 4 × 4 matrices with strides (8, 2) lie inside the 64-element buffers.
        let done = unsafe {
            sgemm_on_this_thread(
                (4, 4, 4),
                (c.as_mut_ptr(), 4, 1),
                false,
                (a.as_ptr(), 8, 2),
                (b.as_ptr(), 4, 1),
            )
        };
        assert!(!done);
        assert!(c.iter().all(|&v| v == 7.0));
    }

    /// A tensor written by its kernel is not zeroed first; when the kernel's input does not have
    /// the shape's size, the buffer starts zeroed and what the kernel leaves reads as zeros.
    #[test]
    fn written_tensors_hold_what_the_kernel_wrote() {
        let shape = Shape::new([2, 3]);
        // SAFETY: the closure writes all six elements, and only values.
        let full = unsafe {
            written_f32(shape.clone(), 6, |out| {
                for (i, v) in out.iter_mut().enumerate() {
                    v.write(i as f32 + 0.5);
                }
            })
        };
        assert_eq!(
            full.as_slice::<f32>(),
            Some(&[0.5f32, 1.5, 2.5, 3.5, 4.5, 5.5][..])
        );
        // SAFETY: with a mismatched input length the buffer is zeroed first; the closure writes
        // only values.
        let partial = unsafe {
            written_f32(shape, 4, |out| {
                for (i, v) in out.iter_mut().take(4).enumerate() {
                    v.write(i as f32 + 1.0);
                }
            })
        };
        assert_eq!(
            partial.as_slice::<f32>(),
            Some(&[1.0f32, 2.0, 3.0, 4.0, 0.0, 0.0][..])
        );
    }

    /// A few rows times a transposed table (a tied `lm_head` while decoding): each row's result
    /// is the same bits alone as in a batch of three, and close to the f64 product.
    #[test]
    fn few_rows_times_a_transposed_table_do_not_depend_on_the_batch() {
        let device = Device::flex();
        let (k, n) = (70, 300);
        let table = Tensor::<2>::random([n, k], Distribution::Default, &device);
        let x = Tensor::<2>::random([3, k], Distribution::Default, &device);
        let values = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap();
        let batch = values(matmul(x.clone(), table.clone().transpose()));
        let (xs, ws) = (values(x.clone()), values(table.clone()));
        for r in 0..3 {
            let row = x.clone().slice([r..r + 1, 0..k]);
            let alone = values(matmul(row, table.clone().transpose()));
            assert_eq!(alone, batch[r * n..(r + 1) * n], "row {r}");
            for (j, got) in alone.iter().enumerate() {
                let exact: f64 = (0..k)
                    .map(|p| f64::from(xs[r * k + p]) * f64::from(ws[j * k + p]))
                    .sum();
                assert!(
                    (f64::from(*got) - exact).abs() < 1e-4,
                    "row {r}, column {j}"
                );
            }
        }
    }

    #[test]
    fn linear_keeps_leading_dims() {
        let device = Device::flex();
        let x = Tensor::<3>::random([2, 40, 64], Distribution::Default, &device);
        let w = Tensor::<2>::random([64, 96], Distribution::Default, &device);
        let b = Tensor::<1>::random([96], Distribution::Default, &device);
        let ours = linear(x.clone(), w.clone(), Some(b.clone()));
        let theirs = burn::tensor::module::linear(x, w, Some(b));
        assert_eq!(ours.dims(), [2, 40, 96]);
        let diff: f32 = (ours - theirs).abs().max().into_scalar();
        assert!(diff < 1e-4, "{diff}");
    }

    /// The bias added inside the product: values and all three gradients (a trainable bias, as
    /// BitFit has) equal burn's linear.
    #[test]
    fn linear_with_bias_matches_burn_forward_and_backward() {
        let device = Device::flex().autodiff();
        let x = Tensor::<3>::random([2, 40, 64], Distribution::Default, &device).require_grad();
        let w = Tensor::<2>::random([64, 96], Distribution::Default, &device).require_grad();
        let b = Tensor::<1>::random([96], Distribution::Default, &device).require_grad();
        let r = Tensor::<3>::random([2, 40, 96], Distribution::Default, &device);
        let run = |ours: bool| {
            let y = if ours {
                linear(x.clone(), w.clone(), Some(b.clone()))
            } else {
                burn::tensor::module::linear(x.clone(), w.clone(), Some(b.clone()))
            };
            let grads = (y.clone() * r.clone()).sum().backward();
            (
                y.inner().reshape([80, 96]),
                x.grad(&grads).unwrap().reshape([80, 64]),
                w.grad(&grads).unwrap(),
                b.grad(&grads).unwrap().reshape([1, 96]),
            )
        };
        let (ours, theirs) = (run(true), run(false));
        let max = |x: Tensor<2>| -> f32 { x.abs().max().into_scalar::<f32>() };
        assert!(max(ours.0 - theirs.0) < 1e-4, "values");
        assert!(max(ours.1 - theirs.1) < 1e-4, "∂x");
        assert!(max(ours.2 - theirs.2) < 1e-4, "∂w");
        assert!(max(ours.3 - theirs.3) < 1e-4, "∂b");
    }

    /// The fused dense + LoRA layer equals `x·W + bias + s·(x·A)·B` composed from burn
    /// operations: values and the gradients of all five inputs (every one trainable here), with
    /// and without a bias, for 80 rows (the update's product below BLAS's size threshold: added
    /// by burn) and 600 rows (`(x·A): [600, 8]` has 4800 elements, so where OpenBLAS is loaded it
    /// accumulates the update into the base output, β = 1).
    #[test]
    fn lora_linear_matches_the_composed_layer() {
        for seq in [40, 300] {
            assert_eq!(
                2 * seq * 8 >= 4096,
                seq == 300,
                "the two sizes sit either side of the threshold"
            );
            lora_linear_case(seq);
        }
    }

    fn lora_linear_case(seq: usize) {
        let device = Device::flex().autodiff();
        let rows = 2 * seq;
        let leaf = |dims: [usize; 2]| {
            Tensor::<2>::random(dims, Distribution::Default, &device).require_grad()
        };
        let x = Tensor::<3>::random([2, seq, 64], Distribution::Default, &device).require_grad();
        let (w, a, b) = (leaf([64, 96]), leaf([64, 8]), leaf([8, 96]));
        let bias = Tensor::<1>::random([96], Distribution::Default, &device).require_grad();
        let r = Tensor::<3>::random([2, seq, 96], Distribution::Default, &device);
        let max = |x: Tensor<2>| -> f32 { x.abs().max().into_scalar::<f32>() };
        for with_bias in [true, false] {
            let bias = with_bias.then(|| bias.clone());
            let run = |fused: bool| {
                let y = if fused {
                    lora_linear(
                        x.clone(),
                        w.clone(),
                        bias.clone(),
                        (a.clone(), b.clone()),
                        0.5,
                    )
                    .unwrap()
                } else {
                    burn::tensor::module::linear(x.clone(), w.clone(), bias.clone())
                        + x.clone()
                            .matmul(a.clone().unsqueeze())
                            .matmul(b.clone().unsqueeze())
                            * 0.5
                };
                let grads = (y.clone() * r.clone()).sum().backward();
                let g = |t: &Tensor<2>| t.grad(&grads).unwrap();
                let db = bias
                    .as_ref()
                    .map(|b| b.grad(&grads).unwrap().reshape([1, 96]));
                (
                    [
                        y.inner().reshape([rows, 96]),
                        x.grad(&grads).unwrap().reshape([rows, 64]),
                    ],
                    [g(&w), g(&a), g(&b)],
                    db,
                )
            };
            let (ours, theirs) = (run(true), run(false));
            for (o, t) in ours.0.into_iter().zip(theirs.0) {
                assert!(max(o - t) < 1e-4, "{rows} rows: values or ∂x differ");
            }
            // Gradients of the weights sum over every row: f32 reassociation grows with them.
            for (o, t) in ours.1.into_iter().zip(theirs.1) {
                let scale = max(t.clone()).max(1.0);
                assert!(
                    max(o - t) < 1e-5 * scale * rows as f32,
                    "{rows} rows: ∂W, ∂A or ∂B"
                );
            }
            if let (Some(o), Some(t)) = (ours.2, theirs.2) {
                assert!(
                    max(o - t) < 1e-4 * (rows as f32 / 80.0),
                    "{rows} rows: ∂bias"
                );
            }
        }
    }

    /// CI's run with OpenBLAS installed sets `PEFT_REQUIRE_BLAS=1`: there, the library must have
    /// loaded, or the suite would silently test burn's products twice.
    #[test]
    fn openblas_loaded_where_required() {
        if std::env::var("PEFT_REQUIRE_BLAS").is_ok_and(|v| v == "1") {
            let loaded = blas();
            assert!(
                loaded.is_some(),
                "PEFT_REQUIRE_BLAS=1 but OpenBLAS did not load"
            );
            eprintln!(
                "products through {}",
                loaded.map_or("", |b| b.name.as_str())
            );
        }
    }

    #[test]
    fn strides_map_to_blas_layouts() {
        assert_eq!(blas_view(&[90, 1], 70, 90), Some((NO_TRANS, 90)));
        assert_eq!(blas_view(&[1, 90], 90, 50), Some((TRANS, 90)));
        assert_eq!(blas_view(&[2, 3], 4, 4), None);
    }
}
