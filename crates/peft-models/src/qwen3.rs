//! Qwen3 (`model_type: "qwen3"`): the Llama network of [`crate::llama`] with an RMSNorm over
//! each query and key head before RoPE (`model.layers.{i}.self_attn.q_norm.weight`,
//! `…k_norm.weight`, `[head_dim]` each), an explicit `head_dim` (often not
//! `hidden_size / num_attention_heads`), no q/k/v biases unless `attention_bias`, tied or untied
//! embeddings, and Qwen2's optional sliding windows (`use_sliding_window`,
//! `max_window_layers`).

use burn::tensor::Device;
use peft_core::{LayerAdapter, Result, TensorStore};

use crate::llama::{Llama, LlamaConfig};

/// A Qwen3 model is a [`Llama`] with per-head query/key norms.
pub type Qwen3<A> = Llama<A>;

/// Loads a Qwen3 checkpoint (with its per-head norms whatever `config.qk_norm` says).
pub fn load<A: LayerAdapter>(
    config: &LlamaConfig,
    store: &TensorStore,
    device: &Device,
    options: &crate::LoadOptions,
) -> Result<Qwen3<A>> {
    let config = LlamaConfig {
        qk_norm: true,
        ..config.clone()
    };
    Llama::load(&config, store, device, options)
}
