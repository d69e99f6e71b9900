//! `get_peft_model`, `PeftModel.from_pretrained`, `save_pretrained` and merging for LoRA.

use std::collections::BTreeMap;
use std::path::Path;

pub use peft_core::adapter_files::{CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME};
use peft_core::adapter_files::{load_base_params, prepare_modules_to_save, save_adapter};
use peft_core::params::named_values;
use peft_core::{
    CausalLm, ModuleKind, ModuleMatcher, NoAdapter, PeftError, Result, TensorStore,
    TrainableSummary,
};
use peft_tensors::layout::{burn_linear_weight, transpose_host};

use crate::config::{InitLoraWeights, LoraBias, LoraConfig};
use crate::layer::{LoraInit, LoraLinear};

/// A model with LoRA adapters on some of its linear layers.
#[derive(Debug)]
pub struct LoraModel<M> {
    /// The adapted model.
    pub model: M,
    /// The adapter's config.
    pub config: LoraConfig,
    /// HF paths of the layers that carry a LoRA pair.
    pub targeted: Vec<String>,
    /// The subset of `targeted` that are embeddings (saved as `lora_embedding_A/B`).
    pub embedding_targets: Vec<String>,
    /// HF names of base parameters trained in full and saved with the adapter (`modules_to_save`
    /// and the biases `bias` selects).
    pub saved_params: Vec<String>,
    /// Whether the adapter trains (false after loading in inference mode, as PEFT's
    /// `is_trainable=False`).
    pub trainable: bool,
}

/// What LoRA needs of the base model: any [`CausalLm`] without adapters.
pub trait LoraBase: CausalLm<Adapter = NoAdapter> {}
impl<M: CausalLm<Adapter = NoAdapter>> LoraBase for M {}

/// Where the A and B of each targeted layer come from.
pub(crate) enum Source<'a> {
    Init(LoraInit),
    File(&'a TensorStore),
}

/// The modules `config` adapts in `modules` (a `model_type` model): `(every targeted path, the
/// embeddings among them)`; anything but linear layers and embeddings is refused.
pub(crate) fn select_targets(
    config: &LoraConfig,
    model_type: &str,
    modules: &[peft_core::ModuleInfo],
) -> Result<(Vec<String>, Vec<String>)> {
    let targets = config.targets(model_type)?;
    let matcher = ModuleMatcher::new(
        &targets,
        config.exclude_modules.as_ref(),
        config.layers_to_transform.as_ref(),
        config.layers_pattern.as_ref(),
    )?;
    let chosen = matcher.select(&targets, modules)?;
    if let Some(m) = chosen.iter().find(|m| {
        !matches!(
            m.kind,
            ModuleKind::Linear { .. } | ModuleKind::Embedding { .. }
        )
    }) {
        return Err(PeftError::Unsupported(format!(
            "LoRA on `{}` ({:?}): only linear layers and embeddings can be adapted",
            m.path, m.kind
        )));
    }
    let targeted = chosen.iter().map(|m| m.path.clone()).collect();
    let embeddings = chosen
        .iter()
        .filter(|m| matches!(m.kind, ModuleKind::Embedding { .. }))
        .map(|m| m.path.clone())
        .collect();
    Ok((targeted, embeddings))
}

/// One LoRA pair for the layer at `path`, `[d_in → d_out]` (an embedding is `[num → dim]`), from
/// the configured init or from PEFT's keys in an adapter file.
pub(crate) fn make_pair(
    config: &LoraConfig,
    source: &Source<'_>,
    path: &str,
    (d_in, d_out): (usize, usize),
    is_embedding: bool,
    device: &burn::tensor::Device,
) -> Result<LoraLinear> {
    let (r, alpha) = config.rank_and_alpha(path);
    let scaling = config.scaling(r, alpha);
    // PEFT applies no dropout to an embedding's ids.
    let dropout = if is_embedding {
        0.0
    } else {
        config.lora_dropout
    };
    Ok(match source {
        Source::Init(init) => LoraLinear::init(d_in, d_out, r, scaling, dropout, *init, device),
        Source::File(store) => {
            let (a_key, b_key) = peft_keys(path, is_embedding);
            let a = store.f32_shaped(&a_key, &[r, d_in])?;
            let b = store.f32_shaped(&b_key, &[d_out, r])?;
            let a = burn_linear_weight(&a, [r, d_in], device);
            let b = burn_linear_weight(&b, [d_out, r], device);
            LoraLinear::new(a, b, scaling, dropout)
        }
    })
}

