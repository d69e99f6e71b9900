//! # peft-prefix
//!
//! Prefix tuning (Li & Liang, 2021) with Hugging Face PEFT parity: learned keys and values put
//! before every attention layer's own (attachment point (c) of [`peft_core::adapter`]), entering
//! the model as a pre-filled [`peft_core::KvCache`] exactly as `past_key_values` do in
//! transformers. The tokens' positions start after the prefix (Llama), BLOOM's ALiBi covers the
//! prefix positions, and the prefix keys are used as stored (no RoPE).
//!
//! The table is `[num_virtual_tokens, layers · 2 · kv_dim]`, viewed as
//! `[n, layers · 2, kv_heads, head_dim]`: entry `2l` is layer `l`'s key, `2l + 1` its value. With
//! `prefix_projection`, the table is computed by `Embedding(n, d) → Linear(d, h) → tanh →
//! Linear(h, layers · 2 · kv_dim)`; PEFT saves only the computed table (`prompt_embeddings`),
//! so peft-rs also writes the projection's weights to `adapter_encoder.safetensors` for training
//! to resume.

pub mod config;
pub mod encoder;
pub mod model;

pub use config::PrefixTuningConfig;
pub use encoder::{PrefixProjection, load_projection};
pub use model::{ENCODER_NAME, PrefixTuning, PrefixTuningModel, from_pretrained, get_peft_model};
/// The sizes every prompt-learning config shares (its `prompt` field).
pub use peft_core::PromptLearningConfig;

#[cfg(test)]
mod tests;

/// The README's examples, compiled as doc tests (`cargo test -p <crate> --doc`).
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
