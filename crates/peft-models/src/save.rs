//! Writing a model back as a standard Hugging Face checkpoint (after `merge_and_unload`).

use std::collections::HashMap;
use std::path::Path;

use peft_core::adapter_files::packed_weights;
use peft_core::params::lazy_values;
use peft_core::{CausalLm, NoAdapter, PeftError, Result, TensorStore};
use peft_tensors::{
    DEFAULT_MAX_SHARD_SIZE, PendingTensor, f32_to_bytes, save_sharded, write_atomic,
    write_folder_atomic,
};
use safetensors::Dtype;

/// Files copied from the source folder when present.
pub const SIDE_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

/// How [`save_pretrained_with`] writes the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaveOptions {
    /// The dtype of every floating-point tensor written; `None` = the base checkpoint's (what
    /// transformers 5 + PEFT write after `merge_and_unload()` with their default `dtype="auto"`).
    pub dtype: Option<Dtype>,
    /// The largest shard in bytes (transformers' `max_shard_size`, 50 GB by default).
    pub max_shard_size: u64,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self {
            dtype: None,
            max_shard_size: DEFAULT_MAX_SHARD_SIZE,
        }
    }
}

/// Parses a save dtype as transformers names it (`float32`, `bfloat16`, `float16`, or `auto` =
/// the base checkpoint's).
pub fn parse_save_dtype(name: &str) -> Result<Option<Dtype>> {
    match name {
        "auto" => Ok(None),
        "float32" | "f32" | "fp32" => Ok(Some(Dtype::F32)),
        "bfloat16" | "bf16" => Ok(Some(Dtype::BF16)),
        "float16" | "f16" | "fp16" => Ok(Some(Dtype::F16)),
        other => Err(PeftError::InvalidInput(format!(
            "unknown dtype `{other}` (expected auto, float32, bfloat16 or float16)"
        ))),
    }
}

/// PyTorch's name of a float dtype, as `config.json`'s `dtype` holds it.
fn torch_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        _ => "float32",
    }
}

/// The dtype a checkpoint's weights are in: `config.json`'s `dtype` (transformers 5) or
/// `torch_dtype` (4.x) when it names a float type, else the dtype of its first floating-point
/// tensor, else f32.
pub fn checkpoint_dtype(source_dir: &Path, config: &serde_json::Value) -> Dtype {
    for key in ["dtype", "torch_dtype"] {
        if let Some(Ok(Some(dtype))) = config
            .get(key)
            .and_then(|v| v.as_str())
            .map(parse_save_dtype)
        {
            return dtype;
        }
    }
    let store = TensorStore::open_model_dir(source_dir).ok();
    let first_float = store.as_ref().and_then(|store| {
        store.keys().find_map(|key| match store.dtype(key) {
            Ok(d @ (Dtype::F32 | Dtype::BF16 | Dtype::F16)) => Some(d),
            _ => None,
        })
    });
    first_float.unwrap_or(Dtype::F32)
}

/// Saves `model` to `out_dir` as [`save_pretrained_with`] does with the default options: the
/// base checkpoint's dtype, shards of at most 50 GB.
pub fn save_pretrained<M: CausalLm<Adapter = NoAdapter>>(
    model: &M,
    source_dir: impl AsRef<Path>,
    out_dir: impl AsRef<Path>,
) -> Result<()> {
    save_pretrained_with(model, source_dir, out_dir, &SaveOptions::default())
}

/// Saves `model` to `out_dir` as a standard Hugging Face checkpoint — `config.json`, the
/// weights (`model.safetensors`, or shards + `model.safetensors.index.json` past
/// `max_shard_size`) and the tokenizer files of `source_dir` — so that transformers and
/// [`crate::load`] open it like any checkpoint.
///
/// The weights are written one tensor at a time (a packed 4-bit or 16-bit layer is de-quantised
/// only when its turn comes), in `options.dtype` or the base checkpoint's dtype, and the folder
/// appears whole or not at all ([`write_folder_atomic`]). `config.json` is the source's, with
/// `tie_word_embeddings` set to what the model now is (a model whose input embeddings were
/// trained apart from a tied `lm_head` is saved untied, as PEFT does), `dtype` set to the dtype
/// written, and any `quantization_config` removed (a model merged over a 4-bit base is saved
/// dense).
pub fn save_pretrained_with<M: CausalLm<Adapter = NoAdapter>>(
    model: &M,
    source_dir: impl AsRef<Path>,
    out_dir: impl AsRef<Path>,
    options: &SaveOptions,
) -> Result<()> {
    // A model without adapters has nothing to merge: the same writer, no layer replaced.
    save_merged_with(model, source_dir, out_dir, options)
}

