//! `peft`: run, inspect and adapt Hugging Face causal language models.
//!
//! Every command exits 0 on success and prints a one-line `error: …` with non-zero exit status
//! otherwise; bad input never produces a panic or a backtrace.

mod commands;
mod distributed;
mod export;
mod paths;
mod quantize;
mod runnable;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Parameter-efficient fine-tuning of Hugging Face language models, in Rust.
#[derive(Parser, Debug)]
#[command(name = "peft", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Compute logits for a batch of token ids stored in a safetensors file.
    Logits(LogitsArgs),
    /// Generate a continuation of a prompt.
    Generate(GenerateArgs),
    /// Print every module of a model with its Hugging Face name and parameter shapes; with
    /// --config, the modules an adapter config targets and PEFT's trainable-parameters line.
    Inspect(InspectArgs),
    /// Merge an adapter into its base model and write a standard Hugging Face checkpoint.
    Merge(MergeArgs),
    /// Fine-tune with LoRA, IA3, BitFit, prompt/prefix/P-tuning or QLoRA (no arguments: the
    /// bundled model and data set).
    Train(Box<train::TrainArgs>),
    /// Write tensors (--input) or a whole model (--model) in bitsandbytes' 4-bit layout.
    Quantize(QuantizeArgs),
    /// Combine LoRA adapters into one (PEFT's add_weighted_adapter) and write it as a PEFT
    /// adapter folder.
    Combine(CombineArgs),
    /// Serve the model and its LoRA adapters over an OpenAI-compatible HTTP API, decoding
    /// requests of different adapters together (continuous batching).
    Serve(ServeArgs),
    /// Write a model, a merged fine-tune (--adapter DIR --merge) or a LoRA adapter (--adapter
    /// DIR) as GGUF for llama.cpp and Ollama, as llama.cpp's converters write it.
    ExportGguf(export::ExportGgufArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Hugging Face model folder, or a repo id in the local Hugging Face cache.
    #[arg(long)]
    model: PathBuf,
    /// `NAME=DIR`, once per LoRA adapter loaded at start; a request's `model` field names it.
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    adapters: Vec<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Requests to /v1 must send `Authorization: Bearer KEY` (default: $PEFT_API_KEY, if set).
    #[arg(long)]
    api_key: Option<String>,
    /// Folder of adapter folders: a request whose `model` names one loads it on first use
    /// (LoRAX's dynamic adapters), and /v1/load_lora_adapter may load from it (runtime loading
    /// is off without it).
    #[arg(long)]
    adapter_dir: Option<PathBuf>,
    /// Prompt + generated tokens at most (default: the config's max_position_embeddings, or
    /// 2048 where the config has none, as BLOOM's).
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Requests waiting to join the batch at most; more are answered 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Sequences decoded together at most (also the most choices, `n`, a request may ask for).
    #[arg(long, default_value_t = peft_serve::DEFAULT_MAX_BATCH)]
    max_batch: usize,
    /// The base model's name in requests (default: the model folder's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Adapters resident at once at most. Past it, the least recently used idle adapter loaded
    /// on first use is evicted; adapters loaded at start or by /v1/load_lora_adapter are pinned,
    /// and when only pinned or busy ones are resident a load is answered 409.
    #[arg(long, default_value_t = peft_serve::DEFAULT_MAX_LORAS)]
    max_loras: usize,
    /// Seconds requests in flight may take to finish after SIGTERM/SIGINT; then they are cut.
    /// A second signal exits at once.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    shutdown_timeout: f64,
    /// Open connections at most; past it, new ones wait until one closes.
    #[arg(long, default_value_t = peft_serve::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Seconds a client has to send a request's headers, and between chunks of its body.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    read_timeout: f64,
    /// Seconds a request may take until its response starts (a whole non-streamed
    /// completion); past it, 408.
    #[arg(long, value_name = "SECONDS", default_value_t = 600.0)]
    request_timeout: f64,
    #[command(flatten)]
    load: LoadArgs,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(Args, Debug)]
struct CombineArgs {
    /// Hugging Face model folder of the base the adapters were trained on.
    #[arg(long)]
    model: PathBuf,
    /// `NAME=DIR`, once per LoRA adapter combined.
    #[arg(long = "adapter", value_name = "NAME=DIR", required = true)]
    adapters: Vec<String>,
    /// One weight per adapter, comma-separated; a negative weight subtracts.
    #[arg(
        long,
        value_delimiter = ',',
        allow_negative_numbers = true,
        required = true
    )]
    weights: Vec<f64>,
    /// linear, cat, svd, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd,
    /// dare_ties_svd, magnitude_prune or magnitude_prune_svd (PEFT's default: svd).
    #[arg(long, default_value = "svd")]
    combination_type: String,
    /// Fraction of values kept by the pruning types (ties, dare_*, magnitude_prune*).
    #[arg(long)]
    density: Option<f64>,
    /// Rank of an SVD-based result (default: the largest rank combined).
    #[arg(long)]
    svd_rank: Option<usize>,
    /// TIES' sign election: total or frequency.
    #[arg(long, default_value = "total")]
    majority_sign_method: String,
    /// Seed of DARE's random masks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    output: PathBuf,
    #[command(flatten)]
    device: DeviceArg,
}

