//! `AdaLoraConfig`: PEFT's `adapter_config.json` for AdaLoRA, field for field. PEFT's
//! `AdaLoraConfig` extends `LoraConfig`; the LoRA keys AdaLoRA's layers read are fields here,
//! the others are kept in `other` (and refused where they would change the computation).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use peft_core::modules::{LayerIndices, LayersPattern};
use peft_core::{ConfigHeader, PeftError, PeftType, Result, TargetModules};

/// PEFT's `AdaLoraConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaLoraConfig {
    /// PEFT's shared fields (`peft_type` = `ADALORA`, `task_type`, `base_model_name_or_path`,
    /// `inference_mode`).
    #[serde(flatten)]
    pub header: ConfigHeader<AdaLoraConfig>,
    /// The rank every layer starts with (`lora_A: [init_r, in]`, `lora_E: [init_r, 1]`,
    /// `lora_B: [out, init_r]`).
    #[serde(default = "twelve")]
    pub init_r: usize,
    /// The average rank the budget ends at.
    #[serde(default = "eight")]
    pub target_r: usize,
    /// Steps before the budget starts to shrink.
    #[serde(default)]
    pub tinit: usize,
    /// Steps at the end with the final ranks fixed.
    #[serde(default)]
    pub tfinal: usize,
    /// Steps between two re-allocations (PEFT's `deltaT`).
    #[serde(default = "one", rename = "deltaT")]
    pub delta_t: usize,
    /// EMA factor of the sensitivity.
    #[serde(default = "point_eight_five")]
    pub beta1: f64,
    /// EMA factor of the uncertainty.
    #[serde(default = "point_eight_five")]
    pub beta2: f64,
    /// Weight of the orthogonality penalty `‖PᵀP − I‖ + ‖QQᵀ − I‖` added to the loss.
    #[serde(default = "point_five")]
    pub orth_reg_weight: f64,
    /// The training's total steps (PEFT requires it, > 0).
    #[serde(default)]
    pub total_step: Option<usize>,
    /// The ranks the allocator kept, per layer (`<path>.lora_E` → one flag per initial rank),
    /// as PEFT writes it after training; the saved tensors hold the kept ranks only.
    #[serde(default)]
    pub rank_pattern: Option<BTreeMap<String, Vec<bool>>>,
    /// LoRA's `r`: PEFT ignores it for AdaLoRA (kept so the file saves back unchanged).
    #[serde(default = "eight")]
    pub r: usize,
    /// The update's scale numerator: `ΔW = B·(A ⊙ E) · lora_alpha / (ranknum + 1e-5)` (`init_r`
    /// or, where `lora_alpha` ≤ 0, the layer's rank in place of `lora_alpha`).
    #[serde(default = "eight_f")]
    pub lora_alpha: f64,
    /// Dropout on the layer's input before `lora_A`.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Modules to adapt; `None` = PEFT's default for the architecture.
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// GPT-2's `Conv1D` layout; these decoders have none, so it must be false.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Biases trained beside the adapter: only `"none"` here.
    #[serde(default = "none")]
    pub bias: String,
    /// Modules trained in full and saved with the adapter.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// `true`: `E` zero and `A`, `B` normal with std 0.02 (the adapter starts as a no-op);
    /// `false`: all three standard normal.
    #[serde(default = "yes")]
    pub init_lora_weights: bool,
    /// Only these layer indices are adapted.
    #[serde(default)]
    pub layers_to_transform: Option<LayerIndices>,
    /// The name of the layer list, for `layers_to_transform`.
    #[serde(default)]
    pub layers_pattern: Option<LayersPattern>,
    /// Everything else PEFT writes (the LoRA keys AdaLoRA does not read), kept so that a loaded
    /// config saves back unchanged.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

fn twelve() -> usize {
    12
}
fn eight() -> usize {
    8
}
fn eight_f() -> f64 {
    8.0
}
fn one() -> usize {
    1
}
fn point_eight_five() -> f64 {
    0.85
}
fn point_five() -> f64 {
    0.5
}
fn none() -> String {
    "none".into()
}
fn yes() -> bool {
    true
}

/// `LoraConfig` keys PEFT refuses for AdaLoRA or that this implementation does not have, each
/// accepted only at its "off" value.
const OFF_ONLY: &[&str] = &[
    "use_dora",
    "loftq_config",
    "layer_replication",
    "trainable_token_indices",
    "target_parameters",
    "alora_invocation_tokens",
    "lora_bias",
];

