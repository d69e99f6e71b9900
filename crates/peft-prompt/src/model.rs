//! Prompt tuning on a model: `get_peft_model`, `PeftModel.from_pretrained`, saving, and the
//! trainable table.

use crate::config::{PromptTuningConfig, PromptTuningInit};
use burn::module::Param;
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use peft_core::MethodConfig;
use peft_core::adapter_files::{CONFIG_NAME, WEIGHTS_NAME, save_adapter};
use peft_core::params::named_params;
use peft_core::prompt_learning::{PromptTable, VirtualTokens};
use peft_core::{
    AdapterModel, CausalLm, ExpectedSize, HostTensor, ModelSpec, NoAdapter, PeftError, Result,
    TensorStore, TrainableSummary,
};
use peft_models::Tokenizer;
use std::collections::BTreeMap;
use std::path::Path;

/// The HF-style name of the table parameter (`encoder.prompt_embeddings` inside the wrapper).
const TABLE_PARAM: &str = "encoder.prompt_embeddings";

/// A frozen model with learned virtual tokens put before its input embeddings (peft-core's
/// shared wrapper with a plain table).
pub type PromptTuning<M> = VirtualTokens<M, PromptTable>;

/// A prompt-tuned model and its config.
#[derive(Debug)]
pub struct PromptTuningModel<M: CausalLm> {
    /// The model with its virtual tokens.
    pub model: PromptTuning<M>,
    /// The config, sizes filled in.
    pub config: PromptTuningConfig,
}

fn with_sizes(mut config: PromptTuningConfig, spec: &ModelSpec) -> PromptTuningConfig {
    config
        .prompt
        .fill_sizes(spec.hidden_size, spec.num_heads, spec.num_layers);
    config
}

/// The `TEXT` init ids: the text's tokens, repeated when shorter than `n`, truncated to `n`.
pub fn text_init_ids(tokenizer: &Tokenizer, text: &str, n: usize) -> Result<Vec<u32>> {
    let ids = tokenizer.encode(text)?;
    if ids.is_empty() {
        return Err(PeftError::config(
            "PromptTuningConfig",
            "prompt_tuning_init_text",
            "the text has no tokens",
        ));
    }
    Ok(ids.iter().copied().cycle().take(n).collect())
}

/// PEFT's `get_peft_model(model, PromptTuningConfig(...))`. `tokenizer` is needed for `TEXT`
/// init (PEFT loads it from `tokenizer_name_or_path`).
pub fn get_peft_model<M: CausalLm<Adapter = NoAdapter>>(
    base: M,
    config: PromptTuningConfig,
    tokenizer: Option<&Tokenizer>,
) -> Result<PromptTuningModel<M>> {
    config.validate("PromptTuningConfig")?;
    let spec = base.spec().clone();
    let config = with_sizes(config, &spec);
    let (n, d) = (config.prompt.num_virtual_tokens, spec.hidden_size);
    let device = base.device();
    let rows_of = |ids: Vec<u32>| {
        let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
        base.embed_tokens(ids).reshape([n, d]).detach()
    };
    let table = match config.prompt_tuning_init {
        PromptTuningInit::Random => {
            Tensor::<2>::random([n, d], Distribution::Normal(0.0, 1.0), &device)
        }
        PromptTuningInit::SampleVocab => {
            let ids = Tensor::<1, Int>::random(
                [n],
                Distribution::Uniform(0.0, spec.vocab_size as f64),
                &device,
            );
            let ids: Vec<u32> = ids
                .into_data()
                .iter::<i64>()
                .map(|i| i.clamp(0, spec.vocab_size as i64 - 1) as u32)
                .collect();
            rows_of(ids)
        }
        PromptTuningInit::Text => {
            let tokenizer = tokenizer.ok_or_else(|| {
                PeftError::config(
                    "PromptTuningConfig",
                    "tokenizer_name_or_path",
                    "TEXT init needs the model's tokenizer",
                )
            })?;
            let text = config
                .prompt_tuning_init_text
                .as_deref()
                .unwrap_or_default();
            rows_of(text_init_ids(tokenizer, text, n)?)
        }
    };
    Ok(PromptTuningModel {
        model: VirtualTokens {
            base: peft_core::tuner::freeze(base),
            encoder: PromptTable {
                prompt_embeddings: Param::from_tensor(table),
            },
        },
        config,
    })
}

