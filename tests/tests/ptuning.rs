//! P-tuning against Hugging Face PEFT: the MLP and bidirectional-LSTM encoders compute PEFT's
//! virtual tokens from PEFT's weights; PEFT's adapters give PEFT's logits and generations.

use peft_core::MethodConfig;
use peft_core::prompt_learning::VirtualTokenEncoder;
use peft_core::{AdapterModel, CausalLm, TensorStore};
use peft_ptuning::{PromptEncoderConfig, from_pretrained, get_peft_model, load_encoder};
use peft_tests::{
    Reference, adapter_dir, assert_adamw_step_matches, assert_training_lowers_loss, base_of,
    chat_data, device, fixtures, logits, max_diff_masked, model_dir, reference_json, to_vec,
};

const TOLERANCE: f32 = 1e-4;

fn peft_table(name: &str) -> Vec<f32> {
    TensorStore::open(adapter_dir(name).join("adapter_model.safetensors"))
        .unwrap()
        .f32("prompt_embeddings")
        .unwrap()
        .0
}

fn peft_adapter_matches(name: &str) {
    let device = device();
    let base = peft_models::load(model_dir(base_of(name)), &device).unwrap();
    let ptuning = from_pretrained(base, adapter_dir(name), true).unwrap();
    let n = ptuning.config.prompt.num_virtual_tokens;
    let reference = Reference::load(name);
    let ours = logits(ptuning.model(), &reference);
    let diff = max_diff_masked(
        &ours,
        &reference.logits,
        &reference.mask_with_virtual(n),
        reference.vocab,
    );
    assert!(diff <= TOLERANCE, "{name}: max |Δ| = {diff}");

    let json = reference_json(name);
    let ids: Vec<u32> = serde_json::from_value(json["greedy"]["prompt_ids"].clone()).unwrap();
    let expected: Vec<u32> = serde_json::from_value(json["greedy"]["new_ids"].clone()).unwrap();
    let options = peft_models::GenerateOptions::greedy(expected.len(), ptuning.model().spec());
    let new = peft_models::generate(ptuning.model(), &[ids], &options, |_, _| {}).unwrap();
    assert_eq!(new[0], expected, "{name}: greedy generation");

    // The encoder with PEFT's weights computes PEFT's saved virtual tokens.
    let encoder = load_encoder(
        &fixtures()
            .join("reference")
            .join(format!("{name}-encoder.safetensors")),
        &ptuning.config,
        &device,
    )
    .unwrap();
    let tokens = to_vec(encoder.virtual_tokens());
    let theirs = peft_table(name);
    let worst = tokens
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-5, "{name}: encoder output max |Δ| = {worst}");

    // PEFT's counts (training mode: the encoder's weights train).
    let config =
        PromptEncoderConfig::from_file(adapter_dir(name).join("adapter_config.json")).unwrap();
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

    // Saving with the encoder: PEFT's file holds the output, ours the weights; loading restores
    // the encoder.
    let mut trained = fresh;
    trained.model.encoder.encoder = Some(encoder);
    let out = tempfile::tempdir().unwrap();
    trained.save_pretrained(out.path()).unwrap();
    let saved = TensorStore::open(out.path().join("adapter_model.safetensors"))
        .unwrap()
        .f32("prompt_embeddings")
        .unwrap()
        .0;
    let worst = saved
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-5, "{name}: saved table max |Δ| = {worst}");
    let base = peft_models::load(model_dir(base_of(name)), &device).unwrap();
    let again = from_pretrained(base, out.path(), true).unwrap();
    assert!(
        again.model.encoder.encoder.is_some(),
        "{name}: the encoder is restored"
    );
    assert_eq!(to_vec(again.model.encoder.virtual_tokens()), tokens);
}

#[test]
fn bloom_mlp_encoder() {
    peft_adapter_matches("ptuning-bloom-mlp");
}

#[test]
fn bloom_bidirectional_lstm_encoder() {
    peft_adapter_matches("ptuning-bloom-lstm");
}

#[test]
fn llama_mlp_encoder() {
    peft_adapter_matches("ptuning-llama-mlp");
}

#[test]
fn bad_configs_are_clear_errors() {
    let base = peft_models::load(model_dir("bloom-tiny"), &device()).unwrap();
    let zero = PromptEncoderConfig {
        prompt: peft_core::PromptLearningConfig::new(0),
        ..PromptEncoderConfig::default()
    };
    let err = get_peft_model(base, zero).unwrap_err().to_string();
    assert!(err.contains("invalid `num_virtual_tokens`"), "{err}");
}

#[test]
fn training_the_lstm_encoder_lowers_the_loss() {
    let device = device().autodiff();
    let base = peft_models::load(model_dir("bloom-tiny"), &device).unwrap();
    let config = PromptEncoderConfig::from_file(
        adapter_dir("ptuning-bloom-lstm").join("adapter_config.json"),
    )
    .unwrap();
    let ptuning = get_peft_model(base, config).unwrap();
    assert_training_lowers_loss(ptuning, &chat_data("bloom-tiny"), 1e-2);
}

/// PEFT's name of one of our encoder parameters, and whether ours is stored transposed.
fn torch_name(name: &str) -> Option<(String, bool)> {
    let rest = name.strip_prefix("encoder.encoder.")?;
    if rest == "embedding" {
        return Some(("prompt_encoder.embedding.weight".into(), false));
    }
    let parts: Vec<&str> = rest.split('.').collect();
    match parts.as_slice() {
        ["mlp_head", k, kind] => {
            let k: usize = k.parse().ok()?;
            Some((
                format!("prompt_encoder.mlp_head.{}.{kind}", 2 * k),
                *kind == "weight",
            ))
        }
        ["lstm_head", layer, direction, which] => {
            let suffix = if *direction == "reverse" {
                "_reverse"
            } else {
                ""
            };
            let (torch, transposed) = match *which {
                "w_ih" => ("weight_ih", true),
                "w_hh" => ("weight_hh", true),
                "b_ih" => ("bias_ih", false),
                "b_hh" => ("bias_hh", false),
                _ => return None,
            };
            Some((
                format!("prompt_encoder.lstm_head.{torch}_l{layer}{suffix}"),
                transposed,
            ))
        }
        _ => None,
    }
}

#[test]
fn one_adamw_step_of_the_lstm_encoder_matches_pytorch() {
    let device = device().autodiff();
    let base = peft_models::load(model_dir("bloom-tiny"), &device).unwrap();
    let config = PromptEncoderConfig::from_file(
        adapter_dir("ptuning-bloom-lstm").join("adapter_config.json"),
    )
    .unwrap();
    let mut ptuning = get_peft_model(base, config.clone()).unwrap();
    ptuning.model.encoder.encoder = Some(
        load_encoder(
            &fixtures().join("reference/ptuning-bloom-lstm-encoder.safetensors"),
            &config,
            &device,
        )
        .unwrap(),
    );
    let checked = assert_adamw_step_matches(ptuning.model, "ptuning-bloom-lstm-train", torch_name);
    // embedding + 2 layers × 2 directions × 4 tensors + 2 linear layers × 2.
    assert_eq!(checked, 1 + 16 + 4);
}
