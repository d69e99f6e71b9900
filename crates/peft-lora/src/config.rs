//! `LoraConfig`: PEFT's `adapter_config.json` for LoRA, field for field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use peft_core::modules::{LayerIndices, LayersPattern};
use peft_core::tokens::TokenIndices;
use peft_core::{ConfigHeader, PeftError, PeftType, Result, TargetModules};

/// Which biases train (PEFT's `bias`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraBias {
    /// No bias trains.
    #[default]
    None,
    /// Every bias of the model trains and is saved with the adapter.
    All,
    /// The biases of the LoRA-targeted layers train and are saved.
    LoraOnly,
}

/// How A and B start (PEFT's `init_lora_weights`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    /// `true`: A Kaiming-uniform (as `nn.Linear`), B zero, so the adapter starts as a no-op.
    /// `false`: both random (for tests).
    Flag(bool),
    /// `"gaussian"`: A ~ N(0, 1/r), B zero. `"pissa"` and `"olora"`: the pair from the base
    /// weight, the residual left as the base ([`crate::init`]). `"eva"`, `"lora_ga"` and
    /// `"orthogonal"` load (the files are plain pairs) but cannot start a new adapter;
    /// `pissa_niter_N`, `corda` and `loftq` are refused.
    Method(String),
}

impl Default for InitLoraWeights {
    fn default() -> Self {
        Self::Flag(true)
    }
}

/// PEFT's `LoraConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// PEFT's shared fields (`peft_type` = `LORA`, `task_type`,
    /// `base_model_name_or_path`, `inference_mode`).
    #[serde(flatten)]
    pub header: ConfigHeader<LoraConfig>,
    /// Rank of the update.
    #[serde(default = "eight")]
    pub r: usize,
    /// Scale numerator: the update is multiplied by `lora_alpha / r` (or `/ √r` with rsLoRA).
    #[serde(default = "eight_f")]
    pub lora_alpha: f64,
    /// Dropout on the adapter's input during training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Modules to adapt; `None` = PEFT's default for the architecture.
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// Modules trained in full and saved with the adapter.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Which biases train.
    #[serde(default)]
    pub bias: LoraBias,
    /// Weights stored `[in, out]` (GPT-2's Conv1D); our architectures use `nn.Linear`, so PEFT
    /// (and peft-rs) reset it to `false` with a warning.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Scale by `α/√r` instead of `α/r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA: a trained magnitude per output feature of each adapted linear layer (saved as
    /// `lora_magnitude_vector`; on an embedding, one per embedding dimension).
    #[serde(default)]
    pub use_dora: bool,
    /// Initialisation of A and B.
    #[serde(default)]
    pub init_lora_weights: InitLoraWeights,
    /// Per-module rank overrides (pattern → r).
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides (pattern → α).
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Only these layer indices are adapted.
    #[serde(default)]
    pub layers_to_transform: Option<LayerIndices>,
    /// The name of the layer list, for `layers_to_transform`.
    #[serde(default)]
    pub layers_pattern: Option<LayersPattern>,
    /// LoftQ's settings (`loftq_bits`, `loftq_iter`), used with `init_lora_weights: "loftq"`;
    /// PEFT writes `{}` otherwise.
    #[serde(default)]
    pub loftq_config: serde_json::Map<String, Value>,
    /// Embedding rows trained in full beside the pairs (PEFT's trainable tokens): a list for
    /// the input embedding (and the output layer tied to it), or layer name → list.
    #[serde(default)]
    pub trainable_token_indices: Option<TokenIndices>,
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

/// PEFT keys peft-rs accepts only at the value that disables them: a feature we do not implement
/// is refused, never silently ignored.
const INERT_AT_DEFAULT: &[&str] = &[
    "lora_bias",
    "use_qalora",
    "layer_replication",
    "eva_config",
    "corda_config",
    "megatron_config",
    "target_parameters",
    "alora_invocation_tokens",
    "arrow_config",
    "use_bdlora",
    "kasa_config",
    "lora_ga_config",
    "monteclora_config",
    "velora_config",
    "ensure_weight_tying",
];

