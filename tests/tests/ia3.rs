//! (IA)³ against Hugging Face PEFT: PEFT-saved adapters give PEFT's logits, merging scales the
//! weights exactly, files and parameter counts match, and the seed tutorial's call is refused
//! with PEFT's message.

use peft_core::MethodConfig;
use std::collections::BTreeMap;

use peft_core::TensorStore;
use peft_core::params::named_values;
use peft_ia3::{Ia3Config, from_pretrained, get_peft_model};
use peft_tests::{
    Reference, adapter_dir, assert_adamw_step_matches, base_of, device, logits, max_abs_diff,
    max_diff_masked, model_dir, reference_json,
};

const TOLERANCE: f32 = 1e-4;

fn peft_adapter_matches(name: &str) {
    let base = peft_models::load(model_dir(base_of(name)), &device()).unwrap();
    let ia3 = from_pretrained(base, adapter_dir(name), false).unwrap();
    let reference = Reference::load(name);
    let ours = logits(&ia3.model, &reference);
    let diff = max_diff_masked(
        &ours,
        &reference.logits,
        &reference.attention_mask,
        reference.vocab,
    );
    assert!(diff <= TOLERANCE, "{name}: max |Δ| = {diff}");
    let base_ref = Reference::load(base_of(name));
    let change = max_diff_masked(
        &ours,
        &base_ref.logits,
        &reference.attention_mask,
        reference.vocab,
    );
    assert!(
        change > 0.05,
        "{name}: the adapter barely changes the logits ({change})"
    );
}

fn merge_matches_unmerged(name: &str) {
    let device = device();
    let reference = Reference::load(name);
    let base = peft_models::load(model_dir(base_of(name)), &device).unwrap();
    let base_values: BTreeMap<_, _> = named_values(&base).unwrap().into_iter().collect();
    let ia3 = from_pretrained(base, adapter_dir(name), false).unwrap();
    let unmerged = logits(&ia3.model, &reference);
    let ia3 = ia3.merge_adapter().unwrap();
    let merged = logits(&ia3.model, &reference);
    let diff = max_diff_masked(
        &merged,
        &unmerged,
        &reference.attention_mask,
        reference.vocab,
    );
    assert!(
        diff <= TOLERANCE,
        "{name}: merged vs unmerged max |Δ| = {diff}"
    );
    let ia3 = ia3.unmerge_adapter().unwrap();
    let restored: BTreeMap<_, _> = named_values(&ia3.model).unwrap().into_iter().collect();
    for (key, before) in &base_values {
        let worst = max_abs_diff(before, &restored[key]);
        assert!(worst <= 1e-5, "{name}: {key} off by {worst} after unmerge");
    }
    let plain = ia3.merge_and_unload().unwrap();
    let out = tempfile::tempdir().unwrap();
    peft_models::save_pretrained(&plain, model_dir(base_of(name)), out.path()).unwrap();
    let reloaded = peft_models::load(out.path(), &device).unwrap();
    let diff = max_diff_masked(
        &logits(&reloaded, &reference),
        &unmerged,
        &reference.attention_mask,
        reference.vocab,
    );
    assert!(
        diff <= TOLERANCE,
        "{name}: merged checkpoint max |Δ| = {diff}"
    );
}

fn save_round_trip(name: &str) {
    let base = peft_models::load(model_dir(base_of(name)), &device()).unwrap();
    let ia3 = from_pretrained(base, adapter_dir(name), false).unwrap();
    let out = tempfile::tempdir().unwrap();
    ia3.save_pretrained(out.path()).unwrap();
    let theirs = TensorStore::open(adapter_dir(name).join("adapter_model.safetensors")).unwrap();
    let ours = TensorStore::open(out.path().join("adapter_model.safetensors")).unwrap();
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    for key in theirs.keys() {
        assert_eq!(ours.f32(key).unwrap(), theirs.f32(key).unwrap(), "{key}");
    }
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "IA3");
    assert_eq!(config["inference_mode"], true);
}

