//! # peft-loha
//!
//! LoHa (Hyeon-Woo et al., 2022, FedPara; LyCORIS) with Hugging Face PEFT parity: each targeted
//! linear layer gains `ΔW = (alpha / r) · (w1a·w1b) ⊙ (w2a·w2b)`, the Hadamard product of two
//! rank-`r` products — an update of rank up to `r²` for the parameters of two LoRA pairs.
//! Mergeable: `W += ΔW`.
//!
//! ```no_run
//! use burn::tensor::Device;
//! use peft_loha::{LohaConfig, get_peft_model};
//!
//! let base = peft_models::load("tests/fixtures/models/llama-tiny", &Device::flex()).unwrap();
//! // PEFT's defaults for Llama (LoRA's): q_proj and v_proj, r = alpha = 8.
//! let loha = get_peft_model(base, LohaConfig::default()).unwrap();
//! println!("{}", loha.trainable_summary());
//! ```

pub mod config;
pub mod layer;
pub mod model;

pub use config::LohaConfig;
pub use layer::LohaLinear;
pub use model::{FACTORS, Loha, LohaModel, from_pretrained, get_peft_model};

#[cfg(test)]
mod tests;

/// The README's examples, compiled as doc tests (`cargo test -p <crate> --doc`).
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
