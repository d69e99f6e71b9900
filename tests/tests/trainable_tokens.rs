//! Trainable tokens against Hugging Face PEFT 0.21.2
//! (fixtures/make_trainable_tokens_fixtures.py): LoRA's `trainable_token_indices` in the list
//! form on the tied BLOOM (the output rows follow the embedding's) and in the dict form on the
//! untied Llama (`embed_tokens` and `lm_head` with their own ids). PEFT's folders load with
//! PEFT's logits, unmerged and merged; ours save PEFT's keys and values; one training step gives
//! PyTorch's gradients and AdamW update; bad indices are refused naming the index.

use peft_core::{MethodConfig, TensorStore};
use peft_lora::{LoraConfig, from_pretrained, get_peft_model};
use peft_tests::{
    Reference, adapter_dir, assert_adamw_step_matches, base_of, device, logits, max_diff_to,
    model_dir, reference_json,
};

const TOLERANCE: f32 = 1e-4;

/// PEFT's LoRA folder with trainable tokens: its logits unmerged and merged, unmerge restoring
/// them, its tensors and config saved back key for key, PEFT's parameter counts.
fn lora_tokens_match_peft(name: &str) {
    let device = device();
    let base = peft_models::load(model_dir(base_of(name)), &device).unwrap();
    let lora = from_pretrained(base, adapter_dir(name), false).unwrap();
    let reference = Reference::load(name);
    let unmerged = logits(&lora.model, &reference);
    let unmerged_diff = max_diff_to(&unmerged, name, "logits");
    assert!(
        unmerged_diff <= TOLERANCE,
        "{name}: unmerged max |Δ| = {unmerged_diff}"
    );

    let out = tempfile::tempdir().unwrap();
    lora.save_pretrained(out.path()).unwrap();
    let theirs = TensorStore::open(adapter_dir(name).join("adapter_model.safetensors")).unwrap();
    let ours = TensorStore::open(out.path().join("adapter_model.safetensors")).unwrap();
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    assert!(
        theirs
            .keys()
            .any(|k| k.ends_with(".token_adapter.trainable_tokens_delta"))
    );
    for key in theirs.keys() {
        assert_eq!(ours.f32(key).unwrap(), theirs.f32(key).unwrap(), "{key}");
    }
    peft_tests::assert_config_reads_back::<LoraConfig>(name);
    let saved: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    peft_tests::assert_json_keeps_keys(&adapter_dir(name).join("adapter_config.json"), &saved);

    let merged = lora.merge_adapter().unwrap();
    let diff = max_diff_to(&logits(&merged.model, &reference), name, "merged_logits");
    assert!(diff <= TOLERANCE, "{name}: merged max |Δ| = {diff}");
    let restored = merged.unmerge_adapter().unwrap();
    let diff = max_diff_to(&logits(&restored.model, &reference), name, "logits");
    assert!(diff <= TOLERANCE, "{name}: after unmerge max |Δ| = {diff}");
    let plain = restored.merge_and_unload().unwrap();
    let merged_diff = max_diff_to(&logits(&plain, &reference), name, "merged_logits");
    assert!(
        merged_diff <= TOLERANCE,
        "{name}: merge_and_unload max |Δ| = {merged_diff}"
    );
    eprintln!("{name}: max |Δ| to PEFT unmerged {unmerged_diff:.1e}, merged {merged_diff:.1e}");
    crate::lora::trainable_counts_match(name);
}

#[test]
fn lora_list_form_on_a_tied_model() {
    lora_tokens_match_peft("tokens-lora-bloom");
}

#[test]
fn lora_dict_form_with_an_untied_lm_head() {
    lora_tokens_match_peft("tokens-lora-llama");
}

/// One step from PEFT's folder: PyTorch's loss, gradients of the pairs and the token rows (the
/// tied output layer's share included), and AdamW update.
#[test]
fn one_adamw_step_matches_pytorch() {
    let device = device().autodiff();
    let base = peft_models::load(model_dir("bloom-tiny"), &device).unwrap();
    let lora = from_pretrained(base, adapter_dir("tokens-lora-bloom"), true).unwrap();
    let checked = assert_adamw_step_matches(lora.model, "tokens-lora-bloom-train", |name| {
        if name.ends_with(".token_adapter.trainable_tokens_delta") {
            return Some((format!("base_model.model.{name}"), false));
        }
        let (module, which) = name.rsplit_once(".adapter.")?;
        let (suffix, transposed) = match which {
            "lora_a" => ("lora_A.weight", true),
            "lora_b" => ("lora_B.weight", true),
            _ => return None,
        };
        Some((format!("base_model.model.{module}.{suffix}"), transposed))
    });
    // Two targets in each of two layers (two tensors each), and the token rows.
    assert_eq!(checked, 9);
}

