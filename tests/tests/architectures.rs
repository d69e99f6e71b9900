//! Every method of peft-rs on the newer architectures (Mistral, Qwen2 with sliding windows,
//! Qwen3, Gemma 2, Phi-3, Llama with scaled RoPE and biases): PEFT's default targets, BitFit's
//! refusal where a model has no biases, QLoRA's 4-bit loading of every linear layer, and each
//! method lowering the loss. Parity of logits, generations and adapters with transformers + PEFT
//! is in model_parity.rs, lora.rs, prompt.rs and prefix.rs.

use peft_core::{AdapterModel, CausalLm, ModuleKind};
use peft_tests::{assert_training_lowers_loss, chat_data, device, model_dir};

const MODELS: [&str; 6] = [
    "mistral-tiny",
    "qwen2-tiny-swa",
    "qwen3-tiny",
    "gemma2-tiny",
    "phi3-tiny",
    "llama-rope-yarn",
];

/// IA3 with no `target_modules` takes PEFT 0.21.2's table for the architecture; Phi-3 has no
/// entry there and is refused by name, as PEFT refuses it.
#[test]
fn ia3_defaults_follow_peft() {
    let device = device();
    let expected: [(&str, &[&str]); 5] = [
        ("mistral-tiny", &["k_proj", "v_proj", "down_proj"]),
        ("qwen2-tiny-swa", &["q_proj", "v_proj", "down_proj"]),
        ("qwen3-tiny", &["q_proj", "v_proj", "down_proj"]),
        ("gemma2-tiny", &["q_proj", "v_proj", "down_proj"]),
        ("llama-rope-yarn", &["k_proj", "v_proj", "down_proj"]),
    ];
    for (name, targets) in expected {
        let base = peft_models::load(model_dir(name), &device).unwrap();
        let layers = base.spec().num_layers;
        let ia3 = peft_ia3::get_peft_model(base, peft_ia3::Ia3Config::default()).unwrap();
        let names = ia3.trainable_names();
        assert_eq!(names.len(), layers * targets.len(), "{name}: {names:?}");
        for t in targets {
            assert!(
                names.iter().any(|n| n.contains(&format!(".{t}."))),
                "{name}: {t} not targeted in {names:?}"
            );
        }
    }
    let phi3 = peft_models::load(model_dir("phi3-tiny"), &device).unwrap();
    let err = peft_ia3::get_peft_model(phi3, peft_ia3::Ia3Config::default())
        .map(|_| ())
        .expect_err("phi3 has no IA3 default")
        .to_string();
    assert!(err.contains("no default for model_type `phi3`"), "{err}");
}

/// BitFit trains the biases of a model that has them (Llama with `attention_bias` and
/// `mlp_bias`: 7 per layer; Qwen2: q/k/v) and refuses one without, naming what it needs.
#[test]
fn bitfit_where_there_are_biases() {
    let device = device().autodiff();
    let yarn = peft_models::load(model_dir("llama-rope-yarn"), &device).unwrap();
    let bitfit = peft_bitfit::get_peft_model(yarn, peft_bitfit::BitFitConfig::default()).unwrap();
    assert_eq!(bitfit.trainable_names().len(), 2 * 7);
    assert_training_lowers_loss(bitfit, &chat_data("llama-rope-yarn"), 5e-2);
    let qwen2 = peft_models::load(model_dir("qwen2-tiny-swa"), &device).unwrap();
    let bitfit = peft_bitfit::get_peft_model(qwen2, peft_bitfit::BitFitConfig::default()).unwrap();
    assert_eq!(bitfit.trainable_names().len(), 2 * 3);
    for name in ["mistral-tiny", "qwen3-tiny", "gemma2-tiny", "phi3-tiny"] {
        let base = peft_models::load(model_dir(name), &device).unwrap();
        let err = peft_bitfit::get_peft_model(base, peft_bitfit::BitFitConfig::default())
            .map(|_| ())
            .expect_err("no biases")
            .to_string();
        assert!(
            err.contains("BitFit needs bias parameters"),
            "{name}: {err}"
        );
    }
}

/// `load_4bit` packs every linear layer but `lm_head` (Phi-3's fused projections included), and
/// QLoRA's preset trains over the 4-bit base.
#[test]
fn qlora_covers_every_linear_layer() {
    let device = device().autodiff();
    for name in MODELS {
        let options = peft_qlora::Load4bit::default();
        let base = peft_qlora::load_4bit(model_dir(name), &device, &options).unwrap();
        let linear: Vec<String> = base
            .modules()
            .into_iter()
            .filter(|m| matches!(m.kind, ModuleKind::Linear { .. }) && m.path != "lm_head")
            .map(|m| m.path)
            .collect();
        let mut packed: Vec<String> = peft_core::adapter_files::packed_weights(&base)
            .into_iter()
            .map(|(path, _)| path)
            .collect();
        packed.sort();
        let mut want = linear.clone();
        want.sort();
        assert_eq!(packed, want, "{name}");
        let qlora = peft_qlora::get_peft_model(base, peft_qlora::qlora_preset()).unwrap();
        assert_eq!(qlora.trainable_names().len(), 2 * linear.len(), "{name}");
        assert_training_lowers_loss(qlora, &chat_data(name), 1e-2);
    }
}