/// A tensor produced by a closure: name, PyTorch-order shape, f32 values.
type ExtraTensor<'a> = (String, Vec<usize>, Box<dyn Fn() -> Result<Vec<f32>> + 'a>);

/// The checkpoint of `model`'s base parameters and packed layers, with the tensors of
/// `replaced` written in place of the ones of the same name (adapter parameters left out).
fn write_model<M: CausalLm>(
    model: &M,
    source_dir: &Path,
    out_dir: &Path,
    options: &SaveOptions,
    replaced: Vec<ExtraTensor<'_>>,
) -> Result<()> {
    let skip: std::collections::HashSet<String> =
        replaced.iter().map(|(name, ..)| name.clone()).collect();
    let config_path = source_dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| PeftError::io(&config_path, e))?;
    let mut config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| PeftError::json(&config_path, e))?;
    let dtype = options
        .dtype
        .unwrap_or_else(|| checkpoint_dtype(source_dir, &config));
    if let Some(obj) = config.as_object_mut() {
        obj.insert(
            "tie_word_embeddings".into(),
            model.spec().tie_word_embeddings.into(),
        );
        obj.insert("dtype".into(), torch_name(dtype).into());
        obj.remove("torch_dtype");
        // The weights written are dense: a 4-bit source's quantisation no longer applies.
        obj.remove("quantization_config");
    }
    let mut pending: Vec<PendingTensor> = Vec::new();
    for value in lazy_values(model) {
        if value.is_adapter() || skip.contains(&value.name) {
            continue;
        }
        pending.push(PendingTensor {
            name: value.name.clone(),
            dtype,
            shape: value.shape.clone(),
            bytes: Box::new(move || f32_to_bytes(dtype, &value.values()?)),
        });
    }
    // Layers left packed (4-bit, or 16-bit held as stored) are not burn parameters: written
    // de-quantised, or as their stored bytes when those are already in the dtype written.
    for (path, weight) in packed_weights(model) {
        let name = format!("{path}.weight");
        if skip.contains(&name) {
            continue;
        }
        let key = name.clone();
        pending.push(PendingTensor {
            name,
            dtype,
            shape: weight.shape().to_vec(),
            bytes: Box::new(move || {
                if weight.stored_dtype() == Some(dtype) {
                    let mut tensors = weight.to_tensors(&key);
                    if let Some((_, tensor)) = tensors.pop() {
                        return Ok(tensor.data);
                    }
                }
                f32_to_bytes(dtype, &weight.dequantize())
            }),
        });
    }
    for (name, shape, values) in replaced {
        pending.push(PendingTensor {
            name,
            dtype,
            shape,
            bytes: Box::new(move || f32_to_bytes(dtype, &values()?)),
        });
    }
    // Model order would do as well; name order makes the shard split independent of it.
    pending.sort_by(|a, b| a.name.cmp(&b.name));
    let mut metadata = HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    write_folder_atomic(out_dir, |dir| {
        save_sharded(dir, &pending, options.max_shard_size, Some(metadata))?;
        let json = serde_json::to_string_pretty(&config)
            .map_err(|e| PeftError::json(dir.join("config.json"), e))?;
        write_atomic(dir.join("config.json"), json.as_bytes())?;
        copy_side_files(source_dir, dir)
    })
}

