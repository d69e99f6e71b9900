//! LoHa against Hugging Face PEFT 0.21.2 (fixtures/make_lycoris_fixtures.py): PEFT's folders
//! load with PEFT's logits, unmerged and merged; ours save with PEFT's keys, shapes and config;
//! one training step gives PyTorch's gradients and AdamW update.

use peft_core::{MethodConfig, TensorStore};
use peft_loha::{Loha, LohaConfig, from_pretrained, get_peft_model};
use peft_tests::{Reference, adapter_dir, assert_adamw_step_matches, device, logits, model_dir};

use crate::lycoris::Method;

const LOHA: Method<Loha> = Method {
    load: |base, dir, trainable| from_pretrained(base, dir, trainable),
    fresh: get_peft_model,
    config: |path| LohaConfig::from_file(path),
    config_keys: &[
        "peft_type",
        "r",
        "alpha",
        "rank_pattern",
        "alpha_pattern",
        "target_modules",
    ],
    marker: ".hada_w2_b",
};

fn loha_matches_peft(name: &str) {
    crate::lycoris::matches_peft(&LOHA, name);
}

#[test]
fn bloom_attention_and_mlp() {
    loha_matches_peft("loha-bloom");
}

#[test]
fn llama_gqa_with_rank_and_alpha_patterns() {
    loha_matches_peft("loha-llama");
}

#[test]
fn phi3_fused_projections() {
    loha_matches_peft("loha-phi3");
}

/// One AdamW step from PEFT's folder: the loss, the four factors' gradients and updated values
/// as PyTorch's (PEFT's hand-written `HadaWeight` backward).
#[test]
fn one_adamw_step_matches_pytorch() {
    let device = device().autodiff();
    let base = peft_models::load(model_dir("bloom-tiny"), &device).unwrap();
    let loha = from_pretrained(base, adapter_dir("loha-bloom"), true).unwrap();
    let checked = assert_adamw_step_matches(loha.model, "loha-bloom-train", |name| {
        let (module, factor) = name.rsplit_once(".adapter.")?;
        peft_loha::FACTORS
            .contains(&factor)
            .then(|| (format!("base_model.model.{module}.{factor}"), false))
    });
    // Two targets in each of two layers, four factors each.
    assert_eq!(checked, 16);
}

/// A fresh LoHa starts as the base model (`hada_w2_b` = 0), as PEFT's does; the factors that
/// are not zero have PEFT's Kaiming-uniform bound `1/√fan_in`.
#[test]
fn fresh_loha_starts_as_the_base() {
    let device = device();
    let base = peft_models::load(model_dir("llama-tiny"), &device).unwrap();
    let config = LohaConfig::from_json(
        r#"{"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "gate_proj"]}"#,
        "test",
    )
    .unwrap();
    let reference = Reference::load("llama-tiny");
    let plain = logits(&base, &reference);
    let loha = get_peft_model(base, config).unwrap();
    // x·ΔWᵀ with ΔW = 0 adds exact zeros.
    assert_eq!(logits(&loha.model, &reference), plain);
    let out = tempfile::tempdir().unwrap();
    loha.save_pretrained(out.path()).unwrap();
    let saved = TensorStore::open(out.path().join("adapter_model.safetensors")).unwrap();
    let key = |f: &str| format!("base_model.model.model.layers.0.self_attn.q_proj.{f}");
    assert!(
        saved
            .f32(&key("hada_w2_b"))
            .unwrap()
            .0
            .iter()
            .all(|&v| v == 0.0)
    );
    let (w1a, shape) = saved.f32(&key("hada_w1_a")).unwrap();
    assert_eq!(shape, vec![64, 4]);
    assert!(w1a.iter().all(|v| v.abs() <= 0.5) && w1a.iter().any(|v| v.abs() > 0.1));
    let (w1b, shape) = saved.f32(&key("hada_w1_b")).unwrap();
    assert_eq!(shape, vec![4, 64]);
    assert!(w1b.iter().all(|v| v.abs() <= 0.125));
}

/// PEFT's LoHa has no 4-bit layer (it would take bitsandbytes' packed shape): refused, naming
/// the layer.
#[test]
fn a_4bit_base_is_refused_naming_the_layer() {
    let base = peft_models::load(model_dir("bloom-tiny-nf4"), &device()).unwrap();
    let err = get_peft_model(base, LohaConfig::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("LoHa on the 4-bit layer `transformer.h.0.self_attention.query_key_value`"),
        "{err}"
    );
}

/// Writes the LoHa folders saved by peft-rs to `target/interop/` for
/// `fixtures/check_interop.py`.
#[test]
#[ignore = "writes files for the Python interoperability check"]
fn export_for_python() {
    crate::lycoris::export_for_python(&LOHA, &["loha-bloom", "loha-llama", "loha-phi3"]);
}
