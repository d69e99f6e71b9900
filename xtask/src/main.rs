//! Project automation, run as `cargo xtask <task>`; `cargo xtask --help` and
//! `cargo xtask <task> --help` list every task and flag with its default.
//!
//! * `bench` — every case of `peft-bench` in its own process (`--list` names them), optionally
//!   alternating with the PyTorch + PEFT script (`bench/bench_pytorch.py`) on the same work; a
//!   markdown table on stdout and `target/bench/report.{json,md}`. `--scale`: the real-size
//!   bench (see `scale.rs`).
//! * `fixtures` — regenerate `tests/fixtures/` with the pinned reference stack.
//! * `gpu-check` — on a machine with a GPU: build with the backend's feature, run every parity
//!   test there, the benchmark cases, the CLI, and data-parallel training with `--devices`. One
//!   short script, meant to finish well under 10 minutes.
//! * `pretrain-tiny` — pretrain the bundled tiny BLOOM (docs/PRETRAINED.md).
//! * `soak` — the load and fault soak of `peft serve` (2 minutes, 64 clients by default).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

#[cfg(test)]
mod layering;
mod pretrain;
mod scale;

/// Project automation for peft-rs: benchmarks, reference fixtures, the GPU check and the bundled
/// model's pretraining.
#[derive(Parser, Debug)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand, Debug)]
enum Task {
    /// Run the benchmark cases (each in its own release-built process), optionally side by side
    /// with PyTorch + PEFT; a table on stdout and target/bench/report.{json,md}.
    Bench(BenchArgs),
    /// Regenerate tests/fixtures/ with the pinned reference stack (fixtures/requirements.txt).
    Fixtures(FixturesArgs),
    /// On a machine with a GPU: build with the backend's feature, run the parity tests, the
    /// benchmark cases, the CLI and data-parallel training there.
    GpuCheck(GpuCheckArgs),
    /// Pretrain the bundled tiny BLOOM on data/pretrain.txt (docs/PRETRAINED.md).
    PretrainTiny(pretrain::PretrainArgs),
    /// The load and fault soak of `peft serve` (release build, loopback only): clients mixing
    /// streamed and whole requests over four adapters, some hanging up mid-stream, some sending
    /// malformed bodies, an adapter loaded and unloaded meanwhile (docs/SERVING.md).
    Soak(SoakArgs),
}

/// `cargo xtask soak`'s flags.
#[derive(Args, Debug)]
struct SoakArgs {
    /// Seconds of load.
    #[arg(long, default_value_t = 120.0)]
    seconds: f64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,
}

/// `cargo xtask fixtures`' flags.
#[derive(Args, Debug)]
struct FixturesArgs {
    /// Python with the pinned reference stack [default: ../pyref/bin/python beside the
    /// workspace].
    #[arg(long, value_name = "PATH")]
    python: Option<PathBuf>,
}

/// A GPU backend (a Cargo feature of the same name).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Gpu {
    Wgpu,
    Cuda,
}

/// `cargo xtask gpu-check`'s flags.
#[derive(Args, Debug)]
struct GpuCheckArgs {
    /// The backend to build and run.
    #[arg(long, value_enum, default_value_t = Gpu::Wgpu)]
    device: Gpu,
    /// Train data-parallel on GPUs 0 and 1 (default: two ranks on the one GPU).
    #[arg(long)]
    two_gpus: bool,
}

/// Where our side of a benchmark runs.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BenchDevice {
    Cpu,
    Wgpu,
    Cuda,
}

impl BenchDevice {
    fn name(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Wgpu => "wgpu",
            Self::Cuda => "cuda",
        }
    }
}

/// `cargo xtask bench`'s flags.
#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// Print every case with a one-line description and whether it has a PyTorch side.
    #[arg(long)]
    list: bool,
    /// A smoke run of the harness (CI's): tiny batch, one round, dev profile, no figures to read.
    #[arg(long)]
    quick: bool,
    /// Also run the PyTorch + PEFT side of each case (bench/bench_pytorch.py), alternating.
    #[arg(long)]
    vs_pytorch: bool,
    /// Python with torch, transformers and peft [default: ../pyref/bin/python, else python3].
    #[arg(long, value_name = "PATH")]
    python: Option<PathBuf>,
    /// The device of our side.
    #[arg(long, value_enum, default_value_t = BenchDevice::Cpu)]
    device: BenchDevice,
    /// The cases to run, comma-separated [default: every case (--list); with --scale, every
    /// scale case].
    #[arg(long, value_delimiter = ',', value_name = "A,B")]
    cases: Vec<String>,
    /// Alternations of ours and PyTorch's per case, steps pooled [default: 2; 1 with --quick].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    rounds: Option<u32>,
    /// The real-size bench: 1.3-1.5 B-parameter checkpoints generated once into target/scale/.
    #[arg(long)]
    scale: bool,
    /// With --scale: the model shapes, comma-separated [default: every shape].
    #[arg(long, value_delimiter = ',', value_name = "A,B", requires = "scale")]
    models: Vec<String>,
    /// With --scale: the cases whose PyTorch side runs [default: every case].
    #[arg(long, value_delimiter = ',', value_name = "A,B", requires = "scale")]
    pytorch_cases: Vec<String>,
    /// With --scale: training steps per case.
    #[arg(long, value_name = "N", default_value_t = 3, requires = "scale")]
    steps: usize,
}

