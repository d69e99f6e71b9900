//! PEFT's `PeftMixedModel`: adapters of different layer methods — LoRA, LoHa, LoKr — loaded
//! onto one base under names and active together. Each adapted layer holds an
//! [`AdapterSet`] of [`MixedLayer`]s; with several active, the output is `base(x)` plus every
//! active adapter's term, and merging folds the active ones into the weights in activation
//! order — what PEFT's mixed model computes.
//!
//! ```no_run
//! use burn::tensor::Device;
//! use peft::mixed::PeftMixedModel;
//!
//! let base = peft_models::load("tests/fixtures/models/llama-tiny", &Device::flex()).unwrap();
//! let mut mixed = PeftMixedModel::new(base).unwrap();
//! mixed.load_adapter("lora", "tests/fixtures/adapters/lora-llama").unwrap();
//! mixed.load_adapter("loha", "tests/fixtures/adapters/loha-llama").unwrap();
//! mixed.set_adapter(&["lora", "loha"]).unwrap();
//! let merged = mixed.merge_and_unload().unwrap();
//! ```

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::nn::{Embedding, Linear};
use burn::tensor::{Int, Tensor};
use peft_core::params::{ParamUpdate, map_params};
use peft_core::{
    AdaptableEmbedding, AdaptableLinear, AdapterSet, BaseLinear, CausalLm, LayerAdapter, NoAdapter,
    PeftError, PeftType, Result,
};
use peft_models::AnyModel;

/// One adapted layer's adapter of any method the mixed model takes.
// One per adapter and layer, held in the layer's set: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum MixedLayer {
    /// A LoRA pair (not DoRA: PEFT's mixed model adds terms, which DoRA's rescaling is not).
    Lora(peft_lora::LoraLinear),
    /// LoHa's four factors.
    Loha(peft_loha::LohaLinear),
    /// LoKr's factors.
    Lokr(peft_lokr::LokrLinear),
}

/// Calls `$f` on the variant's layer.
macro_rules! each {
    ($self:expr, $a:ident => $f:expr) => {
        match $self {
            MixedLayer::Lora($a) => $f,
            MixedLayer::Loha($a) => $f,
            MixedLayer::Lokr($a) => $f,
        }
    };
}

impl LayerAdapter for MixedLayer {
    fn forward_linear(&self, base: &BaseLinear, x: Tensor<3>) -> Tensor<3> {
        each!(self, a => a.forward_linear(base, x))
    }

    fn forward_embedding(&self, base: &Embedding, ids: Tensor<2, Int>) -> Tensor<3> {
        each!(self, a => a.forward_embedding(base, ids))
    }

    fn delta_linear(
        &self,
        base: &BaseLinear,
        x: Tensor<3>,
        result: &Tensor<3>,
    ) -> Option<Tensor<3>> {
        each!(self, a => a.delta_linear(base, x, result))
    }

    fn delta_embedding(
        &self,
        base: &Embedding,
        ids: Tensor<2, Int>,
        result: &Tensor<3>,
    ) -> Option<Tensor<3>> {
        each!(self, a => a.delta_embedding(base, ids, result))
    }

    fn is_additive(&self) -> bool {
        each!(self, a => a.is_additive())
    }

    fn merge_linear(&mut self, base: Linear) -> Result<Linear> {
        each!(self, a => a.merge_linear(base))
    }

    fn unmerge_linear(&mut self, base: Linear) -> Result<Linear> {
        each!(self, a => a.unmerge_linear(base))
    }

    fn merge_embedding(&mut self, base: Embedding) -> Result<Embedding> {
        each!(self, a => a.merge_embedding(base))
    }

    fn unmerge_embedding(&mut self, base: Embedding) -> Result<Embedding> {
        each!(self, a => a.unmerge_embedding(base))
    }
}

/// The adapter type of a mixed model's layers.
pub type MixedSet = AdapterSet<MixedLayer>;

/// PEFT's `PeftMixedModel` over a model of the [`AnyModel`] family.
#[derive(Debug)]
pub struct PeftMixedModel {
    /// The base with every loaded adapter (frozen: the mixed model is for inference and
    /// merging, as in PEFT).
    pub model: AnyModel<MixedSet>,
    /// The frozen base without adapters, from which each folder is read.
    base: AnyModel<NoAdapter>,
    /// Loaded adapters: name and method, in load order.
    adapters: Vec<(String, PeftType)>,
    /// Active adapters, in activation order.
    active: Vec<String>,
}

impl PeftMixedModel {
    /// A frozen `base` ready to take adapters (none loaded, none active).
    pub fn new(base: AnyModel<NoAdapter>) -> Result<Self> {
        let base = map_params(base, |_, _| ParamUpdate::Trainable(false));
        let model = base.clone().map_layers(
            &mut |_, layer: AdaptableLinear<NoAdapter>| Ok(layer.with_adapter(None)),
            &mut |_, layer: AdaptableEmbedding<NoAdapter>| Ok(layer.with_adapter(None)),
        )?;
        Ok(Self {
            model,
            base,
            adapters: Vec::new(),
            active: Vec::new(),
        })
    }

