//! This crate alone against PEFT's fixtures (`cargo test -p peft-ia3`); the full suite, with
//! merging, training and every architecture, is tests/tests/ia3.rs.

use peft_core::{AdapterModel, MethodConfig};
use peft_tests::{adapter_dir, assert_config_reads_back, assert_logits_match, device, model_dir};

use crate::{Ia3Config, from_pretrained};

#[test]
fn a_peft_adapter_gives_pefts_logits() {
    let base = peft_models::load(model_dir("bloom-tiny"), &device()).unwrap();
    let ia3 = from_pretrained(base, adapter_dir("ia3-bloom"), false).unwrap();
    assert_logits_match(ia3.model(), "ia3-bloom", 1e-4);
}

#[test]
fn pefts_config_reads_back_key_for_key() {
    assert_config_reads_back::<Ia3Config>("ia3-bloom");
    assert_config_reads_back::<Ia3Config>("ia3-llama");
}

#[test]
fn feedforward_modules_outside_the_targets_are_refused_with_the_fix() {
    let err = Ia3Config::from_json(
        r#"{"peft_type": "IA3", "target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}"#,
        "cfg",
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        "cfg: invalid `feedforward_modules`: `feedforward_modules` should be a subset of \
         `target_modules` ([\"down_proj\"] not in [\"k_proj\"]); fix: target_modules = \
         [\"k_proj\", \"down_proj\"]"
    );
    let err = Ia3Config::from_json(r#"{"peft_type": "LORA"}"#, "cfg")
        .unwrap_err()
        .to_string();
    assert_eq!(err, "cfg: invalid `peft_type`: expected IA3, found LORA");
}
