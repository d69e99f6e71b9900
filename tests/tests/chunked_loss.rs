//! Each model's training loss through the chunked output projection (`forward_loss`, no whole
//! logits) equals the loss of its whole logits, value and adapter gradients, on every
//! architecture (Gemma 2's final soft-capping, tied and untied heads) and with virtual tokens.

use burn::optim::GradientsParams;
use peft_core::params::named_params;
use peft_core::{CausalLm, ModelInput};
use peft_ops::loss::causal_lm_loss;
use peft_tests::{Reference, adapter_dir, base_of, device, to_vec};

/// Loss and trainable-parameter gradients of `model` both ways.
fn compare<M: CausalLm>(model: &M, reference: &Reference, what: &str) {
    let device = model.device();
    let ids = reference.ids(&device);
    let mask = reference.mask(&device);
    // Ignore the padding; every real position predicts the next one.
    let labels = ids.clone().mask_fill(mask.clone().equal_elem(0), -100);
    let chunked = model
        .forward_loss(
            ModelInput::with_mask(ids.clone(), mask.clone()),
            None,
            labels.clone(),
        )
        .unwrap();
    let logits = model
        .forward(ModelInput::with_mask(ids, mask), None)
        .unwrap();
    let whole = causal_lm_loss(logits, labels);
    let (c, w): (f32, f32) = (chunked.clone().into_scalar(), whole.clone().into_scalar());
    assert!((c - w).abs() <= 1e-5 * w.abs(), "{what}: loss {c} vs {w}");
    let gc = GradientsParams::from_grads(chunked.backward(), model);
    let gw = GradientsParams::from_grads(whole.backward(), model);
    let mut compared = 0;
    for p in named_params(model) {
        let pair = match p.shape.len() {
            2 => gc
                .get::<2>(p.id)
                .zip(gw.get::<2>(p.id))
                .map(|(a, b)| (to_vec(a), to_vec(b))),
            1 => gc
                .get::<1>(p.id)
                .zip(gw.get::<1>(p.id))
                .map(|(a, b)| (to_vec(a), to_vec(b))),
            _ => None,
        };
        if let Some((a, b)) = pair {
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
            let diff = a
                .iter()
                .zip(&b)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                diff <= 1e-4 * scale,
                "{what}: {} differs by {diff} (scale {scale})",
                p.name
            );
            compared += 1;
        }
    }
    assert!(compared > 0, "{what}: no gradient compared");
}

#[test]
fn chunked_loss_equals_whole_logits_on_every_architecture() {
    let device = device().autodiff();
    for adapter in [
        "lora-bloom",
        "lora-llama",
        "lora-gemma2",
        "lora-qwen3",
        "lora-phi3",
    ] {
        let name = base_of(adapter);
        let base = peft_models::load(peft_tests::model_dir(name), &device).unwrap();
        let lora = peft_lora::from_pretrained(base, adapter_dir(adapter), true).unwrap();
        compare(&lora.model, &Reference::load(adapter), adapter);
    }
}

#[test]
fn chunked_loss_with_virtual_tokens() {
    let device = device().autodiff();
    let base = peft_models::load(peft_tests::model_dir("llama-tiny"), &device).unwrap();
    let prompt =
        peft_prompt::from_pretrained(base, adapter_dir("prompt-llama-random"), true).unwrap();
    let reference = Reference::load("prompt-llama-random");
    compare(&prompt.model, &reference, "prompt-llama-random");
}