/// How the base model is loaded: 4-bit (QLoRA's frozen base) and the compute dtype.
#[derive(Args, Debug, Clone, Default)]
struct LoadArgs {
    /// Quantise every linear layer except lm_head to 4-bit while loading: nf4 or fp4. A folder
    /// that already holds a 4-bit checkpoint is recognised without this flag.
    #[arg(long, value_name = "nf4|fp4")]
    load_4bit: Option<String>,
    /// With --load-4bit: also quantise the absmax statistics (double quantisation).
    #[arg(long, requires = "load_4bit")]
    double_quant: bool,
    /// With --load-4bit: elements per absmax block (a power of two, 32 … 4096).
    #[arg(long, default_value_t = 64)]
    blocksize: usize,
    /// The dtype linear layers compute in: float32, bfloat16 (bf16 products with f32
    /// accumulation, as torch.autocast / bnb_4bit_compute_dtype; the rest stays f32), or auto
    /// (bfloat16 for a bf16 checkpoint on a CPU with bf16 units and oneDNN, else float32: what
    /// transformers' default `dtype="auto"` computes in). Default: auto for `generate` and
    /// `serve`; float32 for `logits` and `train`, except `train --method qlora`: bfloat16 (the
    /// QLoRA paper's and the seed's setting) where the device has bf16.
    #[arg(long, value_name = "float32|bfloat16|auto")]
    compute_dtype: Option<String>,
    /// Hold the frozen weights of a bf16/f16 checkpoint widened to f32 (twice the memory). By
    /// default they stay in their stored 2 bytes and are widened, exactly, inside each product:
    /// the same results.
    #[arg(long)]
    widen_frozen: bool,
    /// Under bf16 compute, compute lm_head (or a tied model's projection) in bf16 too, as
    /// torch.autocast and a model loaded in bf16 do. By default it stays f32, the layout after
    /// PEFT's prepare_model_for_kbit_training. No effect under float32 compute.
    #[arg(long)]
    bf16_lm_head: bool,
}

/// What a command computes in when `--compute-dtype` is not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DtypeDefault {
    /// `generate`, `serve`: `auto`, transformers' default `dtype="auto"`.
    Auto,
    /// `logits` (a parity tool) and `train`: float32.
    Float32,
    /// `train` of a method that trains over a 4-bit base by default (QLoRA): bfloat16, as the
    /// paper and the seed (`bnb_4bit_compute_dtype=torch.bfloat16`), where the device has it;
    /// float32 on a device without bf16 (wgpu).
    Bfloat16WhereAvailable,
}

impl LoadArgs {
    /// The load options these flags ask for, for `model_dir` on `device`. The compute dtype is
    /// decided here and only here: the flag's value (`auto` resolved for the checkpoint and
    /// device), or the command's `default`.
    fn options(
        &self,
        model_dir: &std::path::Path,
        device: &burn::tensor::Device,
        default: DtypeDefault,
    ) -> anyhow::Result<peft_models::LoadOptions> {
        use peft_ops::precision::ComputeDtype;
        let auto = || peft_models::auto_compute_dtype(model_dir, device);
        let compute_dtype = match (self.compute_dtype.as_deref(), default) {
            (Some("auto"), _) | (None, DtypeDefault::Auto) => auto(),
            (None, DtypeDefault::Float32) => ComputeDtype::F32,
            (None, DtypeDefault::Bfloat16WhereAvailable) => {
                if ComputeDtype::Bf16.check_device(device).is_ok() {
                    ComputeDtype::Bf16
                } else {
                    ComputeDtype::F32
                }
            }
            (Some(name), _) => name.parse()?,
        };
        // An explicit f32 (any of its spellings) contradicts the flag; `auto` resolving to f32
        // leaves it without effect, as documented.
        let explicit_f32 = !matches!(self.compute_dtype.as_deref(), None | Some("auto"))
            && compute_dtype == ComputeDtype::F32;
        if self.bf16_lm_head && explicit_f32 {
            anyhow::bail!(
                "--bf16-lm-head computes lm_head in bf16: it needs bf16 compute, not --compute-dtype float32"
            );
        }
        Ok(peft_models::LoadOptions {
            quantize: self.config()?,
            compute_dtype,
            widen_half: self.widen_frozen,
            bf16_lm_head: self.bf16_lm_head,
        })
    }

