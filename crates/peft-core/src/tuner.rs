//! The layer methods' shared model, in the spirit of PEFT's `BaseTuner`: a method (LoRA, IA3)
//! implements [`LayerTuner`] — its config, what it adds to one layer, which layers it takes and
//! how its tensors are named in PEFT's files — and [`TunedModel`] does everything else once:
//! `get_peft_model` (freeze, inject, re-enable `modules_to_save`), `from_pretrained` (read the
//! folder, check every key belongs to this model), `save_pretrained`, merge / unmerge / unload and
//! the trainable-parameters summary.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use burn::optim::GradientsParams;

use crate::adapter::{AdaptableEmbedding, AdaptableLinear, BaseLinear, LayerAdapter, NoAdapter};
use crate::adapter_files::{
    CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME, adapter_summary, adapter_trainable_names,
    load_base_params, prepare_modules_to_save, save_adapter, set_trainable,
};
use crate::config::MethodConfig;
use crate::error::{PeftError, Result};
use crate::model::{AdapterModel, CausalLm};
use crate::modules::{ModuleInfo, ModuleKind};
use crate::params::{ParamUpdate, map_params, named_values};
use crate::summary::TrainableSummary;
use crate::tokens::{
    TOKEN_KEY_SUFFIX, TOKEN_PARAM, TokenIndices, TokenKeys, TokenRows, TokenTarget,
    input_embedding, resolve_token_targets,
};
use peft_tensors::{HostTensor, TensorStore};

/// What the shared model needs of a layer method's config besides [`MethodConfig`].
pub trait TunerConfig: MethodConfig {
    /// PEFT's `modules_to_save`: modules trained in full and saved with the adapter.
    fn modules_to_save(&self) -> Option<&[String]>;

    /// The rows this config trains in full (PEFT's trainable tokens) in a model of `modules`:
    /// the indices, and the config key that holds them (for messages).
    fn trainable_tokens(
        &self,
        _modules: &[ModuleInfo],
    ) -> Result<Option<(TokenIndices, &'static str)>> {
        Ok(None)
    }

    /// How the file keys of trained rows are named.
    fn token_keys(&self) -> TokenKeys {
        TokenKeys::Wrapped
    }
}

/// One layer a method adapts.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The layer's HF path (`transformer.h.0.self_attention.query_key_value`).
    pub path: &'a str,
    /// `(d_in, d_out)` of a linear layer; `(num_embeddings, dim)` of an embedding.
    pub dims: (usize, usize),
    /// Whether the layer is an embedding table.
    pub is_embedding: bool,
    /// The frozen linear layer being adapted (`None` for an embedding): what a method whose
    /// initial state depends on the base weight reads (DoRA's magnitude, PEFT's
    /// `update_layer(base_layer, …)`).
    pub base: Option<&'a BaseLinear>,
    /// The frozen embedding being adapted (`None` for a linear layer).
    pub embedding: Option<&'a burn::nn::Embedding>,
    /// The method's model-level tensors ([`LayerTuner::shared_tensors`]; empty for most).
    pub shared: &'a BTreeMap<String, HostTensor>,
}

/// No model-level tensors: [`Target::shared`] for the methods that have none.
pub static NO_SHARED: BTreeMap<String, HostTensor> = BTreeMap::new();

/// Tensors a method keeps once per model rather than per layer (VeRA's `vera_A` / `vera_B`),
/// under their full file keys.
#[derive(Debug, Clone, Default)]
pub struct SharedTensors {
    /// Full file key → tensor, in PyTorch's layout.
    pub tensors: BTreeMap<String, HostTensor>,
    /// Whether `save_pretrained` writes them (VeRA's `save_projection`).
    pub saved: bool,
}

/// What [`LayerTuner::make_layer`] builds for one layer: the adapter, and the base weight the
/// layer runs over from then on when the method changes it (PiSSA and OLoRA subtract their
/// initial product from it; `None` keeps the base).
#[derive(Debug)]
pub struct NewLayer<L> {
    /// The layer's adapter.
    pub adapter: L,
    /// The replacement base, if any.
    pub base: Option<BaseLinear>,
}

impl<L> From<L> for NewLayer<L> {
    fn from(adapter: L) -> Self {
        Self {
            adapter,
            base: None,
        }
    }
}

