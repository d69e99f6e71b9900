//! LoHa as a layer method of the core's tuner: `get_peft_model`, `PeftModel.from_pretrained`,
//! `save_pretrained` and merging come from [`TunedModel`]; this file says what LoHa adds to one
//! layer and how PEFT names it.

use std::path::Path;

use burn::tensor::{Tensor, TensorData};

use peft_core::adapter_files::KEY_PREFIX;
use peft_core::tuner::{LayerTuner, NewLayer, Target, TunedModel, TunerConfig};
use peft_core::{
    BaseLinear, CausalLm, HostTensor, ModuleInfo, ModuleMatcher, NoAdapter, PeftError, Result,
    TensorStore,
};

use crate::config::LohaConfig;
use crate::layer::LohaLinear;

/// A model with LoHa factors on some of its linear layers: the core's [`TunedModel`] for
/// [`Loha`], with `save_pretrained`, `merge_adapter` / `unmerge_adapter`, `merge_and_unload`,
/// `unload` and `trainable_summary`.
pub type LohaModel<M> = TunedModel<Loha, M>;

/// LoHa as a layer method: four factors per targeted linear layer, saved as PEFT's
/// `<path>.hada_w1_a` … `<path>.hada_w2_b` in PyTorch's layout.
#[derive(Debug, Clone, Copy)]
pub struct Loha;

/// The layer's tensors, in PEFT's (and the file's) order.
pub const FACTORS: [&str; 4] = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"];

impl TunerConfig for LohaConfig {
    fn modules_to_save(&self) -> Option<&[String]> {
        self.modules_to_save.as_deref()
    }
}

impl LayerTuner for Loha {
    type Config = LohaConfig;
    type Layer = LohaLinear;

    /// PEFT's target matching with `exclude_modules` and `layers_to_transform`; PEFT's LoHa
    /// adapts linear (and convolution) layers only.
    fn select<'m>(
        config: &LohaConfig,
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
            "LoHa",
            "PEFT's LoHa adapts linear layers only",
        )
    }

    fn make_layer(
        config: &LohaConfig,
        _model_type: &str,
        target: Target<'_>,
        store: Option<&TensorStore>,
        device: &burn::tensor::Device,
    ) -> Result<NewLayer<LohaLinear>> {
        let (d_in, d_out) = target.dims;
        if let Some(BaseLinear::Packed(packed)) = target.base
            && packed.weight.stored_dtype().is_none()
        {
            // PEFT 0.21.2 would take bitsandbytes' packed shape for the layer's and fail.
            return Err(PeftError::Unsupported(format!(
                "LoHa on the 4-bit layer `{}`: PEFT has no 4-bit LoHa layer; load the base \
                 unquantised",
                target.path
            )));
        }
        let (r, alpha) = config.rank_and_alpha(target.path);
        let scaling = alpha / r as f64;
        let dropouts = (config.rank_dropout, config.module_dropout);
        let layer = match store {
            None => LohaLinear::init(
                d_in,
                d_out,
                r,
                scaling,
                dropouts,
                config.init_weights,
                device,
            ),
            Some(store) => {
                let shapes = [[d_out, r], [r, d_in], [d_out, r], [r, d_in]];
                let mut factors = Vec::with_capacity(4);
                for (name, shape) in FACTORS.iter().zip(shapes) {
                    let key = format!("{KEY_PREFIX}{}.{name}", target.path);
                    let values = store.f32_shaped(&key, &shape)?;
                    factors.push(Tensor::<2>::from_data(
                        TensorData::new(values, shape),
                        device,
                    ));
                }
                let factors: [Tensor<2>; 4] = factors.try_into().expect("four factors");
                LohaLinear::new(factors, scaling, dropouts.0, dropouts.1)
            }
        };
        Ok(layer.into())
    }

    fn module_of_key(key: &str) -> Option<&str> {
        let (module, tensor) = key.rsplit_once('.')?;
        FACTORS.contains(&tensor).then_some(module)
    }

    /// Each factor under `<path>.<name>`, as held (PyTorch's layout).
    fn file_tensor(
        _config: &LohaConfig,
        _model_type: &str,
        path: &str,
        _is_embedding: bool,
        param: &str,
        value: HostTensor,
    ) -> Result<(String, HostTensor)> {
        if !FACTORS.contains(&param) {
            return Err(PeftError::Unsupported(format!(
                "LoHa layer `{path}` has an unknown tensor `{param}`"
            )));
        }
        Ok((format!("{path}.{param}"), value))
    }
}

/// PEFT's `get_peft_model(model, LoHaConfig(...))`: freezes the base and adds LoHa factors
/// (`hada_w2_b` zero by default, so the model starts unchanged).
pub fn get_peft_model<B: CausalLm<Adapter = NoAdapter>>(
    base: B,
    config: LohaConfig,
) -> Result<LohaModel<B::WithAdapter<LohaLinear>>> {
    LohaModel::get_peft_model(base, config)
}

/// PEFT's `PeftModel.from_pretrained(model, adapter_dir)` for a LoHa adapter folder.
pub fn from_pretrained<B: CausalLm<Adapter = NoAdapter>>(
    base: B,
    adapter_dir: impl AsRef<Path>,
    trainable: bool,
) -> Result<LohaModel<B::WithAdapter<LohaLinear>>> {
    LohaModel::from_pretrained(base, adapter_dir, trainable)
}
