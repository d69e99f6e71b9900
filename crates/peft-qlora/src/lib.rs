//! # peft-qlora
//!
//! QLoRA: LoRA over a frozen 4-bit base, de-quantised on the fly. Not implemented yet; this crate
//! deliberately exposes no API until it is.
