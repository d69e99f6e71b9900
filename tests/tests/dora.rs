//! DoRA (`use_dora`) against Hugging Face PEFT 0.21.2 (fixtures/make_dora_fixtures.py): PEFT's
//! folders load with PEFT's logits, unmerged and merged; ours save with PEFT's keys; one training
//! step gives PyTorch's gradients (the norm detached) and AdamW update.

use peft_core::{MethodConfig, ModelInput, TensorStore};
use peft_lora::{
    Combination, CombinationType, LoraConfig, MultiLoraModel, from_pretrained, get_peft_model,
};
use peft_tests::{
    Reference, adapter_dir, assert_adamw_step_matches, base_of, device, logits, max_diff_masked,
    max_diff_to, model_dir, reference_json,
};

const TOLERANCE: f32 = 1e-4;

/// PEFT's folder: its logits unmerged, its `merge_and_unload()` logits merged, the adapter far
/// from a no-op, unmerge restoring the base, and the saved folder byte-for-byte PEFT's tensors.
fn dora_matches_peft(name: &str) {
    let device = device();
    let base = peft_models::load(model_dir(base_of(name)), &device).unwrap();
    let dora = from_pretrained(base, adapter_dir(name), false).unwrap();
    let reference = Reference::load(name);
    let unmerged = logits(&dora.model, &reference);
    let unmerged_diff = max_diff_to(&unmerged, name, "logits");
    assert!(
        unmerged_diff <= TOLERANCE,
        "{name}: unmerged max |Δ| = {unmerged_diff}"
    );
    let change = max_diff_to(&unmerged, base_of(name), "logits");
    assert!(
        change > 0.05,
        "{name}: DoRA barely changes the logits ({change})"
    );

    let out = tempfile::tempdir().unwrap();
    dora.save_pretrained(out.path()).unwrap();
    let theirs = TensorStore::open(adapter_dir(name).join("adapter_model.safetensors")).unwrap();
    let ours = TensorStore::open(out.path().join("adapter_model.safetensors")).unwrap();
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    assert!(theirs.keys().any(|k| k.ends_with(".lora_magnitude_vector")));
    for key in theirs.keys() {
        assert_eq!(ours.f32(key).unwrap(), theirs.f32(key).unwrap(), "{key}");
    }
    let saved: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(saved["use_dora"], true);

    let merged = dora.merge_adapter().unwrap();
    let diff = max_diff_to(&logits(&merged.model, &reference), name, "merged_logits");
    assert!(
        diff <= TOLERANCE,
        "{name}: merged max |Δ| to PEFT's = {diff}"
    );
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
}

#[test]
fn bloom_attention_and_mlp() {
    dora_matches_peft("dora-bloom");
    // PEFT's parameter counts (the magnitudes are trainable), also after a fresh injection.
    crate::lora::trainable_counts_match("dora-bloom");
}

#[test]
fn llama_gqa_with_rslora() {
    dora_matches_peft("dora-llama");
}

#[test]
fn phi3_fused_projections() {
    dora_matches_peft("dora-phi3");
    crate::lora::trainable_counts_match("dora-phi3");
}

/// QDoRA: over the NF4 BLOOM (the base de-quantised once for `‖W‖²`, its product used for the
/// rest of the norm), PEFT + bitsandbytes' logits.
#[test]
fn nf4_base() {
    let name = "dora-bloom-nf4";
    let device = device();
    let base = peft_models::load(model_dir("bloom-tiny-nf4"), &device).unwrap();
    let dora = from_pretrained(base, adapter_dir(name), false).unwrap();
    let reference = Reference::load(name);
    let diff = max_diff_to(&logits(&dora.model, &reference), name, "logits");
    assert!(diff <= TOLERANCE, "{name}: max |Δ| = {diff}");
    let expected = reference_json(name);
    assert_eq!(
        dora.trainable_summary().all as u64,
        expected["all_params"].as_u64().unwrap()
    );
}

