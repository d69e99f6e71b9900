//! The bad-input catalogue: one test per kind of malformed file a user can feed peft-rs. Each
//! asserts the error's kind and that its message names the file and the key or line at fault;
//! inputs PEFT tolerates (unknown config keys, extra tensors) are accepted.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use peft_core::PeftError;
use peft_models::AnyModel;
use peft_tests::{adapter_dir, model_dir};
use peft_train::DataError;
use tempfile::TempDir;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// A copy of fixture folder `from` (an adapter or a model), changed by `edit`.
fn edited(from: PathBuf, edit: impl FnOnce(&Path)) -> (TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(from.file_name().unwrap());
    copy_dir(&from, &dir);
    edit(&dir);
    (tmp, dir)
}

fn base() -> AnyModel<peft_core::NoAdapter> {
    peft_models::load(model_dir("bloom-tiny"), &Device::flex()).unwrap()
}

fn lora_with(edit: impl FnOnce(&Path)) -> (TempDir, Result<(), PeftError>) {
    let (tmp, dir) = edited(adapter_dir("lora-bloom"), edit);
    let result = peft_lora::from_pretrained(base(), &dir, false).map(|_| ());
    (tmp, result)
}

/// Rewrites the JSON file `path` through `edit`.
fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    edit_json(&dir.join("adapter_config.json"), edit);
}

#[track_caller]
fn assert_message(err: &impl std::fmt::Display, needles: &[&str]) {
    let message = err.to_string();
    for needle in needles {
        assert!(message.contains(needle), "`{needle}` not in: {message}");
    }
}

// ---- adapter_config.json ----------------------------------------------------------------

#[test]
fn adapter_config_not_json() {
    let (_t, r) = lora_with(|d| std::fs::write(d.join("adapter_config.json"), "{ r: 8").unwrap());
    let err = r.unwrap_err();
    assert!(matches!(err, PeftError::Json { .. }), "{err:?}");
    assert_message(&err, &["adapter_config.json", "invalid JSON", "line 1"]);
}

#[test]
fn adapter_config_wrong_type() {
    let (_t, r) = lora_with(|d| edit_config(d, |c| c["r"] = "eight".into()));
    let err = r.unwrap_err();
    assert!(matches!(err, PeftError::Json { .. }), "{err:?}");
    assert_message(&err, &["adapter_config.json", "invalid type", "\"eight\""]);
}

#[test]
fn adapter_config_unknown_peft_type() {
    let (_t, r) = lora_with(|d| edit_config(d, |c| c["peft_type"] = "DORA".into()));
    let err = r.unwrap_err();
    assert_message(&err, &["adapter_config.json", "DORA"]);
}

#[test]
fn adapter_config_unknown_keys_are_accepted() {
    let (_t, r) = lora_with(|d| edit_config(d, |c| c["a_future_option"] = 3.into()));
    r.unwrap();
}

#[test]
fn adapter_config_zero_rank() {
    let (_t, r) = lora_with(|d| edit_config(d, |c| c["r"] = 0.into()));
    let err = r.unwrap_err();
    assert!(matches!(err, PeftError::InvalidConfig { .. }), "{err:?}");
    assert_message(&err, &["adapter_config.json", "`r`"]);
}

#[test]
fn adapter_config_negative_dropout() {
    let (_t, r) = lora_with(|d| edit_config(d, |c| c["lora_dropout"] = (-0.1).into()));
    let err = r.unwrap_err();
    assert!(matches!(err, PeftError::InvalidConfig { .. }), "{err:?}");
    assert_message(&err, &["adapter_config.json", "`lora_dropout`"]);
}

#[test]
fn adapter_config_targets_nothing() {
    let (_t, r) =
        lora_with(|d| edit_config(d, |c| c["target_modules"] = serde_json::json!(["q_proj"])));
    let err = r.unwrap_err();
    assert!(
        matches!(err, PeftError::TargetModulesNotFound { .. }),
        "{err:?}"
    );
    // The message lists the model's own modules so the user can pick.
    assert_message(
        &err,
        &["q_proj", "transformer.h.0.self_attention.query_key_value"],
    );
}

