//! The LoRA layer: `y = base(x) + s · B(A(dropout(x)))`, computed beside the frozen base; with
//! DoRA (PEFT's `use_dora`) the magnitude of [`crate::dora`] rescales each output feature.
//!
//! The same pair serves an embedding table `[num, dim]`: `lora_a: [num, r]` is looked up by id
//! (PEFT's `lora_embedding_A` transposed) and multiplied by `lora_b: [r, dim]` — so merging is the
//! same `W += s · lora_a @ lora_b` for both kinds of layer.

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Embedding, Linear};
use burn::tensor::module::{embedding, linear};
use burn::tensor::{Distribution, Int, Tensor};

use peft_core::{BaseLinear, LayerAdapter, Result};

use crate::dora::DoraMagnitude;

/// LoRA's low-rank pair for one linear layer.
///
/// burn layout: `lora_a: [in, r]`, `lora_b: [r, out]` — the transposes of PEFT's
/// `lora_A.weight: [r, in]` and `lora_B.weight: [out, r]`.
#[derive(Module, Debug)]
pub struct LoraLinear {
    /// Down projection `[in, r]`.
    pub lora_a: Param<Tensor<2>>,
    /// Up projection `[r, out]`.
    pub lora_b: Param<Tensor<2>>,
    /// Dropout on the adapter's input (training only).
    pub dropout: Dropout,
    /// DoRA's magnitude (PEFT's `use_dora`); `None` for plain LoRA.
    pub dora: Option<DoraMagnitude>,
    /// PiSSA's or OLoRA's initial pair `(A₀: [in, r], B₀: [r, out])`, kept for saving the
    /// adapter as plain LoRA over the original base ([`crate::save_pretrained_converted`]).
    #[module(skip)]
    pub initial: Option<(Tensor<2>, Tensor<2>)>,
    /// `α/r` (or `α/√r` with rsLoRA).
    #[module(skip)]
    pub scaling: f64,
}

impl LoraLinear {
    /// A pair from explicit burn-layout tensors.
    pub fn new(lora_a: Tensor<2>, lora_b: Tensor<2>, scaling: f64, dropout: f64) -> Self {
        Self {
            lora_a: Param::from_tensor(lora_a),
            lora_b: Param::from_tensor(lora_b),
            dropout: DropoutConfig::new(dropout).init(),
            dora: None,
            initial: None,
            scaling,
        }
    }

    /// The same pair with DoRA's magnitude (PEFT's `use_dora`).
    pub fn with_dora(mut self, dora: DoraMagnitude) -> Self {
        self.dora = Some(dora);
        self
    }

    /// DoRA's initial magnitude for this pair over `base` (`‖W + s·A·B‖` per output column).
    pub fn init_dora(&self, base: &BaseLinear) -> DoraMagnitude {
        DoraMagnitude::init(base, &self.lora_a.val(), &self.lora_b.val(), self.scaling)
    }

    /// The same pair without dropout (inference).
    pub fn no_dropout(mut self) -> Self {
        self.dropout = DropoutConfig::new(0.0).init();
        self
    }

    /// Rank.
    pub fn rank(&self) -> usize {
        self.lora_a.shape().dims::<2>()[1]
    }

    /// `s · A @ B`, `[in, out]`: the update merging adds to the base weight.
    pub fn delta_weight(&self) -> Tensor<2> {
        self.lora_a.val().matmul(self.lora_b.val()) * self.scaling
    }
}

/// How [`LoraLinear::init`] draws A and B.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraInit {
    /// A Kaiming-uniform as `nn.Linear` (bound `1/√in`), B zero.
    Default,
    /// A ~ N(0, 1/r), B zero.
    Gaussian,
    /// A and B both Kaiming-uniform: the adapter changes outputs from the start.
    Random,
}

