//! # peft-quant
//!
//! 4-bit block quantisation with bitsandbytes' exact semantics (0.50.2, CPU): NF4 and FP4, one
//! absmax per block (blocksize 32 … 4096), optional double quantisation of the absmax statistics,
//! and bitsandbytes' serialised layout, so that a tensor quantised here is bit for bit the one
//! `bitsandbytes.functional.quantize_4bit` produces and transformers loads.
//!
//! ```
//! use peft_quant::{QuantConfig, QuantType, Quantized4bit, SourceDtype};
//!
//! let weight: Vec<f32> = (0..128).map(|i| (i as f32 / 10.0).sin()).collect();
//! let q = Quantized4bit::quantize(&weight, &[2, 64], SourceDtype::F32, QuantConfig::default())?;
//! assert_eq!(q.packed.len(), 64); // two codes per byte
//! let back = q.dequantize_f32();
//! assert!(back.iter().zip(&weight).all(|(a, b)| (a - b).abs() < 0.15));
//! # Ok::<(), peft_quant::QuantError>(())
//! ```

pub mod block;
pub mod codebook;
pub mod device;
pub mod error;
pub mod layout;
pub mod torch_sum;

pub use block::{Absmax, QuantConfig, QuantType, Quantized4bit, SourceDtype, check_blocksize};
pub use device::{CodeBlocks, DeviceCodes, NIBBLE_SHIFTS};
pub use error::{QuantError, Result};
pub use layout::{find_quant_state, is_component_key, python_float_repr};
