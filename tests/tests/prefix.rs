//! Prefix tuning against Hugging Face PEFT: logits, greedy generation, the projection MLP,
//! files, counts and bad adapters.

use peft_core::MethodConfig;
use peft_core::{AdapterModel, CausalLm, TensorStore};
use peft_prefix::{PrefixTuningConfig, from_pretrained, get_peft_model, load_projection};
use peft_tests::{
    Reference, adapter_dir, assert_adamw_step_matches, assert_training_lowers_loss, base_of,
    chat_data, device, fixtures, logits, max_diff_masked, model_dir, reference_json, to_vec,
};

const TOLERANCE: f32 = 1e-4;

fn peft_adapter_matches(name: &str) {
    let device = device();
    let base = peft_models::load(model_dir(base_of(name)), &device).unwrap();
    let prefix = from_pretrained(base, adapter_dir(name), true).unwrap();
    let reference = Reference::load(name);
    let ours = logits(prefix.model(), &reference);
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
        "{name}: the prefix barely changes the logits ({change})"
    );

    let json = reference_json(name);
    let ids: Vec<u32> = serde_json::from_value(json["greedy"]["prompt_ids"].clone()).unwrap();
    let expected: Vec<u32> = serde_json::from_value(json["greedy"]["new_ids"].clone()).unwrap();
    let options = peft_models::GenerateOptions::greedy(expected.len(), prefix.model().spec());
    let new = peft_models::generate(prefix.model(), &[ids], &options, |_, _| {}).unwrap();
    assert_eq!(
        new[0], expected,
        "{name}: greedy generation with the prefix in the cache"
    );

    let out = tempfile::tempdir().unwrap();
    prefix.save_pretrained(out.path()).unwrap();
    let ours = TensorStore::open(out.path().join("adapter_model.safetensors")).unwrap();
    let theirs = TensorStore::open(adapter_dir(name).join("adapter_model.safetensors")).unwrap();
    assert_eq!(
        ours.f32("prompt_embeddings").unwrap(),
        theirs.f32("prompt_embeddings").unwrap()
    );

    // PEFT's counts for a fresh model with the same config.
    let config =
        PrefixTuningConfig::from_file(adapter_dir(name).join("adapter_config.json")).unwrap();
    let base = peft_models::load(model_dir(base_of(name)), &device).unwrap();
    let fresh = get_peft_model(base, config).unwrap();
    let summary = fresh.trainable_summary();
    assert_eq!(
        summary.trainable as u64,
        json["trainable_params"].as_u64().unwrap(),
        "{name}"
    );
    assert_eq!(
        summary.all as u64,
        json["all_params"].as_u64().unwrap(),
        "{name}"
    );
}

#[test]
fn qwen3_prefix_with_explicit_head_dim() {
    peft_adapter_matches("prefix-qwen3");
}

#[test]
fn gemma2_prefix() {
    peft_adapter_matches("prefix-gemma2");
}

#[test]
fn phi3_prefix() {
    peft_adapter_matches("prefix-phi3");
}

#[test]
fn bloom_prefix() {
    peft_adapter_matches("prefix-bloom");
}

#[test]
fn bloom_prefix_with_projection() {
    peft_adapter_matches("prefix-bloom-proj");
}

#[test]
fn llama_gqa_prefix() {
    peft_adapter_matches("prefix-llama");
}

/// The projection MLP with PEFT's weights computes PEFT's saved table, and its weights survive a
/// save → load round trip through `adapter_encoder.safetensors`.
#[test]
fn projection_matches_peft_and_round_trips() {
    let device = device();
    let projection = load_projection(
        &fixtures().join("reference/prefix-bloom-proj-encoder.safetensors"),
        &device,
    )
    .unwrap();
    let ours = to_vec(projection.table());
    let (theirs, _) =
        TensorStore::open(adapter_dir("prefix-bloom-proj").join("adapter_model.safetensors"))
            .unwrap()
            .f32("prompt_embeddings")
            .unwrap();
    let worst = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-5, "projection output max |Δ| = {worst}");

    let base = peft_models::load(model_dir("bloom-tiny"), &device).unwrap();
    let mut model = from_pretrained(base, adapter_dir("prefix-bloom-proj"), true).unwrap();
    model.model.projection = Some(projection);
    model.model.prefix = None;
    let out = tempfile::tempdir().unwrap();
    model.save_pretrained(out.path()).unwrap();
    assert!(out.path().join(peft_prefix::ENCODER_NAME).is_file());
    let base = peft_models::load(model_dir("bloom-tiny"), &device).unwrap();
    let again = from_pretrained(base, out.path(), true).unwrap();
    assert!(
        again.model.projection.is_some(),
        "the projection is restored for training"
    );
    assert_eq!(to_vec(again.model.table()), ours);
}

#[test]
fn adapters_for_other_models_are_refused() {
    let base = peft_models::load(model_dir("bloom-tiny"), &device()).unwrap();
    let err = from_pretrained(base, adapter_dir("prefix-llama"), true)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "num_attention_heads is 2 but this bloom model's number of key/value heads is 4"
        ),
        "{err}"
    );
    let base = peft_models::load(model_dir("bloom-tiny"), &device()).unwrap();
    let zero = PrefixTuningConfig {
        prompt: peft_core::PromptLearningConfig::new(0),
        ..PrefixTuningConfig::default()
    };
    let err = get_peft_model(base, zero).unwrap_err().to_string();
    assert!(err.contains("invalid `num_virtual_tokens`"), "{err}");
}

/// Training the prefix (with its projection) lowers the loss.
#[test]
fn training_lowers_the_loss() {
    let device = device().autodiff();
    let base = peft_models::load(model_dir("llama-tiny"), &device).unwrap();
    let config = PrefixTuningConfig {
        prompt: peft_core::PromptLearningConfig::new(4),
        prefix_projection: true,
        encoder_hidden_size: Some(16),
        ..PrefixTuningConfig::default()
    };
    let prefix = get_peft_model(base, config).unwrap();
    assert_training_lowers_loss(prefix, &chat_data("llama-tiny"), 1e-2);
}

#[test]
fn one_adamw_step_of_the_projection_matches_pytorch() {
    let device = device().autodiff();
    let base = peft_models::load(model_dir("bloom-tiny"), &device).unwrap();
    let config =
        PrefixTuningConfig::from_file(adapter_dir("prefix-bloom-proj").join("adapter_config.json"))
            .unwrap();
    let mut prefix = get_peft_model(base, config).unwrap();
    prefix.model.projection = Some(
        load_projection(
            &fixtures().join("reference/prefix-bloom-proj-encoder.safetensors"),
            &device,
        )
        .unwrap(),
    );
    let checked = assert_adamw_step_matches(prefix.model, "prefix-bloom-proj-train", |name| {
        let rest = name.strip_prefix("projection.")?;
        let (torch, transposed) = match rest {
            "embedding.weight" => ("embedding.weight", false),
            "transform_0.weight" => ("transform.0.weight", true),
            "transform_0.bias" => ("transform.0.bias", false),
            "transform_2.weight" => ("transform.2.weight", true),
            "transform_2.bias" => ("transform.2.bias", false),
            _ => return None,
        };
        Some((format!("prompt_encoder.{torch}"), transposed))
    });
    assert_eq!(checked, 5);
}
