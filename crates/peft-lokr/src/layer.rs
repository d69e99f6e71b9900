//! The LoKr layer: `y = base(x) + x · ΔWᵀ` with `ΔW = s · w1 ⊗ w2` (Kronecker product), beside
//! the frozen base (PEFT's `LoKrLayer` over `nn.Linear`, LyCORIS' `make_kron`).
//!
//! A layer `[in → out]` is split as `out = a·b`, `in = c·d` ([`LokrShape`]); `w1: [a, c]` and
//! `w2: [b, d]`, each held whole or as a rank-`r` product, in PyTorch's layout as PEFT stores
//! them. PEFT forms the full `[out, in]` update in every forward pass; here the forward pass
//! never does: with `x` seen as `[c, d]` per token, `x · ΔWᵀ = s · w1 · X · w2ᵀ`, two products
//! of `c·d·b + c·b·a` multiply-adds per token instead of `in·out` (and no `[out, in]` tensor
//! at all). The full update is formed only to merge.

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::tensor::{Distribution, Tensor};
use peft_ops::matmul::matmul;

use peft_core::{BaseLinear, LayerAdapter, Result};

use crate::config::{LokrInit, LokrShape};

/// LoKr's factors for one linear layer `[in → out]`; exactly one of `lokr_w1` and the pair
/// `lokr_w1_a`/`lokr_w1_b` is present, and likewise for `w2`.
#[derive(Module, Debug)]
pub struct LokrLinear {
    /// `w1` whole, `[a, c]`.
    pub lokr_w1: Option<Param<Tensor<2>>>,
    /// `w1`'s left factor, `[a, r]`.
    pub lokr_w1_a: Option<Param<Tensor<2>>>,
    /// `w1`'s right factor, `[r, c]`.
    pub lokr_w1_b: Option<Param<Tensor<2>>>,
    /// `w2` whole, `[b, d]`.
    pub lokr_w2: Option<Param<Tensor<2>>>,
    /// `w2`'s left factor, `[b, r]`.
    pub lokr_w2_a: Option<Param<Tensor<2>>>,
    /// `w2`'s right factor, `[r, d]`.
    pub lokr_w2_b: Option<Param<Tensor<2>>>,
    /// `rank_dropout`: drops output rows of `ΔW` in training.
    pub rank_dropout: Dropout,
    /// `module_dropout`: skips the adapter in a training pass.
    pub module_dropout: Dropout,
    /// `alpha / r`.
    #[module(skip)]
    pub scaling: f64,
    /// Whether the kept rows are divided by the share kept (`rank_dropout_scale`).
    #[module(skip)]
    pub rank_dropout_scale: bool,
}

/// One factor of the Kronecker product: whole, or a product of two.
// Built once per layer and taken apart at once: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Factor {
    /// The factor itself.
    Whole(Tensor<2>),
    /// `left · right`.
    Product(Tensor<2>, Tensor<2>),
}

/// The dropouts and scale of a layer (`alpha / r`, `rank_dropout`, `module_dropout`,
/// `rank_dropout_scale`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LokrSettings {
    /// `alpha / r`.
    pub scaling: f64,
    /// `rank_dropout`.
    pub rank_dropout: f64,
    /// `module_dropout`.
    pub module_dropout: f64,
    /// `rank_dropout_scale`.
    pub rank_dropout_scale: bool,
}

impl LokrLinear {
    /// A layer from explicit factors in PyTorch's layout.
    pub fn new(w1: Factor, w2: Factor, settings: LokrSettings) -> Self {
        let split = |f: Factor| match f {
            Factor::Whole(w) => (Some(Param::from_tensor(w)), None, None),
            Factor::Product(a, b) => (
                None,
                Some(Param::from_tensor(a)),
                Some(Param::from_tensor(b)),
            ),
        };
        let (lokr_w1, lokr_w1_a, lokr_w1_b) = split(w1);
        let (lokr_w2, lokr_w2_a, lokr_w2_b) = split(w2);
        Self {
            lokr_w1,
            lokr_w1_a,
            lokr_w1_b,
            lokr_w2,
            lokr_w2_a,
            lokr_w2_b,
            rank_dropout: DropoutConfig::new(settings.rank_dropout).init(),
            module_dropout: DropoutConfig::new(settings.module_dropout).init(),
            scaling: settings.scaling,
            rank_dropout_scale: settings.rank_dropout_scale,
        }
    }

    /// PEFT's initialisation of the factors `shape` names: Kaiming-uniform (`a = √5`, bound
    /// `1/√fan_in` with `fan_in` the factor's second dimension) except the one `init` zeroes —
    /// `w1` (or `lokr_w1_a`) for PEFT's default, `w2` (or `lokr_w2_b`) for `"lycoris"`, none
    /// for `false`.
    pub fn init(
        shape: &LokrShape,
        settings: LokrSettings,
        init: LokrInit,
        device: &burn::tensor::Device,
    ) -> Self {
        let uniform = |shape: [usize; 2]| {
            let bound = 1.0 / (shape[1] as f64).sqrt();
            Tensor::<2>::random(shape, Distribution::Uniform(-bound, bound), device)
        };
        let zeros = |shape: [usize; 2]| Tensor::<2>::zeros(shape, device);
        let (w1_zero, w2_zero) = match init {
            LokrInit::Peft => (true, false),
            LokrInit::Lycoris => (false, true),
            LokrInit::Random => (false, false),
        };
        let (a, b, c, d, r) = (shape.a, shape.b, shape.c, shape.d, shape.r);
        // PEFT zeroes the whole factor, or the left half of a decomposed `w1` / the right half
        // of a decomposed `w2`.
        let pick = |zero: bool, s: [usize; 2]| if zero { zeros(s) } else { uniform(s) };
        let w1 = if shape.whole_w1 {
            Factor::Whole(pick(w1_zero, [a, c]))
        } else {
            Factor::Product(pick(w1_zero, [a, r]), uniform([r, c]))
        };
        let w2 = if shape.whole_w2 {
            Factor::Whole(pick(w2_zero, [b, d]))
        } else {
            Factor::Product(uniform([b, r]), pick(w2_zero, [r, d]))
        };
        Self::new(w1, w2, settings)
    }

