//! This crate alone against PEFT's fixtures (`cargo test -p peft-loha`); the full suite, with
//! merging, training and three architectures, is tests/tests/loha.rs.

use burn::tensor::{Tensor, TensorData};
use peft_core::LayerAdapter;
use peft_tests::{adapter_dir, assert_config_reads_back, assert_logits_match, device, model_dir};

use crate::{LohaConfig, LohaLinear, from_pretrained};

#[test]
fn a_peft_adapter_gives_pefts_logits() {
    let base = peft_models::load(model_dir("llama-tiny"), &device()).unwrap();
    let loha = from_pretrained(base, adapter_dir("loha-llama"), false).unwrap();
    assert_logits_match(&loha.model, "loha-llama", 1e-4);
}

#[test]
fn pefts_config_reads_back_key_for_key() {
    assert_config_reads_back::<LohaConfig>("loha-bloom");
    assert_config_reads_back::<LohaConfig>("loha-llama");
}

/// `ΔW = s·(w1a·w1b) ⊙ (w2a·w2b)` by hand for a 2 × 2 layer of rank 1, and the layer's output
/// `x·W + x·ΔWᵀ` on a dense base.
#[test]
fn the_update_is_the_hadamard_product_of_the_two_products() {
    let device = device();
    let t = |v: &[f32], shape: [usize; 2]| {
        Tensor::<2>::from_data(TensorData::new(v.to_vec(), shape), &device)
    };
    // w1a·w1b = [[1·3, 1·4], [2·3, 2·4]] = [[3, 4], [6, 8]]; w2a·w2b = [[5, 5], [−1, −1]].
    let layer = LohaLinear::new(
        [
            t(&[1.0, 2.0], [2, 1]),
            t(&[3.0, 4.0], [1, 2]),
            t(&[5.0, -1.0], [2, 1]),
            t(&[1.0, 1.0], [1, 2]),
        ],
        0.5,
        0.0,
        0.0,
    );
    // ΔW = 0.5·[[15, 20], [−6, −8]]; burn's layout is ΔWᵀ.
    let delta = layer
        .delta_weight()
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    assert_eq!(delta, vec![7.5, -3.0, 10.0, -4.0]);
    let base = peft_core::BaseLinear::Dense(burn::nn::Linear {
        weight: burn::module::Param::from_tensor(t(&[1.0, 0.0, 0.0, 1.0], [2, 2])),
        bias: None,
    });
    let x = Tensor::<3>::from_data(TensorData::new(vec![1.0f32, 2.0], [1, 1, 2]), &device);
    let y = layer
        .forward_linear(&base, x)
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    // x·(I + ΔWᵀ) = [1, 2] + [1·7.5 + 2·10, 1·(−3) + 2·(−4)] = [28.5, −9].
    assert_eq!(y, vec![28.5, -9.0]);
}
