//! # peft-lokr
//!
//! LoKr (LyCORIS' low-rank Kronecker product) with Hugging Face PEFT parity: each targeted
//! linear layer `[in → out]`, its dimensions factored as `out = a·b` and `in = c·d`, gains
//! `ΔW = (alpha / r) · w1 ⊗ w2` with `w1: [a, c]` and `w2: [b, d]`, either held whole or as a
//! rank-`r` product — an update of full shape from a few hundred parameters. Mergeable:
//! `W += ΔW`.
//!
//! ```no_run
//! use burn::tensor::Device;
//! use peft_lokr::{LokrConfig, get_peft_model};
//!
//! let base = peft_models::load("tests/fixtures/models/llama-tiny", &Device::flex()).unwrap();
//! // PEFT's defaults for Llama (LoRA's): q_proj and v_proj, r = alpha = 8.
//! let lokr = get_peft_model(base, LokrConfig::default()).unwrap();
//! println!("{}", lokr.trainable_summary());
//! ```

pub mod config;
pub mod layer;
pub mod model;

pub use config::{LokrConfig, LokrInit, LokrShape, factorization};
pub use layer::{Factor, LokrLinear, LokrSettings};
pub use model::{FACTORS, Lokr, LokrModel, from_pretrained, get_peft_model};

#[cfg(test)]
mod tests;

/// The README's examples, compiled as doc tests (`cargo test -p <crate> --doc`).
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
