//! The VeRA layer: `y = base(x) + λ_b ⊙ (B_s · (λ_d ⊙ (A_s · dropout(x))))` (PEFT's
//! `vera.Linear.forward`), where `A_s: [r, in]` and `B_s: [out, r]` are this layer's slices of
//! the model's frozen shared projections and `λ_d: [r]`, `λ_b: [out]` are all it trains.

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::tensor::{Distribution, Tensor};
use peft_ops::matmul::linear;

use peft_core::{BaseLinear, LayerAdapter, Result};

/// VeRA's two vectors for one linear layer `[in → out]`, with its slices of the shared
/// projections.
#[derive(Module, Debug)]
pub struct VeraLinear {
    /// `λ_b: [out]`, scales the output (zero in a fresh adapter).
    pub vera_lambda_b: Param<Tensor<1>>,
    /// `λ_d: [r]`, scales the inner dimension.
    pub vera_lambda_d: Param<Tensor<1>>,
    /// `vera_dropout`, on the input.
    pub vera_dropout: Dropout,
    /// `A_sᵀ: [in, r]` (frozen; not a parameter: PEFT holds the projections as buffers).
    #[module(skip)]
    pub a_t: Tensor<2>,
    /// `B_sᵀ: [r, out]` (frozen).
    #[module(skip)]
    pub b_t: Tensor<2>,
}

impl VeraLinear {
    /// A layer from its projection slices in burn's layout (`a_t: [in, r]`, `b_t: [r, out]`)
    /// and its two vectors.
    pub fn new(
        a_t: Tensor<2>,
        b_t: Tensor<2>,
        lambda_b: Tensor<1>,
        lambda_d: Tensor<1>,
        dropout: f64,
    ) -> Self {
        Self {
            vera_lambda_b: Param::from_tensor(lambda_b),
            vera_lambda_d: Param::from_tensor(lambda_d),
            vera_dropout: DropoutConfig::new(dropout).init(),
            a_t,
            b_t,
        }
    }

    /// PEFT's initialisation: with `init_weights`, `λ_b = 0` (the adapter starts as a no-op)
    /// and `λ_d = d_initial`; without, `λ_b = 1` and `λ_d` standard normal.
    pub fn init(
        a_t: Tensor<2>,
        b_t: Tensor<2>,
        d_initial: f64,
        init_weights: bool,
        dropout: f64,
    ) -> Self {
        let device = a_t.device();
        let (r, d_out) = (a_t.dims()[1], b_t.dims()[1]);
        let (lambda_b, lambda_d) = if init_weights {
            (
                Tensor::<1>::zeros([d_out], &device),
                Tensor::<1>::full([r], d_initial, &device),
            )
        } else {
            (
                Tensor::<1>::ones([d_out], &device),
                Tensor::<1>::random([r], Distribution::Normal(0.0, 1.0), &device),
            )
        };
        Self::new(a_t, b_t, lambda_b, lambda_d, dropout)
    }

    /// `ΔWᵀ = ((λ_b ⊙ B_s) · (λ_d ⊙ A_s))ᵀ = (A_sᵀ ⊙ λ_d) · (B_sᵀ ⊙ λ_b)`, `[in, out]`
    /// (burn's weight layout).
    pub fn delta_weight(&self) -> Tensor<2> {
        let a = self.a_t.clone() * self.vera_lambda_d.val().unsqueeze::<2>();
        let b = self.b_t.clone() * self.vera_lambda_b.val().unsqueeze::<2>();
        peft_ops::matmul::matmul(a, b)
    }

    /// `λ_b ⊙ ((λ_d ⊙ (dropout(x) · A_sᵀ)) · B_sᵀ)`, in PEFT's order.
    fn update(&self, x: Tensor<3>) -> Tensor<3> {
        let x = peft_core::dropout::forward(&self.vera_dropout, x);
        let inner = linear(x, self.a_t.clone(), None) * self.vera_lambda_d.val().unsqueeze::<3>();
        linear(inner, self.b_t.clone(), None) * self.vera_lambda_b.val().unsqueeze::<3>()
    }
}

impl LayerAdapter for VeraLinear {
    fn forward_linear(&self, base: &BaseLinear, x: Tensor<3>) -> Tensor<3> {
        base.forward(x.clone()) + self.update(x)
    }

    fn delta_linear(
        &self,
        _base: &BaseLinear,
        x: Tensor<3>,
        _result: &Tensor<3>,
    ) -> Option<Tensor<3>> {
        Some(self.update(x))
    }

    fn is_additive(&self) -> bool {
        true
    }

    fn merge_linear(&mut self, base: Linear) -> Result<Linear> {
        peft_core::adapter::shift_linear(base, self.delta_weight(), 1.0)
    }

    fn unmerge_linear(&mut self, base: Linear) -> Result<Linear> {
        peft_core::adapter::shift_linear(base, self.delta_weight(), -1.0)
    }
}
