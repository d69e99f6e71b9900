//! The errors of quantisation and of reading bitsandbytes' 4-bit layout.

use thiserror::Error;

/// What can go wrong quantising, de-quantising or reading a 4-bit tensor.
#[derive(Debug, Error)]
pub enum QuantError {
    /// The block size is not one bitsandbytes accepts.
    #[error("invalid blocksize {0}: must be a power of two from 32 to 4096")]
    InvalidBlocksize(usize),
    /// A quant type other than `nf4` / `fp4`.
    #[error("unknown quant_type `{0}` (expected `nf4` or `fp4`)")]
    UnknownQuantType(String),
    /// A source dtype other than float32 / bfloat16 / float16.
    #[error(
        "unsupported dtype `{0}` for 4-bit quantisation (expected float32, bfloat16 or float16)"
    )]
    UnsupportedDtype(String),
    /// A stored component does not have the size the layout requires.
    #[error("`{name}`: {what} has {found} elements, expected {expected}")]
    SizeMismatch {
        /// The tensor (Hugging Face name).
        name: String,
        /// Which component.
        what: &'static str,
        /// What the file holds.
        found: usize,
        /// What the shape and block size require.
        expected: usize,
    },
    /// The `quant_state.bitsandbytes__*` JSON is malformed.
    #[error("`{name}`: invalid quant_state: {reason}")]
    InvalidQuantState {
        /// The tensor (Hugging Face name).
        name: String,
        /// Why.
        reason: String,
    },
    /// A component of the layout is missing from the file.
    #[error("`{name}`: missing `{key}` for a 4-bit tensor")]
    MissingComponent {
        /// The tensor (Hugging Face name).
        name: String,
        /// The missing key.
        key: String,
    },
}

/// `Result` with [`QuantError`].
pub type Result<T> = std::result::Result<T, QuantError>;

impl From<QuantError> for peft_tensors::PeftError {
    fn from(error: QuantError) -> Self {
        peft_tensors::PeftError::Quantization(error.to_string())
    }
}
