//! End-to-end tests of the `peft` binary on the fixture models.

use peft_tests::fixtures;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use peft_core::{HostTensor, TensorStore};
use peft_tensors::save_safetensors;

fn model(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

/// Runs `peft` with `args`.
fn peft<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(args)
        .env_remove("PEFT_DEVICE")
        .output()
        .expect("run peft")
}

/// Runs `peft` with the arguments given, strings and paths alike.
macro_rules! peft {
    ($($arg:expr),* $(,)?) => {
        peft(&[$(std::ffi::OsString::from(&$arg)),*])
    };
}

/// [`peft!`] that must succeed (its stderr shown otherwise); its output.
macro_rules! peft_ok {
    ($($arg:expr),* $(,)?) => {{
        let out = peft!($($arg),*);
        ok(&out);
        out
    }};
}

/// A failed command: non-zero exit, one `error:` line naming `needle`, no panic.
fn assert_clean_failure(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains(needle), "`{needle}` not in: {stderr}");
}

#[test]
fn logits_command_matches_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("logits.safetensors");
    let reference = fixtures().join("reference/bloom-tiny.safetensors");
    peft_ok!(
        "logits",
        "--model",
        model("bloom-tiny"),
        "--inputs",
        reference,
        "--output",
        out_path,
        "--device",
        "cpu",
    );
    let ours = TensorStore::open(&out_path).unwrap();
    let theirs = TensorStore::open(&reference).unwrap();
    let (logits, shape) = ours.f32("logits").unwrap();
    let (expected, eshape) = theirs.f32("logits").unwrap();
    assert_eq!(shape, eshape);
    let (mask, _) = theirs.i64("attention_mask").unwrap();
    let vocab = shape[2];
    for (pos, m) in mask.iter().enumerate() {
        if *m == 1 {
            for v in pos * vocab..(pos + 1) * vocab {
                assert!((logits[v] - expected[v]).abs() <= 1e-4, "position {pos}");
            }
        }
    }
}

#[test]
fn generate_json_matches_transformers_greedy() {
    let text = std::fs::read_to_string(fixtures().join("reference/llama-tiny.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let case = &json["greedy"][0];
    let prompt: Vec<u64> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
    let expected: Vec<u64> = serde_json::from_value(case["new_ids"].clone()).unwrap();
    let ids = prompt
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let n = expected.len().to_string();
    let out = peft_ok!(
        "generate",
        "--model",
        model("llama-tiny"),
        "--prompt-ids",
        &ids,
        "--max-new-tokens",
        &n,
        "--greedy",
        "--json",
    );
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["prompt_ids"], serde_json::json!(prompt));
    assert_eq!(printed["new_ids"], serde_json::json!(expected));
    assert!(printed["text"].is_string());
}

#[test]
fn generate_from_text_prompt_tokenises_with_the_model_tokenizer() {
    let out = peft_ok!(
        "generate",
        "--model",
        model("bloom-tiny"),
        "--prompt",
        "Human: 你好\n\nAssistant: ",
        "--max-new-tokens",
        "12",
        "--json",
    );
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/bloom-tiny.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(printed["prompt_ids"], reference["greedy"][0]["prompt_ids"]);
    assert_eq!(printed["new_ids"], reference["greedy"][0]["new_ids"]);
}

#[test]
fn inspect_lists_hf_names_shapes_and_the_parameter_count() {
    let out = peft!("inspect", "--model", model("bloom-tiny"));
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("transformer.h.1.self_attention.query_key_value.weight"));
    assert!(stdout.contains("[192, 64]"));
    // transformers counts 132,992 parameters for this model (lm_head is tied).
    assert!(
        stdout.trim_end().ends_with("all params: 132,992"),
        "{stdout}"
    );
}

/// Every command that takes a model (and adapters), given each kind of wrong folder, answers
/// one line naming the flag, the path and what is wrong, before loading anything.
#[test]
fn wrong_folders_are_named_by_every_command() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let missing = root.join("missing");
    let file = root.join("file.txt");
    std::fs::write(&file, "x").unwrap();
    let empty = root.join("empty");
    std::fs::create_dir(&empty).unwrap();
    // A model without its tokenizer: config and weights only.
    let untokenized = root.join("untokenized");
    std::fs::create_dir(&untokenized).unwrap();
    for name in ["config.json", "model.safetensors"] {
        std::fs::copy(model("bloom-tiny").join(name), untokenized.join(name)).unwrap();
    }
    let bloom = model("bloom-tiny");
    let adapter = fixtures().join("adapters/lora-bloom");
    let (out, inputs) = (
        root.join("out"),
        fixtures().join("reference/bloom-tiny.safetensors"),
    );
    let s = |p: &Path| p.to_str().unwrap().to_string();

    // Each command with its other required flags; `M` is replaced by the model folder.
    let gguf = root.join("out.gguf");
    let commands: [(&str, Vec<String>, bool); 9] = [
        (
            "logits",
            vec!["--inputs".into(), s(&inputs), "--output".into(), s(&out)],
            false,
        ),
        ("generate", vec!["--prompt".into(), "hi".into()], true),
        ("inspect", vec![], false),
        (
            "merge",
            vec!["--adapter".into(), s(&adapter), "--output".into(), s(&out)],
            false,
        ),
        ("train", vec!["--output".into(), s(&out)], true),
        ("quantize", vec!["--output".into(), s(&out)], false),
        (
            "combine",
            vec![
                "--adapter".into(),
                format!("a={}", s(&adapter)),
                "--weights".into(),
                "1".into(),
                "--output".into(),
                s(&out),
            ],
            false,
        ),
        ("serve", vec!["--port".into(), "0".into()], true),
        ("export-gguf", vec!["--output".into(), s(&gguf)], true),
    ];
    let run = |command: &str, model: &Path, rest: &[String]| {
        let mut args = vec![command.to_string(), "--model".into(), s(model)];
        args.extend(rest.iter().cloned());
        peft(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    for (command, rest, needs_tokenizer) in &commands {
        let cases = [
            (&missing, format!("--model {}: no such folder", s(&missing))),
            (&file, format!("--model {}: not a folder", s(&file))),
            (
                &empty,
                format!(
                    "--model {}: not a Hugging Face model folder (no config.json)",
                    s(&empty)
                ),
            ),
            (
                &adapter,
                format!(
                    "--model {}: a PEFT adapter folder (adapter_config.json), not a model",
                    s(&adapter)
                ),
            ),
        ];
        for (model, needle) in &cases {
            let out = run(command, model, rest);
            assert_clean_failure(&out, needle);
        }
        let out = run(command, &untokenized, rest);
        if *needs_tokenizer {
            assert_clean_failure(
                &out,
                &format!("--model {}: no tokenizer.json", s(&untokenized)),
            );
        } else {
            assert!(
                !String::from_utf8_lossy(&out.stderr).contains("tokenizer"),
                "{command}"
            );
        }
    }
    // Adapter folders: a model folder, a missing folder and a non-adapter folder given as one.
    for (command, extra) in [
        ("generate", vec!["--prompt", "hi"]),
        (
            "logits",
            vec![
                "--inputs",
                inputs.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
            ],
        ),
        ("merge", vec!["--output", out.to_str().unwrap()]),
        ("serve", vec!["--port", "0"]),
        ("export-gguf", vec!["--output", gguf.to_str().unwrap()]),
    ] {
        for (given, needle) in [
            (
                s(&bloom),
                format!(
                    "--adapter {}: a model folder (config.json), not a PEFT adapter",
                    s(&bloom)
                ),
            ),
            (
                s(&missing),
                format!("--adapter {}: no such folder", s(&missing)),
            ),
            (
                s(&empty),
                format!(
                    "--adapter {}: not a PEFT adapter folder (no adapter_config.json)",
                    s(&empty)
                ),
            ),
        ] {
            // serve names each adapter (NAME=DIR); the others take a bare folder.
            let value = if command == "serve" {
                format!("x={given}")
            } else {
                given
            };
            let mut args = vec![
                command,
                "--model",
                bloom.to_str().unwrap(),
                "--adapter",
                &value,
            ];
            args.extend(&extra);
            assert_clean_failure(&peft(&args), &needle);
        }
    }
}

#[test]
fn bad_inputs_fail_with_one_clear_line() {
    let bloom = model("bloom-tiny");
    let bloom = bloom.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("o.safetensors");
    let out_path = out_path.to_str().unwrap();

    let missing = peft!("inspect", "--model", "/definitely/not/here");
    assert_clean_failure(&missing, "--model /definitely/not/here: no such folder");

    let not_tensors = fixtures().join("models/bloom-tiny/config.json");
    let out = peft!(
        "logits",
        "--model",
        bloom,
        "--inputs",
        not_tensors,
        "--output",
        out_path,
    );
    assert_clean_failure(&out, "invalid safetensors file");

    let mut tensors = BTreeMap::new();
    tensors.insert(
        "input_ids".to_string(),
        HostTensor::from_i64(vec![1, 2], &[5, 100_000]),
    );
    let bad_ids = dir.path().join("bad_ids.safetensors");
    save_safetensors(&bad_ids, &tensors, None).unwrap();
    let out = peft!(
        "logits", "--model", bloom, "--inputs", bad_ids, "--output", out_path,
    );
    assert_clean_failure(&out, "token id 100000");

    tensors.insert(
        "input_ids".to_string(),
        HostTensor::from_i64(vec![1, 2], &[5, 6]),
    );
    tensors.insert(
        "attention_mask".to_string(),
        HostTensor::from_i64(vec![1, 3], &[1, 1, 1]),
    );
    let bad_mask = dir.path().join("bad_mask.safetensors");
    save_safetensors(&bad_mask, &tensors, None).unwrap();
    let out = peft!(
        "logits", "--model", bloom, "--inputs", bad_mask, "--output", out_path,
    );
    assert_clean_failure(&out, "`attention_mask` has shape [1, 3]");

    let out = peft!(
        "generate", "--model", bloom, "--prompt", "hi", "--device", "tpu",
    );
    assert_clean_failure(&out, "unknown device `tpu`");

    let out = peft!(
        "generate",
        "--model",
        bloom,
        "--prompt",
        "hi",
        "--temperature",
        "0",
        "--top-p",
        "0.5",
    );
    assert_clean_failure(&out, "temperature must be > 0");
    assert!(!Path::new(out_path).exists(), "no output file on failure");

    // The server's limits are checked before the model loads.
    for (flag, value, needle) in [
        (
            "--read-timeout",
            "0",
            "--read-timeout must be a number of seconds from 0.001",
        ),
        (
            "--request-timeout",
            "nan",
            "--request-timeout must be a number of seconds",
        ),
        (
            "--shutdown-timeout",
            "-1",
            "--shutdown-timeout must be a number of seconds from 0",
        ),
        (
            "--max-connections",
            "0",
            "--max-connections must be at least 1",
        ),
    ] {
        let flag_value = format!("{flag}={value}");
        let out = peft!("serve", "--model", bloom, "--port", "0", &flag_value);
        assert_clean_failure(&out, needle);
    }
}

#[test]
fn unsupported_model_type_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "gpt2", "vocab_size": 10}"#,
    )
    .unwrap();
    let out = peft!("inspect", "--model", dir.path());
    assert_clean_failure(
        &out,
        "unsupported model_type `gpt2` (supported: bloom, gemma2, llama, mistral, phi3, qwen2, qwen3)",
    );
}

