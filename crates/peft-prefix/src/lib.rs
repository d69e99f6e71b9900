//! # peft-prefix
//!
//! Prefix tuning: learned key/value prefixes in every attention layer (attachment point (c) of
//! `peft_core::adapter`). Not implemented yet; this crate deliberately exposes no API until it is.
