//! peft-quant against bitsandbytes 0.50.2 (CPU): codes, statistics, quant-state bytes and
//! de-quantised values must be bit-identical (`fixtures/make_quant_fixtures.py`).

use half::{bf16, f16};
use peft_core::TensorStore;
use peft_lora::from_pretrained;
use peft_qlora::{Load4bit, load_4bit};
use peft_quant::torch_sum::torch_sum;
use peft_quant::{QuantConfig, QuantType, Quantized4bit, SourceDtype};
use peft_tensors::bytes_to_f32;
use peft_tests::{Reference, adapter_dir, device, fixtures, logits, max_diff_masked, model_dir};
use safetensors::Dtype;
use serde_json::Value;

fn store(name: &str) -> TensorStore {
    TensorStore::open(fixtures().join("reference").join(name)).expect("fixture")
}

#[test]
fn codes_statistics_and_state_match_bitsandbytes() {
    let blocks = store("quant-blocks.safetensors");
    let cases: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/quant-blocks.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cases.len(), 32);
    let mut compared = 0;
    for case in &cases {
        let name = case["case"].as_str().unwrap();
        let input = blocks
            .get(&format!("{}.input", case["input"].as_str().unwrap()))
            .unwrap();
        let values = bytes_to_f32(input.dtype, &input.data).unwrap();
        let config = QuantConfig {
            quant_type: case["quant_type"]
                .as_str()
                .unwrap()
                .parse::<QuantType>()
                .unwrap(),
            blocksize: case["blocksize"].as_u64().unwrap() as usize,
            double_quant: case["double_quant"].as_bool().unwrap(),
        };
        let q = Quantized4bit::quantize(
            &values,
            &input.shape,
            SourceDtype::from_safetensors(input.dtype).expect("a float input"),
            config,
        )
        .unwrap();
        // Every tensor of the serialised layout, byte for byte (`<case>.packed` is the weight).
        for (key, ours) in q.to_tensors("w") {
            let suffix = key.strip_prefix('w').unwrap();
            let theirs_key = if suffix.is_empty() {
                format!("{name}.packed")
            } else {
                format!("{name}{suffix}")
            };
            let theirs = blocks.get(&theirs_key).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(ours.dtype, theirs.dtype, "{theirs_key}");
            assert_eq!(ours.shape, theirs.shape, "{theirs_key}");
            if ours.data != theirs.data {
                let differing = ours
                    .data
                    .iter()
                    .zip(&theirs.data)
                    .filter(|(a, b)| a != b)
                    .count();
                panic!(
                    "{theirs_key}: {differing} of {} bytes differ",
                    ours.data.len()
                );
            }
            compared += 1;
        }
        // De-quantised output in the input's dtype, bit for bit.
        let key = format!("{name}.dequantized");
        if blocks.contains(&key) {
            let theirs = blocks.get(&key).unwrap();
            let ours: Vec<u8> = match theirs.dtype {
                Dtype::F32 => q
                    .dequantize_f32()
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
                Dtype::BF16 => q
                    .dequantize_bf16()
                    .iter()
                    .flat_map(|v: &bf16| v.to_le_bytes())
                    .collect(),
                Dtype::F16 => q
                    .dequantize_f16()
                    .iter()
                    .flat_map(|v: &f16| v.to_le_bytes())
                    .collect(),
                other => panic!("{other:?}"),
            };
            assert!(ours == theirs.data, "{key}: de-quantised values differ");
            compared += 1;
        }
    }
    assert!(compared > 150, "{compared}");
}

#[test]
fn mean_of_double_quant_follows_torch_summation_order() {
    let sums = store("quant-sums.safetensors");
    let (lengths, _) = sums.i64("lengths").unwrap();
    let (inputs, _) = sums.f32("inputs").unwrap();
    let (expected, _) = sums.f32("sums").unwrap();
    let (threads, _) = sums.i64("threads").unwrap();
    let mut start = 0;
    for (n, want) in lengths.iter().zip(&expected) {
        let n = *n as usize;
        let got = torch_sum(&inputs[start..start + n], threads[0] as usize);
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "length {n}: {got} vs torch {want}"
        );
        start += n;
    }
}

const TOLERANCE: f32 = 1e-4;

fn assert_logits_match<M: peft_core::CausalLm>(model: &M, name: &str) {
    peft_tests::assert_logits_match(model, name, TOLERANCE);
}

/// A checkpoint transformers saved with `BitsAndBytesConfig(load_in_4bit=True)` loads as packed
/// 4-bit layers and gives transformers' 4-bit logits (NF4 + double quant; FP4 without).
#[test]
fn transformers_4bit_checkpoints_give_their_logits() {
    let device = device();
    for name in ["bloom-tiny-nf4", "llama-tiny-fp4"] {
        let model = peft_models::load(model_dir(name), &device).unwrap();
        let packed = quantized_layers(&model);
        assert_eq!(
            packed,
            if name.starts_with("bloom") { 8 } else { 14 },
            "{name}"
        );
        assert_logits_match(&model, name);
    }
}

fn quantized_layers<M: peft_core::CausalLm>(model: &M) -> usize {
    peft_core::adapter_files::packed_weights(model).len()
}

