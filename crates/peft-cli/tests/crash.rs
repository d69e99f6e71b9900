//! Crash safety of `peft train`: SIGKILL at random moments (often mid-checkpoint) never leaves a
//! checkpoint that does not load, and resuming after each kill ends with the adapter of an
//! uninterrupted run; Ctrl-C (SIGINT) writes a checkpoint and exits with status 130.

use peft_tests::fixtures;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use peft_core::TensorStore;

fn train_command(out: &Path, steps: usize, save_steps: usize, resume: bool) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_peft"));
    cmd.args([
        "train",
        "--model",
        fixtures().join("models/bloom-tiny").to_str().unwrap(),
        "--data",
        fixtures().join("../../data/demo.jsonl").to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--max-steps",
        &steps.to_string(),
        "--save-steps",
        &save_steps.to_string(),
        "--batch-size",
        "4",
        // Dropout on: every resumed run must draw the masks the uninterrupted run drew.
        "--lora-dropout",
        "0.1",
        "--no-exact-match",
    ])
    .env_remove("PEFT_DEVICE")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    if resume {
        cmd.args(["--resume", "latest"]);
    }
    cmd
}

/// Every `checkpoint-N` in `out` is complete: its state names step N, its adapter loads onto the
/// base model, its full trainable state and optimizer state are readable.
fn assert_checkpoints_load(out: &Path) -> usize {
    let mut count = 0;
    let Ok(entries) = std::fs::read_dir(out) else {
        return 0; // killed before the output folder existed
    };
    for entry in entries {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let Some(step) = name.strip_prefix("checkpoint-") else {
            continue;
        };
        let step: usize = step.parse().unwrap();
        let state: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(path.join("trainer_state.json")).unwrap(),
        )
        .unwrap_or_else(|e| panic!("{name}: trainer_state.json: {e}"));
        assert_eq!(state["global_step"], step, "{name}");
        TensorStore::open(path.join("trainable_state.safetensors"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(std::fs::metadata(path.join("optimizer.bin")).unwrap().len() > 0);
        let base = peft_models::load(
            fixtures().join("models/bloom-tiny"),
            &burn::tensor::Device::flex(),
        )
        .unwrap();
        peft_lora::from_pretrained(base, &path, false).unwrap_or_else(|e| panic!("{name}: {e}"));
        count += 1;
    }
    count
}

/// A small deterministic generator for kill delays.
struct Lcg(u64);

impl Lcg {
    fn next_ms(&mut self, max: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % max
    }
}

fn wait_or_kill(mut child: Child, after: Duration) -> bool {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.success();
        }
        if started.elapsed() >= after {
            child.kill().unwrap();
            child.wait().unwrap();
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn sigkill_during_checkpoints_never_corrupts_and_resume_is_exact() {
    const STEPS: usize = 24;
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("reference");
    let status = train_command(&reference, STEPS, 1, false).status().unwrap();
    assert!(status.success());
    let expected = std::fs::read(reference.join("adapter/adapter_model.safetensors")).unwrap();

    // Measure one uninterrupted run to spread the kills over its whole length.
    let timing = dir.path().join("timing");
    let started = Instant::now();
    assert!(
        train_command(&timing, STEPS, 1, false)
            .status()
            .unwrap()
            .success()
    );
    let run_ms = started.elapsed().as_millis() as u64;

    let killed = dir.path().join("killed");
    let mut rng = Lcg(7);
    let (mut kills, mut checked) = (0, 0);
    // Each resumed run has fewer steps left: keep delays within a third of a full run, so that
    // several kills land before the run can complete. The timing run may have been slowed by
    // other tests (or sped up): when a series ends with fewer than three kills, it starts over
    // with delays half as long.
    let mut span_ms = (run_ms / 3).max(20);
    for _attempt in 0..4 {
        if killed.exists() {
            std::fs::remove_dir_all(&killed).unwrap();
        }
        kills = 0;
        let mut finished = false;
        for _ in 0..40 {
            let child = train_command(&killed, STEPS, 1, true).spawn().unwrap();
            let delay = Duration::from_millis(5 + rng.next_ms(span_ms));
            finished = wait_or_kill(child, delay);
            if !finished {
                kills += 1;
            }
            checked += assert_checkpoints_load(&killed);
            if finished {
                break;
            }
        }
        if !finished {
            finished = train_command(&killed, STEPS, 1, true)
                .status()
                .unwrap()
                .success();
        }
        assert!(finished, "the run never completed");
        if kills >= 3 {
            break;
        }
        span_ms = (span_ms / 2).max(10);
    }
    eprintln!("{kills} kills, {checked} checkpoint loads, all complete");
    assert!(
        kills >= 3,
        "only {kills} kills landed: the run is too fast to test"
    );
    let got = std::fs::read(killed.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(
        got == expected,
        "resumed adapter differs from the uninterrupted run"
    );
}

#[test]
fn sigint_saves_a_checkpoint_and_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let child = train_command(&out, 100_000, 1_000_000, false)
        .spawn()
        .unwrap();
    // Wait until training has started (a metrics line is written after each step).
    let metrics = out.join("metrics.jsonl");
    let started = Instant::now();
    while !metrics.is_file() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "training did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: sending a signal to our own child process.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted at step"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(assert_checkpoints_load(&out), 1);
    let step: usize = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .strip_prefix("checkpoint-")
                .and_then(|s| s.parse().ok())
        })
        .next()
        .unwrap();
    // The checkpoint resumes: two more steps from where Ctrl-C stopped.
    let status = train_command(&out, step + 2, 1_000_000, true)
        .status()
        .unwrap();
    assert!(status.success());
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], step + 2);
}

/// A full disk while writing (simulated with a 200 KB file-size limit, which the merged model
/// exceeds but checkpoints do not): the write error names the file, no partial file is left
/// behind, and the checkpoints already written load.
#[test]
fn write_error_surfaces_and_leaves_checkpoints_intact() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let train = train_command(&out, 4, 2, false);
    let mut args: Vec<String> = vec![train.get_program().to_string_lossy().into_owned()];
    args.extend(train.get_args().map(|a| a.to_string_lossy().into_owned()));
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    // SIGXFSZ would kill the process; ignored, the write fails with EFBIG instead.
    let script = format!("ulimit -f 200; trap '' XFSZ; exec {}", quoted.join(" "));
    let output = Command::new("bash")
        .args(["-c", &script])
        .env_remove("PEFT_DEVICE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("merged/model.safetensors"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let leftovers: Vec<_> = std::fs::read_dir(out.join("merged"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".tmp"))
                .collect()
        })
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(!out.join("merged/model.safetensors").exists());
    assert_eq!(assert_checkpoints_load(&out), 2);
}
