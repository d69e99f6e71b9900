//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong reading or writing a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The checkpoint, adapter or tokenizer files could not be read.
    #[error(transparent)]
    Checkpoint(#[from] peft_tensors::PeftError),
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        error: std::io::Error,
    },
    /// A GGUF file is malformed: truncated, a bad magic number, a length past the end...
    #[error("{path}: invalid GGUF file: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the byte offset where it was found.
        reason: String,
    },
    /// The model's `config.json` lacks a field the export needs, or has one of the wrong type.
    #[error("{path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// The field and what was expected of it.
        reason: String,
    },
    /// The model, adapter or tokenizer is of a kind this exporter does not write.
    #[error("{0}")]
    Unsupported(String),
    /// A checkpoint tensor is not what the architecture needs (shape, dtype, a missing pair).
    #[error("tensor `{name}`: {reason}")]
    Tensor {
        /// The checkpoint's tensor name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl GgufError {
    pub(crate) fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            error,
        }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Config {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn tensor(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Tensor {
            name: name.into(),
            reason: reason.into(),
        }
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, GgufError>;
