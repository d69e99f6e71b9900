//! f32 matrix products through the system's OpenBLAS, when it is installed, for the CPU backend.
//!
//! burn's CPU backend multiplies with the `gemm` crate: about 97 GFLOP/s for a 1024³ f32 product
//! on our 2-core AVX-512 machines, where OpenBLAS (Debian's `libopenblas0`) and PyTorch reach about
//! 200. A training step is mostly the frozen linear layers' products, so those go through
//! [`BlasMatmulBackend::blas_matmul`]: OpenBLAS's `cblas_sgemm` for f32 matrices on the CPU
//! backend, burn's own matmul otherwise (other dtypes, other backends, or no OpenBLAS).
//!
//! OpenBLAS is opened at run time (`dlopen`), never linked: a build needs nothing installed, and a
//! machine without it computes exactly as before. `PEFT_BLAS=off` turns it off; `PEFT_BLAS=PATH`
//! names the library to open (default: `libopenblas.so.0`, then `libopenblas.so`).
//!
//! OpenBLAS's worker threads spin (`sched_yield`) for a long while after each product, taking a
//! core from the backend's own threads between products: a quarter of a training step's samples
//! on 2 cores. Binaries call [`crate::process::prepare`] first thing, which shortens that wait
//! (`OPENBLAS_THREAD_TIMEOUT=4`); measured LoRA step −23 % with, −10 % without it.

use std::sync::OnceLock;

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

/// `cblas_sgemm`'s C signature (enums are C ints).
type SgemmFn = unsafe extern "C" fn(
    layout: i32,
    trans_a: i32,
    trans_b: i32,
    m: i32,
    n: i32,
    k: i32,
    alpha: f32,
    a: *const f32,
    lda: i32,
    b: *const f32,
    ldb: i32,
    beta: f32,
    c: *mut f32,
    ldc: i32,
) -> ();

const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

/// An opened BLAS library.
pub struct Blas {
    // Keeps the library mapped for as long as `sgemm` may be called.
    _library: libloading::Library,
    sgemm: SgemmFn,
    /// The file that was opened.
    pub name: String,
}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Blas({})", self.name)
    }
}

/// The BLAS library in use, opened on first call; `None` when there is none or `PEFT_BLAS=off`.
pub fn blas() -> Option<&'static Blas> {
    static BLAS: OnceLock<Option<Blas>> = OnceLock::new();
    BLAS.get_or_init(|| {
        let names = match std::env::var("PEFT_BLAS") {
            Ok(v) if matches!(v.as_str(), "off" | "0" | "none" | "") => return None,
            Ok(path) => vec![path],
            Err(_) => vec!["libopenblas.so.0".into(), "libopenblas.so".into()],
        };
        names.into_iter().find_map(|name| open(&name))
    })
    .as_ref()
}

fn open(name: &str) -> Option<Blas> {
    // SAFETY: opening OpenBLAS runs its initialisers, which only set up its thread pool.
    let library = unsafe { libloading::Library::new(name) }.ok()?;
    // SAFETY: `cblas_sgemm` has this signature in every CBLAS.
    let sgemm = unsafe { library.get::<SgemmFn>(b"cblas_sgemm\0") }
        .ok()
        .map(|f| *f)?;
    tracing::debug!("matrix products through {name}");
    Some(Blas {
        _library: library,
        sgemm,
        name: name.to_string(),
    })
}

/// How a 2-D operand is laid out for BLAS: row-major with a leading dimension, possibly
/// transposed. `None` for a layout BLAS cannot read (then it is made contiguous first).
fn blas_view(strides: &[isize], rows: usize, cols: usize) -> Option<(i32, i32)> {
    let (rs, cs) = (strides[0], strides[1]);
    if cs == 1 && rs >= cols.max(1) as isize {
        Some((NO_TRANS, rs as i32))
    } else if rs == 1 && cs >= rows.max(1) as isize {
        Some((TRANS, cs as i32))
    } else {
        None
    }
}

/// `lhs: [m, k] · rhs: [k, n] (+ bias: [n])` with `cblas_sgemm`, reading strided operands in
/// place; a bias fills C's rows first and BLAS adds the product to it (β = 1), so adding it costs
/// no pass of its own.
fn sgemm_flex(
    blas: &Blas,
    lhs: FloatTensor<Flex>,
    rhs: FloatTensor<Flex>,
    bias: Option<&[f32]>,
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
    if m == 0 || n == 0 || k == 0 {
        let mut out = zeros_f32(Shape::new([m, n]));
        if let Some(bias) = bias {
            for row in out.storage_mut::<f32>().chunks_mut(n.max(1)) {
                row.copy_from_slice(bias);
            }
        }
        return out;
    }
    let a = lhs.storage::<f32>()[lhs.layout().start_offset()..].as_ptr();
    let b = rhs.storage::<f32>()[rhs.layout().start_offset()..].as_ptr();
    // Without a bias C is not zeroed first: with β = 0 BLAS writes every element without
    // reading it.
    let (mut values, beta) = match bias {
        Some(bias) => (bias.repeat(m), 1.0),
        None => (Vec::<f32>::with_capacity(m * n), 0.0),
    };
    // SAFETY: `a` and `b` address `[m, k]` and `[k, n]` matrices with the strides checked by
    // `blas_view` inside their storages, `values` has room for the `[m, n]` result, which BLAS
    // writes in full (with β = 0 without reading it) before `set_len` makes it readable.
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
    burn::backend::flex::FlexTensor::from_data(burn::tensor::TensorData::new(
        values,
        Shape::new([m, n]),
    ))
}