/// Writes `model` with its adapters folded in — the checkpoint `merge_and_unload` followed by
/// [`save_pretrained_with`] writes, byte for byte — but merges each adapted layer only when the
/// writer reaches it, so the merged layers never exist all at once (a merge costs the memory of
/// one layer, not of every targeted layer in f32).
///
/// Layer adapters (LoRA, IA3) are merged through [`peft_core::AdaptableLinear::merge`] /
/// [`peft_core::AdaptableEmbedding::merge`]; trained base parameters (BitFit's biases,
/// `modules_to_save`) are written as they are. Prompt-learning wrappers hold nothing to merge:
/// callers refuse them before calling this (their base would be written without the prompt).
pub fn save_merged_with<M: CausalLm>(
    model: &M,
    source_dir: impl AsRef<Path>,
    out_dir: impl AsRef<Path>,
    options: &SaveOptions,
) -> Result<()> {
    let mut linears = Vec::new();
    let mut embeddings = Vec::new();
    model.clone().map_layers::<M::Adapter>(
        &mut |path: &str, layer: peft_core::AdaptableLinear<M::Adapter>| {
            if (layer.adapter.is_some() || layer.token_adapter.is_some()) && !layer.merged {
                linears.push((path.to_string(), layer.clone()));
            }
            Ok(layer)
        },
        &mut |path: &str, embedding: peft_core::AdaptableEmbedding<M::Adapter>| {
            if (embedding.adapter.is_some() || embedding.token_adapter.is_some())
                && !embedding.merged
            {
                embeddings.push((path.to_string(), embedding.clone()));
            }
            Ok(embedding)
        },
    )?;
    let mut replaced: Vec<ExtraTensor> = Vec::new();
    for (path, layer) in linears {
        let (d_in, d_out) = layer.dims();
        let has_bias = match &layer.base {
            peft_core::BaseLinear::Dense(l) => l.bias.is_some(),
            peft_core::BaseLinear::Packed(p) => p.bias.is_some(),
        };
        // The layer is merged once, when the first of its tensors is written, and dropped after
        // the last one (its bias and weight are neighbours in name order).
        let merged = std::rc::Rc::new(MergedOnce::new(1 + usize::from(has_bias), move || {
            Ok(lazy_values(&layer.clone().merge()?.base.into_dense()))
        }));
        for (name, shape) in std::iter::once(("weight", vec![d_out, d_in]))
            .chain(has_bias.then(|| ("bias", vec![d_out])))
        {
            let merged = merged.clone();
            replaced.push((
                format!("{path}.{name}"),
                shape,
                Box::new(move || merged.values(name)),
            ));
        }
    }
    for (path, embedding) in embeddings {
        let (num, dim) = embedding.dims();
        let merged = MergedOnce::new(1, move || Ok(lazy_values(&embedding.clone().merge()?.base)));
        replaced.push((
            format!("{path}.weight"),
            vec![num, dim],
            Box::new(move || merged.values("weight")),
        ));
    }
    write_model(
        model,
        source_dir.as_ref(),
        out_dir.as_ref(),
        options,
        replaced,
    )
}

/// One merged layer's parameters, computed on the first request and let go after the last of
/// `uses` requests.
struct MergedOnce<F> {
    merge: F,
    uses: std::cell::Cell<usize>,
    cached: std::cell::RefCell<Option<Vec<peft_core::params::LazyValue>>>,
}

impl<F: Fn() -> Result<Vec<peft_core::params::LazyValue>>> MergedOnce<F> {
    fn new(uses: usize, merge: F) -> Self {
        Self {
            merge,
            uses: std::cell::Cell::new(uses),
            cached: std::cell::RefCell::new(None),
        }
    }

    /// The merged parameter `name` (`weight` or `bias`), as f32 values in PyTorch's layout.
    fn values(&self, name: &str) -> Result<Vec<f32>> {
        let params = match self.cached.borrow_mut().take() {
            Some(params) => params,
            None => (self.merge)()?,
        };
        let values = match params.iter().find(|v| v.name == name) {
            Some(v) => v.values()?,
            None => {
                return Err(PeftError::InvalidInput(format!(
                    "merged layer has no `{name}`"
                )));
            }
        };
        let left = self.uses.get().saturating_sub(1);
        self.uses.set(left);
        if left > 0 {
            *self.cached.borrow_mut() = Some(params);
        }
        Ok(values)
    }
}

/// Copies the [`SIDE_FILES`] of `source_dir` that exist into `out_dir`, each atomically.
pub fn copy_side_files(source_dir: &Path, out_dir: &Path) -> Result<()> {
    for name in SIDE_FILES {
        let from = source_dir.join(name);
        if from.is_file() {
            let bytes = std::fs::read(&from).map_err(|e| PeftError::io(&from, e))?;
            write_atomic(out_dir.join(name), &bytes)?;
        }
    }
    Ok(())
}
