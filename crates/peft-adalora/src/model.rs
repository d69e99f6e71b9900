//! AdaLoRA as a layer method of the core's tuner: `<path>.lora_A`, `<path>.lora_E` and
//! `<path>.lora_B` per layer (PEFT's parameter-dict keys with the adapter name taken out; no
//! `.weight` suffix, and PEFT leaves `ranknum` out of the file), each layer at the rank its
//! `rank_pattern` entry keeps.

use std::path::Path;

use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};

use peft_core::adapter_files::KEY_PREFIX;
use peft_core::tuner::{LayerTuner, NewLayer, Target, TunedModel, TunerConfig};
use peft_core::{
    CausalLm, HostTensor, ModuleInfo, ModuleMatcher, NoAdapter, PeftError, Result, TensorStore,
};

use crate::config::AdaLoraConfig;
use crate::layer::SvdLinear;

/// A model with AdaLoRA on some of its linear layers: the core's [`TunedModel`] for [`AdaLora`].
pub type AdaLoraModel<M> = TunedModel<AdaLora, M>;

/// AdaLoRA as a layer method.
#[derive(Debug, Clone, Copy)]
pub struct AdaLora;

/// A layer's tensors: `(name in the layer, name in PEFT's file)`.
pub const TENSORS: [(&str, &str); 3] = [
    ("lora_a", "lora_A"),
    ("lora_e", "lora_E"),
    ("lora_b", "lora_B"),
];

impl TunerConfig for AdaLoraConfig {
    fn modules_to_save(&self) -> Option<&[String]> {
        self.modules_to_save.as_deref()
    }
}

impl LayerTuner for AdaLora {
    type Config = AdaLoraConfig;
    type Layer = SvdLinear;

    /// PEFT's `ranknum` (`init_r`, frozen): a constant of the layer's scale here.
    const FROZEN_NUMBERS_PER_LAYER: usize = 1;

    /// PEFT's target matching; AdaLoRA adapts linear layers only (PEFT's `SVDLinear`; its
    /// `SVDConv2d` has no counterpart in these decoders).
    fn select<'m>(
        config: &AdaLoraConfig,
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
            "AdaLoRA",
            "PEFT's AdaLoRA adapts linear (and Conv2d) layers only",
        )
    }

    fn make_layer(
        config: &AdaLoraConfig,
        _model_type: &str,
        target: Target<'_>,
        store: Option<&TensorStore>,
        device: &burn::tensor::Device,
    ) -> Result<NewLayer<SvdLinear>> {
        // Over a 4-bit base too (PEFT's `SVDLinear4bit`): the update runs beside the packed
        // weights, and merging goes into the de-quantised ones (the core's merge).
        let (d_in, d_out) = target.dims;
        let layer = match store {
            None => SvdLinear::init(
                d_in,
                d_out,
                config.init_r,
                config.scale(config.init_r),
                config.lora_dropout,
                config.init_lora_weights,
                device,
            ),
            Some(store) => {
                // PEFT saves each layer resized to the ranks its pattern keeps.
                let r = config.rank_of(target.path);
                let read = |name: &str, shape: [usize; 2]| -> Result<Tensor<2>> {
                    let key = format!("{KEY_PREFIX}{}.{name}", target.path);
                    let values = store.f32_shaped(&key, &shape)?;
                    Ok(Tensor::<2>::from_data(
                        TensorData::new(values, shape),
                        device,
                    ))
                };
                SvdLinear::new(
                    read("lora_A", [r, d_in])?,
                    read("lora_E", [r, 1])?,
                    read("lora_B", [d_out, r])?,
                    config.scale(r),
                    config.lora_dropout,
                )
            }
        };
        Ok(layer.into())
    }

    fn regularization<M: CausalLm<Adapter = SvdLinear, WithAdapter<SvdLinear> = M>>(
        config: &AdaLoraConfig,
        model: &M,
    ) -> Result<Option<Tensor<1>>> {
        crate::allocator::orthogonality_penalty(config, model)
    }

    fn keep_gradients<M: CausalLm<Adapter = SvdLinear, WithAdapter<SvdLinear> = M>>(
        model: &M,
        grads: &GradientsParams,
    ) -> Option<GradientsParams> {
        crate::allocator::keep_gradients(model, grads)
    }

    fn after_optimizer_step<M: CausalLm<Adapter = SvdLinear, WithAdapter<SvdLinear> = M>>(
        config: &mut AdaLoraConfig,
        model: M,
        step: usize,
        kept: Option<GradientsParams>,
    ) -> Result<M> {
        crate::allocator::after_optimizer_step(config, model, step, kept)
    }

    fn module_of_key(key: &str) -> Option<&str> {
        let (module, tensor) = key.rsplit_once('.')?;
        TENSORS
            .iter()
            .any(|(_, file)| *file == tensor)
            .then_some(module)
    }

    /// Each tensor under `<path>.lora_A` / `.lora_E` / `.lora_B` (PyTorch's layout), cut to the
    /// ranks the config's `rank_pattern` keeps when the layer still holds all `init_r` (a layer
    /// in training; PEFT's `resize_state_dict_by_rank_pattern`).
    fn file_tensor(
        config: &AdaLoraConfig,
        _model_type: &str,
        path: &str,
        _is_embedding: bool,
        param: &str,
        value: HostTensor,
    ) -> Result<(String, HostTensor)> {
        let Some((_, file)) = TENSORS.iter().find(|(held, _)| *held == param) else {
            return Err(PeftError::Unsupported(format!(
                "AdaLoRA layer `{path}` has an unknown tensor `{param}`"
            )));
        };
        let key = format!("{path}.{file}");
        let flags = config
            .rank_pattern
            .as_ref()
            .and_then(|p| p.get(&format!("{path}.lora_E")));
        let Some(flags) = flags else {
            return Ok((key, value));
        };
        // The rank is the rows of A and E, the columns of B.
        let rank_axis = usize::from(*file == "lora_B");
        if value.shape.len() != 2 || value.shape[rank_axis] != flags.len() {
            return Ok((key, value));
        }
        let Some(values) = value.f32_values() else {
            return Ok((key, value));
        };
        Ok((key, keep_ranks(&values, &value.shape, rank_axis, flags)))
    }
}

