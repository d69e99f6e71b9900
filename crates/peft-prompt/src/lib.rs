//! # peft-prompt
//!
//! Prompt tuning (Lester et al., 2021) with Hugging Face PEFT parity: `num_virtual_tokens`
//! learned embeddings are put before the input embeddings (attachment point (b) of
//! [`peft_core::adapter`]); the whole model stays frozen. BLOOM's embedding LayerNorm applies to
//! them too, the attention mask gains leading ones, and the logits have `num_virtual_tokens`
//! extra leading positions — all as PEFT does.
//!
//! Initialisation as PEFT: `RANDOM` (N(0, 1)), `SAMPLE_VOCAB` (rows of random vocabulary
//! tokens), or `TEXT` — the text is tokenised (special tokens included), repeated ⌈n / len⌉
//! times if shorter, truncated to `num_virtual_tokens`, and those rows of the word-embedding
//! table are copied.
//!
//! ```no_run
//! use burn::tensor::Device;
//! use peft_core::AdapterModel;
//! use peft_prompt::{PromptTuningConfig, PromptTuningInit, get_peft_model};
//!
//! let dir = "tests/fixtures/models/bloom-tiny";
//! let base = peft_models::load(dir, &Device::flex()).unwrap();
//! let tokenizer = peft_models::Tokenizer::from_dir(dir).unwrap();
//! let text = "下面是人和聊天机器人的对话。";
//! let config = PromptTuningConfig {
//!     num_virtual_tokens: tokenizer.encode(text).unwrap().len(),
//!     prompt_tuning_init: PromptTuningInit::Text,
//!     prompt_tuning_init_text: Some(text.into()),
//!     ..PromptTuningConfig::default()
//! };
//! let model = get_peft_model(base, config, Some(&tokenizer)).unwrap();
//! println!("{}", model.trainable_summary());
//! ```

use peft_core::MethodConfig;
use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use peft_core::adapter_files::{CONFIG_NAME, WEIGHTS_NAME, save_adapter};
use peft_core::params::{ParamUpdate, map_params, named_params};
use peft_core::prompt_learning::{PromptTable, VirtualTokens};
use peft_core::{
    AdapterModel, CausalLm, ConfigHeader, HostTensor, ModelSpec, NoAdapter, PeftError, PeftType,
    Result, TensorStore, TrainableSummary,
};

/// The HF-style name of the table parameter (`encoder.prompt_embeddings` inside the wrapper).
const TABLE_PARAM: &str = "encoder.prompt_embeddings";
use peft_models::Tokenizer;

/// PEFT's `prompt_tuning_init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PromptTuningInit {
    /// N(0, 1), as `nn.Embedding`.
    #[default]
    #[serde(rename = "RANDOM")]
    Random,
    /// Rows of the embedding table for the tokens of `prompt_tuning_init_text`.
    #[serde(rename = "TEXT")]
    Text,
    /// Rows of the embedding table for random vocabulary tokens.
    #[serde(rename = "SAMPLE_VOCAB")]
    SampleVocab,
}

/// PEFT's `PromptTuningConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptTuningConfig {
    /// PEFT's shared fields (`peft_type` = `PROMPT_TUNING`, `task_type`,
    /// `base_model_name_or_path`, `inference_mode`).
    #[serde(flatten)]
    pub header: ConfigHeader<PromptTuningConfig>,
    /// Number of virtual tokens.
    #[serde(default)]
    pub num_virtual_tokens: usize,
    /// Width of a virtual token (the model's hidden size; filled in from the model).
    #[serde(default)]
    pub token_dim: Option<usize>,
    /// 1 for decoder-only models.
    #[serde(default)]
    pub num_transformer_submodules: Option<usize>,
    /// The model's attention heads (recorded as PEFT does).
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    /// The model's layers (recorded as PEFT does).
    #[serde(default)]
    pub num_layers: Option<usize>,
    /// How the table starts.
    #[serde(default)]
    pub prompt_tuning_init: PromptTuningInit,
    /// The text of `TEXT` init.
    #[serde(default)]
    pub prompt_tuning_init_text: Option<String>,
    /// The tokenizer of `TEXT` init (peft-rs uses the tokenizer it is given).
    #[serde(default)]
    pub tokenizer_name_or_path: Option<String>,
    /// Everything else PEFT writes.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

impl peft_core::MethodConfig for PromptTuningConfig {
    const NAME: &'static str = "PromptTuningConfig";
    const PEFT_TYPE: PeftType = PeftType::PromptTuning;

    /// Checks the values.
    fn validate(&self, context: &str) -> Result<()> {
        let bad = |field: &str, reason: &str| Err(PeftError::config(context, field, reason));
        self.header.check(context)?;
        if self.num_virtual_tokens == 0 {
            return bad("num_virtual_tokens", "must be at least 1");
        }
        if self.num_transformer_submodules.is_some_and(|n| n != 1) {
            return bad(
                "num_transformer_submodules",
                "only 1 (decoder-only models) is supported",
            );
        }
        if self.prompt_tuning_init == PromptTuningInit::Text
            && self
                .prompt_tuning_init_text
                .as_deref()
                .is_none_or(str::is_empty)
        {
            return bad(
                "prompt_tuning_init_text",
                "TEXT init needs a non-empty prompt_tuning_init_text",
            );
        }
        Ok(())
    }
}

impl Default for PromptTuningConfig {
    fn default() -> Self {
        Self {
            num_virtual_tokens: 8,
            ..serde_json::from_str("{}").expect("every field has a default")
        }
    }
}

impl PromptTuningConfig {}

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
    config.token_dim = Some(spec.hidden_size);
    config.num_transformer_submodules = Some(1);
    config.num_attention_heads = Some(spec.num_heads);
    config.num_layers = Some(spec.num_layers);
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

fn freeze<M: Module>(model: M) -> M {
    map_params(model, |_, _| ParamUpdate::Trainable(false))
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
    let (n, d) = (config.num_virtual_tokens, spec.hidden_size);
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
            base: freeze(base),
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
    if let Some(d) = config.token_dim
        && d != spec.hidden_size
    {
        return Err(PeftError::AdapterMismatch(format!(
            "{}: token_dim {d} but this {} model's hidden size is {} (adapter for another model?)",
            dir.join(CONFIG_NAME).display(),
            spec.model_type,
            spec.hidden_size
        )));
    }
    let weights = dir.join(WEIGHTS_NAME);
    let store = TensorStore::open(&weights)?;
    let (n, d) = (config.num_virtual_tokens, spec.hidden_size);
    let values = store.f32_shaped("prompt_embeddings", &[n, d])?;
    if let Some(extra) = store.keys().find(|k| *k != "prompt_embeddings") {
        tracing::warn!("{}: unexpected tensor `{extra}` ignored", weights.display());
    }
    let device = base.device();
    let model = PromptTuningModel {
        model: VirtualTokens {
            base: freeze(base),
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