/// A layer method: what it adds to one layer and how PEFT names it in files. Implemented by a
/// marker type per method (`peft_lora::Lora`, `peft_ia3::Ia3`); [`TunedModel`] is the model.
pub trait LayerTuner: Sized {
    /// The method's config.
    type Config: TunerConfig;
    /// What the method adds to one targeted layer.
    type Layer: LayerAdapter;

    /// The modules `config` adapts among `modules` of a `model_type` model (PEFT's default
    /// targets when the config names none); a module the method cannot adapt is an error.
    fn select<'m>(
        config: &Self::Config,
        model_type: &str,
        modules: &'m [ModuleInfo],
    ) -> Result<Vec<&'m ModuleInfo>>;

    /// Base parameters (HF names) the config trains besides `modules_to_save` (LoRA's `bias`).
    fn trained_base_params(
        _config: &Self::Config,
        _modules: &[ModuleInfo],
        _targeted: &[String],
    ) -> BTreeSet<String> {
        BTreeSet::new()
    }

    /// The adapter of one targeted layer: freshly initialised (`store` is `None`) or read from
    /// PEFT's keys in an adapter file; with the base it runs over, when the method changes it.
    fn make_layer(
        config: &Self::Config,
        model_type: &str,
        target: Target<'_>,
        store: Option<&TensorStore>,
        device: &burn::tensor::Device,
    ) -> Result<NewLayer<Self::Layer>>;

    /// Full file keys outside PEFT's `base_model.model.` prefix that the method reads itself
    /// (through [`shared_tensors`](Self::shared_tensors)); loading skips them.
    const MODEL_KEYS: &'static [&'static str] = &[];

    /// Numbers PEFT counts among a model's parameters for each adapted layer that are not burn
    /// parameters here (AdaLoRA's frozen one-element `ranknum`, a constant of the layer): added
    /// to [`TrainableSummary::all`] so that the counts are PEFT's.
    const FROZEN_NUMBERS_PER_LAYER: usize = 0;

    /// The method's model-level tensors for a model whose targeted linear layers are at most
    /// `largest = (d_in, d_out)` wide: read from `store` (an adapter file) or made; every
    /// layer's [`Target::shared`]. None by default.
    fn shared_tensors(
        _config: &Self::Config,
        _largest: (usize, usize),
        _store: Option<&TensorStore>,
    ) -> Result<SharedTensors> {
        Ok(SharedTensors::default())
    }

    /// The method's term of the training loss over the adapted `model` (see
    /// [`AdapterModel::regularization`]); none by default.
    fn regularization<M: CausalLm<Adapter = Self::Layer, WithAdapter<Self::Layer> = M>>(
        _config: &Self::Config,
        _model: &M,
    ) -> Result<Option<burn::tensor::Tensor<1>>> {
        Ok(None)
    }

    /// The gradients the method needs after an optimizer step (see
    /// [`AdapterModel::keep_gradients`]); none by default.
    fn keep_gradients<M: CausalLm<Adapter = Self::Layer, WithAdapter<Self::Layer> = M>>(
        _model: &M,
        _grads: &GradientsParams,
    ) -> Option<GradientsParams> {
        None
    }

    /// The method's work after optimizer step `step` (see
    /// [`AdapterModel::after_optimizer_step`]): it may change the model's adapters and its
    /// config (AdaLoRA's masks and `rank_pattern`). The identity by default.
    fn after_optimizer_step<M: CausalLm<Adapter = Self::Layer, WithAdapter<Self::Layer> = M>>(
        _config: &mut Self::Config,
        model: M,
        _step: usize,
        _kept: Option<GradientsParams>,
    ) -> Result<M> {
        Ok(model)
    }

    /// The module a file key (without PEFT's `base_model.model.` prefix) holds an adapter tensor
    /// of (`….lora_A.weight` → `…`), or `None` for a key that is not the method's.
    fn module_of_key(key: &str) -> Option<&str>;

    /// PEFT's key (without the prefix) and value of one adapter tensor of the layer at `path`;
    /// `param` is the tensor's name inside the layer's adapter (`lora_a`).
    fn file_tensor(
        config: &Self::Config,
        model_type: &str,
        path: &str,
        is_embedding: bool,
        param: &str,
        value: HostTensor,
    ) -> Result<(String, HostTensor)>;
}