    /// The quantisation to apply while loading, if any.
    fn config(&self) -> anyhow::Result<Option<peft_quant::QuantConfig>> {
        let Some(quant_type) = &self.load_4bit else {
            return Ok(None);
        };
        let config = peft_quant::QuantConfig {
            quant_type: quant_type.parse()?,
            blocksize: self.blocksize,
            double_quant: self.double_quant,
        };
        config.validate()?;
        Ok(Some(config))
    }
}

#[derive(Args, Debug)]
struct QuantizeArgs {
    /// A safetensors file: each selected 2-D float tensor is written in 4-bit layout, the others
    /// copied.
    #[arg(long, conflicts_with = "model", required_unless_present = "model")]
    input: Option<PathBuf>,
    /// A Hugging Face model folder: every linear weight except lm_head is quantised and
    /// config.json gets transformers' `quantization_config`.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Output file (with --input) or folder (with --model).
    #[arg(long)]
    output: PathBuf,
    /// nf4 or fp4.
    #[arg(long, default_value = "nf4")]
    quant_type: String,
    /// Quantise the absmax statistics too (double quantisation).
    #[arg(long)]
    double_quant: bool,
    /// Elements per absmax block (a power of two, 32 … 4096).
    #[arg(long, default_value_t = 64)]
    blocksize: usize,
    /// Only tensors whose whole name matches this regex.
    #[arg(long)]
    tensors: Option<String>,
}

/// Where the model runs.
#[derive(Args, Debug, Clone)]
struct DeviceArg {
    /// Compute device: cpu, wgpu or cuda (GPU devices need a build with that feature).
    /// Defaults to $PEFT_DEVICE, else cpu.
    #[arg(long)]
    device: Option<String>,
}

impl DeviceArg {
    /// The device of `--device`, else `$PEFT_DEVICE`, else the CPU.
    fn resolve(&self) -> anyhow::Result<burn::tensor::Device> {
        let name = self
            .device
            .clone()
            .or_else(|| std::env::var("PEFT_DEVICE").ok())
            .unwrap_or_else(|| "cpu".into());
        Ok(peft_ops::device::parse_device(&name)?)
    }
}

#[derive(Args, Debug)]
struct ModelArgs {
    /// Hugging Face model folder (config.json, model.safetensors, tokenizer.json), or a repo id
    /// `owner/name[@revision]` found in the local Hugging Face cache (no network).
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors). Repeat as
    /// `--adapter NAME=DIR` to hold several LoRA adapters on one model: the first is active,
    /// --adapter-names assigns them per row.
    #[arg(long, value_name = "[NAME=]DIR")]
    adapter: Vec<String>,
    /// One adapter name per input row (logits) or per generated sequence of the prompt
    /// (generate), `__base__` for none: one mixed-adapter batch, as PEFT's `adapter_names`.
    #[arg(
        long,
        value_delimiter = ',',
        requires = "adapter",
        conflicts_with = "merge"
    )]
    adapter_names: Option<Vec<String>>,
    /// Merge the (active) adapter into the base weights before running (merge_and_unload).
    #[arg(long, requires = "adapter")]
    merge: bool,
    #[command(flatten)]
    load: LoadArgs,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(Args, Debug)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// safetensors file with `input_ids` (i64, [batch, seq]) and optionally `attention_mask`.
    #[arg(long)]
    inputs: PathBuf,
    /// Where to write `logits` (f32, [batch, seq, vocab]).
    #[arg(long)]
    output: PathBuf,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt text (tokenised with the model's tokenizer.json).
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    prompt: Option<String>,
    /// The prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Always pick the most likely token (the default unless --temperature or --top-p is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_p"])]
    greedy: bool,
    /// Sampling temperature.
    #[arg(long)]
    temperature: Option<f32>,
    /// Nucleus sampling mass.
    #[arg(long)]
    top_p: Option<f32>,
    /// Seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object {"prompt_ids", "new_ids", "text"} instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Send --prompt as a user message through the model's chat template (tokenizer_config.json),
    /// or the seed tutorial's `Human: …` format where there is none, as `peft train` formats chats.
    #[arg(long, requires = "prompt")]
    chat: bool,
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// Hugging Face model folder.
    #[arg(long)]
    model: PathBuf,
    /// An adapter_config.json: show which modules it targets and the trainable-parameters line.
    #[arg(long)]
    config: Option<PathBuf>,
    /// A method with its default config (lora, ia3, bitfit): show what it trains.
    #[arg(long)]
    method: Option<String>,
}