impl BenchArgs {
    /// Every case on `device`, nothing else asked (gpu-check's run).
    fn on(device: BenchDevice) -> Self {
        Self {
            list: false,
            quick: false,
            vs_pytorch: false,
            python: None,
            device,
            cases: Vec::new(),
            rounds: None,
            scale: false,
            models: Vec::new(),
            pytorch_cases: Vec::new(),
            steps: 3,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf();
    let outcome = match &cli.task {
        Task::Fixtures(args) => fixtures(&root, args),
        Task::GpuCheck(args) => gpu_check(&root, args),
        Task::Bench(args) => bench(&root, args),
        Task::PretrainTiny(args) => pretrain::pretrain_tiny(&root, args),
        Task::Soak(args) => soak(&root, args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, the causes joined; never a backtrace.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo xtask soak`: builds peft-bench (release) and runs its `serve-soak` case once.
fn soak(root: &Path, args: &SoakArgs) -> Result<()> {
    if !(args.seconds.is_finite() && args.seconds > 0.0) || args.clients == 0 {
        bail!("--seconds must be positive and --clients at least 1");
    }
    let mut build = Command::new("cargo");
    build.args(["build", "--quiet", "--release", "--bin", "peft-bench"]);
    run(build.current_dir(root))?;
    let bin = target_dir(root).join("release").join("peft-bench");
    let report = run_json(Command::new(bin).args([
        "serve-soak",
        "--seconds",
        &args.seconds.to_string(),
        "--clients",
        &args.clients.to_string(),
    ]))?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// A usage error in clap's shape (`error: …`, exit status 2), for values clap cannot check
/// itself (case names).
fn usage_error(message: String) -> ! {
    Cli::command()
        .error(clap::error::ErrorKind::InvalidValue, message)
        .exit()
}

/// The names in `known` within a small edit distance of `name` (or sharing a prefix with it).
fn close_matches<'a>(name: &str, known: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    known
        .into_iter()
        .filter(|k| {
            strsim::levenshtein(name, k) <= 3
                || (name.len() >= 4 && (k.starts_with(name) || name.starts_with(k)))
        })
        .collect()
}

/// The refusal of the first name in `cases` that is not in `known`, naming the close matches
/// (or `list_hint` when none is close); `None` when every name is known.
fn unknown_case<'a>(
    cases: &[String],
    known: impl IntoIterator<Item = &'a str> + Clone,
    list_hint: &str,
) -> Option<String> {
    let case = cases
        .iter()
        .find(|case| !known.clone().into_iter().any(|k| k == case.as_str()))?;
    let close = close_matches(case, known);
    let hint = if close.is_empty() {
        format!("; {list_hint}")
    } else {
        format!("; did you mean {}?", close.join(", "))
    };
    Some(format!("unknown case `{case}`{hint}"))
}

/// Refuses (exit status 2, before anything is built) a case name not in `known`.
pub(crate) fn check_cases<'a>(
    cases: &[String],
    known: impl IntoIterator<Item = &'a str> + Clone,
    list_hint: &str,
) {
    if let Some(message) = unknown_case(cases, known, list_hint) {
        usage_error(message);
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn fixtures(root: &Path, args: &FixturesArgs) -> Result<()> {
    let python = args
        .python
        .clone()
        .unwrap_or_else(|| root.join("../pyref/bin/python"));
    // In order: the base fixtures (and versions.json), the 4-bit / bf16 ones (which add
    // bitsandbytes to versions.json), the newer architectures (which reuse the tokenizer).
    for script in [
        "make_fixtures.py",
        "make_quant_fixtures.py",
        "make_arch_fixtures.py",
        "make_trainer_fixtures.py",
        "make_generation_fixtures.py",
        "make_lora_variant_fixtures.py",
        "make_multi_adapter_fixtures.py",
        "make_dora_fixtures.py",
        "make_lora_init_fixtures.py",
        "make_trainable_tokens_fixtures.py",
        "make_lycoris_fixtures.py",
        "make_vera_fixtures.py",
        "make_adalora_fixtures.py",
        // Last: it reads the models and adapters the scripts above write.
        "make_gguf_fixtures.py",
    ] {
        run(Command::new(&python)
            .arg(root.join("fixtures").join(script))
            .env("PYTHONHASHSEED", "0")
            .current_dir(root.join("fixtures")))?;
    }
    Ok(())
}

fn gpu_check(root: &Path, args: &GpuCheckArgs) -> Result<()> {
    let (device, bench_device) = match args.device {
        Gpu::Wgpu => ("wgpu".to_string(), BenchDevice::Wgpu),
        Gpu::Cuda => ("cuda".to_string(), BenchDevice::Cuda),
    };
    let features = format!("peft-tests/{device},peft-cli/{device}");
    let started = Instant::now();
    run(Command::new("cargo")
        .args([
            "build",
            "--release",
            "-p",
            "peft-cli",
            "-p",
            "peft-tests",
            "--tests",
        ])
        .args(["--features", &features])
        .current_dir(root))?;
    eprintln!("build: {:.1} s", started.elapsed().as_secs_f64());
    let started = Instant::now();
    run(Command::new("cargo")
        .args([
            "test",
            "--release",
            "-p",
            "peft-tests",
            "--features",
            &features,
        ])
        .env("PEFT_DEVICE", &device)
        .current_dir(root))?;
    eprintln!(
        "parity tests on {device}: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // The benchmark cases on the GPU (release build with the backend's feature).
    bench(root, &BenchArgs::on(bench_device))?;
    let reference = root.join("tests/fixtures/reference/bloom-tiny.safetensors");
    let out = std::env::temp_dir().join("peft-gpu-check-logits.safetensors");
    for _ in 0..3 {
        let started = Instant::now();
        run(Command::new(target_dir(root).join("release/peft"))
            .arg("logits")
            .arg("--model")
            .arg(root.join("tests/fixtures/models/bloom-tiny"))
            .arg("--inputs")
            .arg(&reference)
            .arg("--output")
            .arg(&out)
            .args(["--device", &device]))?;
        eprintln!(
            "peft logits (process incl. start-up) on {device}: {:.3} s",
            started.elapsed().as_secs_f64()
        );
    }
    data_parallel_check(root, &device, args.two_gpus)
}

/// `peft train --devices` on the GPU backend: two ranks (on GPUs 0 and 1 with `--two-gpus`,
/// otherwise both on the one GPU) against one device with twice the accumulation; the two
/// adapters must agree (≤ 1e-5 relative: GPU reductions may sum in another order).
fn data_parallel_check(root: &Path, device: &str, two_gpus: bool) -> Result<()> {
    let devices = if two_gpus {
        format!("{device}:0,{device}:1")
    } else {
        format!("{device},{device}")
    };
    let out = std::env::temp_dir().join("peft-gpu-check-ddp");
    let _ = std::fs::remove_dir_all(&out);
    let mut adapters = Vec::new();
    for (name, extra) in [
        ("one", vec!["--device", device, "--grad-accum", "2"]),
        ("ranks", vec!["--devices", devices.as_str()]),
    ] {
        let dir = out.join(name);
        let started = Instant::now();
        run(Command::new(target_dir(root).join("release/peft"))
            .arg("train")
            .arg("--model")
            .arg(root.join("tests/fixtures/models/bloom-tiny"))
            .arg("--data")
            .arg(root.join("data/demo.jsonl"))
            .arg("--output")
            .arg(&dir)
            .args([
                "--max-steps",
                "4",
                "--batch-size",
                "2",
                "--no-exact-match",
                "--no-merged",
            ])
            .args(&extra))?;
        eprintln!(
            "peft train {name} ({}): {:.2} s",
            extra.join(" "),
            started.elapsed().as_secs_f64()
        );
        let store = peft_core::TensorStore::open(dir.join("adapter/adapter_model.safetensors"))?;
        let tensors: Vec<(String, Vec<f32>)> = store
            .keys()
            .map(|k| Ok((k.to_string(), store.f32(k)?.0)))
            .collect::<Result<_>>()?;
        adapters.push(tensors);
    }
    let worst = adapters[0]
        .iter()
        .zip(&adapters[1])
        .flat_map(|((_, a), (_, b))| a.iter().zip(b))
        .map(|(a, b)| (a - b).abs() / a.abs().max(b.abs()).max(1e-3))
        .fold(0f32, f32::max);
    eprintln!("--devices {devices} vs one device with accumulation: max relative Δ {worst:e}");
    if worst > 1e-5 {
        bail!("data-parallel adapter differs from the single-device one by {worst:e}");
    }
    Ok(())
}

/// The benchmark cases, in report order, each with what it measures. Every case but
/// `serve-load` and `serve-soak` has a PyTorch + PEFT side (`bench/bench_pytorch.py`).
const BENCH_CASES: [(&str, &str); 44] = [
    (
        "gemm",
        "a 1024² f32 product through the linear layers' path (the machine's GEMM peak)",
    ),
    (
        "forward",
        "forward pass of the ~16M-parameter BLOOM, batch 4 × 128",
    ),
    (
        "lora-forward-unmerged",
        "forward with a LoRA r=8 adapter beside the weights",
    ),
    (
        "lora-forward-mixed",
        "forward with four LoRA adapters, one per batch row",
    ),
    (
        "lora-forward-merged",
        "forward after merging the LoRA adapter",
    ),
    ("lora-merge", "merging a LoRA adapter into the base weights"),
    ("lora-train", "LoRA r=8 training step (AdamW) on the BLOOM"),
    (
        "dora-train",
        "DoRA (LoRA r=8, use_dora) training step (AdamW) on the BLOOM",
    ),
    (
        "tokens-train",
        "trainable tokens (16 rows of the tied embedding) training step on the BLOOM",
    ),
    (
        "loha-train",
        "LoHa (PEFT's defaults: r = alpha = 8 on query_key_value) training step on the BLOOM",
    ),
    (
        "lokr-train",
        "LoKr (PEFT's defaults: r = alpha = 8 on query_key_value) training step on the BLOOM",
    ),
    (
        "vera-train",
        "VeRA (PEFT's defaults: r = 256 on query_key_value) training step on the BLOOM",
    ),
    (
        "adalora-train",
        "AdaLoRA (PEFT's defaults: init_r 12 → target_r 8 on query_key_value) training step, \
         penalty and rank allocator included, on the BLOOM",
    ),
    (
        "burn-lora-train",
        "burn's own Module::apply_lora on the same model and targets",
    ),
    (
        "llama-lora-train",
        "LoRA step on a Llama of similar size (8 heads / 2 KV heads)",
    ),
    ("llama-ia3-train", "IA3 step on the Llama"),
    ("llama-prompt-train", "prompt-tuning step on the Llama"),
    (
        "llama-ptuning-train",
        "P-tuning (MLP encoder) step on the Llama",
    ),
    (
        "llama-ptuning-lstm-train",
        "P-tuning (LSTM encoder) step on the Llama",
    ),
    ("llama-prefix-train", "prefix-tuning step on the Llama"),
    (
        "llama-prefix-proj-train",
        "prefix tuning with the projection MLP on the Llama",
    ),
    (
        "llama-qlora-train",
        "QLoRA step (NF4 + double quant base) on the Llama",
    ),
    (
        "mistral-lora-train",
        "LoRA step on a Mistral of the Llama's size (sliding window)",
    ),
    (
        "qwen3-lora-train",
        "LoRA step on a Qwen3 of the Llama's size",
    ),
    (
        "gemma2-lora-train",
        "LoRA step on a Gemma 2 of the Llama's size",
    ),
    (
        "phi3-lora-train",
        "LoRA step on a Phi-3 of the Llama's size (fused projections)",
    ),
    ("ia3-train", "IA3 step on the BLOOM"),
    ("bitfit-train", "BitFit (biases only) step on the BLOOM"),
    ("prompt-train", "prompt-tuning step on the BLOOM"),
    ("ptuning-train", "P-tuning (MLP encoder) step on the BLOOM"),
    (
        "ptuning-lstm-train",
        "P-tuning (LSTM encoder) step on the BLOOM",
    ),
    ("prefix-train", "prefix-tuning step on the BLOOM"),
    (
        "prefix-proj-train",
        "prefix tuning with the projection MLP on the BLOOM",
    ),
    (
        "qlora-train",
        "QLoRA step: LoRA r=8 over the NF4 + double-quant BLOOM",
    ),
    ("lora-train-gc", "LoRA step with gradient checkpointing"),
    ("qlora-train-gc", "QLoRA step with gradient checkpointing"),
    (
        "lora-train-bf16",
        "LoRA step with bf16 compute (torch.autocast's layout)",
    ),
    (
        "qlora-train-bf16",
        "QLoRA step with bf16 compute (bnb_4bit_compute_dtype=bfloat16)",
    ),
    (
        "quantize-nf4",
        "NF4 + double quant of a 4096 × 4096 f32 matrix",
    ),
    (
        "serve-generate-1",
        "greedy generation, 16 requests over 1 LoRA adapter",
    ),
    (
        "serve-generate-4",
        "16 requests over 4 LoRA adapters, decoded in mixed batches",
    ),
    (
        "serve-generate-16",
        "16 requests over 16 LoRA adapters, decoded in mixed batches",
    ),
    (
        "serve-load",
        "peft serve under concurrent HTTP clients (latency, throughput, 429s)",
    ),
    (
        "serve-soak",
        "peft serve under load and faults (hang-ups, bad bodies, adapter churn)",
    ),
];

/// Whether `case` has a PyTorch + PEFT side (PEFT has no server: the `serve-load` and
/// `serve-soak` cases have none).
fn has_pytorch_side(case: &str) -> bool {
    !matches!(case, "serve-load" | "serve-soak")
}

/// `cargo xtask bench --list`: every case, its PyTorch side and what it measures.
fn list_cases() {
    let width = BENCH_CASES.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    println!("{:width$}  PyTorch  what it measures", "case");
    for (name, what) in BENCH_CASES {
        let side = if has_pytorch_side(name) { "yes" } else { "no" };
        println!("{name:width$}  {side:7}  {what}");
    }
    println!("\nwith --scale: {}", scale::CASES.join(", "));
}

fn run_json(cmd: &mut Command) -> Result<serde_json::Value> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().context("no output")?;
    serde_json::from_str(line).with_context(|| format!("parsing {line}"))
}

/// Merges repeated runs of one case: all times pooled, the peak memory the largest.
fn pool(runs: &[serde_json::Value]) -> Option<serde_json::Value> {
    let first = runs.first()?.clone();
    let mut times: Vec<f64> = runs
        .iter()
        .flat_map(|r| r["times_s"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t.as_f64())
        .collect();
    times.sort_by(f64::total_cmp);
    let median = *times.get(times.len() / 2)?;
    let mut out = first;
    let obj = out.as_object_mut()?;
    obj.insert("times_s".into(), times.clone().into());
    obj.insert("median_s".into(), median.into());
    obj.insert("min_s".into(), times[0].into());
    obj.insert("max_s".into(), times[times.len() - 1].into());
    let peak = runs
        .iter()
        .filter_map(|r| r["peak_rss_bytes"].as_u64())
        .max();
    obj.insert("peak_rss_bytes".into(), peak.into());
    let step_peak = runs
        .iter()
        .filter_map(|r| r["step_peak_rss_bytes"].as_u64())
        .max();
    if step_peak.is_some() {
        obj.insert("step_peak_rss_bytes".into(), step_peak.into());
    }
    if let (Some(gflop), true) = (obj.get("gflop").and_then(|g| g.as_f64()), median > 0.0) {
        obj.insert("gflop_per_s".into(), (gflop / median).into());
    }
    if obj.contains_key("tokens_per_s") {
        let tokens = obj["batch"].as_f64().unwrap_or(0.0) * obj["seq"].as_f64().unwrap_or(0.0);
        obj.insert("tokens_per_s".into(), (tokens / median).into());
    }
    Some(out)
}

/// With `--vs-pytorch`: the Python that has PyTorch + PEFT (a note when there is none).
pub(crate) fn pytorch_if_asked(root: &Path, args: &BenchArgs) -> Option<PathBuf> {
    if !args.vs_pytorch {
        return None;
    }
    let found = python_with_peft(root, args);
    if found.is_none() {
        eprintln!("PyTorch + PEFT not found (--python PATH): comparison skipped");
    }
    found
}

fn python_with_peft(root: &Path, args: &BenchArgs) -> Option<PathBuf> {
    let candidates = match &args.python {
        Some(p) => vec![p.clone()],
        None => vec![root.join("../pyref/bin/python"), PathBuf::from("python3")],
    };
    candidates.into_iter().find(|p| {
        Command::new(p)
            .args(["-c", "import torch, transformers, peft"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

pub(crate) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn bench(root: &Path, args: &BenchArgs) -> Result<()> {
    if args.list {
        list_cases();
        return Ok(());
    }
    if args.scale {
        return scale::bench_scale(root, args);
    }
    let quick = args.quick;
    let device = args.device.name();
    let names = || BENCH_CASES.iter().map(|(name, _)| *name);
    check_cases(
        &args.cases,
        names(),
        "cargo xtask bench --list prints every case",
    );
    let cases: Vec<String> = if args.cases.is_empty() {
        // wgpu has no bf16 (docs/PRECISION.md): its bf16 cases would only report the refusal.
        names()
            .filter(|c| device != "wgpu" || !c.ends_with("-bf16"))
            .map(str::to_string)
            .collect()
    } else {
        args.cases.clone()
    };
    // `--quick` is a smoke run of the harness, not a measurement: it builds with the dev profile,
    // whose dependencies are already optimised and built by the test run, instead of a second,
    // release build of every dependency (CI's longest step after the tests).
    let profile = if quick { "debug" } else { "release" };
    let mut build = Command::new("cargo");
    // `--bin`, not `-p peft-bench`: features resolved over the whole workspace, as the test
    // build resolves them, so its dependencies are reused (docs/CI.md).
    build.args(["build", "--quiet", "--bin", "peft-bench"]);
    if !quick {
        build.arg("--release");
    }
    if device != "cpu" {
        build.args(["--features", &format!("peft-bench/{device}")]);
    }
    run(build.current_dir(root))?;
    let ours_bin = target_dir(root).join(profile).join("peft-bench");
    let python = pytorch_if_asked(root, args);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // `--rounds N`: more alternations for a steadier ratio on a noisy machine.
    let rounds = args
        .rounds
        .map_or(if quick { 1 } else { 2 }, |n| n as usize);
    let mut rows = Vec::new();
    for case in &cases {
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        // A B A B: alternate so that a noisy neighbour hurts both sides alike.
        for _ in 0..rounds {
            let mut cmd = Command::new(&ours_bin);
            cmd.args([case.as_str(), "--device", device]);
            if quick {
                cmd.arg("--quick");
            }
            ours.push(run_json(&mut cmd)?);
            // PEFT has no server: the load test has no PyTorch side.
            if let Some(py) = &python
                && device == "cpu"
                && has_pytorch_side(case)
            {
                let mut cmd = Command::new(py);
                cmd.arg(root.join("bench/bench_pytorch.py")).args([
                    case.as_str(),
                    "--threads",
                    &threads.to_string(),
                ]);
                if quick {
                    cmd.arg("--quick");
                }
                theirs.push(run_json(&mut cmd)?);
            }
        }
        eprintln!("{case}: done");
        rows.push(serde_json::json!({"case": case, "ours": pool(&ours), "pytorch": pool(&theirs)}));
    }
    let ratio = |row: &serde_json::Value, field: &str| -> Option<f64> {
        let a = row["ours"][field].as_f64()?;
        let b = row["pytorch"][field].as_f64()?;
        (b > 0.0).then_some(a / b)
    };
    // The machine's measured f32 GEMM rate: the best `gemm` product (ours), each case's GFLOP/s
    // as a share of it.
    let gemm_peak = rows.iter().find(|r| r["case"] == "gemm").and_then(|g| {
        let (gflop, min) = (g["ours"]["gflop"].as_f64()?, g["ours"]["min_s"].as_f64()?);
        (min > 0.0).then_some(gflop / min)
    });
    let mut md = String::new();
    md.push_str(&format!(
        "machine: {} ({threads} threads), device: {device}{}\n",
        cpu_model(),
        if quick { ", quick mode" } else { "" }
    ));
    if let Some(peak) = gemm_peak {
        md.push_str(&format!(
            "GEMM peak (best 1024² f32 product through the linear layers' path): {peak:.1} GFLOP/s\n"
        ));
    }
    md.push('\n');
    md.push_str("| case | ours median (min–max) s | PyTorch+PEFT median s | time ours/theirs | ours peak RSS MiB | theirs MiB | RSS ours/theirs | ours tokens/s | ours GFLOP/s | of GEMM peak |\n");
    md.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    let fmt =
        |v: Option<f64>, digits: usize| v.map_or("–".to_string(), |x| format!("{x:.digits$}"));
    let mut json_rows = Vec::new();
    for row in &rows {
        let o = &row["ours"];
        let t = &row["pytorch"];
        let mib = |v: &serde_json::Value| v["peak_rss_bytes"].as_f64().map(|b| b / 1048576.0);
        let share = o["gflop_per_s"]
            .as_f64()
            .zip(gemm_peak)
            .map(|(rate, peak)| format!("{:.0} %", 100.0 * rate / peak));
        md.push_str(&format!(
            "| {} | {} ({}–{}) | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            row["case"].as_str().unwrap_or(""),
            fmt(o["median_s"].as_f64(), 4),
            fmt(o["min_s"].as_f64(), 4),
            fmt(o["max_s"].as_f64(), 4),
            fmt(t["median_s"].as_f64(), 4),
            fmt(ratio(row, "median_s"), 2),
            fmt(mib(o), 0),
            fmt(mib(t), 0),
            fmt(ratio(row, "peak_rss_bytes"), 2),
            fmt(o["tokens_per_s"].as_f64(), 0),
            fmt(o["gflop_per_s"].as_f64(), 1),
            share.unwrap_or_else(|| "–".into()),
        ));
        let mut r = row.clone();
        if let Some(obj) = r.as_object_mut() {
            if let (Some(rate), Some(peak)) = (o["gflop_per_s"].as_f64(), gemm_peak) {
                obj.insert("share_of_gemm_peak".into(), (rate / peak).into());
            }
            obj.insert("time_ratio".into(), ratio(row, "median_s").into());
            obj.insert("rss_ratio".into(), ratio(row, "peak_rss_bytes").into());
        }
        json_rows.push(r);
    }
    // 4-bit figures: quantisation throughput, resident bits, training-step memory vs f32 LoRA.
    let find = |case: &str| rows.iter().find(|r| r["case"] == case);
    if let Some(q) = find("quantize-nf4") {
        md.push_str(&format!(
            "\nNF4 + double quant of a {} MB f32 matrix: ours {} GB/s ({} bits/param), bitsandbytes {} GB/s, ours/theirs {}\n",
            fmt(q["ours"]["input_bytes"].as_f64().map(|b| b / 1e6), 0),
            fmt(q["ours"]["gb_per_s"].as_f64(), 2),
            fmt(q["ours"]["bits_per_param"].as_f64(), 3),
            fmt(q["pytorch"]["gb_per_s"].as_f64(), 2),
            fmt(
                q["ours"]["gb_per_s"]
                    .as_f64()
                    .zip(q["pytorch"]["gb_per_s"].as_f64())
                    .map(|(a, b)| a / b),
                2
            ),
        ));
    }
    if let (Some(q), Some(l)) = (find("qlora-train"), find("lora-train")) {
        let step = |r: &serde_json::Value, side: &str| r[side]["step_peak_rss_bytes"].as_f64();
        md.push_str(&format!(
            "QLoRA: {} resident bits per quantised parameter; training-step peak RSS QLoRA/LoRA ours {}, PyTorch {}\n",
            fmt(q["ours"]["resident_bits_per_quantized_param"].as_f64(), 3),
            fmt(step(q, "ours").zip(step(l, "ours")).map(|(a, b)| a / b), 2),
            fmt(step(q, "pytorch").zip(step(l, "pytorch")).map(|(a, b)| a / b), 2),
        ));
    }
    if let (Some(b), Some(l)) = (find("burn-lora-train"), find("lora-train")) {
        let of = |r: &serde_json::Value, key: &str| r["ours"][key].as_f64();
        md.push_str(&format!(
            "LoRA step, peft-rs / burn's Module::apply_lora on the same model and targets: time {}, step peak RSS {}\n",
            fmt(of(l, "median_s").zip(of(b, "median_s")).map(|(a, b)| a / b), 2),
            fmt(
                of(l, "step_peak_rss_bytes")
                    .zip(of(b, "step_peak_rss_bytes"))
                    .map(|(a, b)| a / b),
                2
            ),
        ));
    }
    serving_summary(&mut md, &rows);
    if python.is_none() {
        md.push_str("\nPyTorch comparison skipped (run with --vs-pytorch and a Python that has torch, transformers and peft).\n");
    }
    println!("{md}");
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let report = serde_json::json!({
        "machine": cpu_model(),
        "threads": threads,
        "device": device,
        "quick": quick,
        "gemm_peak_gflop_per_s": gemm_peak,
        "cases": json_rows,
    });
    std::fs::write(
        out_dir.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(out_dir.join("report.md"), md)?;
    eprintln!("wrote {}", out_dir.join("report.md").display());
    Ok(())
}

/// The serving figures: mixed-adapter generation against one adapter and against transformers
/// + PEFT, and the load test's latency, throughput and rejections.
fn serving_summary(md: &mut String, rows: &[serde_json::Value]) {
    let find = |case: &str| rows.iter().find(|r| r["case"] == case);
    let fmt = |v: Option<f64>| v.map_or("–".to_string(), |x| format!("{x:.2}"));
    if let Some(one) = find("serve-generate-1") {
        let time = |r: &serde_json::Value, side: &str| r[side]["median_s"].as_f64();
        for n in [4, 16] {
            let Some(mixed) = find(&format!("serve-generate-{n}")) else {
                continue;
            };
            let ours_ratio = time(mixed, "ours")
                .zip(time(one, "ours"))
                .map(|(a, b)| a / b);
            let theirs_ratio = time(mixed, "pytorch")
                .zip(time(one, "pytorch"))
                .map(|(a, b)| a / b);
            // ours/theirs tokens per second: the inverse of the time ratio (same work).
            let speed = time(mixed, "pytorch")
                .zip(time(mixed, "ours"))
                .map(|(t, o)| t / o);
            md.push_str(&format!(
                "\nGeneration, 16 requests over {n} adapters / over 1 adapter: time ours {}, \
                 transformers + PEFT {}; tokens/s ours/theirs {}",
                fmt(ours_ratio),
                fmt(theirs_ratio),
                fmt(speed),
            ));
        }
        md.push('\n');
    }
    if let Some(load) = find("serve-load") {
        let o = &load["ours"];
        md.push_str(&format!(
            "peft serve load test: {} clients, {} requests over {} adapters, all {} answers equal \
             to the request alone; latency p50 {} s, p99 {} s; {} requests/s, {} tokens/s; {} \
             answered 429 (retried)\n",
            o["clients"],
            o["requests"],
            o["adapters"],
            o["answers_equal_alone"],
            fmt(o["latency_p50_s"].as_f64()),
            fmt(o["latency_p99_s"].as_f64()),
            fmt(o["requests_per_s"].as_f64()),
            fmt(o["generated_tokens_per_s"].as_f64()),
            o["rejected_429"],
        ));
    }
    if let Some(soak) = find("serve-soak") {
        let o = &soak["ours"];
        md.push_str(&format!(
            "peft serve soak: {} clients for {} s: {} answers equal to the request alone ({} \
             streamed), {} hang-ups mid-stream, {} malformed bodies answered 4xx, {} adapter \
             load/unload cycles, {} responses read = {} in /metrics; the server's resident memory \
             {:+.1} %, its live heap {:+.1} %\n",
            o["clients"],
            fmt(o["min_s"].as_f64()),
            o["completed_equal_alone"],
            o["of_them_streamed"],
            o["hung_up_mid_stream"],
            o["malformed_answered_4xx"],
            o["adapter_load_unload_cycles"],
            o["responses_read"],
            o["responses_in_metrics"],
            o["rss_growth"].as_f64().unwrap_or(f64::NAN) * 100.0,
            o["heap_growth"].as_f64().unwrap_or(f64::NAN) * 100.0,
        ));
    }
}

/// Cargo's target folder: `$CARGO_TARGET_DIR` when set, else `target/` in the workspace.
pub(crate) fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("cargo xtask").chain(args.iter().copied()))
    }

    fn bench_args(args: &[&str]) -> BenchArgs {
        match parse(args).unwrap().task {
            Task::Bench(b) => b,
            other => panic!("not bench: {other:?}"),
        }
    }

    /// Help at every level; a missing task is a usage error, not a run.
    #[test]
    fn help_is_printed_at_every_level() {
        for args in [
            &["--help"][..],
            &["bench", "--help"],
            &["fixtures", "--help"],
            &["gpu-check", "--help"],
            &["pretrain-tiny", "--help"],
        ] {
            assert_eq!(
                parse(args).unwrap_err().kind(),
                ErrorKind::DisplayHelp,
                "{args:?}"
            );
        }
        let help = Cli::command().render_long_help().to_string();
        for task in ["bench", "fixtures", "gpu-check", "pretrain-tiny"] {
            assert!(help.contains(task), "{help}");
        }
        let missing = parse(&[]).unwrap_err().kind();
        assert_eq!(missing, ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand);
    }

    /// Misspelt flags and bad values are refused (clap's errors exit with status 2), with the
    /// close flag suggested.
    #[test]
    fn unknown_flags_and_bad_values_are_refused() {
        let err = parse(&["bench", "--case", "gemm"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnknownArgument);
        assert!(err.to_string().contains("--cases"), "{err}");
        assert_eq!(err.exit_code(), 2);
        let err = parse(&["bench", "--vs-pytoch"]).unwrap_err();
        assert!(err.to_string().contains("--vs-pytorch"), "{err}");
        assert_eq!(
            parse(&["bench", "--device", "tpu"]).unwrap_err().kind(),
            ErrorKind::InvalidValue
        );
        assert_eq!(
            parse(&["bench", "--rounds", "0"]).unwrap_err().kind(),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            parse(&["bench", "--steps", "5"]).unwrap_err().kind(),
            ErrorKind::MissingRequiredArgument,
            "--steps belongs to --scale"
        );
        assert_eq!(
            parse(&["gpu-check", "--device", "cpu"]).unwrap_err().kind(),
            ErrorKind::InvalidValue
        );
        assert_eq!(
            parse(&["bnech"]).unwrap_err().kind(),
            ErrorKind::InvalidSubcommand
        );
    }

    /// The invocations the docs and CI used before the parser keep their meaning.
    #[test]
    fn earlier_invocations_keep_their_meaning() {
        let quick = bench_args(&["bench", "--quick"]);
        assert!(quick.quick && !quick.vs_pytorch && quick.cases.is_empty());
        assert_eq!(quick.device, BenchDevice::Cpu);
        let b = bench_args(&[
            "bench",
            "--vs-pytorch",
            "--python",
            "/work/pyref/bin/python",
            "--cases",
            "lora-train-bf16,qlora-train-bf16",
            "--rounds",
            "3",
        ]);
        assert!(b.vs_pytorch);
        assert_eq!(b.python, Some(PathBuf::from("/work/pyref/bin/python")));
        assert_eq!(b.cases, ["lora-train-bf16", "qlora-train-bf16"]);
        assert_eq!(b.rounds, Some(3));
        let s = bench_args(&[
            "bench",
            "--scale",
            "--vs-pytorch",
            "--models",
            "bloom-1b4",
            "--pytorch-cases",
            "scale-lora",
            "--steps",
            "5",
        ]);
        assert!(s.scale);
        assert_eq!(
            (s.models.as_slice(), s.steps),
            (&["bloom-1b4".to_string()][..], 5)
        );
        assert_eq!(s.pytorch_cases, ["scale-lora"]);
        match parse(&["gpu-check", "--device", "cuda", "--two-gpus"])
            .unwrap()
            .task
        {
            Task::GpuCheck(g) => assert!(g.device == Gpu::Cuda && g.two_gpus),
            other => panic!("{other:?}"),
        }
        match parse(&["pretrain-tiny", "--steps", "600"]).unwrap().task {
            Task::PretrainTiny(_) => {}
            other => panic!("{other:?}"),
        }
        match parse(&["fixtures", "--python", "../pyref/bin/python"])
            .unwrap()
            .task
        {
            Task::Fixtures(f) => assert_eq!(f.python, Some(PathBuf::from("../pyref/bin/python"))),
            other => panic!("{other:?}"),
        }
    }

    /// An unknown case name is refused naming the close matches, or the listing when none is.
    #[test]
    fn unknown_cases_name_the_close_matches() {
        let names = || BENCH_CASES.iter().map(|(n, _)| *n);
        let cases = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            unknown_case(&cases(&["gemm", "lora-train"]), names(), "list"),
            None
        );
        let err = unknown_case(&cases(&["gemm", "lora-trian"]), names(), "list").unwrap();
        assert_eq!(
            err,
            "unknown case `lora-trian`; did you mean lora-train, dora-train, loha-train, qlora-train?"
        );
        let err = unknown_case(&cases(&["zzz"]), names(), "see --list").unwrap();
        assert_eq!(err, "unknown case `zzz`; see --list");
        let err = unknown_case(&cases(&["scale-lorra"]), scale::CASES, "x").unwrap();
        assert!(err.contains("did you mean scale-lora"), "{err}");
        // Every listed case has a description; only the server's cases lack a PyTorch side.
        assert!(BENCH_CASES.iter().all(|(_, what)| !what.is_empty()));
        let without: Vec<_> = names().filter(|n| !has_pytorch_side(n)).collect();
        assert_eq!(without, ["serve-load", "serve-soak"]);
    }
}
