//! LoKr as a layer method of the core's tuner: `get_peft_model`, `PeftModel.from_pretrained`,
//! `save_pretrained` and merging come from [`TunedModel`]; this file says what LoKr adds to one
//! layer and how PEFT names it.

use std::path::Path;

use burn::tensor::{Tensor, TensorData};

use peft_core::adapter_files::KEY_PREFIX;
use peft_core::tuner::{LayerTuner, NewLayer, Target, TunedModel, TunerConfig};
use peft_core::{
    BaseLinear, CausalLm, HostTensor, ModuleInfo, ModuleMatcher, NoAdapter, PeftError, Result,
    TensorStore,
};

use crate::config::LokrConfig;
use crate::layer::{Factor, LokrLinear, LokrSettings};

/// A model with LoKr factors on some of its linear layers: the core's [`TunedModel`] for
/// [`Lokr`], with `save_pretrained`, `merge_adapter` / `unmerge_adapter`, `merge_and_unload`,
/// `unload` and `trainable_summary`.
pub type LokrModel<M> = TunedModel<Lokr, M>;

/// LoKr as a layer method: two Kronecker factors per targeted linear layer, each whole or as a
/// pair, saved as PEFT's `<path>.lokr_w1` (or `lokr_w1_a`, `lokr_w1_b`) and `<path>.lokr_w2`
/// (or `lokr_w2_a`, `lokr_w2_b`) in PyTorch's layout.
#[derive(Debug, Clone, Copy)]
pub struct Lokr;

/// Every tensor name a linear LoKr layer may have, in PEFT's order (`lokr_t2` belongs to
/// convolutions, which these decoders do not have).
pub const FACTORS: [&str; 6] = [
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
];

impl TunerConfig for LokrConfig {
    fn modules_to_save(&self) -> Option<&[String]> {
        self.modules_to_save.as_deref()
    }
}

impl LayerTuner for Lokr {
    type Config = LokrConfig;
    type Layer = LokrLinear;

    /// PEFT's target matching with `exclude_modules` and `layers_to_transform`; PEFT's LoKr
    /// adapts linear (and convolution) layers only.
    fn select<'m>(
        config: &LokrConfig,
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
        peft_core::modules::linear_only(
            matcher.select(&targets, modules)?,
            "LoKr",
            "PEFT's LoKr adapts linear layers only",
        )
    }

    fn make_layer(
        config: &LokrConfig,
        _model_type: &str,
        target: Target<'_>,
        store: Option<&TensorStore>,
        device: &burn::tensor::Device,
    ) -> Result<NewLayer<LokrLinear>> {
        let (d_in, d_out) = target.dims;
        if let Some(BaseLinear::Packed(packed)) = target.base
            && packed.weight.stored_dtype().is_none()
        {
            // PEFT 0.21.2 would take bitsandbytes' packed shape for the layer's and fail.
            return Err(PeftError::Unsupported(format!(
                "LoKr on the 4-bit layer `{}`: PEFT has no 4-bit LoKr layer; load the base \
                 unquantised",
                target.path
            )));
        }
        let (r, alpha) = config.rank_and_alpha(target.path);
        let shape = config.shape(d_in, d_out, r);
        let settings = LokrSettings {
            scaling: alpha / r as f64,
            rank_dropout: config.rank_dropout,
            module_dropout: config.module_dropout,
            rank_dropout_scale: config.rank_dropout_scale,
        };
        let Some(store) = store else {
            return Ok(LokrLinear::init(&shape, settings, config.init_weights, device).into());
        };
        // PEFT builds the layer from the config and loads the file into it: the file must hold
        // exactly the tensors the config's shapes call for.
        let mut read = Vec::with_capacity(4);
        for (name, dims) in shape.tensors() {
            let key = format!("{KEY_PREFIX}{}.{name}", target.path);
            let values = store.f32_shaped(&key, &dims)?;
            read.push(Tensor::<2>::from_data(
                TensorData::new(values, dims),
                device,
            ));
        }
        let mut read = read.into_iter();
        let mut next = || {
            read.next()
                .ok_or_else(|| PeftError::AdapterMismatch("a LoKr factor is missing".into()))
        };
        let w1 = if shape.whole_w1 {
            Factor::Whole(next()?)
        } else {
            Factor::Product(next()?, next()?)
        };
        let w2 = if shape.whole_w2 {
            Factor::Whole(next()?)
        } else {
            Factor::Product(next()?, next()?)
        };
        Ok(LokrLinear::new(w1, w2, settings).into())
    }

    fn module_of_key(key: &str) -> Option<&str> {
        let (module, tensor) = key.rsplit_once('.')?;
        (FACTORS.contains(&tensor) || tensor == "lokr_t2").then_some(module)
    }

    /// Each factor under `<path>.<name>`, as held (PyTorch's layout).
    fn file_tensor(
        _config: &LokrConfig,
        _model_type: &str,
        path: &str,
        _is_embedding: bool,
        param: &str,
        value: HostTensor,
    ) -> Result<(String, HostTensor)> {
        if !FACTORS.contains(&param) {
            return Err(PeftError::Unsupported(format!(
                "LoKr layer `{path}` has an unknown tensor `{param}`"
            )));
        }
        Ok((format!("{path}.{param}"), value))
    }
}

/// PEFT's `get_peft_model(model, LoKrConfig(...))`: freezes the base and adds LoKr factors
/// (`w1` zero by default, so the model starts unchanged).
pub fn get_peft_model<B: CausalLm<Adapter = NoAdapter>>(
    base: B,
    config: LokrConfig,
) -> Result<LokrModel<B::WithAdapter<LokrLinear>>> {
    LokrModel::get_peft_model(base, config)
}

/// PEFT's `PeftModel.from_pretrained(model, adapter_dir)` for a LoKr adapter folder.
pub fn from_pretrained<B: CausalLm<Adapter = NoAdapter>>(
    base: B,
    adapter_dir: impl AsRef<Path>,
    trainable: bool,
) -> Result<LokrModel<B::WithAdapter<LokrLinear>>> {
    LokrModel::from_pretrained(base, adapter_dir, trainable)
}