/// A model with a layer method's adapters on some of its layers (PEFT's `PeftModel` over a
/// `BaseTuner`): `peft_lora::LoraModel<M>` is `TunedModel<Lora, M>`.
#[derive(Debug)]
pub struct TunedModel<T: LayerTuner, M> {
    /// The adapted model.
    pub model: M,
    /// The adapter's config.
    pub config: T::Config,
    /// HF paths of the adapted layers.
    pub targeted: Vec<String>,
    /// The subset of `targeted` that are embeddings.
    pub embedding_targets: Vec<String>,
    /// HF names of base parameters trained in full and saved with the adapter
    /// (`modules_to_save`, and what [`LayerTuner::trained_base_params`] adds).
    pub saved_params: Vec<String>,
    /// The tables whose rows train in full ([`TunerConfig::trainable_tokens`]).
    pub token_targets: Vec<TokenTarget>,
    /// Whether the adapter trains (false after loading for inference, PEFT's
    /// `is_trainable=False`).
    pub trainable: bool,
    /// The method's model-level tensors ([`LayerTuner::shared_tensors`]).
    pub shared: SharedTensors,
}

/// A copy sharing nothing mutable (PEFT users' `copy.deepcopy(peft_model)`): burn's tensors are
/// immutable values, so training either copy leaves the other as it was.
impl<T: LayerTuner, M: Clone> Clone for TunedModel<T, M>
where
    T::Config: Clone,
{
    fn clone(&self) -> Self {
        Self {
            model: self.model.clone(),
            config: self.config.clone(),
            targeted: self.targeted.clone(),
            embedding_targets: self.embedding_targets.clone(),
            saved_params: self.saved_params.clone(),
            token_targets: self.token_targets.clone(),
            trainable: self.trainable,
            shared: self.shared.clone(),
        }
    }
}

impl<T: LayerTuner, M: CausalLm<Adapter = T::Layer>> TunedModel<T, M> {
    /// PEFT's `get_peft_model(model, config)`: freezes `base`, adds freshly initialised
    /// adapters on the targeted layers, and makes `modules_to_save` (and the method's trained
    /// base parameters) trainable.
    pub fn get_peft_model<B>(base: B, config: T::Config) -> Result<Self>
    where
        B: CausalLm<Adapter = NoAdapter, WithAdapter<T::Layer> = M>,
    {
        Self::inject(base, config, None)
    }

    /// PEFT's `PeftModel.from_pretrained(model, adapter_dir, is_trainable)`: loads an adapter
    /// folder onto `base`. Every tensor of the file must belong to this model: a method key for
    /// a module the config does not select means an adapter for another architecture. With
    /// `trainable` false every parameter is frozen (inference).
    pub fn from_pretrained<B>(
        base: B,
        adapter_dir: impl AsRef<Path>,
        trainable: bool,
    ) -> Result<Self>
    where
        B: CausalLm<Adapter = NoAdapter, WithAdapter<T::Layer> = M>,
    {
        let dir = adapter_dir.as_ref();
        let config = T::Config::from_file(dir.join(CONFIG_NAME))?;
        let weights = dir.join(WEIGHTS_NAME);
        let store = TensorStore::open(&weights)?;
        let mut tuned = Self::inject(base, config, Some(&store))?;
        let model_type = tuned.model.spec().model_type.clone();
        let targeted = &tuned.targeted;
        let token_keys: BTreeSet<String> = tuned.token_file_keys().into_iter().collect();
        let (model, _) = load_base_params(
            tuned.model,
            &store,
            &weights,
            T::MODEL_KEYS,
            |name| {
                if name.ends_with(TOKEN_KEY_SUFFIX) {
                    return Some(if token_keys.contains(name) {
                        Ok(())
                    } else {
                        Err(PeftError::AdapterMismatch(format!(
                            "{}: `{KEY_PREFIX}{name}` holds trained token rows of a layer the \
                             config's token indices do not name in this {model_type} model",
                            weights.display(),
                        )))
                    });
                }
                let module = T::module_of_key(name)?;
                Some(if targeted.iter().any(|t| t == module) {
                    Ok(())
                } else {
                    Err(PeftError::AdapterMismatch(format!(
                        "{}: `{KEY_PREFIX}{name}` adapts `{module}`, which the config's \
                         target_modules do not select in this {model_type} model (adapter for \
                         another architecture?)",
                        weights.display(),
                    )))
                })
            },
            // PEFT wraps an adapted layer, so the base parameters it saves of one (an
            // embedding's table, a trained bias) are `<path>.base_layer.<param>`.
            |name| match split_base_layer(name) {
                Some((module, param)) if targeted.iter().any(|t| t == module) => {
                    format!("{module}.{param}")
                }
                _ => name.to_string(),
            },
        )?;
        tuned.model = model;
        if !trainable {
            tuned.model = freeze(tuned.model);
            tuned.trainable = false;
        }
        Ok(tuned)
    }