#[derive(Args, Debug)]
struct MergeArgs {
    /// Hugging Face model folder of the base model.
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter folder.
    #[arg(long)]
    adapter: PathBuf,
    /// Output folder for the merged checkpoint (config.json, model.safetensors, tokenizer files).
    #[arg(long)]
    output: PathBuf,
    #[command(flatten)]
    save: SaveArgs,
    #[command(flatten)]
    device: DeviceArg,
}

/// How a merged checkpoint is written.
#[derive(Args, Debug, Clone)]
struct SaveArgs {
    /// The dtype of the merged weights: auto (the base checkpoint's, as transformers 5 + PEFT
    /// save), float32, bfloat16 or float16.
    #[arg(
        long,
        value_name = "auto|float32|bfloat16|float16",
        default_value = "auto"
    )]
    save_dtype: String,
    /// The largest weight file; a bigger model is written as shards plus
    /// model.safetensors.index.json (transformers' max_shard_size, same default).
    #[arg(long, value_name = "SIZE", default_value = "50GB")]
    max_shard_size: String,
}

impl SaveArgs {
    /// The save options these flags ask for.
    fn options(&self) -> anyhow::Result<peft_models::SaveOptions> {
        Ok(peft_models::SaveOptions {
            dtype: peft_models::save::parse_save_dtype(&self.save_dtype)?,
            max_shard_size: peft_tensors::parse_size(&self.max_shard_size)?,
        })
    }
}

/// `--model` may name a Hugging Face repo id (`owner/name[@revision]`) held in the local cache:
/// it is replaced by its snapshot folder before any command runs, so no command sees ids. Then
/// every model and adapter folder given is checked ([`paths`]): a wrong path gets one line
/// naming it and what is wrong before anything is loaded.
fn resolve_and_check_paths(command: &mut Command) -> anyhow::Result<()> {
    let model = |path: &mut PathBuf, needs_tokenizer: bool| -> anyhow::Result<()> {
        // A GGUF file first: a relative `dir/model.gguf` also reads as a Hub repo id.
        *path = paths::import_gguf_model(path)?;
        *path = peft_models::hub::resolve_model(&path.to_string_lossy())?;
        paths::check_model(path, needs_tokenizer)
    };
    let adapters = |values: &[String]| -> anyhow::Result<()> {
        commands::adapter_specs(values)
            .iter()
            .try_for_each(|(_, dir)| paths::check_adapter(dir))
    };
    match command {
        Command::Logits(a) => {
            model(&mut a.model.model, false)?;
            adapters(&a.model.adapter)
        }
        Command::Generate(a) => {
            model(&mut a.model.model, true)?;
            adapters(&a.model.adapter)
        }
        Command::Inspect(a) => model(&mut a.model, false),
        Command::Merge(a) => {
            model(&mut a.model, false)?;
            paths::check_adapter(&a.adapter)
        }
        Command::Train(a) => a.model.as_mut().map_or(Ok(()), |m| model(m, true)),
        Command::Quantize(a) => a.model.as_mut().map_or(Ok(()), |m| model(m, false)),
        Command::Combine(a) => {
            model(&mut a.model, false)?;
            adapters(&a.adapters)
        }
        Command::Serve(a) => {
            model(&mut a.model, true)?;
            adapters(&a.adapters)
        }
        Command::ExportGguf(a) => {
            // A model's GGUF carries its vocabulary; a LoRA adapter's does not.
            let writes_model = a.writes_model();
            model(a.model_mut(), writes_model)?;
            a.adapter().map_or(Ok(()), paths::check_adapter)
        }
    }
}

fn main() -> ExitCode {
    // SAFETY: first statement of `main`, before any thread is started.
    unsafe { peft_ops::process::prepare() };
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PEFT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    let mut command = cli.command;
    let result = resolve_and_check_paths(&mut command).and_then(|()| match command {
        Command::Logits(a) => commands::logits(a),
        Command::Generate(a) => commands::generate(a),
        Command::Inspect(a) => commands::inspect(a),
        Command::Merge(a) => commands::merge(a),
        Command::Train(a) => train::train(*a),
        Command::Quantize(a) => quantize::quantize(a),
        Command::Combine(a) => commands::combine(a),
        Command::Serve(a) => commands::serve(a),
        Command::ExportGguf(a) => export::export_gguf(a),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<train::Interrupted>() {
            Some(stop) => {
                eprintln!("{stop}");
                ExitCode::from(130)
            }
            None => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
