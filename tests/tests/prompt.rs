//! Prompt tuning against Hugging Face PEFT: logits with the virtual positions first, greedy
//! generation, TEXT init, files and parameter counts.

use peft_core::{AdapterModel, CausalLm, TensorStore};
use peft_models::Tokenizer;
use peft_prompt::{
    PromptTuningConfig, PromptTuningInit, from_pretrained, get_peft_model, text_init_ids,
};
use peft_tests::{
    Reference, adapter_dir, assert_adamw_step_matches, assert_training_lowers_loss, base_of,
    chat_data, device, logits, max_diff_masked, model_dir, reference_json,
};

const TOLERANCE: f32 = 1e-4;

fn peft_adapter_matches(name: &str) {
    let device = device();
    let base = peft_models::load(model_dir(base_of(name)), &device).unwrap();
    let prompt = from_pretrained(base, adapter_dir(name), true).unwrap();
    let n = prompt.config.prompt.num_virtual_tokens;
    let reference = Reference::load(name);
    let ours = logits(prompt.model(), &reference);
    let mask = reference.mask_with_virtual(n);
    assert_eq!(
        ours.len(),
        mask.len() * reference.vocab,
        "logits include the virtual positions"
    );
    let diff = max_diff_masked(&ours, &reference.logits, &mask, reference.vocab);
    assert!(diff <= TOLERANCE, "{name}: max |Δ| = {diff}");

    let json = reference_json(name);
    let greedy = &json["greedy"];
    let ids: Vec<u32> = serde_json::from_value(greedy["prompt_ids"].clone()).unwrap();
    let expected: Vec<u32> = serde_json::from_value(greedy["new_ids"].clone()).unwrap();
    let options = peft_models::GenerateOptions::greedy(expected.len(), prompt.model().spec());
    let new = peft_models::generate(prompt.model(), &[ids], &options, |_, _| {}).unwrap();
    assert_eq!(new[0], expected, "{name}: greedy generation");

    let summary = prompt.trainable_summary();
    assert_eq!(
        summary.trainable as u64,
        json["trainable_params"].as_u64().unwrap()
    );
    assert_eq!(summary.all as u64, json["all_params"].as_u64().unwrap());

    // Save → load round trip is exact, with PEFT's key and shape.
    let out = tempfile::tempdir().unwrap();
    prompt.save_pretrained(out.path()).unwrap();
    let ours = TensorStore::open(out.path().join("adapter_model.safetensors")).unwrap();
    let theirs = TensorStore::open(adapter_dir(name).join("adapter_model.safetensors")).unwrap();
    assert_eq!(ours.keys().collect::<Vec<_>>(), vec!["prompt_embeddings"]);
    assert_eq!(
        ours.f32("prompt_embeddings").unwrap(),
        theirs.f32("prompt_embeddings").unwrap()
    );
    let saved: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(saved["peft_type"], "PROMPT_TUNING");
    assert_eq!(saved["token_dim"], 64);
}

#[test]
fn bloom_random_init_adapter() {
    peft_adapter_matches("prompt-bloom-random");
}

#[test]
fn llama_random_init_adapter() {
    peft_adapter_matches("prompt-llama-random");
}

#[test]
fn mistral_random_init_adapter() {
    peft_adapter_matches("prompt-mistral");
}

#[test]
fn qwen3_random_init_adapter() {
    peft_adapter_matches("prompt-qwen3");
}

#[test]
fn qwen2_sliding_window_random_init_adapter() {
    peft_adapter_matches("prompt-qwen2-tiny-swa");
}

#[test]
fn gemma2_random_init_adapter() {
    peft_adapter_matches("prompt-gemma2");
}

#[test]
fn phi3_random_init_adapter() {
    peft_adapter_matches("prompt-phi3");
}

#[test]
fn bloom_text_init_adapter() {
    peft_adapter_matches("prompt-bloom-text");
}

#[test]
fn bloom_text_init_repeated_adapter() {
    peft_adapter_matches("prompt-bloom-text-repeat");
}

/// TEXT init copies the embedding rows of the text's tokens exactly as PEFT (the fixture's table
/// is PEFT's untrained TEXT init), repeating the text when it is shorter.
#[test]
fn text_init_equals_the_embedding_rows() {
    let device = device();
    let tokenizer = Tokenizer::from_dir(model_dir("bloom-tiny")).unwrap();
    let text = "下面是人和聊天机器人的对话。";
    for name in ["prompt-bloom-text", "prompt-bloom-text-repeat"] {
        let expected = TensorStore::open(adapter_dir(name).join("adapter_model.safetensors"))
            .unwrap()
            .f32("prompt_embeddings")
            .unwrap();
        let n = expected.1[0];
        let config = PromptTuningConfig {
            prompt: peft_core::PromptLearningConfig::new(n),
            prompt_tuning_init: PromptTuningInit::Text,
            prompt_tuning_init_text: Some(text.into()),
            ..PromptTuningConfig::default()
        };
        let base = peft_models::load(model_dir("bloom-tiny"), &device).unwrap();
        let ours = get_peft_model(base, config, Some(&tokenizer)).unwrap();
        let table: Vec<f32> = ours
            .model
            .encoder
            .prompt_embeddings
            .val()
            .into_data()
            .try_to_vec_as::<f32>()
            .unwrap();
        assert_eq!(table, expected.0, "{name}");
    }
    let ids = text_init_ids(&tokenizer, text, 20).unwrap();
    let once = tokenizer.encode(text).unwrap();
    assert_eq!(&ids[..once.len()], &once[..]);
    assert_eq!(ids[once.len()], once[0], "the text repeats");
}

