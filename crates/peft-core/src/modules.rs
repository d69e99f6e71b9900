//! The modules of a model as PEFT sees them (Hugging Face paths such as
//! `transformer.h.0.self_attention.query_key_value`), and PEFT's rules for choosing which of them
//! an adapter targets.

use regex::Regex;

use crate::config::TargetModules;
use crate::error::{PeftError, Result};

/// What kind of layer a module is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleKind {
    /// `y = x Wᵀ + b` with `W: [out, in]` in PyTorch's layout.
    Linear {
        /// Input features.
        in_features: usize,
        /// Output features.
        out_features: usize,
        /// Whether the layer has a bias.
        bias: bool,
    },
    /// A lookup table `[num_embeddings, dim]`.
    Embedding {
        /// Rows of the table (vocabulary size).
        num_embeddings: usize,
        /// Width of each row.
        dim: usize,
    },
    /// A LayerNorm with weight and bias of size `dim`.
    LayerNorm {
        /// Normalised width.
        dim: usize,
    },
    /// An RMSNorm with a weight of size `dim`.
    RmsNorm {
        /// Normalised width.
        dim: usize,
    },
}

/// One module of a model: its Hugging Face path, kind, and parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleInfo {
    /// The module's path, e.g. `model.layers.3.self_attn.q_proj`.
    pub path: String,
    /// What the module is.
    pub kind: ModuleKind,
    /// Whether this module's parameters are shared with another module (a tied `lm_head`): it is
    /// listed, but its parameters are counted once, under the module that owns them.
    pub tied: bool,
}

impl ModuleInfo {
    /// The module's parameters: `(name, shape)` in PyTorch's layout, names relative to the module.
    pub fn params(&self) -> Vec<(&'static str, Vec<usize>)> {
        match self.kind {
            ModuleKind::Linear {
                in_features,
                out_features,
                bias,
            } => {
                let mut p = vec![("weight", vec![out_features, in_features])];
                if bias {
                    p.push(("bias", vec![out_features]));
                }
                p
            }
            ModuleKind::Embedding {
                num_embeddings,
                dim,
            } => vec![("weight", vec![num_embeddings, dim])],
            ModuleKind::LayerNorm { dim } => vec![("weight", vec![dim]), ("bias", vec![dim])],
            ModuleKind::RmsNorm { dim } => vec![("weight", vec![dim])],
        }
    }

    /// Number of parameters this module owns (zero for a tied module).
    pub fn num_params(&self) -> usize {
        if self.tied {
            return 0;
        }
        self.params()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// The dims an adapter on this module sees: `(in_features, out_features)` for a linear
    /// layer, `(num_embeddings, dim)` for an embedding (as `AdaptableLinear::dims` and
    /// `AdaptableEmbedding::dims` give them); `None` for modules adapters do not attach to.
    pub fn adapted_dims(&self) -> Option<(usize, usize)> {
        match self.kind {
            ModuleKind::Linear {
                in_features,
                out_features,
                ..
            } => Some((in_features, out_features)),
            ModuleKind::Embedding {
                num_embeddings,
                dim,
            } => Some((num_embeddings, dim)),
            ModuleKind::LayerNorm { .. } | ModuleKind::RmsNorm { .. } => None,
        }
    }

    /// Whether this is a linear layer.
    pub fn is_linear(&self) -> bool {
        matches!(self.kind, ModuleKind::Linear { .. })
    }
}

/// `chosen` when every module is a linear layer, else an error naming the first that is not:
/// "`{method}` on `{path}` ({kind}): `{reason}`" (the methods that adapt linear layers only).
pub fn linear_only<'m>(
    chosen: Vec<&'m ModuleInfo>,
    method: &str,
    reason: &str,
) -> Result<Vec<&'m ModuleInfo>> {
    match chosen.iter().find(|m| !m.is_linear()) {
        Some(m) => Err(PeftError::Unsupported(format!(
            "{method} on `{}` ({:?}): {reason}",
            m.path, m.kind
        ))),
        None => Ok(chosen),
    }
}

/// PEFT's `layers_to_transform`: one layer index or a list of them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum LayerIndices {
    /// A single layer.
    One(usize),
    /// Several layers.
    Many(Vec<usize>),
}

/// PEFT's `layers_pattern`: the name of the layer list (`h`, `layers`), one or several.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum LayersPattern {
    /// One name.
    One(String),
    /// Several names, tried in order.
    Many(Vec<String>),
}

/// Decides which module paths an adapter applies to, exactly as PEFT's
/// `check_target_module_exists` does.
#[derive(Debug, Clone)]
pub struct ModuleMatcher {
    targets: Targets,
    exclude: Option<Targets>,
    layers: Option<Vec<usize>>,
    layer_regexes: Vec<Regex>,
    /// The name of the model's output layer, never targeted by `all-linear`.
    output_layer: String,
}

#[derive(Debug, Clone)]
enum Targets {
    Names(Vec<String>),
    Regex(Regex),
    AllLinear,
}

