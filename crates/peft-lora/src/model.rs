//! `get_peft_model`, `PeftModel.from_pretrained`, `save_pretrained` and merging for LoRA.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use burn::tensor::{Tensor, TensorData};
pub use peft_core::adapter_files::{CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME};
use peft_core::tokens::TokenIndices;
use peft_core::tuner::{LayerTuner, NewLayer, Target, TunedModel, TunerConfig};
use peft_core::{
    BaseLinear, CausalLm, HostTensor, ModuleInfo, ModuleKind, ModuleMatcher, NoAdapter, PeftError,
    Result, TensorStore,
};
use peft_tensors::layout::{burn_linear_weight, transpose_host};

use crate::config::{LoraBias, LoraConfig};
use crate::dora::DoraMagnitude;
use crate::init::BaseInit;
use crate::layer::{LoraInit, LoraLinear};

/// A model with LoRA adapters on some of its linear layers (and embeddings): the core's
/// [`TunedModel`] for [`Lora`], with `save_pretrained`, `merge_adapter` / `unmerge_adapter`,
/// `merge_and_unload`, `unload` and `trainable_summary`.
pub type LoraModel<M> = TunedModel<Lora, M>;

/// LoRA as a layer method of the core's tuner: a [`LoraLinear`] pair on each targeted linear
/// layer or embedding, saved under PEFT's `lora_A` / `lora_B` (`lora_embedding_A/B`) keys.
#[derive(Debug, Clone, Copy)]
pub struct Lora;

/// What LoRA needs of the base model: any [`CausalLm`] without adapters.
pub trait LoraBase: CausalLm<Adapter = NoAdapter> {}
impl<M: CausalLm<Adapter = NoAdapter>> LoraBase for M {}

/// Where the A and B of each targeted layer come from.
pub(crate) enum Source<'a> {
    Init(LoraInit),
    File(&'a TensorStore),
}

/// The modules `config` adapts in `modules` (a `model_type` model): `(every targeted path, the
/// embeddings among them)`.
pub(crate) fn select_targets(
    config: &LoraConfig,
    model_type: &str,
    modules: &[peft_core::ModuleInfo],
) -> Result<(Vec<String>, Vec<String>)> {
    let chosen = Lora::select(config, model_type, modules)?;
    let targeted = chosen.iter().map(|m| m.path.clone()).collect();
    let embeddings = chosen
        .iter()
        .filter(|m| matches!(m.kind, ModuleKind::Embedding { .. }))
        .map(|m| m.path.clone())
        .collect();
    Ok((targeted, embeddings))
}

