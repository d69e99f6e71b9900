//! The one error type of peft-rs' library crates.

use std::path::PathBuf;

/// Everything that can go wrong when loading, adapting, running or saving a model.
///
/// Each variant names the file, key or field at fault so that a user can fix the input without
/// reading code.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error (part of the message, so not chained as a source).
        error: std::io::Error,
    },
    /// A JSON file is not valid JSON or does not have the expected fields.
    #[error("{path}: invalid JSON: {error}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error, with line and column.
        error: serde_json::Error,
    },
    /// A safetensors file is malformed (truncated, bad header, offsets out of range...).
    #[error("{path}: invalid safetensors file: {reason}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the safetensors parser reported.
        reason: String,
    },
    /// A tensor the model or adapter needs is not in the checkpoint.
    #[error("{path}: missing tensor `{key}`")]
    MissingTensor {
        /// The file (or index) searched.
        path: PathBuf,
        /// The tensor name.
        key: String,
    },
    /// A tensor has another shape than the model expects.
    #[error("{path}: tensor `{key}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        key: String,
        /// The shape the model needs.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor is stored in a dtype peft-rs does not read for that purpose.
    #[error("{path}: tensor `{key}` has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        key: String,
        /// The dtype in the file.
        dtype: String,
    },
    /// A configuration value is out of range or inconsistent.
    #[error("{context}: invalid `{field}`: {reason}")]
    InvalidConfig {
        /// The file or config the field belongs to.
        context: String,
        /// The field name.
        field: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The model type in config.json is not one peft-rs implements.
    #[error("{path}: unsupported model_type `{model_type}` (supported: {supported})")]
    UnsupportedModel {
        /// The config file.
        path: PathBuf,
        /// The model type found.
        model_type: String,
        /// The model types that are supported, comma-separated.
        supported: String,
    },
    /// `target_modules` matched no module of the model.
    #[error(
        "target modules {targets} not found in the base model; its modules are: {}",
        available.join(", ")
    )]
    TargetModulesNotFound {
        /// The targets as the user wrote them.
        targets: String,
        /// The module paths the model has.
        available: Vec<String>,
    },
    /// A regular expression in a config does not compile.
    #[error("invalid regex `{pattern}` in `{field}`: {reason}")]
    InvalidRegex {
        /// The config field.
        field: String,
        /// The pattern.
        pattern: String,
        /// The regex compiler's message.
        reason: String,
    },
    /// The tokenizer could not be loaded or failed to encode or decode.
    #[error("{path}: tokenizer error: {reason}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// The tokenizers crate's message.
        reason: String,
    },
    /// Tensors given to a forward pass have inconsistent shapes.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// An adapter does not fit the model it is applied to.
    #[error("adapter does not fit the model: {0}")]
    AdapterMismatch(String),
    /// A named adapter was asked for that the model does not hold.
    #[error("no adapter named `{name}` (loaded: {loaded})")]
    UnknownAdapter {
        /// The name asked for.
        name: String,
        /// The names the model holds, comma-separated.
        loaded: String,
    },
    /// A requested feature is recognised but not implemented yet.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// A 4-bit tensor could not be quantised, read or de-quantised (the message names it).
    #[error("4-bit quantisation: {0}")]
    Quantization(String),
}

/// The result type of peft-rs' library crates.
pub type Result<T, E = PeftError> = std::result::Result<T, E>;

impl PeftError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            error: source,
        }
    }

    /// Wraps a JSON error with the path it concerns.
    pub fn json(path: impl Into<PathBuf>, source: serde_json::Error) -> Self {
        Self::Json {
            path: path.into(),
            error: source,
        }
    }

    /// An [`PeftError::InvalidConfig`] error.
    pub fn config(
        context: impl Into<String>,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self::InvalidConfig {
            context: context.into(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}
