//! DoRA, weight-decomposed LoRA (PEFT's `use_dora`, `tuners/lora/dora.py`): a learned magnitude
//! per output feature over the direction of `W + s·ΔW`.
//!
//! With `W: [in, out]` (burn's layout), `ΔW = A·B` and `n = ‖W + s·ΔW‖` over each output
//! column, the layer computes `x·(m/n ⊙ (W + s·ΔW)) + bias`, as PEFT does: the base output plus
//! `(m/n − 1) ⊙ (x·W) + (m/n) ⊙ s·B(A(x))`, with `n` **detached** (the paper's §4.3: the norm is
//! a constant in the backward pass, so A and B get their gradient through the direction only).
//! With dropout active PEFT multiplies the dropped-out `x` by `W` once more for the DoRA term;
//! without it the base output (bias taken out) serves.
//!
//! The norm is the cost: PEFT forms `W + s·ΔW` (`[out, in]`, de-quantised for a 4-bit base) on
//! every forward pass. Here it is expanded per column,
//! `n² = ‖W‖² + Σₖ B[k]·(2s·(AᵀW)[k] + s²·(AᵀA·B)[k])`, so a pass needs `‖W‖²` (computed once,
//! the base is frozen), one product of the base with the `r` rows of `Aᵀ` (through the base's own
//! product: packed 4-bit and bf16 weights are never widened to an f32 copy) and `r × r` / `r ×
//! out` products — no `[in, out]` temporary.

use std::sync::{Arc, Mutex};

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{DType, Tensor, TensorData};

use peft_core::{BaseLinear, PeftError, Result};

/// DoRA's part of one adapted linear layer: the trained magnitude and what its norm needs of the
/// frozen base.
#[derive(Module, Debug)]
pub struct DoraMagnitude {
    /// `m`, `[out]`: PEFT's `lora_magnitude_vector` (initialised to `‖W + s·ΔW‖`, so that the
    /// layer starts as LoRA would).
    pub magnitude: Param<Tensor<1>>,
    /// `‖W‖²` of each output column of the frozen base, `[out]` (f32; constant while the base is
    /// frozen and unmerged).
    #[module(skip)]
    pub base_norm_sq: Tensor<1>,
    /// The norm the last merge divided by (PEFT caches it in `merge` for `unmerge`).
    #[module(skip)]
    pub merged_norm: Option<Tensor<1>>,
    /// Outside training, the last norm computed and the A and B values it was computed from:
    /// decoding calls the layer once per token, and the norm's `AᵀW` costs `r` times the
    /// one-token product, so a pass over unchanged pairs reuses it (PEFT's
    /// `ENABLE_DORA_CACHING`, here on for the CPU backend). Keyed on the pair's values, so never
    /// stale (an evaluation between training steps recomputes it).
    #[module(skip)]
    norm_cache: NormCache,
}

/// One cached norm: the A and B values it was computed from, and the norm `[out]`.
type CachedNorm = (Vec<f32>, Tensor<1>);

/// The inference cache of [`DoraMagnitude`].
#[derive(Clone, Debug, Default)]
struct NormCache(Arc<Mutex<Option<CachedNorm>>>);

impl DoraMagnitude {
    /// A magnitude read from a file (or given), over the base layer `base`.
    pub fn new(magnitude: Tensor<1>, base: &BaseLinear) -> Self {
        Self {
            magnitude: Param::from_tensor(magnitude),
            base_norm_sq: base_column_norm_sq(base),
            merged_norm: None,
            norm_cache: NormCache::default(),
        }
    }

    /// PEFT's initial magnitude: `‖W + s·A·B‖` per output column, from the pair as initialised
    /// (B = 0 by default, so `‖W‖`).
    pub fn init(base: &BaseLinear, lora_a: &Tensor<2>, lora_b: &Tensor<2>, scaling: f64) -> Self {
        let base_norm_sq = base_column_norm_sq(base);
        // A leaf of its own: the magnitude is a parameter, not a result of A and B.
        let norm = weight_norm(base, &base_norm_sq, lora_a, lora_b, scaling).detach();
        Self {
            magnitude: Param::from_tensor(norm),
            base_norm_sq,
            merged_norm: None,
            norm_cache: NormCache::default(),
        }
    }

