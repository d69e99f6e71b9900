//! LoRA against Hugging Face PEFT: adapters saved by PEFT load here with PEFT's logits; ours save
//! in PEFT's format; merging, unmerging and the trainable-parameter line match.

use peft_core::MethodConfig;
use std::collections::BTreeMap;

use peft_core::params::named_values;
use peft_core::{CausalLm, ModelInput, TensorStore};
use peft_lora::{LoraConfig, from_pretrained, get_peft_model};
use peft_tests::{
    Reference, adapter_dir, assert_adamw_step_matches, base_of, device, logits, max_abs_diff,
    max_diff_masked, model_dir, reference_json, to_vec,
};

const TOLERANCE: f32 = 1e-4;

/// A PEFT-saved adapter gives PEFT's logits on the left-padded batch, and they differ from the
/// base model's.
fn peft_adapter_matches(name: &str) {
    let device = device();
    let base = peft_models::load(model_dir(base_of(name)), &device).unwrap();
    let lora = from_pretrained(base, adapter_dir(name), false).unwrap();
    let reference = Reference::load(name);
    let ours = logits(&lora.model, &reference);
    peft_tests::assert_logits_match(&lora.model, name, TOLERANCE);
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

/// merge_and_unload gives the unmerged logits; merge then unmerge restores the base weights.
fn merge_matches_unmerged(name: &str) {
    let device = device();
    let reference = Reference::load(name);
    let base = peft_models::load(model_dir(base_of(name)), &device).unwrap();
    let base_values: BTreeMap<_, _> = named_values(&base).unwrap().into_iter().collect();
    let lora = from_pretrained(base, adapter_dir(name), false).unwrap();
    let unmerged = logits(&lora.model, &reference);

    let lora = lora.merge_adapter().unwrap();
    let merged = logits(&lora.model, &reference);
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

    let lora = lora.unmerge_adapter().unwrap();
    let restored: BTreeMap<_, _> = named_values(&lora.model).unwrap().into_iter().collect();
    for (key, before) in &base_values {
        // modules_to_save replaced these with the trained copy on purpose.
        if lora.saved_params.contains(key) {
            continue;
        }
        let worst = max_abs_diff(before, &restored[key]);
        assert!(worst <= 1e-6, "{name}: {key} off by {worst} after unmerge");
    }

    let plain = lora.merge_and_unload().unwrap();
    let unloaded = logits(&plain, &reference);
    let diff = max_diff_masked(
        &unloaded,
        &unmerged,
        &reference.attention_mask,
        reference.vocab,
    );
    assert!(
        diff <= TOLERANCE,
        "{name}: merge_and_unload max |Δ| = {diff}"
    );

    // The merged model saves as a plain HF checkpoint that loads again with the same logits.
    let out = tempfile::tempdir().unwrap();
    peft_models::save_pretrained(&plain, model_dir(base_of(name)), out.path()).unwrap();
    let reloaded = peft_models::load(out.path(), &device).unwrap();
    let again = logits(&reloaded, &reference);
    let diff = max_diff_masked(
        &again,
        &unmerged,
        &reference.attention_mask,
        reference.vocab,
    );
    assert!(
        diff <= TOLERANCE,
        "{name}: reloaded merged checkpoint max |Δ| = {diff}"
    );
    assert!(out.path().join("tokenizer.json").is_file());
}

/// Saving writes PEFT's keys and shapes, and the saved adapter reloads to the same tensors.
fn save_round_trip(name: &str) {
    let device = device();
    let base = peft_models::load(model_dir(base_of(name)), &device).unwrap();
    let lora = from_pretrained(base, adapter_dir(name), false).unwrap();
    let out = tempfile::tempdir().unwrap();
    lora.save_pretrained(out.path()).unwrap();

    let theirs = TensorStore::open(adapter_dir(name).join("adapter_model.safetensors")).unwrap();
    let ours = TensorStore::open(out.path().join("adapter_model.safetensors")).unwrap();
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    for key in theirs.keys() {
        let (a, sa) = ours.f32(key).unwrap();
        let (b, sb) = theirs.f32(key).unwrap();
        assert_eq!(sa, sb, "{key}");
        assert_eq!(a, b, "{key}: values differ after a save/load round trip");
    }
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["inference_mode"], true);

    let base = peft_models::load(model_dir(base_of(name)), &device).unwrap();
    let again = from_pretrained(base, out.path(), false).unwrap();
    let reference = Reference::load(name);
    let diff = max_diff_masked(
        &logits(&again.model, &reference),
        &reference.logits,
        &reference.attention_mask,
        reference.vocab,
    );
    assert!(
        diff <= TOLERANCE,
        "{name}: re-saved adapter max |Δ| = {diff}"
    );
}

