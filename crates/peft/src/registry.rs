//! The registry of methods (PEFT's `mapping.py`): one [`Method`] row per `--method` name, with
//! its `peft_type`, its default config and what it supports. The command line, the server and
//! the benchmarks look a method up here and never match on method names themselves.
//!
//! The types a method brings (its config and its model) are listed once, in
//! `adapter_methods!` (`src/methods.rs`); this table says how the tools use them.

use std::path::Path;

use peft_core::{PeftError, PeftType, Result};

use crate::PeftConfig;

/// How `peft serve` runs a method's adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    /// Rows of every adapter of this method share one batch with the base model (LoRA: each row
    /// its own adapter, the base product computed once).
    SharedBatch,
    /// Each adapter runs its rows in a batch of its own over the shared base weights.
    OwnBatch,
    /// Not served beside other adapters; the text says why and what to do instead.
    Refused(&'static str),
}

/// One adapter method: a `--method` name and what the tools may do with it.
#[derive(Debug)]
pub struct Method {
    /// `--method` name (`peft train`, `peft inspect`).
    pub name: &'static str,
    /// Its name in prose and messages (`LoRA`, `prompt tuning`).
    pub label: &'static str,
    /// The `peft_type` of the adapter folders it writes and reads.
    pub peft_type: PeftType,
    /// One line for help texts: what the method trains.
    pub summary: &'static str,
    /// The config a run starts from when none is given (PEFT's defaults, or a preset).
    pub default_config: fn() -> PeftConfig,
    /// Whether the adapter folds into the base weights (`merge_and_unload`, a merged model
    /// after training); prompt learning keeps its virtual tokens outside.
    pub merges: bool,
    /// How `peft serve` batches its adapters.
    pub serving: Serving,
    /// Whether it adapts a 4-bit (NF4/FP4) base (QLoRA's quantised linear layers).
    pub adapts_4bit_base: bool,
    /// Whether training quantises the base to 4-bit unless told otherwise (QLoRA's preset).
    pub trains_on_4bit_base: bool,
}

