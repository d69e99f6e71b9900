//! VeRA as a layer method of the core's tuner: the shared projections are the method's
//! model-level tensors (`base_model.vera_A`, `base_model.vera_B`, read from the folder or drawn
//! from `projection_prng_key` exactly as PEFT draws them); each layer slices them and trains
//! two vectors.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Tensor, TensorData};

use peft_core::adapter_files::KEY_PREFIX;
use peft_core::torch_rng::TorchGenerator;
use peft_core::tuner::{LayerTuner, NewLayer, SharedTensors, Target, TunedModel, TunerConfig};
use peft_core::{
    CausalLm, HostTensor, ModuleInfo, ModuleMatcher, NoAdapter, PeftError, Result, TensorStore,
};

use crate::config::VeraConfig;
use crate::layer::VeraLinear;

/// A model with VeRA on some of its linear layers: the core's [`TunedModel`] for [`Vera`].
pub type VeraModel<M> = TunedModel<Vera, M>;

/// VeRA as a layer method: `<path>.vera_lambda_b` and `<path>.vera_lambda_d` per layer, and the
/// shared `base_model.vera_A` / `base_model.vera_B` once (with `save_projection`).
#[derive(Debug, Clone, Copy)]
pub struct Vera;

/// The file key of the shared `A: [r, largest in]`.
pub const VERA_A: &str = "base_model.vera_A";
/// The file key of the shared `B: [largest out, r]`.
pub const VERA_B: &str = "base_model.vera_B";
/// A layer's tensors.
pub const VECTORS: [&str; 2] = ["vera_lambda_b", "vera_lambda_d"];

impl TunerConfig for VeraConfig {
    fn modules_to_save(&self) -> Option<&[String]> {
        self.modules_to_save.as_deref()
    }
}

/// PEFT's `vera_A` and `vera_B` for `key`: `_kaiming_init((r, d_in))` then
/// `_kaiming_init((d_out, r))` from one `torch.Generator` seeded with `key`, row-major.
pub fn projections(key: u64, r: usize, largest: (usize, usize)) -> (Vec<f32>, Vec<f32>) {
    let mut generator = TorchGenerator::manual_seed(key);
    let a = generator.kaiming_uniform([r, largest.0]);
    let b = generator.kaiming_uniform([largest.1, r]);
    (a, b)
}

impl LayerTuner for Vera {
    type Config = VeraConfig;
    type Layer = VeraLinear;

