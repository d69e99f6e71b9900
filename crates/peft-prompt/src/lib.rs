//! # peft-prompt
//!
//! Prompt tuning (Lester et al., 2021) with Hugging Face PEFT parity: `num_virtual_tokens`
//! learned embeddings are put before the input embeddings (attachment point (b) of
//! [`peft_core::adapter`]); the whole model stays frozen. BLOOM's embedding LayerNorm applies to
//! them too, the attention mask gains leading ones, and the logits have `num_virtual_tokens`
//! extra leading positions — all as PEFT does.
//!
//! Initialisation as PEFT: `RANDOM` (N(0, 1)), `SAMPLE_VOCAB` (rows of random vocabulary
//! tokens), or `TEXT` — the text is tokenised (special tokens included), repeated ⌈n / len⌉
//! times if shorter, truncated to `num_virtual_tokens`, and those rows of the word-embedding
//! table are copied.
//!
//! ```no_run
//! use burn::tensor::Device;
//! use peft_core::AdapterModel;
//! use peft_prompt::{PromptLearningConfig, PromptTuningConfig, PromptTuningInit, get_peft_model};
//!
//! let dir = "tests/fixtures/models/bloom-tiny";
//! let base = peft_models::load(dir, &Device::flex()).unwrap();
//! let tokenizer = peft_models::Tokenizer::from_dir(dir).unwrap();
//! let text = "下面是人和聊天机器人的对话。";
//! let config = PromptTuningConfig {
//!     prompt: PromptLearningConfig::new(tokenizer.encode(text).unwrap().len()),
//!     prompt_tuning_init: PromptTuningInit::Text,
//!     prompt_tuning_init_text: Some(text.into()),
//!     ..PromptTuningConfig::default()
//! };
//! let model = get_peft_model(base, config, Some(&tokenizer)).unwrap();
//! println!("{}", model.trainable_summary());
//! ```

pub mod config;
pub mod model;

pub use config::{PromptTuningConfig, PromptTuningInit};
pub use model::{PromptTuning, PromptTuningModel, from_pretrained, get_peft_model, text_init_ids};
/// The sizes every prompt-learning config shares (its `prompt` field).
pub use peft_core::PromptLearningConfig;

#[cfg(test)]
mod tests;

/// The README's examples, compiled as doc tests (`cargo test -p <crate> --doc`).
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
