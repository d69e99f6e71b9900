//! The frozen base of an adaptable linear layer and its product: a dense burn [`Linear`] (f32,
//! or bf16 when loaded for bf16 compute) or a [`PackedLinear`] (4-bit NF4/FP4, or bf16 held in
//! two bytes on the CPU backend). The CPU / GPU × f32 / bf16 × packed dispatch is here, one
//! place: on the CPU backend the packed product is [`crate::packed_op::packed_linear`], a dense
//! f32 one [`crate::matmul::linear`]; elsewhere the backend's own kernels in the compute dtype.

use std::sync::Arc;

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::module::linear;
use burn::tensor::{DType, Device, Tensor};

use crate::packed::{DeviceWeight, PackedWeight};
use crate::packed_op::Bf16Layer;
use crate::precision::{ComputeDtype, round_bf16};

/// A linear layer whose weight stays packed (4-bit NF4/FP4, or bf16 for bf16 compute on the CPU
/// backend); each forward pass de-quantises it, multiplies, and lets the dense copy go.
#[derive(Module, Debug)]
pub struct PackedLinear {
    /// The packed `[out, in]` weight (not a parameter: frozen, never trained).
    #[module(skip)]
    pub weight: Arc<dyn PackedWeight>,
    /// `[out]`, kept dense (as bitsandbytes' `Linear4bit` does).
    pub bias: Option<Param<Tensor<1>>>,
    /// Where the de-quantised weight is placed when the layer is made dense.
    #[module(skip)]
    pub device: Device,
    /// The dtype the product is computed in (`bnb_4bit_compute_dtype`).
    #[module(skip)]
    pub compute: ComputeDtype,
    /// The weight resident on a GPU device, de-quantised there (`None` on the CPU backend,
    /// which uses the packed operation, and for formats without a device form).
    #[module(skip)]
    pub on_device: Option<Arc<dyn DeviceWeight>>,
}

impl PackedLinear {
    /// The de-quantised weight in burn's `[in, out]` layout on `device` (contiguous).
    pub fn dense_weight(&self, device: &Device) -> Tensor<2> {
        peft_tensors::layout::burn_linear_weight(
            &self.weight.dequantize(),
            self.weight.shape(),
            device,
        )
    }

    /// `[batch, seq, in]` → `[batch, seq, out]`, computed in [`Self::compute`] and returned in
    /// f32. On the CPU backend the product is one operation that de-quantises in the forward
    /// pass and again in the backward pass, so no dense weight stays alive in the autodiff graph
    /// (bf16 is computed there as f32 products of bf16-rounded operands, rounded once — what a
    /// bf16 GEMM with f32 accumulation gives); elsewhere the de-quantised weight is an ordinary
    /// constant operand.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let bf16 = self.compute == ComputeDtype::Bf16;
        if crate::device::runs_cpu_kernels(&x.device()) {
            if !bf16 {
                let out = crate::packed_op::packed_linear(x, &self.weight, None);
                return match &self.bias {
                    Some(b) => out + b.val().unsqueeze::<3>(),
                    None => out,
                };
            }
            // A frozen bias goes into the one bf16 operation; a trained one (BitFit) is added
            // here, where its gradient is tracked, before the output's rounding.
            let trained_bias = self
                .bias
                .as_ref()
                .map(|b| b.val())
                .filter(|b| b.is_require_grad());
            let layer = Bf16Layer {
                bias: match (&self.bias, &trained_bias) {
                    (Some(b), None) => Some(rounded_values(b.val())),
                    _ => None,
                },
                round_output: trained_bias.is_none(),
            };
            let out = crate::packed_op::packed_linear(x, &self.weight, Some(layer));
            return match trained_bias {
                Some(b) => round_bf16(out + round_bf16(b).unsqueeze::<3>()),
                None => out,
            };
        }
        let weight = match &self.on_device {
            Some(on_device) => on_device.dequantize(self.weight.shape()).transpose(),
            None => self.dense_weight(&x.device()),
        };
        linear_in(
            self.compute.dtype(),
            x,
            weight,
            self.bias.as_ref().map(|b| b.val()),
        )
    }
}

/// A frozen bias's values rounded to bf16, for the bf16 operation.
fn rounded_values(bias: Tensor<1>) -> Arc<[f32]> {
    bias.into_data()
        .iter::<f32>()
        .map(|v| half::bf16::from_f32(v).to_f32())
        .collect()
}

/// `x · weight + bias` (`weight: [in, out]`) with every operand cast to `dtype` (the backend's own
/// kernels), returned in f32: bf16 compute off the CPU backend.
pub fn linear_in(
    dtype: DType,
    x: Tensor<3>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
) -> Tensor<3> {
    let bias = bias.map(|b| b.cast(dtype));
    linear(x.cast(dtype), weight.cast(dtype), bias).cast(DType::F32)
}

/// The frozen base of an adaptable linear layer (peft-core's `AdaptableLinear`): a dense burn
/// [`Linear`] or a packed 4-bit weight.
#[derive(Module, Debug)]
pub enum BaseLinear {
    /// Full-precision weight, `[in, out]`.
    Dense(Linear),
    /// Packed weight (4-bit, or bf16 on the CPU backend), de-quantised per forward pass.
    Packed(PackedLinear),
}

impl BaseLinear {
    /// `[batch, seq, in]` → `[batch, seq, out]` in f32. A dense layer computes in its weight's
    /// dtype (bf16 when loaded for bf16 compute), a packed one in its compute dtype.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        match self {
            BaseLinear::Dense(l) => {
                let weight = l.weight.val();
                let dtype = weight.dtype();
                if dtype == DType::F32 {
                    return crate::matmul::linear(x, weight, l.bias.as_ref().map(|b| b.val()));
                }
                linear_in(dtype, x, weight, l.bias.as_ref().map(|b| b.val()))
            }
            BaseLinear::Packed(q) => q.forward(x),
        }
    }

    /// `(in_features, out_features)`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            BaseLinear::Dense(l) => {
                let [d_in, d_out] = l.weight.shape().dims();
                (d_in, d_out)
            }
            BaseLinear::Packed(q) => {
                let [d_out, d_in] = q.weight.shape();
                (d_in, d_out)
            }
        }
    }

    /// The layer as a dense f32 [`Linear`], de-quantising a packed weight (exactly, no
    /// re-rounding) or widening a bf16 one.
    pub fn into_dense(self) -> Linear {
        match self {
            BaseLinear::Dense(l) => with_weight_dtype(l, DType::F32),
            BaseLinear::Packed(q) => Linear {
                weight: Param::from_tensor(q.dense_weight(&q.device)).set_require_grad(false),
                bias: q.bias,
            },
        }
    }

    /// The packed weight, if this layer is quantised.
    pub fn packed(&self) -> Option<&Arc<dyn PackedWeight>> {
        match self {
            BaseLinear::Packed(q) => Some(&q.weight),
            BaseLinear::Dense(_) => None,
        }
    }
}

/// `linear` with its (frozen) weight converted to `dtype`; the bias stays as it is (f32).
pub fn with_weight_dtype(linear: Linear, dtype: DType) -> Linear {
    if linear.weight.val().dtype() == dtype {
        return linear;
    }
    let require_grad = linear.weight.is_require_grad();
    Linear {
        weight: Param::from_tensor(linear.weight.val().cast(dtype)).set_require_grad(require_grad),
        bias: linear.bias,
    }
}