/// Every method, `lora` first: a LoRA folder loads as `lora`; `qlora` trains the QLoRA paper's
/// preset over a 4-bit base and saves a LoRA folder.
pub const METHODS: [Method; 12] = [
    Method {
        name: "lora",
        label: "LoRA",
        peft_type: PeftType::Lora,
        summary: "low-rank updates s·B·A beside frozen linear layers",
        default_config: || PeftConfig::Lora(peft_lora::LoraConfig::default()),
        merges: true,
        serving: Serving::SharedBatch,
        adapts_4bit_base: true,
        trains_on_4bit_base: false,
    },
    Method {
        name: "qlora",
        label: "QLoRA",
        peft_type: PeftType::Lora,
        summary: "LoRA on every linear layer of an NF4 base (the QLoRA paper's preset)",
        default_config: || PeftConfig::Lora(peft_qlora::qlora_preset()),
        merges: true,
        serving: Serving::SharedBatch,
        adapts_4bit_base: true,
        trains_on_4bit_base: true,
    },
    Method {
        name: "ia3",
        label: "IA3",
        peft_type: PeftType::Ia3,
        summary: "learned scaling vectors on keys, values and feed-forward activations",
        default_config: || PeftConfig::Ia3(peft_ia3::Ia3Config::default()),
        merges: true,
        serving: Serving::OwnBatch,
        adapts_4bit_base: false,
        trains_on_4bit_base: false,
    },
    Method {
        name: "loha",
        label: "LoHa",
        peft_type: PeftType::Loha,
        summary: "Hadamard product of two low-rank products beside frozen linear layers",
        default_config: || PeftConfig::Loha(peft_loha::LohaConfig::default()),
        merges: true,
        serving: Serving::OwnBatch,
        adapts_4bit_base: false,
        trains_on_4bit_base: false,
    },
    Method {
        name: "lokr",
        label: "LoKr",
        peft_type: PeftType::Lokr,
        summary: "Kronecker product of two (low-rank) factors beside frozen linear layers",
        default_config: || PeftConfig::Lokr(peft_lokr::LokrConfig::default()),
        merges: true,
        serving: Serving::OwnBatch,
        adapts_4bit_base: false,
        trains_on_4bit_base: false,
    },
    Method {
        name: "vera",
        label: "VeRA",
        peft_type: PeftType::Vera,
        summary: "shared frozen random projections scaled by two trained vectors per layer",
        default_config: || PeftConfig::Vera(peft_vera::VeraConfig::default()),
        merges: true,
        serving: Serving::OwnBatch,
        adapts_4bit_base: true,
        trains_on_4bit_base: false,
    },
    Method {
        name: "adalora",
        label: "AdaLoRA",
        peft_type: PeftType::AdaLora,
        summary: "LoRA in SVD form whose ranks a budget re-allocates (AdaLoRA)",
        default_config: || PeftConfig::AdaLora(peft_adalora::AdaLoraConfig::default()),
        merges: true,
        serving: Serving::OwnBatch,
        adapts_4bit_base: true,
        trains_on_4bit_base: false,
    },
    Method {
        name: "trainable-tokens",
        label: "trainable tokens",
        peft_type: PeftType::TrainableTokens,
        summary: "chosen embedding rows trained in full (new or re-purposed tokens)",
        default_config: || {
            PeftConfig::TrainableTokens(peft_trainable_tokens::TrainableTokensConfig::default())
        },
        merges: true,
        serving: Serving::Refused(
            "it replaces rows of the embedding table that the served adapters share; merge it \
             (`peft merge`) and serve the merged model",
        ),
        adapts_4bit_base: true,
        trains_on_4bit_base: false,
    },
    Method {
        name: "bitfit",
        label: "BitFit",
        peft_type: PeftType::BitFit,
        summary: "the base model's biases, trained in place",
        default_config: || PeftConfig::BitFit(peft_bitfit::BitFitConfig::default()),
        merges: true,
        serving: Serving::Refused(
            "it replaces base biases, so it cannot share a base; merge it (`peft merge`) and \
             serve the merged model",
        ),
        adapts_4bit_base: false,
        trains_on_4bit_base: false,
    },
    Method {
        name: "prompt",
        label: "prompt tuning",
        peft_type: PeftType::PromptTuning,
        summary: "learned virtual-token embeddings before the input",
        default_config: || PeftConfig::PromptTuning(peft_prompt::PromptTuningConfig::default()),
        merges: false,
        serving: Serving::OwnBatch,
        adapts_4bit_base: true,
        trains_on_4bit_base: false,
    },
    Method {
        name: "prefix",
        label: "prefix tuning",
        peft_type: PeftType::PrefixTuning,
        summary: "learned key/value prefixes in every layer",
        default_config: || PeftConfig::PrefixTuning(peft_prefix::PrefixTuningConfig::default()),
        merges: false,
        serving: Serving::OwnBatch,
        adapts_4bit_base: true,
        trains_on_4bit_base: false,
    },
    Method {
        name: "ptuning",
        label: "P-tuning",
        peft_type: PeftType::PTuning,
        summary: "virtual tokens re-encoded by an MLP or LSTM (P-tuning)",
        default_config: || PeftConfig::PTuning(peft_ptuning::PromptEncoderConfig::default()),
        merges: false,
        serving: Serving::OwnBatch,
        adapts_4bit_base: true,
        trains_on_4bit_base: false,
    },
];