/// `LoraConfig` keys AdaLoRA's layers never read (PEFT's `SVDLinear` computes its own scale and
/// initialisation), and keys with no effect on the computation.
const IGNORED: &[&str] = &[
    "peft_version",
    "auto_mapping",
    "revision",
    "use_rslora",
    "alpha_pattern",
    "megatron_config",
    "megatron_core",
    "use_qalora",
    "qalora_group_size",
    "eva_config",
    "corda_config",
    "runtime_config",
    "arrow_config",
    "lora_ga_config",
    "ensure_weight_tying",
    "kasa_config",
    "monteclora_config",
    "use_bdlora",
    "velora_config",
];

fn is_off(value: &Value) -> bool {
    match value {
        Value::Null | Value::Bool(false) => true,
        Value::Object(o) => o.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

impl peft_core::MethodConfig for AdaLoraConfig {
    const NAME: &'static str = "AdaLoraConfig";
    const PEFT_TYPE: PeftType = PeftType::AdaLora;

    /// PEFT's `AdaLoraConfig.__post_init__` checks (a positive `total_step`, a budgeting phase,
    /// a non-negative `orth_reg_weight`, no DoRA or LoftQ), the ranges of the other values, and
    /// what this implementation leaves out said by name.
    fn validate(&self, context: &str) -> Result<()> {
        let bad = |field: &str, reason: String| Err(PeftError::config(context, field, reason));
        self.header.check(context)?;
        if self.init_r == 0 {
            return bad("init_r", "the initial rank must be at least 1".into());
        }
        let Some(total_step) = self.total_step.filter(|t| *t > 0) else {
            return bad(
                "total_step",
                "AdaLoRA does not work when `total_step` is None, supply a value > 0.".into(),
            );
        };
        if self.tinit + self.tfinal >= total_step {
            return bad(
                "tinit",
                "The supplied schedule values don't allow for a budgeting phase. Decrease \
                 `tfinal`/`tinit` or increase `total_step`."
                    .into(),
            );
        }
        if self.delta_t == 0 {
            return bad("deltaT", "must be at least 1".into());
        }
        for (field, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(beta > 0.0 && beta < 1.0) {
                return bad(field, format!("must be in (0, 1), got {beta}"));
            }
        }
        if self.orth_reg_weight.is_nan() || self.orth_reg_weight < 0.0 {
            return bad(
                "orth_reg_weight",
                format!(
                    "`orth_reg_weight` should be greater than or equal to 0, but the value \
                     passed is {}",
                    self.orth_reg_weight
                ),
            );
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(
                "lora_dropout",
                format!("must be in [0, 1), got {}", self.lora_dropout),
            );
        }
        if !self.lora_alpha.is_finite() {
            return bad("lora_alpha", "must be finite".into());
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
                    "`{}`: training biases beside AdaLoRA is not supported here; use \"none\"",
                    self.bias
                ),
            );
        }
        if self.layers_pattern.is_some() && self.layers_to_transform.is_none() {
            return bad(
                "layers_pattern",
                "When `layers_pattern` is specified, `layers_to_transform` must also be \
                 specified. "
                    .into(),
            );
        }
        if let Some(pattern) = &self.rank_pattern
            && let Some((key, flags)) = pattern.iter().find(|(_, f)| f.len() != self.init_r)
        {
            return bad(
                "rank_pattern",
                format!(
                    "`{key}` has {} flags; there must be one per initial rank (init_r = {})",
                    flags.len(),
                    self.init_r
                ),
            );
        }
        for (key, value) in &self.other {
            if key == "use_dora" && !is_off(value) {
                return bad(
                    key,
                    "AdaLoRA does not support DoRA. (PEFT's message)".into(),
                );
            }
            if key == "loftq_config" && !is_off(value) {
                return bad(
                    key,
                    "AdaLoRA does not support LOFTQ. (PEFT's message)".into(),
                );
            }
            if OFF_ONLY.contains(&key.as_str()) {
                if !is_off(value) {
                    return bad(
                        key,
                        format!("`{key}: {value}` is not supported with AdaLoRA"),
                    );
                }
            } else if !IGNORED.contains(&key.as_str()) {
                tracing::warn!("{context}: unknown key `{key}` ignored");
            }
        }
        Ok(())
    }
}

