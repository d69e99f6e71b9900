//! `get_peft_model`, `PeftModel.from_pretrained`, `save_pretrained` and merging for (IA)³.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Tensor, TensorData};

use peft_core::adapter_files::{
    CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME, load_base_params, prepare_modules_to_save, save_adapter,
};
use peft_core::params::named_values;
use peft_core::{
    CausalLm, HostTensor, ModuleMatcher, NoAdapter, PeftError, Result, TensorStore,
    TrainableSummary,
};

use crate::config::Ia3Config;
use crate::layer::Ia3Linear;

/// A model with (IA)³ vectors on some of its linear layers.
#[derive(Debug)]
pub struct Ia3Model<M> {
    /// The adapted model.
    pub model: M,
    /// The adapter's config.
    pub config: Ia3Config,
    /// HF paths of the scaled layers.
    pub targeted: Vec<String>,
    /// HF names of base parameters trained in full (`modules_to_save`).
    pub saved_params: Vec<String>,
    /// Whether the adapter trains (false after loading in inference mode).
    pub trainable: bool,
}

fn inject<B: CausalLm<Adapter = NoAdapter>>(
    base: B,
    config: Ia3Config,
    store: Option<&TensorStore>,
) -> Result<Ia3Model<B::WithAdapter<Ia3Linear>>> {
    config.validate("IA3Config")?;
    let model_type = base.spec().model_type.clone();
    let targets = config.targets(&model_type)?;
    let matcher = ModuleMatcher::new(&targets, config.exclude_modules.as_ref(), None, None)?;
    let modules = base.modules();
    let chosen = matcher.select(&targets, &modules)?;
    if let Some(m) = chosen.iter().find(|m| !m.is_linear()) {
        return Err(PeftError::Unsupported(format!(
            "IA3 on `{}` ({:?}): only linear layers can be scaled",
            m.path, m.kind
        )));
    }
    let targeted: Vec<String> = chosen.iter().map(|m| m.path.clone()).collect();
    let (base, saved_params) = prepare_modules_to_save(base, config.modules_to_save.as_deref())?;
    let device = base.device();
    let model = peft_core::tuner::inject_layers(
        base,
        &targeted,
        &saved_params,
        |path, (d_in, d_out), _| {
            let feedforward = config.is_feedforward(&model_type, path)?;
            let len = if feedforward { d_in } else { d_out };
            Ok(match store {
                None => Ia3Linear::init(len, feedforward, config.init_ia3_weights, &device),
                Some(store) => {
                    let shape = if feedforward { [1, d_in] } else { [d_out, 1] };
                    let values = store.f32_shaped(&format!("{KEY_PREFIX}{path}.ia3_l"), &shape)?;
                    let l = Tensor::<1>::from_data(TensorData::new(values, [len]), &device);
                    Ia3Linear::new(l, feedforward)
                }
            })
        },
    )?;
    Ok(Ia3Model {
        model,
        config,
        targeted,
        saved_params: saved_params.into_iter().collect(),
        trainable: true,
    })
}

/// PEFT's `get_peft_model(model, IA3Config(...))`: freezes the base and adds scaling vectors
/// (ones by default, so the model starts unchanged).
pub fn get_peft_model<B: CausalLm<Adapter = NoAdapter>>(
    base: B,
    config: Ia3Config,
) -> Result<Ia3Model<B::WithAdapter<Ia3Linear>>> {
    inject(base, config, None)
}

