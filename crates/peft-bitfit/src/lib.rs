//! # peft-bitfit
//!
//! BitFit: fine-tune only the bias terms of a model. Not implemented yet (issue "peft-ia3 and
//! peft-bitfit"); this crate deliberately exposes no API until it is.
