//! This crate alone (`cargo test -p peft-bitfit`); the full suite, with PyTorch's training
//! steps, is tests/tests/bitfit.rs.

use peft_core::MethodConfig;
use peft_tests::{device, model_dir, reference_json};

use crate::{BitFitConfig, from_pretrained, get_peft_model};

#[test]
fn trains_the_seed_loops_biases_and_round_trips() {
    let base = peft_models::load(model_dir("bloom-tiny"), &device()).unwrap();
    let model = get_peft_model(base, BitFitConfig::default()).unwrap();
    // The seed tutorial's loop over named parameters, run by fixtures/make_fixtures.py.
    let expected = reference_json("bitfit-bloom");
    assert_eq!(
        model.num_param() as u64,
        expected["num_param"].as_u64().unwrap()
    );
    let dir = tempfile::tempdir().unwrap();
    model.save_pretrained(dir.path()).unwrap();
    let config = BitFitConfig::from_file(dir.path().join("adapter_config.json")).unwrap();
    assert_eq!(config.header.peft_type, peft_core::PeftType::BitFit);
    let base = peft_models::load(model_dir("bloom-tiny"), &device()).unwrap();
    let loaded = from_pretrained(base, dir.path(), false).unwrap();
    assert_eq!(loaded.biases, model.biases);
}

#[test]
fn another_methods_config_is_refused() {
    let err = BitFitConfig::from_json(r#"{"peft_type": "LORA"}"#, "cfg")
        .unwrap_err()
        .to_string();
    assert_eq!(err, "cfg: invalid `peft_type`: expected BITFIT, found LORA");
}
