//! Model and LoRA-adapter export, as `convert_hf_to_gguf.py` and `convert_lora_to_gguf.py` write
//! them, one tensor at a time.

use std::path::Path;

use safetensors::Dtype;
use serde_json::Value as Json;

use peft_tensors::TensorStore;

use crate::arch::{Arch, HParams, RowOrder};
use crate::error::{GgufError, Result};
use crate::format::{GgmlType, GgufWriter, Value};
use crate::mix::{ModelFacts, QuantMix};
use crate::quant;

/// The converters' `--outtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutType {
    /// Everything f32.
    F32,
    /// Matrices f16; norms and biases f32.
    F16,
    /// Matrices bf16; norms and biases f32.
    Bf16,
    /// Matrices Q8_0 (f16 where a row does not split into blocks of 32); norms and biases f32.
    Q8_0,
    /// A `llama-quantize` file type (`q4_0`, `q4_k_m`, `q5_k_m`, `q6_k`): its per-tensor types
    /// (crate::mix), as `llama-quantize` writes them from the f32 file.
    Quantised(QuantMix),
    /// f16 where the checkpoint is f16, bf16 otherwise (the converters' `auto`).
    Auto,
}

impl std::str::FromStr for OutType {
    type Err = GgufError;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "bf16" => Self::Bf16,
            "q8_0" => Self::Q8_0,
            "q4_0" => Self::Quantised(QuantMix::Q4_0),
            "q4_k_m" => Self::Quantised(QuantMix::Q4_K_M),
            "q5_k_m" => Self::Quantised(QuantMix::Q5_K_M),
            "q6_k" => Self::Quantised(QuantMix::Q6_K),
            "auto" => Self::Auto,
            other => {
                return Err(GgufError::Unsupported(format!(
                    "outtype `{other}`: one of f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k, \
                     auto"
                )));
            }
        })
    }
}

impl OutType {
    /// `auto` resolved for the Hugging Face model folder `model_dir`: f16 where its first
    /// tensor is f16, bf16 otherwise (any other type is returned as it is).
    pub fn resolved_for(self, model_dir: &Path) -> Result<Self> {
        if self != Self::Auto {
            return Ok(self);
        }
        let store = TensorStore::open_model_dir(model_dir)?;
        let first = store.keys().next().and_then(|k| store.dtype(k).ok());
        Ok(self.resolve(first))
    }

