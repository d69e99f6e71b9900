//! BitFit on a model: which biases train, `get_peft_model`, `from_pretrained`, saving and the
//! seed's parameter count.

use crate::config::BitFitConfig;
use peft_core::MethodConfig;
use peft_core::adapter_files::{
    CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME, load_base_params, save_adapter, set_trainable,
};
use peft_core::params::{named_params, named_values};
use peft_core::{
    CausalLm, HostTensor, NoAdapter, PeftError, Result, TensorStore, TrainableSummary,
};
use std::collections::BTreeMap;
use std::path::Path;

/// A model whose selected biases train.
#[derive(Debug)]
pub struct BitFitModel<M> {
    /// The model, every non-selected parameter frozen.
    pub model: M,
    /// The config.
    pub config: BitFitConfig,
    /// HF names of the biases that train.
    pub biases: Vec<String>,
}

/// Freezes everything but the biases `config` selects.
///
/// A model without biases (Llama) is an error that says so and names architectures that have
/// them, never a silent zero-parameter run.
pub fn get_peft_model<M: CausalLm>(model: M, config: BitFitConfig) -> Result<BitFitModel<M>> {
    config.validate(BitFitConfig::NAME)?;
    let pattern = config
        .bias_pattern
        .as_deref()
        .map(|p| {
            regex::Regex::new(p).map_err(|e| PeftError::InvalidRegex {
                field: "bias_pattern".into(),
                pattern: p.to_string(),
                reason: e
                    .to_string()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
            })
        })
        .transpose()?;
    let all_biases: Vec<String> = named_params(&model)
        .into_iter()
        .filter(|p| !p.is_adapter() && p.name.contains("bias"))
        .map(|p| p.name)
        .collect();
    if all_biases.is_empty() {
        return Err(PeftError::Unsupported(format!(
            "BitFit needs bias parameters, and this {} model has none; architectures with \
             biases: bloom (every linear and LayerNorm), qwen2 (q/k/v projections), and llama / \
             qwen3 / gemma2 checkpoints with `attention_bias` or `mlp_bias` set",
            model.spec().model_type
        )));
    }
    let biases: Vec<String> = all_biases
        .iter()
        .filter(|name| pattern.as_ref().is_none_or(|re| re.is_match(name)))
        .cloned()
        .collect();
    if biases.is_empty() {
        return Err(PeftError::config(
            "BitFitConfig",
            "bias_pattern",
            format!(
                "`{}` matches none of the model's biases: {}",
                config.bias_pattern.as_deref().unwrap_or_default(),
                all_biases.join(", ")
            ),
        ));
    }
    let model = set_trainable(model, &biases.iter().cloned().collect());
    Ok(BitFitModel {
        model,
        config,
        biases,
    })
}

/// Loads a BitFit adapter folder onto `base`: the saved biases replace the base ones.
///
/// With `trainable`, the loaded parameters can be trained further; otherwise they are frozen
/// (inference, as PEFT's `is_trainable=False`).
pub fn from_pretrained<M: CausalLm>(
    base: M,
    adapter_dir: impl AsRef<Path>,
    trainable: bool,
) -> Result<BitFitModel<M>> {
    let dir = adapter_dir.as_ref();
    let config: BitFitConfig = peft_core::config::read_config(dir.join(CONFIG_NAME))?;
    let weights = dir.join(WEIGHTS_NAME);
    let store = TensorStore::open(&weights)?;
    let mut model = get_peft_model(base, config)?;
    let (loaded, names) =
        load_base_params(model.model, &store, &weights, &[], |_| None, str::to_string)?;
    model.model = loaded;
    if let Some(missing) = model.biases.iter().find(|b| !names.contains(*b)) {
        return Err(PeftError::MissingTensor {
            path: weights,
            key: format!("{KEY_PREFIX}{missing}"),
        });
    }
    Ok(peft_core::tuner::trainable_or_frozen(model, trainable))
}

impl<M: CausalLm> BitFitModel<M> {
    /// The seed tutorial's `num_param`: elements of the trained biases.
    pub fn num_param(&self) -> usize {
        self.trainable_summary().trainable
    }

    /// PEFT-style `trainable params: … || all params: … || trainable%: …` numbers.
    pub fn trainable_summary(&self) -> TrainableSummary {
        let params = named_params(&self.model);
        TrainableSummary {
            trainable: params
                .iter()
                .filter(|p| self.biases.contains(&p.name))
                .map(|p| p.numel())
                .sum(),
            all: params.iter().map(|p| p.numel()).sum(),
        }
    }

    /// The trained biases under `base_model.model.<hf name>`.
    pub fn adapter_tensors(&self) -> Result<BTreeMap<String, HostTensor>> {
        Ok(named_values(&self.model)?
            .into_iter()
            .filter(|(name, _)| self.biases.contains(name))
            .map(|(name, value)| (format!("{KEY_PREFIX}{name}"), value))
            .collect())
    }

    /// Writes `adapter_config.json` + `adapter_model.safetensors`.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        save_adapter(dir.as_ref(), &self.config, &self.adapter_tensors()?)
    }

    /// The model with its trained biases, ready for `peft_models::save_pretrained`.
    pub fn merge_and_unload(self) -> M {
        self.model
    }
}

impl<M: CausalLm> peft_core::AdapterModel for BitFitModel<M> {
    type Model = M;

    fn model(&self) -> &M {
        &self.model
    }

    fn with_model(mut self, model: M) -> Self {
        self.model = model;
        self
    }

    fn trainable_names(&self) -> Vec<String> {
        self.biases.clone()
    }

    fn config_json(&self) -> Result<serde_json::Value> {
        peft_core::adapter_files::config_json(&self.config)
    }

    fn trainable_summary(&self) -> TrainableSummary {
        BitFitModel::trainable_summary(self)
    }

    fn save_pretrained(&self, dir: &Path) -> Result<()> {
        BitFitModel::save_pretrained(self, dir)
    }

    fn merge_and_unload(self) -> Result<M::WithAdapter<NoAdapter>> {
        // The trained biases are already in place: only the adapter type changes.
        self.model.map_layers(
            &mut |_, layer| Ok(layer.with_adapter(None)),
            &mut |_, embedding| Ok(embedding.with_adapter(None)),
        )
    }
}