#[test]
fn adapter_config_bad_regex() {
    let (_t, r) = lora_with(|d| edit_config(d, |c| c["target_modules"] = ".*(query".into()));
    let err = r.unwrap_err();
    assert!(matches!(err, PeftError::InvalidRegex { .. }), "{err:?}");
    assert_message(&err, &[".*(query", "target_modules"]);
}

#[test]
fn ia3_feedforward_not_a_subset() {
    let (_t, dir) = edited(adapter_dir("ia3-bloom"), |d| {
        edit_config(d, |c| {
            c["target_modules"] = serde_json::json!(["query_key_value"]);
            c["feedforward_modules"] = serde_json::json!(["dense_4h_to_h"]);
        })
    });
    let err = peft_ia3::from_pretrained(base(), &dir, false)
        .map(|_| ())
        .unwrap_err();
    assert_message(&err, &["feedforward_modules", "dense_4h_to_h"]);
}

// ---- adapter_model.safetensors / model.safetensors -----------------------------------------

const WEIGHTS: &str = "adapter_model.safetensors";

fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut Vec<u8>)) {
    let path = dir.join(WEIGHTS);
    let mut bytes = std::fs::read(&path).unwrap();
    edit(&mut bytes);
    std::fs::write(&path, bytes).unwrap();
}

fn header_len(bytes: &[u8]) -> usize {
    u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

/// Replaces the JSON header, padding with spaces to keep the data offsets valid.
fn set_header(bytes: &mut [u8], edit: impl FnOnce(&mut serde_json::Value)) {
    let n = header_len(bytes);
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut text = serde_json::to_vec(&header).unwrap();
    assert!(text.len() <= n, "edited header grew");
    text.resize(n, b' ');
    bytes[8..8 + n].copy_from_slice(&text);
}

fn assert_safetensors_error(r: Result<(), PeftError>, needles: &[&str]) {
    let err = r.unwrap_err();
    assert!(matches!(err, PeftError::Safetensors { .. }), "{err:?}");
    let mut all = vec![WEIGHTS];
    all.extend_from_slice(needles);
    assert_message(&err, &all);
}

#[test]
fn safetensors_truncated() {
    let (_t, r) = lora_with(|d| rewrite_weights(d, |b| b.truncate(b.len() - 100)));
    assert_safetensors_error(r, &[]);
}

#[test]
fn safetensors_header_longer_than_file() {
    let (_t, r) = lora_with(|d| {
        rewrite_weights(d, |b| {
            let huge = (b.len() as u64 * 4).to_le_bytes();
            b[..8].copy_from_slice(&huge);
        })
    });
    assert_safetensors_error(r, &[]);
}

#[test]
fn safetensors_header_not_json() {
    let (_t, r) = lora_with(|d| rewrite_weights(d, |b| b[8] = b'#'));
    assert_safetensors_error(r, &[]);
}

#[test]
fn safetensors_offsets_out_of_range() {
    let (_t, r) = lora_with(|d| {
        rewrite_weights(d, |b| {
            set_header(b, |h| {
                // The tensor that ends last now ends 4 bytes past the file.
                let (key, end) = h
                    .as_object()
                    .unwrap()
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), v["data_offsets"][1].as_u64()?)))
                    .max_by_key(|(_, end)| *end)
                    .unwrap();
                let start = h[&key]["data_offsets"][0].clone();
                h[&key]["data_offsets"] = serde_json::json!([start, end + 4]);
            })
        })
    });
    assert_safetensors_error(r, &[]);
}

#[test]
fn safetensors_overlapping_offsets() {
    let (_t, r) = lora_with(|d| {
        rewrite_weights(d, |b| {
            set_header(b, |h| {
                let keys: Vec<String> = h
                    .as_object()
                    .unwrap()
                    .keys()
                    .filter(|k| *k != "__metadata__")
                    .cloned()
                    .collect();
                let first = h[&keys[0]]["data_offsets"].clone();
                h[&keys[1]]["data_offsets"] = first;
            })
        })
    });
    assert_safetensors_error(r, &[]);
}