impl Default for AdaLoraConfig {
    /// PEFT's defaults, with `total_step` 1000 (PEFT has no default and requires one).
    fn default() -> Self {
        serde_json::from_str(r#"{"total_step": 1000}"#).expect("every field has a default")
    }
}

impl AdaLoraConfig {
    /// The targets: the configured ones, or PEFT's default for `model_type`
    /// (`TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING`, LoRA's for these
    /// architectures).
    pub fn targets(&self, model_type: &str) -> Result<TargetModules> {
        match &self.target_modules {
            Some(t) => Ok(t.clone()),
            None => peft_core::modules::lora_family_targets("AdaLoraConfig", model_type),
        }
    }

    /// The rank of the layer at `path` (HF module path): the kept ranks of `rank_pattern`'s
    /// entry for it, else `init_r`.
    pub fn rank_of(&self, path: &str) -> usize {
        self.rank_pattern
            .as_ref()
            .and_then(|p| p.get(&format!("{path}.lora_E")))
            .map_or(self.init_r, |flags| flags.iter().filter(|f| **f).count())
    }

    /// The update's scale of a layer of `rank` kept ranks: `lora_alpha` (or, where it is ≤ 0,
    /// the rank) over `ranknum + 1e-5`, where `ranknum` is `init_r` (PEFT keeps the initial
    /// rank's value when it resizes a layer to its pattern).
    pub fn scale(&self, rank: usize) -> f32 {
        let scaling = if self.lora_alpha > 0.0 {
            self.lora_alpha
        } else {
            rank as f64
        };
        // PyTorch: `(…) * scaling / (ranknum + 1e-5)`, `ranknum` an f32 parameter.
        let ranknum = self.init_r as f32 + 1e-5f32;
        (scaling as f32) / ranknum
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peft_core::MethodConfig;

    #[test]
    fn defaults_are_pefts() {
        let c = AdaLoraConfig::default();
        assert_eq!(
            (c.init_r, c.target_r, c.tinit, c.tfinal, c.delta_t),
            (12, 8, 0, 0, 1)
        );
        assert_eq!((c.beta1, c.beta2, c.orth_reg_weight), (0.85, 0.85, 0.5));
        assert_eq!((c.lora_alpha, c.lora_dropout), (8.0, 0.0));
        assert!(c.init_lora_weights && c.rank_pattern.is_none());
        assert_eq!(
            c.targets("llama").unwrap(),
            TargetModules::List(vec!["q_proj".into(), "v_proj".into()])
        );
        // 8 / (12 + 1e-5) in f32.
        assert_eq!(c.scale(12), 8.0f32 / 12.00001f32);
    }

    #[test]
    fn a_rank_pattern_gives_each_layer_its_kept_ranks() {
        let c = AdaLoraConfig::from_json(
            r#"{"total_step": 10, "init_r": 3, "rank_pattern":
                {"model.layers.0.self_attn.q_proj.lora_E": [true, false, true]}}"#,
            "cfg",
        )
        .unwrap();
        assert_eq!(c.rank_of("model.layers.0.self_attn.q_proj"), 2);
        assert_eq!(c.rank_of("model.layers.1.self_attn.q_proj"), 3);
    }

    #[test]
    fn bad_values_are_refused_naming_the_key() {
        let err = |json: &str| {
            AdaLoraConfig::from_json(json, "cfg")
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("{}"),
            "cfg: invalid `total_step`: AdaLoRA does not work when `total_step` is None, supply \
             a value > 0."
        );
        assert!(
            err(r#"{"total_step": 10, "tinit": 6, "tfinal": 4}"#)
                .contains("don't allow for a budgeting phase")
        );
        assert!(err(r#"{"total_step": 10, "orth_reg_weight": -1}"#).contains("greater than"));
        assert!(err(r#"{"total_step": 10, "use_dora": true}"#).contains("does not support DoRA"));
        assert!(
            err(r#"{"total_step": 10, "loftq_config": {"loftq_bits": 4}}"#)
                .contains("does not support LOFTQ")
        );
        assert!(err(r#"{"total_step": 10, "beta1": 1.0}"#).contains("invalid `beta1`"));
        assert!(
            err(r#"{"total_step": 10, "init_r": 2, "rank_pattern": {"x.lora_E": [true]}}"#)
                .contains("one per initial rank")
        );
        assert_eq!(
            err(r#"{"peft_type": "LORA", "total_step": 10}"#),
            "cfg: invalid `peft_type`: expected ADALORA, found LORA"
        );
        // PEFT writes the LoRA keys it inherits; off, they load.
        AdaLoraConfig::from_json(
            r#"{"total_step": 10, "use_dora": false, "loftq_config": {},
                "layer_replication": null, "use_rslora": false}"#,
            "cfg",
        )
        .unwrap();
    }
}