/// A fresh adapter with trainable tokens starts as the base model (the rows start at the
/// table's), and counts PEFT's trainable parameters (6 rows × 64 beside the pairs).
#[test]
fn fresh_tokens_start_as_the_base() {
    let device = device();
    let base = peft_models::load(model_dir("bloom-tiny"), &device).unwrap();
    let config =
        LoraConfig::from_file(adapter_dir("tokens-lora-bloom").join("adapter_config.json"))
            .unwrap();
    let lora = get_peft_model(base, config).unwrap();
    let reference = Reference::load("bloom-tiny");
    let diff = max_diff_to(&logits(&lora.model, &reference), "bloom-tiny", "logits");
    assert!(
        diff <= TOLERANCE,
        "fresh adapter max |Δ| to the base = {diff}"
    );
    let expected = reference_json("tokens-lora-bloom");
    assert_eq!(
        lora.trainable_summary().trainable as u64,
        expected["trainable_params"].as_u64().unwrap()
    );
}

fn refusal(model: &str, config: &str) -> String {
    let base = peft_models::load(model_dir(model), &device()).unwrap();
    let config = LoraConfig::from_json(config, "test").unwrap();
    get_peft_model(base, config).unwrap_err().to_string()
}

#[test]
fn bad_token_indices_are_refused_naming_the_index() {
    let err = refusal(
        "bloom-tiny",
        r#"{"r": 4, "trainable_token_indices": [3, 512]}"#,
    );
    assert_eq!(
        err,
        "LoraConfig: invalid `trainable_token_indices`: token index 512 is outside the \
         vocabulary of 512 tokens"
    );
    let err = refusal(
        "bloom-tiny",
        r#"{"r": 4, "trainable_token_indices": [7, 3, 7]}"#,
    );
    assert!(err.ends_with("token index 7 is listed twice"), "{err}");
    // The tied BLOOM has one table: its output layer cannot have other rows than the embedding.
    let err = refusal(
        "bloom-tiny",
        r#"{"r": 4, "trainable_token_indices": {"word_embeddings": [1], "lm_head": [2]}}"#,
    );
    assert!(
        err.contains("`lm_head` is tied to the input embedding"),
        "{err}"
    );
    let err = refusal(
        "llama-tiny",
        r#"{"r": 4, "target_modules": ["embed_tokens", "q_proj"],
            "trainable_token_indices": [1, 2]}"#,
    );
    assert!(
        err.contains("`model.embed_tokens` is also adapted by target_modules"),
        "{err}"
    );
    let err = refusal(
        "llama-tiny",
        r#"{"r": 4, "trainable_token_indices": {"embedding_table": [1]}}"#,
    );
    assert!(err.contains("embedding_table"), "{err}");
}

/// A file whose rows have the wrong shape, or that lacks them, names the key.
#[test]
fn damaged_token_rows_are_named() {
    let name = "tokens-lora-llama";
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        adapter_dir(name).join("adapter_config.json"),
        dir.path().join("adapter_config.json"),
    )
    .unwrap();
    let store = TensorStore::open(adapter_dir(name).join("adapter_model.safetensors")).unwrap();
    let tensors = store
        .keys()
        .filter(|k| !k.starts_with("base_model.model.lm_head"))
        .map(|k| (k.to_string(), store.get(k).unwrap()))
        .collect();
    peft_tensors::save_safetensors(dir.path().join("adapter_model.safetensors"), &tensors, None)
        .unwrap();
    let base = peft_models::load(model_dir("llama-tiny"), &device()).unwrap();
    let err = from_pretrained(base, dir.path(), false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("base_model.model.lm_head.token_adapter.trainable_tokens_delta"),
        "{err}"
    );
}

/// The named-adapter model (what `peft serve` batches) refuses an adapter with token rows
/// rather than dropping them: its rows would replace the table the other adapters share.
#[test]
fn a_shared_multi_adapter_model_refuses_token_rows() {
    let base = peft_models::load(model_dir("bloom-tiny"), &device()).unwrap();
    let mut multi = peft_lora::MultiLoraModel::new(base).unwrap();
    let err = multi
        .load_adapter("tokens", adapter_dir("tokens-lora-bloom"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("adapter `tokens` trains token rows"), "{err}");
}

/// Writes our saved folders (LoRA with token rows, and the stand-alone method) and merged
/// checkpoints for fixtures/check_interop.py: PEFT and transformers load them with the reference
/// logits (CI runs it).
#[test]
#[ignore]
fn export_for_python() {
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/interop");
    let device = device();
    for name in ["tokens-lora-bloom", "tokens-lora-llama"] {
        let base = peft_models::load(model_dir(base_of(name)), &device).unwrap();
        let lora = from_pretrained(base, adapter_dir(name), true).unwrap();
        lora.save_pretrained(out.join(format!("{name}-adapter")))
            .unwrap();
        let merged = lora.merge_and_unload().unwrap();
        let merged_dir = out.join(format!("{name}-merged"));
        peft_models::save_pretrained(&merged, model_dir(base_of(name)), merged_dir).unwrap();
    }
    for name in ["tokens-bloom", "tokens-llama"] {
        let base = peft_models::load(model_dir(base_of(name)), &device).unwrap();
        let tokens = peft_trainable_tokens::from_pretrained(base, adapter_dir(name), true).unwrap();
        tokens
            .save_pretrained(out.join(format!("{name}-adapter")))
            .unwrap();
        let merged = tokens.merge_and_unload().unwrap();
        let merged_dir = out.join(format!("{name}-merged"));
        peft_models::save_pretrained(&merged, model_dir(base_of(name)), merged_dir).unwrap();
    }
}
