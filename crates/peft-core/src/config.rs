//! The parts of Hugging Face PEFT's `adapter_config.json` that every method shares, and a lenient
//! reader that accepts keys from newer PEFT versions with a warning instead of failing.

use std::marker::PhantomData;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{PeftError, Result};

/// PEFT's `peft_type` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeftType {
    /// Low-rank adaptation.
    #[serde(rename = "LORA")]
    Lora,
    /// Infused adapter by inhibiting and amplifying inner activations.
    #[serde(rename = "IA3")]
    Ia3,
    /// Learned virtual-token embeddings.
    #[serde(rename = "PROMPT_TUNING")]
    PromptTuning,
    /// Virtual tokens re-encoded by an MLP or LSTM.
    #[serde(rename = "P_TUNING")]
    PTuning,
    /// Learned key/value prefixes.
    #[serde(rename = "PREFIX_TUNING")]
    PrefixTuning,
    /// Bias-only fine-tuning (not a PEFT type; peft-rs' own adapter format).
    #[serde(rename = "BITFIT")]
    BitFit,
    /// Chosen embedding rows trained in full.
    #[serde(rename = "TRAINABLE_TOKENS")]
    TrainableTokens,
    /// Low-rank Hadamard product (LyCORIS' LoHa).
    #[serde(rename = "LOHA")]
    Loha,
    /// Low-rank Kronecker product (LyCORIS' LoKr).
    #[serde(rename = "LOKR")]
    Lokr,
    /// Shared frozen random projections scaled by trained vectors (VeRA).
    #[serde(rename = "VERA")]
    Vera,
    /// LoRA in SVD form whose ranks a budget re-allocates (AdaLoRA).
    #[serde(rename = "ADALORA")]
    AdaLora,
}

impl PeftType {
    /// Every type peft-rs knows, as written in `adapter_config.json`.
    pub const ALL: [&'static str; 11] = [
        "LORA",
        "IA3",
        "PROMPT_TUNING",
        "P_TUNING",
        "PREFIX_TUNING",
        "BITFIT",
        "TRAINABLE_TOKENS",
        "LOHA",
        "LOKR",
        "VERA",
        "ADALORA",
    ];
}

/// PEFT's `target_modules`: a list of names (exact or suffix match), one regex matched against the
/// whole module path, or `"all-linear"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Names; a module matches when its path equals a name or ends with `.name`.
    List(Vec<String>),
    /// A regex that must match the whole module path, or the special value `all-linear`.
    Pattern(String),
}

impl TargetModules {
    /// Whether this is PEFT's `all-linear` shorthand.
    pub fn is_all_linear(&self) -> bool {
        matches!(self, Self::Pattern(p) if p == "all-linear")
    }
}

/// A method's `adapter_config.json` type: its `peft_type` (its [`ConfigHeader`]'s default and
/// the only value accepted), its checks, and reading it from a file or text.
pub trait MethodConfig: Serialize + DeserializeOwned + Clone + std::fmt::Debug {
    /// The method's `peft_type`.
    const PEFT_TYPE: PeftType;
    /// PEFT's class name (`LoraConfig`), naming a config built in code in errors.
    const NAME: &'static str;

    /// Checks the values (the header's `peft_type` among them); `context` names the config (a
    /// file, or [`Self::NAME`]) in errors.
    fn validate(&self, context: &str) -> Result<()>;

    /// Reads `adapter_config.json` leniently (unknown keys warned about, as PEFT drops keys of
    /// newer versions) and validates it.
    fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        read_validated(path, Self::validate)
    }

    /// Parses and validates a config from JSON text; `context` names it in errors.
    fn from_json(json: &str, context: &str) -> Result<Self> {
        let config: Self = serde_json::from_str(json).map_err(|e| PeftError::json(context, e))?;
        config.validate(context)?;
        Ok(config)
    }
}

