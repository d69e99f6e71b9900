//! What every PEFT adapter folder shares: file names, the `base_model.model.` key prefix,
//! `modules_to_save`, and loading the base parameters an adapter file carries.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use burn::tensor::TensorData;
use serde::Serialize;

use crate::model::CausalLm;
use crate::modules::{ModuleInfo, ModuleKind};
use crate::params::{ParamUpdate, map_params, named_params};
use crate::{PeftError, Result};
use peft_tensors::{HostTensor, TensorStore, save_safetensors, write_atomic};

/// The adapter config file name PEFT uses.
pub const CONFIG_NAME: &str = "adapter_config.json";
/// The adapter weights file name PEFT uses.
pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";
/// Prefix of every key PEFT writes.
pub const KEY_PREFIX: &str = "base_model.model.";

/// The modules `modules_to_save` names (a module matches a name when its path equals it or ends
/// with `.name`), with an error listing the model's modules when a name matches nothing.
pub fn modules_to_save(names: &[String], modules: &[ModuleInfo]) -> Result<Vec<ModuleInfo>> {
    let mut chosen = Vec::new();
    for name in names {
        let found: Vec<&ModuleInfo> = modules
            .iter()
            .filter(|m| !m.tied && (m.path == *name || m.path.ends_with(&format!(".{name}"))))
            .collect();
        if found.is_empty() {
            return Err(PeftError::TargetModulesNotFound {
                targets: format!("modules_to_save [{name:?}]"),
                available: modules.iter().map(|m| m.path.clone()).collect(),
            });
        }
        chosen.extend(found.into_iter().cloned());
    }
    Ok(chosen)
}

/// Prepares `model` for `modules_to_save`: unties a tied `lm_head` when the input embedding is
/// saved (PEFT trains a copy of the embedding while `lm_head` keeps the original), and returns the
/// HF names of the parameters that then train in full.
pub fn prepare_modules_to_save<M: CausalLm>(
    model: M,
    names: Option<&[String]>,
) -> Result<(M, BTreeSet<String>)> {
    let Some(names) = names else {
        return Ok((model, BTreeSet::new()));
    };
    let chosen = modules_to_save(names, &model.modules())?;
    let unties = model.spec().tie_word_embeddings
        && chosen
            .iter()
            .any(|m| matches!(m.kind, ModuleKind::Embedding { .. }));
    let model = if unties {
        model.untie_word_embeddings()
    } else {
        model
    };
    let params = chosen
        .iter()
        .flat_map(|m| {
            m.params()
                .into_iter()
                .map(move |(p, _)| format!("{}.{p}", m.path))
        })
        .collect();
    Ok((model, params))
}

/// Sets which parameters train: exactly those named in `trainable`.
pub fn set_trainable<M: burn::module::Module>(model: M, trainable: &BTreeSet<String>) -> M {
    map_params(model, |name, _| {
        ParamUpdate::Trainable(trainable.contains(name) || crate::params::is_adapter_name(name))
    })
}

/// Loads into `model` the base parameters an adapter file carries (`modules_to_save` copies,
/// biases, ...). `own_key` recognises the method's own keys (returning `Some(())` after checking
/// them); every other key must name a parameter of the model with its shape (a key naming no
/// parameter is skipped with a warning, as PEFT's non-strict load does). `rename` maps a file name to a parameter name (PEFT's
/// `base_layer.weight` of a LoRA-targeted embedding). Returns the model and the loaded names.
pub fn load_base_params<M: CausalLm>(
    model: M,
    store: &TensorStore,
    weights: &Path,
    outside: &[&str],
    mut own_key: impl FnMut(&str) -> Option<Result<()>>,
    rename: impl Fn(&str) -> String,
) -> Result<(M, BTreeSet<String>)> {
    let model_type = model.spec().model_type.clone();
    let shapes: BTreeMap<String, Vec<usize>> = named_params(&model)
        .into_iter()
        .filter(|p| !p.is_adapter())
        .map(|p| {
            let shape = p.torch_shape();
            (p.name, shape)
        })
        .collect();
    let mut values: BTreeMap<String, TensorData> = BTreeMap::new();
    for key in store.keys() {
        if outside.contains(&key) {
            continue;
        }
        let Some(name) = key.strip_prefix(KEY_PREFIX) else {
            return Err(PeftError::AdapterMismatch(format!(
                "{}: key `{key}` lacks PEFT's `{KEY_PREFIX}` prefix",
                weights.display()
            )));
        };
        if let Some(checked) = own_key(name) {
            checked?;
            continue;
        }
        let name = rename(name);
        let Some(shape) = shapes.get(&name) else {
            // PEFT loads with strict=False: an unexpected tensor is reported and skipped. (The
            // method's own keys for modules the model lacks are refused in `own_key`.)
            tracing::warn!(
                "{}: ignoring `{key}`, which names no parameter of this {model_type} model",
                weights.display()
            );
            continue;
        };
        let (data, found) = store.f32(key)?;
        if &found != shape {
            return Err(PeftError::ShapeMismatch {
                path: weights.to_path_buf(),
                key: key.to_string(),
                expected: shape.clone(),
                found,
            });
        }
        values.insert(name, TensorData::new(data, found));
    }
    let loaded: BTreeSet<String> = values.keys().cloned().collect();
    Ok((crate::params::set_values(model, values), loaded))
}

