//! Mistral (`model_type: "mistral"`): the Llama network of [`crate::llama`] with the same weight
//! names, no biases, and sliding-window attention when `sliding_window` is set: a query at
//! position `p` sees the keys at `p - sliding_window < k ≤ p` in every layer, in the forward pass
//! and in KV-cached generation alike (the cache keeps every key; the mask does the windowing).
//!
//! It loads through [`Llama::load`](crate::llama::Llama::load): `LlamaConfig::from_value` derives
//! these options from `model_type` and the config, so there is nothing else to do here.

use crate::llama::Llama;

/// A Mistral model is a [`Llama`] whose layers attend through a sliding window
/// (`LlamaConfig::layer_windows`).
pub type Mistral<A> = Llama<A>;
