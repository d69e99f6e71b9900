//! The 4-bit reader and de-quantiser: arbitrary packed bytes, statistics and quant-state JSON
//! give values or an error, never a panic or an out-of-bounds read.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use peft_core::HostTensor;
use safetensors::Dtype;

fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let n = n.min(data.len());
    let (head, tail) = data.split_at(n);
    *data = tail;
    head
}

fuzz_target!(|input: &[u8]| {
    let mut data = input;
    let Some(&selector) = data.first() else {
        return;
    };
    data = &data[1..];
    let lens: Vec<usize> = take(&mut data, 4).iter().map(|&b| b as usize * 4).collect();
    if lens.len() < 4 {
        return;
    }
    let packed = take(&mut data, lens[0]).to_vec();
    let absmax = take(&mut data, lens[1]).to_vec();
    let nested = take(&mut data, lens[2] & !3).to_vec();
    let state = data.to_vec();
    let quant_type = if selector & 1 == 0 { "nf4" } else { "fp4" };
    let mut tensors: HashMap<String, HostTensor> = HashMap::new();
    let t = |dtype, data: Vec<u8>| {
        let width = if dtype == Dtype::F32 { 4 } else { 1 };
        HostTensor {
            dtype,
            shape: vec![data.len() / width],
            data: data[..data.len() / width * width].to_vec(),
        }
    };
    tensors.insert("w".into(), t(Dtype::U8, packed));
    let absmax_dtype = if selector & 2 == 0 { Dtype::F32 } else { Dtype::U8 };
    tensors.insert("w.absmax".into(), t(absmax_dtype, absmax));
    tensors.insert("w.nested_absmax".into(), t(Dtype::F32, nested));
    let map: Vec<u8> = (0..256).flat_map(|i| (i as f32 / 255.0).to_le_bytes()).collect();
    tensors.insert("w.nested_quant_map".into(), t(Dtype::F32, map));
    let key = format!("w.quant_state.bitsandbytes__{quant_type}");
    tensors.insert(key.clone(), t(Dtype::U8, state));
    if let Ok(q) = peft_quant::Quantized4bit::from_tensors("w", &key, |k| tensors.get(k).cloned()) {
        let values = q.dequantize_f32();
        assert_eq!(values.len(), q.numel());
    }
});
