//! The attachment points adapters plug into.
//!
//! PEFT's methods touch a model in one of three places, and peft-rs has one abstraction for each:
//!
//! * **(a) a layer** — LoRA, IA3 and QLoRA change what a linear layer (or an embedding) computes.
//!   A method implements [`LayerAdapter`]; models hold every linear as an
//!   [`AdaptableLinear<A>`](AdaptableLinear), generic over the adapter type, and
//!   [`CausalLm::map_layers`](crate::model::CausalLm::map_layers) swaps one adapter type for
//!   another, module by module, by Hugging Face path.
//! * **(b) the input embeddings** — prompt tuning and P-tuning prepend virtual-token embeddings:
//!   they produce a `[batch, n_virtual, hidden]` tensor that the model takes through
//!   [`ModelInput::virtual_tokens`](crate::model::ModelInput::virtual_tokens).
//! * **(c) every attention layer's key/value prefix** — prefix tuning produces per-layer keys and
//!   values that enter the model as a pre-filled [`KvCache`](crate::model::KvCache), exactly as
//!   `past_key_values` do in transformers.
//!
//! BitFit adds no module: it only chooses which base parameters train.
//!
//! The base layer's frozen weight is never rewritten by the forward pass: an adapter computes
//! `base(x)` and its own term beside it (PEFT's unmerged path), so a quantised or shared base
//! stays as it is until the user merges.

use std::sync::Arc;

use burn::module::{Module, ModuleDisplay};
use burn::nn::{Embedding, Linear};
use burn::tensor::{DType, Int, Tensor};

// The frozen base layers and their products (dense, packed 4-bit, bf16; CPU kernels or a
// device's) live in peft-ops; they are re-exported here, where adapters meet them.
pub use peft_ops::linear::{BaseLinear, PackedLinear, linear_in, with_weight_dtype};
use peft_ops::packed::PackedWeight;
use peft_ops::precision::ComputeDtype;

use crate::error::Result;
use crate::tokens::TokenRows;

/// A method that changes what one linear layer computes (LoRA, IA3, ...).
///
/// Implementors are burn modules holding only the adapter's own parameters; the frozen base layer
/// is passed in. Shapes: `x: [batch, seq, in]` → `[batch, seq, out]`. burn's [`Linear`] stores its
/// weight as `[in, out]` (the transpose of PyTorch's `[out, in]`).
pub trait LayerAdapter: Module + ModuleDisplay {
    /// The layer's output with this adapter applied.
    fn forward_linear(&self, base: &BaseLinear, x: Tensor<3>) -> Tensor<3>;

    /// The embedding's output with this adapter applied (`ids: [batch, seq]`). The default leaves
    /// the embedding unchanged, for methods that only adapt linear layers.
    fn forward_embedding(&self, base: &Embedding, ids: Tensor<2, Int>) -> Tensor<3> {
        base.forward(ids)
    }

    /// The adapter's term alone, `x: [batch, seq, in]` → `[batch, seq, out]`, to be added to
    /// `result`: the layer's output so far for these rows (the base output, plus the terms of
    /// the adapters active before this one — what PEFT's loop hands each adapter). LoRA's term
    /// is `s·B(A(x))`; DoRA's also rescales `result`'s base part. `None` for methods whose
    /// effect is not such a term (IA3 scales the base output). Several adapters active at once,
    /// and batches whose rows use different adapters
    /// ([`AdapterSet`](crate::adapter_set::AdapterSet)), need it.
    fn delta_linear(
        &self,
        _base: &BaseLinear,
        _x: Tensor<3>,
        _result: &Tensor<3>,
    ) -> Option<Tensor<3>> {
        None
    }

    /// The term of an adapted embedding for `ids: [batch, seq]` given the output so far, as
    /// [`delta_linear`](Self::delta_linear).
    fn delta_embedding(
        &self,
        _base: &Embedding,
        _ids: Tensor<2, Int>,
        _result: &Tensor<3>,
    ) -> Option<Tensor<3>> {
        None
    }

