//! BitFit: the seed tutorial's bias-only training, against PyTorch.

use peft_bitfit::{BitFitConfig, from_pretrained, get_peft_model};
use peft_tests::{
    Reference, assert_adamw_step_matches, device, logits, max_diff_masked, model_dir,
    reference_json,
};

#[test]
fn counts_match_the_seed_loop() {
    let base = peft_models::load(model_dir("bloom-tiny"), &device()).unwrap();
    let model = get_peft_model(base, BitFitConfig::default()).unwrap();
    let expected = reference_json("bitfit-bloom");
    assert_eq!(
        model.num_param() as u64,
        expected["num_param"].as_u64().unwrap()
    );
    assert_eq!(
        model.trainable_summary().all as u64,
        expected["all_params"].as_u64().unwrap()
    );
    assert_eq!(
        model.trainable_summary().to_string(),
        "trainable params: 1,536 || all params: 132,992 || trainable%: 1.1550"
    );
}

#[test]
fn a_pattern_restricts_the_biases() {
    let base = peft_models::load(model_dir("bloom-tiny"), &device()).unwrap();
    let config = BitFitConfig {
        bias_pattern: Some("self_attention".into()),
        ..BitFitConfig::default()
    };
    let model = get_peft_model(base, config).unwrap();
    // 2 layers × (query_key_value 192 + dense 64).
    assert_eq!(model.num_param(), 512);
    assert!(model.biases.iter().all(|b| b.contains("self_attention")));
}

#[test]
fn a_model_without_biases_is_a_clear_error() {
    let base = peft_models::load(model_dir("llama-tiny"), &device()).unwrap();
    let err = get_peft_model(base, BitFitConfig::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("this llama model has none"), "{err}");
    assert!(err.contains("bloom") && err.contains("qwen2"), "{err}");
    let base = peft_models::load(model_dir("bloom-tiny"), &device()).unwrap();
    let config = BitFitConfig {
        bias_pattern: Some("nothing_like_this".into()),
        ..BitFitConfig::default()
    };
    let err = get_peft_model(base, config).unwrap_err().to_string();
    assert!(err.contains("matches none of the model's biases"), "{err}");
    assert!(
        err.contains("transformer.h.0.input_layernorm.bias"),
        "{err}"
    );
}

#[test]
fn one_adamw_step_matches_pytorch() {
    let device = device().autodiff();
    let base = peft_models::load(model_dir("bloom-tiny"), &device).unwrap();
    let model = get_peft_model(base, BitFitConfig::default()).unwrap();
    let biases = model.biases.clone();
    let checked = assert_adamw_step_matches(model.model, "bitfit-bloom-train", |name| {
        biases
            .iter()
            .any(|b| b == name)
            .then(|| (name.to_string(), false))
    });
    assert_eq!(checked, biases.len());
}

#[test]
fn trained_biases_save_load_and_merge() {
    use burn::module::Param;

    let device = device();
    let base = peft_models::load(model_dir("bloom-tiny"), &device).unwrap();
    let mut model = get_peft_model(base, BitFitConfig::default()).unwrap();
    // Stand-in for training: shift one selected bias.
    let peft_models::AnyModel::Bloom(bloom) = &mut model.model else {
        panic!("bloom fixture")
    };
    let ln = &mut bloom.transformer.h[0].input_layernorm;
    ln.bias = Param::from_tensor(ln.bias.val() + 0.5);
    let reference = Reference::load("bloom-tiny");
    let trained = logits(&model.model, &reference);
    let change = max_diff_masked(
        &trained,
        &reference.logits,
        &reference.attention_mask,
        reference.vocab,
    );
    assert!(
        change > 0.01,
        "the changed bias must show in the logits ({change})"
    );

    let dir = tempfile::tempdir().unwrap();
    model.save_pretrained(dir.path()).unwrap();
    let store = peft_core::TensorStore::open(dir.path().join("adapter_model.safetensors")).unwrap();
    assert_eq!(store.keys().count(), model.biases.len());
    assert!(store.contains("base_model.model.transformer.h.0.input_layernorm.bias"));

    let base = peft_models::load(model_dir("bloom-tiny"), &device).unwrap();
    let loaded = from_pretrained(base, dir.path(), true).unwrap();
    let again = logits(&loaded.model, &reference);
    assert_eq!(
        again, trained,
        "a loaded BitFit adapter reproduces the trained model"
    );

    let merged_dir = tempfile::tempdir().unwrap();
    peft_models::save_pretrained(
        &loaded.merge_and_unload(),
        model_dir("bloom-tiny"),
        merged_dir.path(),
    )
    .unwrap();
    let merged = peft_models::load(merged_dir.path(), &device).unwrap();
    assert_eq!(logits(&merged, &reference), trained);
}