#[test]
fn bad_configs_are_clear_errors() {
    let device = device();
    let base = || peft_models::load(model_dir("bloom-tiny"), &device).unwrap();
    let zero = PromptTuningConfig {
        prompt: peft_core::PromptLearningConfig::new(0),
        ..PromptTuningConfig::default()
    };
    let err = get_peft_model(base(), zero, None).unwrap_err().to_string();
    assert!(err.contains("invalid `num_virtual_tokens`"), "{err}");
    let no_text = PromptTuningConfig {
        prompt_tuning_init: PromptTuningInit::Text,
        ..PromptTuningConfig::default()
    };
    let err = get_peft_model(base(), no_text, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("TEXT init needs a non-empty prompt_tuning_init_text"),
        "{err}"
    );
    let no_tokenizer = PromptTuningConfig {
        prompt_tuning_init: PromptTuningInit::Text,
        prompt_tuning_init_text: Some("hi".into()),
        ..PromptTuningConfig::default()
    };
    let err = get_peft_model(base(), no_tokenizer, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("TEXT init needs the model's tokenizer"),
        "{err}"
    );

    // An adapter for a model of another width.
    let dir = tempfile::tempdir().unwrap();
    let config =
        std::fs::read_to_string(adapter_dir("prompt-bloom-random").join("adapter_config.json"))
            .unwrap()
            .replace("\"token_dim\": 64", "\"token_dim\": 32");
    std::fs::write(dir.path().join("adapter_config.json"), config).unwrap();
    std::fs::copy(
        adapter_dir("prompt-bloom-random").join("adapter_model.safetensors"),
        dir.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    let err = from_pretrained(base(), dir.path(), true)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("token_dim is 32") && err.contains("hidden size is 64"),
        "{err}"
    );
}

/// Training moves only the virtual tokens and lowers the loss.
#[test]
fn training_moves_only_the_virtual_tokens() {
    let device = device().autodiff();
    let base = peft_models::load(model_dir("bloom-tiny"), &device).unwrap();
    let prompt = get_peft_model(base, PromptTuningConfig::default(), None).unwrap();
    let trained = assert_training_lowers_loss(prompt, &chat_data("bloom-tiny"), 5e-2);
    let base = peft_models::load(model_dir("bloom-tiny"), &device.clone().inner()).unwrap();
    let original = peft_core::params::named_values(&base).unwrap();
    let now: std::collections::BTreeMap<_, _> =
        peft_core::params::named_values(&trained.model.base)
            .unwrap()
            .into_iter()
            .collect();
    for (name, value) in original {
        assert_eq!(
            value, now[&name],
            "{name} changed: the base must stay frozen"
        );
    }
}

#[test]
fn one_adamw_step_matches_pytorch() {
    let device = device().autodiff();
    let base = peft_models::load(model_dir("bloom-tiny"), &device).unwrap();
    let prompt = from_pretrained(base, adapter_dir("prompt-bloom-random"), true).unwrap();
    let checked = assert_adamw_step_matches(prompt.model, "prompt-bloom-random-train", |name| {
        (name == "encoder.prompt_embeddings")
            .then(|| ("prompt_encoder.embedding.weight".to_string(), false))
    });
    assert_eq!(checked, 1);
}

/// Writes prompt-learning adapters saved by peft-rs to `target/interop/` for
/// `fixtures/check_interop.py`.
#[test]
#[ignore = "writes files for the Python interoperability check"]
fn export_for_python() {
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/interop");
    let device = device();
    for name in ["prompt-bloom-text", "prompt-llama-random"] {
        let base = peft_models::load(model_dir(base_of(name)), &device).unwrap();
        let model = from_pretrained(base, adapter_dir(name), true).unwrap();
        model
            .save_pretrained(&out.join(format!("{name}-adapter")))
            .unwrap();
    }
    for name in ["prefix-bloom", "prefix-llama"] {
        let base = peft_models::load(model_dir(base_of(name)), &device).unwrap();
        let model = peft_prefix::from_pretrained(base, adapter_dir(name), true).unwrap();
        model
            .save_pretrained(&out.join(format!("{name}-adapter")))
            .unwrap();
    }
    for name in ["ptuning-bloom-lstm", "ptuning-llama-mlp"] {
        let base = peft_models::load(model_dir(base_of(name)), &device).unwrap();
        let model = peft_ptuning::from_pretrained(base, adapter_dir(name), true).unwrap();
        model
            .save_pretrained(&out.join(format!("{name}-adapter")))
            .unwrap();
    }
}
