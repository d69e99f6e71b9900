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

/// The rank-`r²` product form the forward pass takes at small ranks equals `x · ΔWᵀ` with `ΔW`
/// formed as PEFT forms it (ranks 3 and 2 on a 24 → 40 layer: 6·64 < 960).
#[test]
fn the_product_form_equals_the_formed_update() {
    use burn::tensor::Distribution;
    let device = device();
    let u =
        |shape: [usize; 2]| Tensor::<2>::random(shape, Distribution::Uniform(-1.0, 1.0), &device);
    let layer = LohaLinear::new(
        [u([40, 3]), u([3, 24]), u([40, 2]), u([2, 24])],
        0.7,
        0.0,
        0.0,
    );
    let x = Tensor::<3>::random([2, 5, 24], Distribution::Uniform(-1.0, 1.0), &device);
    let base = peft_core::BaseLinear::Dense(burn::nn::Linear {
        weight: burn::module::Param::from_tensor(Tensor::zeros([24, 40], &device)),
        bias: None,
    });
    let factored = layer
        .forward_linear(&base, x.clone())
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let formed = x
        .matmul(layer.delta_weight().unsqueeze::<3>())
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    assert_eq!(factored.len(), 400);
    let diff = factored
        .iter()
        .zip(&formed)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-5, "{diff}");
}
