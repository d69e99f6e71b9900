//! Mistral (`model_type: "mistral"`): the Llama network of [`crate::llama`] with the same weight
//! names, no biases, and sliding-window attention when `sliding_window` is set: a query at
//! position `p` sees the keys at `p - sliding_window < k ≤ p` in every layer, in the forward pass
//! and in KV-cached generation alike (the cache keeps every key; the mask does the windowing).

use burn::tensor::Device;
use peft_core::{LayerAdapter, Result, TensorStore};

use crate::llama::{Llama, LlamaConfig};

/// A Mistral model is a [`Llama`] whose layers attend through a sliding window.
pub type Mistral<A> = Llama<A>;

/// Loads a Mistral checkpoint (windows from [`LlamaConfig::layer_windows`]).
pub fn load<A: LayerAdapter>(
    config: &LlamaConfig,
    store: &TensorStore,
    device: &Device,
    options: &crate::LoadOptions,
) -> Result<Mistral<A>> {
    Llama::load(config, store, device, options)
}