/// The fields every PEFT adapter config has, flattened (`#[serde(flatten)]`) into each method's
/// config `C`, so that they are declared once: `peft_type` defaults to `C`'s, `task_type` to
/// `CAUSAL_LM`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct ConfigHeader<C: MethodConfig> {
    /// Which method the adapter belongs to; [`ConfigHeader::check`] refuses another method's.
    #[serde(default = "peft_type_of::<C>")]
    pub peft_type: PeftType,
    /// PEFT's task type (`CAUSAL_LM`).
    #[serde(default = "causal_lm")]
    pub task_type: Option<String>,
    /// The base model the adapter was trained on.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Whether the adapter was saved for inference (PEFT writes `true` when saving).
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(skip)]
    method: PhantomData<fn() -> C>,
}

fn peft_type_of<C: MethodConfig>() -> PeftType {
    C::PEFT_TYPE
}

fn causal_lm() -> Option<String> {
    Some("CAUSAL_LM".into())
}

impl<C: MethodConfig> Default for ConfigHeader<C> {
    fn default() -> Self {
        Self {
            peft_type: C::PEFT_TYPE,
            task_type: causal_lm(),
            base_model_name_or_path: None,
            inference_mode: false,
            method: PhantomData,
        }
    }
}

impl<C: MethodConfig> ConfigHeader<C> {
    /// Refuses a config of another method (`context` names the file in the error).
    pub fn check(&self, context: &str) -> Result<()> {
        if self.peft_type == C::PEFT_TYPE {
            return Ok(());
        }
        let name = |t: PeftType| {
            serde_json::to_value(t)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
        };
        Err(PeftError::config(
            context,
            "peft_type",
            format!(
                "expected {}, found {}",
                name(C::PEFT_TYPE).unwrap_or_default(),
                name(self.peft_type).unwrap_or_default()
            ),
        ))
    }
}

/// Parses `json` into `T`, calling `on_unknown` with each key `T` does not know.
///
/// PEFT accepts configs from newer versions by dropping unknown keys with a warning; peft-rs does
/// the same, so adapters saved by a newer PEFT still load.
pub fn from_json_lenient<T: DeserializeOwned>(
    json: &str,
    mut on_unknown: impl FnMut(String),
) -> std::result::Result<T, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(json);
    let value = serde_ignored::deserialize(&mut de, |path| on_unknown(path.to_string()))?;
    de.end()?;
    Ok(value)
}

/// Reads an adapter config file into `T`, warning (through `tracing`) about unknown keys.
pub fn read_config<T: DeserializeOwned>(path: impl AsRef<Path>) -> Result<T> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| PeftError::io(path, e))?;
    from_json_lenient(&text, |key| {
        tracing::warn!("{}: unknown key `{key}` ignored", path.display())
    })
    .map_err(|e| PeftError::json(path, e))
}

/// Reads a config file into `T` (leniently, as [`read_config`]) and runs the method's
/// `validate(config, file)` on it.
pub fn read_validated<T: DeserializeOwned>(
    path: impl AsRef<Path>,
    validate: impl FnOnce(&T, &str) -> Result<()>,
) -> Result<T> {
    let path = path.as_ref();
    let config: T = read_config(path)?;
    validate(&config, &path.display().to_string())?;
    Ok(config)
}