/// Writes an adapter folder: `adapter_config.json` (with `inference_mode: true`, as PEFT saves)
/// and `adapter_model.safetensors`, each atomically.
pub fn save_adapter(
    dir: &Path,
    config: &impl Serialize,
    tensors: &BTreeMap<String, HostTensor>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| PeftError::io(dir, e))?;
    let mut metadata = HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    save_safetensors(dir.join(WEIGHTS_NAME), tensors, Some(metadata))?;
    let mut json =
        serde_json::to_value(config).map_err(|e| PeftError::json(dir.join(CONFIG_NAME), e))?;
    if let Some(obj) = json.as_object_mut() {
        obj.insert("inference_mode".into(), true.into());
    }
    let text = serde_json::to_string_pretty(&json)
        .map_err(|e| PeftError::json(dir.join(CONFIG_NAME), e))?;
    write_atomic(dir.join(CONFIG_NAME), text.as_bytes())
}

/// A method's config as JSON, as [`save_adapter`] writes it before marking it for inference.
pub fn config_json(config: &impl Serialize) -> Result<serde_json::Value> {
    serde_json::to_value(config).map_err(|e| PeftError::json(CONFIG_NAME, e))
}

/// HF names of the parameters that train in a layer-adapter model (LoRA, IA3, …): every adapter
/// tensor and the `saved` base parameters (`modules_to_save`, selected biases).
pub fn adapter_trainable_names<M: burn::module::Module>(
    model: &M,
    saved: &[String],
) -> Vec<String> {
    named_params(model)
        .into_iter()
        .filter(|p| p.is_adapter() || saved.contains(&p.name))
        .map(|p| p.name)
        .collect()
}

/// PEFT's `print_trainable_parameters()` numbers for a layer-adapter model: the adapter tensors
/// and `saved` parameters train (none when loaded for inference, `trainable = false`); "all"
/// counts the adapter too.
pub fn adapter_summary<M: CausalLm>(
    model: &M,
    saved: &[String],
    trainable: bool,
) -> crate::TrainableSummary {
    let params = named_params(model);
    let packed = packed_numel(model);
    crate::TrainableSummary {
        trainable: if trainable {
            params
                .iter()
                .filter(|p| p.is_adapter() || saved.contains(&p.name))
                .map(|p| p.numel())
                .sum()
        } else {
            0
        },
        all: params.iter().map(|p| p.numel()).sum::<usize>() + packed,
    }
}

/// The packed (4-bit) weights of `model` with the HF paths of their layers, in model order.
/// They are not burn parameters, so parameter walks do not see them.
pub fn packed_weights<M: CausalLm>(
    model: &M,
) -> Vec<(String, std::sync::Arc<dyn crate::PackedWeight>)> {
    let mut found = Vec::new();
    // Rebuilding with the same adapters only clones reference-counted handles.
    let _ = model.clone().map_layers::<M::Adapter>(
        &mut |path: &str, layer: crate::AdaptableLinear<M::Adapter>| {
            if let Some(w) = layer.base.packed() {
                found.push((path.to_string(), w.clone()));
            }
            Ok(layer)
        },
        &mut |_: &str, embedding| Ok(embedding),
    );
    found
}

/// Elements of the packed (4-bit) weights of `model`. PEFT counts a 4-bit weight by its unpacked
/// element count (`numel · 2` of the packed bytes).
pub fn packed_numel<M: CausalLm>(model: &M) -> usize {
    packed_weights(model)
        .iter()
        .map(|(_, w)| w.shape().iter().product::<usize>())
        .sum()
}
