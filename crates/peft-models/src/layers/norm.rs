//! LayerNorm (BLOOM) and RMSNorm (Llama and the architectures built like it), with Hugging
//! Face's parameter names; one fused pass each on the CPU backend.

use burn::module::{Module, Param};
use burn::tensor::Tensor;

/// LayerNorm with Hugging Face's parameter names (`weight`, `bias`).
#[derive(Module, Debug)]
pub struct LayerNorm {
    /// Scale, `[dim]`.
    pub weight: Param<Tensor<1>>,
    /// Shift, `[dim]`.
    pub bias: Param<Tensor<1>>,
    /// Added to the variance.
    #[module(skip)]
    pub eps: f64,
}

impl LayerNorm {
    /// `[.., dim]` → `[.., dim]`, normalised over the last dimension (biased variance, as PyTorch).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        if let Some(y) =
            peft_ops::fused::layer_norm(x.clone(), self.weight.val(), self.bias.val(), self.eps)
        {
            return y;
        }
        let (var, mean) = x.clone().var_mean_bias(D - 1);
        let normed = (x - mean).div((var + self.eps).sqrt());
        normed * self.weight.val().unsqueeze() + self.bias.val().unsqueeze()
    }
}

/// RMSNorm as in Llama: `x / sqrt(mean(x²) + eps) · weight`, computed in f32.
#[derive(Module, Debug)]
pub struct RmsNorm {
    /// Scale, `[dim]`.
    pub weight: Param<Tensor<1>>,
    /// Added to the mean square.
    #[module(skip)]
    pub eps: f64,
}

impl RmsNorm {
    /// `[.., dim]` → `[.., dim]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        if let Some(y) = peft_ops::fused::rms_norm(x.clone(), self.weight.val(), self.eps) {
            return y;
        }
        let ms = x.clone().square().mean_dim(D - 1);
        x * (ms + self.eps).sqrt().recip() * self.weight.val().unsqueeze()
    }
}
