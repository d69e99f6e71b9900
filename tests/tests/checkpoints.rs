//! Real-size checkpoint handling on small models: sharded bf16 checkpoints load with their
//! values, frozen 16-bit weights are held as stored with the same results, merged checkpoints are
//! written in the base's dtype and sharded with a correct index.

use std::collections::BTreeSet;
use std::path::Path;

use peft_core::{CausalLm, ModelInput, TensorStore};
use peft_lora::from_pretrained;
use peft_models::{LoadOptions, SaveOptions};
use peft_tensors::{PendingTensor, save_sharded};
use peft_tests::{Reference, adapter_dir, device, max_diff_masked, model_dir, to_vec};
use safetensors::Dtype;

fn logits<M: CausalLm>(model: &M, reference: &Reference) -> Vec<f32> {
    let device = model.device();
    to_vec(
        model
            .forward(
                ModelInput::with_mask(reference.ids(&device), reference.mask(&device)),
                None,
            )
            .unwrap(),
    )
}

/// Copies `config.json` and the tokenizer files of `from` into `to`.
fn copy_side_files(from: &Path, to: &Path) {
    std::fs::copy(from.join("config.json"), to.join("config.json")).unwrap();
    peft_models::save::copy_side_files(from, to).unwrap();
}

/// The shard files an index names, and the keys it maps.
fn index(dir: &Path) -> (BTreeSet<String>, BTreeSet<String>, serde_json::Value) {
    let text = std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let map = json["weight_map"].as_object().unwrap();
    let files = map
        .values()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let keys = map.keys().cloned().collect();
    (files, keys, json)
}

/// A bf16 checkpoint re-written as five-odd shards (each tensor's stored bytes, untouched) loads
/// with exactly the values of the single file: same bytes per key, bit-identical logits.
#[test]
fn sharded_bf16_checkpoint_keeps_its_values() {
    let name = "mistral-tiny-bf16";
    let source = TensorStore::open_model_dir(model_dir(name)).unwrap();
    let keys: Vec<String> = source.keys().map(str::to_string).collect();
    let pending: Vec<PendingTensor> = keys
        .iter()
        .map(|key| {
            let (bytes, dtype, shape) = source.raw(key).unwrap();
            let bytes = bytes.to_vec();
            PendingTensor {
                name: key.clone(),
                dtype,
                shape: shape.to_vec(),
                bytes: Box::new(move || Ok(bytes.clone())),
            }
        })
        .collect();
    let total: usize = pending
        .iter()
        .map(|t| t.shape.iter().product::<usize>() * 2)
        .sum();
    let dir = tempfile::tempdir().unwrap();
    let limit = (total / 5) as u64;
    let written = save_sharded(dir.path(), &pending, limit, None).unwrap();
    copy_side_files(&model_dir(name), dir.path());

    let (files, mapped, json) = index(dir.path());
    assert!(files.len() >= 5, "{files:?}");
    assert_eq!(written.len(), files.len() + 1, "shards + index");
    assert_eq!(mapped, keys.iter().cloned().collect());
    assert_eq!(json["metadata"]["total_size"], total as u64);
    for file in &files {
        let shard = TensorStore::open(dir.path().join(file)).unwrap();
        let bytes: u64 = shard
            .keys()
            .map(|k| shard.raw(k).unwrap().0.len() as u64)
            .sum();
        // A shard is closed before the tensor that would take it over the limit (a tensor
        // larger than the limit sits alone).
        assert!(
            bytes <= limit || shard.keys().count() == 1,
            "{file}: {bytes}"
        );
    }

    let sharded = TensorStore::open_model_dir(dir.path()).unwrap();
    for key in &keys {
        let (a, dtype, shape) = source.raw(key).unwrap();
        let (b, dtype_b, shape_b) = sharded.raw(key).unwrap();
        assert_eq!((dtype, shape), (dtype_b, shape_b), "{key}");
        assert!(a == b, "{key}: bytes differ");
    }
    let device = device();
    let reference = Reference::load(name);
    let single = peft_models::load(model_dir(name), &device).unwrap();
    let from_shards = peft_models::load(dir.path(), &device).unwrap();
    assert_eq!(
        logits(&single, &reference),
        logits(&from_shards, &reference)
    );
}