/// PEFT's `PeftModel.from_pretrained(model, adapter_dir)` for an IA3 adapter folder.
pub fn from_pretrained<B: CausalLm<Adapter = NoAdapter>>(
    base: B,
    adapter_dir: impl AsRef<Path>,
    trainable: bool,
) -> Result<Ia3Model<B::WithAdapter<Ia3Linear>>> {
    let dir = adapter_dir.as_ref();
    let config = Ia3Config::from_file(dir.join(CONFIG_NAME))?;
    let weights = dir.join(WEIGHTS_NAME);
    let store = TensorStore::open(&weights)?;
    let mut ia3 = inject(base, config, Some(&store))?;
    let model_type = ia3.model.spec().model_type.clone();
    let targeted = &ia3.targeted;
    let (model, _) = load_base_params(
        ia3.model,
        &store,
        &weights,
        |name| {
            let module = name.strip_suffix(".ia3_l")?;
            Some(if targeted.iter().any(|t| t == module) {
                Ok(())
            } else {
                Err(PeftError::AdapterMismatch(format!(
                    "{}: `{KEY_PREFIX}{name}` scales `{module}`, which the config's \
                     target_modules do not select in this {model_type} model (adapter for \
                     another architecture?)",
                    weights.display(),
                )))
            })
        },
        str::to_string,
    )?;
    ia3.model = model;
    if !trainable {
        ia3.model = peft_core::tuner::freeze(ia3.model);
        ia3.trainable = false;
    }
    Ok(ia3)
}

impl<M: CausalLm<Adapter = Ia3Linear>> Ia3Model<M> {
    /// PEFT's `print_trainable_parameters()` numbers.
    pub fn trainable_summary(&self) -> TrainableSummary {
        peft_core::adapter_files::adapter_summary(&self.model, &self.saved_params, self.trainable)
    }

    /// The adapter's tensors under PEFT's keys: `…ia3_l` as `[out, 1]`, or `[1, in]` for a
    /// feed-forward layer.
    pub fn adapter_tensors(&self) -> Result<BTreeMap<String, HostTensor>> {
        let model_type = &self.model.spec().model_type;
        let mut out = BTreeMap::new();
        for (name, mut value) in named_values(&self.model)? {
            if let Some(module) = name.strip_suffix(".adapter.ia3_l") {
                let len = value.shape[0];
                value.shape = if self.config.is_feedforward(model_type, module)? {
                    vec![1, len]
                } else {
                    vec![len, 1]
                };
                out.insert(format!("{KEY_PREFIX}{module}.ia3_l"), value);
            } else if self.saved_params.contains(&name) {
                out.insert(format!("{KEY_PREFIX}{name}"), value);
            }
        }
        Ok(out)
    }

    /// PEFT's `save_pretrained(dir)`.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        save_adapter(dir.as_ref(), &self.config, &self.adapter_tensors()?)
    }

    /// PEFT's `merge_and_unload()`: scales the base weights and returns the plain model.
    pub fn merge_and_unload(self) -> Result<M::WithAdapter<NoAdapter>> {
        peft_core::tuner::merge_and_unload(self.model)
    }

    /// PEFT's `unload()`: drops the vectors without merging.
    pub fn unload(self) -> Result<M::WithAdapter<NoAdapter>> {
        peft_core::tuner::unload(self.model)
    }
}

impl<M> Ia3Model<M>
where
    M: CausalLm<Adapter = Ia3Linear, WithAdapter<Ia3Linear> = M>,
{
    /// PEFT's `merge_adapter()`.
    pub fn merge_adapter(mut self) -> Result<Self> {
        self.model = peft_core::tuner::merge_layers(self.model)?;
        Ok(self)
    }

    /// PEFT's `unmerge_adapter()`: divides by `l + 1e-8`, as PEFT does.
    pub fn unmerge_adapter(mut self) -> Result<Self> {
        self.model = peft_core::tuner::unmerge_layers(self.model)?;
        Ok(self)
    }
}

impl<M: CausalLm<Adapter = Ia3Linear>> peft_core::AdapterModel for Ia3Model<M> {
    type Model = M;

    fn model(&self) -> &M {
        &self.model
    }

    fn with_model(mut self, model: M) -> Self {
        self.model = model;
        self
    }

    fn trainable_names(&self) -> Vec<String> {
        peft_core::adapter_files::adapter_trainable_names(&self.model, &self.saved_params)
    }

    fn trainable_summary(&self) -> TrainableSummary {
        Ia3Model::trainable_summary(self)
    }

    fn save_pretrained(&self, dir: &Path) -> Result<()> {
        Ia3Model::save_pretrained(self, dir)
    }

    fn merge_and_unload(self) -> Result<M::WithAdapter<NoAdapter>> {
        Ia3Model::merge_and_unload(self)
    }
}