    fn inject<B>(base: B, config: T::Config, store: Option<&TensorStore>) -> Result<Self>
    where
        B: CausalLm<Adapter = NoAdapter, WithAdapter<T::Layer> = M>,
    {
        config.validate(T::Config::NAME)?;
        let model_type = base.spec().model_type.clone();
        let modules = base.modules();
        let chosen = T::select(&config, &model_type, &modules)?;
        let targeted: Vec<String> = chosen.iter().map(|m| m.path.clone()).collect();
        let embedding_targets = chosen
            .iter()
            .filter(|m| matches!(m.kind, ModuleKind::Embedding { .. }))
            .map(|m| m.path.clone())
            .collect();
        let token_targets = match config.trainable_tokens(&modules)? {
            Some((indices, field)) => {
                let found = resolve_token_targets(&indices, &modules, T::Config::NAME, field)?;
                if let Some(t) = found.iter().find(|t| targeted.contains(&t.path)) {
                    return Err(PeftError::InvalidConfig {
                        context: T::Config::NAME.to_string(),
                        field: field.to_string(),
                        reason: format!(
                            "`{}` is also adapted by target_modules; train its rows either way, \
                             not both",
                            t.path
                        ),
                    });
                }
                found
            }
            None => Vec::new(),
        };
        let keys = config.token_keys();
        let (base, mut saved_params) = prepare_modules_to_save(base, config.modules_to_save())?;
        saved_params.extend(T::trained_base_params(&config, &modules, &targeted));
        let device = base.device();
        let largest = chosen.iter().fold((0, 0), |(i, o), m| match m.kind {
            ModuleKind::Linear {
                in_features,
                out_features,
                ..
            } => (i.max(in_features), o.max(out_features)),
            _ => (i, o),
        });
        let shared = T::shared_tensors(&config, largest, store)?;
        let model = inject_layers_and_tokens(
            base,
            &targeted,
            &saved_params,
            &token_targets,
            |target| {
                let target = Target {
                    shared: &shared.tensors,
                    ..target
                };
                T::make_layer(&config, &model_type, target, store, &device)
            },
            |target, table| token_rows(target, table, store, keys, T::Config::NAME),
        )?;
        Ok(Self {
            model,
            config,
            targeted,
            embedding_targets,
            saved_params: saved_params.into_iter().collect(),
            token_targets,
            trainable: true,
            shared,
        })
    }

    /// The file keys (without PEFT's prefix) of the trained token rows this model writes and
    /// reads: each table's, and with the stand-alone method a tied output layer's copy.
    fn token_file_keys(&self) -> Vec<String> {
        let keys = self.config.token_keys();
        let mut out: Vec<String> = self
            .token_targets
            .iter()
            .map(|t| keys.key(&t.path))
            .collect();
        if let Some(tied) = self.tied_token_copy() {
            out.push(keys.key(&tied));
        }
        out
    }

    /// The tied output layer's path when the stand-alone method writes its copy of the
    /// embedding's rows (PEFT's state dict holds the shared parameter under both paths).
    fn tied_token_copy(&self) -> Option<String> {
        if self.config.token_keys() != TokenKeys::Standalone
            || !self.model.spec().tie_word_embeddings
        {
            return None;
        }
        let modules = self.model.modules();
        let embedding = input_embedding(&modules)?;
        if !self.token_targets.iter().any(|t| t.path == embedding.path) {
            return None;
        }
        modules.iter().find(|m| m.tied).map(|m| m.path.clone())
    }

