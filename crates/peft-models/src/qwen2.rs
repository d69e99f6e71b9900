//! Qwen2 (`model_type: "qwen2"`): the Llama network of [`crate::llama`] with biases on
//! `q_proj`, `k_proj` and `v_proj` (not on `o_proj`), the same weight names
//! (`model.layers.{i}.self_attn.q_proj.bias`, …), and usually a tied `lm_head` in small sizes.
//!
//! With `use_sliding_window: true`, the layers from `max_window_layers` on attend through
//! `sliding_window` (transformers 5's rule; `layer_types`, where the config lists them, wins).

use burn::tensor::Device;
use peft_core::{LayerAdapter, Result, TensorStore};

use crate::llama::{Llama, LlamaConfig};

/// A Qwen2 model is a [`Llama`] whose q/k/v projections carry biases.
pub type Qwen2<A> = Llama<A>;

/// Loads a Qwen2 checkpoint.
pub fn load<A: LayerAdapter>(
    config: &LlamaConfig,
    store: &TensorStore,
    device: &Device,
    options: &crate::LoadOptions,
) -> Result<Qwen2<A>> {
    let config = LlamaConfig {
        qkv_bias: true,
        ..config.clone()
    };
    Llama::load(&config, store, device, options)
}