    /// Whether [`delta_linear`](Self::delta_linear) and
    /// [`delta_embedding`](Self::delta_embedding) give this adapter's whole effect (its output
    /// is `result + term`).
    fn is_additive(&self) -> bool {
        false
    }

    /// Folds the adapter into the base weights (`merge_adapter`). The adapter may keep what its
    /// unmerge needs (DoRA's weight norm, as PEFT caches it).
    fn merge_linear(&mut self, base: Linear) -> Result<Linear>;

    /// Removes a previously merged adapter from the base weights (`unmerge_adapter`).
    fn unmerge_linear(&mut self, base: Linear) -> Result<Linear>;

    /// Folds the adapter into an embedding table. The default leaves it unchanged.
    fn merge_embedding(&mut self, base: Embedding) -> Result<Embedding> {
        Ok(base)
    }

    /// Removes a previously merged adapter from an embedding table.
    fn unmerge_embedding(&mut self, base: Embedding) -> Result<Embedding> {
        Ok(base)
    }
}

/// PEFT's `safe_merge` check, always on: a merged weight with a non-finite value is refused
/// (the adapter is broken), and the base is left as it was.
pub fn check_merge_finite(weight: &Tensor<2>) -> Result<()> {
    let finite: bool = weight.clone().is_finite().all().into_scalar();
    if finite {
        Ok(())
    } else {
        Err(crate::error::PeftError::AdapterMismatch(
            "merging would produce non-finite weights (safe_merge check)".into(),
        ))
    }
}

/// `W ± ΔW` for a method that merges a full update (`sign` = 1 to merge, -1 to unmerge):
/// `delta_t` is `ΔWᵀ`, `[in, out]` in burn's weight layout, added in f32 and cast back to the
/// base's dtype; non-finite results are refused (PEFT's `safe_merge`).
pub fn shift_linear(mut base: Linear, delta_t: Tensor<2>, sign: f64) -> Result<Linear> {
    let weight = base.weight.val();
    let dtype = weight.dtype();
    let shifted = weight.cast(DType::F32) + delta_t * sign;
    check_merge_finite(&shifted)?;
    base.weight = base.weight.map(|_| shifted.cast(dtype));
    Ok(base)
}

/// The adapter of a plain model: no parameters, no change.
#[derive(Module, Debug)]
pub struct NoAdapter {}

impl LayerAdapter for NoAdapter {
    fn forward_linear(&self, base: &BaseLinear, x: Tensor<3>) -> Tensor<3> {
        base.forward(x)
    }
    fn merge_linear(&mut self, base: Linear) -> Result<Linear> {
        Ok(base)
    }
    fn unmerge_linear(&mut self, base: Linear) -> Result<Linear> {
        Ok(base)
    }
}

/// A frozen linear layer with an optional adapter beside it.
#[derive(Module, Debug)]
pub struct AdaptableLinear<A: LayerAdapter> {
    /// The frozen base layer; dense `weight: [in, out]` or packed 4-bit, `bias: [out]`.
    pub base: BaseLinear,
    /// The adapter, if this layer is targeted.
    pub adapter: Option<A>,
    /// Trained output rows (an untied `lm_head` in PEFT's `trainable_token_indices` dict form):
    /// the logits of those tokens computed from their own rows.
    pub token_adapter: Option<TokenRows>,
    /// Whether `adapter` (and `token_adapter`) is currently folded into `base` (then the forward
    /// pass skips it).
    #[module(skip)]
    pub merged: bool,
}

impl<A: LayerAdapter> AdaptableLinear<A> {
    /// A layer without adapter.
    pub fn plain(base: Linear) -> Self {
        Self::over(BaseLinear::Dense(base))
    }

    /// A layer without adapter over any base (dense or packed).
    pub fn over(base: BaseLinear) -> Self {
        Self {
            base,
            adapter: None,
            token_adapter: None,
            merged: false,
        }
    }

