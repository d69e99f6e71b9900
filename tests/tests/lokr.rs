//! LoKr against Hugging Face PEFT 0.21.2 (fixtures/make_lycoris_fixtures.py): PEFT's folders
//! load with PEFT's logits, unmerged and merged; ours save with PEFT's keys, shapes and config;
//! one training step gives PyTorch's gradients and AdamW update.

use peft_core::{MethodConfig, TensorStore};
use peft_lokr::{Lokr, LokrConfig, from_pretrained, get_peft_model};
use peft_tests::{Reference, adapter_dir, assert_adamw_step_matches, device, logits, model_dir};

use crate::lycoris::Method;

const LOKR: Method<Lokr> = Method {
    load: |base, dir, trainable| from_pretrained(base, dir, trainable),
    fresh: get_peft_model,
    config: |path| LokrConfig::from_file(path),
    config_keys: &[
        "peft_type",
        "r",
        "alpha",
        "decompose_both",
        "decompose_factor",
        "rank_dropout_scale",
        "init_weights",
        "rank_pattern",
        "alpha_pattern",
        "target_modules",
    ],
    marker: ".lokr_w2_b",
};

/// Every factor a rank-2 pair (`decompose_both`), BLOOM's fused attention (`out = 12·16`).
#[test]
fn bloom_both_factors_decomposed() {
    crate::lycoris::matches_peft(&LOKR, "lokr-bloom");
}

/// `decompose_factor = 4` with rank and alpha patterns: whole and decomposed `w2` side by side.
#[test]
fn llama_gqa_with_decompose_factor_and_patterns() {
    crate::lycoris::matches_peft(&LOKR, "lokr-llama");
}

/// Phi-3's fused projections, `init_weights = "lycoris"` read and written back.
#[test]
fn phi3_fused_projections() {
    crate::lycoris::matches_peft(&LOKR, "lokr-phi3");
}

/// One AdamW step from PEFT's folder: the loss, the four factors' gradients and updated values
/// as PyTorch's autograd through `torch.kron`.
#[test]
fn one_adamw_step_matches_pytorch() {
    let device = device().autodiff();
    let base = peft_models::load(model_dir("bloom-tiny"), &device).unwrap();
    let lokr = from_pretrained(base, adapter_dir("lokr-bloom"), true).unwrap();
    let checked = assert_adamw_step_matches(lokr.model, "lokr-bloom-train", |name| {
        let (module, factor) = name.rsplit_once(".adapter.")?;
        peft_lokr::FACTORS
            .contains(&factor)
            .then(|| (format!("base_model.model.{module}.{factor}"), false))
    });
    // Two targets in each of two layers, four factors each.
    assert_eq!(checked, 16);
}

/// A fresh LoKr starts as the base model — `w1` zero by default, `w2` zero with `"lycoris"` —
/// with PEFT's shapes and Kaiming-uniform bound `1/√fan_in` on the rest.
#[test]
fn fresh_lokr_starts_as_the_base() {
    let device = device();
    let reference = Reference::load("llama-tiny");
    for (init, zero, random) in [
        ("true", "lokr_w1", "lokr_w2_a"),
        ("\"lycoris\"", "lokr_w2_b", "lokr_w1"),
    ] {
        let base = peft_models::load(model_dir("llama-tiny"), &device).unwrap();
        let plain = logits(&base, &reference);
        // q_proj 64 → 64 splits 8·8 × 8·8: r = 2 < 8/2 decomposes w2 only.
        let config = LokrConfig::from_json(
            &format!(r#"{{"r": 2, "alpha": 4, "init_weights": {init}}}"#),
            "test",
        )
        .unwrap();
        let lokr = get_peft_model(base, config).unwrap();
        assert_eq!(logits(&lokr.model, &reference), plain, "{init}");
        let out = tempfile::tempdir().unwrap();
        lokr.save_pretrained(out.path()).unwrap();
        let saved = TensorStore::open(out.path().join("adapter_model.safetensors")).unwrap();
        let key = |f: &str| format!("base_model.model.model.layers.0.self_attn.q_proj.{f}");
        let shapes: Vec<_> = ["lokr_w1", "lokr_w2_a", "lokr_w2_b"]
            .iter()
            .map(|f| saved.f32(&key(f)).unwrap().1)
            .collect();
        assert_eq!(shapes, vec![vec![8, 8], vec![8, 2], vec![2, 8]]);
        assert!(saved.f32(&key(zero)).unwrap().0.iter().all(|&v| v == 0.0));
        // Both random factors here have 8 or 2 columns: bound 1/√8 or 1/√2.
        let (values, shape) = saved.f32(&key(random)).unwrap();
        let bound = 1.0 / (shape[1] as f32).sqrt();
        assert!(values.iter().all(|v| v.abs() <= bound) && values.iter().any(|&v| v != 0.0));
    }
}

/// PEFT's LoKr has no 4-bit layer: refused, naming the layer.
#[test]
fn a_4bit_base_is_refused_naming_the_layer() {
    let base = peft_models::load(model_dir("bloom-tiny-nf4"), &device()).unwrap();
    let err = get_peft_model(base, LokrConfig::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("LoKr on the 4-bit layer `transformer.h.0.self_attention.query_key_value`"),
        "{err}"
    );
}

/// A file whose factor shapes are not the ones the config gives (here: `decompose_both`
/// dropped from PEFT's config, so `w1` should be whole) is refused naming the tensor.
#[test]
fn a_file_not_matching_its_config_is_refused() {
    let dir = peft_tests::adapter_with_config_edit(
        "lokr-bloom",
        "\"decompose_both\": true",
        "\"decompose_both\": false",
    );
    let base = peft_models::load(model_dir("bloom-tiny"), &device()).unwrap();
    let err = from_pretrained(base, dir.path(), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("lokr_w1"), "{err}");
}

/// Writes the LoKr folders saved by peft-rs to `target/interop/` for
/// `fixtures/check_interop.py`.
#[test]
#[ignore = "writes files for the Python interoperability check"]
fn export_for_python() {
    crate::lycoris::export_for_python(&LOKR, &["lokr-bloom", "lokr-llama", "lokr-phi3"]);
}
