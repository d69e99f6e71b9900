//! This crate alone against PEFT's fixtures (`cargo test -p peft-ptuning`); the full suite, with
//! training, PyTorch's AdamW step and every encoder, is tests/tests/ptuning.rs.

use peft_core::{AdapterModel, MethodConfig};
use peft_tests::{adapter_dir, assert_config_reads_back, assert_logits_match, device, model_dir};

use crate::{PromptEncoderConfig, from_pretrained};

#[test]
fn peft_adapters_give_pefts_logits() {
    for name in ["ptuning-bloom-mlp", "ptuning-bloom-lstm"] {
        let base = peft_models::load(model_dir("bloom-tiny"), &device()).unwrap();
        let ptuning = from_pretrained(base, adapter_dir(name), false).unwrap();
        assert_logits_match(ptuning.model(), name, 1e-4);
    }
}

#[test]
fn pefts_config_reads_back_key_for_key() {
    assert_config_reads_back::<PromptEncoderConfig>("ptuning-bloom-mlp");
    assert_config_reads_back::<PromptEncoderConfig>("ptuning-bloom-lstm");
}

#[test]
fn an_encoder_of_no_size_is_refused() {
    let err = PromptEncoderConfig::from_json(
        r#"{"peft_type": "P_TUNING", "num_virtual_tokens": 4, "encoder_hidden_size": 0}"#,
        "cfg",
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        "cfg: invalid `encoder_hidden_size / encoder_num_layers`: must be at least 1"
    );
}