/// LoRA with PEFT's default targets (named ones on Phi-3), prompt tuning, P-tuning and prefix
/// tuning each lower the loss on every new architecture. The fixtures of Mistral (window 4) and
/// Phi-3 (window 6) window every layer more tightly than the prompt before the first learned
/// token is long, so virtual tokens are out of every learned position's sight there, exactly
/// as in transformers (their logits are compared with PEFT's in prompt.rs / prefix.rs): the
/// prompt-learning methods are trained on the models with at least one full-attention layer.
#[test]
fn every_method_trains() {
    let device = device().autodiff();
    for name in MODELS {
        let data = chat_data(name);
        let base = || peft_models::load(model_dir(name), &device).unwrap();
        let lora_config = peft_lora::LoraConfig {
            target_modules: (name == "phi3-tiny").then(|| {
                peft_core::TargetModules::List(vec!["qkv_proj".into(), "gate_up_proj".into()])
            }),
            ..peft_lora::LoraConfig::default()
        };
        let lora = peft_lora::get_peft_model(base(), lora_config).unwrap();
        assert_training_lowers_loss(lora, &data, 1e-2);
        if matches!(name, "mistral-tiny" | "phi3-tiny") {
            continue;
        }
        let prompt_config = peft_prompt::PromptTuningConfig::default();
        let prompt = peft_prompt::get_peft_model(base(), prompt_config, None).unwrap();
        assert_training_lowers_loss(prompt, &data, 5e-2);
        let ptuning =
            peft_ptuning::get_peft_model(base(), peft_ptuning::PromptEncoderConfig::default())
                .unwrap();
        assert_training_lowers_loss(ptuning, &data, 1e-2);
        let prefix =
            peft_prefix::get_peft_model(base(), peft_prefix::PrefixTuningConfig::default())
                .unwrap();
        assert_training_lowers_loss(prefix, &data, 5e-2);
    }
}

/// Sequences of different lengths share one padded cache (as `peft serve` batches them): each
/// row, with its own rotary positions, gets exactly — bit for bit on the CPU — the logits it
/// gets alone.
/// Covers the cache's row operations, `position_ids`, sliding windows and the fused attention
/// skipping a row's padding. (Gemma 2's soft-capped attention runs composed burn operations,
/// equal only to rounding, and is left out.)
#[test]
fn padded_rows_with_their_own_positions_match_running_alone() {
    use burn::tensor::{Int, Tensor, TensorData};
    use peft_core::{KvCache, ModelInput};

    let device = device();
    for name in [
        "llama-tiny",
        "qwen2-tiny-swa",
        "phi3-tiny",
        "bloom-tiny",
        "qwen3-tiny",
    ] {
        let model = peft_models::load(model_dir(name), &device).unwrap();
        let layers = model.spec().num_layers;
        let ids = |v: &[u32]| {
            let data: Vec<i64> = v.iter().map(|&t| t as i64).collect();
            Tensor::<2, Int>::from_data(TensorData::new(data, [1, v.len()]), &device)
        };
        let prompts: [Vec<u32>; 3] = [
            (0..3).map(|t| 10 + t).collect(),
            (0..11).map(|t| 40 + 3 * t).collect(),
            vec![77],
        ];
        let next = [5u32, 6, 7];
        let logits_of = |t: Tensor<3>| t.into_data().try_to_vec::<f32>().unwrap();
        // Alone: prefill, then one step with the next token.
        let mut alone = Vec::new();
        let mut caches = Vec::new();
        for (p, &n) in prompts.iter().zip(&next) {
            let mut cache = KvCache::new(layers);
            model
                .forward(ModelInput::new(ids(p)), Some(&mut cache))
                .unwrap();
            caches.push(cache.clone());
            let mut input = ModelInput::new(ids(&[n]));
            input.position_ids = Some(Tensor::from_data(
                TensorData::new(vec![p.len() as i64], [1, 1]),
                &device,
            ));
            alone.push(logits_of(model.forward(input, Some(&mut cache)).unwrap()));
        }
        // Together: the three caches left-padded into one batch, each row at its own position.
        let mut batch = KvCache::concat_rows(caches).unwrap();
        assert_eq!(batch.past_len(), 11);
        assert_eq!(batch.batch(), 3);
        let step: Vec<i64> = next.iter().map(|&t| t as i64).collect();
        let positions: Vec<i64> = prompts.iter().map(|p| p.len() as i64).collect();
        let mut input = ModelInput::new(Tensor::from_data(TensorData::new(step, [3, 1]), &device));
        input.position_ids = Some(Tensor::from_data(
            TensorData::new(positions, [3, 1]),
            &device,
        ));
        let together = logits_of(model.forward(input, Some(&mut batch)).unwrap());
        let vocab = alone[0].len();
        // Bit for bit through the CPU kernels; burn's composed attention (GPU backends) sums
        // over the padding too, equal to rounding.
        let exact = peft_ops::device::runs_cpu_kernels(&device);
        for (row, expected) in alone.iter().enumerate() {
            let got = &together[row * vocab..(row + 1) * vocab];
            if exact {
                assert_eq!(
                    got,
                    expected.as_slice(),
                    "{name}: row {row} differs in the batch"
                );
            } else {
                let diff = got
                    .iter()
                    .zip(expected)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(diff < 1e-4, "{name}: row {row} differs by {diff}");
            }
        }
        // Dropping the long row leaves padding every remaining row has: it is trimmed.
        let mut kept = batch.select_rows(&[0, 2]).unwrap();
        kept.trim_padding().unwrap();
        assert_eq!(kept.past_len(), 4, "{name}");
        assert!(batch.select_rows(&[3]).is_err());
    }
}
