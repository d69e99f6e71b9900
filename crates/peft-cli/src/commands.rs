//! The subcommands. Each returns `anyhow::Result` with context naming the file at fault.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_core::{HostTensor, ModelInput, ModuleKind, NoAdapter, TensorStore};
use peft_lora::{LoraSet, MultiLoraModel};
use peft_models::{AnyModel, Decoding, GenerateOptions, Tokenizer};
use peft_tensors::save_safetensors;

use crate::runnable::{Inspected, Runnable};
use crate::{CombineArgs, GenerateArgs, InspectArgs, LogitsArgs, MergeArgs, ModelArgs, ServeArgs};

fn load_base(
    model: &Path,
    device: &Device,
    options: &peft_models::LoadOptions,
) -> Result<AnyModel<NoAdapter>> {
    peft_models::load_with(model, device, options)
        .with_context(|| format!("loading model {}", model.display()))
}

/// Loads an adapter folder of any implemented method onto `base` (the `peft` crate's registry
/// picks the loader by the folder's `peft_type`).
fn load_adapter(base: AnyModel<NoAdapter>, adapter: &Path) -> Result<Box<dyn Runnable>> {
    let model = peft::PeftModel::from_pretrained(base, adapter)
        .with_context(|| format!("loading adapter {}", adapter.display()))?;
    Ok(Box::new(model))
}

/// `--adapter [NAME=]DIR` values as `(name, folder)`: a value naming an existing path is a
/// folder as it stands; otherwise the text before its first `=` is the adapter's name.
pub(crate) fn adapter_specs(values: &[String]) -> Vec<(Option<String>, PathBuf)> {
    values
        .iter()
        .map(|v| match v.split_once('=') {
            Some((name, dir)) if !Path::new(v).exists() => {
                (Some(name.to_string()), PathBuf::from(dir))
            }
            _ => (None, PathBuf::from(v)),
        })
        .collect()
}

/// Several LoRA adapters on `base`, named as given (an unnamed first one is `default`); the
/// first is active.
fn load_multi_lora(
    base: AnyModel<NoAdapter>,
    specs: &[(Option<String>, PathBuf)],
) -> Result<MultiLoraModel<AnyModel<LoraSet>>> {
    let mut multi = MultiLoraModel::new(base)?;
    for (i, (name, dir)) in specs.iter().enumerate() {
        let name = match name {
            Some(name) => name.clone(),
            None if i == 0 => peft_lora::DEFAULT_ADAPTER.to_string(),
            None => bail!(
                "--adapter {}: name every adapter after the first (--adapter NAME=DIR)",
                dir.display()
            ),
        };
        let peft_type = peft_core::config::read_peft_type(dir.join("adapter_config.json"))
            .with_context(|| format!("reading adapter {}", dir.display()))?;
        if peft::by_peft_type(peft_type).serving != peft::Serving::SharedBatch {
            bail!(
                "--adapter {}: several adapters on one model (and --adapter-names) are LoRA \
                 only, as PEFT's mixed-adapter batches; this adapter is {:?}",
                dir.display(),
                peft_type
            );
        }
        multi
            .load_adapter(&name, dir)
            .with_context(|| format!("loading adapter `{name}` from {}", dir.display()))?;
    }
    let first = multi.adapter_names()[0].to_string();
    multi.set_adapter(&[first.as_str()])?;
    Ok(multi)
}

/// The model `args` name, with its adapters. `generation`: a missing `--compute-dtype` means
/// `auto` (transformers' default for generation), else float32 (`logits`, a parity tool).
fn load_model(args: &ModelArgs, generation: bool) -> Result<Box<dyn Runnable>> {
    let device = args.device.resolve()?;
    let default = if generation {
        crate::DtypeDefault::Auto
    } else {
        crate::DtypeDefault::Float32
    };
    let options = args.load.options(&args.model, &device, default)?;
    let base = load_base(&args.model, &device, &options)?;
    let specs = adapter_specs(&args.adapter);
    let loaded: Box<dyn Runnable> = match specs.as_slice() {
        [] => return Ok(Box::new(base)),
        [(None, adapter)] if args.adapter_names.is_none() => load_adapter(base, adapter)?,
        several => Box::new(load_multi_lora(base, several)?),
    };
    Ok(if args.merge {
        Box::new(loaded.merge_and_unload()?)
    } else {
        loaded
    })
}

