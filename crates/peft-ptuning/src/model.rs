//! P-tuning on a model: `get_peft_model`, `PeftModel.from_pretrained`, saving.

use crate::config::PromptEncoderConfig;
use crate::encoder::{PTuningEncoder, encoder_tensors, load_encoder, new_encoder};
use burn::module::Param;
use burn::tensor::{Tensor, TensorData};
use peft_core::MethodConfig;
use peft_core::adapter_files::{CONFIG_NAME, WEIGHTS_NAME, save_adapter};
use peft_core::params::host_tensor;
use peft_core::params::named_params;
use peft_core::prompt_learning::VirtualTokens;
use peft_core::{
    AdapterModel, CausalLm, ExpectedSize, ModelSpec, NoAdapter, PeftError, Result, TensorStore,
    TrainableSummary,
};
use peft_tensors::save_safetensors;
use std::collections::BTreeMap;
use std::path::Path;

/// The file peft-rs writes beside PEFT's with the encoder's weights.
pub const ENCODER_NAME: &str = "adapter_encoder.safetensors";

/// A frozen model with P-tuning's virtual tokens.
pub type PTuning<M> = VirtualTokens<M, PTuningEncoder>;

/// A P-tuned model and its config.
#[derive(Debug, Clone)]
pub struct PTuningModel<M: CausalLm> {
    /// The model with its encoder.
    pub model: PTuning<M>,
    /// The config, sizes filled in.
    pub config: PromptEncoderConfig,
}

fn with_sizes(mut config: PromptEncoderConfig, spec: &ModelSpec) -> PromptEncoderConfig {
    config
        .prompt
        .fill_sizes(spec.hidden_size, spec.num_heads, spec.num_layers);
    config.encoder_hidden_size = Some(config.encoder_hidden_size.unwrap_or(spec.hidden_size));
    config
}

/// PEFT's `get_peft_model(model, PromptEncoderConfig(...))`.
pub fn get_peft_model<M: CausalLm<Adapter = NoAdapter>>(
    base: M,
    config: PromptEncoderConfig,
) -> Result<PTuningModel<M>> {
    config.validate("PromptEncoderConfig")?;
    let spec = base.spec().clone();
    let config = with_sizes(config, &spec);
    let encoder = new_encoder(&config, spec.hidden_size, &base.device());
    Ok(PTuningModel {
        model: VirtualTokens {
            base: peft_core::tuner::freeze(base),
            encoder: PTuningEncoder {
                encoder: Some(encoder),
                table: None,
            },
        },
        config,
    })
}

/// PEFT's `PeftModel.from_pretrained` for a P-tuning folder: with `adapter_encoder.safetensors`
/// (peft-rs' own file) the encoder is restored; otherwise PEFT's saved output is used as a table.
///
/// With `trainable`, the loaded parameters can be trained further; otherwise they are frozen
/// (inference, as PEFT's `is_trainable=False`).
pub fn from_pretrained<M: CausalLm<Adapter = NoAdapter>>(
    base: M,
    adapter_dir: impl AsRef<Path>,
    trainable: bool,
) -> Result<PTuningModel<M>> {
    let dir = adapter_dir.as_ref();
    let config_path = dir.join(CONFIG_NAME);
    let config = PromptEncoderConfig::from_file(&config_path)?;
    let spec = base.spec().clone();
    config.prompt.check_sizes(
        &[ExpectedSize::token_dim(spec.hidden_size, "hidden size")],
        &spec.model_type,
        &config_path.display().to_string(),
    )?;
    let config = with_sizes(config, &spec);
    let device = base.device();
    let (n, d) = (config.prompt.num_virtual_tokens, spec.hidden_size);
    let encoder = if dir.join(ENCODER_NAME).is_file() {
        PTuningEncoder {
            encoder: Some(load_encoder(&dir.join(ENCODER_NAME), &config, &device)?),
            table: None,
        }
    } else {
        let store = TensorStore::open(dir.join(WEIGHTS_NAME))?;
        let values = store.f32_shaped("prompt_embeddings", &[n, d])?;
        PTuningEncoder {
            encoder: None,
            table: Some(Param::from_tensor(Tensor::from_data(
                TensorData::new(values, [n, d]),
                &device,
            ))),
        }
    };
    let model = PTuningModel {
        model: VirtualTokens {
            base: peft_core::tuner::freeze(base),
            encoder,
        },
        config,
    };
    Ok(peft_core::tuner::trainable_or_frozen(model, trainable))
}

impl<M: CausalLm> AdapterModel for PTuningModel<M> {
    type Model = PTuning<M>;

    fn model(&self) -> &PTuning<M> {
        &self.model
    }

    fn with_model(mut self, model: PTuning<M>) -> Self {
        self.model = model;
        self
    }

    fn trainable_names(&self) -> Vec<String> {
        named_params(&self.model)
            .into_iter()
            .filter(|p| p.name.starts_with("encoder."))
            .map(|p| p.name)
            .collect()
    }

    fn config_json(&self) -> Result<serde_json::Value> {
        peft_core::adapter_files::config_json(&self.config)
    }

    fn trainable_summary(&self) -> TrainableSummary {
        let params = named_params(&self.model);
        TrainableSummary {
            trainable: params
                .iter()
                .filter(|p| p.name.starts_with("encoder."))
                .map(|p| p.numel())
                .sum(),
            all: params.iter().map(|p| p.numel()).sum(),
        }
    }

    fn save_pretrained(&self, dir: &Path) -> Result<()> {
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "prompt_embeddings".to_string(),
            host_tensor(self.model.encoder.inference_tokens().detach())?,
        );
        save_adapter(dir, &self.config, &tensors)?;
        if let Some(e) = &self.model.encoder.encoder {
            save_safetensors(dir.join(ENCODER_NAME), &encoder_tensors(e)?, None)?;
        }
        Ok(())
    }

    fn merge_and_unload(self) -> Result<PTuning<M::WithAdapter<NoAdapter>>> {
        Err(PeftError::Unsupported(
            "P-tuning has no weights to merge: keep the adapter and load it with --adapter".into(),
        ))
    }
}
