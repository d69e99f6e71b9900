//! This crate against PEFT 0.21.2's fixtures (fixtures/make_trainable_tokens_fixtures.py;
//! `cargo test -p peft-trainable-tokens`): the tied BLOOM (the output rows follow the
//! embedding's, and PEFT's file holds them under both paths) and the untied Llama.

use peft_core::{MethodConfig, TensorStore};
use peft_tests::{
    Reference, adapter_dir, assert_adamw_step_matches, assert_config_reads_back, device, logits,
    max_diff_to, model_dir, reference_json,
};

use crate::{TrainableTokensConfig, from_pretrained, get_peft_model};

const TOLERANCE: f32 = 1e-4;

/// PEFT's folder: its logits unmerged and merged, its tensors saved back key for key, PEFT's
/// parameter counts, a fresh adapter equal to the base.
fn matches_peft(name: &str, base_name: &str) {
    let device = device();
    let base = peft_models::load(model_dir(base_name), &device).unwrap();
    let tokens = from_pretrained(base, adapter_dir(name), true).unwrap();
    let reference = Reference::load(name);
    let diff = max_diff_to(&logits(&tokens.model, &reference), name, "logits");
    assert!(diff <= TOLERANCE, "{name}: max |Δ| = {diff}");
    assert!(
        max_diff_to(&logits(&tokens.model, &reference), base_name, "logits") > 1e-3,
        "{name}: the rows change nothing"
    );
    let expected = reference_json(name);
    let summary = tokens.trainable_summary();
    assert_eq!(
        summary.trainable as u64,
        expected["trainable_params"].as_u64().unwrap()
    );
    assert_eq!(summary.all as u64, expected["all_params"].as_u64().unwrap());

    let out = tempfile::tempdir().unwrap();
    tokens.save_pretrained(out.path()).unwrap();
    let theirs = TensorStore::open(adapter_dir(name).join("adapter_model.safetensors")).unwrap();
    let ours = TensorStore::open(out.path().join("adapter_model.safetensors")).unwrap();
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    for key in theirs.keys() {
        assert_eq!(ours.f32(key).unwrap(), theirs.f32(key).unwrap(), "{key}");
    }
    assert_config_reads_back::<TrainableTokensConfig>(name);

    let merged = tokens.merge_and_unload().unwrap();
    let diff = max_diff_to(&logits(&merged, &reference), name, "merged_logits");
    assert!(diff <= TOLERANCE, "{name}: merged max |Δ| = {diff}");

    let config =
        TrainableTokensConfig::from_file(adapter_dir(name).join("adapter_config.json")).unwrap();
    let base = peft_models::load(model_dir(base_name), &device).unwrap();
    let fresh = get_peft_model(base, config).unwrap();
    assert_eq!(fresh.trainable_summary(), summary);
    let diff = max_diff_to(&logits(&fresh.model, &reference), base_name, "logits");
    assert!(
        diff <= TOLERANCE,
        "{name}: a fresh adapter is not the base ({diff})"
    );
}

#[test]
fn tied_bloom_matches_peft() {
    matches_peft("tokens-bloom", "bloom-tiny");
}

#[test]
fn untied_llama_matches_peft() {
    matches_peft("tokens-llama", "llama-tiny");
}

/// One step: PyTorch's loss, the rows' gradient (the embedding's and the tied output layer's
/// shares summed, as on PEFT's one parameter) and AdamW update.
#[test]
fn one_adamw_step_matches_pytorch() {
    let device = device().autodiff();
    let base = peft_models::load(model_dir("bloom-tiny"), &device).unwrap();
    let tokens = from_pretrained(base, adapter_dir("tokens-bloom"), true).unwrap();
    let checked = assert_adamw_step_matches(tokens.model, "tokens-bloom-train", |name| {
        let module = name.strip_suffix(".token_adapter.trainable_tokens_delta")?;
        Some((
            format!("base_model.model.{module}.trainable_tokens_delta"),
            false,
        ))
    });
    assert_eq!(checked, 1);
}

#[test]
fn random_rows_and_other_methods_are_refused() {
    let base = peft_models::load(model_dir("bloom-tiny"), &device()).unwrap();
    let config = TrainableTokensConfig::from_json(
        r#"{"peft_type": "TRAINABLE_TOKENS", "token_indices": [1], "init_weights": false}"#,
        "cfg",
    )
    .unwrap();
    let err = get_peft_model(base, config).unwrap_err().to_string();
    assert!(err.contains("init_weights = false"), "{err}");
    let err = TrainableTokensConfig::from_json(r#"{"peft_type": "LORA"}"#, "cfg")
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "cfg: invalid `peft_type`: expected TRAINABLE_TOKENS, found LORA"
    );
    // A regex naming no module lists the model's modules.
    let base = peft_models::load(model_dir("bloom-tiny"), &device()).unwrap();
    let config = TrainableTokensConfig::from_json(
        r#"{"token_indices": [1], "target_modules": "no\\.such\\.table"}"#,
        "cfg",
    )
    .unwrap();
    let err = get_peft_model(base, config).unwrap_err().to_string();
    assert!(
        err.contains("no\\\\.such\\\\.table") || err.contains("no\\.such"),
        "{err}"
    );
}
