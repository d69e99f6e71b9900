//! Frozen weights held packed (4-bit codes, or bf16 as stored) behind one interface: what the
//! products of [`crate::packed_op`] read, and what a format implements to be used there.

use std::sync::Arc;

use burn::tensor::{Device, Tensor};
use peft_tensors::HostTensor;

/// A frozen weight kept in a compressed form and de-quantised on demand: 4-bit NF4/FP4 for QLoRA
/// (peft-quant implements it; the operations here only see this trait) or bf16
/// ([`HalfWeight`](crate::half::HalfWeight)).
pub trait PackedWeight: std::fmt::Debug + Send + Sync {
    /// `[out, in]`, PyTorch's order.
    fn shape(&self) -> [usize; 2];
    /// The de-quantised weight, row-major `[out, in]`, in f32.
    fn dequantize(&self) -> Vec<f32>;
    /// Bytes held (codes plus statistics).
    fn storage_bytes(&self) -> usize;
    /// The tensors this weight is saved as under `name` (bitsandbytes' layout for 4-bit).
    fn to_tensors(&self, name: &str) -> Vec<(String, HostTensor)>;

    /// The de-quantised weight rounded to bf16 (held as f32): what bf16 compute multiplies by.
    /// bitsandbytes de-quantises in f32 and casts to the compute dtype, one rounding; a format
    /// already in bf16 returns its values as they are.
    fn dequantize_bf16_rounded(&self) -> Vec<f32> {
        let mut values = self.dequantize();
        crate::kernels::round_bf16_in_place(&mut values);
        values
    }

    /// The weight placed on a non-CPU `device` in a form that de-quantises there by tensor
    /// operations (4-bit codes and block scales), so that no f32 copy is uploaded per pass;
    /// `None` where the format has none (the caller uploads the de-quantised weight).
    fn to_device(&self, _device: &Device) -> Option<Arc<dyn DeviceWeight>> {
        None
    }

    /// The checkpoint dtype the weight's values are exactly representable in when it is held as
    /// stored (bf16/f16 weights); `None` for quantised formats.
    fn stored_dtype(&self) -> Option<safetensors::Dtype> {
        None
    }

    /// The weight's bf16 bit patterns, row-major `[out, in]`, where it is held as bf16: bf16
    /// products read them as they are ([`crate::onednn`]). `None` for other formats.
    fn bf16_bits(&self) -> Option<&[u16]> {
        None
    }

    /// `x · Wᵀ` for `x: [rows, in]` (row-major) computed straight from the packed values, for
    /// the few rows of a decoding step; `None` where the format has no such path (the caller
    /// de-quantises and multiplies).
    fn matmul_few_rows(&self, _x: &[f32], _rows: usize) -> Option<Vec<f32>> {
        None
    }

    /// De-quantises the block `rows × cols` of the `[out, in]` weight into `out`
    /// (`rows.len() · cols.len()` values, row-major), exactly as
    /// [`dequantize`](Self::dequantize) would; `false` where the format cannot (the caller
    /// de-quantises the whole weight instead). Products then go through the weight block by
    /// block, each block still in cache when it is multiplied.
    fn dequantize_block(
        &self,
        _rows: std::ops::Range<usize>,
        _cols: std::ops::Range<usize>,
        _out: &mut [f32],
    ) -> bool {
        false
    }

    /// [`dequantize_block`](Self::dequantize_block) rounded to bf16, as bit patterns: what bf16
    /// compute multiplies by (one rounding of the de-quantised f32 value, as bitsandbytes' cast
    /// to the compute dtype). The default de-quantises to f32 and rounds; a format may do both
    /// at once.
    fn dequantize_block_bf16(
        &self,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        out: &mut [u16],
    ) -> bool {
        let mut values = vec![0.0f32; out.len()];
        if !self.dequantize_block(rows, cols, &mut values) {
            return false;
        }
        crate::kernels::round_to_bf16_bits(&values, out);
        true
    }
}

/// A packed weight resident on a GPU device, de-quantised there for each product.
pub trait DeviceWeight: std::fmt::Debug + Send + Sync {
    /// The de-quantised `[rows, cols]` weight (PyTorch's `[out, in]` order), on the device.
    fn dequantize(&self, shape: [usize; 2]) -> Tensor<2>;
}
