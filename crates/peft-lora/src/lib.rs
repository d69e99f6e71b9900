//! # peft-lora
//!
//! LoRA. Not implemented yet; this crate deliberately exposes no API until it is.