    /// PEFT's `print_trainable_parameters()` numbers: the adapters and the parameters trained in
    /// full are trainable (none in inference mode); "all" counts the adapters too.
    pub fn trainable_summary(&self) -> TrainableSummary {
        let mut summary = adapter_summary(&self.model, &self.saved_params, self.trainable);
        summary.all += T::FROZEN_NUMBERS_PER_LAYER * self.targeted.len();
        summary
    }

    /// The adapter's tensors under PEFT's keys and shapes: the method's tensors, the saved base
    /// parameters (under `<path>.base_layer.` for an adapted layer, as PEFT's wrapper names
    /// them), and an adapted embedding's base table (PEFT's `save_embedding_layers="auto"`).
    pub fn adapter_tensors(&self) -> Result<BTreeMap<String, HostTensor>> {
        let model_type = &self.model.spec().model_type;
        let mut out = BTreeMap::new();
        if self.shared.saved {
            out.extend(self.shared.tensors.clone());
        }
        let keys = self.config.token_keys();
        let tied_copy = self.tied_token_copy();
        for (name, value) in named_values(&self.model)? {
            if let Some(module) = name.strip_suffix(TOKEN_PARAM) {
                if let Some(tied) = &tied_copy {
                    out.insert(format!("{KEY_PREFIX}{}", keys.key(tied)), value.clone());
                }
                out.insert(format!("{KEY_PREFIX}{}", keys.key(module)), value);
                continue;
            }
            if let Some((module, param)) = name.rsplit_once(".adapter.") {
                let is_embedding = self.is_embedding(module);
                let (key, value) =
                    T::file_tensor(&self.config, model_type, module, is_embedding, param, value)?;
                out.insert(format!("{KEY_PREFIX}{key}"), value);
                continue;
            }
            let Some((module, param)) = name.rsplit_once('.') else {
                continue;
            };
            let targeted = self.targeted.iter().any(|t| t == module);
            if self.saved_params.contains(&name) || (self.is_embedding(module) && param == "weight")
            {
                let key = if targeted {
                    format!("{KEY_PREFIX}{module}.base_layer.{param}")
                } else {
                    format!("{KEY_PREFIX}{name}")
                };
                out.insert(key, value);
            }
        }
        Ok(out)
    }

    fn is_embedding(&self, module: &str) -> bool {
        self.embedding_targets.iter().any(|t| t == module)
    }

    /// PEFT's `save_pretrained(dir)`: `adapter_config.json` + `adapter_model.safetensors`, each
    /// written atomically.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        save_adapter(dir.as_ref(), &self.config, &self.adapter_tensors()?)
    }

    /// PEFT's `merge_and_unload()`: folds every adapter into its base weight and returns the
    /// plain model.
    pub fn merge_and_unload(self) -> Result<M::WithAdapter<NoAdapter>> {
        merge_and_unload(self.model)
    }

    /// PEFT's `unload()`: drops the adapters without merging.
    pub fn unload(self) -> Result<M::WithAdapter<NoAdapter>> {
        unload(self.model)
    }
}

impl<T, M> TunedModel<T, M>
where
    T: LayerTuner,
    M: CausalLm<Adapter = T::Layer, WithAdapter<T::Layer> = M>,
{
    /// PEFT's `merge_adapter()`: folds the adapters into the base weights, keeping them so that
    /// [`unmerge_adapter`](Self::unmerge_adapter) can undo it.
    pub fn merge_adapter(mut self) -> Result<Self> {
        self.model = merge_layers(self.model)?;
        Ok(self)
    }

    /// PEFT's `unmerge_adapter()`.
    pub fn unmerge_adapter(mut self) -> Result<Self> {
        self.model = unmerge_layers(self.model)?;
        Ok(self)
    }
}

