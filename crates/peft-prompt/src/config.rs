//! `PromptTuningConfig`: PEFT's `adapter_config.json` for prompt tuning.

use peft_core::{ConfigHeader, PeftError, PeftType, PromptLearningConfig, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// PEFT's `prompt_tuning_init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PromptTuningInit {
    /// N(0, 1), as `nn.Embedding`.
    #[default]
    #[serde(rename = "RANDOM")]
    Random,
    /// Rows of the embedding table for the tokens of `prompt_tuning_init_text`.
    #[serde(rename = "TEXT")]
    Text,
    /// Rows of the embedding table for random vocabulary tokens.
    #[serde(rename = "SAMPLE_VOCAB")]
    SampleVocab,
}

/// PEFT's `PromptTuningConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptTuningConfig {
    /// PEFT's shared fields (`peft_type` = `PROMPT_TUNING`, `task_type`,
    /// `base_model_name_or_path`, `inference_mode`).
    #[serde(flatten)]
    pub header: ConfigHeader<PromptTuningConfig>,
    /// The sizes every prompt-learning config shares (`num_virtual_tokens`, `token_dim`,
    /// `num_transformer_submodules`, `num_attention_heads`, `num_layers`), flattened: the JSON
    /// keys are PEFT's.
    #[serde(flatten)]
    pub prompt: PromptLearningConfig,
    /// How the table starts.
    #[serde(default)]
    pub prompt_tuning_init: PromptTuningInit,
    /// The text of `TEXT` init.
    #[serde(default)]
    pub prompt_tuning_init_text: Option<String>,
    /// The tokenizer of `TEXT` init (peft-rs uses the tokenizer it is given).
    #[serde(default)]
    pub tokenizer_name_or_path: Option<String>,
    /// Everything else PEFT writes.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

impl peft_core::MethodConfig for PromptTuningConfig {
    const NAME: &'static str = "PromptTuningConfig";
    const PEFT_TYPE: PeftType = PeftType::PromptTuning;

    /// Checks the values.
    fn validate(&self, context: &str) -> Result<()> {
        let bad = |field: &str, reason: &str| Err(PeftError::config(context, field, reason));
        self.header.check(context)?;
        self.prompt.validate(context)?;
        if self.prompt_tuning_init == PromptTuningInit::Text
            && self
                .prompt_tuning_init_text
                .as_deref()
                .is_none_or(str::is_empty)
        {
            return bad(
                "prompt_tuning_init_text",
                "TEXT init needs a non-empty prompt_tuning_init_text",
            );
        }
        Ok(())
    }
}

impl Default for PromptTuningConfig {
    fn default() -> Self {
        Self {
            prompt: PromptLearningConfig::new(8),
            ..serde_json::from_str("{}").expect("every field has a default")
        }
    }
}
