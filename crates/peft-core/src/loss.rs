//! The causal language-modelling loss, as transformers computes it.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor};

/// Label value that takes no part in the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Mean next-token cross-entropy: position `t`'s logits predict `labels[t + 1]`; labels equal to
/// [`IGNORE_INDEX`] (padding, prompt tokens) are skipped. `logits: [batch, seq, vocab]`,
/// `labels: [batch, seq]`; returns a one-element tensor.
///
/// When the logits are longer than the labels (prompt tuning and P-tuning put virtual tokens
/// first), the labels are extended on the left with [`IGNORE_INDEX`], as PEFT does.
///
/// With no label left to predict the result is NaN, as in PyTorch; callers check their data.
pub fn causal_lm_loss(logits: Tensor<3>, labels: Tensor<2, Int>) -> Tensor<1> {
    let [batch, seq, vocab] = logits.dims();
    let labels = match seq.saturating_sub(labels.dims()[1]) {
        0 => labels,
        extra => {
            let pad = Tensor::<2, Int>::full([batch, extra], IGNORE_INDEX, &labels.device());
            Tensor::cat(vec![pad, labels], 1)
        }
    };
    let n = batch * (seq - 1);
    let logits = logits.slice_dim(1, 0..seq - 1).reshape([n, vocab]);
    let targets = labels.slice_dim(1, 1..seq).reshape([n]);
    let valid = targets.clone().not_equal_elem(IGNORE_INDEX);
    let safe = targets.mask_fill(valid.clone().bool_not(), 0);
    let picked = log_softmax(logits, 1)
        .gather(1, safe.reshape([n, 1]))
        .reshape([n]);
    let weights = valid.float();
    let count = weights.clone().sum();
    (picked * weights).sum().neg() / count
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn matches_hand_computed_cross_entropy() {
        let device = Device::flex();
        // batch 1, seq 3, vocab 2: positions 0 and 1 predict labels[1] and labels[2].
        let logits = Tensor::<3>::from_data(
            TensorData::new(vec![0.0f32, 0.0, 2.0, 0.0, 9.0, 9.0], [1, 3, 2]),
            &device,
        );
        let labels =
            Tensor::<2, Int>::from_data(TensorData::new(vec![5i64, 1, 0], [1, 3]), &device);
        let loss: f32 = causal_lm_loss(logits.clone(), labels).into_scalar();
        // -log(1/2) and -log(e^2 / (e^2 + 1)), averaged.
        let expected = (2f32.ln() + (1.0 + (-2f32).exp()).ln()) / 2.0;
        assert!((loss - expected).abs() < 1e-6, "{loss} vs {expected}");
        // Ignored labels drop out of the mean.
        let labels =
            Tensor::<2, Int>::from_data(TensorData::new(vec![5i64, -100, 0], [1, 3]), &device);
        let loss: f32 = causal_lm_loss(logits, labels).into_scalar();
        let expected = (1.0 + (-2f32).exp()).ln();
        assert!((loss - expected).abs() < 1e-6, "{loss} vs {expected}");
    }
}
