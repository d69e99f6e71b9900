//! Helpers shared by the integration tests: fixture paths, the device under test, and tensor
//! comparison.

use std::path::PathBuf;

use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_core::TensorStore;

/// `tests/fixtures` of the repository.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A fixture model folder (`bloom-tiny`, `llama-tiny`, `qwen2-tiny`).
pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

/// The device the tests run on: `PEFT_DEVICE=cpu|wgpu|cuda` (default `cpu`, burn's flex backend).
pub fn device() -> Device {
    let name = std::env::var("PEFT_DEVICE").unwrap_or_else(|_| "cpu".into());
    peft_cli_device(&name)
}

fn peft_cli_device(name: &str) -> Device {
    peft_core::device::parse_device(name).unwrap_or_else(|e| panic!("PEFT_DEVICE: {e}"))
}

/// The reference batch recorded by the fixture script for `name`.
pub struct Reference {
    /// `[batch, seq]` ids (left-padded).
    pub input_ids: Vec<i64>,
    /// `[batch, seq]` mask.
    pub attention_mask: Vec<i64>,
    /// `[batch, seq]`.
    pub shape: [usize; 2],
    /// `[batch, seq, vocab]` logits from transformers.
    pub logits: Vec<f32>,
    /// Vocabulary size.
    pub vocab: usize,
}

impl Reference {
    /// Reads `reference/<name>.safetensors`.
    pub fn load(name: &str) -> Self {
        let store = TensorStore::open(
            fixtures()
                .join("reference")
                .join(format!("{name}.safetensors")),
        )
        .expect("reference file");
        let (input_ids, shape) = store.i64("input_ids").unwrap();
        let (attention_mask, _) = store.i64("attention_mask").unwrap();
        let (logits, lshape) = store.f32("logits").unwrap();
        Self {
            input_ids,
            attention_mask,
            shape: [shape[0], shape[1]],
            logits,
            vocab: lshape[2],
        }
    }

    /// The ids as a tensor on `device`.
    pub fn ids(&self, device: &Device) -> Tensor<2, Int> {
        Tensor::from_data(TensorData::new(self.input_ids.clone(), self.shape), device)
    }

    /// The mask as a tensor on `device`.
    pub fn mask(&self, device: &Device) -> Tensor<2, Int> {
        Tensor::from_data(
            TensorData::new(self.attention_mask.clone(), self.shape),
            device,
        )
    }
}

/// Reads a float tensor back to the host.
pub fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec_as::<f32>().expect("float tensor")
}

/// Largest |a - b| over the positions whose mask is 1 (`mask` is `[batch, seq]`, values
/// `[batch, seq, width]`).
pub fn max_diff_masked(a: &[f32], b: &[f32], mask: &[i64], width: usize) -> f32 {
    assert_eq!(a.len(), b.len(), "compared tensors differ in size");
    let mut worst = 0f32;
    for (pos, &m) in mask.iter().enumerate() {
        if m == 0 {
            continue;
        }
        let range = pos * width..(pos + 1) * width;
        for (x, y) in a[range.clone()].iter().zip(&b[range]) {
            let d = (x - y).abs();
            assert!(d.is_finite(), "non-finite logits at position {pos}");
            worst = worst.max(d);
        }
    }
    worst
}
