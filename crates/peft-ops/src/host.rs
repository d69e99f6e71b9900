//! Host buffers of CPU (Flex) tensors: reading a tensor's f32 values in place or from a copy,
//! and new f32 tensors, zeroed or written by a kernel without zeroing first.

use burn::backend::Backend;
use burn::backend::tensor::FloatTensor;
use burn::tensor::Shape;

/// The f32 values of a tensor read back to the host, row-major (`None` if they cannot be read
/// as f32).
pub(crate) fn host_values<B: Backend>(x: &FloatTensor<B>) -> Option<Vec<f32>> {
    match burn::tensor::try_read_sync(B::float_into_data(x.clone())) {
        Some(Ok(data)) => data.try_into_vec::<f32>().ok(),
        _ => None,
    }
}

/// `f` of a tensor's f32 values, row-major: read in place where the tensor is a contiguous CPU
/// (Flex) tensor, else from a copy read back to the host (`None` if they cannot be read as f32).
pub(crate) fn with_host_f32<B: Backend, R>(
    x: &FloatTensor<B>,
    f: impl FnOnce(&[f32]) -> R,
) -> Option<R> {
    let any: &dyn std::any::Any = x;
    if let Some(values) = any
        .downcast_ref::<burn::backend::flex::FlexTensor>()
        .and_then(|t| t.as_slice::<f32>())
    {
        return Some(f(values));
    }
    host_values::<B>(x).map(|values| f(&values))
}

/// A zeroed f32 CPU tensor. (burn-flex's `FlexTensor::empty` builds a byte vector and then
/// copies it into an aligned allocation; an f32 vector is already aligned, and a fresh large one
/// comes from the OS already zeroed.)
pub(crate) fn zeros_f32(shape: Shape) -> burn::backend::flex::FlexTensor {
    let values = vec![0.0f32; shape.num_elements()];
    burn::backend::flex::FlexTensor::from_data(burn::tensor::TensorData::new(values, shape))
}

/// A new f32 CPU tensor of `shape` whose values `fill` writes, into a buffer that is not zeroed
/// first (zeroing the new activations and gradients of the element-wise kernels showed in a bf16
/// LoRA step's profile: docs/BENCHMARKS.md, "Design measurements"). When the kernel's input (`input_len` values) does not have the shape's size
/// — never, for the fused operations — the buffer is zeroed first, as before, so that what a
/// kernel over the shorter length leaves is zeros.
///
/// # Safety
/// When `input_len` is the shape's size, `fill` must initialise every element of the buffer it
/// is given; it must never write an uninitialised value.
pub(crate) unsafe fn written_f32(
    shape: Shape,
    input_len: usize,
    fill: impl FnOnce(&mut [std::mem::MaybeUninit<f32>]),
) -> burn::backend::flex::FlexTensor {
    let len = shape.num_elements();
    let mut values = Vec::<f32>::with_capacity(len);
    let buffer = &mut values.spare_capacity_mut()[..len];
    if input_len != len {
        buffer.fill(std::mem::MaybeUninit::new(0.0));
    }
    fill(buffer);
    // SAFETY: every element is initialised: zeroed above, or written by `fill` (the caller's
    // contract).
    unsafe { values.set_len(len) };
    burn::backend::flex::FlexTensor::from_data(burn::tensor::TensorData::new(values, shape))
}