    const MODEL_KEYS: &'static [&'static str] = &[VERA_A, VERA_B];

    /// PEFT's target matching; VeRA adapts linear layers only.
    fn select<'m>(
        config: &VeraConfig,
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
            "VeRA",
            "PEFT's VeRA adapts linear layers only",
        )
    }

    /// The projections: from the folder with `save_projection` (they must be there, with the
    /// shapes the targeted layers give), else drawn from `projection_prng_key` as PEFT draws
    /// them (a folder's copies are then ignored, as PEFT ignores them).
    fn shared_tensors(
        config: &VeraConfig,
        largest: (usize, usize),
        store: Option<&TensorStore>,
    ) -> Result<SharedTensors> {
        let r = config.r;
        let shapes = [(VERA_A, [r, largest.0]), (VERA_B, [largest.1, r])];
        let mut tensors = BTreeMap::new();
        match store {
            Some(store) if config.save_projection => {
                for (key, shape) in shapes {
                    if !store.contains(key) {
                        return Err(PeftError::AdapterMismatch(format!(
                            "{}: `save_projection` is true but `{key}` is missing (PEFT: \
                             \"Specified to load vera_A and vera_B from state dictionary \
                             however they were not present!\")",
                            store.label().display()
                        )));
                    }
                    let values = store.f32_shaped(key, &shape)?;
                    tensors.insert(
                        key.to_string(),
                        HostTensor::from_f32(shape.to_vec(), &values),
                    );
                }
            }
            _ => {
                let (a, b) = projections(config.projection_prng_key, r, largest);
                tensors.insert(
                    VERA_A.to_string(),
                    HostTensor::from_f32(shapes[0].1.to_vec(), &a),
                );
                tensors.insert(
                    VERA_B.to_string(),
                    HostTensor::from_f32(shapes[1].1.to_vec(), &b),
                );
            }
        }
        Ok(SharedTensors {
            tensors,
            saved: config.save_projection,
        })
    }

    fn make_layer(
        config: &VeraConfig,
        _model_type: &str,
        target: Target<'_>,
        store: Option<&TensorStore>,
        device: &burn::tensor::Device,
    ) -> Result<NewLayer<VeraLinear>> {
        let (d_in, d_out) = target.dims;
        let r = config.r;
        let shared = |key: &str| -> Result<Tensor<2>> {
            let t = target.shared.get(key).ok_or_else(|| {
                PeftError::AdapterMismatch(format!("VeRA's shared `{key}` is missing"))
            })?;
            let values = t.f32_values().ok_or_else(|| {
                PeftError::AdapterMismatch(format!("VeRA's shared `{key}` is not f32"))
            })?;
            let shape = [t.shape[0], t.shape[1]];
            Ok(Tensor::<2>::from_data(
                TensorData::new(values, shape),
                device,
            ))
        };
        // This layer's slices: A[:, :in] and B[:out, :] (PEFT's `sliced_A`, `sliced_B`).
        let a_t = shared(VERA_A)?.slice([0..r, 0..d_in]).transpose();
        let b_t = shared(VERA_B)?.slice([0..d_out, 0..r]).transpose();
        let layer = match store {
            None => VeraLinear::init(
                a_t,
                b_t,
                config.d_initial,
                config.init_weights,
                config.vera_dropout,
            ),
            Some(store) => {
                let read = |name: &str, len: usize| -> Result<Tensor<1>> {
                    let key = format!("{KEY_PREFIX}{}.{name}", target.path);
                    let values = store.f32_shaped(&key, &[len])?;
                    Ok(Tensor::<1>::from_data(
                        TensorData::new(values, [len]),
                        device,
                    ))
                };
                VeraLinear::new(
                    a_t,
                    b_t,
                    read("vera_lambda_b", d_out)?,
                    read("vera_lambda_d", r)?,
                    config.vera_dropout,
                )
            }
        };
        Ok(layer.into())
    }

    fn module_of_key(key: &str) -> Option<&str> {
        let (module, tensor) = key.rsplit_once('.')?;
        VECTORS.contains(&tensor).then_some(module)
    }

    /// Each vector under `<path>.<name>`.
    fn file_tensor(
        _config: &VeraConfig,
        _model_type: &str,
        path: &str,
        _is_embedding: bool,
        param: &str,
        value: HostTensor,
    ) -> Result<(String, HostTensor)> {
        if !VECTORS.contains(&param) {
            return Err(PeftError::Unsupported(format!(
                "VeRA layer `{path}` has an unknown tensor `{param}`"
            )));
        }
        Ok((format!("{path}.{param}"), value))
    }
}

/// PEFT's `get_peft_model(model, VeraConfig(...))`: freezes the base, draws the shared
/// projections from `projection_prng_key` and adds the vectors (`λ_b = 0`: the model starts
/// unchanged).
pub fn get_peft_model<B: CausalLm<Adapter = NoAdapter>>(
    base: B,
    config: VeraConfig,
) -> Result<VeraModel<B::WithAdapter<VeraLinear>>> {
    VeraModel::get_peft_model(base, config)
}

/// PEFT's `PeftModel.from_pretrained(model, adapter_dir)` for a VeRA adapter folder.
pub fn from_pretrained<B: CausalLm<Adapter = NoAdapter>>(
    base: B,
    adapter_dir: impl AsRef<Path>,
    trainable: bool,
) -> Result<VeraModel<B::WithAdapter<VeraLinear>>> {
    VeraModel::from_pretrained(base, adapter_dir, trainable)
}
