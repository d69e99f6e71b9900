//! The parts of Hugging Face PEFT's `adapter_config.json` that every method shares, and a lenient
//! reader that accepts keys from newer PEFT versions with a warning instead of failing.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{PeftError, Result};

/// PEFT's `peft_type` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeftType {
    /// Low-rank adaptation.
    #[serde(rename = "LORA")]
    Lora,
    /// Infused adapter by inhibiting and amplifying inner activations.
    #[serde(rename = "IA3")]
    Ia3,
    /// Learned virtual-token embeddings.
    #[serde(rename = "PROMPT_TUNING")]
    PromptTuning,
    /// Virtual tokens re-encoded by an MLP or LSTM.
    #[serde(rename = "P_TUNING")]
    PTuning,
    /// Learned key/value prefixes.
    #[serde(rename = "PREFIX_TUNING")]
    PrefixTuning,
    /// Bias-only fine-tuning (not a PEFT type; peft-rs' own adapter format).
    #[serde(rename = "BITFIT")]
    BitFit,
}

impl PeftType {
    /// Every type peft-rs knows, as written in `adapter_config.json`.
    pub const ALL: [&'static str; 6] = [
        "LORA",
        "IA3",
        "PROMPT_TUNING",
        "P_TUNING",
        "PREFIX_TUNING",
        "BITFIT",
    ];
}

/// PEFT's `target_modules`: a list of names (exact or suffix match), one regex matched against the
/// whole module path, or `"all-linear"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Names; a module matches when its path equals a name or ends with `.name`.
    List(Vec<String>),
    /// A regex that must match the whole module path, or the special value `all-linear`.
    Pattern(String),
}

impl TargetModules {
    /// Whether this is PEFT's `all-linear` shorthand.
    pub fn is_all_linear(&self) -> bool {
        matches!(self, Self::Pattern(p) if p == "all-linear")
    }
}

/// The fields every PEFT adapter config has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigHeader {
    /// Which method the adapter belongs to.
    pub peft_type: PeftType,
    /// PEFT's task type, e.g. `CAUSAL_LM`.
    #[serde(default)]
    pub task_type: Option<String>,
    /// The base model the adapter was trained on.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Whether the adapter was saved for inference (PEFT always writes `true`).
    #[serde(default)]
    pub inference_mode: bool,
}

/// Parses `json` into `T`, calling `on_unknown` with each key `T` does not know.
///
/// PEFT accepts configs from newer versions by dropping unknown keys with a warning; peft-rs does
/// the same, so adapters saved by a newer PEFT still load.
pub fn from_json_lenient<T: DeserializeOwned>(
    json: &str,
    mut on_unknown: impl FnMut(String),
) -> std::result::Result<T, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(json);
    let value = serde_ignored::deserialize(&mut de, |path| on_unknown(path.to_string()))?;
    de.end()?;
    Ok(value)
}

/// Reads an adapter config file into `T`, warning (through `tracing`) about unknown keys.
pub fn read_config<T: DeserializeOwned>(path: impl AsRef<Path>) -> Result<T> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| PeftError::io(path, e))?;
    from_json_lenient(&text, |key| {
        tracing::warn!("{}: unknown key `{key}` ignored", path.display())
    })
    .map_err(|e| PeftError::json(path, e))
}

/// Reads a config file into `T` (leniently, as [`read_config`]) and runs the method's
/// `validate(config, file)` on it.
pub fn read_validated<T: DeserializeOwned>(
    path: impl AsRef<Path>,
    validate: impl FnOnce(&T, &str) -> Result<()>,
) -> Result<T> {
    let path = path.as_ref();
    let config: T = read_config(path)?;
    validate(&config, &path.display().to_string())?;
    Ok(config)
}

/// Reads only the shared header of an adapter config, to learn which method it belongs to.
///
/// An unknown `peft_type` is reported with the list of the types peft-rs implements.
pub fn read_header(path: impl AsRef<Path>) -> Result<ConfigHeader> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| PeftError::io(path, e))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| PeftError::json(path, e))?;
    if let Some(kind) = value.get("peft_type").and_then(|v| v.as_str())
        && !PeftType::ALL.contains(&kind)
    {
        return Err(PeftError::config(
            path.display().to_string(),
            "peft_type",
            format!(
                "unknown type `{kind}` (supported: {})",
                PeftType::ALL.join(", ")
            ),
        ));
    }
    from_json_lenient(&text, |_| {}).map_err(|e| PeftError::json(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Small {
        r: usize,
        #[serde(default)]
        target_modules: Option<TargetModules>,
    }

    #[test]
    fn unknown_keys_are_reported_not_fatal() {
        let mut unknown = Vec::new();
        let cfg: Small = from_json_lenient(
            r#"{"r": 4, "target_modules": ["q_proj", "v_proj"], "future_field": 1}"#,
            |k| unknown.push(k),
        )
        .unwrap();
        assert_eq!(cfg.r, 4);
        assert_eq!(
            cfg.target_modules,
            Some(TargetModules::List(vec!["q_proj".into(), "v_proj".into()]))
        );
        assert_eq!(unknown, vec!["future_field".to_string()]);
    }

    #[test]
    fn target_modules_accepts_a_string() {
        let cfg: Small =
            from_json_lenient(r#"{"r": 1, "target_modules": "all-linear"}"#, |_| {}).unwrap();
        assert!(cfg.target_modules.unwrap().is_all_linear());
    }

    #[test]
    fn header_rejects_unknown_peft_type_with_the_supported_list() {
        let dir = std::env::temp_dir().join(format!("peft-core-hdr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("adapter_config.json");
        std::fs::write(&path, r#"{"peft_type": "VERA", "r": 4}"#).unwrap();
        let err = read_header(&path).unwrap_err().to_string();
        assert!(err.contains("unknown type `VERA`"), "{err}");
        assert!(err.contains("LORA, IA3"), "{err}");
        std::fs::write(&path, r#"{"peft_type": "LORA", "task_type": "CAUSAL_LM"}"#).unwrap();
        let header = read_header(&path).unwrap();
        assert_eq!(header.peft_type, PeftType::Lora);
        assert_eq!(header.task_type.as_deref(), Some("CAUSAL_LM"));
        std::fs::write(&path, "{not json").unwrap();
        let err = read_header(&path).unwrap_err().to_string();
        assert!(err.contains("adapter_config.json: invalid JSON"), "{err}");
    }
}