/// One LoRA pair for the layer at `path`, `[d_in → d_out]` (an embedding is `[num → dim]`), from
/// the configured init or from PEFT's keys in an adapter file; with `use_dora`, its magnitude
/// over `base` (the frozen linear layer; `None` for an embedding) too. With PiSSA or OLoRA the
/// initial pair comes from `base`, whose residual is returned as the layer's new base — for a
/// fresh adapter and for one read from a file alike (PEFT recomputes the residual when it loads
/// such an adapter); the DoRA magnitude is then taken over the residual, as PEFT's order does.
pub(crate) fn make_pair(
    config: &LoraConfig,
    source: &Source<'_>,
    target: Target<'_>,
    device: &burn::tensor::Device,
) -> Result<NewLayer<LoraLinear>> {
    let Target {
        path,
        dims: (d_in, d_out),
        is_embedding,
        base,
        embedding,
        ..
    } = target;
    let (r, alpha) = config.rank_and_alpha(path);
    let scaling = config.scaling(r, alpha);
    // PEFT applies no dropout to an embedding's ids.
    let dropout = if is_embedding {
        0.0
    } else {
        config.lora_dropout
    };
    let initial = match config.base_init() {
        Some(kind) => Some(initial_from_base(
            kind,
            path,
            base.filter(|_| !is_embedding),
            r,
            scaling,
            device,
        )?),
        None => None,
    };
    let mut pair = match (source, &initial) {
        (Source::Init(_), Some((a, b, _))) => {
            LoraLinear::new(a.clone(), b.clone(), scaling, dropout)
        }
        (Source::Init(init), None) => {
            LoraLinear::init(d_in, d_out, r, scaling, dropout, *init, device)
        }
        (Source::File(store), _) => {
            let (a_key, b_key) = peft_keys(path, is_embedding);
            let a = store.f32_shaped(&a_key, &[r, d_in])?;
            let b = store.f32_shaped(&b_key, &[d_out, r])?;
            let a = burn_linear_weight(&a, [r, d_in], device);
            let b = burn_linear_weight(&b, [d_out, r], device);
            LoraLinear::new(a, b, scaling, dropout)
        }
    };
    let new_base = initial.map(|(a, b, residual)| {
        pair.initial = Some((a, b));
        residual
    });
    if !config.use_dora {
        return Ok(NewLayer {
            adapter: pair,
            base: new_base,
        });
    }
    // DoRA's norm runs over the base the layer runs over: the residual after PiSSA / OLoRA (as
    // PEFT initialises the variant after them); an embedding's table as a `[num → dim]` layer.
    let table = embedding.map(|e| BaseLinear::Dense(crate::layer::table_as_linear(e)));
    let Some(base) = new_base.as_ref().or(base).or(table.as_ref()) else {
        return Err(PeftError::Unsupported(format!(
            "DoRA on `{path}`: no base weight to take the magnitude over"
        )));
    };
    let dora = match source {
        Source::Init(_) => pair.init_dora(base),
        Source::File(store) => {
            let key = magnitude_key(path);
            let m = store.f32_shaped(&key, &[d_out])?;
            let m = Tensor::<1>::from_data(TensorData::new(m, [d_out]), device);
            DoraMagnitude::new(m, base)
        }
    };
    Ok(NewLayer {
        adapter: pair.with_dora(dora),
        base: new_base,
    })
}

/// PiSSA's, OLoRA's or LoftQ's initial pair `(A₀: [in, r], B₀: [r, out])` in burn's layout, and
/// the base the layer then runs over (`W − s·B₀A₀`, or LoftQ's quantised `W`), from the dense
/// base `base` (its dtype kept).
fn initial_from_base(
    kind: BaseInit,
    path: &str,
    base: Option<&BaseLinear>,
    r: usize,
    scaling: f64,
    device: &burn::tensor::Device,
) -> Result<(Tensor<2>, Tensor<2>, BaseLinear)> {
    let Some(BaseLinear::Dense(linear)) = base else {
        return Err(PeftError::Unsupported(format!(
            "{} on `{path}`: the initialisation needs a dense linear base (not an embedding, a \
             4-bit base or a bf16 weight held packed; load the model with --widen-frozen)",
            kind.name()
        )));
    };
    let weight = linear.weight.val();
    let dtype = weight.dtype();
    let [d_in, d_out] = weight.dims();
    // PyTorch's [out, in] layout, as PEFT factors it.
    let w: Vec<f32> = weight
        .clone()
        .cast(burn::tensor::DType::F32)
        .transpose()
        .into_data()
        .iter::<f32>()
        .collect();
    let (a, b, residual) = kind.initialise(&w, [d_out, d_in], r, scaling, path)?;
    let residual = burn_linear_weight(&residual, [d_out, d_in], device).cast(dtype);
    let mut new_base = linear.clone();
    new_base.weight = new_base.weight.map(|_| residual);
    Ok((
        burn_linear_weight(&a, [r, d_in], device),
        burn_linear_weight(&b, [d_out, r], device),
        BaseLinear::Dense(new_base),
    ))
}

/// PEFT's file key of a layer's DoRA magnitude (PEFT saves the `lora_magnitude_vector` module's
/// `weight` without its `.weight` suffix).
pub(crate) fn magnitude_key(path: &str) -> String {
    format!("{KEY_PREFIX}{path}.lora_magnitude_vector")
}

/// How `config.init_lora_weights` draws a fresh pair.
pub(crate) fn init_of(config: &LoraConfig) -> Result<LoraInit> {
    config.fresh_init()
}

