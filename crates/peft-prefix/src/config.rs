//! `PrefixTuningConfig`: PEFT's `adapter_config.json` for prefix tuning.

use peft_core::{ConfigHeader, ModelSpec, PeftError, PeftType, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// PEFT's `PrefixTuningConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefixTuningConfig {
    /// PEFT's shared fields (`peft_type` = `PREFIX_TUNING`, `task_type`,
    /// `base_model_name_or_path`, `inference_mode`).
    #[serde(flatten)]
    pub header: ConfigHeader<PrefixTuningConfig>,
    /// Prefix length.
    #[serde(default)]
    pub num_virtual_tokens: usize,
    /// Key/value width per layer (`head_dim · kv_heads`), filled in from the model.
    #[serde(default)]
    pub token_dim: Option<usize>,
    /// 1 for decoder-only models.
    #[serde(default)]
    pub num_transformer_submodules: Option<usize>,
    /// Key/value heads, filled in from the model.
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    /// Layers, filled in from the model.
    #[serde(default)]
    pub num_layers: Option<usize>,
    /// Hidden width of the projection MLP.
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    /// Compute the table with an MLP.
    #[serde(default)]
    pub prefix_projection: bool,
    /// Everything else PEFT writes.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

impl peft_core::MethodConfig for PrefixTuningConfig {
    const NAME: &'static str = "PrefixTuningConfig";
    const PEFT_TYPE: PeftType = PeftType::PrefixTuning;

    /// Checks the values.
    fn validate(&self, context: &str) -> Result<()> {
        let bad = |field: &str, reason: &str| Err(PeftError::config(context, field, reason));
        self.header.check(context)?;
        if self.num_virtual_tokens == 0 {
            return bad("num_virtual_tokens", "must be at least 1");
        }
        if self.num_transformer_submodules.is_some_and(|n| n != 1) {
            return bad(
                "num_transformer_submodules",
                "only 1 (decoder-only models) is supported",
            );
        }
        if self.prefix_projection && self.encoder_hidden_size.is_none_or(|h| h == 0) {
            return bad(
                "encoder_hidden_size",
                "prefix_projection needs a positive encoder_hidden_size",
            );
        }
        Ok(())
    }
}

impl Default for PrefixTuningConfig {
    fn default() -> Self {
        Self {
            num_virtual_tokens: 8,
            ..serde_json::from_str("{}").expect("every field has a default")
        }
    }
}

impl PrefixTuningConfig {
    /// Checks that a saved adapter fits `spec` (layers, key/value heads and width).
    pub(crate) fn check_model(&self, spec: &ModelSpec, context: &str) -> Result<()> {
        let kv_dim = spec.head_dim * spec.num_kv_heads;
        let expected = [
            ("num_layers", self.num_layers, spec.num_layers),
            (
                "num_attention_heads",
                self.num_attention_heads,
                spec.num_kv_heads,
            ),
            ("token_dim", self.token_dim, kv_dim),
        ];
        for (field, found, want) in expected {
            if let Some(found) = found
                && found != want
            {
                return Err(PeftError::AdapterMismatch(format!(
                    "{context}: {field} is {found} but this {} model has {want} (adapter for another model?)",
                    spec.model_type
                )));
            }
        }
        Ok(())
    }
}