/// PEFT's rule for a pattern string in a config (`target_modules`, `feedforward_modules`): a
/// regex that must match the whole module path. An invalid pattern is an error naming `field`,
/// with the regex crate's message on one line.
pub fn full_match_regex(field: &str, pattern: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| PeftError::InvalidRegex {
        field: field.to_string(),
        pattern: pattern.to_string(),
        reason: e
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
    })
}

/// PEFT's `get_pattern_key` applied to a `rank_pattern` / `alpha_pattern` map: the value of the
/// first pattern `p` (in key order) for which `^(.*\.)?(p)$` matches `path`. A pattern that is not
/// a valid regex matches nothing (configs are checked for that when they are read).
pub fn pattern_value<T: Copy>(
    patterns: &std::collections::BTreeMap<String, T>,
    path: &str,
) -> Option<T> {
    patterns.iter().find_map(|(pattern, value)| {
        let re = Regex::new(&format!(r"^(.*\.)?({pattern})$")).ok()?;
        re.is_match(path).then_some(*value)
    })
}

/// Checks that every key of a `rank_pattern` / `alpha_pattern` (`field`) is a valid regex: an
/// error naming `context`, the field and the pattern, with the regex crate's message on one line.
pub fn check_pattern_keys<'a>(
    context: &str,
    field: &str,
    patterns: impl IntoIterator<Item = &'a String>,
) -> Result<()> {
    for pattern in patterns {
        if let Err(e) = Regex::new(pattern) {
            let reason = e
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            return Err(PeftError::config(
                context,
                field,
                format!("invalid regex `{pattern}`: {reason}"),
            ));
        }
    }
    Ok(())
}

/// PEFT 0.21.2's default `target_modules` of the LoRA family
/// (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`, which LoHa and LoKr copy) for
/// `model_type`, as a config's targets; an error naming `config` where PEFT has none (phi3).
pub fn lora_family_targets(config: &str, model_type: &str) -> Result<TargetModules> {
    let defaults: &[&str] = match model_type {
        "bloom" => &["query_key_value"],
        "llama" | "mistral" | "qwen2" | "qwen3" | "gemma2" | "gemma3_text" => &["q_proj", "v_proj"],
        other => {
            return Err(PeftError::config(
                config,
                "target_modules",
                format!("no default for model_type `{other}`; set target_modules"),
            ));
        }
    };
    Ok(TargetModules::List(
        defaults.iter().map(|s| s.to_string()).collect(),
    ))
}

impl Targets {
    fn new(field: &str, modules: &TargetModules) -> Result<Self> {
        Ok(match modules {
            TargetModules::List(names) => Self::Names(names.clone()),
            TargetModules::Pattern(p) if p == "all-linear" && field == "target_modules" => {
                Self::AllLinear
            }
            TargetModules::Pattern(p) => Self::Regex(full_match_regex(field, p)?),
        })
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            Self::Names(names) => names
                .iter()
                .any(|n| path == n || path.ends_with(&format!(".{n}"))),
            Self::Regex(re) => re.is_match(path),
            Self::AllLinear => true,
        }
    }
}

impl ModuleMatcher {
    /// A matcher for `target_modules`, optionally restricted by `exclude_modules` and by
    /// `layers_to_transform` / `layers_pattern`.
    pub fn new(
        targets: &TargetModules,
        exclude: Option<&TargetModules>,
        layers_to_transform: Option<&LayerIndices>,
        layers_pattern: Option<&LayersPattern>,
    ) -> Result<Self> {
        let layers = match layers_to_transform {
            None => None,
            Some(LayerIndices::One(i)) => Some(vec![*i]),
            Some(LayerIndices::Many(v)) if v.is_empty() => None,
            Some(LayerIndices::Many(v)) => Some(v.clone()),
        };
        let patterns: Vec<String> = match layers_pattern {
            None => vec![],
            Some(LayersPattern::One(p)) if p.is_empty() => vec![],
            Some(LayersPattern::One(p)) => vec![p.clone()],
            Some(LayersPattern::Many(v)) => v.clone(),
        };
        let layer_regexes = if patterns.is_empty() {
            vec![Regex::new(r"^.*\.[^.]*\.(\d+)\.").expect("static regex")]
        } else {
            patterns
                .iter()
                .map(|p| {
                    Regex::new(&format!(r"^.*\.{p}\.(\d+)\.")).map_err(|e| {
                        PeftError::InvalidRegex {
                            field: "layers_pattern".into(),
                            pattern: p.clone(),
                            reason: e.to_string(),
                        }
                    })
                })
                .collect::<Result<_>>()?
        };
        Ok(Self {
            targets: Targets::new("target_modules", targets)?,
            exclude: exclude
                .map(|e| Targets::new("exclude_modules", e))
                .transpose()?,
            layers,
            layer_regexes,
            output_layer: "lm_head".to_string(),
        })
    }

