//! # peft-gguf
//!
//! From fine-tune to llama.cpp: a Hugging Face model folder (a merged model or a base) written
//! as the GGUF file llama.cpp's `convert_hf_to_gguf.py` writes, and a PEFT LoRA adapter as
//! `convert_lora_to_gguf.py` writes it, so `llama-cli`, `llama-server` and Ollama load them.
//! The same metadata keys, tensor names, row orders and storage types (f32, f16, bf16, q8_0)
//! as the reference converters, and `llama-quantize`'s types and per-tensor choices for q4_0,
//! q4_k_m, q5_k_m and q6_k ([`mix`]), checked against files they made (`tests/gguf.rs`); a
//! bounded, checked reader ([`GgufFile`]) for the other direction.
//!
//! ```no_run
//! use std::path::Path;
//! use peft_gguf::{ExportOptions, OutType, export_model};
//!
//! let options = ExportOptions { outtype: OutType::Q8_0, ..Default::default() };
//! export_model(
//!     Path::new("tests/fixtures/models/llama-tiny"),
//!     Path::new("llama-tiny-q8_0.gguf"),
//!     &options,
//!     &mut |done, total| eprintln!("{done}/{total}"),
//! )
//! .unwrap();
//! ```

pub mod arch;
pub mod error;
pub mod export;
pub mod format;
pub mod import;
mod json;
pub mod mix;
pub mod quant;
pub mod vocab;

pub use error::{GgufError, Result};
pub use export::{ExportOptions, OutType, export_lora, export_model};
pub use format::{GgmlType, GgufFile, GgufWriter, TensorInfo, Value, ValueType};
pub use import::import_gguf;

/// The README's examples, compiled as doc tests (`cargo test -p <crate> --doc`).
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