/// PEFT's `get_peft_model(model, LoraConfig(...))`: freezes the base, adds freshly initialised
/// LoRA pairs on the targeted layers, and makes `modules_to_save` / selected biases trainable.
pub fn get_peft_model<B: LoraBase>(
    base: B,
    config: LoraConfig,
) -> Result<LoraModel<B::WithAdapter<LoraLinear>>> {
    LoraModel::get_peft_model(base, config)
}

/// PEFT's `PeftModel.from_pretrained(model, adapter_dir)`: loads a LoRA adapter folder onto
/// `base`. With `trainable`, the adapter (and its saved modules) can be trained further;
/// otherwise everything is frozen (inference mode).
pub fn from_pretrained<B: LoraBase>(
    base: B,
    adapter_dir: impl AsRef<Path>,
    trainable: bool,
) -> Result<LoraModel<B::WithAdapter<LoraLinear>>> {
    LoraModel::from_pretrained(base, adapter_dir, trainable)
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

impl TunerConfig for LoraConfig {
    fn modules_to_save(&self) -> Option<&[String]> {
        self.modules_to_save.as_deref()
    }

    fn trainable_tokens(
        &self,
        _modules: &[ModuleInfo],
    ) -> Result<Option<(TokenIndices, &'static str)>> {
        Ok(self
            .trainable_token_indices
            .clone()
            .map(|ids| (ids, "trainable_token_indices")))
    }
}

impl LayerTuner for Lora {
    type Config = LoraConfig;
    type Layer = LoraLinear;

    /// PEFT's target matching with `exclude_modules`, `layers_to_transform` and
    /// `layers_pattern`; anything but linear layers and embeddings is refused.
    fn select<'m>(
        config: &LoraConfig,
        model_type: &str,
        modules: &'m [ModuleInfo],
    ) -> Result<Vec<&'m ModuleInfo>> {
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
        Ok(chosen)
    }

    /// The biases PEFT's `bias` selects: every bias (and LayerNorm) for `all`, the targeted
    /// layers' for `lora_only`.
    fn trained_base_params(
        config: &LoraConfig,
        modules: &[ModuleInfo],
        targeted: &[String],
    ) -> BTreeSet<String> {
        let mut trained = BTreeSet::new();
        for m in modules {
            let has_bias = matches!(m.kind, ModuleKind::Linear { bias: true, .. });
            let selected = match config.bias {
                LoraBias::None => false,
                LoraBias::All => has_bias || matches!(m.kind, ModuleKind::LayerNorm { .. }),
                LoraBias::LoraOnly => has_bias && targeted.contains(&m.path),
            };
            if selected {
                trained.insert(format!("{}.bias", m.path));
            }
        }
        trained
    }

    fn make_layer(
        config: &LoraConfig,
        _model_type: &str,
        target: Target<'_>,
        store: Option<&TensorStore>,
        device: &burn::tensor::Device,
    ) -> Result<NewLayer<LoraLinear>> {
        let source = match store {
            Some(store) => Source::File(store),
            None => Source::Init(init_of(config)?),
        };
        make_pair(config, &source, target, device)
    }

    fn module_of_key(key: &str) -> Option<&str> {
        key.strip_suffix(".lora_A.weight")
            .or_else(|| key.strip_suffix(".lora_B.weight"))
            .or_else(|| key.strip_suffix(".lora_embedding_A"))
            .or_else(|| key.strip_suffix(".lora_embedding_B"))
            .or_else(|| key.strip_suffix(".lora_magnitude_vector"))
    }

    /// `lora_a: [in, r]` → `lora_A.weight: [r, in]`, `lora_b: [r, out]` → `lora_B.weight:
    /// [out, r]` (an embedding's under `lora_embedding_A/B`); DoRA's magnitude `[out]` →
    /// `lora_magnitude_vector`.
    fn file_tensor(
        _config: &LoraConfig,
        _model_type: &str,
        path: &str,
        is_embedding: bool,
        param: &str,
        value: HostTensor,
    ) -> Result<(String, HostTensor)> {
        let (a_key, b_key) = peft_keys(path, is_embedding);
        if param == "dora.magnitude" {
            let key = magnitude_key(path);
            return Ok((key.strip_prefix(KEY_PREFIX).unwrap_or(&key).into(), value));
        }
        let key = match param {
            "lora_a" => a_key,
            "lora_b" => b_key,
            other => {
                return Err(PeftError::Unsupported(format!(
                    "LoRA layer `{path}` has an unknown tensor `{other}`"
                )));
            }
        };
        let key = key.strip_prefix(KEY_PREFIX).unwrap_or(&key).to_string();
        Ok((key, transpose_host(&value)))
    }
}

