//! VeRA against Hugging Face PEFT 0.21.2 (fixtures/make_vera_fixtures.py): PEFT's folders load
//! with PEFT's logits, unmerged and merged — `vera-llama` carries no projections, so they are
//! drawn from its key as PEFT draws them; ours save with PEFT's keys, shapes and config; one
//! training step gives PyTorch's gradients and AdamW update.

use peft_core::{MethodConfig, TensorStore};
use peft_tests::{Reference, adapter_dir, assert_adamw_step_matches, device, logits, model_dir};
use peft_vera::{VERA_A, VERA_B, Vera, VeraConfig, from_pretrained, get_peft_model};

use crate::lycoris::Method;

const VERA: Method<Vera> = Method {
    load: |base, dir, trainable| from_pretrained(base, dir, trainable),
    fresh: get_peft_model,
    config: |path| VeraConfig::from_file(path),
    config_keys: &[
        "peft_type",
        "r",
        "projection_prng_key",
        "save_projection",
        "d_initial",
        "target_modules",
    ],
    marker: ".vera_lambda_d",
};

/// Projections saved in the folder (PEFT's default), sliced for 64 → 192 and 256 → 64.
#[test]
fn bloom_with_saved_projections() {
    crate::lycoris::matches_peft(&VERA, "vera-bloom");
    let file =
        TensorStore::open(adapter_dir("vera-bloom").join("adapter_model.safetensors")).unwrap();
    assert_eq!(file.shape(VERA_A).unwrap(), &[16, 256]);
    assert_eq!(file.shape(VERA_B).unwrap(), &[192, 16]);
}

/// `save_projection: false`: the folder holds the vectors only; PEFT's logits prove the
/// projections drawn from `projection_prng_key = 7` are PyTorch's, bit for bit in effect.
#[test]
fn llama_projections_drawn_from_the_key() {
    let file =
        TensorStore::open(adapter_dir("vera-llama").join("adapter_model.safetensors")).unwrap();
    assert!(!file.contains(VERA_A) && !file.contains(VERA_B));
    crate::lycoris::matches_peft(&VERA, "vera-llama");
}

/// PEFT's `vera_A` / `vera_B` in the bloom folder are exactly what key 0 draws: the same
/// generator reproduces the saved projections value for value.
#[test]
fn saved_projections_equal_the_keys_draw() {
    let file =
        TensorStore::open(adapter_dir("vera-bloom").join("adapter_model.safetensors")).unwrap();
    let (a, b) = peft_vera::projections(0, 16, (256, 192));
    assert_eq!(file.f32(VERA_A).unwrap().0, a);
    assert_eq!(file.f32(VERA_B).unwrap().0, b);
}

/// One AdamW step from PEFT's folder: the loss, the vectors' gradients and updated values.
#[test]
fn one_adamw_step_matches_pytorch() {
    let device = device().autodiff();
    let base = peft_models::load(model_dir("bloom-tiny"), &device).unwrap();
    let vera = from_pretrained(base, adapter_dir("vera-bloom"), true).unwrap();
    let checked = assert_adamw_step_matches(vera.model, "vera-bloom-train", |name| {
        let (module, vector) = name.rsplit_once(".adapter.")?;
        peft_vera::VECTORS
            .contains(&vector)
            .then(|| (format!("base_model.model.{module}.{vector}"), false))
    });
    // Two targets in each of two layers, two vectors each.
    assert_eq!(checked, 8);
}

/// A fresh VeRA starts as the base (`λ_b = 0`), `λ_d = d_initial`, and saves the projections
/// only with `save_projection`.
#[test]
fn fresh_vera_starts_as_the_base() {
    let device = device();
    let reference = Reference::load("llama-tiny");
    for save in [true, false] {
        let base = peft_models::load(model_dir("llama-tiny"), &device).unwrap();
        let plain = logits(&base, &reference);
        let config = VeraConfig::from_json(
            &format!(r#"{{"r": 4, "d_initial": 0.25, "save_projection": {save}}}"#),
            "test",
        )
        .unwrap();
        let vera = get_peft_model(base, config).unwrap();
        assert_eq!(logits(&vera.model, &reference), plain);
        // q_proj and v_proj of two layers: λ_b (64 or 32) and λ_d (4) each.
        assert_eq!(vera.trainable_summary().trainable, 2 * (64 + 4 + 32 + 4));
        let out = tempfile::tempdir().unwrap();
        vera.save_pretrained(out.path()).unwrap();
        let saved = TensorStore::open(out.path().join("adapter_model.safetensors")).unwrap();
        let d = saved
            .f32("base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_d")
            .unwrap();
        assert_eq!(d, (vec![0.25; 4], vec![4]));
        assert_eq!(saved.contains(VERA_A), save);
    }
}

/// With `save_projection` the folder must carry the projections (PEFT refuses too).
#[test]
fn missing_projections_are_refused() {
    let dir = peft_tests::adapter_with_config_edit(
        "vera-llama",
        "\"save_projection\": false",
        "\"save_projection\": true",
    );
    let base = peft_models::load(model_dir("llama-tiny"), &device()).unwrap();
    let err = from_pretrained(base, dir.path(), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`base_model.vera_A` is missing"), "{err}");
}

/// Writes the VeRA folders saved by peft-rs to `target/interop/` for
/// `fixtures/check_interop.py`.
#[test]
#[ignore = "writes files for the Python interoperability check"]
fn export_for_python() {
    crate::lycoris::export_for_python(&VERA, &["vera-bloom", "vera-llama"]);
}

/// PEFT's VeRA adapts bitsandbytes 4-bit layers; here too: over the NF4 BLOOM a fresh VeRA gives
/// the 4-bit base's own logits, PEFT's bloom folder changes them, and merging it into the
/// de-quantised weights gives the unmerged logits.
#[test]
fn a_4bit_base_takes_vera() {
    let device = device();
    let reference = Reference::load("bloom-tiny");
    let nf4 = || peft_models::load(model_dir("bloom-tiny-nf4"), &device).unwrap();
    let plain = logits(&nf4(), &reference);
    let fresh = get_peft_model(nf4(), VeraConfig::default()).unwrap();
    assert_eq!(logits(&fresh.model, &reference), plain);
    let loaded = from_pretrained(nf4(), adapter_dir("vera-bloom"), false).unwrap();
    let unmerged = logits(&loaded.model, &reference);
    let merged = logits(&loaded.merge_and_unload().unwrap(), &reference);
    let diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max)
    };
    assert!(diff(&unmerged, &plain) > 0.05);
    assert!(
        diff(&merged, &unmerged) <= 1e-4,
        "{}",
        diff(&merged, &unmerged)
    );
}
