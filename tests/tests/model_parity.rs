//! Logits, greedy generation and tokenisation against transformers (fixtures recorded by
//! `fixtures/make_fixtures.py`).

use burn::tensor::{Int, Tensor, TensorData};
use peft_core::{CausalLm, ModelInput};
use peft_models::{GenerateOptions, Tokenizer, generate};
use peft_tests::{Reference, device, fixtures, max_diff_masked, model_dir, to_vec};

const TOLERANCE: f32 = 1e-4;

fn logits_match_transformers(name: &str) {
    let device = device();
    let model = peft_models::load(model_dir(name), &device).unwrap();
    let reference = Reference::load(name);
    let logits = model
        .forward(
            ModelInput::with_mask(reference.ids(&device), reference.mask(&device)),
            None,
        )
        .unwrap();
    assert_eq!(
        logits.dims(),
        [reference.shape[0], reference.shape[1], reference.vocab]
    );
    let ours = to_vec(logits);
    let diff = max_diff_masked(
        &ours,
        &reference.logits,
        &reference.attention_mask,
        reference.vocab,
    );
    eprintln!("{name}: max |Δ| = {diff}");
    assert!(diff <= TOLERANCE, "{name}: max |Δ| = {diff}");
}

/// Each row run alone, without padding, gives the logits of the padded batch.
fn left_padding_changes_nothing(name: &str) {
    let device = device();
    let model = peft_models::load(model_dir(name), &device).unwrap();
    let reference = Reference::load(name);
    let [batch, seq] = reference.shape;
    let vocab = reference.vocab;
    for row in 0..batch {
        let ids: Vec<i64> = reference.input_ids[row * seq..(row + 1) * seq]
            .iter()
            .zip(&reference.attention_mask[row * seq..(row + 1) * seq])
            .filter(|(_, m)| **m == 1)
            .map(|(i, _)| *i)
            .collect();
        let n = ids.len();
        let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
        let alone = to_vec(model.forward(ModelInput::new(input), None).unwrap());
        let padded = &reference.logits[(row * seq + seq - n) * vocab..(row + 1) * seq * vocab];
        let diff = max_diff_masked(&alone, padded, &vec![1; n], vocab);
        assert!(diff <= TOLERANCE, "{name} row {row}: max |Δ| = {diff}");
    }
}

fn greedy_generation_matches(name: &str) {
    let device = device();
    let model = peft_models::load(model_dir(name), &device).unwrap();
    let text =
        std::fs::read_to_string(fixtures().join("reference").join(format!("{name}.json"))).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    for case in json["greedy"].as_array().unwrap() {
        let prompt: Vec<u32> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
        let expected: Vec<u32> = serde_json::from_value(case["new_ids"].clone()).unwrap();
        let options = GenerateOptions::greedy(expected.len(), model.spec());
        let new = generate(&model, &[prompt], &options, |_, _| {}).unwrap();
        assert_eq!(new[0], expected, "{name}: prompt {:?}", case["prompt"]);
    }
}

/// A KV-cached step gives the same logits as recomputing the whole sequence.
fn cache_matches_full_forward(name: &str) {
    let device = device();
    let model = peft_models::load(model_dir(name), &device).unwrap();
    let reference = Reference::load(name);
    let [batch, seq] = reference.shape;
    let vocab = reference.vocab;
    let ids = reference.ids(&device);
    let mask = reference.mask(&device);
    let split = seq - 3;
    let mut cache = peft_core::KvCache::new(model.spec().num_layers);
    model
        .forward(
            ModelInput::with_mask(
                ids.clone().slice_dim(1, 0..split),
                mask.clone().slice_dim(1, 0..split),
            ),
            Some(&mut cache),
        )
        .unwrap();
    let tail = model
        .forward(
            ModelInput::with_mask(ids.slice_dim(1, split..seq), mask.slice_dim(1, split..seq)),
            Some(&mut cache),
        )
        .unwrap();
    let ours = to_vec(tail);
    let mut expected = Vec::new();
    let mut tail_mask = Vec::new();
    for row in 0..batch {
        expected.extend_from_slice(
            &reference.logits[(row * seq + split) * vocab..(row + 1) * seq * vocab],
        );
        tail_mask.extend_from_slice(&reference.attention_mask[row * seq + split..(row + 1) * seq]);
    }
    let diff = max_diff_masked(&ours, &expected, &tail_mask, vocab);
    assert!(diff <= TOLERANCE, "{name}: cached max |Δ| = {diff}");
}