/// PEFT's `PeftModel.from_pretrained` for a prompt-tuning folder.
///
/// With `trainable`, the loaded parameters can be trained further; otherwise they are frozen
/// (inference, as PEFT's `is_trainable=False`).
pub fn from_pretrained<M: CausalLm<Adapter = NoAdapter>>(
    base: M,
    adapter_dir: impl AsRef<Path>,
    trainable: bool,
) -> Result<PromptTuningModel<M>> {
    let dir = adapter_dir.as_ref();
    let config = PromptTuningConfig::from_file(dir.join(CONFIG_NAME))?;
    let spec = base.spec().clone();
    config.prompt.check_sizes(
        &[ExpectedSize::token_dim(spec.hidden_size, "hidden size")],
        &spec.model_type,
        &dir.join(CONFIG_NAME).display().to_string(),
    )?;
    let weights = dir.join(WEIGHTS_NAME);
    let store = TensorStore::open(&weights)?;
    let (n, d) = (config.prompt.num_virtual_tokens, spec.hidden_size);
    let values = store.f32_shaped("prompt_embeddings", &[n, d])?;
    if let Some(extra) = store.keys().find(|k| *k != "prompt_embeddings") {
        tracing::warn!("{}: unexpected tensor `{extra}` ignored", weights.display());
    }
    let device = base.device();
    let model = PromptTuningModel {
        model: VirtualTokens {
            base: peft_core::tuner::freeze(base),
            encoder: PromptTable {
                prompt_embeddings: Param::from_tensor(Tensor::from_data(
                    TensorData::new(values, [n, d]),
                    &device,
                )),
            },
        },
        config: with_sizes(config, &spec),
    };
    Ok(peft_core::tuner::trainable_or_frozen(model, trainable))
}

impl<M: CausalLm> AdapterModel for PromptTuningModel<M> {
    type Model = PromptTuning<M>;

    fn model(&self) -> &PromptTuning<M> {
        &self.model
    }

    fn with_model(mut self, model: PromptTuning<M>) -> Self {
        self.model = model;
        self
    }

    fn trainable_names(&self) -> Vec<String> {
        vec![TABLE_PARAM.into()]
    }

    fn config_json(&self) -> Result<serde_json::Value> {
        peft_core::adapter_files::config_json(&self.config)
    }

    fn trainable_summary(&self) -> TrainableSummary {
        let params = named_params(&self.model);
        TrainableSummary {
            trainable: params
                .iter()
                .filter(|p| p.name == TABLE_PARAM)
                .map(|p| p.numel())
                .sum(),
            all: params.iter().map(|p| p.numel()).sum(),
        }
    }

    fn save_pretrained(&self, dir: &Path) -> Result<()> {
        let [n, d] = self.model.encoder.prompt_embeddings.shape().dims();
        let values = self
            .model
            .encoder
            .prompt_embeddings
            .val()
            .into_data()
            .try_to_vec_as::<f32>()
            .map_err(|e| PeftError::InvalidInput(format!("reading prompt_embeddings: {e:?}")))?;
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "prompt_embeddings".to_string(),
            HostTensor::from_f32(vec![n, d], &values),
        );
        save_adapter(dir, &self.config, &tensors)
    }

    fn merge_and_unload(self) -> Result<VirtualTokens<M::WithAdapter<NoAdapter>, PromptTable>> {
        Err(PeftError::Unsupported(
            "prompt tuning has no weights to merge: keep the adapter and load it with --adapter"
                .into(),
        ))
    }
}
