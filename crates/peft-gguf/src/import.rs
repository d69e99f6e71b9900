//! GGUF → Hugging Face folder: for a user whose base model is only a GGUF file. The file's
//! metadata becomes `config.json`, its vocabulary `tokenizer.json` / `tokenizer_config.json`,
//! its tensors `model.safetensors` (de-quantised to f32, or kept as f16 / bf16), with the
//! converter's row re-orderings undone — the inverse of [`crate::export_model`] for the
//! architectures and storage types it writes. The folder then loads as any checkpoint
//! (`peft_models::load`), as a frozen base for inference and adapter training.

use std::path::Path;

use safetensors::Dtype;
use serde_json::{Value as Json, json};

use peft_tensors::{PendingTensor, save_sharded};

use crate::arch::{Arch, HParams, Llama3Rope};
use crate::error::{GgufError, Result};
use crate::format::{GgmlType, GgufFile, Value};
use crate::quant;

/// The largest shard written (transformers' default).
const MAX_SHARD: u64 = 50_000_000_000;

fn meta_u32(file: &GgufFile, key: &str) -> Option<u64> {
    file.get(key).and_then(Value::as_u64)
}

fn meta_f32(file: &GgufFile, key: &str) -> Option<f64> {
    match file.get(key)? {
        Value::F32(v) => Some(f64::from(*v)),
        Value::F64(v) => Some(*v),
        _ => None,
    }
}

fn need(file: &GgufFile, key: &str) -> Result<u64> {
    meta_u32(file, key).ok_or_else(|| GgufError::config(file.path(), format!("missing `{key}`")))
}

