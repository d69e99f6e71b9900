//! 4-bit weights resident on a GPU: the codes and block scales uploaded once, de-quantised by
//! tensor operations for each product (no host work and no f32 upload per pass).

use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_ops::packed::DeviceWeight;

/// Where element `8w + j` of a weight sits in word `w` of [`CodeBlocks::words`]: the nibble at
/// bit `NIBBLE_SHIFTS[j]`. Words are bitsandbytes' packed bytes read four at a time as a
/// little-endian `i32`, and byte `b` holds element `2b` in its high nibble.
pub const NIBBLE_SHIFTS: [i32; 8] = [4, 0, 12, 8, 20, 16, 28, 24];

/// A 4-bit weight as plain arrays: `value[i] = codebook[code(i)] · absmax[i / blocksize]`.
#[derive(Debug, Clone, PartialEq)]
pub struct CodeBlocks {
    /// Eight codes per word (see [`NIBBLE_SHIFTS`]); the last word is zero-padded.
    pub words: Vec<i32>,
    /// One f32 scale per block (double quantisation already resolved).
    pub absmax: Vec<f32>,
    /// The 16 code values (NF4 or FP4).
    pub codebook: [f32; 16],
    /// Elements per block.
    pub blocksize: usize,
}

/// A 4-bit weight resident on a device (4.5 bits per parameter with f32 block scales),
/// de-quantised there by tensor operations for each product: no host work and no f32 upload per
/// pass on a GPU.
#[derive(Debug, Clone)]
pub struct DeviceCodes {
    /// `[ceil(n / 8)]` words of eight codes.
    pub words: Tensor<1, Int>,
    /// `[blocks]` scales.
    pub absmax: Tensor<1>,
    /// `[16]` code values.
    pub codebook: Tensor<1>,
    /// `[1, 8]` [`NIBBLE_SHIFTS`], in the words' integer dtype.
    pub shifts: Tensor<2, Int>,
    /// Elements per block.
    pub blocksize: usize,
}

impl DeviceCodes {
    /// Uploads `blocks` to `device`.
    pub fn upload(blocks: &CodeBlocks, device: &Device) -> Self {
        let words = Tensor::<1, Int>::from_data(
            TensorData::new(blocks.words.clone(), [blocks.words.len()]),
            device,
        );
        let absmax = Tensor::<1>::from_data(
            TensorData::new(blocks.absmax.clone(), [blocks.absmax.len()]),
            device,
        );
        let codebook =
            Tensor::<1>::from_data(TensorData::new(blocks.codebook.to_vec(), [16]), device);
        let shifts =
            Tensor::<2, Int>::from_data(TensorData::new(NIBBLE_SHIFTS.to_vec(), [1, 8]), device)
                .cast(words.dtype());
        Self {
            words,
            absmax,
            codebook,
            shifts,
            blocksize: blocks.blocksize,
        }
    }

    /// The de-quantised `[rows, cols]` weight (row-major, `rows · cols` elements), computed on
    /// the device: unpack the nibbles, look the codes up, scale each block.
    pub fn dequantize(&self, [rows, cols]: [usize; 2]) -> Tensor<2> {
        let device = self.words.device();
        let n = rows * cols;
        let n_words = self.words.dims()[0];
        let shifts = self.shifts.clone().expand([n_words, 8]);
        let codes = self
            .words
            .clone()
            .reshape([n_words, 1])
            .expand([n_words, 8])
            .bitwise_right_shift(shifts)
            .bitwise_and_scalar(15)
            .reshape([n_words * 8])
            .slice(0..n);
        let values = self.codebook.clone().select(0, codes);
        let blocks = self.absmax.dims()[0];
        let padded = blocks * self.blocksize;
        let values = if padded > n {
            Tensor::cat(vec![values, Tensor::zeros([padded - n], &device)], 0)
        } else {
            values
        };
        let scaled =
            values.reshape([blocks, self.blocksize]) * self.absmax.clone().reshape([blocks, 1]);
        scaled.reshape([padded]).slice(0..n).reshape([rows, cols])
    }
}

impl DeviceWeight for DeviceCodes {
    fn dequantize(&self, shape: [usize; 2]) -> Tensor<2> {
        DeviceCodes::dequantize(self, shape)
    }
}