macro_rules! parity_suite {
    ($module:ident, $name:literal) => {
        mod $module {
            #[test]
            fn logits_match_transformers() {
                super::logits_match_transformers($name);
            }
            #[test]
            fn left_padding_changes_nothing() {
                super::left_padding_changes_nothing($name);
            }
            #[test]
            fn greedy_generation_matches() {
                super::greedy_generation_matches($name);
            }
            #[test]
            fn cache_matches_full_forward() {
                super::cache_matches_full_forward($name);
            }
        }
    };
}

parity_suite!(bloom, "bloom-tiny");
parity_suite!(llama_gqa, "llama-tiny");
parity_suite!(qwen2_bf16, "qwen2-tiny");
parity_suite!(qwen2_sliding_window, "qwen2-tiny-swa");
parity_suite!(qwen3, "qwen3-tiny");
parity_suite!(qwen3_f16_checkpoint, "qwen3-tiny-f16");
parity_suite!(mistral_bf16_checkpoint, "mistral-tiny-bf16");
parity_suite!(mistral, "mistral-tiny");
parity_suite!(gemma2, "gemma2-tiny");
parity_suite!(phi3_partial_rotary, "phi3-tiny");
parity_suite!(llama_rope_linear, "llama-rope-linear");
parity_suite!(llama_rope_dynamic, "llama-rope-dynamic");
parity_suite!(llama_rope_yarn_head_dim_biases, "llama-rope-yarn");
parity_suite!(llama3_rope_transformers4_layout, "llama-rope-llama3");

#[test]
fn tokenizer_ids_match_transformers() {
    let tokenizer = Tokenizer::from_dir(model_dir("bloom-tiny")).unwrap();
    let text = std::fs::read_to_string(fixtures().join("reference/tokenization.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert!(cases.len() >= 4);
    for case in cases {
        let input = case["text"].as_str().unwrap();
        let expected: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let ids = tokenizer.encode(input).unwrap();
        assert_eq!(ids, expected, "text {input:?}");
        assert_eq!(tokenizer.decode(&ids).unwrap(), input);
    }
}

/// Generation stops at any of the model's EOS ids (Llama 3 lists several); the stopping token is
/// kept, as transformers returns it.
#[test]
fn generation_stops_at_any_eos_id() {
    let device = device();
    let model = peft_models::load(model_dir("llama-tiny"), &device).unwrap();
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/llama-tiny.json")).unwrap(),
    )
    .unwrap();
    let case = &json["greedy"][1];
    let prompt: Vec<u32> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
    let full: Vec<u32> = serde_json::from_value(case["new_ids"].clone()).unwrap();
    let mut options = GenerateOptions::greedy(full.len(), model.spec());
    // The third token becomes an "EOS" alongside one that never appears.
    options.eos_token_ids = vec![511, full[2]];
    let stopped = generate(&model, &[prompt], &options, |_, _| {}).unwrap();
    let first = full.iter().position(|&t| t == full[2]).unwrap();
    assert_eq!(stopped[0], full[..=first]);
}

/// `eos_token_id` as a list in config.json, and generation_config.json's list overriding it,
/// as transformers' `generate` reads them.
#[test]
fn eos_lists_from_config_and_generation_config() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(model_dir("llama-tiny")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let config_path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["eos_token_id"] = serde_json::json!([2, 7]);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let _ = std::fs::remove_file(dir.path().join("generation_config.json"));
    let model = peft_models::load(dir.path(), &device()).unwrap();
    assert_eq!(model.spec().eos_token_ids, vec![2, 7]);
    assert_eq!(model.spec().eos_token_id(), Some(2));
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [9, 2, 11], "pad_token_id": null}"#,
    )
    .unwrap();
    let model = peft_models::load(dir.path(), &device()).unwrap();
    assert_eq!(model.spec().eos_token_ids, vec![9, 2, 11]);
}