fn adapter(name: &str) -> PathBuf {
    fixtures().join("adapters").join(name)
}

/// Max |Δ| over real positions between the logits in `out_path` and a reference file.
fn logits_diff(out_path: &Path, reference: &Path) -> f32 {
    logits_diff_virtual(out_path, reference, 0)
}

/// [`logits_diff`] for logits with `n_virtual` leading virtual positions per row (prompt
/// tuning, P-tuning: PEFT returns them, and they count as real), every row and position checked.
fn logits_diff_virtual(out_path: &Path, reference: &Path, n_virtual: usize) -> f32 {
    logits_diff_at(out_path, reference, "logits", n_virtual)
}

/// [`logits_diff_virtual`] against the reference logits stored under `key`.
fn logits_diff_at(out_path: &Path, reference: &Path, key: &str, n_virtual: usize) -> f32 {
    let ours = TensorStore::open(out_path).unwrap();
    let theirs = TensorStore::open(reference).unwrap();
    let (a, shape) = ours.f32("logits").unwrap();
    let (b, reference_shape) = theirs.f32(key).unwrap();
    assert_eq!(shape, reference_shape, "logits shape");
    let (input_mask, input_shape) = theirs.i64("attention_mask").unwrap();
    assert_eq!(
        shape[1],
        input_shape[1] + n_virtual,
        "virtual positions first"
    );
    let mask: Vec<i64> = input_mask
        .chunks(input_shape[1])
        .flat_map(|row| std::iter::repeat_n(1, n_virtual).chain(row.iter().copied()))
        .collect();
    let vocab = shape[2];
    let mut worst = 0f32;
    for (pos, m) in mask.iter().enumerate() {
        if *m == 1 {
            for v in pos * vocab..(pos + 1) * vocab {
                worst = worst.max((a[v] - b[v]).abs());
            }
        }
    }
    worst
}

#[test]
fn logits_with_a_peft_lora_adapter_merged_or_not() {
    adapter_logits_match_merged_or_not("llama-tiny", "lora-llama");
}

/// `peft logits` with the adapter fixture `adapter_name` on `model_name`, with and without
/// `--merge`, gives PEFT's logits on the adapter's reference batch.
fn adapter_logits_match_merged_or_not(model_name: &str, adapter_name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let reference = fixtures().join(format!("reference/{adapter_name}.safetensors"));
    let adapter_dir = adapter(adapter_name);
    for merge in [false, true] {
        let out_path = dir.path().join(format!("logits-{merge}.safetensors"));
        let mut extra = vec!["--adapter", adapter_dir.to_str().unwrap()];
        if merge {
            extra.push("--merge");
        }
        ok(&logits_to(
            &model(model_name),
            &extra,
            &reference,
            &out_path,
        ));
        let diff = logits_diff(&out_path, &reference);
        assert!(
            diff <= 1e-4,
            "{adapter_name} merge={merge}: max |Δ| = {diff}"
        );
    }
}

#[test]
fn merge_writes_a_checkpoint_that_runs_like_the_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let merged = dir.path().join("merged");
    peft_ok!(
        "merge",
        "--model",
        model("bloom-tiny"),
        "--adapter",
        adapter("lora-bloom-mts"),
        "--output",
        merged,
    );
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(merged.join(file).is_file(), "{file} missing");
    }
    // modules_to_save on the tied embedding: saved untied, lm_head = the original embedding.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["tie_word_embeddings"], false);
    let weights = TensorStore::open(merged.join("model.safetensors")).unwrap();
    let base = TensorStore::open(model("bloom-tiny").join("model.safetensors")).unwrap();
    assert_eq!(
        weights.f32("lm_head.weight").unwrap(),
        base.f32("transformer.word_embeddings.weight").unwrap()
    );

    let reference = fixtures().join("reference/lora-bloom-mts.safetensors");
    let out_path = dir.path().join("logits.safetensors");
    peft_ok!(
        "logits", "--model", merged, "--inputs", reference, "--output", out_path,
    );
    let diff = logits_diff(&out_path, &reference);
    assert!(diff <= 1e-4, "merged checkpoint: max |Δ| = {diff}");
}

#[test]
fn inspect_with_a_config_prints_peft_trainable_line() {
    let out = peft_ok!(
        "inspect",
        "--model",
        model("bloom-tiny"),
        "--config",
        adapter("lora-bloom-mts").join("adapter_config.json"),
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("  transformer.h.1.mlp.dense_4h_to_h\n"),
        "{stdout}"
    );
    // PEFT 0.21.2 prints this line for the same config (tests/fixtures/reference/lora-bloom-mts.json).
    assert!(
        stdout
            .trim_end()
            .ends_with("trainable params: 37,376 || all params: 170,368 || trainable%: 21.9384"),
        "{stdout}"
    );
}

#[test]
fn adapter_errors_are_one_line() {
    let bloom = model("bloom-tiny");
    let out = peft!(
        "generate",
        "--model",
        bloom,
        "--adapter",
        adapter("lora-llama"),
        "--prompt",
        "hi",
    );
    assert_clean_failure(&out, "not found in the base model");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("adapter_config.json"),
        r#"{"peft_type": "BOFT", "r": 4}"#,
    )
    .unwrap();
    let out = peft!(
        "generate",
        "--model",
        bloom,
        "--adapter",
        dir.path(),
        "--prompt",
        "hi",
    );
    assert_clean_failure(&out, "unknown type `BOFT`");
}

#[test]
fn ia3_adapters_run_merged_or_not() {
    adapter_logits_match_merged_or_not("llama-tiny", "ia3-llama");
}

#[test]
fn inspect_bitfit_prints_the_seed_count() {
    let out = peft_ok!(
        "inspect",
        "--model",
        model("bloom-tiny"),
        "--method",
        "bitfit",
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("num_param: 1536\n"), "{stdout}");
    assert!(
        stdout
            .trim_end()
            .ends_with("trainable params: 1,536 || all params: 132,992 || trainable%: 1.1550")
    );
    let out = peft!(
        "inspect",
        "--model",
        model("llama-tiny"),
        "--method",
        "bitfit",
    );
    assert_clean_failure(&out, "this llama model has none");
}

