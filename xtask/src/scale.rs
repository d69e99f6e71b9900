//! `cargo xtask bench --scale [--vs-pytorch] [--python PATH] [--models a,b] [--cases a,b]
//! [--steps N] [--pytorch-cases a,b]`: the real-size bench. Generates the checkpoints once into `target/scale/`
//! (`peft-bench make-scale-model`: random bf16 weights, sharded), then runs every scale case of
//! peft-bench — and, with `--vs-pytorch`, `bench/bench_scale_pytorch.py` on the same folder —
//! each in its own process, and prints one table row per phase: seconds and peak RSS, ours /
//! theirs. Also written to `target/bench/scale.{json,md}`.

use std::path::Path;
use std::process::Command;

use anyhow::Result;

use crate::{BenchArgs, check_cases, pytorch_if_asked, run, run_json};

/// The real-size model shapes (`--models`).
pub(crate) const SHAPES: [&str; 2] = ["bloom-1b4", "qwen2.5-1.5b"];
/// The real-size cases (`--cases` with `--scale`).
pub(crate) const CASES: [&str; 3] = ["scale-lora", "scale-qlora", "scale-generate"];

pub fn bench_scale(root: &Path, args: &BenchArgs) -> Result<()> {
    let hint = format!("with --scale the cases are {}", CASES.join(", "));
    check_cases(&args.cases, CASES, &hint);
    check_cases(&args.pytorch_cases, CASES, &hint);
    let shapes_hint = format!("the shapes are {}", SHAPES.join(", "));
    check_cases(&args.models, SHAPES, &shapes_hint);
    let or_all = |given: &[String], all: &[&str]| -> Vec<String> {
        if given.is_empty() {
            all.iter().map(|s| s.to_string()).collect()
        } else {
            given.to_vec()
        }
    };
    let shapes = or_all(&args.models, &SHAPES);
    let cases = or_all(&args.cases, &CASES);
    // The PyTorch side of some cases can take very long on a small CPU (bitsandbytes' 4-bit
    // CPU path): `--pytorch-cases` limits which cases it runs.
    let pytorch_cases = or_all(&args.pytorch_cases, &CASES);
    let steps = args.steps.to_string();
    run(Command::new("cargo")
        .args(["build", "--release", "--quiet", "--bin", "peft-bench"])
        .current_dir(root))?;
    let ours_bin = crate::target_dir(root).join("release/peft-bench");
    let python = pytorch_if_asked(root, args);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut rows = Vec::new();
    for shape in &shapes {
        let dir = root.join("target/scale").join(shape);
        if !dir.join("config.json").is_file() {
            eprintln!("generating {} (once)", dir.display());
            let made = run_json(Command::new(&ours_bin).args([
                "make-scale-model",
                shape,
                &dir.to_string_lossy(),
            ]))?;
            eprintln!("{made}");
        }
        for case in &cases {
            let model = dir.to_string_lossy().into_owned();
            let ours = run_json(Command::new(&ours_bin).args([
                case.as_str(),
                "--model",
                &model,
                "--steps",
                &steps,
            ]))?;
            let theirs = match &python {
                Some(py) if pytorch_cases.contains(case) => Some(run_json(
                    Command::new(py)
                        .arg(root.join("bench/bench_scale_pytorch.py"))
                        .args([case.as_str(), "--model", &model, "--steps", &steps])
                        .args(["--threads", &threads.to_string()]),
                )?),
                _ => None,
            };
            eprintln!("{shape} {case}: done");
            eprintln!(
                "ours: {ours}\ntheirs: {}",
                theirs.clone().unwrap_or_default()
            );
            rows.push(serde_json::json!({
                "model": shape, "case": case, "ours": ours, "pytorch": theirs
            }));
        }
    }
    let md = table(&rows, threads);
    println!("{md}");
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(
        out_dir.join("scale.json"),
        serde_json::to_string_pretty(&rows)?,
    )?;
    std::fs::write(out_dir.join("scale.md"), &md)?;
    eprintln!("wrote {}", out_dir.join("scale.md").display());
    Ok(())
}

/// One row per model × case × phase, plus the figures the targets are stated in.
fn table(rows: &[serde_json::Value], threads: usize) -> String {
    let fmt = |v: Option<f64>, digits: usize| v.map_or("–".into(), |x| format!("{x:.digits$}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let gib = |v: &serde_json::Value| v.as_f64().map(|b| b / (1u64 << 30) as f64);
    let mut md = format!(
        "machine: {} ({threads} threads); batch 1 × 256, LoRA r = 8 on PEFT's default targets\n\n",
        crate::cpu_model()
    );
    md.push_str("| model | case | phase | ours s | PyTorch s | time ours/theirs | ours peak GiB | PyTorch peak GiB | peak ours/theirs |\n");
    md.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for row in rows {
        let ours = &row["ours"];
        let theirs = &row["pytorch"];
        let Some(phases) = ours["phases"].as_object() else {
            continue;
        };
        let mut line = |phase: &str, o: &serde_json::Value, t: &serde_json::Value, key: &str| {
            let (os, ts) = (o[key].as_f64(), t[key].as_f64());
            let (om, tm) = (gib(&o["peak_rss_bytes"]), gib(&t["peak_rss_bytes"]));
            md.push_str(&format!(
                "| {} | {} | {phase} | {} | {} | {} | {} | {} | {} |\n",
                row["model"].as_str().unwrap_or(""),
                row["case"].as_str().unwrap_or(""),
                fmt(os, 2),
                fmt(ts, 2),
                fmt(ratio(os, ts), 2),
                fmt(om, 2),
                fmt(tm, 2),
                fmt(ratio(om, tm), 2),
            ));
        };
        for (name, o) in phases {
            let t = &theirs["phases"][name];
            line(name, o, t, "seconds");
            if name == "train" {
                line("one step (median)", o, t, "median_step_s");
            }
            if name == "generate" {
                line("per token", o, t, "per_token_s");
                line("load + first token", o, t, "load_plus_first_token_s");
            }
        }
        let whole = serde_json::json!({"peak_rss_bytes": ours["peak_rss_bytes"]});
        let whole_t = serde_json::json!({"peak_rss_bytes": theirs["peak_rss_bytes"]});
        line("whole run", &whole, &whole_t, "-");
    }
    md
}
