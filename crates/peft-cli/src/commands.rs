//! The subcommands. Each returns `anyhow::Result` with context naming the file at fault.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_core::tensors::save_safetensors;
use peft_core::{CausalLm, HostTensor, ModelInput, ModuleKind, TensorStore};
use peft_models::{AnyModel, Decoding, GenerateOptions, Tokenizer};

use crate::{DeviceArg, GenerateArgs, InspectArgs, LogitsArgs, ModelArgs};

fn device(arg: &DeviceArg) -> Result<Device> {
    let name = arg
        .device
        .clone()
        .or_else(|| std::env::var("PEFT_DEVICE").ok())
        .unwrap_or_else(|| "cpu".into());
    Ok(peft_core::device::parse_device(&name)?)
}

fn load_model(args: &ModelArgs) -> Result<AnyModel<peft_core::NoAdapter>> {
    let device = device(&args.device)?;
    if let Some(adapter) = &args.adapter {
        let config = adapter.join("adapter_config.json");
        let header = peft_core::config::read_header(&config)
            .with_context(|| format!("reading adapter {}", adapter.display()))?;
        bail!(
            "--adapter: {:?} adapters are not implemented in this version of peft-rs yet ({})",
            header.peft_type,
            config.display()
        );
    }
    peft_models::load(&args.model, &device)
        .with_context(|| format!("loading model {}", args.model.display()))
}

/// `peft logits`.
pub fn logits(args: LogitsArgs) -> Result<()> {
    let model = load_model(&args.model)?;
    let device = CausalLm::device(&model);
    let store = TensorStore::open(&args.inputs)?;
    let (ids, shape) = store.i64("input_ids")?;
    let [batch, seq] = match shape.as_slice() {
        [b, s] if *b > 0 && *s > 0 => [*b, *s],
        other => bail!(
            "{}: `input_ids` must be [batch, seq] with batch, seq > 0, got {other:?}",
            args.inputs.display()
        ),
    };
    let vocab = model.spec().vocab_size;
    if let Some(bad) = ids.iter().find(|&&i| i < 0 || i as usize >= vocab) {
        bail!(
            "{}: token id {bad} in `input_ids` is outside the vocabulary of {vocab}",
            args.inputs.display()
        );
    }
    let mask = if store.contains("attention_mask") {
        let (mask, mshape) = store.i64("attention_mask")?;
        if mshape != shape {
            bail!(
                "{}: `attention_mask` has shape {mshape:?}, `input_ids` has {shape:?}",
                args.inputs.display()
            );
        }
        if mask.iter().any(|&m| m != 0 && m != 1) {
            bail!(
                "{}: `attention_mask` must hold only 0 and 1",
                args.inputs.display()
            );
        }
        mask
    } else {
        vec![1; batch * seq]
    };
    let input = ModelInput::with_mask(
        Tensor::<2, Int>::from_data(TensorData::new(ids, [batch, seq]), &device),
        Tensor::<2, Int>::from_data(TensorData::new(mask, [batch, seq]), &device),
    );
    let logits = model.forward(input, None)?;
    let dims = logits.dims();
    let values = logits
        .into_data()
        .try_to_vec_as::<f32>()
        .map_err(|e| anyhow::anyhow!("reading logits back from the device: {e:?}"))?;
    let mut out = BTreeMap::new();
    out.insert(
        "logits".to_string(),
        HostTensor::from_f32(dims.to_vec(), &values),
    );
    save_safetensors(&args.output, &out, None)
        .with_context(|| format!("writing {}", args.output.display()))?;
    Ok(())
}

/// `peft generate`.
pub fn generate(args: GenerateArgs) -> Result<()> {
    let model = load_model(&args.model)?;
    let tokenizer = Tokenizer::from_dir(&args.model.model);
    let prompt_ids = match (&args.prompt, &args.prompt_ids) {
        (Some(text), _) => tokenizer.as_ref().map_err(clone_err)?.encode(text)?,
        (None, Some(ids)) => ids.clone(),
        (None, None) => bail!("give --prompt or --prompt-ids"),
    };
    let spec = model.spec().clone();
    let decoding = if args.greedy || (args.temperature.is_none() && args.top_p.is_none()) {
        Decoding::Greedy
    } else {
        Decoding::Sample {
            temperature: args.temperature.unwrap_or(1.0),
            top_p: args.top_p.unwrap_or(1.0),
            seed: args.seed,
        }
    };
    let options = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        decoding,
        eos_token_id: spec.eos_token_id,
        pad_token_id: spec.pad_token_id.unwrap_or(0),
    };
    let stream = !args.json && tokenizer.is_ok();
    let mut shown = String::new();
    let mut so_far = Vec::new();
    let mut stdout = std::io::stdout();
    let new = peft_models::generate(&model, &[prompt_ids.clone()], &options, |_, id| {
        if stream && let Ok(tok) = &tokenizer {
            so_far.push(id);
            // Decode the whole continuation each time: byte-level BPE splits characters
            // across tokens, so only the growth of the decoded text is printed.
            if let Ok(text) = tok.decode(&so_far)
                && text.starts_with(&shown)
                && !text.ends_with('\u{fffd}')
            {
                let _ = write!(stdout, "{}", &text[shown.len()..]);
                let _ = stdout.flush();
                shown = text;
            }
        }
    })?;
    let new_ids = new.into_iter().next().unwrap_or_default();
    let text = match &tokenizer {
        Ok(tok) => tok.decode(&new_ids)?,
        Err(_) => String::new(),
    };
    if args.json {
        let obj = serde_json::json!({"prompt_ids": prompt_ids, "new_ids": new_ids, "text": text});
        println!("{obj}");
    } else if stream {
        println!("{}", text.strip_prefix(shown.as_str()).unwrap_or(""));
    } else {
        println!("{}", ids_to_string(&new_ids));
    }
    Ok(())
}

fn clone_err(e: &peft_core::PeftError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

fn ids_to_string(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// `peft inspect`.
pub fn inspect(args: InspectArgs) -> Result<()> {
    let device = Device::flex();
    let model = peft_models::load(&args.model, &device)
        .with_context(|| format!("loading model {}", args.model.display()))?;
    let stdout = std::io::stdout();
    match print_modules(&mut stdout.lock(), &model, &args.model) {
        // A closed pipe (`peft inspect … | head`) is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn print_modules(out: &mut impl Write, model: &impl CausalLm, dir: &Path) -> std::io::Result<()> {
    let spec = model.spec();
    writeln!(
        out,
        "{} ({}): {} layers, hidden {}, {} heads ({} key/value), vocab {}",
        dir.display(),
        spec.model_type,
        spec.num_layers,
        spec.hidden_size,
        spec.num_heads,
        spec.num_kv_heads,
        spec.vocab_size
    )?;
    let modules = model.modules();
    let mut total = 0;
    for m in &modules {
        let kind = match m.kind {
            ModuleKind::Linear { .. } => "Linear",
            ModuleKind::Embedding { .. } => "Embedding",
            ModuleKind::LayerNorm { .. } => "LayerNorm",
            ModuleKind::RmsNorm { .. } => "RMSNorm",
        };
        if m.tied {
            writeln!(
                out,
                "{:<56} {kind:<10} (tied to the input embeddings)",
                m.path
            )?;
            continue;
        }
        for (name, shape) in m.params() {
            writeln!(
                out,
                "{:<56} {kind:<10} {shape:?}",
                format!("{}.{name}", m.path)
            )?;
        }
        total += m.num_params();
    }
    writeln!(out, "all params: {}", peft_core::summary::thousands(total))
}