#[test]
fn inspect_ia3_config_gives_peft_numbers() {
    let out = peft_ok!(
        "inspect",
        "--model",
        model("bloom-tiny"),
        "--config",
        adapter("ia3-bloom").join("adapter_config.json"),
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    // PEFT's numbers for this config: tests/fixtures/reference/ia3-bloom.json.
    assert!(
        stdout
            .trim_end()
            .ends_with("trainable params: 896 || all params: 133,888 || trainable%: 0.6692")
    );
}

/// LoHa's config through the registry: PEFT's counts (tests/fixtures/reference/loha-llama.json,
/// rank and alpha patterns included).
#[test]
fn inspect_loha_config_gives_peft_numbers() {
    let out = peft_ok!(
        "inspect",
        "--model",
        model("llama-tiny"),
        "--config",
        adapter("loha-llama").join("adapter_config.json"),
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout
            .trim_end()
            .ends_with("trainable params: 9,472 || all params: 149,056 || trainable%: 6.3547"),
        "{stdout}"
    );
}

/// LoKr's config through the registry: PEFT's counts (tests/fixtures/reference/lokr-llama.json:
/// whole and decomposed factors, rank and alpha patterns).
#[test]
fn inspect_lokr_config_gives_peft_numbers() {
    let out = peft_ok!(
        "inspect",
        "--model",
        model("llama-tiny"),
        "--config",
        adapter("lokr-llama").join("adapter_config.json"),
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout
            .trim_end()
            .ends_with("trainable params: 2,304 || all params: 141,888 || trainable%: 1.6238"),
        "{stdout}"
    );
}

/// AdaLoRA's config through the registry: PEFT's counts of a fresh model from it
/// (tests/fixtures/reference/adalora-llama.json `fresh_*`: every layer at init_r, `ranknum`
/// counted).
#[test]
fn inspect_adalora_config_gives_peft_numbers() {
    let out = peft_ok!(
        "inspect",
        "--model",
        model("llama-tiny"),
        "--config",
        adapter("adalora-llama").join("adapter_config.json"),
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout
            .trim_end()
            .ends_with("trainable params: 7,740 || all params: 147,334 || trainable%: 5.2534"),
        "{stdout}"
    );
}

/// VeRA's config through the registry: PEFT's counts (tests/fixtures/reference/vera-llama.json:
/// the vectors only, the projections are buffers).
#[test]
fn inspect_vera_config_gives_peft_numbers() {
    let out = peft_ok!(
        "inspect",
        "--model",
        model("llama-tiny"),
        "--config",
        adapter("vera-llama").join("adapter_config.json"),
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout
            .trim_end()
            .ends_with("trainable params: 592 || all params: 140,176 || trainable%: 0.4223"),
        "{stdout}"
    );
}

#[test]
fn train_on_the_bundled_default_writes_everything_people_open() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("run");
    let out = peft_ok!(
        "train",
        "--output",
        out_dir,
        "--max-steps",
        "12",
        "--save-steps",
        "6",
        "--no-exact-match",
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("held-out") && stdout.contains("loss"),
        "{stdout}"
    );
    let merged_line = format!("merged model: {}", out_dir.join("merged").display());
    assert!(stdout.contains(&merged_line), "{stdout}");
    for path in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "merged/model.safetensors",
        "merged/config.json",
        "metrics.jsonl",
        "loss.png",
        "summary.json",
        "checkpoint-6/trainer_state.json",
        "checkpoint-12/adapter_model.safetensors",
    ] {
        assert!(out_dir.join(path).is_file(), "{path} missing");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("summary.json")).unwrap())
            .unwrap();
    let (before, after) = (
        summary["before"]["loss"].as_f64().unwrap(),
        summary["after"]["loss"].as_f64().unwrap(),
    );
    assert!(after < before, "held-out loss {before} → {after}");
    assert_eq!(
        std::fs::read_to_string(out_dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        12
    );

    // The trained adapter runs through --adapter like any PEFT folder, and generates exactly
    // what the merged checkpoint written beside it generates (two independent paths: the
    // adapter computed beside the base, and the weights with the update folded in), which is
    // not what the base model generates.
    let bundled = out_dir.join("bundled/model");
    let greedy = |model_dir: &Path, adapter_dir: Option<&Path>| {
        let mut args = vec![
            "generate".to_string(),
            "--model".into(),
            model_dir.display().to_string(),
            "--prompt".into(),
            "Human: 你好\n\nAssistant: ".into(),
            "--max-new-tokens".into(),
            "8".into(),
            "--json".into(),
        ];
        if let Some(a) = adapter_dir {
            args.extend(["--adapter".into(), a.display().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = peft(&args);
        ok(&out);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["new_ids"].clone()
    };
    let with_adapter = greedy(&bundled, Some(&out_dir.join("adapter")));
    assert_eq!(with_adapter, greedy(&out_dir.join("merged"), None));
    assert_ne!(
        with_adapter,
        greedy(&bundled, None),
        "the adapter changes the answer"
    );

    // Bad data: one clear line naming the file and line.
    let data = dir.path().join("bad.jsonl");
    std::fs::write(&data, "{\"text\": \"ok\"}\n{\"instruction\": \"x\"}\n").unwrap();
    let out = peft!(
        "train",
        "--model",
        bundled,
        "--data",
        data,
        "--output",
        dir.path().join("bad"),
    );
    assert_clean_failure(&out, "bad.jsonl:2: unknown record shape");
    let out = peft!(
        "train",
        "--method",
        "dora",
        "--output",
        dir.path().join("p"),
    );
    assert_clean_failure(&out, "--method dora: unknown method");
}

#[test]
fn bitfit_trains_and_its_adapter_loads_with_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("bitfit");
    peft_ok!(
        "train",
        "--method",
        "bitfit",
        "--output",
        out_dir,
        "--max-steps",
        "3",
        "--no-exact-match",
    );
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "BITFIT");
    let reference = fixtures().join("reference/bloom-tiny.safetensors");
    let logits_path = dir.path().join("logits.safetensors");
    peft_ok!(
        "logits",
        "--model",
        out_dir.join("bundled/model"),
        "--adapter",
        out_dir.join("adapter"),
        "--inputs",
        reference,
        "--output",
        logits_path,
    );
    // Trained biases change the model; the merged checkpoint gives the same logits.
    let diff = logits_diff(&logits_path, &reference);
    assert!(
        diff > 1e-3,
        "trained biases must change the logits ({diff})"
    );
    let merged_logits = dir.path().join("merged.safetensors");
    peft_ok!(
        "logits",
        "--model",
        out_dir.join("merged"),
        "--inputs",
        reference,
        "--output",
        merged_logits,
    );
    let a = TensorStore::open(&logits_path)
        .unwrap()
        .f32("logits")
        .unwrap();
    let b = TensorStore::open(&merged_logits)
        .unwrap()
        .f32("logits")
        .unwrap();
    assert_eq!(a, b, "the merged BitFit model is the adapted model");
}

/// `peft train` with `--use-dora` / `--init-lora-weights pissa`, then `peft logits` of the
/// bundled base + adapter/ against merged/. With PiSSA the base changed while training, and
/// adapter/ is the plain LoRA of rank 2r over the original base: it gives the merged model.
fn train_lora_variant(flags: &[&str]) -> (tempfile::TempDir, PathBuf, String, f32) {
    let mut all = vec!["--target-modules", "query_key_value,dense_4h_to_h"];
    all.extend(flags);
    train_variant("lora", &all)
}

/// `peft train --method <method>` for 3 steps with `flags`, then the adapter's logits over the
/// base against the merged model's: `(dir, output, stdout, max |Δ|)`.
fn train_variant(method: &str, flags: &[&str]) -> (tempfile::TempDir, PathBuf, String, f32) {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("variant");
    let mut args = vec![
        "train".to_string(),
        "--method".into(),
        method.into(),
        "--output".into(),
        out_dir.display().to_string(),
        "--max-steps".into(),
        "3".into(),
        "--no-exact-match".into(),
        "--save-steps".into(),
        "3".into(),
    ];
    args.extend(flags.iter().map(|f| f.to_string()));
    let out = peft(&args);
    ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let reference = fixtures().join("reference/bloom-tiny.safetensors");
    let [with_adapter, merged] =
        ["adapter.safetensors", "merged.safetensors"].map(|f| dir.path().join(f));
    peft_ok!(
        "logits",
        "--model",
        out_dir.join("bundled/model"),
        "--adapter",
        out_dir.join("adapter"),
        "--inputs",
        reference,
        "--output",
        with_adapter,
    );
    peft_ok!(
        "logits",
        "--model",
        out_dir.join("merged"),
        "--inputs",
        reference,
        "--output",
        merged,
    );
    let [(a, _), (b, _)] =
        [with_adapter, merged].map(|p| TensorStore::open(p).unwrap().f32("logits").unwrap());
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    (dir, out_dir, stdout, diff)
}

#[test]
fn dora_and_pissa_train_and_their_adapters_give_the_merged_model() {
    let (_dir, out_dir, _, diff) = train_lora_variant(&["--use-dora"]);
    assert!(diff <= 1e-4, "DoRA adapter vs merged: {diff}");
    let store = TensorStore::open(out_dir.join("adapter/adapter_model.safetensors")).unwrap();
    let count = |suffix: &str| store.keys().filter(|k| k.ends_with(suffix)).count();
    assert_eq!(count(".lora_magnitude_vector"), count(".lora_A.weight"));
    assert!(count(".lora_A.weight") > 0);

    let (_dir, out_dir, stdout, diff) = train_lora_variant(&["--init-lora-weights", "pissa"]);
    assert!(diff <= 1e-4, "converted PiSSA adapter vs merged: {diff}");
    assert!(
        stdout.contains("pissa changed the base while training"),
        "{stdout}"
    );
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["init_lora_weights"], true);
    assert_eq!(config["r"], 32, "rank 2r of the bundled demo's r = 16");
    // The checkpoints hold the PiSSA adapter itself.
    let checkpoint: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("checkpoint-3/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(checkpoint["init_lora_weights"], "pissa");
}

/// `peft train --method loha` with LoHa's own flags (rank and module dropout active while
/// training): PEFT's four factors per targeted layer in adapter/, the flags' values in its
/// config, and adapter/ over the base equal to merged/.
#[test]
fn loha_trains_with_its_flags_and_its_adapter_gives_the_merged_model() {
    let flags = [
        "--target-modules",
        "query_key_value,dense_4h_to_h",
        "--r",
        "4",
        "--alpha",
        "8",
        "--rank-dropout",
        "0.1",
        "--module-dropout",
        "0.1",
    ];
    let (_dir, out_dir, _, diff) = train_variant("loha", &flags);
    assert!(diff <= 1e-4, "LoHa adapter vs merged: {diff}");
    let store = TensorStore::open(out_dir.join("adapter/adapter_model.safetensors")).unwrap();
    for factor in ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"] {
        let count = store.keys().filter(|k| k.ends_with(factor)).count();
        assert_eq!(count, 8, "{factor}: two targets in each of the four layers");
    }
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LOHA");
    assert_eq!((&config["r"], &config["alpha"]), (&4.into(), &8.0.into()));
    assert_eq!(
        (&config["rank_dropout"], &config["module_dropout"]),
        (&0.1.into(), &0.1.into())
    );
}