/// A fresh DoRA layer starts as the base model (B = 0, magnitude = ‖W‖), as PEFT's does.
#[test]
fn fresh_dora_starts_as_the_base() {
    let device = device();
    let base = peft_models::load(model_dir("llama-tiny"), &device).unwrap();
    let config = LoraConfig::from_json(
        r#"{"r": 4, "lora_alpha": 8, "use_dora": true,
            "target_modules": ["q_proj", "v_proj", "gate_proj"]}"#,
        "test",
    )
    .unwrap();
    let dora = get_peft_model(base, config).unwrap();
    let reference = Reference::load("llama-tiny");
    let diff = max_diff_to(&logits(&dora.model, &reference), "llama-tiny", "logits");
    assert!(diff <= TOLERANCE, "fresh DoRA max |Δ| to the base = {diff}");
}

/// One step from PEFT's DoRA folder: PyTorch's loss, gradients of A, B and the magnitude (the
/// norm detached), and AdamW update (relative error ≤ 1e-4).
#[test]
fn one_adamw_step_matches_pytorch() {
    let device = device().autodiff();
    let base = peft_models::load(model_dir("bloom-tiny"), &device).unwrap();
    let dora = from_pretrained(base, adapter_dir("dora-bloom"), true).unwrap();
    let checked = assert_adamw_step_matches(dora.model, "dora-bloom-train", |name| {
        let (module, which) = name.rsplit_once(".adapter.")?;
        let (suffix, transposed) = match which {
            "lora_a" => ("lora_A.weight", true),
            "lora_b" => ("lora_B.weight", true),
            "dora.magnitude" => ("lora_magnitude_vector.weight", false),
            _ => return None,
        };
        Some((format!("base_model.model.{module}.{suffix}"), transposed))
    });
    // Three targets in each of two layers, three tensors each.
    assert_eq!(checked, 18);
}

/// DoRA on an embedding (PEFT's `DoraEmbeddingLayer`: the magnitude per embedding dimension,
/// the norm over the table's rows) beside q_proj and down_proj.
#[test]
fn llama_embedding_and_mlp() {
    dora_matches_peft("dora-llama-emb");
    crate::lora::trainable_counts_match("dora-llama-emb");
}

/// A mixed batch — DoRA on row 0, LoRA on row 1, the base on row 2 — gives each row what that
/// adapter alone gives it (PEFT's logits for each folder), the base product computed once; and
/// the DoRA adapter saved from the named-adapter model is PEFT's folder again; and
/// `add_weighted_adapter` over it is refused naming it (its magnitudes cannot be combined with
/// the pairs).
#[test]
fn dora_joins_a_mixed_batch() {
    let device = device();
    let base = peft_models::load(model_dir("bloom-tiny"), &device).unwrap();
    let mut multi = MultiLoraModel::new(base).unwrap();
    multi
        .load_adapter("dora", adapter_dir("dora-bloom"))
        .unwrap();
    multi
        .load_adapter("lora", adapter_dir("lora-bloom"))
        .unwrap();
    let reference = Reference::load("dora-bloom");
    let input = ModelInput::with_mask(reference.ids(&device), reference.mask(&device));
    let mixed: Vec<f32> = multi
        .forward_rows(input, &["dora", "lora", "__base__"])
        .unwrap()
        .into_data()
        .iter::<f32>()
        .collect();
    let [batch, seq] = reference.shape;
    let row_len = seq * reference.vocab;
    assert_eq!(mixed.len(), batch * row_len);
    for (row, name) in [(0, "dora-bloom"), (1, "lora-bloom"), (2, "bloom-tiny")] {
        let theirs = Reference::load(name);
        let span = row * row_len..(row + 1) * row_len;
        let mask = &reference.attention_mask[row * seq..(row + 1) * seq];
        let diff = max_diff_masked(
            &mixed[span.clone()],
            &theirs.logits[span],
            mask,
            reference.vocab,
        );
        assert!(diff <= TOLERANCE, "row {row} ({name}): max |Δ| = {diff}");
    }

    let out = tempfile::tempdir().unwrap();
    multi.save_adapter_folder("dora", out.path()).unwrap();
    let theirs =
        TensorStore::open(adapter_dir("dora-bloom").join("adapter_model.safetensors")).unwrap();
    let ours = TensorStore::open(out.path().join("adapter_model.safetensors")).unwrap();
    for key in theirs.keys() {
        assert_eq!(ours.f32(key).unwrap(), theirs.f32(key).unwrap(), "{key}");
    }

    let err = multi
        .add_weighted_adapter(
            &["lora", "dora"],
            &[0.5, 0.5],
            "both",
            &Combination::new(CombinationType::Linear),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("`dora` is a DoRA adapter"), "{err}");
}

