//! Qwen3 (`model_type: "qwen3"`): the Llama network of [`crate::llama`] with an RMSNorm over
//! each query and key head before RoPE (`model.layers.{i}.self_attn.q_norm.weight`,
//! `…k_norm.weight`, `[head_dim]` each), an explicit `head_dim` (often not
//! `hidden_size / num_attention_heads`), no q/k/v biases unless `attention_bias`, tied or untied
//! embeddings, and Qwen2's optional sliding windows (`use_sliding_window`,
//! `max_window_layers`).
//!
//! It loads through [`Llama::load`](crate::llama::Llama::load): `LlamaConfig::from_value` derives
//! these options from `model_type` and the config, so there is nothing else to do here.

use crate::llama::Llama;

/// A Qwen3 model is a [`Llama`] with per-head query/key norms
/// (`LlamaConfig::qk_norm`, set for `qwen3`).
pub type Qwen3<A> = Llama<A>;
