//! # peft-bitfit
//!
//! BitFit (Ben Zaken et al., 2021): freeze every parameter except the bias terms — the seed
//! tutorial's loop `if "bias" not in name: param.requires_grad = False` — optionally restricted by
//! a regex on the bias names. Not a PEFT type, so the adapter format is peft-rs' own, built like
//! PEFT's: `adapter_config.json` (`"peft_type": "BITFIT"`) and `adapter_model.safetensors` holding
//! the trained biases under `base_model.model.<hf name>`. "Merging" is writing the model with
//! its trained biases as a normal HF checkpoint.
//!
//! ```no_run
//! use burn::tensor::Device;
//! use peft_bitfit::{BitFitConfig, get_peft_model};
//!
//! let base = peft_models::load("tests/fixtures/models/bloom-tiny", &Device::flex()).unwrap();
//! let model = get_peft_model(base, BitFitConfig::default()).unwrap();
//! println!("num_param = {}", model.num_param()); // the seed's count
//! println!("{}", model.trainable_summary());
//! ```

pub mod config;
pub mod model;

pub use config::BitFitConfig;
pub use model::{BitFitModel, from_pretrained, get_peft_model};

#[cfg(test)]
mod tests;

/// The README's examples, compiled as doc tests (`cargo test -p <crate> --doc`).
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
