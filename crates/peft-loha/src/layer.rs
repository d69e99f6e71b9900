//! The LoHa layer: `y = base(x) + x · ΔWᵀ` with `ΔW = s · (w1a·w1b) ⊙ (w2a·w2b)`, computed beside
//! the frozen base (PEFT's `LoHaLayer` over `nn.Linear`, the LyCORIS `HadaWeight`).
//!
//! The four factors are held in PyTorch's layout, as PEFT stores them: `hada_w1_a: [out, r]`,
//! `hada_w1_b: [r, in]` (and the same for `w2`). Unlike LoRA's update, `ΔW` is not of rank `r`
//! (the Hadamard product of two rank-`r` matrices has rank up to `r²`). PEFT forms the full
//! `[out, in]` matrix in every forward pass; here the pass uses the update's rank-`r²` product
//! form instead wherever that costs fewer multiply-adds (small ranks: `r²·(in + out) < in·out`),
//! and forms `ΔW` only otherwise and to merge.

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::tensor::{Distribution, Tensor};
use peft_ops::matmul::{linear, matmul};

use peft_core::{BaseLinear, LayerAdapter, Result};

/// LoHa's four factors for one linear layer `[in → out]`.
#[derive(Module, Debug)]
pub struct LohaLinear {
    /// First product's left factor `[out, r]`.
    pub hada_w1_a: Param<Tensor<2>>,
    /// First product's right factor `[r, in]`.
    pub hada_w1_b: Param<Tensor<2>>,
    /// Second product's left factor `[out, r]`.
    pub hada_w2_a: Param<Tensor<2>>,
    /// Second product's right factor `[r, in]` (zero in a fresh adapter).
    pub hada_w2_b: Param<Tensor<2>>,
    /// `rank_dropout`: drops output rows of `ΔW` in training (the probability, and burn's
    /// training flag, live in this module).
    pub rank_dropout: Dropout,
    /// `module_dropout`: skips the adapter in a training pass.
    pub module_dropout: Dropout,
    /// `alpha / r`.
    #[module(skip)]
    pub scaling: f64,
}

impl LohaLinear {
    /// A layer from explicit factors in PyTorch's layout.
    pub fn new(
        factors: [Tensor<2>; 4],
        scaling: f64,
        rank_dropout: f64,
        module_dropout: f64,
    ) -> Self {
        let [w1a, w1b, w2a, w2b] = factors;
        Self {
            hada_w1_a: Param::from_tensor(w1a),
            hada_w1_b: Param::from_tensor(w1b),
            hada_w2_a: Param::from_tensor(w2a),
            hada_w2_b: Param::from_tensor(w2b),
            rank_dropout: DropoutConfig::new(rank_dropout).init(),
            module_dropout: DropoutConfig::new(module_dropout).init(),
            scaling,
        }
    }

    /// PEFT's initialisation for `[in → out]` at rank `r`: every factor Kaiming-uniform
    /// (`a = √5`, bound `1/√fan_in` with `fan_in` the factor's second dimension) except
    /// `hada_w2_b`, zero with `init_weights` (the adapter starts as a no-op) and Kaiming-uniform
    /// without.
    pub fn init(
        d_in: usize,
        d_out: usize,
        r: usize,
        scaling: f64,
        dropouts: (f64, f64),
        init_weights: bool,
        device: &burn::tensor::Device,
    ) -> Self {
        let uniform = |shape: [usize; 2]| {
            let bound = 1.0 / (shape[1] as f64).sqrt();
            Tensor::<2>::random(shape, Distribution::Uniform(-bound, bound), device)
        };
        let w2b = if init_weights {
            Tensor::<2>::zeros([r, d_in], device)
        } else {
            uniform([r, d_in])
        };
        let factors = [
            uniform([d_out, r]),
            uniform([r, d_in]),
            uniform([d_out, r]),
            w2b,
        ];
        Self::new(factors, scaling, dropouts.0, dropouts.1)
    }

