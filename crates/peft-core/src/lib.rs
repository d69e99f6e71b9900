//! # peft-core
//!
//! The abstraction every peft-rs method crate implements, and what they share:
//!
//! * [`adapter`]: the three attachment points (a layer, the input embeddings, the attention
//!   key/value prefix) and [`AdaptableLinear`];
//! * [`adapter_set`]: several named adapters on one layer (active sets, mixed-adapter batches);
//! * [`model`]: the [`CausalLm`] trait models implement, their inputs and KV cache;
//! * [`dropout`]: dropout masks from the calling thread's seeded generator (exact data
//!   parallelism in one process);
//! * [`config`]: the common part of PEFT's `adapter_config.json`, read leniently;
//! * [`modules`]: module paths and PEFT's `target_modules` matching rules;
//! * [`adapter_files`]: PEFT's adapter folders (config + weights) and parameter bookkeeping;
//! * [`params`]: parameters by their Hugging Face names;
//! * [`tuner`]: the layer methods' shared model ([`tuner::LayerTuner`], [`tuner::TunedModel`]:
//!   inject, load, save, merge, unmerge, unload);
//! * [`tokens`]: PEFT's trainable tokens (chosen embedding rows trained in full);
//! * [`summary`]: PEFT's `trainable params: … || all params: … || trainable%: …` line.
//!
//! What the layers compute with lives in `peft-ops` (CPU kernels, BLAS, packed products, the
//! losses, bf16 compute, device choice); checkpoint files and the error type in
//! `peft-tensors`; 4-bit formats in `peft-quant`.
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
pub mod config;
pub mod dropout;
pub mod model;
pub mod modules;
pub mod params;
pub mod prompt_learning;
pub mod summary;
pub mod tokens;
pub mod torch_rng;
pub mod tuner;

pub use adapter::{
    AdaptableEmbedding, AdaptableLinear, BaseLinear, LayerAdapter, NoAdapter, PackedLinear,
};
pub use adapter_set::{AdapterSet, BASE_ADAPTER, RowAdapters};
pub use config::{
    ConfigHeader, ExpectedSize, MethodConfig, PeftType, PromptLearningConfig, TargetModules,
};
pub use model::{AdapterModel, CausalLm, KvCache, LayerKv, ModelInput, ModelSpec};
pub use modules::{ModuleInfo, ModuleKind, ModuleMatcher};
pub use peft_ops::packed::PackedWeight;
pub use peft_ops::precision::ComputeDtype;
/// The error type every peft-rs crate returns (defined in peft-tensors, the lowest crate).
pub use peft_tensors::error;
pub use peft_tensors::{HostTensor, PeftError, Result, TensorStore};
pub use summary::TrainableSummary;
pub use tokens::TokenRows;
