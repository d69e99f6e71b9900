//! # peft-trainable-tokens
//!
//! PEFT's trainable tokens (`TrainableTokensConfig`, `peft_type: TRAINABLE_TOKENS`) with
//! Hugging Face PEFT parity: the rows of a few token ids in the input embedding train in full
//! — new tokens added to a tokenizer, or existing ones re-purposed — while the rest of the
//! table stays frozen. With tied embeddings the output layer's rows are the same rows. The
//! adapter holds only those rows (`<path>.trainable_tokens_delta`, `[n, dim]`), so storage and
//! optimizer state grow with the number of tokens, not the vocabulary. Mergeable: merging writes
//! the rows into the table.
//!
//! The same rows can train beside LoRA's pairs through `LoraConfig::trainable_token_indices`
//! (`peft-lora`); both forms are the core's [`peft_core::TokenRows`].
//!
//! ```no_run
//! use burn::tensor::Device;
//! use peft_trainable_tokens::{TrainableTokensConfig, get_peft_model};
//!
//! let base = peft_models::load("tests/fixtures/models/bloom-tiny", &Device::flex()).unwrap();
//! let config = TrainableTokensConfig {
//!     token_indices: vec![3, 42, 500],
//!     ..Default::default()
//! };
//! let tokens = get_peft_model(base, config).unwrap();
//! // 3 rows × 64 dims train; the tied lm_head's rows follow them.
//! println!("{}", tokens.trainable_summary());
//! ```

pub mod config;
pub mod model;

pub use config::TrainableTokensConfig;
pub use model::{TrainableTokens, TrainableTokensModel, from_pretrained, get_peft_model};

#[cfg(test)]
mod tests;

/// The README's examples, compiled as doc tests (`cargo test -p <crate> --doc`).
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