impl LoraLinear {
    /// A freshly initialised pair for a `[in → out]` layer.
    pub fn init(
        d_in: usize,
        d_out: usize,
        r: usize,
        scaling: f64,
        dropout: f64,
        init: LoraInit,
        device: &burn::tensor::Device,
    ) -> Self {
        // nn.Linear(in, r)'s kaiming_uniform_(a=√5) has bound √(6 / ((1 + 5)·fan_in)) = 1/√fan_in.
        let uniform = |fan_in: usize, shape: [usize; 2]| {
            let bound = 1.0 / (fan_in as f64).sqrt();
            Tensor::<2>::random(shape, Distribution::Uniform(-bound, bound), device)
        };
        let a = match init {
            LoraInit::Gaussian => {
                Tensor::<2>::random([d_in, r], Distribution::Normal(0.0, 1.0 / r as f64), device)
            }
            LoraInit::Default | LoraInit::Random => uniform(d_in, [d_in, r]),
        };
        let b = match init {
            LoraInit::Random => uniform(r, [r, d_out]),
            LoraInit::Default | LoraInit::Gaussian => Tensor::<2>::zeros([r, d_out], device),
        };
        Self::new(a, b, scaling, dropout)
    }
}

impl LayerAdapter for LoraLinear {
    fn forward_linear(&self, base: &BaseLinear, x: Tensor<3>) -> Tensor<3> {
        if let Some(magnitude) = &self.dora {
            if peft_core::dropout::is_active(&self.dropout, &x) {
                let result = base.forward(x.clone());
                let term = self.dora_term(base, x, &result);
                return result + term;
            }
            // Without dropout PEFT's `result + (m/n − 1)·(result − bias) + (m/n)·s·B(A(x))` is
            // `(m/n)·(x·W + s·B(A(x))) + bias`: the LoRA output without the bias, scaled once
            // (two passes over the output instead of five, in both directions).
            let (no_bias, bias) = crate::dora::without_bias(base);
            let pair = (&self.lora_a.val(), &self.lora_b.val(), self.scaling);
            let scale = magnitude.scale(base, pair.0, pair.1, pair.2);
            let y = self.lora_forward(&no_bias, x) * scale.unsqueeze_dim::<2>(0).unsqueeze_dim(0);
            return match bias {
                Some(b) => y + b.unsqueeze_dim::<2>(0).unsqueeze_dim(0),
                None => y,
            };
        }
        self.lora_forward(base, x)
    }

    fn forward_embedding(&self, base: &Embedding, ids: Tensor<2, Int>) -> Tensor<3> {
        let out = base.forward(ids.clone()) + self.embedding_update(ids);
        match self.embedding_dora_scale(base) {
            // PEFT: `(m/n)·result + (m/n)·s·B(A[ids])`, `m` and `n` per embedding dimension.
            Some(scale) => out * scale.unsqueeze_dim::<2>(0).unsqueeze_dim(0),
            None => out,
        }
    }

    fn delta_linear(
        &self,
        base: &BaseLinear,
        x: Tensor<3>,
        result: &Tensor<3>,
    ) -> Option<Tensor<3>> {
        Some(match self.dora {
            Some(_) => self.dora_term(base, x, result),
            None => self.update(x),
        })
    }

    fn delta_embedding(
        &self,
        base: &Embedding,
        ids: Tensor<2, Int>,
        result: &Tensor<3>,
    ) -> Option<Tensor<3>> {
        let update = self.embedding_update(ids);
        Some(match self.embedding_dora_scale(base) {
            Some(scale) => {
                let scale = scale.unsqueeze_dim::<2>(0).unsqueeze_dim(0);
                result.clone() * (scale.clone() - 1.0) + update * scale
            }
            None => update,
        })
    }

    fn is_additive(&self) -> bool {
        true
    }

    fn merge_linear(&mut self, mut base: Linear) -> Result<Linear> {
        let delta = self.delta_weight();
        if let Some(dora) = &mut self.dora {
            return dora.merge(base, delta);
        }
        base.weight = self.merged_weight(base.weight)?;
        Ok(base)
    }

    fn unmerge_linear(&mut self, mut base: Linear) -> Result<Linear> {
        let delta = self.delta_weight();
        if let Some(dora) = &mut self.dora {
            return dora.unmerge(base, delta);
        }
        base.weight = self.unmerged_weight(base.weight);
        Ok(base)
    }

    fn merge_embedding(&mut self, mut base: Embedding) -> Result<Embedding> {
        let delta = self.delta_weight();
        if let Some(dora) = &mut self.dora {
            base.weight = dora.merge(table_as_linear(&base), delta)?.weight;
            return Ok(base);
        }
        base.weight = self.merged_weight(base.weight)?;
        Ok(base)
    }

