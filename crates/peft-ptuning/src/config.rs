//! `PromptEncoderConfig`: PEFT's `adapter_config.json` for P-tuning.

use peft_core::{ConfigHeader, PeftError, PeftType, PromptLearningConfig, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// PEFT's `encoder_reparameterization_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum EncoderType {
    /// Three linear layers with ReLU.
    #[default]
    #[serde(rename = "MLP")]
    Mlp,
    /// A bidirectional LSTM and two linear layers.
    #[serde(rename = "LSTM")]
    Lstm,
}

/// PEFT's `PromptEncoderConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptEncoderConfig {
    /// PEFT's shared fields (`peft_type` = `P_TUNING`, `task_type`,
    /// `base_model_name_or_path`, `inference_mode`).
    #[serde(flatten)]
    pub header: ConfigHeader<PromptEncoderConfig>,
    /// The sizes every prompt-learning config shares (`num_virtual_tokens`, `token_dim`,
    /// `num_transformer_submodules`, `num_attention_heads`, `num_layers`), flattened: the JSON
    /// keys are PEFT's.
    #[serde(flatten)]
    pub prompt: PromptLearningConfig,
    /// MLP or LSTM.
    #[serde(default)]
    pub encoder_reparameterization_type: EncoderType,
    /// Hidden width of the encoder (default: the model's hidden size).
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    /// LSTM layers (ignored for the MLP, as in PEFT).
    #[serde(default = "two")]
    pub encoder_num_layers: usize,
    /// Dropout between LSTM layers.
    #[serde(default)]
    pub encoder_dropout: f64,
    /// Everything else PEFT writes.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

fn two() -> usize {
    2
}

impl peft_core::MethodConfig for PromptEncoderConfig {
    const NAME: &'static str = "PromptEncoderConfig";
    const PEFT_TYPE: PeftType = PeftType::PTuning;

    /// Checks the values.
    fn validate(&self, context: &str) -> Result<()> {
        let bad = |field: &str, reason: &str| Err(PeftError::config(context, field, reason));
        self.header.check(context)?;
        self.prompt.validate(context)?;
        if self.encoder_hidden_size == Some(0) || self.encoder_num_layers == 0 {
            return bad(
                "encoder_hidden_size / encoder_num_layers",
                "must be at least 1",
            );
        }
        if !(0.0..1.0).contains(&self.encoder_dropout) {
            return bad("encoder_dropout", "must be in [0, 1)");
        }
        if self.encoder_reparameterization_type == EncoderType::Mlp && self.encoder_num_layers != 2
        {
            tracing::warn!(
                "{context}: for MLP, encoder_num_layers is ignored; exactly 3 MLP layers are used (as PEFT)"
            );
        }
        Ok(())
    }
}

impl Default for PromptEncoderConfig {
    fn default() -> Self {
        Self {
            prompt: PromptLearningConfig::new(8),
            ..serde_json::from_str("{}").expect("every field has a default")
        }
    }
}
