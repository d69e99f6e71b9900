//! `BitFitConfig`: BitFit's `adapter_config.json` (peft-rs' own type, built like PEFT's).

use peft_core::MethodConfig;
use peft_core::{ConfigHeader, PeftType, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// BitFit's adapter config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BitFitConfig {
    /// PEFT's shared fields (`peft_type` = `BITFIT`, `task_type`,
    /// `base_model_name_or_path`, `inference_mode`).
    #[serde(flatten)]
    pub header: ConfigHeader<BitFitConfig>,
    /// Only biases whose HF name matches this regex (anywhere in the name) train, e.g.
    /// `self_attention` for attention biases only; `None` = every bias.
    #[serde(default)]
    pub bias_pattern: Option<String>,
    /// Keys this version does not know (from a newer peft-rs), warned about when the config is
    /// used and kept so that it saves back unchanged.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

impl MethodConfig for BitFitConfig {
    const PEFT_TYPE: PeftType = PeftType::BitFit;
    const NAME: &'static str = "BitFitConfig";

    /// Checks `peft_type` and warns about keys this version does not know; `bias_pattern` is
    /// checked when it is compiled.
    fn validate(&self, context: &str) -> Result<()> {
        self.header.check(context)?;
        for key in self.other.keys() {
            tracing::warn!("{context}: unknown key `{key}` ignored");
        }
        Ok(())
    }
}

impl Default for BitFitConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}