    /// Whether the module at `path` is targeted. `is_linear` tells `all-linear` which modules
    /// qualify.
    pub fn matches(&self, path: &str, is_linear: bool) -> bool {
        if let Some(exclude) = &self.exclude
            && exclude.matches(path)
        {
            return false;
        }
        match &self.targets {
            Targets::AllLinear => {
                let last = path.rsplit('.').next().unwrap_or(path);
                is_linear && last != self.output_layer
            }
            Targets::Regex(re) => re.is_match(path),
            Targets::Names(names) => {
                if names.iter().any(|n| n == path) {
                    return true;
                }
                if !self.targets.matches(path) {
                    return false;
                }
                match &self.layers {
                    None => true,
                    Some(layers) => self
                        .layer_regexes
                        .iter()
                        .find_map(|re| re.captures(path))
                        .and_then(|c| c[1].parse::<usize>().ok())
                        .is_some_and(|i| layers.contains(&i)),
                }
            }
        }
    }

    /// The modules of `modules` this matcher targets; an error listing every module path when
    /// nothing matches.
    pub fn select<'a>(
        &self,
        targets: &TargetModules,
        modules: &'a [ModuleInfo],
    ) -> Result<Vec<&'a ModuleInfo>> {
        let chosen: Vec<&ModuleInfo> = modules
            .iter()
            .filter(|m| !m.tied && self.matches(&m.path, m.is_linear()))
            .collect();
        if chosen.is_empty() {
            return Err(PeftError::TargetModulesNotFound {
                targets: match targets {
                    TargetModules::List(v) => format!("{v:?}"),
                    TargetModules::Pattern(p) => format!("`{p}`"),
                },
                available: modules.iter().map(|m| m.path.clone()).collect(),
            });
        }
        Ok(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> TargetModules {
        TargetModules::List(v.iter().map(|s| s.to_string()).collect())
    }

    fn linear(path: &str) -> ModuleInfo {
        ModuleInfo {
            path: path.into(),
            kind: ModuleKind::Linear {
                in_features: 4,
                out_features: 4,
                bias: false,
            },
            tied: false,
        }
    }

    #[test]
    fn names_match_exactly_or_as_a_dotted_suffix() {
        let m = ModuleMatcher::new(
            &names(&["query_key_value", "mlp.dense_4h_to_h"]),
            None,
            None,
            None,
        )
        .unwrap();
        assert!(m.matches("transformer.h.0.self_attention.query_key_value", true));
        assert!(m.matches("transformer.h.1.mlp.dense_4h_to_h", true));
        assert!(!m.matches("transformer.h.1.mlp.dense_h_to_4h", true));
        // A suffix must start at a dot: `xquery_key_value` is another module.
        assert!(!m.matches("transformer.h.0.self_attention.xquery_key_value", true));
        assert!(m.matches("query_key_value", true));
    }

    #[test]
    fn a_string_is_a_full_match_regex() {
        let m = ModuleMatcher::new(
            &TargetModules::Pattern(r".*\.(q|v)_proj".into()),
            None,
            None,
            None,
        )
        .unwrap();
        assert!(m.matches("model.layers.0.self_attn.q_proj", true));
        assert!(!m.matches("model.layers.0.self_attn.k_proj", true));
        // Full match: a prefix match is not enough.
        assert!(!m.matches("model.layers.0.self_attn.q_proj.lora", true));
    }

    #[test]
    fn all_linear_skips_the_output_layer_and_non_linear_modules() {
        let m = ModuleMatcher::new(
            &TargetModules::Pattern("all-linear".into()),
            None,
            None,
            None,
        )
        .unwrap();
        assert!(m.matches("model.layers.0.mlp.down_proj", true));
        assert!(!m.matches("lm_head", true));
        assert!(!m.matches("model.embed_tokens", false));
    }

    #[test]
    fn layers_to_transform_and_exclusions() {
        let m = ModuleMatcher::new(
            &names(&["q_proj", "v_proj"]),
            Some(&names(&["v_proj"])),
            Some(&LayerIndices::Many(vec![1])),
            Some(&LayersPattern::One("layers".into())),
        )
        .unwrap();
        assert!(!m.matches("model.layers.0.self_attn.q_proj", true));
        assert!(m.matches("model.layers.1.self_attn.q_proj", true));
        assert!(!m.matches("model.layers.1.self_attn.v_proj", true));
    }

    #[test]
    fn nothing_matched_lists_the_models_modules() {
        let modules = vec![linear("model.layers.0.self_attn.q_proj"), linear("lm_head")];
        let t = names(&["query_key_value"]);
        let m = ModuleMatcher::new(&t, None, None, None).unwrap();
        let err = m.select(&t, &modules).unwrap_err().to_string();
        assert!(err.contains("[\"query_key_value\"]"), "{err}");
        assert!(
            err.contains("model.layers.0.self_attn.q_proj, lm_head"),
            "{err}"
        );
    }

    #[test]
    fn bad_regex_is_a_clear_error() {
        let err = ModuleMatcher::new(&TargetModules::Pattern("(q_proj".into()), None, None, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("invalid regex `(q_proj` in `target_modules`"),
            "{err}"
        );
    }
}