fn first_lora_a(header: &serde_json::Value) -> String {
    header
        .as_object()
        .unwrap()
        .keys()
        .find(|k| k.contains("lora_A"))
        .unwrap()
        .clone()
}

#[test]
fn safetensors_wrong_dtype() {
    let mut key = String::new();
    let (_t, r) = lora_with(|d| {
        rewrite_weights(d, |b| {
            set_header(b, |h| {
                key = first_lora_a(h);
                h[&key]["dtype"] = "I32".into();
            })
        })
    });
    let err = r.unwrap_err();
    assert!(matches!(err, PeftError::UnsupportedDtype { .. }), "{err:?}");
    assert_message(&err, &[WEIGHTS, &key]);
}

#[test]
fn safetensors_wrong_shape_for_the_model() {
    let mut key = String::new();
    let (_t, r) = lora_with(|d| {
        rewrite_weights(d, |b| {
            set_header(b, |h| {
                key = first_lora_a(h);
                let shape: Vec<u64> = serde_json::from_value(h[&key]["shape"].clone()).unwrap();
                h[&key]["shape"] = serde_json::json!([shape[1], shape[0]]);
            })
        })
    });
    let err = r.unwrap_err();
    assert!(matches!(err, PeftError::ShapeMismatch { .. }), "{err:?}");
    assert_message(&err, &[WEIGHTS, &key]);
}

#[test]
fn safetensors_missing_tensor() {
    let mut missing = String::new();
    let (_t, r) = lora_with(|d| {
        let store = peft_core::TensorStore::open(d.join(WEIGHTS)).unwrap();
        let mut tensors: std::collections::BTreeMap<String, peft_core::HostTensor> = store
            .keys()
            .map(|k| (k.to_string(), store.get(k).unwrap()))
            .collect();
        missing = tensors
            .keys()
            .find(|k| k.contains("lora_B"))
            .unwrap()
            .clone();
        tensors.remove(&missing);
        peft_tensors::save_safetensors(d.join(WEIGHTS), &tensors, None).unwrap();
    });
    let err = r.unwrap_err();
    assert!(matches!(err, PeftError::MissingTensor { .. }), "{err:?}");
    assert_message(&err, &[WEIGHTS, &missing]);
}

#[test]
fn safetensors_extra_tensor_is_accepted() {
    let (_t, r) = lora_with(|d| {
        let store = peft_core::TensorStore::open(d.join(WEIGHTS)).unwrap();
        let mut tensors: std::collections::BTreeMap<String, peft_core::HostTensor> = store
            .keys()
            .map(|k| (k.to_string(), store.get(k).unwrap()))
            .collect();
        tensors.insert(
            "base_model.model.something_else.weight".into(),
            peft_core::HostTensor::from_f32(vec![2], &[1.0, 2.0]),
        );
        peft_tensors::save_safetensors(d.join(WEIGHTS), &tensors, None).unwrap();
    });
    r.unwrap();
}

#[test]
fn four_bit_state_that_does_not_fit_its_tensor() {
    let (_t, dir) = edited(model_dir("bloom-tiny-nf4"), |d| {
        let path = d.join("model.safetensors");
        let store = peft_core::TensorStore::open(&path).unwrap();
        let mut tensors: std::collections::BTreeMap<String, peft_core::HostTensor> = store
            .keys()
            .map(|k| (k.to_string(), store.get(k).unwrap()))
            .collect();
        let key = "transformer.h.0.mlp.dense_h_to_4h.weight.quant_state.bitsandbytes__nf4";
        let text = String::from_utf8(tensors[key].data.clone()).unwrap();
        let bad = text.replace("[256, 64]", "[256, 128]");
        assert_ne!(bad, text);
        tensors.insert(
            key.into(),
            peft_core::HostTensor {
                dtype: safetensors::Dtype::U8,
                shape: vec![bad.len()],
                data: bad.into_bytes(),
            },
        );
        peft_tensors::save_safetensors(&path, &tensors, None).unwrap();
    });
    let err = peft_models::load(&dir, &Device::flex())
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, PeftError::Quantization(_)), "{err:?}");
    assert_message(
        &err,
        &[
            "model.safetensors",
            "dense_h_to_4h.weight",
            "packed weight has 8192 elements, expected 16384",
        ],
    );
}

