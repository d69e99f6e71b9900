//! `LoHaConfig`: PEFT's `adapter_config.json` for LoHa, field for field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use peft_core::modules::{LayerIndices, LayersPattern, check_pattern_keys, pattern_value};
use peft_core::{ConfigHeader, PeftError, PeftType, Result, TargetModules};

/// PEFT's `LoHaConfig` (a `LycorisConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LohaConfig {
    /// PEFT's shared fields (`peft_type` = `LOHA`, `task_type`,
    /// `base_model_name_or_path`, `inference_mode`).
    #[serde(flatten)]
    pub header: ConfigHeader<LohaConfig>,
    /// Rank of each of the two low-rank products.
    #[serde(default = "eight")]
    pub r: usize,
    /// Scale numerator: the update is multiplied by `alpha / r`.
    #[serde(default = "eight_f")]
    pub alpha: f64,
    /// Probability of dropping each output row of the update during training (the kept rows
    /// rescaled by the share kept, as PEFT does).
    #[serde(default)]
    pub rank_dropout: f64,
    /// Probability of skipping the whole adapter of a layer in a training forward pass.
    #[serde(default)]
    pub module_dropout: f64,
    /// FedPara's effective decomposition of convolutions; these decoders have none, so it has
    /// no effect (PEFT ignores it for linear layers too).
    #[serde(default)]
    pub use_effective_conv2d: bool,
    /// Modules to adapt; `None` = PEFT's default for the architecture (LoRA's).
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// `true`: `hada_w2_b` starts at zero, so the adapter starts as a no-op; `false`: every
    /// factor random (for tests).
    #[serde(default = "yes")]
    pub init_weights: bool,
    /// Only these layer indices are adapted.
    #[serde(default)]
    pub layers_to_transform: Option<LayerIndices>,
    /// The name of the layer list, for `layers_to_transform`.
    #[serde(default)]
    pub layers_pattern: Option<LayersPattern>,
    /// Per-module rank overrides (pattern → r).
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides (pattern → alpha).
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Modules trained in full and saved with the adapter.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Everything else PEFT writes, kept so that a loaded config saves back unchanged.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

fn eight() -> usize {
    8
}
fn eight_f() -> f64 {
    8.0
}
fn yes() -> bool {
    true
}

/// PEFT keys with no effect on the computation.
const HARMLESS: &[&str] = &["peft_version", "auto_mapping", "revision"];

impl peft_core::MethodConfig for LohaConfig {
    const NAME: &'static str = "LoHaConfig";
    const PEFT_TYPE: PeftType = PeftType::Loha;

    /// PEFT's checks (a positive rank, `layers_pattern` only with `layers_to_transform`) and the
    /// ranges of the dropouts.
    fn validate(&self, context: &str) -> Result<()> {
        let bad = |field: &str, reason: String| Err(PeftError::config(context, field, reason));
        self.header.check(context)?;
        if self.r == 0 {
            return bad(
                "r",
                "`r` should be a positive integer value but the value passed is 0".into(),
            );
        }
        if let Some((k, _)) = self.rank_pattern.iter().find(|(_, r)| **r == 0) {
            return bad("rank_pattern", format!("rank 0 for `{k}`"));
        }
        for (field, p) in [
            ("rank_dropout", self.rank_dropout),
            ("module_dropout", self.module_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(field, format!("must be in [0, 1), got {p}"));
            }
        }
        if !self.alpha.is_finite() {
            return bad("alpha", "must be finite".into());
        }
        if self.layers_pattern.is_some() && self.layers_to_transform.is_none() {
            return bad(
                "layers_pattern",
                "When `layers_pattern` is specified, `layers_to_transform` must also be \
                 specified."
                    .into(),
            );
        }
        check_pattern_keys(context, "rank_pattern", self.rank_pattern.keys())?;
        check_pattern_keys(context, "alpha_pattern", self.alpha_pattern.keys())?;
        for key in self.other.keys() {
            if !HARMLESS.contains(&key.as_str()) {
                tracing::warn!("{context}: unknown key `{key}` ignored");
            }
        }
        Ok(())
    }
}

impl Default for LohaConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

impl LohaConfig {
    /// The targets: the configured ones, or PEFT's default for `model_type` (LoHa copies
    /// LoRA's table).
    pub fn targets(&self, model_type: &str) -> Result<TargetModules> {
        match &self.target_modules {
            Some(t) => Ok(t.clone()),
            None => peft_core::modules::lora_family_targets("LoHaConfig", model_type),
        }
    }

    /// `(r, alpha)` for the module at `path`, after `rank_pattern` / `alpha_pattern`.
    pub fn rank_and_alpha(&self, path: &str) -> (usize, f64) {
        let r = pattern_value(&self.rank_pattern, path).unwrap_or(self.r);
        let alpha = pattern_value(&self.alpha_pattern, path).unwrap_or(self.alpha);
        (r, alpha)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peft_core::MethodConfig;

    #[test]
    fn defaults_are_pefts() {
        let c = LohaConfig::default();
        assert_eq!(
            (c.r, c.alpha, c.rank_dropout, c.module_dropout),
            (8, 8.0, 0.0, 0.0)
        );
        assert!(c.init_weights);
        assert_eq!(
            c.targets("llama").unwrap(),
            TargetModules::List(vec!["q_proj".into(), "v_proj".into()])
        );
        let err = c.targets("phi3").unwrap_err().to_string();
        assert!(err.contains("no default for model_type `phi3`"), "{err}");
    }

    #[test]
    fn patterns_pick_rank_and_alpha_by_suffix() {
        let c = LohaConfig::from_json(
            r#"{"r": 4, "alpha": 8, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"layers\\.1\\..*q_proj": 3}}"#,
            "cfg",
        )
        .unwrap();
        assert_eq!(
            c.rank_and_alpha("model.layers.0.self_attn.v_proj"),
            (2, 8.0)
        );
        assert_eq!(
            c.rank_and_alpha("model.layers.1.self_attn.q_proj"),
            (4, 3.0)
        );
        assert_eq!(
            c.rank_and_alpha("model.layers.0.self_attn.q_proj"),
            (4, 8.0)
        );
    }

    #[test]
    fn bad_values_are_refused_naming_the_key() {
        let err = |json: &str| LohaConfig::from_json(json, "cfg").unwrap_err().to_string();
        assert_eq!(
            err(r#"{"r": 0}"#),
            "cfg: invalid `r`: `r` should be a positive integer value but the value passed is 0"
        );
        assert_eq!(
            err(r#"{"rank_dropout": 1.0}"#),
            "cfg: invalid `rank_dropout`: must be in [0, 1), got 1"
        );
        assert!(err(r#"{"rank_pattern": {"(v": 2}}"#).contains("invalid regex `(v`"));
        assert_eq!(
            err(r#"{"peft_type": "LORA"}"#),
            "cfg: invalid `peft_type`: expected LOHA, found LORA"
        );
        assert!(err(r#"{"layers_pattern": "layers"}"#).contains("`layers_to_transform` must"));
    }
}
