//! # peft-prompt
//!
//! Prompt tuning: learned virtual-token embeddings prepended to the input (attachment point (b) of
//! `peft_core::adapter`). Not implemented yet; this crate deliberately exposes no API until it is.
