//! Prefix tuning on a model: the frozen model whose KV cache starts with the learned prefixes,
//! `get_peft_model`, `PeftModel.from_pretrained`, saving.

use crate::config::PrefixTuningConfig;
use crate::encoder::{PrefixProjection, load_projection};
use burn::module::{Module, Param};
use burn::nn::{EmbeddingConfig, LinearConfig};
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use peft_core::MethodConfig;
use peft_core::adapter_files::{CONFIG_NAME, WEIGHTS_NAME, save_adapter};
use peft_core::model::{MapEmbedding, MapLinear};
use peft_core::params::host_tensor;
use peft_core::params::{ParamUpdate, map_params, named_params};
use peft_core::{
    AdapterModel, CausalLm, KvCache, LayerAdapter, LayerKv, ModelInput, ModelSpec, ModuleInfo,
    NoAdapter, PeftError, Result, TensorStore, TrainableSummary,
};
use peft_tensors::save_safetensors;
use std::collections::BTreeMap;
use std::path::Path;

/// The file peft-rs writes beside PEFT's with the projection weights.
pub const ENCODER_NAME: &str = "adapter_encoder.safetensors";

/// A frozen model with learned key/value prefixes.
#[derive(Module, Debug)]
pub struct PrefixTuning<M: CausalLm> {
    /// The frozen model.
    pub base: M,
    /// The table `[n, layers · 2 · kv_dim]` (without projection).
    pub prefix: Option<Param<Tensor<2>>>,
    /// The projection MLP (with projection).
    pub projection: Option<PrefixProjection>,
}

impl<M: CausalLm> PrefixTuning<M> {
    /// The prefix table `[n, layers · 2 · kv_dim]`.
    pub fn table(&self) -> Tensor<2> {
        match (&self.projection, &self.prefix) {
            (Some(p), _) => p.table(),
            (None, Some(t)) => t.val(),
            (None, None) => unreachable!("a prefix model holds a table or a projection"),
        }
    }

    /// Per-layer keys and values `[batch, kv_heads, n, head_dim]`.
    pub fn layer_kv(&self, batch: usize) -> Vec<LayerKv> {
        let spec = self.base.spec();
        let (layers, kvh, hd) = (spec.num_layers, spec.num_kv_heads, spec.head_dim);
        let table = self.table();
        let n = table.dims()[0];
        let per = table.reshape([n, layers * 2, kvh, hd]);
        (0..layers)
            .map(|l| {
                let pick = |i: usize| {
                    per.clone()
                        .slice_dim(1, i..i + 1)
                        .reshape([n, kvh, hd])
                        .swap_dims(0, 1)
                        .reshape([1, kvh, n, hd])
                        .expand([batch, kvh, n, hd])
                };
                LayerKv {
                    key: pick(2 * l),
                    value: pick(2 * l + 1),
                }
            })
            .collect()
    }
}

impl<M: CausalLm> CausalLm for PrefixTuning<M> {
    type Adapter = M::Adapter;
    type WithAdapter<B: LayerAdapter> = PrefixTuning<M::WithAdapter<B>>;

    fn spec(&self) -> &ModelSpec {
        self.base.spec()
    }

    fn modules(&self) -> Vec<ModuleInfo> {
        self.base.modules()
    }

    /// On the first pass (no cache, or an empty one) the prefix fills the cache first.
    fn final_hidden(&self, input: ModelInput, cache: Option<&mut KvCache>) -> Result<Tensor<3>> {
        let batch = input.input_ids.dims()[0];
        match cache {
            Some(cache) if cache.past_len() > 0 => self.base.final_hidden(input, Some(cache)),
            Some(cache) => {
                *cache = KvCache::from_prefix(self.layer_kv(batch));
                self.base.final_hidden(input, Some(cache))
            }
            None => {
                let mut local = KvCache::from_prefix(self.layer_kv(batch));
                self.base.final_hidden(input, Some(&mut local))
            }
        }
    }

    fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        self.base.logits(hidden)
    }

    fn hidden_loss(&self, hidden: Tensor<3>, labels: Tensor<2, Int>) -> Tensor<1> {
        self.base.hidden_loss(hidden, labels)
    }

    fn embed_tokens(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        self.base.embed_tokens(ids)
    }

    fn map_layers<B: LayerAdapter>(
        self,
        linear: &mut MapLinear<'_, M::Adapter, B>,
        embedding: &mut MapEmbedding<'_, M::Adapter, B>,
    ) -> Result<PrefixTuning<M::WithAdapter<B>>> {
        Ok(PrefixTuning {
            base: self.base.map_layers(linear, embedding)?,
            prefix: self.prefix,
            projection: self.projection,
        })
    }

    fn device(&self) -> Device {
        self.base.device()
    }

    fn untie_word_embeddings(self) -> Self {
        Self {
            base: self.base.untie_word_embeddings(),
            ..self
        }
    }
}

/// A prefix-tuned model and its config.
#[derive(Debug)]
pub struct PrefixTuningModel<M: CausalLm> {
    /// The model with its prefixes.
    pub model: PrefixTuning<M>,
    /// The config, sizes filled in.
    pub config: PrefixTuningConfig,
}

fn with_sizes(mut config: PrefixTuningConfig, spec: &ModelSpec) -> PrefixTuningConfig {
    config.prompt.fill_sizes(
        spec.head_dim * spec.num_kv_heads,
        spec.num_kv_heads,
        spec.num_layers,
    );
    config
}

