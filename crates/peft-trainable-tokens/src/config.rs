//! `TrainableTokensConfig`: PEFT's `adapter_config.json` for the trainable-tokens method.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use peft_core::tokens::TokenIndices;
use peft_core::{ConfigHeader, ModuleInfo, PeftError, PeftType, Result, TargetModules};

/// PEFT's `TrainableTokensConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainableTokensConfig {
    /// PEFT's shared fields (`peft_type` = `TRAINABLE_TOKENS`, `task_type`,
    /// `base_model_name_or_path`, `inference_mode`).
    #[serde(flatten)]
    pub header: ConfigHeader<TrainableTokensConfig>,
    /// The token ids whose rows train.
    #[serde(default)]
    pub token_indices: Vec<usize>,
    /// The tables whose rows train (names, or one regex over module paths); `None` = the input
    /// embedding, which PEFT then writes here by its path.
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Start the rows at the table's values (a no-op until trained); `false` (random rows, for
    /// PEFT's tests) cannot start a new adapter here.
    #[serde(default = "yes")]
    pub init_weights: bool,
    /// Everything else PEFT writes, kept so that a loaded config saves back unchanged.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

fn yes() -> bool {
    true
}

/// PEFT keys with no effect on the computation.
const HARMLESS: &[&str] = &["peft_version", "auto_mapping", "revision"];

impl peft_core::MethodConfig for TrainableTokensConfig {
    const NAME: &'static str = "TrainableTokensConfig";
    const PEFT_TYPE: PeftType = PeftType::TrainableTokens;

    fn validate(&self, context: &str) -> Result<()> {
        self.header.check(context)?;
        if self.token_indices.is_empty() {
            return Err(PeftError::config(
                context,
                "token_indices",
                "no token ids: list the ids whose rows train",
            ));
        }
        for key in self.other.keys() {
            if !HARMLESS.contains(&key.as_str()) {
                tracing::warn!("{context}: unknown key `{key}` ignored");
            }
        }
        Ok(())
    }
}

impl Default for TrainableTokensConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

impl TrainableTokensConfig {
    /// The indices per table, as the shared tuner resolves them: the input embedding when no
    /// `target_modules` is set; each named module (a name matches a path equal to it or ending
    /// in `.name`; a string is a regex over whole paths, as PEFT matches it) otherwise.
    pub fn indices(&self, modules: &[ModuleInfo]) -> Result<TokenIndices> {
        let ids = self.token_indices.clone();
        let Some(targets) = &self.target_modules else {
            return Ok(TokenIndices::List(ids));
        };
        let names: Vec<String> = match targets {
            TargetModules::List(names) => names.clone(),
            TargetModules::Pattern(pattern) => {
                let re = peft_core::modules::full_match_regex("target_modules", pattern)?;
                let found: Vec<String> = modules
                    .iter()
                    .filter(|m| re.is_match(&m.path))
                    .map(|m| m.path.clone())
                    .collect();
                if found.is_empty() {
                    return Err(PeftError::TargetModulesNotFound {
                        targets: format!("target_modules {pattern:?}"),
                        available: modules.iter().map(|m| m.path.clone()).collect(),
                    });
                }
                found
            }
        };
        Ok(TokenIndices::ByLayer(
            names.into_iter().map(|n| (n, ids.clone())).collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peft_core::MethodConfig;

    #[test]
    fn defaults_are_peft_defaults() {
        let c = TrainableTokensConfig::default();
        assert!(c.init_weights);
        assert!(c.target_modules.is_none());
        assert_eq!(c.header.peft_type, PeftType::TrainableTokens);
        let err = c.validate("test").unwrap_err().to_string();
        assert!(err.contains("token_indices"), "{err}");
    }
}