/// Applies `--adapter-names` (one adapter per batch row); returns how many rows were assigned.
fn assign_rows(model: &mut dyn Runnable, names: Option<&[String]>) -> Result<Option<usize>> {
    let Some(names) = names else {
        return Ok(None);
    };
    let rows: Vec<&str> = names.iter().map(String::as_str).collect();
    model.set_row_adapters(&rows).context("--adapter-names")?;
    Ok(Some(rows.len()))
}

/// `peft logits`.
pub fn logits(args: LogitsArgs) -> Result<()> {
    let mut model = load_model(&args.model, false)?;
    let rows = assign_rows(model.as_mut(), args.model.adapter_names.as_deref())?;
    run_logits(model.as_ref(), &args, rows)
}

fn run_logits(model: &dyn Runnable, args: &LogitsArgs, rows: Option<usize>) -> Result<()> {
    let device = model.device();
    let store = TensorStore::open(&args.inputs)?;
    let (ids, shape) = store.i64("input_ids")?;
    let [batch, seq] = match shape.as_slice() {
        [b, s] if *b > 0 && *s > 0 => [*b, *s],
        other => bail!(
            "{}: `input_ids` must be [batch, seq] with batch, seq > 0, got {other:?}",
            args.inputs.display()
        ),
    };
    if let Some(rows) = rows
        && rows != batch
    {
        bail!("--adapter-names gives {rows} names for the {batch} rows of `input_ids`");
    }
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
    let logits = model.forward(input)?;
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

/// `--chat`: the prompt as one user message, through the model's chat template with its
/// generation prompt, or the seed tutorial's `Human: …\n\nAssistant: ` where the model has no
/// template (the format `peft train` uses for it).
fn chat_prompt_ids(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tokenizer.encode_chat(&[peft_models::chat::Message::new("user", text)])?)
}

/// `peft generate`.
pub fn generate(args: GenerateArgs) -> Result<()> {
    let mut model = load_model(&args.model, true)?;
    assign_rows(model.as_mut(), args.model.adapter_names.as_deref())?;
    run_generate(model.as_ref(), &args)
}