/// `peft train --method lokr` with LoKr's own flags (both factors decomposed at r = 2, a
/// factorisation divider, rescaled rank dropout and module dropout while training): the pairs
/// PEFT's rule gives in adapter/, the flags' values in its config, and adapter/ over the base
/// equal to merged/.
#[test]
fn lokr_trains_with_its_flags_and_its_adapter_gives_the_merged_model() {
    let flags = [
        "--target-modules",
        "query_key_value,dense_4h_to_h",
        "--r",
        "2",
        "--alpha",
        "4",
        "--decompose-both",
        "--decompose-factor",
        "8",
        "--rank-dropout",
        "0.1",
        "--rank-dropout-scale",
        "--module-dropout",
        "0.1",
    ];
    let (_dir, out_dir, _, diff) = train_variant("lokr", &flags);
    assert!(diff <= 1e-4, "LoKr adapter vs merged: {diff}");
    let store = TensorStore::open(out_dir.join("adapter/adapter_model.safetensors")).unwrap();
    // With divider 8 the bundled model's 128 → 384 and 512 → 128 layers split as
    // (8·48) × (8·16) and (8·16) × (8·64): r = 2 is below half of every factor's larger side,
    // so both factors of both targets are pairs.
    for factor in ["lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"] {
        let count = store.keys().filter(|k| k.ends_with(factor)).count();
        assert_eq!(count, 8, "{factor}: two targets in each of the four layers");
    }
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LOKR");
    assert_eq!(
        (
            &config["decompose_both"],
            &config["decompose_factor"],
            &config["rank_dropout_scale"]
        ),
        (&true.into(), &8.into(), &true.into())
    );
}

/// `peft train --method vera` with VeRA's own flags, projections left out of the folder: only
/// the vectors in adapter/, the flags' values in its config, and adapter/ — its projections
/// drawn again from the key when `peft logits` loads it — over the base equal to merged/.
#[test]
fn vera_trains_without_saved_projections_and_its_adapter_gives_the_merged_model() {
    let flags = [
        "--target-modules",
        "query_key_value,dense_4h_to_h",
        "--r",
        "16",
        "--projection-prng-key",
        "3",
        "--no-save-projection",
        "--d-initial",
        "0.2",
        "--vera-dropout",
        "0.1",
    ];
    let (_dir, out_dir, _, diff) = train_variant("vera", &flags);
    assert!(diff <= 1e-4, "VeRA adapter vs merged: {diff}");
    let store = TensorStore::open(out_dir.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(!store.contains("base_model.vera_A"));
    for vector in ["vera_lambda_b", "vera_lambda_d"] {
        let count = store.keys().filter(|k| k.ends_with(vector)).count();
        assert_eq!(count, 8, "{vector}: two targets in each of the four layers");
    }
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "VERA");
    assert_eq!(
        (
            &config["projection_prng_key"],
            &config["save_projection"],
            &config["d_initial"],
            &config["vera_dropout"]
        ),
        (&3.into(), &false.into(), &0.2.into(), &0.1.into())
    );
}

/// `peft train --method adalora`: the schedule spans the run (`total_step` = 3 steps, no flag),
/// the allocator cuts every targeted layer's 6 ranks to 2 on average by the final mask at step 2,
/// and the folder holds each layer at its kept rank with the pattern in its config; its adapter over
/// the base equals merged/.
#[test]
fn adalora_trains_cuts_ranks_and_its_adapter_gives_the_merged_model() {
    let flags = ["--r", "6", "--target-r", "2", "--tfinal", "1"];
    let (_dir, out_dir, _, diff) = train_variant("adalora", &flags);
    assert!(diff <= 1e-4, "AdaLoRA adapter vs merged: {diff}");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "ADALORA");
    assert_eq!(
        (
            &config["init_r"],
            &config["target_r"],
            &config["total_step"]
        ),
        (&6.into(), &2.into(), &3.into())
    );
    let pattern = config["rank_pattern"].as_object().unwrap();
    assert!(!pattern.is_empty());
    let store = TensorStore::open(out_dir.join("adapter/adapter_model.safetensors")).unwrap();
    let mut kept_in_all = 0;
    for (key, flags) in pattern {
        let flags = flags.as_array().unwrap();
        assert_eq!(flags.len(), 6);
        let kept = flags.iter().filter(|f| f.as_bool().unwrap()).count();
        kept_in_all += kept;
        let path = key.strip_suffix(".lora_E").unwrap();
        let a = store
            .shape(&format!("base_model.model.{path}.lora_A"))
            .unwrap();
        let b = store
            .shape(&format!("base_model.model.{path}.lora_B"))
            .unwrap();
        assert_eq!((a[0], b[1]), (kept, kept), "{path}");
    }
    assert_eq!(kept_in_all, 2 * pattern.len(), "target_r 2 × the layers");
}