/// PEFT's `get_peft_model(model, AdaLoraConfig(...))`: freezes the base and adds the triplets at
/// `init_r` (`E = 0`, so the model starts unchanged).
pub fn get_peft_model<B: CausalLm<Adapter = NoAdapter>>(
    base: B,
    config: AdaLoraConfig,
) -> Result<AdaLoraModel<B::WithAdapter<SvdLinear>>> {
    AdaLoraModel::get_peft_model(base, config)
}

/// PEFT's `PeftModel.from_pretrained(model, adapter_dir)` for an AdaLoRA adapter folder: each
/// layer at the rank its `rank_pattern` entry keeps (PEFT's `resize_modules_by_rank_pattern`).
pub fn from_pretrained<B: CausalLm<Adapter = NoAdapter>>(
    base: B,
    adapter_dir: impl AsRef<Path>,
    trainable: bool,
) -> Result<AdaLoraModel<B::WithAdapter<SvdLinear>>> {
    AdaLoraModel::from_pretrained(base, adapter_dir, trainable)
}

/// `values` (`shape = [rows, cols]`) with only the ranks `keep` flags along `axis` (0: rows, 1:
/// columns).
fn keep_ranks(values: &[f32], shape: &[usize], axis: usize, keep: &[bool]) -> HostTensor {
    let (rows, cols) = (shape[0], shape[1]);
    let kept = keep.iter().filter(|k| **k).count();
    let (shape, out): ([usize; 2], Vec<f32>) = if axis == 0 {
        let out = (0..rows)
            .filter(|r| keep[*r])
            .flat_map(|r| values[r * cols..(r + 1) * cols].iter().copied())
            .collect();
        ([kept, cols], out)
    } else {
        let out = (0..rows)
            .flat_map(|r| (0..cols).filter(|c| keep[*c]).map(move |c| r * cols + c))
            .map(|i| values[i])
            .collect();
        ([rows, kept], out)
    };
    HostTensor::from_f32(shape.to_vec(), &out)
}
