//! The JSON files the exporter and importer read and write (`config.json`,
//! `adapter_config.json`, the tokenizer files), with the file named in every error.

use std::path::Path;

use serde_json::Value as Json;

use crate::error::{GgufError, Result};

/// The JSON file at `path`; a missing file is an I/O error naming it.
pub(crate) fn read(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|e| GgufError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| GgufError::config(path, format!("invalid JSON: {e}")))
}

/// The JSON file at `path`, or `None` where there is no such file.
pub(crate) fn read_optional(path: &Path) -> Result<Option<Json>> {
    if !path.is_file() {
        return Ok(None);
    }
    read(path).map(Some)
}

/// Writes `value` (pretty-printed) to `path` atomically.
pub(crate) fn write(path: &Path, value: &Json) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| GgufError::config(path, format!("cannot serialise: {e}")))?;
    peft_tensors::write_atomic(path, text.as_bytes()).map_err(GgufError::from)
}
