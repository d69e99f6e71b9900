//! Project automation, run as `cargo xtask <task>`.
//!
//! * `fixtures [--python PATH]` — regenerate `tests/fixtures/` with the pinned reference stack
//!   (see `fixtures/requirements.txt`); needs a Python environment with it installed.
//! * `gpu-check [--device wgpu|cuda]` — on a machine with a GPU: build with the backend's
//!   feature, run the model parity tests on the GPU, and time a forward pass. One short script,
//!   meant to finish well under 10 minutes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask lives inside the workspace")?
        .to_path_buf();
    match args.first().map(String::as_str) {
        Some("fixtures") => fixtures(&root, &args[1..]),
        Some("gpu-check") => gpu_check(&root, &args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask <fixtures [--python PATH] | gpu-check [--device wgpu|cuda]>"
            );
            bail!("unknown or missing task")
        }
    }
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn fixtures(root: &Path, args: &[String]) -> Result<()> {
    let python = flag(args, "--python")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../pyref/bin/python"));
    run(Command::new(python)
        .arg(root.join("fixtures/make_fixtures.py"))
        .env("PYTHONHASHSEED", "0")
        .current_dir(root))
}

fn gpu_check(root: &Path, args: &[String]) -> Result<()> {
    let device = flag(args, "--device").unwrap_or_else(|| "wgpu".into());
    if device != "wgpu" && device != "cuda" {
        bail!("--device must be wgpu or cuda");
    }
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
    let reference = root.join("tests/fixtures/reference/bloom-tiny.safetensors");
    let out = std::env::temp_dir().join("peft-gpu-check-logits.safetensors");
    for _ in 0..3 {
        let started = Instant::now();
        run(Command::new(root.join("target/release/peft"))
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
    Ok(())
}
