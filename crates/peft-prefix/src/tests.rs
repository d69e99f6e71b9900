//! This crate alone against PEFT's fixtures (`cargo test -p peft-prefix`); the full suite, with
//! every architecture and generation, is tests/tests/prefix.rs.

use peft_core::{AdapterModel, MethodConfig};
use peft_tests::{adapter_dir, assert_config_reads_back, assert_logits_match, device, model_dir};

use crate::{PrefixTuningConfig, from_pretrained};

#[test]
fn peft_adapters_give_pefts_logits() {
    for name in ["prefix-bloom", "prefix-bloom-proj"] {
        let base = peft_models::load(model_dir("bloom-tiny"), &device()).unwrap();
        let prefix = from_pretrained(base, adapter_dir(name), false).unwrap();
        assert_logits_match(prefix.model(), name, 1e-4);
    }
}

#[test]
fn pefts_config_reads_back_key_for_key() {
    assert_config_reads_back::<PrefixTuningConfig>("prefix-bloom");
    assert_config_reads_back::<PrefixTuningConfig>("prefix-bloom-proj");
}

#[test]
fn a_projection_without_a_width_is_refused() {
    let err = PrefixTuningConfig::from_json(
        r#"{"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "prefix_projection": true}"#,
        "cfg",
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        "cfg: invalid `encoder_hidden_size`: prefix_projection needs a positive \
         encoder_hidden_size"
    );
}