/// `init_lora_weights` strings peft-rs accepts. Adapters of `eva`, `lora_ga` and `orthogonal`
/// load as plain pairs (PEFT's own loading leaves the base as it is for these: EVA and LoRA-GA
/// fall back to the default init, which the file's pairs then replace) but cannot start a fresh
/// adapter here ([`LoraConfig::fresh_init`]); `pissa`, `olora` and `loftq` change the base, when
/// starting and when loading, as PEFT does ([`LoraConfig::base_init`]).
const LOADABLE_INITS: &[&str] = &[
    "gaussian",
    "eva",
    "lora_ga",
    "orthogonal",
    "pissa",
    "olora",
    "loftq",
];

/// `init_lora_weights` prefixes of the initialisations not implemented that change the base
/// weight: randomised PiSSA (`pissa_niter_N`: PEFT's own result is random), CorDA (needs data).
const BASE_CHANGING_INITS: &[&str] = &["pissa_niter", "corda"];

/// PEFT keys with no effect on the computation.
const HARMLESS: &[&str] = &[
    "peft_version",
    "auto_mapping",
    "revision",
    "megatron_core",
    "qalora_group_size",
];

fn is_off(value: &Value) -> bool {
    match value {
        Value::Null | Value::Bool(false) => true,
        Value::Object(o) => o.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

impl peft_core::MethodConfig for LoraConfig {
    const NAME: &'static str = "LoraConfig";
    const PEFT_TYPE: PeftType = PeftType::Lora;

    /// Checks values and refuses features peft-rs does not implement.
    fn validate(&self, context: &str) -> Result<()> {
        let bad = |field: &str, reason: String| Err(PeftError::config(context, field, reason));
        self.header.check(context)?;
        if self.r == 0 {
            return bad("r", "the rank must be at least 1".into());
        }
        if let Some((k, _)) = self.rank_pattern.iter().find(|(_, r)| **r == 0) {
            return bad("rank_pattern", format!("rank 0 for `{k}`"));
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
        if let InitLoraWeights::Method(m) = &self.init_lora_weights
            && !LOADABLE_INITS.contains(&m.as_str())
        {
            let why = if BASE_CHANGING_INITS.iter().any(|p| m.starts_with(p)) {
                "it changes the base weight (PEFT recomputes that change when loading), which \
                 peft-rs implements for \"pissa\", \"olora\" and \"loftq\" only; an adapter \
                 converted to plain LoRA loads"
            } else {
                "use true, false or \"gaussian\""
            };
            return bad(
                "init_lora_weights",
                format!("`{m}` is not supported: {why}"),
            );
        }
        if self.init_lora_weights == InitLoraWeights::Method("loftq".into()) {
            self.loftq_settings(context)?;
        } else if !self.loftq_config.is_empty() {
            tracing::warn!(
                "{context}: loftq_config is ignored: init_lora_weights is not \"loftq\" (as PEFT)"
            );
        }
        peft_core::modules::check_pattern_keys(context, "rank_pattern", self.rank_pattern.keys())?;
        peft_core::modules::check_pattern_keys(
            context,
            "alpha_pattern",
            self.alpha_pattern.keys(),
        )?;
        for (key, value) in &self.other {
            if INERT_AT_DEFAULT.contains(&key.as_str()) {
                if !is_off(value) {
                    return bad(key, format!("`{key}: {value}` is not supported by peft-rs"));
                }
            } else if !HARMLESS.contains(&key.as_str()) {
                tracing::warn!("{context}: unknown key `{key}` ignored");
            }
        }
        if self.fan_in_fan_out {
            tracing::warn!(
                "{context}: fan_in_fan_out is for Conv1D layers; these models use linear layers, \
                 so it is set to false (as PEFT does)"
            );
        }
        Ok(())
    }
}

impl Default for LoraConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

impl LoraConfig {
    /// The targets: the configured ones, or PEFT's default for `model_type`.
    pub fn targets(&self, model_type: &str) -> Result<TargetModules> {
        if let Some(t) = &self.target_modules {
            return Ok(t.clone());
        }
        peft_core::modules::lora_family_targets("LoraConfig", model_type)
    }

    /// `(r, alpha)` for the module at `path`, after `rank_pattern` / `alpha_pattern`.
    pub fn rank_and_alpha(&self, path: &str) -> (usize, f64) {
        let r = peft_core::modules::pattern_value(&self.rank_pattern, path).unwrap_or(self.r);
        let alpha =
            peft_core::modules::pattern_value(&self.alpha_pattern, path).unwrap_or(self.lora_alpha);
        (r, alpha)
    }

    /// How a fresh pair starts (PEFT's `reset_lora_parameters`): `true` → A Kaiming-uniform, B
    /// zero; `false` → both random; `"gaussian"` → A ~ N(0, 1/r), B zero. The other
    /// initialisations a config may name load (their files are plain pairs) but cannot start a
    /// fresh adapter here.
    pub fn fresh_init(&self) -> Result<crate::layer::LoraInit> {
        use crate::layer::LoraInit;
        match &self.init_lora_weights {
            InitLoraWeights::Flag(true) => Ok(LoraInit::Default),
            InitLoraWeights::Flag(false) => Ok(LoraInit::Random),
            InitLoraWeights::Method(m) if m == "gaussian" => Ok(LoraInit::Gaussian),
            // The pair then comes from the base weight (`base_init`).
            InitLoraWeights::Method(_) if self.base_init().is_some() => Ok(LoraInit::Default),
            InitLoraWeights::Method(m) => Err(PeftError::config(
                "LoraConfig",
                "init_lora_weights",
                format!(
                    "`{m}` can load an adapter trained with it, but cannot start a new one in \
                     peft-rs (use true, false or \"gaussian\")"
                ),
            )),
        }
    }

    /// LoftQ's `(loftq_bits, loftq_iter)`, checked: PEFT requires `loftq_config` with
    /// `init_lora_weights: "loftq"`; peft-rs implements 4 bits (NF4, bit for bit with
    /// bitsandbytes), not PEFT's 8-bit path.
    pub fn loftq_settings(&self, context: &str) -> Result<(u64, usize)> {
        let bad = |field: &str, reason: String| Err(PeftError::config(context, field, reason));
        if self.loftq_config.is_empty() {
            return bad(
                "loftq_config",
                "init_lora_weights \"loftq\" needs loftq_config (PEFT's LoftQConfig: \
                 {\"loftq_bits\": 4, \"loftq_iter\": 1})"
                    .into(),
            );
        }
        let bits = self
            .loftq_config
            .get("loftq_bits")
            .and_then(Value::as_u64)
            .unwrap_or(4);
        let iter = self
            .loftq_config
            .get("loftq_iter")
            .and_then(Value::as_u64)
            .unwrap_or(1);
        if bits != 4 {
            return bad(
                "loftq_config",
                format!("loftq_bits {bits}: peft-rs implements LoftQ with 4-bit NF4 only"),
            );
        }
        if iter == 0 {
            return bad("loftq_config", "loftq_iter must be at least 1".into());
        }
        Ok((bits, iter as usize))
    }

    /// PiSSA, OLoRA or LoftQ, which take the initial pair from the base weight and change the
    /// base (see [`crate::init`]).
    pub fn base_init(&self) -> Option<crate::init::BaseInit> {
        match &self.init_lora_weights {
            InitLoraWeights::Method(m) if m == "pissa" => Some(crate::init::BaseInit::Pissa),
            InitLoraWeights::Method(m) if m == "olora" => Some(crate::init::BaseInit::Olora),
            InitLoraWeights::Method(m) if m == "loftq" => Some(crate::init::BaseInit::Loftq {
                iterations: self
                    .loftq_settings("LoraConfig")
                    .map_or(1, |(_, iter)| iter),
            }),
            _ => None,
        }
    }

    /// The scale of the update for rank `r` and `alpha`.
    pub fn scaling(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peft_core::MethodConfig;

    #[test]
    fn defaults_are_peft_defaults() {
        let c = LoraConfig::default();
        assert_eq!((c.r, c.lora_alpha, c.lora_dropout), (8, 8.0, 0.0));
        assert_eq!(c.bias, LoraBias::None);
        assert_eq!(c.init_lora_weights, InitLoraWeights::Flag(true));
        assert_eq!(
            c.targets("bloom").unwrap(),
            TargetModules::List(vec!["query_key_value".into()])
        );
        for model_type in ["llama", "mistral", "qwen2", "qwen3", "gemma2"] {
            assert_eq!(
                c.targets(model_type).unwrap(),
                TargetModules::List(vec!["q_proj".into(), "v_proj".into()])
            );
        }
        let err = c.targets("phi3").unwrap_err().to_string();
        assert!(err.contains("no default for model_type `phi3`"), "{err}");
    }

    #[test]
    fn patterns_and_scaling() {
        let c = LoraConfig::from_json(
            r#"{"r": 4, "lora_alpha": 16, "rank_pattern": {"v_proj": 2},
                "alpha_pattern": {"o_proj": 4}, "use_rslora": true}"#,
            "test",
        )
        .unwrap();
        assert_eq!(
            c.rank_and_alpha("model.layers.0.self_attn.v_proj"),
            (2, 16.0)
        );
        assert_eq!(
            c.rank_and_alpha("model.layers.0.self_attn.o_proj"),
            (4, 4.0)
        );
        assert_eq!(
            c.rank_and_alpha("model.layers.0.self_attn.q_proj"),
            (4, 16.0)
        );
        // `xv_proj` is another module: the pattern must start at a dot.
        assert_eq!(c.rank_and_alpha("model.layers.0.xv_proj"), (4, 16.0));
        assert_eq!(c.scaling(4, 16.0), 8.0);
        let plain = LoraConfig::default();
        assert_eq!(plain.scaling(4, 16.0), 4.0);
    }

    #[test]
    fn bad_configs_are_clear_errors() {
        let err = |json: &str| {
            LoraConfig::from_json(json, "adapter_config.json")
                .unwrap_err()
                .to_string()
        };
        assert!(err(r#"{"r": 0}"#).contains("invalid `r`: the rank must be at least 1"));
        assert!(err(r#"{"lora_bias": true}"#).contains("`lora_bias: true` is not supported"));
        assert!(err(r#"{"lora_dropout": -0.1}"#).contains("invalid `lora_dropout`"));
        assert!(err(r#"{"init_lora_weights": "loftq"}"#).contains("needs loftq_config"));
        assert!(err(r#"{"init_lora_weights": "corda"}"#).contains("`corda` is not supported"));
        assert!(
            err(r#"{"init_lora_weights": "pissa_niter_4"}"#).contains("changes the base weight")
        );
        assert!(err(r#"{"init_lora_weights": "bogus"}"#).contains("use true, false"));
        // Initialisations whose files are plain pairs load; they cannot start a new adapter.
        let eva = LoraConfig::from_json(r#"{"init_lora_weights": "eva"}"#, "test").unwrap();
        let fresh = eva.fresh_init().unwrap_err().to_string();
        assert!(
            fresh.contains("`eva` can load an adapter trained with it"),
            "{fresh}"
        );
        assert!(err(r#"{"rank_pattern": {"(v_proj": 2}}"#).contains("invalid regex `(v_proj`"));
        assert!(err(r#"{"r": "eight"}"#).contains("invalid JSON"));
        // Keys PEFT writes at their "off" value load fine.
        LoraConfig::from_json(
            r#"{"use_dora": false, "loftq_config": {}, "layer_replication": null,
                "peft_version": "0.21.2", "brand_new_key": 1}"#,
            "test",
        )
        .unwrap();
        let dora = LoraConfig::from_json(r#"{"use_dora": true}"#, "test").unwrap();
        assert!(dora.use_dora);
    }
}
