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
    let seq = logits.dims()[1];
    let labels = pad_labels(labels, seq);
    if crate::fused::is_fused(&logits) {
        fused_causal_lm_loss(logits, labels)
    } else {
        composed_causal_lm_loss(logits, labels)
    }
}

/// [`causal_lm_loss`] from burn operations (any backend), labels already as long as the logits.
fn composed_causal_lm_loss(logits: Tensor<3>, labels: Tensor<2, Int>) -> Tensor<1> {
    let [batch, seq, vocab] = logits.dims();
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

/// Labels extended on the left with [`IGNORE_INDEX`] to `seq` positions (virtual tokens come
/// first, as PEFT pads them).
fn pad_labels(labels: Tensor<2, Int>, seq: usize) -> Tensor<2, Int> {
    let batch = labels.dims()[0];
    match seq.saturating_sub(labels.dims()[1]) {
        0 => labels,
        extra => {
            let pad = Tensor::<2, Int>::full([batch, extra], IGNORE_INDEX, &labels.device());
            Tensor::cat(vec![pad, labels], 1)
        }
    }
}

/// Each position's next-token target for the row kernels — `labels[t + 1]`, `-1` where there is
/// none or it is [`IGNORE_INDEX`], `vocab` (out of range: NaN) for any other negative label —
/// and how many positions count.
fn next_token_targets(labels: Tensor<2, Int>, vocab: usize) -> (Vec<i64>, usize) {
    let [batch, seq] = labels.dims();
    let labels: Vec<i64> = labels
        .into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .unwrap_or_default();
    let target = |label: i64| match label {
        IGNORE_INDEX => -1,
        l if l < 0 => vocab as i64,
        l => l,
    };
    let mut targets = vec![-1; batch * seq];
    if seq > 1 {
        for (row, chunk) in targets.chunks_mut(seq).zip(labels.chunks(seq)) {
            for (t, &label) in row.iter_mut().zip(&chunk[1..]) {
                *t = target(label);
            }
        }
    }
    let count = targets.iter().filter(|&&t| t >= 0).count();
    (targets, count)
}

/// [`causal_lm_loss`] through the fused cross-entropy: every position is a row, its target the
/// next label (none for the last position), so the logits are used in place, unsliced.
fn fused_causal_lm_loss(logits: Tensor<3>, labels: Tensor<2, Int>) -> Tensor<1> {
    let [batch, seq, vocab] = logits.dims();
    let device = logits.device();
    let (targets, count) = next_token_targets(labels, vocab);
    match crate::fused::cross_entropy_rows(logits.reshape([batch * seq, vocab]), targets) {
        Ok(nll) => nll.sum().div_scalar(count as f32),
        // One target per position by construction; unreachable, but a NaN loss, not a panic.
        Err(_) => Tensor::<1>::from_floats([f32::NAN], &device),
    }
}

/// The frozen output projection of [`linear_causal_lm_loss`].
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one value per loss call
pub enum OutputProjection {
    /// An f32 weight `[h, vocab]` (a tied embedding table transposed, or a dense `lm_head`).
    F32(Tensor<2>),
    /// A weight `[vocab, h]` computed in bf16, as `torch.autocast` computes `lm_head`:
    /// `z = round(round(hidden) · Wᵀ)`, gradients rounded likewise
    /// ([`crate::chunked_loss::LinearCrossEntropyBackend::bf16_linear_cross_entropy`]).
    Bf16(std::sync::Arc<dyn crate::packed::PackedWeight>),
}

impl OutputProjection {
    /// The vocabulary size.
    fn vocab(&self) -> usize {
        match self {
            OutputProjection::F32(weight) => weight.dims()[1],
            OutputProjection::Bf16(weight) => weight.shape()[0],
        }
    }
}

/// [`causal_lm_loss`] of the logits `hidden · weight` (optionally soft-capped,
/// `cap · tanh(z / cap)`) without computing them whole: `hidden: [batch, seq, h]` (the final
/// hidden states), `projection` the frozen output projection. `None` off the CPU backend, where
/// the caller computes the logits.
pub fn linear_causal_lm_loss(
    hidden: Tensor<3>,
    projection: OutputProjection,
    softcap: Option<f32>,
    labels: Tensor<2, Int>,
) -> Option<Tensor<1>> {
    linear_loss_in_blocks(
        hidden,
        projection,
        softcap,
        labels,
        crate::chunked_loss::BLOCK_LOGITS,
    )
}

/// [`linear_causal_lm_loss`] with `block_logits` logit elements per block.
fn linear_loss_in_blocks(
    hidden: Tensor<3>,
    projection: OutputProjection,
    softcap: Option<f32>,
    labels: Tensor<2, Int>,
    block_logits: usize,
) -> Option<Tensor<1>> {
    let [batch, seq, h] = hidden.dims();
    let (targets, count) = next_token_targets(pad_labels(labels, seq), projection.vocab());
    let targets = crate::chunked_loss::CrossEntropyTargets {
        targets: std::sync::Arc::new(targets),
        softcap,
        block_logits,
    };
    let rows = hidden.reshape([batch * seq, h]);
    let nll = match projection {
        OutputProjection::F32(weight) => {
            crate::chunked_loss::linear_cross_entropy_rows(rows, weight, targets)
        }
        OutputProjection::Bf16(weight) => {
            crate::chunked_loss::bf16_linear_cross_entropy_rows(rows, weight, targets)
        }
    }?;
    Some(nll.sum().div_scalar(count as f32))
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

    /// The fused loss (CPU, f32) equals the composed one, value and gradient, with ignored
    /// labels and virtual-token padding.
    #[test]
    fn fused_loss_matches_the_composed_one() {
        use burn::tensor::Distribution;
        let device = Device::flex().autodiff();
        let logits =
            Tensor::<3>::random([2, 5, 37], Distribution::Normal(0.0, 3.0), &device).require_grad();
        let labels = Tensor::<2, Int>::from_data(
            TensorData::new(vec![3i64, 9, -100, 36, 0, 5, 5, -100, -100, 1], [2, 5]),
            &device,
        );
        assert!(crate::fused::is_fused(&logits));
        let short = labels.clone().slice_dim(1, 1..5);
        for labels in [labels, short] {
            let fused = causal_lm_loss(logits.clone(), labels.clone());
            let pad = 5 - labels.dims()[1];
            let full = if pad == 0 {
                labels
            } else {
                Tensor::cat(
                    vec![Tensor::full([2, pad], IGNORE_INDEX, &device), labels],
                    1,
                )
            };
            let composed = composed_causal_lm_loss(logits.clone(), full);
            let (f, c): (f32, f32) = (fused.clone().into_scalar(), composed.clone().into_scalar());
            assert!((f - c).abs() < 1e-5, "fused {f} vs composed {c}");
            let gf = logits.grad(&fused.backward()).unwrap();
            let gc = logits.grad(&composed.backward()).unwrap();
            let diff: f32 = (gf - gc).abs().max().into_scalar();
            assert!(diff < 1e-6, "gradients differ by {diff}");
        }
    }

    /// The projection + loss in row blocks equals whole logits + the loss, value and gradient
    /// with respect to the hidden states: blocks of 3 rows over 2 × 7 positions (the last block
    /// short), an odd vocabulary, ignored labels, virtual-token padding, with and without
    /// Gemma 2's soft-capping; a frozen tied table (`[vocab, h]` transposed) as the weight.
    #[test]
    fn chunked_loss_matches_whole_logits() {
        use burn::tensor::Distribution;
        let device = Device::flex().autodiff();
        let (batch, seq, h, vocab) = (2, 7, 16, 37);
        let table = Tensor::<2>::random([vocab, h], Distribution::Normal(0.0, 1.0), &device);
        let labels = Tensor::<2, Int>::from_data(
            TensorData::new(
                vec![3i64, 9, -100, 36, 0, 5, 5, 1, -100, -100, 8, 8, 30, 2],
                [batch, seq],
            ),
            &device,
        );
        for softcap in [None, Some(2.5f32)] {
            for labels in [labels.clone(), labels.clone().slice_dim(1, 2..seq)] {
                let hidden =
                    Tensor::<3>::random([batch, seq, h], Distribution::Normal(0.0, 1.0), &device)
                        .require_grad();
                let chunked = linear_loss_in_blocks(
                    hidden.clone(),
                    OutputProjection::F32(table.clone().transpose()),
                    softcap,
                    labels.clone(),
                    3 * vocab,
                )
                .unwrap();
                let mut logits = hidden.clone().matmul(table.clone().transpose().unsqueeze());
                if let Some(cap) = softcap {
                    logits = (logits / cap as f64).tanh() * cap as f64;
                }
                let whole = composed_causal_lm_loss(logits, pad_labels(labels, seq));
                let (c, w): (f32, f32) =
                    (chunked.clone().into_scalar(), whole.clone().into_scalar());
                assert!((c - w).abs() <= 1e-5 * w.abs(), "{softcap:?}: {c} vs {w}");
                let gc = hidden.grad(&chunked.backward()).unwrap();
                let gw = hidden.grad(&whole.backward()).unwrap();
                let scale: f32 = gw.clone().abs().max().into_scalar();
                let diff: f32 = (gc - gw).abs().max().into_scalar();
                assert!(
                    diff <= 1e-5 * scale,
                    "{softcap:?}: gradients differ by {diff}"
                );
            }
        }
    }

    /// The bf16 projection equals the same loss composed from bf16-rounded tensors (autocast's
    /// `lm_head`): `round(round(h) · round(W)ᵀ)` → f32 loss, value and gradient, in blocks of
    /// 3 rows with ignored labels — through oneDNN's bf16 kernels where they are loaded, else
    /// through f32 GEMMs. The rounding is real: the f32 projection's loss differs by far more.
    #[test]
    fn bf16_chunked_loss_matches_rounded_tensors() {
        use crate::half::HalfWeight;
        use crate::precision::round_bf16;
        use burn::tensor::Distribution;
        let device = Device::flex().autodiff();
        let (batch, seq, h, vocab) = (2, 7, 16, 37);
        let table = Tensor::<2>::random([vocab, h], Distribution::Normal(0.0, 1.0), &device);
        let values: Vec<f32> = table.to_data().iter::<f32>().collect();
        let weight = std::sync::Arc::new(HalfWeight::bf16_from_f32([vocab, h], &values).unwrap());
        let labels = Tensor::<2, Int>::from_data(
            TensorData::new(
                vec![3i64, 9, -100, 36, 0, 5, 5, 1, -100, -100, 8, 8, 30, 2],
                [batch, seq],
            ),
            &device,
        );
        let hidden = Tensor::<3>::random([batch, seq, h], Distribution::Normal(0.0, 1.0), &device)
            .require_grad();
        let chunked = linear_loss_in_blocks(
            hidden.clone(),
            OutputProjection::Bf16(weight),
            None,
            labels.clone(),
            3 * vocab,
        )
        .unwrap();
        let logits = round_bf16(
            round_bf16(hidden.clone()).matmul(round_bf16(table.clone()).transpose().unsqueeze()),
        );
        let whole = composed_causal_lm_loss(logits, labels.clone());
        let f32_loss: f32 =
            composed_causal_lm_loss(hidden.clone().matmul(table.transpose().unsqueeze()), labels)
                .into_scalar();
        let (c, w): (f32, f32) = (chunked.clone().into_scalar(), whole.clone().into_scalar());
        assert!((c - w).abs() <= 1e-5 * w.abs(), "{c} vs {w}");
        assert!(
            (f32_loss - w).abs() > 1e-4,
            "bf16 rounding shows: {f32_loss} vs {w}"
        );
        let gc = hidden.grad(&chunked.backward()).unwrap();
        let gw = hidden.grad(&whole.backward()).unwrap();
        let scale: f32 = gw.clone().abs().max().into_scalar();
        let diff: f32 = (gc - gw).abs().max().into_scalar();
        // The unit gradient is rounded before the upstream 1/count scales it, the composed one
        // after: one bf16 rounding apart at most.
        assert!(
            diff <= 1e-2 * scale,
            "gradients differ by {diff} of {scale}"
        );
    }

    /// Only -100 is ignored; another negative label, or one past the vocabulary, makes the
    /// loss NaN instead of panicking.
    #[test]
    fn out_of_range_labels_give_nan() {
        let device = Device::flex();
        let logits = Tensor::<3>::zeros([1, 3, 4], &device);
        for bad in [4i64, -2] {
            let labels =
                Tensor::<2, Int>::from_data(TensorData::new(vec![0i64, bad, 1], [1, 3]), &device);
            let loss: f32 = causal_lm_loss(logits.clone(), labels).into_scalar();
            assert!(loss.is_nan(), "label {bad}: {loss}");
        }
    }
}
