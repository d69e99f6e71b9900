//! The (IA)³ layer: a learned vector that scales a linear layer's output (keys, values) or, for
//! a feed-forward layer, its input.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::Tensor;

use peft_core::{BaseLinear, LayerAdapter, Result};

/// PEFT's `ia3_l` for one linear layer.
#[derive(Module, Debug)]
pub struct Ia3Linear {
    /// The scaling vector: `[out]` for an attention target, `[in]` for a feed-forward one.
    pub ia3_l: Param<Tensor<1>>,
    /// Whether the input (feed-forward) rather than the output is scaled.
    #[module(skip)]
    pub feedforward: bool,
}

impl Ia3Linear {
    /// A vector of ones (`init_ia3_weights: true`) or standard-normal values.
    pub fn init(len: usize, feedforward: bool, ones: bool, device: &burn::tensor::Device) -> Self {
        let l = if ones {
            Tensor::<1>::ones([len], device)
        } else {
            Tensor::<1>::random([len], burn::tensor::Distribution::Normal(0.0, 1.0), device)
        };
        Self::new(l, feedforward)
    }

    /// A layer from an explicit vector.
    pub fn new(ia3_l: Tensor<1>, feedforward: bool) -> Self {
        Self {
            ia3_l: Param::from_tensor(ia3_l),
            feedforward,
        }
    }

    /// `W` (burn layout `[in, out]`) and bias scaled by `l` (or divided, to unmerge).
    fn rescale(&self, mut base: Linear, divide: bool) -> Result<Linear> {
        let mut l = self.ia3_l.val();
        if divide {
            // As PEFT: dividing by l + 1e-8 keeps a zero entry from producing infinities.
            l = (l + 1e-8).recip();
        }
        let [d_in, d_out] = base.weight.shape().dims();
        let column = self.feedforward;
        let factor = if column {
            l.clone().reshape([d_in, 1])
        } else {
            l.clone().reshape([1, d_out])
        };
        let weight = base.weight.val() * factor;
        peft_core::adapter::check_merge_finite(&weight)?;
        base.weight = base.weight.map(|_| weight);
        if !self.feedforward
            && let Some(bias) = base.bias.take()
        {
            base.bias = Some(bias.map(|b| b * l));
        }
        Ok(base)
    }
}

impl LayerAdapter for Ia3Linear {
    fn forward_linear(&self, base: &BaseLinear, x: Tensor<3>) -> Tensor<3> {
        let l = self.ia3_l.val().unsqueeze::<3>();
        if self.feedforward {
            base.forward(x * l)
        } else {
            base.forward(x) * l
        }
    }

    fn merge_linear(&mut self, base: Linear) -> Result<Linear> {
        self.rescale(base, false)
    }

    fn unmerge_linear(&mut self, base: Linear) -> Result<Linear> {
        self.rescale(base, true)
    }
}
