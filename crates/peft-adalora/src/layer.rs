//! The AdaLoRA layer (PEFT's `adalora.SVDLinear`): LoRA in SVD form,
//! `y = base(x) + (dropout(x) · (A ⊙ E)ᵀ · Bᵀ) · scale`, where `A: [r, in]` and `B: [out, r]` are
//! the singular vectors (P and Q of the paper, kept near-orthogonal by a penalty in training),
//! `E: [r, 1]` the singular values the allocator zeroes to cut a rank, and
//! `scale = lora_alpha / (init_r + 1e-5)` ([`crate::AdaLoraConfig::scale`]).
//!
//! The tensors are held in PyTorch's layout, as PEFT stores them.

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::tensor::{Distribution, Tensor};
use peft_ops::matmul::{linear, matmul};

use peft_core::{BaseLinear, LayerAdapter, PeftError, Result};

/// AdaLoRA's triplet for one linear layer `[in → out]` at rank `r`.
#[derive(Module, Debug)]
pub struct SvdLinear {
    /// `lora_A: [r, in]`, the right singular vectors.
    pub lora_a: Param<Tensor<2>>,
    /// `lora_E: [r, 1]`, the singular values (zero in a fresh adapter).
    pub lora_e: Param<Tensor<2>>,
    /// `lora_B: [out, r]`, the left singular vectors.
    pub lora_b: Param<Tensor<2>>,
    /// `lora_dropout`, on the input.
    pub lora_dropout: Dropout,
    /// `scaling / (ranknum + 1e-5)`.
    #[module(skip)]
    pub scale: f32,
    /// The rank allocator's smoothed scores of `A`, `E` and `B` in training (`None` before the
    /// first update and after the final mask; [`crate::allocator`]).
    #[module(skip)]
    pub importance: Option<Importance>,
}

/// One tensor's allocator state (PEFT's `exp_avg_ipt` and `exp_avg_unc`), its shape.
#[derive(Debug, Clone)]
pub struct Ema {
    /// `Ī`: the EMA of `|p · ∂L/∂p|`.
    pub mean: Tensor<2>,
    /// `Ū`: the EMA of `|I − Ī|`.
    pub spread: Tensor<2>,
}

impl Ema {
    /// Zeros shaped as `like` (PEFT's `torch.zeros_like(p)`).
    pub fn zeros(like: &Tensor<2>) -> Self {
        Self {
            mean: like.zeros_like(),
            spread: like.zeros_like(),
        }
    }

    /// Each element's score `Ī · Ū`.
    fn score(&self) -> Tensor<2> {
        self.mean.clone() * self.spread.clone()
    }
}

/// The allocator's state of one layer.
#[derive(Debug, Clone)]
pub struct Importance {
    /// Of `lora_A: [r, in]`.
    pub a: Ema,
    /// Of `lora_E: [r, 1]`.
    pub e: Ema,
    /// Of `lora_B: [out, r]`.
    pub b: Ema,
}

impl Importance {
    /// The state of `A`, `E` or `B` (0, 1, 2).
    pub fn part(&self, index: usize) -> &Ema {
        match index {
            0 => &self.a,
            1 => &self.e,
            _ => &self.b,
        }
    }

    /// Each singular value's score, `[r]` on the host: its `E` entry's plus the means of its
    /// row of `A` and its column of `B` (PEFT's `_combine_ipt`).
    pub fn rank_scores(&self) -> Result<Vec<f32>> {
        let r = self.e.mean.dims()[0];
        let a = self.a.score().mean_dim(1).reshape([r]);
        let b = self.b.score().mean_dim(0).reshape([r]);
        let e = self.e.score().reshape([r]);
        (e + (a + b))
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| PeftError::InvalidInput(format!("AdaLoRA's scores: {e:?}")))
    }
}

impl SvdLinear {
    /// A layer from its three tensors in PyTorch's layout.
    pub fn new(
        lora_a: Tensor<2>,
        lora_e: Tensor<2>,
        lora_b: Tensor<2>,
        scale: f32,
        dropout: f64,
    ) -> Self {
        Self {
            lora_a: Param::from_tensor(lora_a),
            lora_e: Param::from_tensor(lora_e),
            lora_b: Param::from_tensor(lora_b),
            lora_dropout: DropoutConfig::new(dropout).init(),
            scale,
            importance: None,
        }
    }

    /// PEFT's initialisation for `[in → out]` at rank `r`: with `init_lora_weights`, `E = 0`
    /// (the adapter starts as a no-op) and `A`, `B` normal with std 0.02; without, all three
    /// standard normal (`torch.randn`).
    pub fn init(
        d_in: usize,
        d_out: usize,
        r: usize,
        scale: f32,
        dropout: f64,
        init_lora_weights: bool,
        device: &burn::tensor::Device,
    ) -> Self {
        let std = if init_lora_weights { 0.02 } else { 1.0 };
        let normal =
            |shape: [usize; 2]| Tensor::<2>::random(shape, Distribution::Normal(0.0, std), device);
        let e = if init_lora_weights {
            Tensor::<2>::zeros([r, 1], device)
        } else {
            normal([r, 1])
        };
        Self::new(normal([r, d_in]), e, normal([d_out, r]), scale, dropout)
    }

    /// The layer's rank (its kept singular values).
    pub fn rank(&self) -> usize {
        self.lora_e.dims()[0]
    }

    /// `(A ⊙ E)ᵀ: [in, r]`.
    fn scaled_a_t(&self) -> Tensor<2> {
        (self.lora_a.val() * self.lora_e.val()).transpose()
    }

    /// `ΔWᵀ = ((B · (A ⊙ E)) · scale)ᵀ`, `[in, out]` (burn's weight layout; PEFT's
    /// `get_delta_weight` transposed).
    pub fn delta_weight(&self) -> Tensor<2> {
        matmul(self.scaled_a_t(), self.lora_b.val().transpose()) * self.scale
    }

    /// `(dropout(x) · (A ⊙ E)ᵀ · Bᵀ) · scale`, in PEFT's order; `None` at rank 0.
    fn update(&self, x: Tensor<3>) -> Option<Tensor<3>> {
        if self.rank() == 0 {
            return None;
        }
        let x = peft_core::dropout::forward(&self.lora_dropout, x);
        let inner = linear(x, self.scaled_a_t(), None);
        Some(linear(inner, self.lora_b.val().transpose(), None) * self.scale)
    }
}

impl LayerAdapter for SvdLinear {
    fn forward_linear(&self, base: &BaseLinear, x: Tensor<3>) -> Tensor<3> {
        match self.update(x.clone()) {
            Some(update) => base.forward(x) + update,
            None => base.forward(x),
        }
    }

    fn delta_linear(
        &self,
        _base: &BaseLinear,
        x: Tensor<3>,
        result: &Tensor<3>,
    ) -> Option<Tensor<3>> {
        Some(self.update(x).unwrap_or_else(|| result.zeros_like()))
    }

    fn is_additive(&self) -> bool {
        true
    }

    fn merge_linear(&mut self, base: Linear) -> Result<Linear> {
        if self.rank() == 0 {
            return Ok(base);
        }
        peft_core::adapter::shift_linear(base, self.delta_weight(), 1.0)
    }

    fn unmerge_linear(&mut self, base: Linear) -> Result<Linear> {
        if self.rank() == 0 {
            return Ok(base);
        }
        peft_core::adapter::shift_linear(base, self.delta_weight(), -1.0)
    }
}