/// `config.json` for the file's architecture, from its metadata.
fn hf_config(file: &GgufFile, arch: Arch) -> Result<Json> {
    let a = arch.gguf_name();
    let vocab = match file.get("tokenizer.ggml.tokens") {
        Some(Value::Array(_, items)) => items.len() as u64,
        _ => need(file, &format!("{a}.vocab_size"))?,
    };
    let tied = file.tensor("output.weight").is_none();
    let heads = need(file, &format!("{a}.attention.head_count"))?;
    let mut cfg = json!({
        "vocab_size": vocab,
        "hidden_size": need(file, &format!("{a}.embedding_length"))?,
        "num_hidden_layers": need(file, &format!("{a}.block_count"))?,
        "num_attention_heads": heads,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
    });
    for (key, name) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(id) = meta_u32(file, name) {
            cfg[key] = id.into();
        }
    }
    if arch == Arch::Bloom {
        // transformers' BLOOM names: `n_head` / `n_layer` (the generic names are aliases).
        cfg["architectures"] = json!(["BloomForCausalLM"]);
        cfg["model_type"] = "bloom".into();
        let layers = cfg["num_hidden_layers"].take();
        let object = cfg.as_object_mut().expect("built as an object");
        object.remove("num_hidden_layers");
        object.remove("num_attention_heads");
        cfg["n_head"] = heads.into();
        cfg["n_layer"] = layers;
        let eps = meta_f32(file, "bloom.attention.layer_norm_epsilon").ok_or_else(|| {
            GgufError::config(file.path(), "missing `bloom.attention.layer_norm_epsilon`")
        })?;
        cfg["layer_norm_epsilon"] = eps.into();
        return Ok(cfg);
    }
    let (class, model_type) = match arch {
        Arch::Llama => ("LlamaForCausalLM", "llama"),
        Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        Arch::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
        Arch::Phi3 => ("Phi3ForCausalLM", "phi3"),
        Arch::Bloom => unreachable!("handled above"),
    };
    cfg["architectures"] = json!([class]);
    cfg["model_type"] = model_type.into();
    cfg["hidden_act"] = "silu".into();
    cfg["intermediate_size"] = need(file, &format!("{a}.feed_forward_length"))?.into();
    cfg["num_key_value_heads"] = meta_u32(file, &format!("{a}.attention.head_count_kv"))
        .unwrap_or(heads)
        .into();
    if let Some(n) = meta_u32(file, &format!("{a}.context_length")) {
        cfg["max_position_embeddings"] = n.into();
    }
    if let Some(eps) = meta_f32(file, &format!("{a}.attention.layer_norm_rms_epsilon")) {
        cfg["rms_norm_eps"] = eps.into();
    }
    if let Some(d) = meta_u32(file, &format!("{a}.attention.key_length")) {
        cfg["head_dim"] = d.into();
    }
    if arch == Arch::Qwen2 {
        cfg["use_sliding_window"] = false.into();
    }
    let mut rope = json!({
        "rope_theta": meta_f32(file, &format!("{a}.rope.freq_base")).unwrap_or(10000.0),
        "rope_type": "default",
    });
    if arch == Arch::Phi3 {
        phi3_config(file, &mut cfg, &mut rope)?;
    }
    if file.tensor("rope_freqs.weight").is_some() {
        let base = rope["rope_theta"].as_f64().unwrap_or(10000.0);
        let dim = meta_u32(file, &format!("{a}.rope.dimension_count"))
            .or(cfg["head_dim"].as_u64())
            .unwrap_or(cfg["hidden_size"].as_u64().unwrap_or(0) / heads.max(1));
        let llama3 = llama3_rope(file, base as f32, dim as usize)?;
        rope["rope_type"] = "llama3".into();
        rope["factor"] = llama3.factor.into();
        rope["low_freq_factor"] = llama3.low_freq_factor.into();
        rope["high_freq_factor"] = llama3.high_freq_factor.into();
        rope["original_max_position_embeddings"] = (llama3.original_context as u64).into();
    }
    match file
        .get(&format!("{a}.rope.scaling.type"))
        .and_then(Value::as_str)
    {
        None | Some("none") => {}
        Some("linear") => {
            rope["rope_type"] = "linear".into();
            rope["factor"] = meta_f32(file, &format!("{a}.rope.scaling.factor")).into();
        }
        Some("yarn") => {
            rope["rope_type"] = "yarn".into();
            rope["factor"] = meta_f32(file, &format!("{a}.rope.scaling.factor")).into();
            rope["original_max_position_embeddings"] =
                need(file, &format!("{a}.rope.scaling.original_context_length"))?.into();
            for (key, name) in [
                ("extrapolation_factor", "yarn_ext_factor"),
                ("attention_factor", "yarn_attn_factor"),
                ("beta_fast", "yarn_beta_fast"),
                ("beta_slow", "yarn_beta_slow"),
            ] {
                if let Some(v) = meta_f32(file, &format!("{a}.rope.scaling.{name}")) {
                    rope[key] = v.into();
                }
            }
        }
        Some(other) => {
            return Err(GgufError::Unsupported(format!(
                "{}: RoPE scaling `{other}` is not imported",
                file.path().display()
            )));
        }
    }
    cfg["rope_parameters"] = rope;
    Ok(cfg)
}

/// Phi-3's own keys: the original context, the sliding window (0: none, Phi-4's), and the
/// share of each head that rotates (`rope.dimension_count · heads / hidden`). LongRoPE files
/// (`rope_factors_long`) are refused: peft-models does not run LongRoPE.
fn phi3_config(file: &GgufFile, cfg: &mut Json, rope: &mut Json) -> Result<()> {
    if file.tensor("rope_factors_long.weight").is_some() {
        return Err(GgufError::Unsupported(format!(
            "{}: Phi-3 LongRoPE (rope_factors_long): peft-models does not run LongRoPE",
            file.path().display()
        )));
    }
    let hidden = cfg["hidden_size"].as_u64().unwrap_or(0);
    let heads = cfg["num_attention_heads"].as_u64().unwrap_or(1).max(1);
    let head_dim = hidden / heads;
    let rotary = need(file, "phi3.rope.dimension_count")?;
    if head_dim == 0 || rotary > head_dim {
        return Err(GgufError::config(
            file.path(),
            format!("phi3.rope.dimension_count {rotary} for heads {head_dim} wide"),
        ));
    }
    if rotary != head_dim {
        rope["partial_rotary_factor"] = (rotary as f64 / head_dim as f64).into();
    }
    if let Some(n) = meta_u32(file, "phi3.rope.scaling.original_context_length") {
        cfg["original_max_position_embeddings"] = n.into();
    }
    cfg["sliding_window"] = match meta_u32(file, "phi3.attention.sliding_window") {
        Some(0) | None => Json::Null,
        Some(n) => n.into(),
    };
    Ok(())
}