    /// `m / ‖W + s·A·B‖`, `[out]`, the norm detached (PEFT's `mag_norm_scale`).
    pub fn scale(
        &self,
        base: &BaseLinear,
        lora_a: &Tensor<2>,
        lora_b: &Tensor<2>,
        scaling: f64,
    ) -> Tensor<1> {
        let norm = self.norm(base, lora_a, lora_b, scaling);
        self.magnitude.val() / norm
    }

    /// `‖W + s·A·B‖`, from the cache outside training when A and B are what it was computed
    /// from.
    fn norm(
        &self,
        base: &BaseLinear,
        lora_a: &Tensor<2>,
        lora_b: &Tensor<2>,
        scaling: f64,
    ) -> Tensor<1> {
        let compute = || weight_norm(base, &self.base_norm_sq, lora_a, lora_b, scaling);
        // On a GPU, reading the pair back for the key would cost a device sync per layer.
        let device = lora_a.device();
        if device.is_autodiff() || !peft_ops::device::runs_cpu_kernels(&device) {
            return compute();
        }
        let key: Vec<f32> = [lora_a, lora_b]
            .into_iter()
            .flat_map(|t| t.to_data().iter::<f32>().collect::<Vec<_>>())
            .collect();
        let Ok(mut cache) = self.norm_cache.0.lock() else {
            return compute();
        };
        if let Some((cached_key, norm)) = cache.as_ref()
            && *cached_key == key
        {
            return norm.clone();
        }
        let norm = compute();
        *cache = Some((key, norm.clone()));
        norm
    }

    /// PEFT's DoRA merge: `W′ = (m/n) ⊙ (W + s·A·B)` per output column, `n = ‖W + s·A·B‖` from
    /// the weight as it is now (so a merge over an already merged adapter uses that weight). The
    /// norm is kept for [`unmerge`](Self::unmerge).
    pub fn merge(&mut self, mut base: Linear, delta: Tensor<2>) -> Result<Linear> {
        let weight = base.weight.val();
        let dtype = weight.dtype();
        let combined = weight.cast(DType::F32) + delta;
        let norm = combined
            .clone()
            .square()
            .sum_dim(0)
            .sqrt()
            .squeeze_dim::<1>(0);
        let factor = self.magnitude.val().detach() / norm.clone();
        let merged = combined * factor.unsqueeze_dim::<2>(0);
        peft_core::adapter::check_merge_finite(&merged)?;
        base.weight = base.weight.map(|_| merged.cast(dtype));
        self.merged_norm = Some(norm);
        Ok(base)
    }

    /// PEFT's DoRA unmerge: `W = W′ / (m/n) − s·A·B` with the norm the merge used.
    pub fn unmerge(&mut self, mut base: Linear, delta: Tensor<2>) -> Result<Linear> {
        let norm = self.merged_norm.take().ok_or_else(|| {
            PeftError::AdapterMismatch("DoRA unmerge without a preceding merge".into())
        })?;
        let weight = base.weight.val();
        let dtype = weight.dtype();
        let factor = self.magnitude.val().detach() / norm;
        let restored = weight.cast(DType::F32) / factor.unsqueeze_dim::<2>(0) - delta;
        base.weight = base.weight.map(|_| restored.cast(dtype));
        Ok(base)
    }
}

/// `‖W‖²` of each output column of the frozen weight, `[out]`, in f32. A packed base (4-bit, or
/// bf16 held as stored) is de-quantised once here, one output row at a time in its own layout.
fn base_column_norm_sq(base: &BaseLinear) -> Tensor<1> {
    match base {
        BaseLinear::Dense(l) => {
            let w = l.weight.val().detach().cast(DType::F32);
            w.square().sum_dim(0).squeeze_dim::<1>(0)
        }
        BaseLinear::Packed(p) => {
            let [out, d_in] = p.weight.shape();
            let values = p.weight.dequantize();
            let sums: Vec<f32> = (0..out)
                .map(|o| values[o * d_in..(o + 1) * d_in].iter().map(|v| v * v).sum())
                .collect();
            Tensor::from_data(TensorData::new(sums, [out]), &p.device)
        }
    }
}