    /// `[batch, seq, in]` → `[batch, seq, out]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let out = match (&self.adapter, self.merged) {
            (Some(adapter), false) => adapter.forward_linear(&self.base, x.clone()),
            _ => self.base.forward(x.clone()),
        };
        match (&self.token_adapter, self.merged) {
            (Some(tokens), false) => tokens.project(out, x),
            _ => out,
        }
    }

    /// Whether an adapter (or trained rows) changes this layer's output now.
    fn is_adapted(&self) -> bool {
        (self.adapter.is_some() || self.token_adapter.is_some()) && !self.merged
    }

    /// `(in_features, out_features)`.
    pub fn dims(&self) -> (usize, usize) {
        self.base.dims()
    }

    /// The weight `[in, out]` when this layer is a frozen, bias-free dense f32 product with no
    /// active adapter — what a caller may multiply by itself (the chunked output loss).
    pub fn frozen_dense_weight(&self) -> Option<Tensor<2>> {
        let active = self.is_adapted();
        match &self.base {
            BaseLinear::Dense(l) if !active && l.bias.is_none() => {
                let w = l.weight.val();
                (w.dtype() == DType::F32 && !w.is_require_grad()).then_some(w)
            }
            _ => None,
        }
    }

    /// The packed weight `[out, in]` when this layer is a frozen, bias-free bf16 product on the
    /// CPU backend with no active adapter — what a caller may multiply by itself in bf16 (the
    /// chunked output loss).
    pub fn frozen_bf16_weight(&self) -> Option<Arc<dyn PackedWeight>> {
        let active = self.is_adapted();
        match &self.base {
            BaseLinear::Packed(p)
                if !active
                    && p.bias.is_none()
                    && p.compute == ComputeDtype::Bf16
                    && p.on_device.is_none() =>
            {
                Some(p.weight.clone())
            }
            _ => None,
        }
    }

    /// Folds the adapter into the base weights; a no-op without adapter or when already merged.
    /// A packed or bf16 base is widened first: the merged layer is dense f32 (no re-quantisation
    /// or re-rounding), and computes in f32 from then on.
    pub fn merge(mut self) -> Result<Self> {
        if !self.is_adapted() {
            return Ok(self);
        }
        let mut dense = self.base.into_dense();
        if let Some(adapter) = &mut self.adapter {
            dense = adapter.merge_linear(dense)?;
        }
        if let Some(tokens) = &self.token_adapter {
            dense = replace_output_rows(tokens, dense, tokens.values())?;
        }
        self.base = BaseLinear::Dense(dense);
        self.merged = true;
        Ok(self)
    }

    /// Undoes [`merge`](Self::merge) (the base stays dense).
    pub fn unmerge(mut self) -> Result<Self> {
        if !self.merged {
            return Ok(self);
        }
        let mut dense = self.base.into_dense();
        if let Some(tokens) = &self.token_adapter {
            dense = replace_output_rows(tokens, dense, tokens.original.clone())?;
        }
        if let Some(adapter) = &mut self.adapter {
            dense = adapter.unmerge_linear(dense)?;
        }
        self.base = BaseLinear::Dense(dense);
        self.merged = false;
        Ok(self)
    }

    /// Replaces the adapter, keeping the base and the trained rows (used by
    /// [`CausalLm::map_layers`](crate::model::CausalLm::map_layers)).
    pub fn with_adapter<B: LayerAdapter>(self, adapter: Option<B>) -> AdaptableLinear<B> {
        AdaptableLinear {
            base: self.base,
            adapter,
            token_adapter: self.token_adapter,
            merged: false,
        }
    }

    /// The layer without trained rows (after they were merged, or to drop them).
    pub fn without_tokens(mut self) -> Self {
        self.token_adapter = None;
        self
    }
}

/// `layer` (burn's `weight: [in, out]`) with output rows — PyTorch's `weight[id]`, burn's
/// columns — replaced by `rows: [n, in]`.
fn replace_output_rows(tokens: &TokenRows, layer: Linear, rows: Tensor<2>) -> Result<Linear> {
    let require_grad = layer.weight.is_require_grad();
    let weight = tokens.replace_rows(layer.weight.val().transpose(), rows)?;
    Ok(Linear {
        weight: burn::module::Param::from_tensor(weight.transpose()).set_require_grad(require_grad),
        bias: layer.bias,
    })
}