// ---- config.json / tokenizer.json -------------------------------------------------------

fn model_with(edit: impl FnOnce(&Path)) -> (TempDir, Result<(), PeftError>) {
    let (tmp, dir) = edited(model_dir("bloom-tiny"), edit);
    let result = peft_models::load(&dir, &Device::flex()).map(|_| ());
    (tmp, result)
}

fn edit_model_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    edit_json(&dir.join("config.json"), edit);
}

#[test]
fn config_unsupported_model_type() {
    let (_t, r) = model_with(|d| edit_model_config(d, |c| c["model_type"] = "mamba".into()));
    let err = r.unwrap_err();
    assert!(matches!(err, PeftError::UnsupportedModel { .. }), "{err:?}");
    assert_message(&err, &["config.json", "mamba", "bloom"]);
}

#[test]
fn config_missing_required_field() {
    let (_t, r) = model_with(|d| {
        edit_model_config(d, |c| {
            c.as_object_mut().unwrap().remove("n_layer");
        })
    });
    let err = r.unwrap_err();
    assert_message(&err, &["config.json", "n_layer"]);
}

#[test]
fn config_heads_do_not_divide_hidden_size() {
    let (_t, r) = model_with(|d| edit_model_config(d, |c| c["n_head"] = 5.into()));
    let err = r.unwrap_err();
    assert!(matches!(err, PeftError::InvalidConfig { .. }), "{err:?}");
    assert_message(&err, &["config.json", "n_head"]);
}

#[test]
fn tokenizer_missing() {
    let (_t, dir) = edited(model_dir("bloom-tiny"), |d| {
        std::fs::remove_file(d.join("tokenizer.json")).unwrap()
    });
    let err = peft_models::Tokenizer::from_dir(&dir)
        .map(|_| ())
        .unwrap_err();
    assert_message(&err, &["tokenizer.json"]);
}

#[test]
fn tokenizer_invalid() {
    let (_t, dir) = edited(model_dir("bloom-tiny"), |d| {
        std::fs::write(d.join("tokenizer.json"), "{\"model\": 3}").unwrap()
    });
    let err = peft_models::Tokenizer::from_dir(&dir)
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, PeftError::Tokenizer { .. }), "{err:?}");
    assert_message(&err, &["tokenizer.json"]);
}

// ---- data files -------------------------------------------------------------------------

fn data_file(bytes: &[u8]) -> (TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("data.jsonl");
    std::fs::write(&path, bytes).unwrap();
    (tmp, path)
}

const GOOD: &str = r#"{"instruction": "你好", "input": "", "output": "你好！"}"#;

#[test]
fn data_invalid_json_line() {
    let (_t, path) = data_file(format!("{GOOD}\n{{\"instruction\": \n").as_bytes());
    let err = peft_train::read_examples(&path).unwrap_err();
    assert!(matches!(err, DataError::Json { line: 2, .. }), "{err:?}");
    assert_message(&err, &["data.jsonl:2"]);
}

#[test]
fn data_missing_fields() {
    let (_t, path) = data_file(format!("{GOOD}\n{GOOD}\n{{\"instruction\": \"x\"}}\n").as_bytes());
    let err = peft_train::read_examples(&path).unwrap_err();
    assert!(matches!(err, DataError::Record { line: 3, .. }), "{err:?}");
    assert_message(&err, &["data.jsonl:3"]);
}

#[test]
fn data_empty_file() {
    let (_t, path) = data_file(b"\n\n");
    let err = peft_train::read_examples(&path).unwrap_err();
    assert!(matches!(err, DataError::Empty { .. }), "{err:?}");
    assert_message(&err, &["data.jsonl", "no examples"]);
}

#[test]
fn data_not_utf8() {
    let mut bytes = format!("{GOOD}\n").into_bytes();
    bytes.extend_from_slice(b"{\"text\": \"\xff\xfe\"}\n");
    let (_t, path) = data_file(&bytes);
    let err = peft_train::read_examples(&path).unwrap_err();
    assert!(matches!(err, DataError::NotUtf8 { line: 2, .. }), "{err:?}");
    assert_message(&err, &["data.jsonl:2", "UTF-8"]);
}