/// `peft train --adapter DIR` continues a trained LoHa folder (PEFT's `from_pretrained(…,
/// is_trainable=True)`): the folder's config is kept (r = 4), its tensors train further, and
/// the new adapter over the base equals the new merged model; config flags beside it are
/// refused.
#[test]
fn train_continues_from_an_adapter_folder() {
    let flags = [
        "--target-modules",
        "query_key_value",
        "--r",
        "4",
        "--alpha",
        "8",
    ];
    let (_first_dir, first, _, _) = train_variant("loha", &flags);
    let start = first.join("adapter");
    let start_arg = start.display().to_string();
    let (_dir, out_dir, _, diff) = train_variant("loha", &["--adapter", &start_arg]);
    assert!(diff <= 1e-4, "continued adapter vs merged: {diff}");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (&config["peft_type"], &config["r"]),
        (&"LOHA".into(), &4.into())
    );
    let before = TensorStore::open(start.join("adapter_model.safetensors")).unwrap();
    let after = TensorStore::open(out_dir.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    let key = before.keys().find(|k| k.ends_with("hada_w2_b")).unwrap();
    assert_ne!(before.f32(key).unwrap(), after.f32(key).unwrap(), "{key}");
    let out = peft(&["train", "--adapter", &start_arg, "--r", "8"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the adapter keeps its config"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--init-lora-weights loftq`: PEFT's LoftQConfig defaults written into the config (4 bits, one
/// iteration); adapter/ is for the quantised base, which loading it recomputes, so adapter over
/// the bundled base gives the merged model; nothing is converted.
#[test]
fn loftq_trains_and_its_adapter_gives_the_merged_model() {
    let (_dir, out_dir, stdout, diff) = train_lora_variant(&["--init-lora-weights", "loftq"]);
    assert!(diff <= 1e-4, "LoftQ adapter vs merged: {diff}");
    assert!(
        !stdout.contains("changed the base while training"),
        "{stdout}"
    );
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["init_lora_weights"], "loftq");
    assert_eq!(
        config["loftq_config"],
        serde_json::json!({"loftq_bits": 4, "loftq_iter": 1})
    );
}

/// `--trainable-token-indices`: the rows train beside the pairs, adapter/ carries them under
/// PEFT's key, and adapter over the base gives the merged model (the tied output rows merged
/// with the table).
#[test]
fn trainable_tokens_train_and_their_adapter_gives_the_merged_model() {
    let (_dir, out_dir, _, diff) = train_lora_variant(&["--trainable-token-indices", "5,17,300"]);
    assert!(diff <= 1e-4, "adapter with token rows vs merged: {diff}");
    let store = TensorStore::open(out_dir.join("adapter/adapter_model.safetensors")).unwrap();
    let key = store
        .keys()
        .find(|k| k.ends_with(".token_adapter.trainable_tokens_delta"))
        .expect("token rows saved")
        .to_string();
    assert_eq!(store.f32(&key).unwrap().1[0], 3);
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        config["trainable_token_indices"],
        serde_json::json!([5, 17, 300])
    );
}

#[test]
fn prompt_tuning_adapters_run_and_train() {
    let dir = tempfile::tempdir().unwrap();
    let reference = fixtures().join("reference/prompt-llama-random.safetensors");
    let out_path = dir.path().join("logits.safetensors");
    peft_ok!(
        "logits",
        "--model",
        model("llama-tiny"),
        "--adapter",
        adapter("prompt-llama-random"),
        "--inputs",
        reference,
        "--output",
        out_path,
    );
    // PEFT's shape: the 5 virtual positions come first; every real position of every row
    // (the padded ones included) matches PEFT.
    let worst = logits_diff_virtual(&out_path, &reference, 5);
    assert!(worst <= 1e-4, "max |Δ| = {worst}");

    let out = peft!(
        "logits",
        "--model",
        model("llama-tiny"),
        "--adapter",
        adapter("prompt-llama-random"),
        "--merge",
        "--inputs",
        reference,
        "--output",
        out_path,
    );
    assert_clean_failure(&out, "prompt tuning has no weights to merge");

    let run = dir.path().join("prompt");
    let out = peft_ok!(
        "train",
        "--method",
        "prompt",
        "--num-virtual-tokens",
        "4",
        "--output",
        run,
        "--max-steps",
        "3",
        "--no-exact-match",
    );
    let store = TensorStore::open(run.join("adapter/adapter_model.safetensors")).unwrap();
    // The bundled pretrained BLOOM has hidden size 128.
    assert_eq!(store.shape("prompt_embeddings").unwrap(), &[4, 128]);
    assert!(!run.join("merged").exists());
    // The closing summary names only what was written.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("adapter: "), "{stdout}");
    assert!(!stdout.contains("merged model:"), "{stdout}");
}

#[test]
fn prefix_tuning_adapters_run() {
    let dir = tempfile::tempdir().unwrap();
    let reference = fixtures().join("reference/prefix-llama.safetensors");
    let out_path = dir.path().join("logits.safetensors");
    peft_ok!(
        "logits",
        "--model",
        model("llama-tiny"),
        "--adapter",
        adapter("prefix-llama"),
        "--inputs",
        reference,
        "--output",
        out_path,
    );
    let diff = logits_diff(&out_path, &reference);
    assert!(diff <= 1e-4, "max |Δ| = {diff}");
}

#[test]
fn ptuning_adapters_run_and_train() {
    let dir = tempfile::tempdir().unwrap();
    let reference = fixtures().join("reference/ptuning-bloom-lstm.safetensors");
    let out_path = dir.path().join("logits.safetensors");
    peft_ok!(
        "logits",
        "--model",
        model("bloom-tiny"),
        "--adapter",
        adapter("ptuning-bloom-lstm"),
        "--inputs",
        reference,
        "--output",
        out_path,
    );
    // 4 virtual positions first, then PEFT's logits on every real position.
    let worst = logits_diff_virtual(&out_path, &reference, 4);
    assert!(worst <= 1e-4, "max |Δ| = {worst}");
    let run = dir.path().join("run");
    peft_ok!(
        "train",
        "--method",
        "ptuning",
        "--num-virtual-tokens",
        "3",
        "--output",
        run,
        "--max-steps",
        "2",
        "--no-exact-match",
    );
    assert!(run.join("adapter/adapter_encoder.safetensors").is_file());
}

/// Asserts that a command succeeded, showing its stderr otherwise.
fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn logits_to(model_dir: &Path, extra: &[&str], reference: &Path, out_path: &Path) -> Output {
    let mut args = vec![
        "logits",
        "--model",
        model_dir.to_str().unwrap(),
        "--inputs",
        reference.to_str().unwrap(),
        "--output",
        out_path.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    peft(&args)
}

/// `peft quantize --model` writes the checkpoint transformers writes for load_in_4bit (byte for
/// byte in every 4-bit tensor), and `peft logits` runs it — or quantises on the fly with
/// --load-4bit — with transformers' 4-bit logits.
#[test]
fn quantize_model_and_run_4bit() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("nf4");
    ok(&peft!(
        "quantize",
        "--model",
        model("bloom-tiny"),
        "--output",
        out_dir,
        "--quant-type",
        "nf4",
        "--double-quant",
    ));
    let ours = TensorStore::open(out_dir.join("model.safetensors")).unwrap();
    let theirs = TensorStore::open(model("bloom-tiny-nf4").join("model.safetensors")).unwrap();
    let mut keys: Vec<&str> = theirs.keys().collect();
    keys.sort();
    assert_eq!(keys.len(), ours.keys().count());
    for key in keys {
        assert_eq!(
            ours.get(key).unwrap().data,
            theirs.get(key).unwrap().data,
            "{key}"
        );
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["quantization_config"]["bnb_4bit_quant_type"], "nf4");
    assert_eq!(
        config["quantization_config"]["bnb_4bit_use_double_quant"],
        true
    );

    let reference = fixtures().join("reference/bloom-tiny-nf4.safetensors");
    for (model_dir, extra) in [
        (out_dir.clone(), vec![]),
        (
            model("bloom-tiny"),
            vec!["--load-4bit", "nf4", "--double-quant"],
        ),
    ] {
        let path = dir.path().join("logits.safetensors");
        ok(&logits_to(&model_dir, &extra, &reference, &path));
        let diff = logits_diff(&path, &reference);
        assert!(diff < 1e-4, "{}: {diff}", model_dir.display());
    }
}

/// `peft quantize --input` converts the selected tensors of a file and copies the rest; bad
/// settings fail with one line.
#[test]
fn quantize_file_selects_tensors_and_rejects_bad_settings() {
    let dir = tempfile::tempdir().unwrap();
    let input = model("bloom-tiny").join("model.safetensors");
    let output = dir.path().join("q.safetensors");
    ok(&peft!(
        "quantize",
        "--input",
        input,
        "--output",
        output,
        "--quant-type",
        "fp4",
        "--tensors",
        r"transformer\.h\.0\..*\.weight",
    ));
    let q = TensorStore::open(&output).unwrap();
    let key = "transformer.h.0.self_attention.query_key_value.weight";
    assert_eq!(q.dtype(key).unwrap(), safetensors::Dtype::U8);
    assert_eq!(q.shape(key).unwrap(), &[192 * 64 / 2, 1]);
    assert!(q.contains(&format!("{key}.quant_state.bitsandbytes__fp4")));
    // LayerNorm weights are 1-D: copied; layer 1 is not selected.
    assert_eq!(
        q.dtype("transformer.h.0.input_layernorm.weight").unwrap(),
        safetensors::Dtype::F32
    );
    assert_eq!(
        q.dtype("transformer.h.1.self_attention.query_key_value.weight")
            .unwrap(),
        safetensors::Dtype::F32
    );

    let input = input.to_str().unwrap();
    let out = output.to_str().unwrap();
    for (args, needle) in [
        (vec!["--blocksize", "48"], "invalid blocksize 48"),
        (vec!["--quant-type", "int4"], "unknown quant_type `int4`"),
        (
            vec!["--tensors", "nothing.*"],
            "--tensors matched no 2-D float tensor",
        ),
        (vec!["--tensors", "(["], "--tensors `([`: invalid regex"),
    ] {
        let mut all = vec!["quantize", "--input", input, "--output", out];
        all.extend(args);
        assert_clean_failure(&peft(&all), needle);
    }
}

/// `peft train --method qlora` trains LoRA over a 4-bit base; the adapter is a standard PEFT
/// LoRA folder that runs over the same 4-bit base; the merged model is dense.
#[test]
fn qlora_trains_and_merges_dense() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("qlora");
    ok(&train_qlora_briefly(&out_dir, &[]));
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 8);
    assert_eq!(config["lora_alpha"], 16.0);
    let merged: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("merged/config.json")).unwrap())
            .unwrap();
    assert!(merged.get("quantization_config").is_none());

    let reference = fixtures().join("reference/bloom-tiny.safetensors");
    let adapted = dir.path().join("adapted.safetensors");
    ok(&logits_to(
        &model("bloom-tiny"),
        &[
            "--load-4bit",
            "nf4",
            "--double-quant",
            "--adapter",
            out_dir.join("adapter").to_str().unwrap(),
        ],
        &reference,
        &adapted,
    ));
    let merged_logits = dir.path().join("merged.safetensors");
    ok(&logits_to(
        &out_dir.join("merged"),
        &[],
        &reference,
        &merged_logits,
    ));
    let a = TensorStore::open(&adapted)
        .unwrap()
        .f32("logits")
        .unwrap()
        .0;
    let b = TensorStore::open(&merged_logits)
        .unwrap()
        .f32("logits")
        .unwrap()
        .0;
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(
        worst < 1e-4,
        "merged vs adapter over the 4-bit base: {worst}"
    );
}

/// `--compute-dtype bfloat16` runs the linear layers in bf16 — bitsandbytes' 4-bit logits with
/// `bnb_4bit_compute_dtype=torch.bfloat16` — and trains, by default for the QLoRA preset; a bad
/// dtype fails with one line.
#[test]
fn bf16_compute_runs_and_trains() {
    let dir = tempfile::tempdir().unwrap();
    let reference = fixtures().join("reference/bloom-tiny-nf4-bf16.safetensors");
    let path = dir.path().join("logits.safetensors");
    ok(&logits_to(
        &model("bloom-tiny-nf4"),
        &["--compute-dtype", "bfloat16"],
        &reference,
        &path,
    ));
    let diff = logits_diff(&path, &reference);
    assert!(diff < 1e-4, "bf16 logits: {diff}");

    // The QLoRA preset computes in bf16 unless told otherwise (the paper's and the seed's
    // setting): its default run trains exactly the adapter of an explicit bf16 run, and one
    // with `--compute-dtype float32` another.
    let mut adapters = Vec::new();
    for (name, extra) in [
        ("bf16", &["--compute-dtype", "bf16"][..]),
        ("default", &[][..]),
        ("f32", &["--compute-dtype", "float32"][..]),
    ] {
        let out_dir = dir.path().join(name);
        let out = train_qlora_briefly(&out_dir, extra);
        ok(&out);
        let says_bf16 =
            String::from_utf8_lossy(&out.stderr).contains("linear layers compute in bfloat16");
        assert_eq!(says_bf16, name != "f32", "{name}");
        adapters.push(std::fs::read(out_dir.join("adapter/adapter_model.safetensors")).unwrap());
    }
    assert_eq!(adapters[0], adapters[1], "default vs explicit bf16");
    assert_ne!(adapters[0], adapters[2], "bf16 vs f32 compute");

    assert_clean_failure(
        &logits_to(
            &model("bloom-tiny"),
            &["--compute-dtype", "fp8"],
            &reference,
            &path,
        ),
        "unknown compute dtype `fp8` (expected float32 or bfloat16)",
    );
}

/// `--bf16-lm-head` computes `lm_head` in bf16 too: PyTorch's logits with the head patched
/// (the tied BLOOM head); with `--compute-dtype float32` it is refused in one line.
#[test]
fn bf16_lm_head_flag() {
    let dir = tempfile::tempdir().unwrap();
    let reference = fixtures().join("reference/lora-bloom-bf16-head.safetensors");
    let path = dir.path().join("logits.safetensors");
    let lora = adapter("lora-bloom");
    let lora = lora.to_str().unwrap();
    let head = [
        "--adapter",
        lora,
        "--compute-dtype",
        "bfloat16",
        "--bf16-lm-head",
    ];
    ok(&logits_to(&model("bloom-tiny"), &head, &reference, &path));
    let diff = logits_diff(&path, &reference);
    // One bf16 step of a logit in [1, 2) (docs/PRECISION.md); the f32 head is 2.8e-2 away.
    assert!(diff <= 1e-2, "bf16 lm_head logits: {diff}");
    for f32_name in ["float32", "fp32"] {
        assert_clean_failure(
            &logits_to(
                &model("bloom-tiny"),
                &["--compute-dtype", f32_name, "--bf16-lm-head"],
                &reference,
                &path,
            ),
            "--bf16-lm-head computes lm_head in bf16: it needs bf16 compute, not --compute-dtype float32",
        );
    }
}

