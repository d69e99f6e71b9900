//! # peft-ops
//!
//! The operations peft-rs' layers compute with, kept out of the modules (which only compose
//! them):
//!
//! * [`device`]: choosing the device, and the one check of whether the CPU kernels run there
//!   ([`device::runs_cpu_kernels`]);
//! * [`packed`]: the packed-weight interface (bf16 as stored, 4-bit codes);
//! * [`linear`]: a frozen base layer (dense or packed) and the one dispatch of its product
//!   (CPU kernels or the device's, f32 or bf16, packed or dense);
//! * [`packed_op`], [`blas`], [`onednn`]: the frozen layers' products (packed weights; OpenBLAS
//!   when present; oneDNN's bf16 kernels for bf16 compute when present);
//! * [`fused`], [`kernels`]: one-pass CPU operations for attention, the GELU and the loss;
//! * [`loss`], [`chunked_loss`]: causal-LM cross-entropy, and `lm_head` + cross-entropy over row
//!   blocks (no whole logits);
//! * [`precision`]: f32 or bf16 compute in the linear layers;
//! * [`process`]: process-wide settings for speed (OpenBLAS threads, malloc), set by binaries.
//!
//! Every operation has a composed burn fallback, so other backends (wgpu, cuda) run the same
//! code paths with burn's own kernels.
//!
//! ```
//! use burn::tensor::{Device, Tensor};
//!
//! let device = Device::flex();
//! assert!(peft_ops::device::runs_cpu_kernels(&device));
//! let x = Tensor::<2>::from_floats([[1.0, 2.0]], &device);
//! let w = Tensor::<2>::from_floats([[1.0], [1.0]], &device);
//! let y: Vec<f32> = peft_ops::matmul::matmul(x, w).into_data().to_vec().unwrap();
//! assert_eq!(y, vec![3.0]);
//! ```

pub mod blas;
pub mod chunked_loss;
pub mod device;
pub mod fused;
pub mod half;
pub mod host;
pub mod kernels;
pub mod linear;
pub mod loss;
pub mod matmul;
pub mod onednn;
pub mod packed;
pub mod packed_op;
pub mod precision;
pub mod process;
