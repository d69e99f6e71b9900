//! `PrefixTuningConfig`: PEFT's `adapter_config.json` for prefix tuning.

use peft_core::{
    ConfigHeader, ExpectedSize, ModelSpec, PeftError, PeftType, PromptLearningConfig, Result,
};
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
    /// The sizes every prompt-learning config shares (`num_virtual_tokens`, `token_dim`,
    /// `num_transformer_submodules`, `num_attention_heads`, `num_layers`), flattened: the JSON
    /// keys are PEFT's.
    #[serde(flatten)]
    pub prompt: PromptLearningConfig,
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
        self.prompt.validate(context)?;
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
            prompt: PromptLearningConfig::new(8),
            ..serde_json::from_str("{}").expect("every field has a default")
        }
    }
}

impl PrefixTuningConfig {
    /// Checks that a saved adapter fits `spec` (layers, key/value heads and width).
    pub(crate) fn check_model(&self, spec: &ModelSpec, context: &str) -> Result<()> {
        self.prompt.check_sizes(
            &[
                ExpectedSize::layers(spec.num_layers),
                ExpectedSize::heads(spec.num_kv_heads, "number of key/value heads"),
                ExpectedSize::token_dim(spec.head_dim * spec.num_kv_heads, "key/value width"),
            ],
            &spec.model_type,
            context,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PEFT's file reads into the shared sizes (not into `other`) and writes back to the same
    /// JSON, key for key.
    #[test]
    fn peft_file_round_trips_through_the_shared_sizes() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/adapters/prefix-bloom-proj/adapter_config.json"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let config: PrefixTuningConfig = serde_json::from_str(&text).unwrap();
        assert_eq!(
            config.prompt,
            PromptLearningConfig {
                num_virtual_tokens: 4,
                token_dim: Some(64),
                num_transformer_submodules: Some(1),
                num_attention_heads: Some(4),
                num_layers: Some(2),
            }
        );
        for key in ["num_virtual_tokens", "token_dim", "num_layers"] {
            assert!(!config.other.contains_key(key), "{key} landed in `other`");
        }
        let original: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(serde_json::to_value(&config).unwrap(), original);
    }

    /// A saved size that differs from the model's is refused naming the field and both values.
    #[test]
    fn sizes_of_another_model_are_refused() {
        let mut config = PrefixTuningConfig::default();
        config.prompt.fill_sizes(64, 4, 2);
        let spec = |layers: usize, kv_heads: usize| ModelSpec {
            model_type: "llama".into(),
            vocab_size: 100,
            hidden_size: 64,
            num_layers: layers,
            num_heads: 4,
            num_kv_heads: kv_heads,
            head_dim: 16,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
            pad_token_id: None,
            tie_word_embeddings: false,
        };
        config.check_model(&spec(2, 4), "cfg").unwrap();
        let err = config
            .check_model(&spec(3, 4), "cfg")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cfg: num_layers is 2 but this llama model's number of layers is 3"),
            "{err}"
        );
        let err = config
            .check_model(&spec(2, 2), "cfg")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "num_attention_heads is 4 but this llama model's number of key/value heads is 2"
            ),
            "{err}"
        );
    }
}
