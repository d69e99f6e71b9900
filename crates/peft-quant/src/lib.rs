//! # peft-quant
//!
//! 4-bit NF4 / FP4 block quantisation in bitsandbytes' layout. Not implemented yet; this crate
//! deliberately exposes no API until it is.
