//! `peft export-gguf`: a model, a merged fine-tune or a LoRA adapter as GGUF for llama.cpp and
//! Ollama (crate peft-gguf).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use peft_gguf::{ExportOptions, OutType};

use crate::DeviceArg;

/// `peft export-gguf`.
#[derive(Args, Debug)]
pub(crate) struct ExportGgufArgs {
    /// Hugging Face model folder (the base model where --adapter is given).
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter folder: written as a llama.cpp LoRA adapter (LoRA only), or merged into the
    /// model with --merge (any method that merges).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Merge the adapter into the model and write the merged model.
    #[arg(long, requires = "adapter")]
    merge: bool,
    /// The GGUF file to write.
    #[arg(long)]
    output: PathBuf,
    /// Storage of the weight matrices: f32, f16, bf16, q8_0, or auto (f16 for an f16
    /// checkpoint, bf16 otherwise), as llama.cpp's converters choose; norms and biases stay f32.
    /// Or a llama-quantize file type, written directly with its per-tensor choices: q4_0,
    /// q4_k_m, q5_k_m, q6_k (models only; an adapter is f32, f16, bf16 or q8_0).
    #[arg(long, default_value = "auto")]
    outtype: String,
    /// llama.cpp's pre-tokenizer name (`tokenizer.ggml.pre`: llama-bpe, qwen2, gpt-2...), for
    /// a tokenizer whose pre-tokenizer is not recognised.
    #[arg(long)]
    tokenizer_pre: Option<String>,
    /// `general.name` (default: the model or adapter folder's name).
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    device: DeviceArg,
}

impl ExportGgufArgs {
    /// The model folder, for the CLI's path resolution (a Hub id in the local cache).
    pub(crate) fn model_mut(&mut self) -> &mut PathBuf {
        &mut self.model
    }

    /// Whether a model (with its vocabulary) is written, not a LoRA adapter.
    pub(crate) fn writes_model(&self) -> bool {
        self.adapter.is_none() || self.merge
    }

    /// The adapter folder, if any.
    pub(crate) fn adapter(&self) -> Option<&Path> {
        self.adapter.as_deref()
    }
}

fn progress_bar(label: &str) -> ProgressBar {
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} tensors ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(label.to_string());
    bar
}

/// `peft export-gguf`.
pub(crate) fn export_gguf(args: ExportGgufArgs) -> Result<()> {
    if args.output.extension().and_then(|e| e.to_str()) != Some("gguf") {
        bail!(
            "--output {}: the file name must end in .gguf",
            args.output.display()
        );
    }
    let outtype: OutType = args.outtype.parse()?;
    let mut options = ExportOptions {
        outtype,
        tokenizer_pre: args.tokenizer_pre.as_deref(),
        name: args.name.as_deref(),
    };
    let bar = progress_bar("writing GGUF");
    let mut report = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    match (&args.adapter, args.merge) {
        (None, _) => peft_gguf::export_model(&args.model, &args.output, &options, &mut report)
            .with_context(|| format!("exporting {} to GGUF", args.model.display()))?,
        (Some(adapter), false) => {
            peft_gguf::export_lora(adapter, &args.model, &args.output, &options, &mut report)
                .with_context(|| format!("exporting adapter {} to GGUF", adapter.display()))?
        }
        (Some(adapter), true) => {
            // `auto` follows the base checkpoint's dtype, not the f32 merge in between.
            options.outtype = outtype.resolved_for(&args.model)?;
            let staging = staging_dir(&args.output)?;
            let merged = merge_to(&args.model, adapter, staging.path(), &args.device)?;
            let fallback;
            if options.name.is_none() {
                fallback = peft_gguf::export::folder_name(adapter);
                options.name = Some(&fallback);
            }
            peft_gguf::export_model(&merged, &args.output, &options, &mut report)
                .with_context(|| "exporting the merged model to GGUF".to_string())?;
        }
    }
    bar.finish_and_clear();
    eprintln!("GGUF written to {}", args.output.display());
    Ok(())
}

/// A temporary folder beside the output (same file system, removed on drop).
fn staging_dir(output: &Path) -> Result<tempfile::TempDir> {
    let parent = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    tempfile::Builder::new()
        .prefix(".peft-export-")
        .tempdir_in(parent)
        .with_context(|| format!("creating a temporary folder in {}", parent.display()))
}

/// Merges `adapter` into `model` and writes the merged checkpoint (f32, so nothing is rounded
/// before the GGUF's own storage type) to a new folder inside `staging`, which it returns.
fn merge_to(model: &Path, adapter: &Path, staging: &Path, device: &DeviceArg) -> Result<PathBuf> {
    let device = device.resolve()?;
    let base = peft_models::load_with(model, &device, &Default::default())
        .with_context(|| format!("loading model {}", model.display()))?;
    let loaded = peft::PeftModel::from_pretrained(base, adapter)
        .with_context(|| format!("loading adapter {}", adapter.display()))?;
    let save = peft_models::SaveOptions {
        dtype: Some(safetensors::Dtype::F32),
        ..Default::default()
    };
    // save_merged replaces its target folder whole: a fresh folder inside the staging one.
    let merged = staging.join("merged");
    loaded
        .save_merged(model, &merged, &save)
        .with_context(|| format!("merging {} into {}", adapter.display(), model.display()))?;
    Ok(merged)
}
