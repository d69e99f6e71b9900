//! The dtype linear layers compute in: f32, or bf16 the way PyTorch's autocast and
//! bitsandbytes' `bnb_4bit_compute_dtype=torch.bfloat16` do it.
//!
//! With [`ComputeDtype::Bf16`] every adaptable linear layer's frozen base computes its product in
//! bf16: the input is rounded to bf16, the weight is held in bf16 (dense) or de-quantised to bf16
//! (4-bit), the product accumulates in f32, the bias (rounded to bf16) is added, the sum is rounded
//! once to bf16, and the result is widened back to f32 — exactly `Linear4bit.forward`'s
//! `matmul_4bit(x.to(bf16), …, bias.to(bf16)).to(x.dtype)`, and PyTorch's bf16 `F.linear`.
//!
//! On the CPU backend a dense bf16 weight is a [`HalfWeight`](crate::half::HalfWeight) behind the packed-weight operation
//! of [`crate::packed_op`]: it is widened to f32 for each product and let go, so the autodiff
//! graph holds no f32 copy, and the single rounding above is reproduced exactly (burn's own bf16
//! matmul rounds its output before the bias is added). Other backends hold a bf16 burn tensor and
//! use their bf16 kernels. Everything else stays f32: embeddings, norms, attention scores and softmax, `lm_head`, the loss, the
//! adapters' own weights and the optimizer state (PEFT's `autocast_adapter_dtype=True` keeps
//! adapter weights in f32 too; `prepare_model_for_kbit_training` keeps the non-quantised
//! parameters in f32). Gradients flowing back through a bf16 product are rounded to bf16, as
//! PyTorch's are.

use burn::tensor::{DType, Device, Tensor};

use peft_tensors::{PeftError, Result};

/// The dtype of the frozen base layers' products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputeDtype {
    /// f32 throughout.
    #[default]
    F32,
    /// bf16 products with f32 accumulation, f32 everywhere else (see the module docs).
    Bf16,
}

impl ComputeDtype {
    /// burn's dtype for it.
    pub fn dtype(self) -> DType {
        match self {
            ComputeDtype::F32 => DType::F32,
            ComputeDtype::Bf16 => DType::BF16,
        }
    }

    /// PyTorch's name (`float32`, `bfloat16`), as in `bnb_4bit_compute_dtype`.
    pub fn torch_name(self) -> &'static str {
        match self {
            ComputeDtype::F32 => "float32",
            ComputeDtype::Bf16 => "bfloat16",
        }
    }

    /// Checks that `device` can compute in this dtype (wgpu has no bf16, for one).
    pub fn check_device(self, device: &Device) -> Result<()> {
        if self == ComputeDtype::F32 || device.supports_dtype(self.dtype()) {
            Ok(())
        } else {
            Err(PeftError::Unsupported(format!(
                "compute dtype {} is not supported on device {device:?}; use float32",
                self.torch_name()
            )))
        }
    }
}

impl std::fmt::Display for ComputeDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.torch_name())
    }
}

impl std::str::FromStr for ComputeDtype {
    type Err = PeftError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "float32" | "f32" | "fp32" => Ok(ComputeDtype::F32),
            "bfloat16" | "bf16" => Ok(ComputeDtype::Bf16),
            other => Err(PeftError::InvalidInput(format!(
                "unknown compute dtype `{other}` (expected float32 or bfloat16)"
            ))),
        }
    }
}

/// `x` rounded to the nearest bf16 (ties to even) and widened back to f32; differentiable, and
/// the gradient passing through is rounded to bf16 in turn.
pub fn round_bf16<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.cast(DType::BF16).cast(DType::F32)
}

/// `values` rounded to bf16 (to nearest, ties to even) into `bits` (bit patterns, same length).
pub use crate::kernels::round_to_bf16_bits;

/// Products with at most this many input rows (decoding) read the 16-bit weight directly, row
/// by row, instead of widening the whole weight first: each weight byte is read once. The limit
/// for few-row products in general (bf16 compute, the tied `lm_head`).
pub const DIRECT_PRODUCT_MAX_ROWS: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    #[test]
    fn names_parse_and_print() {
        assert_eq!("bf16".parse::<ComputeDtype>().unwrap(), ComputeDtype::Bf16);
        assert_eq!(
            "bfloat16".parse::<ComputeDtype>().unwrap().to_string(),
            "bfloat16"
        );
        assert_eq!(
            "float32".parse::<ComputeDtype>().unwrap(),
            ComputeDtype::F32
        );
        let err = "fp8".parse::<ComputeDtype>().unwrap_err().to_string();
        assert!(err.contains("`fp8`") && err.contains("bfloat16"), "{err}");
        assert!(ComputeDtype::Bf16.check_device(&Device::flex()).is_ok());
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to the even 1.
        // 1 + 3·2^-9 rounds up to 1 + 2^-7; 3.0 is exact.
        let device = Device::flex();
        let x = Tensor::<1>::from_data(
            TensorData::new(
                vec![1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-9), 3.0],
                [3],
            ),
            &device,
        );
        let r: Vec<f32> = round_bf16(x).into_data().iter::<f32>().collect();
        assert_eq!(r, vec![1.0, 1.0 + 2f32.powi(-7), 3.0]);
    }
}
