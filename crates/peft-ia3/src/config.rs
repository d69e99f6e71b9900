//! `IA3Config`: PEFT's `adapter_config.json` for (IA)³.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use peft_core::{ConfigHeader, PeftError, PeftType, Result, TargetModules};

/// PEFT's `IA3Config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ia3Config {
    /// PEFT's shared fields (`peft_type` = `IA3`, `task_type`,
    /// `base_model_name_or_path`, `inference_mode`).
    #[serde(flatten)]
    pub header: ConfigHeader<Ia3Config>,
    /// Modules to scale; `None` = PEFT's default for the architecture.
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// The targets whose *input* is scaled (a subset of `target_modules`); `None` = PEFT's
    /// default for the architecture.
    #[serde(default)]
    pub feedforward_modules: Option<TargetModules>,
    /// Conv1D layout; these models use linear layers, so it is reset to `false` with a warning.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Modules trained in full and saved with the adapter.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Start the scaling vectors at one (a no-op adapter); `false` draws them at random.
    #[serde(default = "yes")]
    pub init_ia3_weights: bool,
    /// Everything else PEFT writes, kept so that a loaded config saves back unchanged.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

fn yes() -> bool {
    true
}

/// PEFT keys with no effect on the computation.
const HARMLESS: &[&str] = &["peft_version", "auto_mapping", "revision"];

impl peft_core::MethodConfig for Ia3Config {
    const NAME: &'static str = "IA3Config";
    const PEFT_TYPE: PeftType = PeftType::Ia3;

    /// PEFT's checks: `feedforward_modules` must be a subset of `target_modules` when both are
    /// lists. The error carries the fix.
    fn validate(&self, context: &str) -> Result<()> {
        self.header.check(context)?;
        if let (Some(TargetModules::List(targets)), Some(TargetModules::List(ff))) =
            (&self.target_modules, &self.feedforward_modules)
        {
            let targets_set: BTreeSet<&String> = targets.iter().collect();
            let missing: Vec<&String> = ff.iter().filter(|m| !targets_set.contains(m)).collect();
            if !missing.is_empty() {
                let mut fixed = targets.clone();
                fixed.extend(missing.iter().map(|m| m.to_string()));
                return Err(PeftError::config(
                    context,
                    "feedforward_modules",
                    format!(
                        "`feedforward_modules` should be a subset of `target_modules` \
                         ({missing:?} not in {targets:?}); fix: target_modules = {fixed:?}"
                    ),
                ));
            }
        }
        for key in self.other.keys() {
            if !HARMLESS.contains(&key.as_str()) {
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

impl Default for Ia3Config {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

impl Ia3Config {
    /// The targets: the configured ones, or PEFT's default for `model_type`.
    pub fn targets(&self, model_type: &str) -> Result<TargetModules> {
        if let Some(t) = &self.target_modules {
            return Ok(t.clone());
        }
        defaults(model_type, "target_modules", |d| d.0)
    }

    /// The feed-forward targets: the configured ones, or PEFT's default for `model_type`.
    pub fn feedforward(&self, model_type: &str) -> Result<TargetModules> {
        if let Some(t) = &self.feedforward_modules {
            return Ok(t.clone());
        }
        defaults(model_type, "feedforward_modules", |d| d.1)
    }

    /// Whether the module at `path` is a feed-forward target, by PEFT's rule: a full-match regex
    /// for a string, else a plain string suffix (`key.endswith(name)`, no dot required).
    pub fn is_feedforward(&self, model_type: &str, path: &str) -> Result<bool> {
        Ok(match self.feedforward(model_type)? {
            TargetModules::List(names) => names.iter().any(|n| path.ends_with(n.as_str())),
            TargetModules::Pattern(p) => {
                peft_core::modules::full_match_regex("feedforward_modules", &p)?.is_match(path)
            }
        })
    }
}

/// PEFT 0.21.2's `TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING`.
fn defaults(
    model_type: &str,
    field: &str,
    pick: impl Fn((&'static [&'static str], &'static [&'static str])) -> &'static [&'static str],
) -> Result<TargetModules> {
    let table: (&[&str], &[&str]) = match model_type {
        "bloom" => (
            &["query_key_value", "mlp.dense_4h_to_h"],
            &["mlp.dense_4h_to_h"],
        ),
        "llama" | "mistral" => (&["k_proj", "v_proj", "down_proj"], &["down_proj"]),
        "qwen2" | "qwen3" | "gemma2" => (&["q_proj", "v_proj", "down_proj"], &["down_proj"]),
        other => {
            return Err(PeftError::config(
                "IA3Config",
                field,
                format!("no default for model_type `{other}`; set {field}"),
            ));
        }
    };
    Ok(TargetModules::List(
        pick(table).iter().map(|s| s.to_string()).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use peft_core::MethodConfig;

    #[test]
    fn the_seed_call_gets_peft_message_and_the_fix() {
        let err = Ia3Config::from_json(
            r#"{"target_modules": ["query_key_value"], "feedforward_modules": ["mlp.dense_4h_to_h"]}"#,
            "IA3Config",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`feedforward_modules` should be a subset of `target_modules`"),
            "{err}"
        );
        assert!(
            err.contains(r#"fix: target_modules = ["query_key_value", "mlp.dense_4h_to_h"]"#),
            "{err}"
        );
    }

    #[test]
    fn defaults_follow_peft() {
        let c = Ia3Config::default();
        assert!(c.init_ia3_weights);
        assert_eq!(
            c.targets("llama").unwrap(),
            TargetModules::List(vec!["k_proj".into(), "v_proj".into(), "down_proj".into()])
        );
        assert!(
            c.is_feedforward("bloom", "transformer.h.0.mlp.dense_4h_to_h")
                .unwrap()
        );
        assert!(
            !c.is_feedforward("bloom", "transformer.h.0.self_attention.query_key_value")
                .unwrap()
        );
    }
}
