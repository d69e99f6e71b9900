//! # peft-tensors
//!
//! Checkpoint tensors for peft-rs, and the error type every peft-rs crate returns:
//!
//! * reading safetensors files, single or sharded, memory-mapped and tensor by tensor
//!   ([`TensorStore`]), values widened to f32 or read as stored;
//! * writing them atomically, sharded past a size limit ([`save_sharded`]), in any float dtype;
//! * [`layout`]: PyTorch's `[out, in]` linear weights as burn's `[in, out]` and back;
//! * [`error`]: [`PeftError`], naming the file, key or field at fault.
//!
//! ```
//! use std::collections::BTreeMap;
//! use peft_tensors::{HostTensor, TensorStore, save_safetensors};
//!
//! let dir = std::env::temp_dir().join(format!("peft-tensors-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("t.safetensors");
//! let mut tensors = BTreeMap::new();
//! tensors.insert("w".to_string(), HostTensor::from_f32(vec![2], &[1.0, 2.0]));
//! save_safetensors(&path, &tensors, None).unwrap();
//! let store = TensorStore::open(&path).unwrap();
//! assert_eq!(store.f32("w").unwrap(), (vec![1.0, 2.0], vec![2]));
//! # std::fs::remove_dir_all(&dir).unwrap();
//! ```

pub mod error;
pub mod layout;
mod tensors;

pub use error::{PeftError, Result};
pub use tensors::*;