    /// `w1: [a, c]`, whole or formed from its two factors.
    fn w1(&self) -> Tensor<2> {
        whole(&self.lokr_w1, &self.lokr_w1_a, &self.lokr_w1_b)
    }

    /// `w2: [b, d]`, whole or formed from its two factors.
    fn w2(&self) -> Tensor<2> {
        whole(&self.lokr_w2, &self.lokr_w2_a, &self.lokr_w2_b)
    }

    /// The layer's output width `a·b`.
    pub fn d_out(&self) -> usize {
        let rows = |w: &Option<Param<Tensor<2>>>, a: &Option<Param<Tensor<2>>>| {
            w.as_ref().or(a.as_ref()).map_or(0, |p| p.dims()[0])
        };
        rows(&self.lokr_w1, &self.lokr_w1_a) * rows(&self.lokr_w2, &self.lokr_w2_a)
    }

    /// `ΔWᵀ = s · (w1 ⊗ w2)ᵀ = s · w1ᵀ ⊗ w2ᵀ`, `[in, out]` (burn's weight layout): entry
    /// `[(j, l), (i, k)]` is `s · w1[i, j] · w2[k, l]`.
    pub fn delta_weight(&self) -> Tensor<2> {
        let (w1, w2) = (self.w1() * self.scaling, self.w2());
        let [a, c] = w1.dims();
        let [b, d] = w2.dims();
        let left = w1.transpose().reshape([c, 1, a, 1]);
        let right = w2.transpose().reshape([1, d, 1, b]);
        (left * right).reshape([c * d, a * b])
    }

    /// `x · ΔWᵀ`, `[batch, seq, in] → [batch, seq, out]`, without forming `ΔW`: per token,
    /// `X: [c, d]` gives `s · w1 · X · w2ᵀ: [a, b]` (row-major, the output's `(i, k)` order).
    fn apply(&self, x: Tensor<3>) -> Tensor<3> {
        let (w1, w2) = (self.w1() * self.scaling, self.w2());
        let [a, c] = w1.dims();
        let [b, d] = w2.dims();
        let [batch, seq, _] = x.dims();
        let n = batch * seq;
        // [n·c, d] · [d, b] → [n, c, b] → [n, b, c]
        let t = matmul(x.reshape([n * c, d]), w2.transpose())
            .reshape([n, c, b])
            .swap_dims(1, 2);
        // [n·b, c] · [c, a] → [n, b, a] → [n, a, b]
        matmul(t.reshape([n * b, c]), w1.transpose())
            .reshape([n, b, a])
            .swap_dims(1, 2)
            .reshape([batch, seq, a * b])
    }

    /// `x · ΔWᵀ` with rank and module dropout applied as PEFT applies them in training: the
    /// adapter skipped with probability `module_dropout`; each output row of `ΔW` dropped with
    /// probability `rank_dropout` (the kept ones divided by the share kept with
    /// `rank_dropout_scale`). `None` when the module is dropped.
    fn update(&self, x: Tensor<3>) -> Option<Tensor<3>> {
        if peft_core::dropout::skips_module(&self.module_dropout, &x) {
            return None;
        }
        let keep = peft_core::dropout::rank_keep_factors(
            &self.rank_dropout,
            &x,
            self.d_out(),
            self.rank_dropout_scale,
        );
        let update = self.apply(x);
        Some(match keep {
            Some(keep) => update * keep.unsqueeze::<3>(),
            None => update,
        })
    }
}

/// A factor held whole, or the product of its two halves.
fn whole(
    w: &Option<Param<Tensor<2>>>,
    a: &Option<Param<Tensor<2>>>,
    b: &Option<Param<Tensor<2>>>,
) -> Tensor<2> {
    match (w, a, b) {
        (Some(w), _, _) => w.val(),
        (None, Some(a), Some(b)) => matmul(a.val(), b.val()),
        // `new` sets one or the other.
        _ => unreachable!("a LoKr factor is whole or a pair"),
    }
}

impl LayerAdapter for LokrLinear {
    fn forward_linear(&self, base: &BaseLinear, x: Tensor<3>) -> Tensor<3> {
        let result = base.forward(x.clone());
        match self.update(x) {
            Some(update) => result + update,
            None => result,
        }
    }

    fn delta_linear(
        &self,
        _base: &BaseLinear,
        x: Tensor<3>,
        _result: &Tensor<3>,
    ) -> Option<Tensor<3>> {
        // A dropped module adds nothing.
        let [batch, seq, _] = x.dims();
        let device = x.device();
        let d_out = self.d_out();
        Some(
            self.update(x)
                .unwrap_or_else(|| Tensor::zeros([batch, seq, d_out], &device)),
        )
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