/// The frozen linear weights of a bf16 or f16 checkpoint are held in their stored 2 bytes: the
/// model holds half the bytes of the widened one and computes the same logits (the widening is
/// exact; only the order of summation inside the products may differ).
#[test]
fn half_checkpoints_are_held_as_stored_with_the_same_logits() {
    let device = device();
    for name in ["mistral-tiny-bf16", "qwen3-tiny-f16"] {
        let reference = Reference::load(name);
        let held = peft_models::load(model_dir(name), &device).unwrap();
        let widened = peft_models::load_with(
            model_dir(name),
            &device,
            &LoadOptions {
                widen_half: true,
                ..LoadOptions::default()
            },
        )
        .unwrap();
        let packed = peft_core::adapter_files::packed_weights(&held);
        let linear = held.modules().iter().filter(|m| m.is_linear()).count();
        let lm_head = usize::from(!held.spec().tie_word_embeddings);
        assert_eq!(
            packed.len(),
            linear - lm_head,
            "{name}: every frozen linear but lm_head"
        );
        for (path, weight) in &packed {
            let numel: usize = weight.shape().iter().product();
            assert_eq!(weight.storage_bytes(), 2 * numel, "{name}: {path}");
        }
        assert!(peft_core::adapter_files::packed_weights(&widened).is_empty());
        let a = logits(&held, &reference);
        let b = logits(&widened, &reference);
        let diff = max_diff_masked(&a, &b, &reference.attention_mask, reference.vocab);
        assert!(diff <= 1e-5, "{name}: held vs widened {diff}");
    }
}

/// A LoRA merged into a bf16 base is written in bf16 (the base's dtype, as transformers 5 +
/// PEFT write it), sharded past `max_shard_size`: untargeted weights are their stored bytes, the
/// merged ones the merged f32 values rounded once to bf16, `config.json` says `bfloat16`, and the
/// index maps every tensor. Asking for float32 writes the merged values unrounded.
#[test]
fn merged_checkpoint_is_written_in_the_base_dtype_and_sharded() {
    let device = device();
    let base_name = "mistral-tiny-bf16";
    let base = peft_models::load(model_dir(base_name), &device).unwrap();
    let merged = from_pretrained(base, adapter_dir("lora-mistral"), true)
        .unwrap()
        .merge_and_unload()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    let options = SaveOptions {
        max_shard_size: 40_000,
        ..SaveOptions::default()
    };
    peft_models::save_pretrained_with(&merged, model_dir(base_name), &out, &options).unwrap();

    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dtype"], "bfloat16");
    let (files, mapped, _) = index(&out);
    assert!(files.len() >= 2, "{files:?}");
    let saved = TensorStore::open_model_dir(&out).unwrap();
    let source = TensorStore::open_model_dir(model_dir(base_name)).unwrap();
    assert_eq!(mapped, source.keys().map(str::to_string).collect());
    let in_memory: std::collections::HashMap<_, _> = peft_core::params::named_values(&merged)
        .unwrap()
        .into_iter()
        .collect();
    let targeted = "model.layers.0.self_attn.q_proj.weight";
    let untargeted = "model.layers.0.mlp.down_proj.weight";
    for key in saved.keys() {
        assert_eq!(saved.dtype(key).unwrap(), Dtype::BF16, "{key}");
    }
    assert!(saved.raw(untargeted).unwrap().0 == source.raw(untargeted).unwrap().0);
    let merged_values = bytes_f32(&in_memory[targeted].data);
    let rounded: Vec<f32> = merged_values
        .iter()
        .map(|v| half::bf16::from_f32(*v).to_f32())
        .collect();
    assert_eq!(saved.f32(targeted).unwrap().0, rounded);
    assert_ne!(
        saved.raw(targeted).unwrap().0,
        source.raw(targeted).unwrap().0,
        "the adapter changed the targeted weight"
    );

    // float32 on request: the merged values as they are, one file.
    let f32_out = dir.path().join("merged-f32");
    let options = SaveOptions {
        dtype: Some(Dtype::F32),
        ..SaveOptions::default()
    };
    peft_models::save_pretrained_with(&merged, model_dir(base_name), &f32_out, &options).unwrap();
    assert!(f32_out.join("model.safetensors").is_file());
    assert!(!f32_out.join("model.safetensors.index.json").exists());
    let saved = TensorStore::open_model_dir(&f32_out).unwrap();
    assert_eq!(saved.f32(targeted).unwrap().0, merged_values);

    // Saving again into the same folder replaces the shards of the first save.
    peft_models::save_pretrained_with(&merged, model_dir(base_name), &out, &options).unwrap();
    let names: BTreeSet<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.contains("model.safetensors"), "{names:?}");
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("model-") || n.ends_with(".index.json")),
        "stale shards left: {names:?}"
    );
}