/// Whether this CPU multiplies bf16 in hardware (where CI requires oneDNN to load).
fn has_bf16_units() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// bf16 products say which path they take under `PEFT_LOG=info` — oneDNN's bf16 kernels, or f32
/// GEMMs where oneDNN is absent or `PEFT_ONEDNN=off` — and both give bitsandbytes' bf16 logits.
#[test]
fn bf16_products_name_their_path_and_agree() {
    let dir = tempfile::tempdir().unwrap();
    let reference = fixtures().join("reference/bloom-tiny-nf4-bf16.safetensors");
    let through = "bf16 products through libdnnl.so.2 (oneDNN 2.";
    let as_f32 = "bf16 products as f32 GEMMs of bf16 values";
    for onednn in ["default", "off"] {
        let out_path = dir.path().join(format!("logits-{onednn}.safetensors"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_peft"));
        command
            .args(["logits", "--model"])
            .arg(model("bloom-tiny-nf4"))
            .arg("--inputs")
            .arg(&reference)
            .arg("--output")
            .arg(&out_path)
            .args(["--compute-dtype", "bfloat16"])
            .env_remove("PEFT_DEVICE")
            .env("PEFT_LOG", "info");
        if onednn == "off" {
            command.env("PEFT_ONEDNN", "off");
        }
        let out = command.output().unwrap();
        ok(&out);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let (said_through, said_f32) = (stderr.contains(through), stderr.contains(as_f32));
        assert!(said_through != said_f32, "one line, one path: {stderr}");
        if onednn == "off" {
            assert!(said_f32, "{stderr}");
        } else if std::env::var("PEFT_REQUIRE_ONEDNN").as_deref() == Ok("1") && has_bf16_units() {
            assert!(said_through, "{stderr}");
        }
        let diff = logits_diff(&out_path, &reference);
        assert!(diff < 1e-4, "{onednn}: bf16 logits {diff}");
    }
}

/// `--gradient-checkpointing` recomputes activations in the backward pass: the trained adapter
/// is the same, bit for bit (LoRA over a 4-bit base, so the packed product is recomputed too).
#[test]
fn gradient_checkpointing_trains_the_same_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let mut adapters = Vec::new();
    for (name, extra) in [
        ("plain", &[][..]),
        ("gc", &["--gradient-checkpointing"][..]),
    ] {
        let out_dir = dir.path().join(name);
        ok(&train_qlora_briefly(&out_dir, extra));
        adapters.push(std::fs::read(out_dir.join("adapter/adapter_model.safetensors")).unwrap());
    }
    assert_eq!(adapters[0], adapters[1]);
}

/// `peft train --method qlora` on bloom-tiny and the demo data, 3 steps of r = 8, into `out_dir`,
/// with `extra` flags.
fn train_qlora_briefly(out_dir: &Path, extra: &[&str]) -> Output {
    let model_dir = model("bloom-tiny");
    let data = fixtures().join("../../data/demo.jsonl");
    let mut args = vec![
        "train",
        "--method",
        "qlora",
        "--model",
        model_dir.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        out_dir.to_str().unwrap(),
        "--r",
        "8",
        "--max-steps",
        "3",
        "--no-exact-match",
    ];
    args.extend_from_slice(extra);
    peft(&args)
}

/// `--model owner/name[@revision]` is found in a Hugging Face cache folder (`HF_HUB_CACHE`)
/// with no network: the snapshot's model generates what the folder does; a repo or revision that
/// is not there is one clear error naming the cache.
#[test]
fn model_by_repo_id_from_the_local_hub_cache() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--tiny-org--qwen3-tiny");
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    for entry in std::fs::read_dir(model("qwen3-tiny")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), snapshot.join(entry.file_name())).unwrap();
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    let run = |model_arg: &str| {
        Command::new(env!("CARGO_BIN_EXE_peft"))
            .args([
                "generate",
                "--model",
                model_arg,
                "--prompt-ids",
                "5,6,7",
                "--max-new-tokens",
                "4",
                "--json",
            ])
            .env_remove("PEFT_DEVICE")
            .env("HF_HUB_CACHE", cache.path())
            .output()
            .unwrap()
    };
    let by_id = run("tiny-org/qwen3-tiny");
    ok(&by_id);
    let by_folder = run(model("qwen3-tiny").to_str().unwrap());
    let ids = |out: &Output| {
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json["new_ids"].clone()
    };
    assert_eq!(ids(&by_id), ids(&by_folder));
    assert_eq!(ids(&by_id).as_array().unwrap().len(), 4);

    let missing = run("tiny-org/absent");
    let cache_name = cache.path().display().to_string();
    assert_clean_failure(&missing, &cache_name);
    assert_clean_failure(&missing, "hf download tiny-org/absent");
    assert_clean_failure(&run("tiny-org/qwen3-tiny@v9"), "revision `v9`");
}

/// `generate --chat` on a model without a chat template sends the prompt in the seed tutorial's
/// format: the same ids as typing that format by hand.
#[test]
fn generate_chat_formats_the_prompt() {
    let bloom = model("bloom-tiny");
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            bloom.to_str().unwrap(),
            "--max-new-tokens",
            "3",
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = peft(&args);
        ok(&out);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let chat = generate(&["--chat", "--prompt", "你好"]);
    let by_hand = generate(&["--prompt", "Human: 你好\n\nAssistant: "]);
    assert_eq!(chat["prompt_ids"], by_hand["prompt_ids"]);
    assert_eq!(chat["new_ids"], by_hand["new_ids"]);
    let plain = generate(&["--prompt", "你好"]);
    assert_ne!(chat["prompt_ids"], plain["prompt_ids"]);
}

/// `peft merge` beyond LoRA: IA3 (PEFT's logits from the merged checkpoint), a 4-bit base
/// (QLoRA: written dense, without `quantization_config`, with PEFT's logits), a trained BitFit
/// folder (the merged checkpoint computes what the adapter computes), and the prompt-learning
/// refusal.
#[test]
fn merge_command_covers_every_mergeable_method() {
    let dir = tempfile::tempdir().unwrap();
    let merge = |base: &Path, adapter_dir: &Path, out: &Path| {
        peft!(
            "merge",
            "--model",
            base,
            "--adapter",
            adapter_dir,
            "--output",
            out,
        )
    };
    let logits_of = |model_dir: &Path, extra: &[&str], reference: &Path, name: &str| {
        let out_path = dir.path().join(format!("{name}.safetensors"));
        ok(&logits_to(model_dir, extra, reference, &out_path));
        out_path
    };
    for (base, name) in [
        ("bloom-tiny", "ia3-bloom"),
        ("bloom-tiny-nf4", "qlora-bloom"),
    ] {
        let merged = dir.path().join(format!("{name}-merged"));
        ok(&merge(&model(base), &adapter(name), &merged));
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap())
                .unwrap();
        assert!(config.get("quantization_config").is_none(), "{name}");
        let reference = fixtures().join(format!("reference/{name}.safetensors"));
        let out = logits_of(&merged, &[], &reference, name);
        let diff = logits_diff(&out, &reference);
        assert!(diff <= 1e-4, "{name}: merged checkpoint max |Δ| = {diff}");
    }

    let bitfit = dir.path().join("bitfit");
    ok(&peft!(
        "train",
        "--method",
        "bitfit",
        "--model",
        model("bloom-tiny"),
        "--data",
        fixtures().join("../../data/demo.jsonl"),
        "--output",
        bitfit,
        "--max-steps",
        "2",
        "--no-exact-match",
    ));
    let merged = dir.path().join("bitfit-merged");
    ok(&merge(
        &model("bloom-tiny"),
        &bitfit.join("adapter"),
        &merged,
    ));
    let reference = fixtures().join("reference/bloom-tiny.safetensors");
    let with_adapter = logits_of(
        &model("bloom-tiny"),
        &["--adapter", bitfit.join("adapter").to_str().unwrap()],
        &reference,
        "bitfit-adapter",
    );
    let from_merged = logits_of(&merged, &[], &reference, "bitfit-merged");
    // Every position (the batch's padded ones are finite either way).
    let values = |p: &Path| TensorStore::open(p).unwrap().f32("logits").unwrap().0;
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let merged_values = values(&from_merged);
    let diff = max_diff(&merged_values, &values(&with_adapter));
    assert!(diff <= 1e-5, "bitfit: merged vs adapter max |Δ| = {diff}");
    assert!(
        logits_diff(&from_merged, &reference) > 1e-3,
        "two BitFit steps should move the logits"
    );

    let refused = merge(
        &model("bloom-tiny"),
        &adapter("prompt-bloom-random"),
        &dir.path().join("prompt-merged"),
    );
    assert_clean_failure(&refused, "no weights to merge");
    assert!(
        !dir.path().join("prompt-merged").exists(),
        "nothing half-written"
    );
}

