//! # peft-adalora
//!
//! AdaLoRA (Zhang et al., 2023, adaptive budget allocation) with Hugging Face PEFT parity: LoRA
//! in SVD form, `ΔW = B · (A ⊙ E) · lora_alpha / (init_r + 1e-5)`, per linear layer a triplet
//! `lora_A: [r, in]`, `lora_E: [r, 1]`, `lora_B: [out, r]`. In PEFT's training a rank allocator
//! zeroes the least important singular values until the average rank is `target_r` and writes
//! the ranks it kept into the config's `rank_pattern`; the saved folder then holds each layer at
//! its kept rank, and loading reads that pattern. Mergeable: `W += ΔW`.
//!
//! This crate loads, runs, merges, saves and serves PEFT's AdaLoRA folders, and trains them as
//! PEFT does: the orthogonality penalty in every pass' loss and the rank allocator after every
//! optimizer step ([`allocator`], through the core's `AdapterModel` hooks).
//!
//! ```no_run
//! use burn::tensor::Device;
//!
//! let base = peft_models::load("tests/fixtures/models/llama-tiny", &Device::flex()).unwrap();
//! let model = peft_adalora::from_pretrained(base, "tests/fixtures/adapters/adalora-llama", false)
//!     .unwrap();
//! println!("{}", model.trainable_summary());
//! ```

pub mod allocator;
pub mod config;
pub mod layer;
pub mod model;

pub use config::AdaLoraConfig;
pub use layer::{Ema, Importance, SvdLinear};
pub use model::{AdaLora, AdaLoraModel, TENSORS, from_pretrained, get_peft_model};

/// The README's examples, compiled as doc tests (`cargo test -p <crate> --doc`).
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