/// Llama 3's RoPE parameters behind the file's `rope_freqs.weight` ([`Llama3Rope::from_factors`]).
fn llama3_rope(file: &GgufFile, base: f32, dim: usize) -> Result<Llama3Rope> {
    let factors = file
        .tensor_f32("rope_freqs.weight")
        .ok_or_else(|| GgufError::tensor("rope_freqs.weight", "unreadable"))?;
    Llama3Rope::from_factors(&factors, base, dim).ok_or_else(|| {
        GgufError::Unsupported(format!(
            "{}: rope_freqs.weight ({} factors, up to {}) is not Llama 3's RoPE scaling with \
             low_freq_factor 1 and high_freq_factor 4 over a {dim}-wide head; import the \
             Hugging Face model instead",
            file.path().display(),
            factors.len(),
            factors.iter().fold(0f32, |m, v| m.max(*v))
        ))
    })
}

/// The Hugging Face tokenizer (`tokenizer.json`, `tokenizer_config.json`) of a `gpt2`-model
/// vocabulary.
fn hf_tokenizer(file: &GgufFile) -> Result<(Json, Json)> {
    let path = file.path();
    let model = file.get("tokenizer.ggml.model").and_then(Value::as_str);
    if model != Some("gpt2") {
        return Err(GgufError::Unsupported(format!(
            "{}: tokenizer.ggml.model `{}`; byte-level BPE (`gpt2`) vocabularies are imported",
            path.display(),
            model.unwrap_or("(none)")
        )));
    }
    let strings = |key: &str| -> Vec<String> {
        match file.get(key) {
            Some(Value::Array(_, items)) => items
                .iter()
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .collect(),
            _ => Vec::new(),
        }
    };
    let tokens = strings("tokenizer.ggml.tokens");
    let types: Vec<i64> = match file.get("tokenizer.ggml.token_type") {
        Some(Value::Array(_, items)) => items
            .iter()
            .map(|v| match v {
                Value::I32(t) => i64::from(*t),
                other => other.as_u64().map_or(1, |t| t as i64),
            })
            .collect(),
        _ => vec![1; tokens.len()],
    };
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        match types.get(id).copied().unwrap_or(1) {
            5 => continue, // unused: the converter's `[PAD{id}]` fillers
            t @ (3 | 4) => added.push(json!({
                "id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": t == 4, "special": t == 3,
            })),
            _ => {}
        }
        vocab.insert(token.clone(), id.into());
    }
    let pre = file
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("gpt-2");
    let split = crate::vocab::split_regex(pre).ok_or_else(|| {
        GgufError::Unsupported(format!(
            "{}: tokenizer.ggml.pre `{pre}` is not imported (gpt-2, llama-bpe, qwen2)",
            path.display()
        ))
    })?;
    let pre_tokenizer = match split {
        None => json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                       "use_regex": true}),
        Some(regex) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated",
             "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
             "use_regex": false}]}),
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false,
                           "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": strings("tokenizer.ggml.merges")},
    });
    let mut config = json!({"tokenizer_class": "PreTrainedTokenizerFast"});
    for (key, name) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(token) = meta_u32(file, name).and_then(|id| tokens.get(id as usize)) {
            config[key] = token.clone().into();
        }
    }
    for flag in ["add_bos_token", "add_eos_token"] {
        if let Some(Value::Bool(b)) = file.get(&format!("tokenizer.ggml.{flag}")) {
            config[flag] = (*b).into();
        }
    }
    if let Some(t) = file.get("tokenizer.chat_template").and_then(Value::as_str) {
        config["chat_template"] = t.into();
    }
    Ok((tokenizer, config))
}