impl Method {
    /// The config a run of this method starts from: the `adapter_config.json` that `path`
    /// names (a file or an adapter folder; it must be of this method), or the default.
    pub fn config(&self, path: Option<&Path>) -> Result<PeftConfig> {
        let Some(path) = path else {
            return Ok((self.default_config)());
        };
        let config = PeftConfig::from_file(path)?;
        if config.peft_type() != self.peft_type {
            let name = |t: PeftType| match serde_json::to_value(t) {
                Ok(serde_json::Value::String(name)) => name,
                _ => format!("{t:?}"),
            };
            return Err(PeftError::config(
                path.display().to_string(),
                "peft_type",
                format!(
                    "expected {} (--method {}), found {}",
                    name(self.peft_type),
                    self.name,
                    name(config.peft_type())
                ),
            ));
        }
        Ok(config)
    }
}

/// The method called `name` (`--method`), or an error listing them.
pub fn by_name(name: &str) -> Result<&'static Method> {
    METHODS.iter().find(|m| m.name == name).ok_or_else(|| {
        PeftError::InvalidInput(format!(
            "--method {name}: unknown method (expected one of {})",
            names().join(", ")
        ))
    })
}

/// The method that reads adapter folders of `peft_type` (`lora` for LoRA folders).
pub fn by_peft_type(peft_type: PeftType) -> &'static Method {
    METHODS
        .iter()
        .find(|m| m.peft_type == peft_type)
        .unwrap_or(&METHODS[0])
}

/// Every `--method` name, in the registry's order.
pub fn names() -> Vec<&'static str> {
    METHODS.iter().map(|m| m.name).collect()
}

/// The served methods and how their rows batch, for error messages and `--help`.
pub fn served_methods() -> String {
    let mut shared = Vec::new();
    let mut own = Vec::new();
    for method in &METHODS {
        if by_peft_type(method.peft_type).name != method.name {
            continue;
        }
        let label = method.label;
        let list = match method.serving {
            Serving::SharedBatch => &mut shared,
            Serving::OwnBatch => &mut own,
            Serving::Refused(_) => continue,
        };
        list.push(label);
    }
    format!(
        "{} (mixed-adapter batches shared with the base and every other such adapter), {} \
         (a batch per adapter)",
        shared.join(", "),
        own.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_peft_type_has_a_method_and_names_are_unique() {
        for name in PeftType::ALL {
            let peft_type: PeftType = serde_json::from_value(name.into()).unwrap();
            let method = by_peft_type(peft_type);
            assert_eq!(method.peft_type, peft_type, "{name}");
            assert_eq!((method.default_config)().peft_type(), peft_type, "{name}");
        }
        let mut names = names();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), METHODS.len());
    }

    #[test]
    fn an_unknown_name_lists_the_methods() {
        let err = by_name("dora").unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid input: --method dora: unknown method (expected one of lora, qlora, ia3, \
             loha, lokr, vera, adalora, trainable-tokens, bitfit, prompt, prefix, ptuning)"
        );
        assert!(by_name("qlora").unwrap().trains_on_4bit_base);
    }

    #[test]
    fn a_config_of_another_method_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adapter_config.json");
        std::fs::write(&path, r#"{"peft_type": "IA3"}"#).unwrap();
        let err = by_name("lora").unwrap().config(Some(&path)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: invalid `peft_type`: expected LORA (--method lora), found IA3",
                path.display()
            )
        );
        let ia3 = by_name("ia3").unwrap().config(Some(dir.path())).unwrap();
        assert_eq!(ia3.peft_type(), PeftType::Ia3);
        let PeftConfig::Lora(preset) = by_name("qlora").unwrap().config(None).unwrap() else {
            panic!("qlora's default is a LoRA config");
        };
        assert_eq!((preset.r, preset.lora_alpha), (64, 16.0));
    }

    #[test]
    fn served_methods_reads_the_table() {
        assert_eq!(
            served_methods(),
            "LoRA (mixed-adapter batches shared with the base and every other such adapter), \
             IA3, LoHa, LoKr, VeRA, AdaLoRA, prompt tuning, prefix tuning, P-tuning (a batch per \
             adapter)"
        );
    }
}