impl<T, M> AdapterModel for TunedModel<T, M>
where
    T: LayerTuner,
    M: CausalLm<Adapter = T::Layer, WithAdapter<T::Layer> = M>,
{
    type Model = M;

    fn model(&self) -> &M {
        &self.model
    }

    fn with_model(mut self, model: M) -> Self {
        self.model = model;
        self
    }

    fn trainable_names(&self) -> Vec<String> {
        adapter_trainable_names(&self.model, &self.saved_params)
    }

    fn config_json(&self) -> Result<serde_json::Value> {
        crate::adapter_files::config_json(&self.config)
    }

    fn trainable_summary(&self) -> TrainableSummary {
        TunedModel::trainable_summary(self)
    }

    fn save_pretrained(&self, dir: &Path) -> Result<()> {
        TunedModel::save_pretrained(self, dir)
    }

    fn merge_and_unload(self) -> Result<M::WithAdapter<NoAdapter>> {
        TunedModel::merge_and_unload(self)
    }

    fn regularization(&self) -> Result<Option<burn::tensor::Tensor<1>>> {
        T::regularization(&self.config, &self.model)
    }

    fn keep_gradients(&self, grads: &GradientsParams) -> Option<GradientsParams> {
        T::keep_gradients(&self.model, grads)
    }

    fn after_optimizer_step(mut self, step: usize, kept: Option<GradientsParams>) -> Result<Self> {
        self.model = T::after_optimizer_step(&mut self.config, self.model, step, kept)?;
        Ok(self)
    }
}

/// `(module, param)` of a file name under PEFT's wrapper (`<module>.base_layer.<param>`).
fn split_base_layer(name: &str) -> Option<(&str, &str)> {
    let (module, param) = name.rsplit_once('.')?;
    Some((module.strip_suffix(".base_layer")?, param))
}