/// `--adapter NAME=DIR` repeated with `--adapter-names`: one mixed-adapter batch with PEFT's
/// logits (`adapter_names=[default, b, __base__]`); bad names fail cleanly.
#[test]
fn logits_with_adapters_per_row_match_peft() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("logits.safetensors");
    let reference = fixtures().join("reference/multi-llama.safetensors");
    let multi = adapter("multi-llama");
    let b = format!("b={}", multi.join("b").display());
    let run = |names: &str| {
        peft!(
            "logits",
            "--model",
            model("llama-tiny"),
            "--adapter",
            multi,
            "--adapter",
            &b,
            "--adapter-names",
            names,
            "--inputs",
            reference,
            "--output",
            out_path,
        )
    };
    ok(&run("default,b,__base__"));
    let diff = logits_diff_at(&out_path, &reference, "logits.mixed", 0);
    assert!(diff <= 1e-4, "mixed batch: max |Δ| = {diff}");
    assert_clean_failure(&run("default,c,__base__"), "no adapter named `c`");
    assert_clean_failure(&run("default,b"), "2 names for the 3 rows");
    let out = peft!(
        "logits",
        "--model",
        model("bloom-tiny"),
        "--adapter",
        adapter("ia3-bloom"),
        "--adapter-names",
        "default",
        "--inputs",
        reference,
        "--output",
        out_path,
    );
    assert_clean_failure(&out, "LoRA only");
}

/// `peft generate --adapter-names a,b,__base__`: each row generates what that adapter (or the
/// base) generates alone.
#[test]
fn generate_with_adapter_names_runs_each_row_as_alone() {
    let multi = adapter("multi-bloom");
    let prompt = "43,72,79,79,82";
    let base_dir = model("bloom-tiny");
    let generate = |extra: &[&str]| -> Vec<serde_json::Value> {
        let mut args = vec![
            "generate",
            "--model",
            base_dir.to_str().unwrap(),
            "--prompt-ids",
            prompt,
            "--max-new-tokens",
            "6",
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = peft(&args);
        ok(&out);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let b = format!("b={}", multi.join("b").display());
    let rows = generate(&[
        "--adapter",
        multi.to_str().unwrap(),
        "--adapter",
        &b,
        "--adapter-names",
        "b,__base__,default",
    ]);
    assert_eq!(rows.len(), 3);
    let alone_b = generate(&["--adapter", multi.join("b").to_str().unwrap()]);
    let alone_default = generate(&["--adapter", multi.to_str().unwrap()]);
    let base = generate(&[]);
    for (row, (name, alone)) in rows.iter().zip([
        ("b", &alone_b),
        ("__base__", &base),
        ("default", &alone_default),
    ]) {
        assert_eq!(row["adapter"], name);
        assert_eq!(row["new_ids"], alone[0]["new_ids"], "row {name}");
    }
    // The three rows really differ, so a row routed to the wrong adapter would fail.
    assert_ne!(alone_b[0]["new_ids"], base[0]["new_ids"]);
    assert_ne!(alone_default[0]["new_ids"], base[0]["new_ids"]);
    assert_ne!(alone_default[0]["new_ids"], alone_b[0]["new_ids"]);
}

/// `peft combine` writes PEFT's `add_weighted_adapter` result as an adapter folder (TIES,
/// density 0.5: exact) that `peft logits` runs with PEFT's logits.
#[test]
fn combine_writes_pefts_weighted_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let multi = adapter("multi-bloom");
    let output = dir.path().join("ties");
    let default = format!("default={}", multi.display());
    let b = format!("b={}", multi.join("b").display());
    peft_ok!(
        "combine",
        "--model",
        model("bloom-tiny"),
        "--adapter",
        &default,
        "--adapter",
        &b,
        "--weights",
        "0.7,-0.4",
        "--combination-type",
        "ties",
        "--density",
        "0.5",
        "--output",
        output,
    );
    let reference = fixtures().join("reference/multi-bloom.safetensors");
    let theirs = TensorStore::open(&reference).unwrap();
    let ours = TensorStore::open(output.join("adapter_model.safetensors")).unwrap();
    let expected: Vec<&str> = theirs
        .keys()
        .filter_map(|k| k.strip_prefix("ties."))
        .filter(|k| *k != "logits")
        .collect();
    assert_eq!(ours.keys().count(), expected.len());
    for key in expected {
        let (a, _) = ours.f32(key).unwrap();
        let (b, _) = theirs.f32(&format!("ties.{key}")).unwrap();
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-6, "{key}: {worst}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(output.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (config["r"].as_u64(), config["lora_alpha"].as_f64()),
        (Some(4), Some(4.0))
    );

    let logits_path = dir.path().join("logits.safetensors");
    ok(&peft!(
        "logits",
        "--model",
        model("bloom-tiny"),
        "--adapter",
        output,
        "--inputs",
        reference,
        "--output",
        logits_path,
    ));
    let diff = logits_diff_at(&logits_path, &reference, "ties.logits", 0);
    assert!(diff <= 1e-4, "combined adapter logits: {diff}");

    let bad = peft!(
        "combine",
        "--model",
        model("bloom-tiny"),
        "--adapter",
        &default,
        "--adapter",
        &b,
        "--weights",
        "0.7,-0.4",
        "--combination-type",
        "average",
        "--output",
        output,
    );
    assert_clean_failure(&bad, "`average` is not one of linear, cat, svd");
}

/// Without the `mpi` feature, asking for (or being launched into) an MPI job is one clear line
/// saying how to get it, before anything loads; an unknown transport is named.
#[test]
fn distributed_training_needs_the_mpi_build() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("run");
    let out = peft!("train", "--distributed", "tcp", "--output", out_dir,);
    assert_clean_failure(&out, "--distributed: unknown `tcp` (none, mpi)");
    if cfg!(feature = "mpi") {
        return;
    }
    let out = peft!("train", "--distributed", "mpi", "--output", out_dir,);
    assert_clean_failure(&out, "--features mpi");
    let out = Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(["train", "--output", out_dir.to_str().unwrap()])
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .env_remove("PEFT_DEVICE")
        .output()
        .unwrap();
    assert_clean_failure(&out, "one of 2 ranks started by mpirun");
    assert!(
        !out_dir.join("bundled").exists(),
        "nothing is written first"
    );
}

/// `--devices cpu,cpu`: burn's multi-device data parallelism in one process (one thread and one
/// model copy per device) trains, byte for byte, the adapter one device trains with the same
/// global batch (2 devices × batch 2 = batch 2 × 2 accumulation steps) — with dropout on (LoRA
/// at 0.1, QLoRA's preset at 0.05), whose masks each rank draws from its own generator seeded by
/// (seed, global micro-batch); bad lists are one line.
#[test]
fn devices_in_one_process_equal_one_device_with_accumulation() {
    let dir = tempfile::tempdir().unwrap();
    let data = fixtures().join("../../data/demo.jsonl");
    let model_dir = model("bloom-tiny");
    let run = |name: &str, extra: &[&str]| {
        let out_dir = dir.path().join(name);
        let mut args = vec![
            "train",
            "--model",
            model_dir.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output",
            out_dir.to_str().unwrap(),
            "--max-steps",
            "3",
            "--batch-size",
            "2",
            "--no-exact-match",
            "--no-merged",
        ];
        args.extend_from_slice(extra);
        let out = peft(&args);
        (out, out_dir)
    };
    let adapter_bytes = |dir: &Path| std::fs::read(dir.join("adapter/adapter_model.safetensors"));
    for method in [&["--lora-dropout", "0.1"][..], &["--method", "qlora"]] {
        let (out, one) = run("one", &[&["--grad-accum", "2"], method].concat());
        ok(&out);
        let (out, two) = run("two", &[&["--devices", "cpu,cpu"], method].concat());
        ok(&out);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("data parallel: 2 ranks × batch 2"),
            "{stderr}"
        );
        assert!(
            adapter_bytes(&one).unwrap() == adapter_bytes(&two).unwrap(),
            "{method:?}: two devices trained another adapter than one with accumulation"
        );
        std::fs::remove_dir_all(one).unwrap();
        std::fs::remove_dir_all(two).unwrap();
    }
    let (out, _) = run("bad", &["--devices", "cpu,tpu"]);
    assert_clean_failure(&out, "unknown device `tpu`");
    let (out, _) = run("both", &["--devices", "cpu,cpu", "--distributed", "mpi"]);
    assert_clean_failure(&out, "under MPI each rank takes one device");
}

/// `--compute-dtype auto` (what `generate` and `serve` do by default, as transformers'
/// `dtype="auto"`): a bf16 checkpoint computes in bf16 where the CPU's bf16 units run oneDNN,
/// else in f32; an f32 checkpoint always in f32. Checked on logits, where the two differ.
#[test]
fn auto_compute_dtype_follows_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let bf16_model = dir.path().join("bf16");
    ok(&peft!(
        "merge",
        "--model",
        model("bloom-tiny"),
        "--adapter",
        adapter("lora-bloom"),
        "--output",
        bf16_model,
        "--save-dtype",
        "bfloat16",
    ));
    let reference = fixtures().join("reference/bloom-tiny.safetensors");
    let logits_with = |model_dir: &Path, dtype: &str| {
        let out_path = dir.path().join(format!(
            "{}-{dtype}.safetensors",
            model_dir.file_name().unwrap().to_string_lossy()
        ));
        ok(&logits_to(
            model_dir,
            &["--compute-dtype", dtype],
            &reference,
            &out_path,
        ));
        TensorStore::open(&out_path)
            .unwrap()
            .f32("logits")
            .unwrap()
            .0
    };
    let (auto, bf16, f32) = (
        logits_with(&bf16_model, "auto"),
        logits_with(&bf16_model, "bfloat16"),
        logits_with(&bf16_model, "float32"),
    );
    assert_ne!(bf16, f32, "bf16 and f32 compute differ on this checkpoint");
    let onednn_bf16 = has_bf16_units() && std::env::var("PEFT_ONEDNN").as_deref() != Ok("off");
    if onednn_bf16 && std::env::var("PEFT_REQUIRE_ONEDNN").as_deref() == Ok("1") {
        assert_eq!(
            auto, bf16,
            "a bf16 checkpoint on bf16 units computes in bf16"
        );
    } else {
        assert!(auto == bf16 || auto == f32);
    }
    let f32_model = model("bloom-tiny");
    assert_eq!(
        logits_with(&f32_model, "auto"),
        logits_with(&f32_model, "float32"),
        "an f32 checkpoint computes in f32"
    );
}

