//! peft-quant against bitsandbytes 0.50.2 (CPU): codes, statistics, quant-state bytes and
//! de-quantised values must be bit-identical (`fixtures/make_quant_fixtures.py`).

use half::{bf16, f16};
use peft_core::TensorStore;
use peft_core::tensors::bytes_to_f32;
use peft_quant::torch_sum::torch_sum;
use peft_quant::{QuantConfig, QuantType, Quantized4bit, SourceDtype};
use peft_tests::fixtures;
use safetensors::Dtype;
use serde_json::Value;

fn store(name: &str) -> TensorStore {
    TensorStore::open(fixtures().join("reference").join(name)).expect("fixture")
}

fn source_dtype(dtype: Dtype) -> SourceDtype {
    match dtype {
        Dtype::F32 => SourceDtype::F32,
        Dtype::BF16 => SourceDtype::Bf16,
        Dtype::F16 => SourceDtype::F16,
        other => panic!("unexpected input dtype {other:?}"),
    }
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
        let q = Quantized4bit::quantize(&values, &input.shape, source_dtype(input.dtype), config)
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
