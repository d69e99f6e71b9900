//! # peft-vera
//!
//! VeRA (Kopiczko et al., 2024, vector-based random matrix adaptation) with Hugging Face PEFT
//! parity: one pair of frozen random projections shared by every targeted layer
//! (`vera_A: [r, in]`, `vera_B: [out, r]`, sliced per layer), and per layer two trained vectors,
//! `ΔW = diag(λ_b) · B · diag(λ_d) · A`. The projections are PEFT's bit for bit when drawn from
//! `projection_prng_key` (`peft_core::torch_rng`), so a folder saved without them
//! (`save_projection: false`) loads with PEFT's numbers. Mergeable: `W += ΔW`.
//!
//! ```no_run
//! use burn::tensor::Device;
//! use peft_vera::{VeraConfig, get_peft_model};
//!
//! let base = peft_models::load("tests/fixtures/models/llama-tiny", &Device::flex()).unwrap();
//! let vera = get_peft_model(base, VeraConfig { r: 16, ..Default::default() }).unwrap();
//! println!("{}", vera.trainable_summary());
//! ```

pub mod config;
pub mod layer;
pub mod model;

pub use config::VeraConfig;
pub use layer::VeraLinear;
pub use model::{
    VECTORS, VERA_A, VERA_B, Vera, VeraModel, from_pretrained, get_peft_model, projections,
};

/// The README's examples, compiled as doc tests (`cargo test -p <crate> --doc`).
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
