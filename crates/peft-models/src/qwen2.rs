//! Qwen2 (`model_type: "qwen2"`): the Llama network of [`crate::llama`] with biases on
//! `q_proj`, `k_proj` and `v_proj` (not on `o_proj`), the same weight names
//! (`model.layers.{i}.self_attn.q_proj.bias`, …), and usually a tied `lm_head` in small sizes.
//!
//! With `use_sliding_window: true`, the layers from `max_window_layers` on attend through
//! `sliding_window` (transformers 5's rule; `layer_types`, where the config lists them, wins).
//!
//! It loads through [`Llama::load`](crate::llama::Llama::load): `LlamaConfig::from_value` derives
//! these options from `model_type` and the config, so there is nothing else to do here.

use crate::llama::Llama;

/// A Qwen2 model is a [`Llama`] whose q/k/v projections carry biases
/// (`LlamaConfig::qkv_bias`, set for `qwen2`).
pub type Qwen2<A> = Llama<A>;
