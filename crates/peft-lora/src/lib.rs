//! # peft-lora
//!
//! LoRA (Hu et al., 2021) with Hugging Face PEFT parity: a low-rank update `s · B·A` trained
//! beside each targeted frozen linear layer, computed as `base(x) + s · B(A(dropout(x)))` —
//! never as a dense `W + s·BA` per step.
//!
//! * [`LoraConfig`] — PEFT's `adapter_config.json` (`r`, `lora_alpha`, `target_modules`,
//!   `rank_pattern`, `use_rslora`, `use_dora`, `modules_to_save`, `bias`, …); unimplemented
//!   features (such as `init_lora_weights: "pissa"`) are refused, never ignored.
//! * [`dora`] — DoRA (`use_dora`): a trained magnitude per output feature over the direction of
//!   `W + s·BA`, its norm detached as PEFT detaches it.
//! * [`get_peft_model`] / [`from_pretrained`] — inject fresh adapters, or load a PEFT adapter folder.
//! * [`LoraModel`] — `save_pretrained`, `merge_adapter` / `unmerge_adapter`, `merge_and_unload`,
//!   `unload`, `trainable_summary`.
//! * [`MultiLoraModel`] — several named adapters on one base: `load_adapter`, `set_adapter`,
//!   `delete_adapter`, `with_adapters_disabled`, adapters per batch row, `hotswap_adapter`,
//!   `add_weighted_adapter` ([`combine`]: PEFT's eleven combination types), multi-adapter
//!   `save_pretrained`.
//!
//! ```no_run
//! use burn::tensor::Device;
//! use peft_lora::{LoraConfig, get_peft_model};
//!
//! let base = peft_models::load("tests/fixtures/models/bloom-tiny", &Device::flex()).unwrap();
//! let lora = get_peft_model(base, LoraConfig { r: 8, ..LoraConfig::default() }).unwrap();
//! println!("{}", lora.trainable_summary());
//! lora.save_pretrained("out/lora").unwrap();
//! ```

pub mod combine;
pub mod config;
pub mod dora;
pub mod init;
pub mod layer;
pub mod model;
pub mod multi;

pub use combine::{Combination, CombinationType, MajoritySign};
pub use config::{InitLoraWeights, LoraBias, LoraConfig};
pub use dora::DoraMagnitude;
pub use layer::{LoraInit, LoraLinear};
pub use model::{Lora, LoraModel, from_pretrained, get_peft_model, save_pretrained_converted};
pub use multi::{DEFAULT_ADAPTER, LoraSet, MultiLoraBase, MultiLoraModel, NamedAdapter};

/// The README's examples, compiled as doc tests (`cargo test -p <crate> --doc`).
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
