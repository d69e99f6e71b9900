//! This crate alone against PEFT's fixtures (`cargo test -p peft-prompt`); the full suite, with
//! generation, training and every architecture, is tests/tests/prompt.rs.

use peft_core::{AdapterModel, MethodConfig};
use peft_tests::{adapter_dir, assert_config_reads_back, assert_logits_match, device, model_dir};

use crate::{PromptTuningConfig, from_pretrained};

#[test]
fn a_peft_adapter_gives_pefts_logits() {
    for name in ["prompt-bloom-random", "prompt-bloom-text"] {
        let base = peft_models::load(model_dir("bloom-tiny"), &device()).unwrap();
        let prompt = from_pretrained(base, adapter_dir(name), false).unwrap();
        assert_logits_match(prompt.model(), name, 1e-4);
    }
}

#[test]
fn pefts_config_reads_back_key_for_key() {
    assert_config_reads_back::<PromptTuningConfig>("prompt-bloom-random");
    assert_config_reads_back::<PromptTuningConfig>("prompt-bloom-text");
}

#[test]
fn text_init_without_text_is_refused() {
    let err = PromptTuningConfig::from_json(
        r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "prompt_tuning_init": "TEXT"}"#,
        "cfg",
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        "cfg: invalid `prompt_tuning_init_text`: TEXT init needs a non-empty \
         prompt_tuning_init_text"
    );
}