    fn resolve(self, first_dtype: Option<Dtype>) -> Self {
        match self {
            Self::Auto if first_dtype == Some(Dtype::F16) => Self::F16,
            Self::Auto => Self::Bf16,
            other => other,
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_*`).
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 | Self::Auto => 1,
            Self::Q8_0 => 7,
            Self::Bf16 => 32,
            Self::Quantised(mix) => mix.file_type(),
        }
    }

    /// The storage of a tensor named `gguf_name` whose rows are `row` long, by the converter's
    /// rules: 1-D tensors, norms and anything not a weight or LoRA factor in f32; Q8_0 falls back
    /// to f16 where the rows do not split into blocks. A quantised type by llama-quantize's.
    fn storage(self, gguf_name: &str, dims: usize, row: usize, model: &ModelFacts) -> GgmlType {
        let is_matrix_weight = dims > 1
            && !gguf_name.ends_with("_norm.weight")
            && [".weight", ".lora_a", ".lora_b"]
                .iter()
                .any(|s| gguf_name.ends_with(s));
        match self {
            Self::Quantised(mix) => mix.tensor_type(gguf_name, dims, row, model),
            _ if !is_matrix_weight => GgmlType::F32,
            Self::F32 => GgmlType::F32,
            Self::F16 | Self::Auto => GgmlType::F16,
            Self::Bf16 => GgmlType::Bf16,
            Self::Q8_0 if row.is_multiple_of(32) => GgmlType::Q8_0,
            Self::Q8_0 => GgmlType::F16,
        }
    }
}

/// What [`export_model`] and [`export_lora`] are told besides the paths.
#[derive(Debug, Clone, Copy)]
pub struct ExportOptions<'a> {
    /// Storage of the matrices.
    pub outtype: OutType,
    /// llama.cpp's pre-tokenizer name, where the tokenizer's is not recognised.
    pub tokenizer_pre: Option<&'a str>,
    /// `general.name`; the folder's name where `None`.
    pub name: Option<&'a str>,
}

impl Default for ExportOptions<'_> {
    fn default() -> Self {
        Self {
            outtype: OutType::Auto,
            tokenizer_pre: None,
            name: None,
        }
    }
}

/// Reports progress: (tensors written, tensors in all).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize);

/// A model folder's `config.json` and its path.
fn read_config(dir: &Path) -> Result<(Json, std::path::PathBuf)> {
    let path = dir.join("config.json");
    Ok((crate::json::read(&path)?, path))
}

/// A folder's own name (its last component, after resolving `.` and links).
pub fn folder_name(dir: &Path) -> String {
    dir.canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into())
}

/// `general.name` from a folder's name, as the converter derives it (`llama-tiny` → `Llama
/// Tiny`).
fn display_name(dir: &Path) -> String {
    folder_name(dir)
        .split(['-', '_', ' '])
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect::<String>())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// One tensor to write: where its values come from and how they are re-ordered.
enum Source {
    Checkpoint {
        key: String,
        rows: RowOrder,
    },
    Computed(Vec<f32>),
    LoraA {
        key: String,
        transpose: bool,
    },
    LoraB {
        key: String,
        rows: RowOrder,
        scale: f32,
    },
}

fn f32_of(store: &TensorStore, key: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    let out = store.f32(key)?;
    store.release(key);
    Ok(out)
}

fn produce(store: &TensorStore, source: &Source, name: &str) -> Result<Vec<f32>> {
    match source {
        Source::Computed(values) => Ok(values.clone()),
        Source::Checkpoint { key, rows } => {
            let (values, shape) = f32_of(store, key)?;
            rows.apply(values, shape.first().copied().unwrap_or(1), name)
        }
        Source::LoraA { key, transpose } => {
            let (values, shape) = f32_of(store, key)?;
            if !*transpose {
                return Ok(values);
            }
            Ok(peft_tensors::layout::transpose(&values, shape[0], shape[1]))
        }
        Source::LoraB { key, rows, scale } => {
            let (mut values, shape) = f32_of(store, key)?;
            if *scale != 1.0 {
                values.iter_mut().for_each(|v| *v *= scale);
            }
            rows.apply(values, shape[0], name)
        }
    }
}

fn write_all(
    writer: &GgufWriter,
    out: &Path,
    store: &TensorStore,
    sources: &[Source],
    progress: Progress,
) -> Result<()> {
    let total = sources.len();
    writer.write(out, |index, info| {
        let values = produce(store, &sources[index], &info.name)?;
        progress(index + 1, total);
        quant::encode(info.ggml_type, &values)
    })
}

/// Writes the Hugging Face model folder `model_dir` (config, safetensors weights, tokenizer) as
/// the GGUF file `out`, as `convert_hf_to_gguf.py --outtype …` writes it.
pub fn export_model(
    model_dir: &Path,
    out: &Path,
    options: &ExportOptions,
    progress: Progress,
) -> Result<()> {
    let (config, config_path) = read_config(model_dir)?;
    let arch = Arch::detect(&config, &config_path)?;
    let hp = HParams::new(&config, &config_path);
    let store = TensorStore::open_model_dir(model_dir)?;
    let first_dtype = store.keys().next().and_then(|k| store.dtype(k).ok());
    let outtype = options.outtype.resolve(first_dtype);

    let mut writer = GgufWriter::new();
    writer.add(
        "general.architecture",
        Value::String(arch.gguf_name().into()),
    );
    writer.add("general.type", Value::String("model".into()));
    let name = options
        .name
        .map(str::to_string)
        .unwrap_or_else(|| display_name(model_dir));
    writer.add("general.name", Value::String(name));
    for (k, v) in arch.metadata(&hp, outtype.file_type())? {
        writer.add(k, v);
    }
    writer.add("general.quantization_version", Value::U32(2));
    for (k, v) in crate::vocab::metadata(model_dir, hp.vocab_size()?, options.tokenizer_pre)? {
        writer.add(k, v);
    }

    let mut sources = Vec::new();
    for (name, values) in arch.extra_tensors(&hp)? {
        writer.add_tensor(&name, &[values.len()], GgmlType::F32)?;
        sources.push(Source::Computed(values));
    }
    let mut tensors = Vec::new();
    for key in store.keys() {
        if let Some(mapped) = arch.map(key, &hp)? {
            tensors.push((key.to_string(), mapped));
        }
    }
    let tied = !tensors.iter().any(|(_, m)| m.name == "output.weight");
    let facts = model_facts(arch, &hp, tied)?;
    for (key, mapped) in tensors {
        let shape = store.shape(&key)?.to_vec();
        let row = shape.last().copied().unwrap_or(1);
        let ggml_type = outtype.storage(&mapped.name, shape.len(), row, &facts);
        writer.add_tensor(&mapped.name, &shape, ggml_type)?;
        sources.push(Source::Checkpoint {
            key,
            rows: mapped.rows,
        });
    }
    write_all(&writer, out, &store, &sources, progress)
}

/// What llama-quantize knows of the model when it picks each tensor's type: llama.cpp takes a
/// Llama-family model of 80 blocks with grouped-query attention, or a Qwen2 of 80 blocks, for a
/// 70B (its `LLM_TYPE_70B`).
fn model_facts(arch: Arch, hp: &HParams, tied_embeddings: bool) -> Result<ModelFacts> {
    let n_layers = hp.block_count()? as usize;
    let is_70b = n_layers == 80
        && match arch {
            Arch::Llama => hp.heads()? != hp.kv_heads()?,
            Arch::Qwen2 => true,
            Arch::Qwen3 | Arch::Bloom | Arch::Phi3 => false,
        };
    Ok(ModelFacts {
        n_layers,
        tied_embeddings,
        is_70b,
    })
}

/// A PEFT pattern key matches a module name as PEFT matches it: the whole name, or its tail
/// after a dot (`re.match(rf"(.*\.)?({key})$", name)`, taken literally here).
fn pattern_value(patterns: Option<&Json>, module: &str) -> Option<f64> {
    let map = patterns?.as_object()?;
    map.iter().find_map(|(key, value)| {
        let hit = module == key || module.ends_with(&format!(".{key}"));
        hit.then(|| value.as_f64()).flatten()
    })
}

/// Writes the PEFT LoRA adapter folder `adapter_dir` (over the base model folder `base_dir`,
/// whose `config.json` is read) as the GGUF adapter `out`, as `convert_lora_to_gguf.py` writes
/// it: `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and per targeted
/// weight `<gguf name>.lora_a` / `.lora_b`.
///
/// llama.cpp scales every pair by `adapter.lora.alpha / rank`. PEFT's per-module scaling can
/// differ (`alpha_pattern`, `use_rslora`); that difference is folded into `lora_b` so llama.cpp
/// computes PEFT's update. (The Python converter writes `lora_alpha` alone and drops it.)
pub fn export_lora(
    adapter_dir: &Path,
    base_dir: &Path,
    out: &Path,
    options: &ExportOptions,
    progress: Progress,
) -> Result<()> {
    let (config, config_path) = read_config(base_dir)?;
    let arch = Arch::detect(&config, &config_path)?;
    let hp = HParams::new(&config, &config_path);
    if let OutType::Quantised(mix) = options.outtype {
        return Err(GgufError::Unsupported(format!(
            "outtype {mix:?} is llama-quantize's, for models: LoRA adapters are written as f32, \
             f16, bf16 or q8_0, as convert_lora_to_gguf.py writes them (or quantise the merged \
             model: --merge)"
        )));
    }
    let tied = config
        .get("tie_word_embeddings")
        .and_then(Json::as_bool)
        .unwrap_or(false);
    let facts = model_facts(arch, &hp, tied)?;
    let adapter_config_path = adapter_dir.join("adapter_config.json");
    let lora = crate::json::read(&adapter_config_path)?;
    let peft_type = lora.get("peft_type").and_then(Json::as_str).unwrap_or("");
    if peft_type != "LORA" {
        return Err(GgufError::Unsupported(format!(
            "{}: peft_type `{peft_type}`; llama.cpp's adapters are LoRA (merge other methods: \
             peft export-gguf --adapter DIR --merge)",
            adapter_config_path.display()
        )));
    }
    for (field, what) in [
        ("use_dora", "DoRA"),
        ("trainable_token_indices", "trainable token rows"),
        ("modules_to_save", "modules_to_save"),
        ("alora_invocation_tokens", "aLoRA"),
    ] {
        let set = match lora.get(field) {
            None | Some(Json::Null) | Some(Json::Bool(false)) => false,
            Some(Json::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        if set {
            return Err(GgufError::Unsupported(format!(
                "{}: {what} ({field}) has no llama.cpp adapter form; merge it instead \
                 (peft export-gguf --adapter DIR --merge)",
                adapter_config_path.display()
            )));
        }
    }
    let need_f64 = |key: &str| {
        lora.get(key).and_then(Json::as_f64).ok_or_else(|| {
            GgufError::config(&adapter_config_path, format!("missing numeric `{key}`"))
        })
    };
    let r = need_f64("r")?;
    let alpha = need_f64("lora_alpha")?;
    let rslora = lora
        .get("use_rslora")
        .and_then(Json::as_bool)
        .unwrap_or(false);

    let store = TensorStore::open(adapter_dir.join("adapter_model.safetensors"))?;
    let mut writer = GgufWriter::new();
    writer.add(
        "general.architecture",
        Value::String(arch.gguf_name().into()),
    );
    writer.add("general.type", Value::String("adapter".into()));
    writer.add("adapter.type", Value::String("lora".into()));
    let name = options
        .name
        .map(str::to_string)
        .unwrap_or_else(|| display_name(adapter_dir));
    writer.add("general.name", Value::String(name));
    writer.add("adapter.lora.alpha", Value::F32(alpha as f32));
    writer.add("general.quantization_version", Value::U32(2));

    let mut sources = Vec::new();
    let keys: Vec<String> = store.keys().map(str::to_string).collect();
    for key in &keys {
        let (module, is_embedding) = if let Some(m) = key.strip_suffix(".lora_A.weight") {
            (m, false)
        } else if let Some(m) = key.strip_suffix(".lora_embedding_A") {
            (m, true)
        } else if key.contains(".lora_B.weight")
            || key.contains(".lora_embedding_B")
            || key.ends_with(".base_layer.weight")
        {
            // B is taken with its A; a saved base layer (PEFT's `save_embedding_layers`) is
            // the base model's, which llama.cpp reads from the base GGUF (as the converter).
            continue;
        } else {
            return Err(GgufError::tensor(
                key,
                "not a LoRA factor; llama.cpp adapters hold lora_A / lora_B pairs only",
            ));
        };
        let b_key = if is_embedding {
            format!("{module}.lora_embedding_B")
        } else {
            format!("{module}.lora_B.weight")
        };
        if !store.contains(&b_key) {
            return Err(GgufError::tensor(key, format!("no `{b_key}` beside it")));
        }
        let base_module = module.strip_prefix("base_model.model.").unwrap_or(module);
        let base_name = format!("{base_module}.weight");
        let mapped = arch.map(&base_name, &hp)?.ok_or_else(|| {
            GgufError::tensor(key, "adapts a tensor the GGUF model does not hold")
        })?;
        let a_shape = store.shape(key)?.to_vec();
        let b_shape = store.shape(&b_key)?.to_vec();
        if a_shape.len() != 2 || b_shape.len() != 2 || a_shape[0] != b_shape[1] {
            return Err(GgufError::tensor(
                key,
                format!("A {a_shape:?} and B {b_shape:?} are not a LoRA pair"),
            ));
        }
        let rank = a_shape[0] as f64;
        let r_m = pattern_value(lora.get("rank_pattern"), base_module).unwrap_or(r);
        let alpha_m = pattern_value(lora.get("alpha_pattern"), base_module).unwrap_or(alpha);
        let peft_scale = if rslora {
            alpha_m / r_m.sqrt()
        } else {
            alpha_m / r_m
        };
        let llama_scale = alpha / rank;
        let ratio = peft_scale / llama_scale;
        let scale = if (ratio - 1.0).abs() < 1e-12 {
            1.0
        } else {
            ratio as f32
        };

        let a_name = format!("{}.lora_a", mapped.name);
        let b_name = format!("{}.lora_b", mapped.name);
        // llama.cpp reads an embedding's A transposed (`llm_build_inp_embd`).
        let a_out_shape = if is_embedding {
            vec![a_shape[1], a_shape[0]]
        } else {
            a_shape.clone()
        };
        let outtype = options.outtype.resolve(Some(store.dtype(key)?));
        let a_type = outtype.storage(&a_name, 2, a_out_shape[1], &facts);
        let b_type = outtype.storage(&b_name, 2, b_shape[1], &facts);
        writer.add_tensor(&a_name, &a_out_shape, a_type)?;
        sources.push(Source::LoraA {
            key: key.clone(),
            transpose: is_embedding,
        });
        writer.add_tensor(&b_name, &b_shape, b_type)?;
        sources.push(Source::LoraB {
            key: b_key,
            rows: mapped.rows,
            scale,
        });
    }
    if sources.is_empty() {
        return Err(GgufError::Unsupported(format!(
            "{}: no LoRA pairs in the adapter",
            adapter_dir.display()
        )));
    }
    // Every B was taken with its A above; a B alone is a broken adapter, not one to drop.
    for key in &keys {
        let a_key = key
            .replace(".lora_B.weight", ".lora_A.weight")
            .replace(".lora_embedding_B", ".lora_embedding_A");
        if a_key != *key && !store.contains(&a_key) {
            return Err(GgufError::tensor(key, format!("no `{a_key}` beside it")));
        }
    }
    write_all(&writer, out, &store, &sources, progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FACTS: ModelFacts = ModelFacts {
        n_layers: 2,
        tied_embeddings: false,
        is_70b: false,
    };

    #[test]
    fn storage_follows_the_converters_rules() {
        for (outtype, name, dims, row, expected) in [
            (OutType::F16, "blk.0.attn_norm.weight", 1, 64, GgmlType::F32),
            (OutType::F16, "blk.0.attn_q.bias", 1, 64, GgmlType::F32),
            (OutType::F16, "blk.0.attn_q.weight", 2, 64, GgmlType::F16),
            (OutType::Q8_0, "blk.0.attn_q.weight", 2, 64, GgmlType::Q8_0),
            (
                OutType::Q8_0,
                "blk.0.attn_q.weight.lora_a",
                2,
                4,
                GgmlType::F16,
            ),
        ] {
            assert_eq!(
                outtype.storage(name, dims, row, &FACTS),
                expected,
                "{outtype:?} {name}"
            );
        }
        assert_eq!(OutType::Auto.resolve(Some(Dtype::F16)), OutType::F16);
        assert_eq!(OutType::Auto.resolve(Some(Dtype::F32)), OutType::Bf16);
    }

    #[test]
    fn peft_patterns_match_a_name_or_its_dotted_tail() {
        let p = serde_json::json!({"o_proj": 4, "layers.1.self_attn.q_proj": 2});
        assert_eq!(
            pattern_value(Some(&p), "model.layers.0.self_attn.o_proj"),
            Some(4.0)
        );
        assert_eq!(
            pattern_value(Some(&p), "model.layers.1.self_attn.q_proj"),
            Some(2.0)
        );
        assert_eq!(
            pattern_value(Some(&p), "model.layers.0.self_attn.q_proj"),
            None
        );
        assert_eq!(
            pattern_value(Some(&p), "model.layers.0.self_attn.xo_proj"),
            None
        );
    }

    #[test]
    fn folder_names_become_general_name_as_the_converter_writes_it() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("qwen2-tiny");
        std::fs::create_dir(&model).unwrap();
        assert_eq!(display_name(&model), "Qwen2 Tiny");
    }
}