/// PEFT's `save_pretrained(dir, path_initial_model_for_weight_conversion=…)` for a PiSSA or
/// OLoRA adapter: the plain LoRA of rank `2r` that gives the same model over the *original*
/// base. `A′ = [A; A₀]`, `B′ = [B, −B₀]`, so `s·B′A′ = s·BA − s·B₀A₀` (the training's change);
/// `r`, `lora_alpha` and the rank / alpha patterns doubled (`lora_alpha · √2` with rsLoRA) so
/// that the scale stays; `init_lora_weights: true`. Layers without an initial pair are written
/// as they are.
pub fn save_pretrained_converted<M>(model: &LoraModel<M>, dir: impl AsRef<Path>) -> Result<()>
where
    M: CausalLm<Adapter = LoraLinear>,
{
    let mut config = model.config.clone();
    if let Some(kind) = config.base_init().filter(|k| !k.converts()) {
        // PEFT's conversion is for PiSSA and OLoRA; a LoftQ adapter runs over the quantised base.
        return Err(PeftError::Unsupported(format!(
            "converting a {} adapter to plain LoRA: it is meant for the base it quantised",
            kind.name()
        )));
    }
    if config.use_rslora && (!config.rank_pattern.is_empty() || !config.alpha_pattern.is_empty()) {
        // PEFT refuses this combination too: the patterns' scale cannot be kept with √2.
        return Err(PeftError::Unsupported(
            "converting to plain LoRA with use_rslora and rank_pattern / alpha_pattern".into(),
        ));
    }
    let mut tensors = model.adapter_tensors()?;
    let mut converted = BTreeMap::new();
    model.model.clone().map_layers(
        &mut |path, layer: peft_core::AdaptableLinear<LoraLinear>| {
            if let Some(pair) = &layer.adapter
                && let Some((a0, b0)) = &pair.initial
            {
                let a = Tensor::cat(vec![pair.lora_a.val(), a0.clone()], 1);
                let b = Tensor::cat(vec![pair.lora_b.val(), b0.clone().neg()], 0);
                converted.insert(path.to_string(), (a, b));
            }
            Ok(layer)
        },
        &mut |_, layer| Ok(layer),
    )?;
    for (path, (a, b)) in converted {
        let (a_key, b_key) = peft_keys(&path, false);
        let (a, a_shape) = torch_layout(a);
        let (b, b_shape) = torch_layout(b);
        tensors.insert(a_key, HostTensor::from_f32(a_shape.to_vec(), &a));
        tensors.insert(b_key, HostTensor::from_f32(b_shape.to_vec(), &b));
    }
    config.r *= 2;
    config.lora_alpha *= if config.use_rslora { 2f64.sqrt() } else { 2.0 };
    config.rank_pattern.values_mut().for_each(|r| *r *= 2);
    config.alpha_pattern.values_mut().for_each(|a| *a *= 2.0);
    config.init_lora_weights = crate::config::InitLoraWeights::Flag(true);
    peft_core::adapter_files::save_adapter(dir.as_ref(), &config, &tensors)
}

/// A burn-layout `[in, out]` matrix as PyTorch's `[out, in]` values and shape.
pub(crate) fn torch_layout(t: Tensor<2>) -> (Vec<f32>, [usize; 2]) {
    let data = peft_tensors::layout::transpose_data(t.into_data());
    let shape = [data.shape()[0], data.shape()[1]];
    (data.iter::<f32>().collect(), shape)
}
