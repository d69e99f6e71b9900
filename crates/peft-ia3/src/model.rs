//! (IA)³ as a layer method of the core's tuner: `get_peft_model`, `PeftModel.from_pretrained`,
//! `save_pretrained` and merging come from [`TunedModel`]; this file says what (IA)³ adds to one
//! layer and how PEFT names it.

use std::path::Path;

use burn::tensor::{Tensor, TensorData};

use peft_core::tuner::{LayerTuner, NewLayer, Target, TunedModel, TunerConfig};
use peft_core::{
    CausalLm, HostTensor, ModuleInfo, ModuleMatcher, NoAdapter, PeftError, Result, TensorStore,
};

use crate::config::Ia3Config;
use crate::layer::Ia3Linear;

/// A model with (IA)³ vectors on some of its linear layers: the core's [`TunedModel`] for
/// [`Ia3`], with `save_pretrained`, `merge_adapter` / `unmerge_adapter` (which divides by
/// `l + 1e-8`, as PEFT does), `merge_and_unload`, `unload` and `trainable_summary`.
pub type Ia3Model<M> = TunedModel<Ia3, M>;

/// (IA)³ as a layer method: a learned vector per targeted linear layer, saved as PEFT's
/// `<path>.ia3_l` (`[out, 1]`, or `[1, in]` for a feed-forward layer, whose input it scales).
#[derive(Debug, Clone, Copy)]
pub struct Ia3;

impl TunerConfig for Ia3Config {
    fn modules_to_save(&self) -> Option<&[String]> {
        self.modules_to_save.as_deref()
    }
}

impl LayerTuner for Ia3 {
    type Config = Ia3Config;
    type Layer = Ia3Linear;

    /// PEFT's target matching with `exclude_modules`; only linear layers can be scaled.
    fn select<'m>(
        config: &Ia3Config,
        model_type: &str,
        modules: &'m [ModuleInfo],
    ) -> Result<Vec<&'m ModuleInfo>> {
        let targets = config.targets(model_type)?;
        let matcher = ModuleMatcher::new(&targets, config.exclude_modules.as_ref(), None, None)?;
        peft_core::modules::linear_only(
            matcher.select(&targets, modules)?,
            "IA3",
            "only linear layers can be scaled",
        )
    }

    fn make_layer(
        config: &Ia3Config,
        model_type: &str,
        target: Target<'_>,
        store: Option<&TensorStore>,
        device: &burn::tensor::Device,
    ) -> Result<NewLayer<Ia3Linear>> {
        let (d_in, d_out) = target.dims;
        let feedforward = config.is_feedforward(model_type, target.path)?;
        let len = if feedforward { d_in } else { d_out };
        Ok(match store {
            None => Ia3Linear::init(len, feedforward, config.init_ia3_weights, device),
            Some(store) => {
                let shape = if feedforward { [1, d_in] } else { [d_out, 1] };
                let key = format!(
                    "{}{}.ia3_l",
                    peft_core::adapter_files::KEY_PREFIX,
                    target.path
                );
                let values = store.f32_shaped(&key, &shape)?;
                let l = Tensor::<1>::from_data(TensorData::new(values, [len]), device);
                Ia3Linear::new(l, feedforward)
            }
        }
        .into())
    }

    fn module_of_key(key: &str) -> Option<&str> {
        key.strip_suffix(".ia3_l")
    }

    /// `l: [len]` → `<path>.ia3_l` as `[out, 1]`, or `[1, in]` for a feed-forward layer.
    fn file_tensor(
        config: &Ia3Config,
        model_type: &str,
        path: &str,
        _is_embedding: bool,
        param: &str,
        mut value: HostTensor,
    ) -> Result<(String, HostTensor)> {
        if param != "ia3_l" {
            return Err(PeftError::Unsupported(format!(
                "IA3 layer `{path}` has an unknown tensor `{param}`"
            )));
        }
        let len = value.shape[0];
        value.shape = if config.is_feedforward(model_type, path)? {
            vec![1, len]
        } else {
            vec![len, 1]
        };
        Ok((format!("{path}.ia3_l"), value))
    }
}

/// PEFT's `get_peft_model(model, IA3Config(...))`: freezes the base and adds scaling vectors
/// (ones by default, so the model starts unchanged).
pub fn get_peft_model<B: CausalLm<Adapter = NoAdapter>>(
    base: B,
    config: Ia3Config,
) -> Result<Ia3Model<B::WithAdapter<Ia3Linear>>> {
    Ia3Model::get_peft_model(base, config)
}

/// PEFT's `PeftModel.from_pretrained(model, adapter_dir)` for an IA3 adapter folder.
pub fn from_pretrained<B: CausalLm<Adapter = NoAdapter>>(
    base: B,
    adapter_dir: impl AsRef<Path>,
    trainable: bool,
) -> Result<Ia3Model<B::WithAdapter<Ia3Linear>>> {
    Ia3Model::from_pretrained(base, adapter_dir, trainable)
}