/// A zeroed f32 CPU tensor. (burn-flex's `FlexTensor::empty` builds a byte vector and then
/// copies it into an aligned allocation; an f32 vector is already aligned, and a fresh large one
/// comes from the OS already zeroed.)
pub(crate) fn zeros_f32(shape: Shape) -> burn::backend::flex::FlexTensor {
    let values = vec![0.0f32; shape.num_elements()];
    burn::backend::flex::FlexTensor::from_data(burn::tensor::TensorData::new(values, shape))
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

impl BlasMatmulBackend for Flex {
    fn blas_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
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
        let bias_f32 = bias.dtype() == DType::F32 && bias.layout().shape().num_dims() == 1;
        match (blas(), bias.as_slice::<f32>()) {
            (Some(blas), Some(values)) if bias_f32 && blas_takes(&lhs, &rhs) => {
                sgemm_flex(blas, lhs, rhs, Some(values))
            }
            _ => {
                let n = bias.layout().shape()[0];
                let out = flex_matmul::<Flex>(lhs, rhs);
                Flex::float_add(out, Flex::float_reshape(bias, Shape::new([1, n])))
            }
        }
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

impl<B: BlasMatmulBackend, C: CheckpointStrategy> BlasMatmulBackend for Autodiff<B, C> {
    fn blas_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct BlasMatmulBackward;

        impl<B: BlasMatmulBackend> Backward<B, 2> for BlasMatmulBackward {
            // lhs when rhs needs a gradient, rhs when lhs does (as burn's own matmul keeps them).
            type State = (
                Option<burn::backend::autodiff::NodeId>,
                Option<burn::backend::autodiff::NodeId>,
            );

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let (lhs, rhs) = ops.state;
                let lhs: Option<B::FloatTensorPrimitive> =
                    lhs.map(|id| checkpointer.retrieve_node_output(id));
                let rhs: Option<B::FloatTensorPrimitive> =
                    rhs.map(|id| checkpointer.retrieve_node_output(id));
                let [node_lhs, node_rhs] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                if let (Some(node), Some(rhs)) = (node_rhs, lhs) {
                    // ∂rhs = lhsᵀ · ∂out
                    let g = B::blas_matmul(B::float_transpose(rhs), grad.clone());
                    grads.register::<B>(node.id, g);
                }
                if let (Some(node), Some(rhs)) = (node_lhs, rhs) {
                    // ∂lhs = ∂out · rhsᵀ
                    grads.register::<B>(node.id, B::blas_matmul(grad, B::float_transpose(rhs)));
                }
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
            type State = (
                Option<burn::backend::autodiff::NodeId>,
                Option<burn::backend::autodiff::NodeId>,
            );

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let (lhs, rhs) = ops.state;
                let lhs: Option<B::FloatTensorPrimitive> =
                    lhs.map(|id| checkpointer.retrieve_node_output(id));
                let rhs: Option<B::FloatTensorPrimitive> =
                    rhs.map(|id| checkpointer.retrieve_node_output(id));
                let [node_lhs, node_rhs, node_bias] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                if let Some(node) = node_bias {
                    // ∂bias = Σ over rows of ∂out
                    let n = grad.shape()[1];
                    let g = B::float_reshape(B::float_sum_dim(grad.clone(), 0), Shape::new([n]));
                    grads.register::<B>(node.id, g);
                }
                if let (Some(node), Some(lhs)) = (node_rhs, lhs) {
                    let g = B::blas_matmul(B::float_transpose(lhs), grad.clone());
                    grads.register::<B>(node.id, g);
                }
                if let (Some(node), Some(rhs)) = (node_lhs, rhs) {
                    grads.register::<B>(node.id, B::blas_matmul(grad, B::float_transpose(rhs)));
                }
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
}

/// `lhs: [m, k] · rhs: [k, n]`: through OpenBLAS on the CPU backend when it is available (see the
/// module docs), burn's matmul otherwise.
pub fn matmul(lhs: Tensor<2>, rhs: Tensor<2>) -> Tensor<2> {
    if !crate::packed_op::supports_packed_matmul(&lhs.device()) {
        return lhs.matmul(rhs);
    }
    Tensor::from_dispatch(<Dispatch as BlasMatmulBackend>::blas_matmul(
        lhs.into_dispatch(),
        rhs.into_dispatch(),
    ))
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
        Some(b) if crate::packed_op::supports_packed_matmul(&x.device()) => {
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

    #[test]
    fn strides_map_to_blas_layouts() {
        assert_eq!(blas_view(&[90, 1], 70, 90), Some((NO_TRANS, 90)));
        assert_eq!(blas_view(&[1, 90], 90, 50), Some((TRANS, 90)));
        assert_eq!(blas_view(&[2, 3], 4, 4), None);
    }
}