#[test]
fn data_sample_longer_than_max_length_is_truncated() {
    let (_t, path) = data_file(format!("{GOOD}\n").as_bytes());
    let examples = peft_train::read_examples(&path).unwrap();
    let tokenizer = peft_models::Tokenizer::from_dir(model_dir("bloom-tiny")).unwrap();
    let (full, cut) = peft_train::data::tokenize(&examples[0], &tokenizer, Some(2), 512).unwrap();
    assert!(!cut);
    let limit = full.input_ids.len() - 2;
    let tokens = peft_train::tokenize_all(&path, &examples, &tokenizer, Some(2), limit).unwrap();
    assert_eq!(tokens[0].input_ids.len(), limit);
    assert_eq!(tokens[0].input_ids[..], full.input_ids[..limit]);
}

#[test]
fn data_with_nothing_to_learn() {
    let (_t, path) = data_file(format!("{GOOD}\n").as_bytes());
    let examples = peft_train::read_examples(&path).unwrap();
    let tokenizer = peft_models::Tokenizer::from_dir(model_dir("bloom-tiny")).unwrap();
    // max_length shorter than the prompt: every response token is cut away.
    let err = peft_train::tokenize_all(&path, &examples, &tokenizer, Some(2), 2).unwrap_err();
    assert!(matches!(err, DataError::NothingToLearn { .. }), "{err:?}");
    assert_message(&err, &["data.jsonl", "no trainable tokens"]);
}

// ---- training ---------------------------------------------------------------------------

fn lora_on_autodiff() -> peft_lora::LoraModel<AnyModel<peft_lora::LoraLinear>> {
    let base =
        peft_models::load(model_dir("bloom-tiny"), &peft_tests::device().autodiff()).unwrap();
    peft_lora::get_peft_model(base, peft_lora::LoraConfig::default()).unwrap()
}

#[test]
fn training_with_a_non_finite_loss_stops_at_the_last_good_checkpoint() {
    let data = peft_tests::chat_data("bloom-tiny");
    // An absurd learning rate drives the weights to infinity within a few steps.
    let config = peft_train::TrainConfig {
        learning_rate: 1e30,
        max_grad_norm: None,
        warmup_steps: 0,
        max_steps: Some(20),
        save_steps: Some(1),
        ..peft_train::TrainConfig::default()
    };
    let out = tempfile::tempdir().unwrap();
    let err = peft_train::train(
        lora_on_autodiff(),
        &data,
        3,
        &config,
        out.path(),
        peft_train::Resume::No,
        &mut |_| {},
    )
    .map(|_| ())
    .unwrap_err();
    let peft_train::TrainError::NonFiniteLoss {
        step,
        last_checkpoint,
        ..
    } = &err
    else {
        panic!("{err:?}");
    };
    let last = last_checkpoint
        .clone()
        .expect("a checkpoint before the bad step");
    assert_eq!(last, out.path().join(format!("checkpoint-{}", step - 1)));
    assert_message(
        &err,
        &[
            &format!("at step {step}"),
            "last good checkpoint",
            "checkpoint-",
        ],
    );
    // The last good checkpoint holds finite weights and loads.
    let store = peft_core::TensorStore::open(last.join("adapter_model.safetensors")).unwrap();
    for key in store.keys() {
        assert!(
            store.f32(key).unwrap().0.iter().all(|v| v.is_finite()),
            "{key}"
        );
    }
    peft_lora::from_pretrained(base(), &last, false).unwrap();
}

#[test]
fn training_into_an_unwritable_output_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "not a folder").unwrap();
    let output = file.join("out");
    let config = peft_train::TrainConfig {
        max_steps: Some(1),
        ..peft_train::TrainConfig::default()
    };
    let err = peft_train::train(
        lora_on_autodiff(),
        &peft_tests::chat_data("bloom-tiny"),
        3,
        &config,
        &output,
        peft_train::Resume::No,
        &mut |_| {},
    )
    .map(|_| ())
    .unwrap_err();
    assert_message(&err, &["a-file/out"]);
}