/// Reads only the `peft_type` of an adapter config, to learn which method it belongs to.
///
/// An unknown `peft_type` is reported with the list of the types peft-rs implements.
pub fn read_peft_type(path: impl AsRef<Path>) -> Result<PeftType> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| PeftError::io(path, e))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| PeftError::json(path, e))?;
    let context = path.display().to_string();
    let Some(kind) = value.get("peft_type") else {
        return Err(PeftError::config(context, "peft_type", "missing"));
    };
    match kind.as_str() {
        Some(kind) if PeftType::ALL.contains(&kind) => {
            serde_json::from_value(value["peft_type"].clone()).map_err(|e| PeftError::json(path, e))
        }
        _ => Err(PeftError::config(
            context,
            "peft_type",
            format!(
                "unknown type `{}` (supported: {})",
                kind.as_str().map_or_else(|| kind.to_string(), String::from),
                PeftType::ALL.join(", ")
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Small {
        r: usize,
        #[serde(default)]
        target_modules: Option<TargetModules>,
    }

    #[test]
    fn unknown_keys_are_reported_not_fatal() {
        let mut unknown = Vec::new();
        let cfg: Small = from_json_lenient(
            r#"{"r": 4, "target_modules": ["q_proj", "v_proj"], "future_field": 1}"#,
            |k| unknown.push(k),
        )
        .unwrap();
        assert_eq!(cfg.r, 4);
        assert_eq!(
            cfg.target_modules,
            Some(TargetModules::List(vec!["q_proj".into(), "v_proj".into()]))
        );
        assert_eq!(unknown, vec!["future_field".to_string()]);
    }

    #[test]
    fn target_modules_accepts_a_string() {
        let cfg: Small =
            from_json_lenient(r#"{"r": 1, "target_modules": "all-linear"}"#, |_| {}).unwrap();
        assert!(cfg.target_modules.unwrap().is_all_linear());
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Method {
        #[serde(flatten)]
        header: ConfigHeader<Method>,
        #[serde(default)]
        r: usize,
    }

    impl MethodConfig for Method {
        const PEFT_TYPE: PeftType = PeftType::Ia3;
        const NAME: &'static str = "Method";

        fn validate(&self, context: &str) -> Result<()> {
            self.header.check(context)
        }
    }

    #[test]
    fn the_header_defaults_to_its_method_and_refuses_another() {
        let m: Method = from_json_lenient(r#"{"r": 2}"#, |_| {}).unwrap();
        assert_eq!(m.header, ConfigHeader::default());
        assert_eq!(m.header.peft_type, PeftType::Ia3);
        assert_eq!(m.header.task_type.as_deref(), Some("CAUSAL_LM"));
        m.header.check("cfg").unwrap();
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"peft_type": "IA3", "task_type": "CAUSAL_LM",
                "base_model_name_or_path": null, "inference_mode": false, "r": 2})
        );
        let other: Method = from_json_lenient(
            r#"{"peft_type": "LORA", "base_model_name_or_path": "m", "inference_mode": true}"#,
            |_| {},
        )
        .unwrap();
        assert_eq!(other.header.base_model_name_or_path.as_deref(), Some("m"));
        assert!(other.header.inference_mode);
        let err = other.header.check("cfg").unwrap_err().to_string();
        assert!(
            err.contains("peft_type") && err.contains("expected IA3, found LORA"),
            "{err}"
        );
    }

    #[test]
    fn header_rejects_unknown_peft_type_with_the_supported_list() {
        let dir = std::env::temp_dir().join(format!("peft-core-hdr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("adapter_config.json");
        std::fs::write(&path, r#"{"peft_type": "BOFT", "r": 4}"#).unwrap();
        let err = read_peft_type(&path).unwrap_err().to_string();
        assert!(err.contains("unknown type `BOFT`"), "{err}");
        assert!(err.contains("LORA, IA3"), "{err}");
        std::fs::write(&path, r#"{"peft_type": "LORA", "task_type": "CAUSAL_LM"}"#).unwrap();
        assert_eq!(read_peft_type(&path).unwrap(), PeftType::Lora);
        std::fs::write(&path, r#"{"r": 4}"#).unwrap();
        let err = read_peft_type(&path).unwrap_err().to_string();
        assert!(
            err.contains("peft_type") && err.contains("missing"),
            "{err}"
        );
        std::fs::write(&path, "{not json").unwrap();
        let err = read_peft_type(&path).unwrap_err().to_string();
        assert!(err.contains("adapter_config.json: invalid JSON"), "{err}");
    }
}

/// PEFT's `PromptLearningConfig`: the sizes every prompt-learning method's config shares (prompt
/// tuning, P-tuning, prefix tuning), flattened into its `adapter_config.json` — the file's keys
/// are PEFT's, unchanged. The sizes are `None` in a fresh config and filled in from the model
/// when the adapter is made ([`PromptLearningConfig::fill_sizes`], PEFT's
/// `_prepare_prompt_learning_config`); a saved adapter's sizes are checked against the model it
/// is loaded on ([`PromptLearningConfig::check_sizes`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptLearningConfig {
    /// Virtual tokens (prompt length, or prefix length).
    #[serde(default)]
    pub num_virtual_tokens: usize,
    /// Width of a virtual token: the hidden size, or for prefix tuning the key/value width per
    /// layer (`head_dim · kv_heads`).
    #[serde(default)]
    pub token_dim: Option<usize>,
    /// 1 for decoder-only models (the only kind supported).
    #[serde(default)]
    pub num_transformer_submodules: Option<usize>,
    /// Attention heads (key/value heads for prefix tuning).
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    /// Layers.
    #[serde(default)]
    pub num_layers: Option<usize>,
}

/// One size a prompt-learning adapter records that the model it is loaded on must have: made by
/// [`ExpectedSize::token_dim`], [`ExpectedSize::heads`] or [`ExpectedSize::layers`].
#[derive(Debug, Clone, Copy)]
pub struct ExpectedSize {
    field: SizeField,
    what: &'static str,
    value: usize,
}

#[derive(Debug, Clone, Copy)]
enum SizeField {
    TokenDim,
    Heads,
    Layers,
}

impl ExpectedSize {
    /// `token_dim` must be `value`, the model's `what` (`hidden size`, `key/value width`).
    pub fn token_dim(value: usize, what: &'static str) -> Self {
        Self {
            field: SizeField::TokenDim,
            what,
            value,
        }
    }

    /// `num_attention_heads` must be `value`, the model's `what` (`key/value heads`).
    pub fn heads(value: usize, what: &'static str) -> Self {
        Self {
            field: SizeField::Heads,
            what,
            value,
        }
    }

    /// `num_layers` must be the model's `value` layers.
    pub fn layers(value: usize) -> Self {
        Self {
            field: SizeField::Layers,
            what: "number of layers",
            value,
        }
    }
}

impl PromptLearningConfig {
    /// `num_virtual_tokens` virtual tokens, the sizes left to be filled in from the model.
    pub fn new(num_virtual_tokens: usize) -> Self {
        Self {
            num_virtual_tokens,
            ..Self::default()
        }
    }

    /// Checks the shared values: at least one virtual token, one transformer submodule.
    pub fn validate(&self, context: &str) -> Result<()> {
        if self.num_virtual_tokens == 0 {
            return Err(PeftError::config(
                context,
                "num_virtual_tokens",
                "must be at least 1",
            ));
        }
        if self.num_transformer_submodules.is_some_and(|n| n != 1) {
            return Err(PeftError::config(
                context,
                "num_transformer_submodules",
                "only 1 (decoder-only models) is supported",
            ));
        }
        Ok(())
    }

    /// Fills in the model's sizes: token width `token_dim`, `heads` heads, `layers` layers, one
    /// submodule.
    pub fn fill_sizes(&mut self, token_dim: usize, heads: usize, layers: usize) {
        self.token_dim = Some(token_dim);
        self.num_transformer_submodules = Some(1);
        self.num_attention_heads = Some(heads);
        self.num_layers = Some(layers);
    }

    /// Checks that every size the saved config records equals the model's (`expected`); a size
    /// the config leaves out is not checked. The error names the field, both values and
    /// `model_type`.
    pub fn check_sizes(
        &self,
        expected: &[ExpectedSize],
        model_type: &str,
        context: &str,
    ) -> Result<()> {
        for e in expected {
            let (field, found) = match e.field {
                SizeField::TokenDim => ("token_dim", self.token_dim),
                SizeField::Heads => ("num_attention_heads", self.num_attention_heads),
                SizeField::Layers => ("num_layers", self.num_layers),
            };
            if let Some(found) = found
                && found != e.value
            {
                return Err(PeftError::AdapterMismatch(format!(
                    "{context}: {field} is {found} but this {model_type} model's {} is {} \
                     (adapter for another model?)",
                    e.what, e.value
                )));
            }
        }
        Ok(())
    }
}
