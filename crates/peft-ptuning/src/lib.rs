//! # peft-ptuning
//!
//! P-tuning: virtual tokens re-encoded by an MLP or a bidirectional LSTM (attachment point (b) of
//! `peft_core::adapter`). Not implemented yet; this crate deliberately exposes no API until it is.