/// A DoRA folder without its magnitudes names the missing key.
#[test]
fn missing_magnitude_is_named() {
    let dir = peft_tests::adapter_with_config_edit(
        "lora-bloom",
        r#""use_dora": false"#,
        r#""use_dora": true"#,
    );
    let base = peft_models::load(model_dir("bloom-tiny"), &device()).unwrap();
    let err = from_pretrained(base, dir.path(), false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("transformer.h.0.self_attention.query_key_value.lora_magnitude_vector"),
        "{err}"
    );
}

/// Writes our saved DoRA folders and merged checkpoints for fixtures/check_interop.py (PEFT and
/// transformers load them with the reference logits; CI runs it).
#[test]
#[ignore]
fn export_for_python() {
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/interop");
    let device = device();
    for name in ["dora-bloom", "dora-llama", "dora-llama-emb", "dora-phi3"] {
        let base = peft_models::load(model_dir(base_of(name)), &device).unwrap();
        let dora = from_pretrained(base, adapter_dir(name), true).unwrap();
        dora.save_pretrained(out.join(format!("{name}-adapter")))
            .unwrap();
        let merged = dora.merge_and_unload().unwrap();
        peft_models::save_pretrained(
            &merged,
            model_dir(base_of(name)),
            out.join(format!("{name}-merged")),
        )
        .unwrap();
    }
}

/// Outside training the norm is cached, keyed on the pair's values: a second pass reuses it, and
/// a copy whose B changed (sharing the cache) computes its own — the logits of a model built from
/// those values, never the stale norm.
#[test]
fn the_inference_norm_cache_is_never_stale() {
    use peft_core::params::{ParamUpdate, map_params};
    let device = device();
    let reference = Reference::load("dora-bloom");
    let base = peft_models::load(model_dir("bloom-tiny"), &device).unwrap();
    let dora = from_pretrained(base, adapter_dir("dora-bloom"), false).unwrap();
    let first = logits(&dora.model, &reference);
    assert_eq!(logits(&dora.model, &reference), first);

    let changed = map_params(dora.model.clone(), |name, _| {
        if name.ends_with("query_key_value.adapter.lora_b") {
            ParamUpdate::Value(burn::tensor::TensorData::new(
                vec![0.01f32; 4 * 192],
                [4, 192],
            ))
        } else {
            ParamUpdate::Keep
        }
    });
    let with_changed_b = logits(&changed, &reference);
    let change = max_diff_masked(
        &with_changed_b,
        &first,
        &reference.attention_mask,
        reference.vocab,
    );
    assert!(change > 1e-3, "changing B changed nothing ({change})");
    // The same values through a model that never cached anything.
    let out = tempfile::tempdir().unwrap();
    let saved = peft_lora::LoraModel {
        model: changed,
        ..dora
    };
    saved.save_pretrained(out.path()).unwrap();
    let base = peft_models::load(model_dir("bloom-tiny"), &device).unwrap();
    let fresh = from_pretrained(base, out.path(), false).unwrap();
    assert_eq!(logits(&fresh.model, &reference), with_changed_b);
}
