//! `peft quantize`: write tensors or a whole model in bitsandbytes' 4-bit layout.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use peft_core::{HostTensor, ModuleKind, TensorStore};
use peft_quant::{QuantConfig, Quantized4bit, SourceDtype};
use peft_tensors::{bytes_to_f32, save_safetensors, write_atomic};
use regex::Regex;

use crate::QuantizeArgs;

/// `peft quantize`.
pub fn quantize(args: QuantizeArgs) -> Result<()> {
    let config = QuantConfig {
        quant_type: args.quant_type.parse()?,
        blocksize: args.blocksize,
        double_quant: args.double_quant,
    };
    config.validate()?;
    let pattern = args
        .tensors
        .as_deref()
        .map(|p| {
            Regex::new(&format!("^(?:{p})$")).map_err(|e| {
                // The regex crate's message spans several lines; its last line says what is wrong.
                let reason = e.to_string();
                let reason = reason
                    .lines()
                    .last()
                    .unwrap_or("invalid")
                    .trim()
                    .to_string();
                anyhow::anyhow!("--tensors `{p}`: invalid regex: {reason}")
            })
        })
        .transpose()?;
    match (&args.input, &args.model) {
        (Some(input), None) => quantize_file(input, &args.output, config, pattern.as_ref()),
        (None, Some(model)) => quantize_model(model, &args.output, config, pattern.as_ref()),
        _ => bail!("give exactly one of --input FILE or --model DIR"),
    }
}

/// Quantises `tensor` under `name` into `out`, or copies it when it is not a 2-D float tensor.
fn add_tensor(
    out: &mut BTreeMap<String, HostTensor>,
    name: &str,
    tensor: HostTensor,
    quantize: bool,
    config: QuantConfig,
) -> Result<bool> {
    let dtype = SourceDtype::from_safetensors(tensor.dtype);
    if !quantize || tensor.shape.len() != 2 || dtype.is_none() {
        out.insert(name.to_string(), tensor);
        return Ok(false);
    }
    let values = bytes_to_f32(tensor.dtype, &tensor.data)
        .with_context(|| format!("tensor `{name}`: unreadable float data"))?;
    let q = Quantized4bit::quantize(
        &values,
        &tensor.shape,
        dtype.unwrap_or(SourceDtype::F32),
        config,
    )
    .with_context(|| format!("quantising `{name}`"))?;
    out.extend(q.to_tensors(name));
    Ok(true)
}

fn report(count: usize, total: usize, output: &Path, config: QuantConfig) {
    eprintln!(
        "quantised {count} of {total} tensors to {} (blocksize {}, double quant {}) → {}",
        config.quant_type.as_str(),
        config.blocksize,
        config.double_quant,
        output.display()
    );
}

fn quantize_file(
    input: &Path,
    output: &Path,
    config: QuantConfig,
    pattern: Option<&Regex>,
) -> Result<()> {
    let store = TensorStore::open(input)?;
    let (out, count, total) = convert_store(&store, config, |key| {
        pattern.is_none_or(|p| p.is_match(key))
    })?;
    if pattern.is_some() && count == 0 {
        bail!(
            "--tensors matched no 2-D float tensor of {}",
            input.display()
        );
    }
    save_safetensors(output, &out, None)?;
    report(count, total, output, config);
    Ok(())
}

/// Every tensor of `store`, those `selected` (and 2-D float) in 4-bit layout; returns the
/// tensors, how many were quantised and how many there were.
fn convert_store(
    store: &TensorStore,
    config: QuantConfig,
    selected: impl Fn(&str) -> bool,
) -> Result<(BTreeMap<String, HostTensor>, usize, usize)> {
    let mut keys: Vec<String> = store.keys().map(str::to_string).collect();
    keys.sort();
    let mut out = BTreeMap::new();
    let mut count = 0;
    for key in &keys {
        let tensor = store.get(key)?;
        count += usize::from(add_tensor(&mut out, key, tensor, selected(key), config)?);
    }
    Ok((out, count, keys.len()))
}

/// Writes a 4-bit Hugging Face checkpoint: every linear weight except `lm_head` quantised (as
/// transformers' `load_in_4bit` does), `quantization_config` added to config.json.
fn quantize_model(
    dir: &Path,
    output: &Path,
    config: QuantConfig,
    pattern: Option<&Regex>,
) -> Result<()> {
    let hf_config = peft_models::read_config(dir)?;
    let store = TensorStore::open_model_dir(dir)?;
    let linear_weights: Vec<String> = peft_models::config_modules(&hf_config)
        .into_iter()
        .filter(|m| matches!(m.kind, ModuleKind::Linear { .. }) && m.path != "lm_head")
        .map(|m| format!("{}.weight", m.path))
        .filter(|k| pattern.is_none_or(|p| p.is_match(k)))
        .collect();
    if let Some(key) = linear_weights.iter().find(|k| !store.contains(k)) {
        bail!("{}: missing tensor `{key}`", dir.display());
    }
    let (out, count, total) = convert_store(&store, config, |key| {
        linear_weights.iter().any(|k| k == key)
    })?;
    std::fs::create_dir_all(output).with_context(|| format!("creating {}", output.display()))?;
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    save_safetensors(output.join("model.safetensors"), &out, Some(metadata))?;

    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let mut json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", config_path.display()))?;
    let dtype = json
        .get("dtype")
        .or_else(|| json.get("torch_dtype"))
        .and_then(|v| v.as_str())
        .unwrap_or("float32")
        .to_string();
    let quantization = serde_json::json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": config.quant_type.as_str(),
        "bnb_4bit_use_double_quant": config.double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes"
    });
    if let Some(obj) = json.as_object_mut() {
        obj.insert("quantization_config".into(), quantization);
    }
    write_atomic(
        output.join("config.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    peft_models::save::copy_side_files(dir, output)?;
    if config.blocksize != 64 {
        eprintln!(
            "note: transformers' BitsAndBytesConfig has no block size setting; the checkpoint \
             records blocksize {} in each quant_state and peft-rs reads it, bitsandbytes too",
            config.blocksize
        );
    }
    report(count, total, output, config);
    Ok(())
}