/// How `config.init_lora_weights` draws a fresh pair.
pub(crate) fn init_of(config: &LoraConfig) -> LoraInit {
    match &config.init_lora_weights {
        InitLoraWeights::Flag(true) => LoraInit::Default,
        InitLoraWeights::Flag(false) => LoraInit::Random,
        InitLoraWeights::Method(_) => LoraInit::Gaussian,
    }
}

fn inject<B: LoraBase>(
    base: B,
    config: LoraConfig,
    source: Source<'_>,
) -> Result<LoraModel<B::WithAdapter<LoraLinear>>> {
    config.validate("LoraConfig")?;
    let spec = base.spec().clone();
    let modules = base.modules();
    let (targeted, embedding_targets) = select_targets(&config, &spec.model_type, &modules)?;
    let (base, mut saved_params) =
        prepare_modules_to_save(base, config.modules_to_save.as_deref())?;
    for m in &modules {
        let has_bias = matches!(m.kind, ModuleKind::Linear { bias: true, .. });
        let selected = match config.bias {
            LoraBias::None => false,
            LoraBias::All => has_bias || matches!(m.kind, ModuleKind::LayerNorm { .. }),
            LoraBias::LoraOnly => has_bias && targeted.contains(&m.path),
        };
        if selected {
            saved_params.insert(format!("{}.bias", m.path));
        }
    }

    let device = base.device();
    let model = peft_core::tuner::inject_layers(
        base,
        &targeted,
        &saved_params,
        |path, dims, is_embedding| make_pair(&config, &source, path, dims, is_embedding, &device),
    )?;
    Ok(LoraModel {
        model,
        config,
        targeted,
        embedding_targets,
        saved_params: saved_params.into_iter().collect(),
        trainable: true,
    })
}

/// PEFT's `get_peft_model(model, LoraConfig(...))`: freezes the base, adds freshly initialised
/// LoRA pairs on the targeted layers, and makes `modules_to_save` / selected biases trainable.
pub fn get_peft_model<B: LoraBase>(
    base: B,
    config: LoraConfig,
) -> Result<LoraModel<B::WithAdapter<LoraLinear>>> {
    let init = init_of(&config);
    inject(base, config, Source::Init(init))
}

/// PEFT's `PeftModel.from_pretrained(model, adapter_dir)`: loads a LoRA adapter folder onto
/// `base`. With `trainable`, the adapter (and its saved modules) can be trained further;
/// otherwise everything is frozen (inference mode).
pub fn from_pretrained<B: LoraBase>(
    base: B,
    adapter_dir: impl AsRef<Path>,
    trainable: bool,
) -> Result<LoraModel<B::WithAdapter<LoraLinear>>> {
    let dir = adapter_dir.as_ref();
    let config = LoraConfig::from_file(dir.join(CONFIG_NAME))?;
    let weights = dir.join(WEIGHTS_NAME);
    let store = TensorStore::open(&weights)?;
    let lora = inject(base, config, Source::File(&store))?;

    // Every tensor of the file must belong to this model: a key that names no module means the
    // adapter was trained on another architecture.
    let mut lora = lora;
    let model_type = lora.model.spec().model_type.clone();
    let (targeted, embedding_targets) = (&lora.targeted, &lora.embedding_targets);
    let (model, _) = load_base_params(
        lora.model,
        &store,
        &weights,
        |name| {
            let module = name
                .strip_suffix(".lora_A.weight")
                .or_else(|| name.strip_suffix(".lora_B.weight"))
                .or_else(|| name.strip_suffix(".lora_embedding_A"))
                .or_else(|| name.strip_suffix(".lora_embedding_B"))?;
            Some(if targeted.iter().any(|t| t == module) {
                Ok(())
            } else {
                Err(PeftError::AdapterMismatch(format!(
                    "{}: `{KEY_PREFIX}{name}` targets `{module}`, which the config's \
                     target_modules do not select in this {model_type} model (adapter for \
                     another architecture?)",
                    weights.display(),
                )))
            })
        },
        // PEFT saves the base table of a LoRA-targeted embedding beside the pair (its
        // `save_embedding_layers="auto"`), as `<path>.base_layer.weight`, and the trained bias of
        // a LoRA-targeted layer (`bias="all"` / `"lora_only"`) as `<path>.base_layer.bias`.
        |name| {
            if let Some(module) = name.strip_suffix(".base_layer.weight")
                && embedding_targets.iter().any(|t| t == module)
            {
                return format!("{module}.weight");
            }
            if let Some(module) = name.strip_suffix(".base_layer.bias")
                && targeted.iter().any(|t| t == module)
            {
                return format!("{module}.bias");
            }
            name.to_string()
        },
    )?;
    lora.model = model;
    if !trainable {
        lora.model = peft_core::tuner::freeze(lora.model);
        lora.trainable = false;
    }
    Ok(lora)
}