/// `trainable_summary()` prints the numbers PEFT printed for the same config.
pub(crate) fn trainable_counts_match(name: &str) {
    let device = device();
    let base = peft_models::load(model_dir(base_of(name)), &device).unwrap();
    let lora = from_pretrained(base, adapter_dir(name), true).unwrap();
    let expected = reference_json(name);
    let summary = lora.trainable_summary();
    assert_eq!(
        summary.trainable as u64,
        expected["trainable_params"].as_u64().unwrap()
    );
    assert_eq!(summary.all as u64, expected["all_params"].as_u64().unwrap());

    // Fresh injection from the same config counts the same.
    let config = LoraConfig::from_file(adapter_dir(name).join("adapter_config.json")).unwrap();
    let base = peft_models::load(model_dir(base_of(name)), &device).unwrap();
    let fresh = get_peft_model(base, config).unwrap();
    assert_eq!(fresh.trainable_summary(), summary);
}

macro_rules! lora_suite {
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

lora_suite!(bloom_default_targets, "lora-bloom");
lora_suite!(bloom_modules_to_save, "lora-bloom-mts");
lora_suite!(llama_gqa_patterns_rslora, "lora-llama");
lora_suite!(llama_embedding_and_mlp, "lora-llama-emb");
// PEFT's default targets (q_proj, v_proj) on the newer architectures.
lora_suite!(mistral_sliding_window, "lora-mistral");
lora_suite!(qwen3_head_norms, "lora-qwen3");
lora_suite!(qwen2_sliding_window, "lora-qwen2-tiny-swa");
lora_suite!(llama3_rope_scaling, "lora-llama-rope-llama3");
lora_suite!(gemma2_softcapping, "lora-gemma2");
lora_suite!(phi3_fused_projections, "lora-phi3");
// LoRA settings beyond the defaults (fixtures/make_lora_variant_fixtures.py).
lora_suite!(bloom_bias_all, "lora-bloom-bias-all");
lora_suite!(bloom_bias_lora_only, "lora-bloom-bias-lora-only");
lora_suite!(bloom_gaussian_init, "lora-bloom-gaussian");
lora_suite!(llama_layers_to_transform_and_exclude, "lora-llama-layers");

#[test]
fn trainable_line_is_peft_formatted() {
    let base = peft_models::load(model_dir("bloom-tiny"), &device()).unwrap();
    let lora = from_pretrained(base, adapter_dir("lora-bloom"), true).unwrap();
    assert_eq!(
        lora.trainable_summary().to_string(),
        "trainable params: 2,048 || all params: 135,040 || trainable%: 1.5166"
    );
}

#[test]
fn fresh_adapter_starts_as_a_no_op() {
    let device = device();
    let reference = Reference::load("bloom-tiny");
    let base = peft_models::load(model_dir("bloom-tiny"), &device).unwrap();
    let lora = get_peft_model(base, LoraConfig::default()).unwrap();
    let diff = max_diff_masked(
        &logits(&lora.model, &reference),
        &reference.logits,
        &reference.attention_mask,
        reference.vocab,
    );
    assert!(
        diff <= TOLERANCE,
        "B = 0 must leave the logits unchanged ({diff})"
    );
}

mod bad_input {
    use super::*;

    fn copy_adapter(name: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(adapter_dir(name).join(f), dir.path().join(f)).unwrap();
        }
        dir
    }

    fn load_err(model: &str, adapter: &std::path::Path) -> String {
        let base = peft_models::load(model_dir(model), &device()).unwrap();
        from_pretrained(base, adapter, false)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn target_modules_matching_nothing_lists_the_modules() {
        let base = peft_models::load(model_dir("bloom-tiny"), &device()).unwrap();
        let config = LoraConfig::from_json(r#"{"target_modules": ["q_proj"]}"#, "test").unwrap();
        let err = get_peft_model(base, config).unwrap_err().to_string();
        assert!(
            err.contains("target modules [\"q_proj\"] not found"),
            "{err}"
        );
        assert!(
            err.contains("transformer.h.0.self_attention.query_key_value"),
            "{err}"
        );
    }

    #[test]
    fn adapter_for_another_architecture_is_refused() {
        let err = load_err("bloom-tiny", &adapter_dir("lora-llama"));
        assert!(err.contains("not found in the base model"), "{err}");
        // Same target names but a different layer count: the extra layer names no module.
        let dir = copy_adapter("lora-bloom");
        let store = TensorStore::open(dir.path().join("adapter_model.safetensors")).unwrap();
        let mut tensors = BTreeMap::new();
        for key in store.keys() {
            tensors.insert(key.to_string(), store.get(key).unwrap());
        }
        let extra = store
            .get("base_model.model.transformer.h.1.self_attention.query_key_value.lora_A.weight")
            .unwrap();
        tensors.insert(
            "base_model.model.transformer.h.7.self_attention.query_key_value.lora_A.weight".into(),
            extra,
        );
        peft_tensors::save_safetensors(
            dir.path().join("adapter_model.safetensors"),
            &tensors,
            None,
        )
        .unwrap();
        let err = load_err("bloom-tiny", dir.path());
        assert!(
            err.contains("transformer.h.7.self_attention.query_key_value"),
            "{err}"
        );
        assert!(err.contains("another architecture"), "{err}");
    }

    #[test]
    fn wrong_tensor_shape_names_the_key() {
        let dir = copy_adapter("lora-bloom");
        let store = TensorStore::open(dir.path().join("adapter_model.safetensors")).unwrap();
        let mut tensors = BTreeMap::new();
        for key in store.keys() {
            tensors.insert(key.to_string(), store.get(key).unwrap());
        }
        let key = "base_model.model.transformer.h.0.self_attention.query_key_value.lora_A.weight";
        tensors.insert(
            key.into(),
            peft_core::HostTensor::from_f32(vec![4, 63], &[0.0; 252]),
        );
        peft_tensors::save_safetensors(
            dir.path().join("adapter_model.safetensors"),
            &tensors,
            None,
        )
        .unwrap();
        let err = load_err("bloom-tiny", dir.path());
        assert!(
            err.contains(key) && err.contains("[4, 63]") && err.contains("[4, 64]"),
            "{err}"
        );
    }

    #[test]
    fn bad_config_values_are_named() {
        let dir = copy_adapter("lora-bloom");
        let path = dir.path().join("adapter_config.json");
        let original = std::fs::read_to_string(&path).unwrap();
        let cases = [
            (r#""r": 4"#, r#""r": 0"#, "invalid `r`"),
            (
                r#""rank_pattern": {}"#,
                r#""rank_pattern": {"(qkv": 2}"#,
                "invalid regex `(qkv`",
            ),
            (
                r#""lora_bias": false"#,
                r#""lora_bias": true"#,
                "`lora_bias: true` is not supported",
            ),
        ];
        for (from, to, needle) in cases {
            assert!(original.contains(from), "fixture lacks {from}");
            std::fs::write(&path, original.replace(from, to)).unwrap();
            let err = load_err("bloom-tiny", dir.path());
            assert!(err.contains(needle), "{err}");
            assert!(err.contains("adapter_config.json"), "{err}");
        }
        std::fs::write(&path, "{ truncated").unwrap();
        let err = load_err("bloom-tiny", dir.path());
        assert!(err.contains("adapter_config.json: invalid JSON"), "{err}");
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_err("bloom-tiny", dir.path());
        assert!(err.contains("adapter_config.json"), "{err}");
        std::fs::copy(
            adapter_dir("lora-bloom").join("adapter_config.json"),
            dir.path().join("adapter_config.json"),
        )
        .unwrap();
        let err = load_err("bloom-tiny", dir.path());
        assert!(err.contains("adapter_model.safetensors"), "{err}");
    }
}

/// One training step from PEFT's adapter: same loss, same LoRA gradients, same AdamW update as
/// PyTorch (relative error ≤ 1e-4); the frozen base gets no gradient.
#[test]
fn one_adamw_step_matches_pytorch() {
    let device = device().autodiff();
    let base = peft_models::load(model_dir("bloom-tiny"), &device).unwrap();
    let lora = from_pretrained(base, adapter_dir("lora-bloom"), true).unwrap();
    let checked = assert_adamw_step_matches(lora.model, "lora-bloom-train", |name| {
        let (module, which) = name.rsplit_once(".adapter.")?;
        let suffix = if which == "lora_a" {
            "lora_A"
        } else {
            "lora_B"
        };
        Some((format!("base_model.model.{module}.{suffix}.weight"), true))
    });
    assert_eq!(checked, 4);
}

/// On a left-padded batch the gradient of LoRA B agrees with central finite differences of the
/// loss (PyTorch's own autograd does not there; see docs/FIXTURES.md).
#[test]
fn gradients_match_finite_differences_with_left_padding() {
    use burn::module::Param;
    use burn::tensor::{Int, Tensor, TensorData};
    use peft_ops::loss::causal_lm_loss;

    let reference = Reference::load("lora-bloom");
    let labels: Vec<i64> = reference
        .input_ids
        .iter()
        .zip(&reference.attention_mask)
        .map(|(&id, &m)| if m == 1 { id } else { -100 })
        .collect();
    // Loss after adding `delta` to element `index` of layer 1's lora_b, and that element's
    // gradient.
    let run = |device: &burn::tensor::Device, index: usize, delta: f32| -> (f32, Option<f32>) {
        let base = peft_models::load(model_dir("bloom-tiny"), device).unwrap();
        let mut lora = from_pretrained(base, adapter_dir("lora-bloom"), true).unwrap();
        let peft_models::AnyModel::Bloom(bloom) = &mut lora.model else {
            panic!("bloom fixture")
        };
        let adapter = bloom.transformer.h[1]
            .self_attention
            .query_key_value
            .adapter
            .as_mut()
            .unwrap();
        let mut values = to_vec(adapter.lora_b.val());
        values[index] += delta;
        let dims = adapter.lora_b.val().dims();
        adapter.lora_b =
            Param::from_tensor(Tensor::from_data(TensorData::new(values, dims), device));
        let lora_b = adapter.lora_b.clone();
        let labels =
            Tensor::<2, Int>::from_data(TensorData::new(labels.clone(), reference.shape), device);
        let logits = lora
            .model
            .forward(
                ModelInput::with_mask(reference.ids(device), reference.mask(device)),
                None,
            )
            .unwrap();
        let loss = causal_lm_loss(logits, labels);
        let value: f32 = loss.clone().into_scalar();
        let grad = device
            .is_autodiff()
            .then(|| to_vec(lora_b.val().grad(&loss.backward()).unwrap())[index]);
        (value, grad)
    };
    let plain = device();
    let autodiff = device().autodiff();
    for index in [0usize, 5, 300] {
        let (_, grad) = run(&autodiff, index, 0.0);
        let grad = grad.unwrap();
        let eps = 1e-2;
        let fd = (run(&plain, index, eps).0 - run(&plain, index, -eps).0) / (2.0 * eps);
        assert!(
            (grad - fd).abs() <= 1e-3 + 1e-2 * fd.abs(),
            "element {index}: autodiff {grad} vs finite difference {fd}"
        );
    }
}

/// Writes adapters saved by peft-rs and merged checkpoints to `target/interop/` for
/// `fixtures/check_interop.py`, which loads them with PEFT / transformers (run by hand:
/// `cargo test -p peft-tests --test lora -- --ignored export_for_python`).
#[test]
#[ignore = "writes files for the Python interoperability check"]
fn export_for_python() {
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/interop");
    let device = device();
    for name in [
        "lora-bloom",
        "lora-bloom-mts",
        "lora-llama",
        "lora-llama-emb",
        "lora-mistral",
        "lora-qwen3",
        "lora-qwen2-tiny-swa",
        "lora-llama-rope-llama3",
        "lora-gemma2",
        "lora-phi3",
        "lora-bloom-bias-all",
        "lora-bloom-bias-lora-only",
        "lora-llama-layers",
    ] {
        let base = peft_models::load(model_dir(base_of(name)), &device).unwrap();
        let lora = from_pretrained(base, adapter_dir(name), true).unwrap();
        lora.save_pretrained(out.join(format!("{name}-adapter")))
            .unwrap();
        let merged = lora.merge_and_unload().unwrap();
        peft_models::save_pretrained(
            &merged,
            model_dir(base_of(name)),
            out.join(format!("{name}-merged")),
        )
        .unwrap();
    }
    // A LoRA merged into a bf16 base, written as transformers does for a bf16 model (bf16,
    // sharded with an index): transformers must load it as any sharded checkpoint.
    let base = peft_models::load(model_dir("mistral-tiny-bf16"), &device).unwrap();
    let merged = from_pretrained(base, adapter_dir("lora-mistral"), true)
        .unwrap()
        .merge_and_unload()
        .unwrap();
    let options = peft_models::SaveOptions {
        max_shard_size: 40_000,
        ..peft_models::SaveOptions::default()
    };
    peft_models::save_pretrained_with(
        &merged,
        model_dir("mistral-tiny-bf16"),
        out.join("lora-mistral-bf16-sharded-merged"),
        &options,
    )
    .unwrap();
}

/// Greedy generation with an adapter on a left-padded batch of three prompts, KV cache on, one
/// row stopping early at EOS — PEFT's `generate` (fixtures/make_generation_fixtures.py) for LoRA
/// and IA3 on BLOOM, Llama (GQA) and Mistral (sliding window).
fn batch_generation_matches_peft(name: &str) {
    let device = device();
    let json = reference_json(&format!("generate-{name}"));
    let base = peft_models::load(model_dir(json["base"].as_str().unwrap()), &device).unwrap();
    let prompts: Vec<Vec<u32>> = serde_json::from_value(json["prompt_ids"].clone()).unwrap();
    let expected: Vec<Vec<u32>> = serde_json::from_value(json["new_ids"].clone()).unwrap();
    let eos = json["eos_token_id"].as_u64().unwrap() as u32;
    let max_new = json["max_new_tokens"].as_u64().unwrap() as usize;
    let options = peft_models::GenerateOptions {
        max_new_tokens: max_new,
        decoding: peft_models::Decoding::Greedy,
        eos_token_ids: vec![eos],
        // The fixtures' `<pad>`, as passed to PEFT's `generate`.
        pad_token_id: 3,
    };
    let got = if name.starts_with("ia3") {
        let ia3 = peft_ia3::from_pretrained(base, adapter_dir(name), false).unwrap();
        peft_models::generate(&ia3.model, &prompts, &options, |_, _| {}).unwrap()
    } else {
        let lora = from_pretrained(base, adapter_dir(name), false).unwrap();
        peft_models::generate(&lora.model, &prompts, &options, |_, _| {}).unwrap()
    };
    assert_eq!(got, expected, "{name}");
    assert!(expected[0].len() < max_new && expected[0].last() == Some(&eos));
}

#[test]
fn batch_generation_with_lora_on_bloom() {
    batch_generation_matches_peft("lora-bloom");
}

#[test]
fn batch_generation_with_lora_on_llama() {
    batch_generation_matches_peft("lora-llama");
}

#[test]
fn batch_generation_with_ia3_on_llama() {
    batch_generation_matches_peft("ia3-llama");
}

#[test]
fn batch_generation_with_lora_on_mistral() {
    batch_generation_matches_peft("lora-mistral");
}