/// Quantising the f32 fixture while loading gives exactly the checkpoint transformers wrote.
#[test]
fn load_4bit_quantises_like_transformers() {
    let device = device();
    let options = Load4bit::default();
    let ours = load_4bit(model_dir("bloom-tiny"), &device, &options).unwrap();
    assert_logits_match(&ours, "bloom-tiny-nf4");
    let fp4 = Load4bit {
        quant_type: QuantType::Fp4,
        double_quant: false,
        ..options
    };
    let ours = load_4bit(model_dir("llama-tiny"), &device, &fp4).unwrap();
    assert_logits_match(&ours, "llama-tiny-fp4");
}

/// A LoRA adapter PEFT trained over the 4-bit base loads over ours with PEFT's logits; merging
/// de-quantises exactly and gives the same outputs from a dense model.
#[test]
fn peft_qlora_adapter_matches_and_merges() {
    let device = device();
    let base = peft_models::load(model_dir("bloom-tiny-nf4"), &device).unwrap();
    let qlora = from_pretrained(base, adapter_dir("qlora-bloom"), true).unwrap();
    assert_logits_match(&qlora.model, "qlora-bloom");
    // PEFT's print_trainable_parameters() on the 4-bit model.
    let counts = peft_tests::reference_json("qlora-bloom");
    let summary = qlora.trainable_summary();
    assert_eq!(
        summary.trainable as u64,
        counts["trainable_params"].as_u64().unwrap()
    );
    assert_eq!(summary.all as u64, counts["all_params"].as_u64().unwrap());

    let merged = qlora.merge_and_unload().unwrap();
    assert_eq!(quantized_layers(&merged), 0);
    assert_logits_match(&merged, "qlora-bloom");
}

/// A few QLoRA steps on the 4-bit base lower the loss; the packed base is untouched; the saved
/// adapter is a plain PEFT LoRA folder that reloads onto the 4-bit base with the same outputs.
#[test]
fn qlora_training_lowers_loss_and_round_trips() {
    let device = device().autodiff();
    let base = load_4bit(model_dir("bloom-tiny"), &device, &Load4bit::default()).unwrap();
    let packed_before: Vec<u8> = first_packed(&base);
    let config = peft_lora::LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        ..peft_qlora::qlora_preset()
    };
    let qlora = peft_qlora::get_peft_model(base, config).unwrap();
    let data = peft_tests::chat_data("bloom-tiny");
    let trained = peft_tests::assert_training_lowers_loss(qlora, &data, 1e-2);
    assert_eq!(first_packed(&trained.model), packed_before);

    let out = tempfile::tempdir().unwrap();
    trained.save_pretrained(out.path()).unwrap();
    let saved = std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap();
    assert!(saved.contains("\"peft_type\": \"LORA\""), "{saved}");
    let reloaded = from_pretrained(
        peft_models::load_4bit(
            model_dir("bloom-tiny"),
            &peft_tests::device(),
            QuantConfig::default(),
        )
        .unwrap(),
        out.path(),
        false,
    )
    .unwrap();
    let reference = Reference::load("bloom-tiny");
    // Dropout (0.05 in the preset) is active on the autodiff device: compare in inference mode.
    let a = logits(
        &peft_train::trainer::inference_copy(&trained.model),
        &reference,
    );
    let b = logits(&reloaded.model, &reference);

    let diff = max_diff_masked(&a, &b, &reference.attention_mask, reference.vocab);
    assert!(diff < 1e-5, "reloaded adapter differs by {diff}");
}

/// The packed bytes of the first quantised layer.
fn first_packed<M: peft_core::CausalLm>(model: &M) -> Vec<u8> {
    let packed = peft_core::adapter_files::packed_weights(model);
    let (_, weight) = packed.first().expect("a packed layer");
    weight.to_tensors("w")[0].1.data.clone()
}

/// The GPU path's de-quantisation by tensor operations (nibble unpacking, code look-up, block
/// scaling) gives exactly the host de-quantiser's values, for every fixture case: NF4 and FP4,
/// block sizes 32 … 4096, shapes whose size is not a multiple of 8 or of the block size, double
/// quantisation. Runs on the test device (`PEFT_DEVICE=wgpu` in CI too).
#[test]
fn device_dequantisation_equals_the_host_one() {
    use peft_core::PackedWeight;
    let device = device();
    let blocks = store("quant-blocks.safetensors");
    let cases: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/quant-blocks.json")).unwrap(),
    )
    .unwrap();
    for case in &cases {
        let input = blocks
            .get(&format!("{}.input", case["input"].as_str().unwrap()))
            .unwrap();
        let values = bytes_to_f32(input.dtype, &input.data).unwrap();
        let config = QuantConfig {
            quant_type: case["quant_type"].as_str().unwrap().parse().unwrap(),
            blocksize: case["blocksize"].as_u64().unwrap() as usize,
            double_quant: case["double_quant"].as_bool().unwrap(),
        };
        let source = SourceDtype::from_safetensors(input.dtype).unwrap();
        let q = Quantized4bit::quantize(&values, &input.shape, source, config).unwrap();
        let codes = peft_quant::DeviceCodes::upload(&q.code_blocks(), &device);
        let ours: Vec<u32> = codes
            .dequantize(q.shape())
            .into_data()
            .iter::<f32>()
            .map(f32::to_bits)
            .collect();
        let host: Vec<u32> = q.dequantize_f32().iter().map(|v| v.to_bits()).collect();
        assert_eq!(ours, host, "{}", case["case"]);
    }
}