fn run_generate(model: &dyn Runnable, args: &GenerateArgs) -> Result<()> {
    let tokenizer = Tokenizer::from_dir(&args.model.model);
    let prompt_ids = match (&args.prompt, &args.prompt_ids) {
        (Some(text), _) if args.chat => {
            let tokenizer = tokenizer.as_ref().map_err(clone_err)?;
            chat_prompt_ids(tokenizer, text)?
        }
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
        eos_token_ids: spec.eos_token_ids.clone(),
        pad_token_id: spec.pad_token_id.unwrap_or(0),
    };
    // With --adapter-names: the prompt once per name, in one batch.
    let rows = args.model.adapter_names.clone();
    let batch = rows.as_ref().map_or(1, Vec::len);
    let stream = !args.json && tokenizer.is_ok() && rows.is_none();
    let mut shown = String::new();
    let mut so_far = Vec::new();
    let mut stdout = std::io::stdout();
    let new = model.generate(&vec![prompt_ids.clone(); batch], &options, &mut |_, id| {
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
    if let Some(rows) = rows {
        for (name, new_ids) in rows.iter().zip(new) {
            let text = match &tokenizer {
                Ok(tok) => tok.decode(&new_ids)?,
                Err(_) => ids_to_string(&new_ids),
            };
            if args.json {
                let obj = serde_json::json!({
                    "adapter": name, "prompt_ids": prompt_ids, "new_ids": new_ids, "text": text
                });
                println!("{obj}");
            } else {
                println!("[{name}] {text}");
            }
        }
        return Ok(());
    }
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
    let model = load_base(&args.model, &device, &Default::default())?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let method = match (&args.config, args.method.as_deref()) {
        (None, None) => None,
        (Some(_), Some(_)) => bail!("give --config or --method, not both"),
        (None, Some(name)) => Some(peft::by_name(name)?),
        (Some(config), None) => Some(peft::by_peft_type(peft_core::config::read_peft_type(
            config,
        )?)),
    };
    let printed = match method {
        None => print_modules(&mut out, &model, &args.model),
        Some(method) => {
            let tokenizer = Tokenizer::from_dir(&args.model).ok();
            let shown = Inspected::new(model, method, args.config.as_deref(), tokenizer.as_ref())?;
            print_targets(&mut out, &shown, &args.model)
        }
    };
    match printed {
        // A closed pipe (`peft inspect … | head`) is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// `peft merge`.
pub fn merge(args: MergeArgs) -> Result<()> {
    let save = args.save.options()?;
    let device = args.device.resolve()?;
    let base = load_base(&args.model, &device, &Default::default())?;
    // Merged layer by layer as the checkpoint is written: never a whole merged copy in memory.
    load_adapter(base, &args.adapter)?
        .save_merged(&args.model, &args.output, &save)
        .with_context(|| format!("writing merged model to {}", args.output.display()))?;
    eprintln!("merged model written to {}", args.output.display());
    Ok(())
}

/// `peft combine`.
pub fn combine(args: CombineArgs) -> Result<()> {
    let kind: peft_lora::CombinationType = args.combination_type.parse()?;
    let options = peft_lora::Combination {
        combination_type: kind,
        svd_rank: args.svd_rank,
        density: args.density,
        majority_sign_method: args.majority_sign_method.parse()?,
        seed: args.seed,
    };
    let specs = adapter_specs(&args.adapters);
    if specs.iter().any(|(name, _)| name.is_none()) {
        bail!("--adapter: name every adapter combined (--adapter NAME=DIR)");
    }
    let device = args.device.resolve()?;
    let base = load_base(&args.model, &device, &Default::default())?;
    let mut multi = load_multi_lora(base, &specs)?;
    let names: Vec<String> = specs.into_iter().filter_map(|(n, _)| n).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let combined = "combined";
    let combined = if names.contains(&combined) {
        "combined_adapter"
    } else {
        combined
    };
    multi.add_weighted_adapter(&names, &args.weights, combined, &options)?;
    multi
        .save_adapter_folder(combined, &args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    let config = &multi.adapter(combined)?.config;
    eprintln!(
        "{} adapter (r = {}, {} layers) written to {}",
        kind.name(),
        config.r,
        multi.adapter(combined)?.targeted.len(),
        args.output.display()
    );
    Ok(())
}

/// The model's modules, then what an adapter config targets and PEFT's trainable line.
fn print_targets(out: &mut impl Write, shown: &Inspected, dir: &Path) -> std::io::Result<()> {
    print_modules(out, shown.model.as_ref(), dir)?;
    writeln!(out, "\ntargeted modules ({}):", shown.targeted.len())?;
    for path in &shown.targeted {
        writeln!(out, "  {path}")?;
    }
    for name in &shown.saved {
        writeln!(out, "  {name} (trained in full)")?;
    }
    for note in &shown.notes {
        writeln!(out, "{note}")?;
    }
    writeln!(out, "{}", shown.summary)
}

fn print_modules(out: &mut impl Write, model: &dyn Runnable, dir: &Path) -> std::io::Result<()> {
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

/// `peft serve`.
pub fn serve(args: ServeArgs) -> Result<()> {
    let serve_device = args.device.resolve()?;
    let load = args
        .load
        .options(&args.model, &serve_device, crate::DtypeDefault::Auto)?;
    let mut options = peft_serve::ServeOptions::new(&args.model, serve_device);
    for (name, dir) in adapter_specs(&args.adapters) {
        let Some(name) = name else {
            bail!(
                "--adapter {}: name each served adapter (--adapter NAME=DIR); requests pick it \
                 by that name",
                dir.display()
            );
        };
        options.adapters.push((name, dir));
    }
    options.host = args.host;
    options.port = args.port;
    options.api_key = args
        .api_key
        .or_else(|| std::env::var("PEFT_API_KEY").ok())
        .filter(|k| !k.is_empty());
    options.adapter_dir = args.adapter_dir;
    options.max_model_len = args.max_model_len;
    options.max_queue = args.max_queue;
    options.max_batch = args.max_batch;
    options.served_model_name = args.served_model_name;
    options.max_loras = args.max_loras;
    let seconds = |flag: &str, value: f64, least: f64| {
        if value.is_finite() && value >= least && value <= 1e9 {
            Ok(std::time::Duration::from_secs_f64(value))
        } else {
            Err(anyhow::anyhow!(
                "--{flag} must be a number of seconds from {least} to 1e9, got {value}"
            ))
        }
    };
    options.shutdown_timeout = seconds("shutdown-timeout", args.shutdown_timeout, 0.0)?;
    // Zero would refuse every request: the least is a millisecond.
    options.read_timeout = seconds("read-timeout", args.read_timeout, 0.001)?;
    options.request_timeout = seconds("request-timeout", args.request_timeout, 0.001)?;
    if args.max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    options.max_connections = args.max_connections;
    options.load = load;
    peft_serve::serve(options)?;
    Ok(())
}