/// Freezes `base`, gives every layer in `targeted` the adapter `make(target)` builds for it (an
/// embedding's dims are `(num_embeddings, dim)`; a linear layer's base replaced where `make`
/// gives one), and makes the base parameters named in `trained` trainable again
/// (`modules_to_save`, selected biases).
pub fn inject_layers<B, A>(
    base: B,
    targeted: &[String],
    trained: &BTreeSet<String>,
    make: impl FnMut(Target<'_>) -> Result<NewLayer<A>>,
) -> Result<B::WithAdapter<A>>
where
    B: CausalLm<Adapter = NoAdapter>,
    A: LayerAdapter,
{
    inject_layers_and_tokens(base, targeted, trained, &[], make, |_, _| {
        unreachable!("no token targets")
    })
}

/// [`inject_layers`], and trained rows on the tables `tokens` names: `make_tokens(target,
/// table)` builds them from the table in PyTorch's layout (`[rows, dim]`; an output layer's
/// weight `[vocab, hidden]`).
pub fn inject_layers_and_tokens<B, A>(
    base: B,
    targeted: &[String],
    trained: &BTreeSet<String>,
    tokens: &[TokenTarget],
    mut make: impl FnMut(Target<'_>) -> Result<NewLayer<A>>,
    mut make_tokens: impl FnMut(&TokenTarget, burn::tensor::Tensor<2>) -> Result<TokenRows>,
) -> Result<B::WithAdapter<A>>
where
    B: CausalLm<Adapter = NoAdapter>,
    A: LayerAdapter,
{
    let base = map_params(base, |_, _| ParamUpdate::Trainable(false));
    let is_target = |path: &str| targeted.iter().any(|t| t == path);
    let token_target = |path: &str| tokens.iter().find(|t| t.path == path);
    let make = std::cell::RefCell::new(&mut make);
    let make_tokens = std::cell::RefCell::new(&mut make_tokens);
    let model = base.map_layers(
        &mut |path: &str, mut layer: AdaptableLinear<NoAdapter>| {
            if let Some(t) = token_target(path) {
                let table = layer.base.clone().into_dense().weight.val().transpose();
                layer.token_adapter = Some((make_tokens.borrow_mut())(t, table)?);
            }
            if !is_target(path) {
                return Ok(layer.with_adapter(None));
            }
            let target = Target {
                path,
                dims: layer.dims(),
                is_embedding: false,
                base: Some(&layer.base),
                embedding: None,
                shared: &NO_SHARED,
            };
            let NewLayer { adapter, base } = (make.borrow_mut())(target)?;
            let mut layer = layer.with_adapter(Some(adapter));
            if let Some(base) = base {
                // Frozen, as every base parameter here.
                layer.base = crate::params::map_params(base, |_, _| ParamUpdate::Trainable(false));
            }
            Ok(layer)
        },
        &mut |path: &str, mut layer: AdaptableEmbedding<NoAdapter>| {
            if let Some(t) = token_target(path) {
                let table = layer.base.weight.val();
                layer.token_adapter = Some((make_tokens.borrow_mut())(t, table)?);
            }
            if !is_target(path) {
                return Ok(layer.with_adapter(None));
            }
            let target = Target {
                path,
                dims: layer.dims(),
                is_embedding: true,
                base: None,
                embedding: Some(&layer.base),
                shared: &NO_SHARED,
            };
            let adapter = (make.borrow_mut())(target)?.adapter;
            Ok(layer.with_adapter(Some(adapter)))
        },
    )?;
    Ok(if trained.is_empty() {
        model
    } else {
        set_trainable(model, trained)
    })
}

/// The trained rows of `target` over `table` (`[rows, dim]`): starting at the table's rows, or
/// read from `store` under the key `keys` gives (an f32 `[n, dim]` tensor).
fn token_rows(
    target: &TokenTarget,
    table: burn::tensor::Tensor<2>,
    store: Option<&TensorStore>,
    keys: TokenKeys,
    context: &str,
) -> Result<TokenRows> {
    let fresh = TokenRows::from_table(&target.ids, table, context, "token indices")?;
    let Some(store) = store else {
        return Ok(fresh);
    };
    let key = format!("{KEY_PREFIX}{}", keys.key(&target.path));
    let shape = [target.ids.len(), fresh.original.dims()[1]];
    let data = store.f32_shaped(&key, &shape)?;
    let values = burn::tensor::Tensor::<2>::from_data(
        burn::tensor::TensorData::new(data, shape),
        &fresh.original.device(),
    );
    Ok(TokenRows::with_values(&target.ids, values, fresh.original))
}

/// Every parameter frozen (an adapter loaded for inference, PEFT's `is_trainable=False`).
pub fn freeze<M: burn::module::Module>(model: M) -> M {
    map_params(model, |_, _| ParamUpdate::Trainable(false))
}

/// `adapter` as loaded (`trainable`), or with every parameter frozen (inference, PEFT's
/// `is_trainable=False`): the tail of every method's `from_pretrained`.
pub fn trainable_or_frozen<A: AdapterModel>(adapter: A, trainable: bool) -> A {
    if trainable {
        return adapter;
    }
    let frozen = freeze(adapter.model().clone());
    adapter.with_model(frozen)
}

/// PEFT's `merge_and_unload()`: every adapter folded into its base weight, the plain model
/// returned.
pub fn merge_and_unload<M: CausalLm>(model: M) -> Result<M::WithAdapter<NoAdapter>> {
    model.map_layers(
        &mut |_, layer: AdaptableLinear<M::Adapter>| {
            Ok(layer
                .merge()?
                .without_tokens()
                .with_adapter::<NoAdapter>(None))
        },
        &mut |_, layer: AdaptableEmbedding<M::Adapter>| {
            Ok(layer
                .merge()?
                .without_tokens()
                .with_adapter::<NoAdapter>(None))
        },
    )
}

/// PEFT's `unload()`: the adapters dropped without merging.
pub fn unload<M: CausalLm>(model: M) -> Result<M::WithAdapter<NoAdapter>> {
    model.map_layers(
        &mut |_, layer: AdaptableLinear<M::Adapter>| {
            Ok(layer.without_tokens().with_adapter::<NoAdapter>(None))
        },
        &mut |_, layer: AdaptableEmbedding<M::Adapter>| {
            Ok(layer.without_tokens().with_adapter::<NoAdapter>(None))
        },
    )
}

/// PEFT's `merge_adapter()`: the adapters folded into the base weights and kept, so that
/// [`unmerge_layers`] can undo it.
pub fn merge_layers<M>(model: M) -> Result<M>
where
    M: CausalLm<WithAdapter<<M as CausalLm>::Adapter> = M>,
{
    model.map_layers(
        &mut |_, l: AdaptableLinear<M::Adapter>| l.merge(),
        &mut |_, e: AdaptableEmbedding<M::Adapter>| e.merge(),
    )
}

/// PEFT's `unmerge_adapter()`.
pub fn unmerge_layers<M>(model: M) -> Result<M>
where
    M: CausalLm<WithAdapter<<M as CausalLm>::Adapter> = M>,
{
    model.map_layers(
        &mut |_, l: AdaptableLinear<M::Adapter>| l.unmerge(),
        &mut |_, e: AdaptableEmbedding<M::Adapter>| e.unmerge(),
    )
}