/// `‖W + s·A·B‖` per output column, `[out]`, detached: expanded as in the module doc, from
/// `‖W‖²`, `AᵀW` (the base's own product applied to the rows of `Aᵀ`, bias left out) and
/// `AᵀA`.
fn weight_norm(
    base: &BaseLinear,
    base_norm_sq: &Tensor<1>,
    lora_a: &Tensor<2>,
    lora_b: &Tensor<2>,
    scaling: f64,
) -> Tensor<1> {
    let a = lora_a.clone().detach();
    let b = lora_b.clone().detach();
    let a_t = a.clone().transpose();
    // AᵀW: [r, out].
    let a_w = base_product(base, a_t.clone());
    // AᵀA·B: [r, out].
    let gram_b = a_t.matmul(a).matmul(b.clone());
    let cross = (a_w * (2.0 * scaling) + gram_b * (scaling * scaling)) * b;
    let norm_sq = cross.sum_dim(0).squeeze_dim::<1>(0) + base_norm_sq.clone();
    norm_sq.clamp_min(0.0).sqrt()
}

/// `rows · W` for `rows: [k, in]` → `[k, out]` (f32), through the base's own product and without
/// its bias.
fn base_product(base: &BaseLinear, rows: Tensor<2>) -> Tensor<2> {
    match base {
        BaseLinear::Dense(l) => {
            let w = l.weight.val().detach();
            let dtype = w.dtype();
            rows.cast(dtype).matmul(w).cast(DType::F32)
        }
        BaseLinear::Packed(_) => without_bias(base)
            .0
            .forward(rows.unsqueeze_dim::<3>(0))
            .squeeze_dim::<2>(0),
    }
}

/// DoRA's term of one layer (see the module doc), added to `result`: the layer's output so far
/// (the base output, bias included, plus any earlier adapter's term — PEFT's `base_result`).
/// `dora_x` is the adapter's input (`x` after dropout), `lora` the LoRA term `s·B(A(dora_x))`,
/// `dropout_active` whether `dora_x` differs from `x` (then `x·W` is computed again on it).
pub(crate) fn term(
    magnitude: &DoraMagnitude,
    base: &BaseLinear,
    (lora_a, lora_b, scaling): (&Tensor<2>, &Tensor<2>, f64),
    result: &Tensor<3>,
    dora_x: Tensor<3>,
    lora: Tensor<3>,
    dropout_active: bool,
) -> Tensor<3> {
    let scale = magnitude
        .scale(base, lora_a, lora_b, scaling)
        .unsqueeze_dim::<2>(0)
        .unsqueeze_dim::<3>(0);
    let base_term = if dropout_active {
        // PEFT: `base_result=None`, so `x·W` again on the dropped-out input.
        base_linear_no_bias(base, dora_x)
    } else {
        match base_bias(base) {
            Some(bias) => result.clone() - bias.unsqueeze_dim::<2>(0).unsqueeze_dim::<3>(0),
            None => result.clone(),
        }
    };
    base_term * (scale.clone() - 1.0) + lora * scale
}

/// The base layer without its bias (sharing its weight), and the bias.
pub(crate) fn without_bias(base: &BaseLinear) -> (BaseLinear, Option<Tensor<1>>) {
    match base {
        BaseLinear::Dense(l) => {
            let mut no_bias = l.clone();
            let bias = no_bias.bias.take().map(|b| b.val());
            (BaseLinear::Dense(no_bias), bias)
        }
        BaseLinear::Packed(p) => {
            let mut no_bias = p.clone();
            let bias = no_bias.bias.take().map(|b| b.val());
            (BaseLinear::Packed(no_bias), bias)
        }
    }
}

/// The base layer's bias, `[out]`.
fn base_bias(base: &BaseLinear) -> Option<Tensor<1>> {
    match base {
        BaseLinear::Dense(l) => l.bias.as_ref().map(|b| b.val()),
        BaseLinear::Packed(p) => p.bias.as_ref().map(|b| b.val()),
    }
}

/// `x·W` without the bias, `[batch, seq, in]` → `[batch, seq, out]`.
fn base_linear_no_bias(base: &BaseLinear, x: Tensor<3>) -> Tensor<3> {
    without_bias(base).0.forward(x)
}