/// PEFT's file keys of a layer's A and B.
pub(crate) fn peft_keys(path: &str, is_embedding: bool) -> (String, String) {
    if is_embedding {
        (
            format!("{KEY_PREFIX}{path}.lora_embedding_A"),
            format!("{KEY_PREFIX}{path}.lora_embedding_B"),
        )
    } else {
        (
            format!("{KEY_PREFIX}{path}.lora_A.weight"),
            format!("{KEY_PREFIX}{path}.lora_B.weight"),
        )
    }
}

impl<M: CausalLm<Adapter = LoraLinear>> LoraModel<M> {
    /// PEFT's `print_trainable_parameters()` numbers: the LoRA pairs and the parameters trained in
    /// full are trainable (none in inference mode); "all" counts the adapter too.
    pub fn trainable_summary(&self) -> TrainableSummary {
        peft_core::adapter_files::adapter_summary(&self.model, &self.saved_params, self.trainable)
    }

    /// The adapter's tensors under PEFT's key names and shapes.
    pub fn adapter_tensors(&self) -> Result<BTreeMap<String, peft_core::HostTensor>> {
        let mut out = BTreeMap::new();
        for (name, value) in named_values(&self.model)? {
            let is_embedding = |module: &str| self.embedding_targets.iter().any(|t| t == module);
            if let Some(module) = name.strip_suffix(".adapter.lora_a") {
                let (a_key, _) = peft_keys(module, is_embedding(module));
                out.insert(a_key, transpose_host(&value));
            } else if let Some(module) = name.strip_suffix(".adapter.lora_b") {
                let (_, b_key) = peft_keys(module, is_embedding(module));
                out.insert(b_key, transpose_host(&value));
            } else if self.saved_params.contains(&name) {
                // A targeted layer's bias lives under PEFT's wrapper: `<path>.base_layer.bias`.
                let key = match name.strip_suffix(".bias") {
                    Some(module) if self.targeted.iter().any(|t| t == module) => {
                        format!("{KEY_PREFIX}{module}.base_layer.bias")
                    }
                    _ => format!("{KEY_PREFIX}{name}"),
                };
                out.insert(key, value);
            } else if let Some(module) = name.strip_suffix(".weight")
                && is_embedding(module)
            {
                // As PEFT does for a targeted embedding: the base table goes with the adapter.
                out.insert(format!("{KEY_PREFIX}{module}.base_layer.weight"), value);
            }
        }
        Ok(out)
    }

    /// PEFT's `save_pretrained(dir)`: `adapter_config.json` + `adapter_model.safetensors`, each
    /// written atomically.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        save_adapter(dir.as_ref(), &self.config, &self.adapter_tensors()?)
    }

    /// PEFT's `merge_and_unload()`: folds every adapter into its base weight and returns the
    /// plain model.
    pub fn merge_and_unload(self) -> Result<M::WithAdapter<NoAdapter>> {
        peft_core::tuner::merge_and_unload(self.model)
    }

    /// PEFT's `unload()`: drops the adapters without merging.
    pub fn unload(self) -> Result<M::WithAdapter<NoAdapter>> {
        peft_core::tuner::unload(self.model)
    }
}

impl<M> LoraModel<M>
where
    M: CausalLm<Adapter = LoraLinear, WithAdapter<LoraLinear> = M>,
{
    /// PEFT's `merge_adapter()`: folds the adapters into the base weights, keeping them so that
    /// [`unmerge_adapter`](Self::unmerge_adapter) can undo it.
    pub fn merge_adapter(mut self) -> Result<Self> {
        self.model = peft_core::tuner::merge_layers(self.model)?;
        Ok(self)
    }

    /// PEFT's `unmerge_adapter()`.
    pub fn unmerge_adapter(mut self) -> Result<Self> {
        self.model = peft_core::tuner::unmerge_layers(self.model)?;
        Ok(self)
    }
}

impl<M: CausalLm<Adapter = LoraLinear>> peft_core::AdapterModel for LoraModel<M> {
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
        LoraModel::trainable_summary(self)
    }

    fn save_pretrained(&self, dir: &Path) -> Result<()> {
        LoraModel::save_pretrained(self, dir)
    }

    fn merge_and_unload(self) -> Result<M::WithAdapter<NoAdapter>> {
        LoraModel::merge_and_unload(self)
    }
}
