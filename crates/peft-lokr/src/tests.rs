//! This crate alone against PEFT's fixtures (`cargo test -p peft-lokr`); the full suite, with
//! merging, training and three architectures, is tests/tests/lokr.rs.

use burn::tensor::{Distribution, Tensor, TensorData};
use peft_core::{BaseLinear, LayerAdapter};
use peft_tests::{adapter_dir, assert_config_reads_back, assert_logits_match, device, model_dir};

use crate::{Factor, LokrConfig, LokrLinear, LokrSettings, from_pretrained};

fn settings(scaling: f64) -> LokrSettings {
    LokrSettings {
        scaling,
        rank_dropout: 0.0,
        module_dropout: 0.0,
        rank_dropout_scale: false,
    }
}

fn dense(weight: Tensor<2>) -> BaseLinear {
    BaseLinear::Dense(burn::nn::Linear {
        weight: burn::module::Param::from_tensor(weight),
        bias: None,
    })
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

#[test]
fn a_peft_adapter_gives_pefts_logits() {
    let base = peft_models::load(model_dir("llama-tiny"), &device()).unwrap();
    let lokr = from_pretrained(base, adapter_dir("lokr-llama"), false).unwrap();
    assert_logits_match(&lokr.model, "lokr-llama", 1e-4);
}

#[test]
fn pefts_config_reads_back_key_for_key() {
    assert_config_reads_back::<LokrConfig>("lokr-bloom");
    assert_config_reads_back::<LokrConfig>("lokr-llama");
}

/// `ΔW = s · w1 ⊗ w2` by hand for a 2 × 2 layer (`w1: [1, 2]`, `w2: [2, 1]`), and the layer's
/// output `x·W + x·ΔWᵀ` on a dense identity base.
#[test]
fn the_update_is_the_kronecker_product_of_the_factors() {
    let device = device();
    let t = |v: &[f32], shape: [usize; 2]| {
        Tensor::<2>::from_data(TensorData::new(v.to_vec(), shape), &device)
    };
    let layer = LokrLinear::new(
        Factor::Whole(t(&[1.0, 2.0], [1, 2])),
        Factor::Whole(t(&[3.0, 4.0], [2, 1])),
        settings(0.5),
    );
    // w1 ⊗ w2 = [[1·3, 2·3], [1·4, 2·4]]; ΔW = 0.5·that = [[1.5, 3], [2, 4]]; burn holds ΔWᵀ.
    assert_eq!(values(layer.delta_weight()), vec![1.5, 2.0, 3.0, 4.0]);
    let base = dense(t(&[1.0, 0.0, 0.0, 1.0], [2, 2]));
    let x = Tensor::<3>::from_data(TensorData::new(vec![1.0f32, 2.0], [1, 1, 2]), &device);
    // x·(I + ΔWᵀ) = [1, 2] + [1·1.5 + 2·3, 1·2 + 2·4] = [8.5, 12].
    assert_eq!(values(layer.forward_linear(&base, x)), vec![8.5, 12.0]);
}

/// The forward pass's `s · w1 · X · w2ᵀ` (no `ΔW` formed) equals `x · ΔWᵀ` with `ΔW` formed as
/// PEFT forms it, on a layer with both factors decomposed and non-square pieces
/// (`out = 2·3`, `in = 4·5`).
#[test]
fn the_factored_forward_equals_the_formed_update() {
    let device = device();
    let u =
        |shape: [usize; 2]| Tensor::<2>::random(shape, Distribution::Uniform(-1.0, 1.0), &device);
    let layer = LokrLinear::new(
        Factor::Product(u([2, 3]), u([3, 4])),
        Factor::Product(u([3, 2]), u([2, 5])),
        settings(0.75),
    );
    assert_eq!(layer.d_out(), 6);
    let x = Tensor::<3>::random([2, 3, 20], Distribution::Uniform(-1.0, 1.0), &device);
    let base = dense(Tensor::zeros([20, 6], &device));
    let factored = values(layer.forward_linear(&base, x.clone()));
    let formed = values(x.matmul(layer.delta_weight().unsqueeze::<3>()));
    assert_eq!(factored.len(), 36);
    let diff = factored
        .iter()
        .zip(&formed)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-5, "{diff}");
}
