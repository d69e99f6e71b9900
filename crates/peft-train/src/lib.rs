//! # peft-train
//!
//! The training side of peft-rs, the same for every method:
//!
//! * [`data`] — JSONL / JSON data in the alpaca, chat and plain-text shapes, the seed tutorial's
//!   chat template, label masking (loss on the response only), truncation, dynamic padding, a
//!   seeded held-out split; errors name the file and line.
//! * [`trainer`] — AdamW with warm-up and constant / linear / cosine schedules, gradient
//!   accumulation, global gradient-norm clipping, `metrics.jsonl`, atomic `checkpoint-N` folders
//!   (PEFT adapter + exact trainable state + optimizer state) and exact resumption.
//!
//! The loop knows a method only through [`peft_core::AdapterModel`].

pub mod data;
pub mod distributed;
pub mod error;
pub mod plot;
pub mod trainer;

pub use data::{DataError, Example, Tokenized, read_examples, split, tokenize_all};
pub use distributed::{Collective, SingleProcess, ThreadRanks};
pub use error::TrainError;
pub use trainer::{
    DataFingerprint, Event, Resume, RunSources, Schedule, TrainConfig, TrainSummary, evaluate,
    fingerprint_file, inject_nonfinite_gradient_at, load_checkpoint_into, request_stop, train,
    train_distributed,
};