/// PEFT's `get_peft_model(model, PrefixTuningConfig(...))`.
pub fn get_peft_model<M: CausalLm<Adapter = NoAdapter>>(
    base: M,
    config: PrefixTuningConfig,
) -> Result<PrefixTuningModel<M>> {
    config.validate("PrefixTuningConfig")?;
    let spec = base.spec().clone();
    let config = with_sizes(config, &spec);
    let (n, kv_dim) = (
        config.prompt.num_virtual_tokens,
        spec.head_dim * spec.num_kv_heads,
    );
    let width = spec.num_layers * 2 * kv_dim;
    let device = base.device();
    let base = map_params(base, |_, _| ParamUpdate::Trainable(false));
    let (prefix, projection) = if config.prefix_projection {
        let h = config.encoder_hidden_size.unwrap_or(kv_dim);
        let projection = PrefixProjection {
            embedding: EmbeddingConfig::new(n, kv_dim).init(&device),
            transform_0: LinearConfig::new(kv_dim, h).init(&device),
            transform_2: LinearConfig::new(h, width).init(&device),
        };
        (None, Some(projection))
    } else {
        let table = Tensor::<2>::random([n, width], Distribution::Normal(0.0, 1.0), &device);
        (Some(Param::from_tensor(table)), None)
    };
    Ok(PrefixTuningModel {
        model: PrefixTuning {
            base,
            prefix,
            projection,
        },
        config,
    })
}

/// PEFT's `PeftModel.from_pretrained` for a prefix-tuning folder. The projection MLP, when
/// `adapter_encoder.safetensors` (peft-rs' own file) is there, is restored for further training;
/// otherwise the saved table is used as it is, as PEFT does in inference mode.
///
/// With `trainable`, the loaded parameters can be trained further; otherwise they are frozen
/// (inference, as PEFT's `is_trainable=False`).
pub fn from_pretrained<M: CausalLm<Adapter = NoAdapter>>(
    base: M,
    adapter_dir: impl AsRef<Path>,
    trainable: bool,
) -> Result<PrefixTuningModel<M>> {
    let dir = adapter_dir.as_ref();
    let config_path = dir.join(CONFIG_NAME);
    let config = PrefixTuningConfig::from_file(&config_path)?;
    let spec = base.spec().clone();
    config.check_model(&spec, &config_path.display().to_string())?;
    let (n, width) = (
        config.prompt.num_virtual_tokens,
        spec.num_layers * 2 * spec.head_dim * spec.num_kv_heads,
    );
    let store = TensorStore::open(dir.join(WEIGHTS_NAME))?;
    let values = store.f32_shaped("prompt_embeddings", &[n, width])?;
    let device = base.device();
    let table = Tensor::<2>::from_data(TensorData::new(values, [n, width]), &device);
    let mut model = get_peft_model(
        base,
        PrefixTuningConfig {
            prefix_projection: false,
            ..config.clone()
        },
    )?;
    model.model.prefix = Some(Param::from_tensor(table));
    if config.prefix_projection && dir.join(ENCODER_NAME).is_file() {
        model.model.projection = Some(load_projection(&dir.join(ENCODER_NAME), &device)?);
        model.model.prefix = None;
    }
    model.config = with_sizes(config, &spec);
    Ok(peft_core::tuner::trainable_or_frozen(model, trainable))
}

impl<M: CausalLm> AdapterModel for PrefixTuningModel<M> {
    type Model = PrefixTuning<M>;

    fn model(&self) -> &PrefixTuning<M> {
        &self.model
    }

    fn with_model(mut self, model: PrefixTuning<M>) -> Self {
        self.model = model;
        self
    }

    fn trainable_names(&self) -> Vec<String> {
        named_params(&self.model)
            .into_iter()
            .filter(|p| p.name.starts_with("prefix") || p.name.starts_with("projection"))
            .map(|p| p.name)
            .collect()
    }

    fn config_json(&self) -> Result<serde_json::Value> {
        peft_core::adapter_files::config_json(&self.config)
    }

    fn trainable_summary(&self) -> TrainableSummary {
        let params = named_params(&self.model);
        let names = self.trainable_names();
        TrainableSummary {
            trainable: params
                .iter()
                .filter(|p| names.contains(&p.name))
                .map(|p| p.numel())
                .sum(),
            all: params.iter().map(|p| p.numel()).sum(),
        }
    }

    fn save_pretrained(&self, dir: &Path) -> Result<()> {
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "prompt_embeddings".to_string(),
            host_tensor(self.model.table().detach())?,
        );
        save_adapter(dir, &self.config, &tensors)?;
        if let Some(p) = &self.model.projection {
            let mut enc = BTreeMap::new();
            enc.insert(
                "embedding.weight".to_string(),
                host_tensor(p.embedding.weight.val())?,
            );
            enc.insert(
                "transform.0.weight".to_string(),
                host_tensor(p.transform_0.weight.val().transpose())?,
            );
            enc.insert(
                "transform.2.weight".to_string(),
                host_tensor(p.transform_2.weight.val().transpose())?,
            );
            for (key, bias) in [
                ("transform.0.bias", &p.transform_0.bias),
                ("transform.2.bias", &p.transform_2.bias),
            ] {
                if let Some(b) = bias {
                    let len = b.shape().dims::<1>()[0];
                    let mut t = host_tensor(b.val().reshape([1, len]))?;
                    t.shape = vec![len];
                    enc.insert(key.to_string(), t);
                }
            }
            save_safetensors(dir.join(ENCODER_NAME), &enc, None)?;
        }
        Ok(())
    }

    fn merge_and_unload(self) -> Result<PrefixTuning<M::WithAdapter<NoAdapter>>> {
        Err(PeftError::Unsupported(
            "prefix tuning has no weights to merge: keep the adapter and load it with --adapter"
                .into(),
        ))
    }
}