fn trainable_counts_match(name: &str) {
    let base = peft_models::load(model_dir(base_of(name)), &device()).unwrap();
    let ia3 = from_pretrained(base, adapter_dir(name), true).unwrap();
    let expected = reference_json(name);
    let summary = ia3.trainable_summary();
    assert_eq!(
        summary.trainable as u64,
        expected["trainable_params"].as_u64().unwrap()
    );
    assert_eq!(summary.all as u64, expected["all_params"].as_u64().unwrap());
    let base = peft_models::load(model_dir(base_of(name)), &device()).unwrap();
    let fresh = get_peft_model(base, Ia3Config::default()).unwrap();
    assert_eq!(fresh.trainable_summary(), summary);
    // Vectors of ones: a fresh adapter leaves the model unchanged.
    let reference = Reference::load(base_of(name));
    let diff = max_diff_masked(
        &logits(&fresh.model, &reference),
        &reference.logits,
        &reference.attention_mask,
        reference.vocab,
    );
    assert!(
        diff <= TOLERANCE,
        "{name}: fresh adapter changes logits by {diff}"
    );
}

macro_rules! ia3_suite {
    ($module:ident, $name:literal) => {
        mod $module {
            #[test]
            fn peft_adapter_matches() {
                super::peft_adapter_matches($name);
            }
            #[test]
            fn merge_matches_unmerged() {
                super::merge_matches_unmerged($name);
            }
            #[test]
            fn save_round_trip() {
                super::save_round_trip($name);
            }
            #[test]
            fn trainable_counts_match() {
                super::trainable_counts_match($name);
            }
        }
    };
}

ia3_suite!(bloom_defaults, "ia3-bloom");
ia3_suite!(llama_defaults, "ia3-llama");

#[test]
fn seed_call_is_refused_with_peft_message() {
    let expected = reference_json("ia3-seed-call");
    let message = expected["error"].as_str().unwrap();
    let err = Ia3Config::from_json(
        r#"{"target_modules": ["query_key_value"], "feedforward_modules": ["mlp.dense_4h_to_h"]}"#,
        "IA3Config",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(message),
        "PEFT says {message:?}; we say {err:?}"
    );
}

#[test]
fn adapter_for_another_architecture_is_refused() {
    let base = peft_models::load(model_dir("bloom-tiny"), &device()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        adapter_dir("ia3-llama").join("adapter_model.safetensors"),
        dir.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    std::fs::copy(
        adapter_dir("ia3-bloom").join("adapter_config.json"),
        dir.path().join("adapter_config.json"),
    )
    .unwrap();
    let err = from_pretrained(base, dir.path(), false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing tensor") || err.contains("another architecture"),
        "{err}"
    );
}

#[test]
fn one_adamw_step_matches_pytorch() {
    let device = device().autodiff();
    let base = peft_models::load(model_dir("bloom-tiny"), &device).unwrap();
    let ia3 = from_pretrained(base, adapter_dir("ia3-bloom"), true).unwrap();
    let checked = assert_adamw_step_matches(ia3.model, "ia3-bloom-train", |name| {
        let module = name.strip_suffix(".adapter.ia3_l")?;
        Some((format!("base_model.model.{module}.ia3_l"), false))
    });
    assert_eq!(checked, 4);
}

/// Writes IA3 adapters saved by peft-rs to `target/interop/` for `fixtures/check_interop.py`.
#[test]
#[ignore = "writes files for the Python interoperability check"]
fn export_for_python() {
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/interop");
    for name in ["ia3-bloom", "ia3-llama"] {
        let base = peft_models::load(model_dir(base_of(name)), &device()).unwrap();
        let ia3 = from_pretrained(base, adapter_dir(name), true).unwrap();
        ia3.save_pretrained(out.join(format!("{name}-adapter")))
            .unwrap();
        let merged = ia3.merge_and_unload().unwrap();
        peft_models::save_pretrained(
            &merged,
            model_dir(base_of(name)),
            out.join(format!("{name}-merged")),
        )
        .unwrap();
    }
}
