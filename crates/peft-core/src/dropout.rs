//! Dropout whose masks come from a generator owned by the calling thread.
//!
//! burn's [`Dropout`] draws its masks from the device's generator, which is process-global. Data
//! parallelism in one process (`peft train --devices cpu,cpu`) runs one rank per thread, and
//! ranks that re-seed that generator and draw from it at the same time interleave each other's
//! streams: two identical runs differ, and neither equals one device with accumulation. The
//! trainer therefore seeds *this thread's* generator before each micro-batch from
//! `(seed, global micro-batch index)` ([`seed_thread`]); every adapter layer with dropout draws
//! through [`forward`], which uses that generator when the thread has one and burn's otherwise
//! (a caller training by hand gets burn's behaviour unchanged).
//!
//! The generator is SplitMix64, written here rather than taken from `rand`: its stream is fixed
//! by this file, so a checkpoint's masks replay identically after any dependency update.

use std::cell::Cell;

use burn::nn::Dropout;
use burn::tensor::{Bool, Tensor, TensorData};

thread_local! {
    /// The calling thread's SplitMix64 state; `None` until [`seed_thread`].
    static STATE: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Seeds the calling thread's dropout generator: the masks [`forward`] draws next on this thread
/// are a function of `seed` alone.
pub fn seed_thread(seed: u64) {
    STATE.with(|s| s.set(Some(seed)));
}

/// Forgets the calling thread's generator: [`forward`] draws from burn's device generator again.
pub fn unseed_thread() {
    STATE.with(|s| s.set(None));
}

/// Whether the calling thread has a seeded generator.
pub fn thread_is_seeded() -> bool {
    STATE.with(|s| s.get().is_some())
}

/// One SplitMix64 step: advances `state` and returns the next output.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `len` draws of "drop this element" with probability `prob`, from the thread's generator
/// (`None` when the thread has none).
fn drop_mask(len: usize, prob: f64) -> Option<Vec<bool>> {
    STATE.with(|cell| {
        let mut state = cell.get()?;
        // The top 53 bits as a uniform f64 in [0, 1): dropped when below `prob`.
        let scale = 1.0 / (1u64 << 53) as f64;
        let mask = (0..len)
            .map(|_| ((next(&mut state) >> 11) as f64 * scale) < prob)
            .collect();
        cell.set(Some(state));
        Some(mask)
    })
}

/// Whether [`forward`] would drop anything of `x`: a non-zero probability, the layer's training
/// flag set, and `x` on an autodiff device (PEFT's `not isinstance(dropout, nn.Identity) and
/// self.training`).
pub fn is_active<const D: usize>(layer: &Dropout, x: &Tensor<D>) -> bool {
    layer.prob != 0.0 && layer.training.is_enabled() && x.device().is_autodiff()
}

/// `layer` applied to `x` (any shape): zeroes each element with probability `layer.prob` and
/// scales the rest by `1 / (1 - prob)` when training (the layer's flag set and `x` on an
/// autodiff device), else returns `x`, exactly as [`Dropout::forward`] decides. The mask comes
/// from the thread's generator when [`seed_thread`] set one, else from burn's.
pub fn forward<const D: usize>(layer: &Dropout, x: Tensor<D>) -> Tensor<D> {
    if !is_active(layer, &x) {
        return x;
    }
    let shape = x.shape();
    let Some(dropped) = drop_mask(shape.num_elements(), layer.prob) else {
        return layer.forward(x);
    };
    let device = x.device();
    let dropped = Tensor::<D, Bool>::from_data(TensorData::new(dropped, shape), &device);
    x.mask_fill(dropped, 0.0) * (1.0 / (1.0 - layer.prob))
}

/// `len` draws of "drop this one" with probability `prob`, for methods that drop whole rows or
/// modules rather than elements (LoHa's `rank_dropout` and `module_dropout`): from the thread's
/// generator when [`seed_thread`] set one, else from burn's on `device`.
pub fn draw_drops(len: usize, prob: f64, device: &burn::tensor::Device) -> Vec<bool> {
    if let Some(mask) = drop_mask(len, prob) {
        return mask;
    }
    let uniform = Tensor::<1>::random([len], burn::tensor::Distribution::Uniform(0.0, 1.0), device);
    uniform
        .into_data()
        .iter::<f64>()
        .map(|u| u < prob)
        .collect()
}

/// LyCORIS's module dropout (LoHa, LoKr): whether this training pass skips the adapter, drawn
/// with probability `layer.prob` when [`is_active`] (PEFT's `torch.rand(1) > module_dropout`).
pub fn skips_module<const D: usize>(layer: &Dropout, x: &Tensor<D>) -> bool {
    is_active(layer, x) && draw_drops(1, layer.prob, &x.device())[0]
}

/// LyCORIS's rank dropout (LoHa, LoKr): one factor per output row of the update, `[1, d_out]`
/// — 0 for a dropped row, 1 for a kept one, or with `rescale` the kept ones divided by the
/// share kept (PEFT's `drop /= drop.mean()`). `None` when [`is_active`] is false. With every row
/// dropped, PEFT's rescale divides 0 by 0 (NaN); here the update is then zero.
pub fn rank_keep_factors<const D: usize>(
    layer: &Dropout,
    x: &Tensor<D>,
    d_out: usize,
    rescale: bool,
) -> Option<Tensor<2>> {
    if !is_active(layer, x) {
        return None;
    }
    let device = x.device();
    let dropped = draw_drops(d_out, layer.prob, &device);
    let kept = dropped.iter().filter(|&&d| !d).count();
    let keep = if rescale {
        d_out as f32 / kept.max(1) as f32
    } else {
        1.0
    };
    let factors: Vec<f32> = dropped
        .iter()
        .map(|&d| if d { 0.0 } else { keep })
        .collect();
    Some(Tensor::<2>::from_data(
        TensorData::new(factors, [1, d_out]),
        &device,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::DropoutConfig;

    fn training_device() -> burn::tensor::Device {
        burn::tensor::Device::flex().autodiff()
    }

    fn drawn(seed: u64, x: Tensor<2>, layer: &Dropout) -> Vec<f32> {
        seed_thread(seed);
        let y = forward(layer, x);
        unseed_thread();
        y.into_data().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn a_seed_fixes_the_mask_whatever_other_threads_draw() {
        let device = training_device();
        let layer = DropoutConfig::new(0.25).init();
        let x = Tensor::<2>::ones([64, 32], &device);
        let first = drawn(5, x.clone(), &layer);
        // Another thread seeding and drawing meanwhile changes nothing here.
        std::thread::scope(|s| {
            s.spawn(|| drawn(99, Tensor::<2>::ones([64, 32], &training_device()), &layer));
        });
        assert_eq!(first, drawn(5, x.clone(), &layer));
        assert_ne!(first, drawn(6, x, &layer));
        // Kept elements are scaled by 1 / (1 - p) = 4/3; the dropped share is near p.
        let dropped = first.iter().filter(|&&v| v == 0.0).count();
        assert!(first.iter().all(|&v| v == 0.0 || v == 4.0 / 3.0));
        assert!((dropped as f64 / 2048.0 - 0.25).abs() < 0.03, "{dropped}");
    }

    #[test]
    fn no_mask_outside_training_or_at_zero_probability() {
        let x = Tensor::<2>::ones([4, 4], &burn::tensor::Device::flex());
        let layer = DropoutConfig::new(0.5).init();
        assert_eq!(drawn(1, x.clone(), &layer), vec![1.0; 16]);
        let off = DropoutConfig::new(0.0).init();
        let x = Tensor::<2>::ones([4, 4], &training_device());
        assert_eq!(drawn(1, x, &off), vec![1.0; 16]);
        assert!(!thread_is_seeded());
    }

    #[test]
    fn row_draws_follow_the_thread_seed() {
        let device = burn::tensor::Device::flex();
        seed_thread(3);
        let first = draw_drops(4096, 0.3, &device);
        seed_thread(3);
        assert_eq!(first, draw_drops(4096, 0.3, &device));
        unseed_thread();
        let share = first.iter().filter(|&&d| d).count() as f64 / 4096.0;
        assert!((share - 0.3).abs() < 0.03, "{share}");
        // Unseeded: burn's generator, still about the same share.
        let share = draw_drops(4096, 0.3, &device)
            .iter()
            .filter(|&&d| d)
            .count() as f64
            / 4096.0;
        assert!((share - 0.3).abs() < 0.03, "{share}");
    }

    #[test]
    fn rank_factors_drop_rows_and_rescale_only_when_asked() {
        let device = training_device();
        let layer = DropoutConfig::new(0.5).init();
        let x = Tensor::<2>::ones([1, 1], &device);
        let factors = |rescale| {
            seed_thread(11);
            let f = rank_keep_factors(&layer, &x, 8, rescale).unwrap();
            unseed_thread();
            f.into_data().try_to_vec::<f32>().unwrap()
        };
        let (plain, scaled) = (factors(false), factors(true));
        let kept = plain.iter().filter(|&&v| v == 1.0).count();
        assert!(plain.iter().all(|&v| v == 0.0 || v == 1.0));
        assert!(kept > 0 && kept < 8, "{plain:?}");
        // The same rows kept, each divided by the share kept (the mean of the keep mask).
        for (p, s) in plain.iter().zip(&scaled) {
            assert_eq!(*s, p * 8.0 / kept as f32);
        }
        let eval = Tensor::<2>::ones([1, 1], &burn::tensor::Device::flex());
        assert!(rank_keep_factors(&layer, &eval, 8, true).is_none());
        assert!(!skips_module(&layer, &eval));
    }

    #[test]
    fn splitmix_matches_its_published_stream() {
        // The reference implementation's first outputs for seed 0 (Vigna's splitmix64.c).
        let mut state = 0;
        assert_eq!(next(&mut state), 0xE220_A839_7B1D_CDAF);
        assert_eq!(next(&mut state), 0x6E78_9E6A_A1B9_65F4);
    }
}
