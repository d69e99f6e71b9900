//! # peft-core
//!
//! The abstraction every peft-rs method crate implements, and what they share:
//!
//! * [`adapter`]: the three attachment points (a layer, the input embeddings, the attention
//!   key/value prefix) and [`AdaptableLinear`];
//! * [`adapter_set`]: several named adapters on one layer (active sets, mixed-adapter batches);
//! * [`model`]: the [`CausalLm`] trait models implement, their inputs and KV cache;
//! * [`config`]: the common part of PEFT's `adapter_config.json`, read leniently;
//! * [`modules`]: module paths and PEFT's `target_modules` matching rules;
//! * [`tensors`]: safetensors reading (single and sharded, f32/f16/bf16) and atomic writes;
//! * [`precision`]: f32 or bf16 compute in the linear layers;
//! * [`packed_op`], [`blas`]: the frozen layers' products (packed weights; OpenBLAS when present);
//! * [`fused`], [`kernels`]: one-pass CPU operations for attention, the GELU and the loss;
//! * [`chunked_loss`]: `lm_head` + cross-entropy over row blocks (no whole logits);
//! * [`process`]: process-wide settings for speed (OpenBLAS threads, malloc), set by binaries;
//! * [`summary`]: PEFT's `trainable params: … || all params: … || trainable%: …` line;
//! * [`error`]: the typed error all library crates return.
//!
//! ```
//! use peft_core::{ModuleMatcher, TargetModules};
//!
//! let targets = TargetModules::List(vec!["query_key_value".into()]);
//! let matcher = ModuleMatcher::new(&targets, None, None, None).unwrap();
//! assert!(matcher.matches("transformer.h.0.self_attention.query_key_value", true));
//! ```

pub mod adapter;
pub mod adapter_files;
pub mod adapter_set;
pub mod blas;
pub mod chunked_loss;
pub mod config;
pub mod device;
pub mod error;
pub mod fused;
pub mod kernels;
pub mod loss;
pub mod model;
pub mod modules;
pub mod packed_op;
pub mod params;
pub mod precision;
pub mod process;
pub mod prompt_learning;
pub mod summary;
pub mod tensors;

pub use adapter::{
    AdaptableEmbedding, AdaptableLinear, AdapterModel, BaseLinear, CodeBlocks, DeviceCodes,
    LayerAdapter, NoAdapter, PackedLinear, PackedWeight,
};
pub use adapter_set::{AdapterSet, BASE_ADAPTER, RowAdapters};
pub use config::{ConfigHeader, PeftType, TargetModules};
pub use error::{PeftError, Result};
pub use model::{CausalLm, KvCache, LayerKv, ModelInput, ModelSpec};
pub use modules::{ModuleInfo, ModuleKind, ModuleMatcher};
pub use precision::ComputeDtype;
pub use summary::TrainableSummary;
pub use tensors::{HostTensor, TensorStore};