/// Writes the GGUF file `gguf` as a Hugging Face model folder `out_dir` (created if missing):
/// `config.json`, `tokenizer.json`, `tokenizer_config.json` and `model.safetensors` (f16 and
/// bf16 tensors kept, f32 and Q8_0 as f32), one tensor in memory at a time.
pub fn import_gguf(gguf: &Path, out_dir: &Path) -> Result<()> {
    let file = GgufFile::open(gguf)?;
    let arch_name = file
        .get("general.architecture")
        .and_then(Value::as_str)
        .ok_or_else(|| GgufError::config(gguf, "missing `general.architecture`"))?;
    let arch = match arch_name {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        "qwen3" => Arch::Qwen3,
        "bloom" => Arch::Bloom,
        "phi3" => Arch::Phi3,
        other => {
            return Err(GgufError::Unsupported(format!(
                "{}: GGUF architecture `{other}` is not imported (llama, qwen2, qwen3, bloom, \
                 phi3)",
                gguf.display()
            )));
        }
    };
    if file.get("general.type").and_then(Value::as_str) == Some("adapter") {
        return Err(GgufError::Unsupported(format!(
            "{}: a LoRA adapter GGUF, not a model",
            gguf.display()
        )));
    }
    let config = hf_config(&file, arch)?;
    let (tokenizer, tokenizer_config) = hf_tokenizer(&file)?;
    let config_path = out_dir.join("config.json");
    let hp = HParams::new(&config, &config_path);

    let mut pending = Vec::new();
    for info in &file.tensors {
        let Some((hf_name, rows)) = arch.unmap(&info.name, &hp)? else {
            continue;
        };
        let shape = info.torch_shape();
        let dtype = match info.ggml_type {
            GgmlType::F16 => Dtype::F16,
            GgmlType::Bf16 => Dtype::BF16,
            // Quantised types are de-quantised to f32 (their exact values).
            _ => Dtype::F32,
        };
        let file_ref = &file;
        pending.push(PendingTensor {
            name: hf_name,
            dtype,
            shape: shape.clone(),
            bytes: Box::new(move || {
                let name = &info.name;
                let raw = file_ref.tensor_bytes(info);
                let row_count = shape.first().copied().unwrap_or(1);
                if rows == crate::arch::RowOrder::Keep && dtype != Dtype::F32 {
                    return Ok(raw.to_vec());
                }
                let values = quant::decode(info.ggml_type, raw);
                let values = rows
                    .undo(values, row_count, name)
                    .map_err(|e| peft_tensors::PeftError::InvalidInput(e.to_string()))?;
                let stored = match dtype {
                    Dtype::F16 => GgmlType::F16,
                    Dtype::BF16 => GgmlType::Bf16,
                    _ => GgmlType::F32,
                };
                quant::encode(stored, &values)
                    .map_err(|e| peft_tensors::PeftError::InvalidInput(e.to_string()))
            }),
        });
    }
    std::fs::create_dir_all(out_dir).map_err(|e| GgufError::io(out_dir, e))?;
    save_sharded(out_dir, &pending, MAX_SHARD, None)?;
    crate::json::write(&config_path, &config)?;
    crate::json::write(&out_dir.join("tokenizer.json"), &tokenizer)?;
    crate::json::write(&out_dir.join("tokenizer_config.json"), &tokenizer_config)?;
    Ok(())
}