    /// Loads the PEFT folder `dir` (LoRA, LoHa or LoKr) as adapter `name` (PEFT's
    /// `load_adapter(dir, adapter_name=name)`); not activated. The model is unchanged on error.
    pub fn load_adapter(&mut self, name: &str, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        if self.adapters.iter().any(|(n, _)| n == name) {
            return Err(PeftError::AdapterMismatch(format!(
                "an adapter named `{name}` is already loaded"
            )));
        }
        let peft_type =
            peft_core::config::read_peft_type(dir.join(peft_core::adapter_files::CONFIG_NAME))?;
        let base = self.base.clone();
        let layers = match peft_type {
            PeftType::Lora => {
                let lora = peft_lora::from_pretrained(base, dir, false)?;
                if lora.config.use_dora {
                    return Err(PeftError::Unsupported(format!(
                        "{}: a DoRA adapter in a mixed model (PEFT's mixed model adds the \
                         adapters' terms; DoRA rescales the whole output)",
                        dir.display()
                    )));
                }
                layers_only(&lora.saved_params, &lora.token_targets, dir)?;
                harvest(lora.model, MixedLayer::Lora)?
            }
            PeftType::Loha => {
                let loha = peft_loha::from_pretrained(base, dir, false)?;
                layers_only(&loha.saved_params, &loha.token_targets, dir)?;
                harvest(loha.model, MixedLayer::Loha)?
            }
            PeftType::Lokr => {
                let lokr = peft_lokr::from_pretrained(base, dir, false)?;
                layers_only(&lokr.saved_params, &lokr.token_targets, dir)?;
                harvest(lokr.model, MixedLayer::Lokr)?
            }
            other => {
                return Err(PeftError::Unsupported(format!(
                    "{}: peft_type {other:?} in a mixed model (PEFT's mixed model takes LoRA, \
                     LoHa and LoKr here)",
                    dir.display()
                )));
            }
        };
        let layers = RefCell::new(layers);
        let insert = |path: &str, set: &mut Option<MixedSet>| {
            if let Some(layer) = layers.borrow_mut().remove(path) {
                let set = set.get_or_insert_with(MixedSet::default);
                set.insert(name, layer);
                set.set_active(&self.active);
            }
        };
        let insert = RefCell::new(insert);
        self.model = self.model.clone().map_layers(
            &mut |path, mut layer: AdaptableLinear<MixedSet>| {
                (insert.borrow_mut())(path, &mut layer.adapter);
                Ok(layer)
            },
            &mut |path, mut layer: AdaptableEmbedding<MixedSet>| {
                (insert.borrow_mut())(path, &mut layer.adapter);
                Ok(layer)
            },
        )?;
        self.adapters.push((name.to_string(), peft_type));
        Ok(())
    }

    /// Names and methods of the loaded adapters, in load order.
    pub fn adapters(&self) -> &[(String, PeftType)] {
        &self.adapters
    }

    /// The active adapters, in activation order.
    pub fn active_adapters(&self) -> &[String] {
        &self.active
    }

    /// PEFT's `set_adapter([names])`: these adapters, in this order, are active together; an
    /// unknown name is refused and nothing changes.
    pub fn set_adapter(&mut self, names: &[&str]) -> Result<()> {
        if let Some(unknown) = names
            .iter()
            .find(|n| !self.adapters.iter().any(|(a, _)| a == *n))
        {
            return Err(PeftError::AdapterMismatch(format!(
                "no adapter named `{unknown}` (loaded: {})",
                self.adapters
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let active: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let update = |set: &mut Option<MixedSet>| {
            if let Some(set) = set {
                set.set_active(&active);
            }
        };
        let update = RefCell::new(update);
        self.model = self.model.clone().map_layers(
            &mut |_, mut layer: AdaptableLinear<MixedSet>| {
                (update.borrow_mut())(&mut layer.adapter);
                Ok(layer)
            },
            &mut |_, mut layer: AdaptableEmbedding<MixedSet>| {
                (update.borrow_mut())(&mut layer.adapter);
                Ok(layer)
            },
        )?;
        self.active = active;
        Ok(())
    }

    /// PEFT's `merge_and_unload()`: the active adapters folded into the weights in activation
    /// order; the plain model.
    pub fn merge_and_unload(self) -> Result<AnyModel<NoAdapter>> {
        peft_core::tuner::merge_and_unload(self.model)
    }
}

/// Refuses an adapter that trains more than its layers: the mixed model holds layer adapters
/// only (PEFT's mixed model has no `modules_to_save` or trainable tokens either).
fn layers_only<T>(saved: &[String], tokens: &[T], dir: &Path) -> Result<()> {
    if saved.is_empty() && tokens.is_empty() {
        return Ok(());
    }
    Err(PeftError::Unsupported(format!(
        "{}: modules_to_save or trainable tokens in a mixed model (layer adapters only)",
        dir.display()
    )))
}

/// Takes the adapters out of `model`'s layers, wrapped as mixed layers, by layer path.
fn harvest<L: LayerAdapter>(
    model: AnyModel<L>,
    wrap: fn(L) -> MixedLayer,
) -> Result<BTreeMap<String, MixedLayer>> {
    let found = RefCell::new(BTreeMap::new());
    model.map_layers(
        &mut |path, mut layer: AdaptableLinear<L>| {
            if let Some(adapter) = layer.adapter.take() {
                found.borrow_mut().insert(path.to_string(), wrap(adapter));
            }
            Ok(layer.with_adapter::<NoAdapter>(None))
        },
        &mut |path, mut layer: AdaptableEmbedding<L>| {
            if let Some(adapter) = layer.adapter.take() {
                found.borrow_mut().insert(path.to_string(), wrap(adapter));
            }
            Ok(layer.with_adapter::<NoAdapter>(None))
        },
    )?;
    Ok(found.into_inner())
}
