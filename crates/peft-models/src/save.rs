//! Writing a model back as a standard Hugging Face checkpoint (after `merge_and_unload`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use peft_core::adapter_files::packed_weights;
use peft_core::params::named_values;
use peft_core::tensors::{save_safetensors, write_atomic};
use peft_core::{CausalLm, HostTensor, NoAdapter, PeftError, Result};

/// Files copied from the source folder when present.
pub const SIDE_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

/// Saves `model` to `out_dir` as `config.json` + `model.safetensors` (f32), with the tokenizer
/// files of `source_dir`, so that transformers and [`crate::load`] open it like any checkpoint.
///
/// `config.json` is the source's, with `tie_word_embeddings` set to what the model now is (a
/// model whose input embeddings were trained apart from a tied `lm_head` is saved untied, as PEFT
/// does), `dtype` set to `float32`, and any `quantization_config` removed (a model merged over a
/// 4-bit base is saved dense).
pub fn save_pretrained<M: CausalLm<Adapter = NoAdapter>>(
    model: &M,
    source_dir: impl AsRef<Path>,
    out_dir: impl AsRef<Path>,
) -> Result<()> {
    let (source_dir, out_dir) = (source_dir.as_ref(), out_dir.as_ref());
    std::fs::create_dir_all(out_dir).map_err(|e| PeftError::io(out_dir, e))?;
    let config_path = source_dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| PeftError::io(&config_path, e))?;
    let mut config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| PeftError::json(&config_path, e))?;
    if let Some(obj) = config.as_object_mut() {
        obj.insert(
            "tie_word_embeddings".into(),
            model.spec().tie_word_embeddings.into(),
        );
        obj.insert("dtype".into(), "float32".into());
        // The weights written are dense: a 4-bit source's quantisation no longer applies.
        obj.remove("quantization_config");
    }
    let mut tensors: BTreeMap<_, _> = named_values(model)?.into_iter().collect();
    // Layers left packed (4-bit or bf16 without an adapter merged into them) are not burn
    // parameters: write them de-quantised, like the merged ones.
    for (path, weight) in packed_weights(model) {
        let values = weight.dequantize();
        tensors.insert(
            format!("{path}.weight"),
            HostTensor::from_f32(weight.shape().to_vec(), &values),
        );
    }
    let mut metadata = HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    save_safetensors(out_dir.join("model.safetensors"), &tensors, Some(metadata))?;
    let json = serde_json::to_string_pretty(&config)
        .map_err(|e| PeftError::json(out_dir.join("config.json"), e))?;
    write_atomic(out_dir.join("config.json"), json.as_bytes())?;
    copy_side_files(source_dir, out_dir)
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
