//! # peft-ia3
//!
//! (IA)³ (Liu et al., 2022) with Hugging Face PEFT parity: a learned vector `l` scales the output
//! of each targeted linear layer (`base(x) · l`, bias included) or, for a feed-forward layer, its
//! input (`base(x · l)`). Mergeable: the weight's rows or columns (and the bias of a non-feed-
//! forward layer) are scaled in place.
//!
//! ```no_run
//! use burn::tensor::Device;
//! use peft_ia3::{Ia3Config, get_peft_model};
//!
//! let base = peft_models::load("tests/fixtures/models/bloom-tiny", &Device::flex()).unwrap();
//! // PEFT's defaults for BLOOM: query_key_value + mlp.dense_4h_to_h (feed-forward).
//! let ia3 = get_peft_model(base, Ia3Config::default()).unwrap();
//! println!("{}", ia3.trainable_summary());
//! ```

pub mod config;
pub mod layer;
pub mod model;

pub use config::Ia3Config;
pub use layer::Ia3Linear;
pub use model::{Ia3, Ia3Model, from_pretrained, get_peft_model};

#[cfg(test)]
mod tests;

/// The README's examples, compiled as doc tests (`cargo test -p <crate> --doc`).
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
