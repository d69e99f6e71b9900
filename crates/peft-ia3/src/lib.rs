//! # peft-ia3
//!
//! IA3: learned scaling of keys, values and feed-forward activations (attachment point (a) of
//! `peft_core::adapter`). Not implemented yet; this crate deliberately exposes no API until it is.
