//! Layouts between PyTorch and burn: a linear weight is `[out, in]` in a checkpoint and
//! `[in, out]` in burn.

use burn::tensor::TensorData;

use crate::HostTensor;

/// The transpose of a 2-D `[rows, cols]` f32 tensor.
pub fn transpose_data(data: TensorData) -> TensorData {
    let shape = data.shape().to_vec();
    let values: Vec<f32> = data.iter::<f32>().collect();
    let (rows, cols) = (shape[0], shape[1]);
    TensorData::new(transpose(&values, rows, cols), [cols, rows])
}

/// The transpose of a 2-D host tensor (as f32).
pub fn transpose_host(t: &HostTensor) -> HostTensor {
    let values = crate::bytes_to_f32(t.dtype, &t.data).unwrap_or_default();
    let (rows, cols) = (t.shape[0], t.shape[1]);
    HostTensor::from_f32(vec![cols, rows], &transpose(&values, rows, cols))
}

/// A PyTorch-layout `[out, in]` matrix as a contiguous burn-layout `[in, out]` tensor on
/// `device`. Transposing on the host once beats a transposed view, which costs a copy on every
/// pass that the autodiff graph keeps (docs/BENCHMARKS.md, "Design measurements").
pub fn burn_linear_weight(
    values: &[f32],
    [d_out, d_in]: [usize; 2],
    device: &burn::tensor::Device,
) -> burn::tensor::Tensor<2> {
    burn::tensor::Tensor::from_data(
        TensorData::new(transpose(values, d_out, d_in), [d_in, d_out]),
        device,
    )
}

/// The transpose of a row-major `[rows, cols]` matrix: `[cols, rows]`, row-major.
pub fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}