fn bytes_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The files of a saved model folder, by name.
fn folder_files(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// Merging layer by layer inside the writer (`save_merged_with`) writes the same files, byte
/// for byte, as `merge_and_unload` + `save_pretrained_with`: LoRA (with `modules_to_save`, on an
/// embedding, with trained biases, over a bf16 base held as stored, over a 4-bit base), IA3
/// (feed-forward and not), sharded or not.
#[test]
fn merging_inside_the_writer_writes_the_same_checkpoint() {
    let device = device();
    let options = SaveOptions {
        max_shard_size: 60_000,
        ..SaveOptions::default()
    };
    let check = |what: &str, base_dir: &Path, streamed: &dyn Fn(&Path), merged: &dyn Fn(&Path)| {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("streamed"), dir.path().join("merged"));
        streamed(&a);
        merged(&b);
        let (fa, fb) = (folder_files(&a), folder_files(&b));
        assert_eq!(
            fa.keys().collect::<Vec<_>>(),
            fb.keys().collect::<Vec<_>>(),
            "{what}"
        );
        for (name, bytes) in &fa {
            assert!(bytes == &fb[name], "{what}: {name} differs");
        }
        let _ = base_dir;
    };
    for (adapter, base) in [
        ("lora-bloom", "bloom-tiny"),
        ("lora-bloom-mts", "bloom-tiny"),
        ("lora-llama-emb", "llama-tiny"),
        ("lora-bloom-bias-all", "bloom-tiny"),
        ("lora-mistral", "mistral-tiny-bf16"),
        ("lora-bloom", "bloom-tiny-nf4"),
    ] {
        let base_dir = model_dir(base);
        let lora = || {
            let model = peft_models::load(&base_dir, &device).unwrap();
            from_pretrained(model, adapter_dir(adapter), true).unwrap()
        };
        check(
            &format!("{adapter} on {base}"),
            &base_dir,
            &|out| peft_models::save_merged_with(&lora().model, &base_dir, out, &options).unwrap(),
            &|out| {
                let merged = lora().merge_and_unload().unwrap();
                peft_models::save_pretrained_with(&merged, &base_dir, out, &options).unwrap()
            },
        );
    }
    for adapter in ["ia3-bloom", "ia3-llama"] {
        let base_dir = model_dir(peft_tests::base_of(adapter));
        let ia3 = || {
            let model = peft_models::load(&base_dir, &device).unwrap();
            peft_ia3::from_pretrained(model, adapter_dir(adapter), true).unwrap()
        };
        check(
            adapter,
            &base_dir,
            &|out| peft_models::save_merged_with(&ia3().model, &base_dir, out, &options).unwrap(),
            &|out| {
                let merged = ia3().merge_and_unload().unwrap();
                peft_models::save_pretrained_with(&merged, &base_dir, out, &options).unwrap()
            },
        );
    }
}
