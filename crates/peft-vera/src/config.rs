//! `VeraConfig`: PEFT's `adapter_config.json` for VeRA, field for field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use peft_core::modules::{LayerIndices, LayersPattern};
use peft_core::{ConfigHeader, PeftError, PeftType, Result, TargetModules};

/// PEFT's `VeraConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VeraConfig {
    /// PEFT's shared fields (`peft_type` = `VERA`, `task_type`, `base_model_name_or_path`,
    /// `inference_mode`).
    #[serde(flatten)]
    pub header: ConfigHeader<VeraConfig>,
    /// The projections' inner dimension (PEFT's default 256: VeRA trains `r + out` numbers per
    /// layer whatever `r` is).
    #[serde(default = "two_fifty_six")]
    pub r: usize,
    /// Modules to adapt; `None` = PEFT's default for the architecture (LoRA's table).
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// Seed of the `torch.Generator` the shared projections are drawn from.
    #[serde(default)]
    pub projection_prng_key: u64,
    /// Whether the folder carries `vera_A` / `vera_B` (else they are drawn again from the key).
    #[serde(default = "yes")]
    pub save_projection: bool,
    /// Dropout on the layer's input before the projections.
    #[serde(default)]
    pub vera_dropout: f64,
    /// The starting value of every `vera_lambda_d` entry.
    #[serde(default = "point_one")]
    pub d_initial: f64,
    /// GPT-2's `Conv1D` layout; these decoders have none, so it must be false.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Biases trained beside the adapter: only `"none"` here.
    #[serde(default = "none")]
    pub bias: String,
    /// Modules trained in full and saved with the adapter.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// `true`: `vera_lambda_b` zero (a no-op start), `vera_lambda_d` = `d_initial`; `false`:
    /// `vera_lambda_b` ones and `vera_lambda_d` standard normal (for tests).
    #[serde(default = "yes")]
    pub init_weights: bool,
    /// Only these layer indices are adapted.
    #[serde(default)]
    pub layers_to_transform: Option<LayerIndices>,
    /// The name of the layer list, for `layers_to_transform`.
    #[serde(default)]
    pub layers_pattern: Option<LayersPattern>,
    /// Everything else PEFT writes, kept so that a loaded config saves back unchanged.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

fn two_fifty_six() -> usize {
    256
}
fn yes() -> bool {
    true
}
fn point_one() -> f64 {
    0.1
}
fn none() -> String {
    "none".into()
}

/// PEFT keys with no effect on the computation.
const HARMLESS: &[&str] = &["peft_version", "auto_mapping", "revision"];

impl peft_core::MethodConfig for VeraConfig {
    const NAME: &'static str = "VeraConfig";
    const PEFT_TYPE: PeftType = PeftType::Vera;

    /// PEFT's checks (a positive rank, `layers_pattern` only with `layers_to_transform`), the
    /// dropout's range, and what this implementation leaves out said by name.
    fn validate(&self, context: &str) -> Result<()> {
        let bad = |field: &str, reason: String| Err(PeftError::config(context, field, reason));
        self.header.check(context)?;
        if self.r == 0 {
            return bad(
                "r",
                "`r` should be a positive integer value but the value passed is 0".into(),
            );
        }
        if !(0.0..1.0).contains(&self.vera_dropout) {
            return bad(
                "vera_dropout",
                format!("must be in [0, 1), got {}", self.vera_dropout),
            );
        }
        if !self.d_initial.is_finite() {
            return bad("d_initial", "must be finite".into());
        }
        if self.fan_in_fan_out {
            return bad(
                "fan_in_fan_out",
                "GPT-2's Conv1D layout; these models' linear layers are [out, in]".into(),
            );
        }
        if self.bias != "none" {
            return bad(
                "bias",
                format!(
                    "`{}`: training biases beside VeRA is not supported here; use \"none\"",
                    self.bias
                ),
            );
        }
        if self.layers_pattern.is_some() && self.layers_to_transform.is_none() {
            return bad(
                "layers_pattern",
                "When `layers_pattern` is specified, `layers_to_transform` must also be \
                 specified."
                    .into(),
            );
        }
        for key in self.other.keys() {
            if !HARMLESS.contains(&key.as_str()) {
                tracing::warn!("{context}: unknown key `{key}` ignored");
            }
        }
        Ok(())
    }
}

impl Default for VeraConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

impl VeraConfig {
    /// The targets: the configured ones, or PEFT's default for `model_type` (VeRA copies
    /// LoRA's table).
    pub fn targets(&self, model_type: &str) -> Result<TargetModules> {
        match &self.target_modules {
            Some(t) => Ok(t.clone()),
            None => peft_core::modules::lora_family_targets("VeraConfig", model_type),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peft_core::MethodConfig;

    #[test]
    fn defaults_are_pefts() {
        let c = VeraConfig::default();
        assert_eq!((c.r, c.projection_prng_key, c.d_initial), (256, 0, 0.1));
        assert!(c.save_projection && c.init_weights);
        assert_eq!(c.vera_dropout, 0.0);
        assert_eq!(
            c.targets("bloom").unwrap(),
            TargetModules::List(vec!["query_key_value".into()])
        );
    }

    #[test]
    fn bad_values_are_refused_naming_the_key() {
        let err = |json: &str| VeraConfig::from_json(json, "cfg").unwrap_err().to_string();
        assert_eq!(
            err(r#"{"r": 0}"#),
            "cfg: invalid `r`: `r` should be a positive integer value but the value passed is 0"
        );
        assert_eq!(
            err(r#"{"vera_dropout": 1.5}"#),
            "cfg: invalid `vera_dropout`: must be in [0, 1), got 1.5"
        );
        assert!(err(r#"{"bias": "all"}"#).contains("invalid `bias`"));
        assert!(err(r#"{"fan_in_fan_out": true}"#).contains("Conv1D"));
        assert_eq!(
            err(r#"{"peft_type": "LORA"}"#),
            "cfg: invalid `peft_type`: expected VERA, found LORA"
        );
    }
}