    fn unmerge_embedding(&mut self, mut base: Embedding) -> Result<Embedding> {
        let delta = self.delta_weight();
        if let Some(dora) = &mut self.dora {
            base.weight = dora.unmerge(table_as_linear(&base), delta)?.weight;
            return Ok(base);
        }
        base.weight = self.unmerged_weight(base.weight);
        Ok(base)
    }
}

impl LoraLinear {
    /// `s · B(A(dropout(x)))`, `[batch, seq, in]` → `[batch, seq, out]`.
    fn update(&self, x: Tensor<3>) -> Tensor<3> {
        self.low_rank(peft_core::dropout::forward(&self.dropout, x))
    }

    /// `base(x) + s·B(A(dropout(x)))`; for a dense f32 base without dropout the base product
    /// and the update are one operation on the CPU backend (the update accumulated into the base
    /// output by BLAS).
    fn lora_forward(&self, base: &BaseLinear, x: Tensor<3>) -> Tensor<3> {
        if let BaseLinear::Dense(l) = base
            && self.dropout.prob == 0.0
            && let Some(y) = peft_ops::matmul::lora_linear(
                x.clone(),
                l.weight.val(),
                l.bias.as_ref().map(|b| b.val()),
                (self.lora_a.val(), self.lora_b.val()),
                self.scaling as f32,
            )
        {
            return y;
        }
        let update = self.update(x.clone());
        base.forward(x) + update
    }

    /// DoRA's term for `x` given the layer's output so far (see [`crate::dora::term`]).
    fn dora_term(&self, base: &BaseLinear, x: Tensor<3>, result: &Tensor<3>) -> Tensor<3> {
        let Some(magnitude) = &self.dora else {
            return self.update(x);
        };
        let dropout_active = peft_core::dropout::is_active(&self.dropout, &x);
        let dora_x = peft_core::dropout::forward(&self.dropout, x);
        let lora = self.low_rank(dora_x.clone());
        let pair = (&self.lora_a.val(), &self.lora_b.val(), self.scaling);
        crate::dora::term(magnitude, base, pair, result, dora_x, lora, dropout_active)
    }

    /// DoRA's `m / ‖T + s·A·B‖` over each embedding dimension of the table `T: [num, dim]`
    /// (PEFT's `DoraEmbeddingLayer`), `[dim]`; `None` without DoRA.
    fn embedding_dora_scale(&self, base: &Embedding) -> Option<Tensor<1>> {
        let dora = self.dora.as_ref()?;
        let table = BaseLinear::Dense(table_as_linear(base));
        Some(dora.scale(&table, &self.lora_a.val(), &self.lora_b.val(), self.scaling))
    }

    /// `s · B(A(x))` without dropout.
    fn low_rank(&self, x: Tensor<3>) -> Tensor<3> {
        // PEFT scales `B(A(x))`; scaling the rank-r intermediate instead is the same product
        // and costs r columns instead of `out_features` (in both passes).
        let low_rank = linear(x, self.lora_a.val(), None);
        linear(low_rank * self.scaling, self.lora_b.val(), None)
    }

    /// `s · B(A[ids])` for an embedding, `[batch, seq]` → `[batch, seq, dim]` (PEFT applies no
    /// dropout to the ids of an embedding).
    fn embedding_update(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let rows = embedding(self.lora_a.val(), ids);
        linear(rows, self.lora_b.val(), None) * self.scaling
    }

    /// `W + s · A@B`, refusing non-finite results (PEFT's `safe_merge`, always on).
    fn merged_weight(&self, weight: Param<Tensor<2>>) -> Result<Param<Tensor<2>>> {
        let merged = weight.val() + self.delta_weight();
        peft_core::adapter::check_merge_finite(&merged)?;
        Ok(weight.map(|_| merged))
    }

    /// `W - s · A@B`.
    fn unmerged_weight(&self, weight: Param<Tensor<2>>) -> Param<Tensor<2>> {
        let delta = self.delta_weight();
        weight.map(|w| w - delta)
    }
}

/// An embedding table `[num, dim]` as a bias-free linear layer `[num → dim]`: DoRA's column norm
/// and merge are the same for both (the norm runs over the `num` rows of each dimension).
pub(crate) fn table_as_linear(embedding: &Embedding) -> Linear {
    Linear {
        weight: embedding.weight.clone(),
        bias: None,
    }
}