/// A resume continues the run its checkpoint belongs to, or is refused naming the difference:
/// another rank, target modules or method (the adapter config in `trainer_state.json`), another
/// base model (its config.json's hash); changed data warns and goes on. A checkpoint without the
/// recorded config (older) is still refused by its shapes instead of training a fresh adapter
/// under the checkpoint's step.
#[test]
fn resume_refuses_a_checkpoint_of_another_run() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    std::fs::create_dir(&model_dir).unwrap();
    for entry in std::fs::read_dir(model("bloom-tiny")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model_dir.join(entry.file_name())).unwrap();
    }
    let data = dir.path().join("data.jsonl");
    std::fs::copy(fixtures().join("../../data/demo.jsonl"), &data).unwrap();
    let out_dir = dir.path().join("run");
    let common = [
        "train",
        "--model",
        model_dir.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        out_dir.to_str().unwrap(),
        "--save-steps",
        "2",
        "--no-exact-match",
        "--no-merged",
    ];
    ok(&peft(
        &[&common[..], &["--r", "8", "--max-steps", "2"]].concat(),
    ));
    let resume = |extra: &[&str]| {
        let resumed = [&["--max-steps", "4", "--resume", "latest"], extra].concat();
        peft(&[&common[..], &resumed[..]].concat())
    };
    let refused = |out: &Output, needles: &[&str]| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        let last = stderr.trim_end().lines().last().unwrap_or_default();
        assert!(last.starts_with("error: "), "{stderr}");
        for needle in needles {
            assert!(last.contains(needle), "`{needle}` not in: {last}");
        }
    };
    refused(
        &resume(&["--r", "16"]),
        &["`r` is 8 in the checkpoint but 16 in this run"],
    );
    refused(
        &resume(&["--r", "8", "--target-modules", "dense"]),
        &["`target_modules` is", "in the checkpoint but [\"dense\"]"],
    );
    refused(
        &resume(&["--method", "ia3"]),
        &["`peft_type` is \"LORA\" in the checkpoint but \"IA3\""],
    );

    // The same model with an edited config.json is another base model.
    let config_path = model_dir.join("config.json");
    let config = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(&config_path, format!("{config}\n")).unwrap();
    refused(
        &resume(&["--r", "8"]),
        &["another base model (config.json hash"],
    );
    std::fs::write(&config_path, &config).unwrap();

    // Changed data: a warning, and the run goes on.
    let mut text = std::fs::read_to_string(&data).unwrap();
    text.push_str("{\"instruction\": \"Say hi\", \"output\": \"Hi.\"}\n");
    std::fs::write(&data, text).unwrap();
    let out = resume(&["--r", "8"]);
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the training data changed since the checkpoint"),
        "{stderr}"
    );

    // A checkpoint written before the config was recorded: the shapes refuse it.
    let state_path = out_dir.join("checkpoint-4/trainer_state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    state.as_object_mut().unwrap().remove("adapter");
    std::fs::write(&state_path, state.to_string()).unwrap();
    refused(
        &peft(
            &[
                &common[..],
                &["--r", "16", "--max-steps", "6", "--resume", "latest"],
            ]
            .concat(),
        ),
        &[
            "has shape [",
            "in the checkpoint but [",
            "another adapter configuration",
        ],
    );
}

/// `peft export-gguf`: a merged export equals `peft merge` (f32) exported; the adapter moved
/// the weights; `auto` follows the base's dtype; nothing but the file is left behind; what
/// cannot be written is one clear line.
#[test]
fn export_gguf_writes_models_merged_models_and_adapters() {
    use peft_gguf::{GgufFile, Value};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let base = model("llama-tiny");
    let lora = adapter("lora-llama");
    let merged_dir = dir.path().join("merged");
    peft_ok!(
        "merge",
        "--model",
        base,
        "--adapter",
        lora,
        "--output",
        merged_dir,
        "--save-dtype",
        "float32"
    );
    let (via_merge, direct, plain) = (out.join("a.gguf"), out.join("b.gguf"), out.join("c.gguf"));
    peft_ok!(
        "export-gguf",
        "--model",
        merged_dir,
        "--output",
        via_merge,
        "--outtype",
        "f32"
    );
    peft_ok!(
        "export-gguf",
        "--model",
        base,
        "--adapter",
        lora,
        "--merge",
        "--output",
        direct,
        "--outtype",
        "f32"
    );
    peft_ok!("export-gguf", "--model", base, "--output", plain);
    let (a, b, c) = (
        GgufFile::open(&via_merge).unwrap(),
        GgufFile::open(&direct).unwrap(),
        GgufFile::open(&plain).unwrap(),
    );
    assert_eq!(a.tensors.len(), 21);
    for t in &a.tensors {
        let other = b.tensor(&t.name).unwrap();
        assert_eq!(a.tensor_bytes(t), b.tensor_bytes(other), "{}", t.name);
    }
    let q_merged = b.tensor_f32("blk.0.attn_q.weight").unwrap();
    let q_base = c.tensor_f32("blk.0.attn_q.weight").unwrap();
    let moved = q_merged
        .iter()
        .zip(&q_base)
        .map(|(m, b)| (m - b).abs())
        .fold(0f32, f32::max);
    assert!(moved > 1e-3, "the adapter changed nothing: {moved}");
    // An f32 checkpoint's `auto` is bf16 (llama.cpp's converter's choice): file type 32.
    assert_eq!(c.get("general.file_type"), Some(&Value::U32(32)));
    assert_eq!(
        c.tensor("blk.0.attn_q.weight").unwrap().ggml_type,
        peft_gguf::GgmlType::Bf16
    );
    let adapter_file = out.join("lora.gguf");
    peft_ok!(
        "export-gguf",
        "--model",
        base,
        "--adapter",
        lora,
        "--output",
        adapter_file
    );
    let lora_gguf = GgufFile::open(&adapter_file).unwrap();
    assert_eq!(
        lora_gguf.get("adapter.type"),
        Some(&Value::String("lora".into()))
    );
    let mut left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["a.gguf", "b.gguf", "c.gguf", "lora.gguf"]);

    let bad = out.join("bad.gguf");
    assert_clean_failure(
        &peft!(
            "export-gguf",
            "--model",
            base,
            "--adapter",
            adapter("dora-llama"),
            "--output",
            bad
        ),
        "DoRA",
    );
    // llama-quantize's types are for models; an adapter is refused with the way out.
    assert_clean_failure(
        &peft!(
            "export-gguf",
            "--model",
            base,
            "--adapter",
            lora,
            "--output",
            bad,
            "--outtype",
            "q4_k_m"
        ),
        "--merge",
    );
    assert_clean_failure(
        &peft!(
            "export-gguf",
            "--model",
            base,
            "--output",
            bad,
            "--outtype",
            "q3_k_m"
        ),
        "q3_k_m",
    );
    let quantised = out.join("q4_k_m.gguf");
    peft_ok!(
        "export-gguf",
        "--model",
        base,
        "--output",
        quantised,
        "--outtype",
        "q4_k_m"
    );
    let file = GgufFile::open(&quantised).unwrap();
    assert_eq!(file.get("general.file_type"), Some(&Value::U32(15)));
    std::fs::remove_file(&quantised).unwrap();
    assert_clean_failure(
        &peft!(
            "export-gguf",
            "--model",
            base,
            "--output",
            out.join("x.bin")
        ),
        "must end in .gguf",
    );
    assert_clean_failure(
        &peft!(
            "export-gguf",
            "--model",
            model("gemma2-tiny"),
            "--output",
            bad
        ),
        "sentencepiece",
    );
    assert!(!bad.exists());
}

/// `--model FILE.gguf`: imported once into the cache, then any command runs on it as on the
/// folder it came from; a file that is not GGUF is one clear line.
#[test]
fn a_gguf_file_is_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let gguf = dir.path().join("llama.gguf");
    let base = model("llama-tiny");
    peft_ok!(
        "export-gguf",
        "--model",
        base,
        "--output",
        gguf,
        "--outtype",
        "f32"
    );
    let run = |model: &Path| {
        Command::new(env!("CARGO_BIN_EXE_peft"))
            .args([
                "generate",
                "--prompt",
                "Hello",
                "--max-new-tokens",
                "8",
                "--greedy",
                "--json",
            ])
            .arg("--model")
            .arg(model)
            .env("PEFT_GGUF_CACHE", &cache)
            .env_remove("PEFT_DEVICE")
            .output()
            .unwrap()
    };
    let from_folder = run(&base);
    let first = run(&gguf);
    let second = run(&gguf);
    ok(&from_folder);
    ok(&first);
    ok(&second);
    assert_eq!(first.stdout, from_folder.stdout);
    assert_eq!(second.stdout, from_folder.stdout);
    assert!(String::from_utf8_lossy(&first.stderr).contains("imported"));
    assert!(
        !String::from_utf8_lossy(&second.stderr).contains("imported"),
        "cache reused"
    );
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1);

    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"GGML and some bytes").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_peft"))
        .args([
            "logits",
            "--inputs",
            "x.safetensors",
            "--output",
            "y.safetensors",
            "--model",
        ])
        .arg(&bad)
        .env("PEFT_GGUF_CACHE", &cache)
        .output()
        .unwrap();
    assert_clean_failure(&out, "not a GGUF file");
}