    /// `ΔWᵀ = s · ((w1a·w1b) ⊙ (w2a·w2b))ᵀ`, `[in, out]` (burn's weight layout), formed as
    /// `(w1bᵀ·w1aᵀ) ⊙ (w2bᵀ·w2aᵀ)`: only the rank-`r` factors are transposed, never the
    /// `[out, in]` product, and both products (and the layer's `x·ΔWᵀ`) go through
    /// [`peft_ops::matmul`] (OpenBLAS on the CPU backend).
    pub fn delta_weight(&self) -> Tensor<2> {
        let product = |a: &Param<Tensor<2>>, b: &Param<Tensor<2>>| {
            matmul(b.val().transpose(), a.val().transpose())
        };
        let first = product(&self.hada_w1_a, &self.hada_w1_b);
        let second = product(&self.hada_w2_a, &self.hada_w2_b);
        first * second * self.scaling
    }

    /// `x · ΔWᵀ` — through the rank-`r1·r2` product form ([`Self::product_factors`]) where
    /// that is cheaper than forming `ΔW`, as it is whenever `r² · (in + out) < in · out` — with
    /// rank and module dropout applied as PEFT applies them in training: the adapter skipped
    /// with probability `module_dropout`; each output row of `ΔW` dropped with probability
    /// `rank_dropout`, the kept ones divided by the share kept. `None` when the module is
    /// dropped.
    fn update(&self, x: Tensor<3>) -> Option<Tensor<3>> {
        if peft_core::dropout::skips_module(&self.module_dropout, &x) {
            return None;
        }
        let [d_out, r1] = self.hada_w1_a.dims();
        let [_, d_in] = self.hada_w1_b.dims();
        let r2 = self.hada_w2_a.dims()[1];
        // LoHa always rescales the kept rows (PEFT's LoHa has no `rank_dropout_scale`).
        let keep = peft_core::dropout::rank_keep_factors(&self.rank_dropout, &x, d_out, true);
        // Per token, the rank-(r1·r2) form costs r1·r2·(in + out) multiply-adds and forming
        // `ΔW` in·out (plus forming it): take the cheaper.
        let update = if r1 * r2 * (d_in + d_out) < d_in * d_out {
            let (u_t, v) = self.product_factors();
            linear(linear(x, v, None), u_t, None) * self.scaling
        } else {
            linear(x, self.delta_weight(), None)
        };
        Some(match keep {
            Some(keep) => update * keep.unsqueeze::<3>(),
            None => update,
        })
    }

    /// `ΔW / s` as a product of rank `r1·r2`, `U · Vᵀ`, returned as `(Uᵀ: [r1·r2, out],
    /// V: [in, r1·r2])`: `(w1a·w1b) ⊙ (w2a·w2b)` has entry `[o, i]` =
    /// `Σ_{p,q} (w1a[o,p]·w2a[o,q]) · (w1b[p,i]·w2b[q,i])`, so column `(p, q)` of `U` is
    /// `w1a[:, p] ⊙ w2a[:, q]` and of `V` is `w1b[p, :] ⊙ w2b[q, :]`.
    fn product_factors(&self) -> (Tensor<2>, Tensor<2>) {
        let [d_out, r1] = self.hada_w1_a.dims();
        let [_, d_in] = self.hada_w1_b.dims();
        let r2 = self.hada_w2_a.dims()[1];
        let (w1a, w2a) = (
            self.hada_w1_a.val().transpose(),
            self.hada_w2_a.val().transpose(),
        );
        // [r1, 1, out] ⊙ [1, r2, out] → [r1·r2, out]
        let u_t =
            (w1a.reshape([r1, 1, d_out]) * w2a.reshape([1, r2, d_out])).reshape([r1 * r2, d_out]);
        // [r1, 1, in] ⊙ [1, r2, in] → [r1·r2, in] → [in, r1·r2]
        let v_t = (self.hada_w1_b.val().reshape([r1, 1, d_in])
            * self.hada_w2_b.val().reshape([1, r2, d_in]))
        .reshape([r1 * r2, d_in]);
        (u_t, v_t.transpose())
    }
}

impl LayerAdapter for LohaLinear {
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
        let d_out = self.hada_w1_a.dims()[0];
        let [batch, seq, _] = x.dims();
        let device = x.device();
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