/// An embedding table with an optional adapter beside it (LoRA's `lora_embedding_A/B`).
#[derive(Module, Debug)]
pub struct AdaptableEmbedding<A: LayerAdapter> {
    /// The base table, `weight: [num_embeddings, dim]`.
    pub base: Embedding,
    /// The adapter, if this embedding is targeted.
    pub adapter: Option<A>,
    /// Trained rows (PEFT's trainable tokens; with a tied output layer, its rows too).
    pub token_adapter: Option<TokenRows>,
    /// Whether `adapter` (and `token_adapter`) is currently folded into `base`.
    #[module(skip)]
    pub merged: bool,
    /// Whether merging (or unmerging) has rewritten the table since it was loaded: a copy made
    /// at load time (a tied output head's bf16 table) no longer matches it.
    #[module(skip)]
    pub rewritten: bool,
}

impl<A: LayerAdapter> AdaptableEmbedding<A> {
    /// An embedding without adapter.
    pub fn plain(base: Embedding) -> Self {
        Self {
            base,
            adapter: None,
            token_adapter: None,
            merged: false,
            rewritten: false,
        }
    }

    /// `[batch, seq]` ids → `[batch, seq, dim]`.
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let out = match (&self.adapter, self.merged) {
            (Some(adapter), false) => adapter.forward_embedding(&self.base, ids.clone()),
            _ => self.base.forward(ids.clone()),
        };
        match (&self.token_adapter, self.merged) {
            (Some(tokens), false) => tokens.embed(out, ids),
            _ => out,
        }
    }

    /// The trained rows that a tied output layer computes with now (`None` once merged: the
    /// table then holds them).
    pub fn active_tokens(&self) -> Option<&TokenRows> {
        self.token_adapter.as_ref().filter(|_| !self.merged)
    }

    /// `(num_embeddings, dim)`.
    pub fn dims(&self) -> (usize, usize) {
        let [num, dim] = self.base.weight.shape().dims();
        (num, dim)
    }

    /// Folds the adapter into the table; a no-op without adapter or when already merged.
    pub fn merge(mut self) -> Result<Self> {
        if self.merged || (self.adapter.is_none() && self.token_adapter.is_none()) {
            return Ok(self);
        }
        if let Some(adapter) = &mut self.adapter {
            self.base = adapter.merge_embedding(self.base)?;
        }
        if let Some(tokens) = &self.token_adapter {
            self.base = replace_table_rows(tokens, self.base, tokens.values())?;
        }
        self.merged = true;
        self.rewritten = true;
        Ok(self)
    }

    /// Undoes [`merge`](Self::merge).
    pub fn unmerge(mut self) -> Result<Self> {
        if !self.merged {
            return Ok(self);
        }
        if let Some(tokens) = &self.token_adapter {
            self.base = replace_table_rows(tokens, self.base, tokens.original.clone())?;
        }
        if let Some(adapter) = &mut self.adapter {
            self.base = adapter.unmerge_embedding(self.base)?;
        }
        self.merged = false;
        self.rewritten = true;
        Ok(self)
    }

    /// Replaces the adapter, keeping the base and the trained rows.
    pub fn with_adapter<B: LayerAdapter>(self, adapter: Option<B>) -> AdaptableEmbedding<B> {
        AdaptableEmbedding {
            base: self.base,
            adapter,
            token_adapter: self.token_adapter,
            merged: false,
            rewritten: self.rewritten,
        }
    }

    /// The embedding without trained rows (after they were merged, or to drop them).
    pub fn without_tokens(mut self) -> Self {
        self.token_adapter = None;
        self
    }
}

/// `table` with the rows of `tokens` replaced by `rows: [n, dim]`.
fn replace_table_rows(tokens: &TokenRows, table: Embedding, rows: Tensor<2>) -> Result<Embedding> {
    let require_grad = table.weight.is_require_grad();
    let weight = tokens.replace_rows(table.weight.val(), rows)?;
    Ok(Embedding {
        weight: burn::module::Param::from_tensor(weight).set_require_grad(require_grad),
    })
}
