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

use burn::module::{Module, ModuleDisplay};
use burn::nn::{Embedding, Linear};
use burn::tensor::{Int, Tensor};

use crate::error::Result;

/// A method that changes what one linear layer computes (LoRA, IA3, ...).
///
/// Implementors are burn modules holding only the adapter's own parameters; the frozen base layer
/// is passed in. Shapes: `x: [batch, seq, in]` → `[batch, seq, out]`. burn's [`Linear`] stores its
/// weight as `[in, out]` (the transpose of PyTorch's `[out, in]`).
pub trait LayerAdapter: Module + ModuleDisplay {
    /// The layer's output with this adapter applied.
    fn forward_linear(&self, base: &Linear, x: Tensor<3>) -> Tensor<3>;

    /// The embedding's output with this adapter applied (`ids: [batch, seq]`). The default leaves
    /// the embedding unchanged, for methods that only adapt linear layers.
    fn forward_embedding(&self, base: &Embedding, ids: Tensor<2, Int>) -> Tensor<3> {
        base.forward(ids)
    }

    /// Folds the adapter into the base weights (`merge_adapter`).
    fn merge_linear(&self, base: Linear) -> Result<Linear>;

    /// Removes a previously merged adapter from the base weights (`unmerge_adapter`).
    fn unmerge_linear(&self, base: Linear) -> Result<Linear>;

    /// Folds the adapter into an embedding table. The default leaves it unchanged.
    fn merge_embedding(&self, base: Embedding) -> Result<Embedding> {
        Ok(base)
    }

    /// Removes a previously merged adapter from an embedding table.
    fn unmerge_embedding(&self, base: Embedding) -> Result<Embedding> {
        Ok(base)
    }
}

/// The adapter of a plain model: no parameters, no change.
#[derive(Module, Debug)]
pub struct NoAdapter {}

impl LayerAdapter for NoAdapter {
    fn forward_linear(&self, base: &Linear, x: Tensor<3>) -> Tensor<3> {
        base.forward(x)
    }
    fn merge_linear(&self, base: Linear) -> Result<Linear> {
        Ok(base)
    }
    fn unmerge_linear(&self, base: Linear) -> Result<Linear> {
        Ok(base)
    }
}

/// A frozen linear layer with an optional adapter beside it.
#[derive(Module, Debug)]
pub struct AdaptableLinear<A: LayerAdapter> {
    /// The base layer; `weight: [in, out]`, `bias: [out]`.
    pub base: Linear,
    /// The adapter, if this layer is targeted.
    pub adapter: Option<A>,
    /// Whether `adapter` is currently folded into `base` (then the forward pass skips it).
    #[module(skip)]
    pub merged: bool,
}

impl<A: LayerAdapter> AdaptableLinear<A> {
    /// A layer without adapter.
    pub fn plain(base: Linear) -> Self {
        Self {
            base,
            adapter: None,
            merged: false,
        }
    }

    /// `[batch, seq, in]` → `[batch, seq, out]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        match (&self.adapter, self.merged) {
            (Some(adapter), false) => adapter.forward_linear(&self.base, x),
            _ => self.base.forward(x),
        }
    }

    /// `(in_features, out_features)`.
    pub fn dims(&self) -> (usize, usize) {
        let [d_in, d_out] = self.base.weight.shape().dims();
        (d_in, d_out)
    }

    /// Folds the adapter into the base weights; a no-op without adapter or when already merged.
    pub fn merge(mut self) -> Result<Self> {
        if let (Some(adapter), false) = (&self.adapter, self.merged) {
            self.base = adapter.merge_linear(self.base)?;
            self.merged = true;
        }
        Ok(self)
    }

    /// Undoes [`merge`](Self::merge).
    pub fn unmerge(mut self) -> Result<Self> {
        if let (Some(adapter), true) = (&self.adapter, self.merged) {
            self.base = adapter.unmerge_linear(self.base)?;
            self.merged = false;
        }
        Ok(self)
    }

    /// Replaces the adapter, keeping the base (used by
    /// [`CausalLm::map_layers`](crate::model::CausalLm::map_layers)).
    pub fn with_adapter<B: LayerAdapter>(self, adapter: Option<B>) -> AdaptableLinear<B> {
        AdaptableLinear {
            base: self.base,
            adapter,
            merged: false,
        }
    }
}

/// An embedding table with an optional adapter beside it (LoRA's `lora_embedding_A/B`).
#[derive(Module, Debug)]
pub struct AdaptableEmbedding<A: LayerAdapter> {
    /// The base table, `weight: [num_embeddings, dim]`.
    pub base: Embedding,
    /// The adapter, if this embedding is targeted.
    pub adapter: Option<A>,
    /// Whether `adapter` is currently folded into `base`.
    #[module(skip)]
    pub merged: bool,
}

impl<A: LayerAdapter> AdaptableEmbedding<A> {
    /// An embedding without adapter.
    pub fn plain(base: Embedding) -> Self {
        Self {
            base,
            adapter: None,
            merged: false,
        }
    }

    /// `[batch, seq]` ids → `[batch, seq, dim]`.
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        match (&self.adapter, self.merged) {
            (Some(adapter), false) => adapter.forward_embedding(&self.base, ids),
            _ => self.base.forward(ids),
        }
    }

    /// `(num_embeddings, dim)`.
    pub fn dims(&self) -> (usize, usize) {
        let [num, dim] = self.base.weight.shape().dims();
        (num, dim)
    }

    /// Folds the adapter into the table; a no-op without adapter or when already merged.
    pub fn merge(mut self) -> Result<Self> {
        if let (Some(adapter), false) = (&self.adapter, self.merged) {
            self.base = adapter.merge_embedding(self.base)?;
            self.merged = true;
        }
        Ok(self)
    }

    /// Undoes [`merge`](Self::merge).
    pub fn unmerge(mut self) -> Result<Self> {
        if let (Some(adapter), true) = (&self.adapter, self.merged) {
            self.base = adapter.unmerge_embedding(self.base)?;
            self.merged = false;
        }
        Ok(self)
    }

    /// Replaces the adapter, keeping the base.
    pub fn with_adapter<B: LayerAdapter>(self, adapter: Option<B>) -> AdaptableEmbedding<B> {
        AdaptableEmbedding {
            base: self.base,
            adapter,
            merged: false,
        }
    }
}

/// A model wrapped by a PEFT method (LoRA, IA3, BitFit, ...): what the training loop and the
/// command line need, whichever method it is.
pub trait AdapterModel: Sized {
    /// The wrapped model.
    type Model: crate::CausalLm;

    /// The model, for forward passes.
    fn model(&self) -> &Self::Model;

    /// Replaces the model (after an optimizer step), keeping the method's bookkeeping.
    fn with_model(self, model: Self::Model) -> Self;

    /// Hugging Face names (see [`crate::params`]) of the parameters that train.
    fn trainable_names(&self) -> Vec<String>;

    /// PEFT's trainable-parameters numbers.
    fn trainable_summary(&self) -> crate::TrainableSummary;

    /// Writes the adapter folder in PEFT's format.
    fn save_pretrained(&self, dir: &std::path::Path) -> Result<()>;

    /// Folds the adapter into the base weights and returns the plain model.
    fn merge_and_unload(self) -> Result<<Self::Model as crate::CausalLm>::WithAdapter<NoAdapter>>;
}
