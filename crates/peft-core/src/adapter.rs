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

use burn::module::{Module, ModuleDisplay, Param};
use burn::nn::{Embedding, Linear};
use burn::tensor::module::linear;
use burn::tensor::{DType, Device, Int, Tensor};

use peft_ops::packed::{DeviceWeight, PackedWeight};
use peft_ops::packed_op::Bf16Layer;
use peft_ops::precision::{ComputeDtype, round_bf16};

use crate::error::Result;

/// A linear layer whose weight stays packed (4-bit NF4/FP4, or bf16 for bf16 compute on the CPU
/// backend); each forward pass de-quantises it, multiplies, and lets the dense copy go.
#[derive(Module, Debug)]
pub struct PackedLinear {
    /// The packed `[out, in]` weight (not a parameter: frozen, never trained).
    #[module(skip)]
    pub weight: Arc<dyn PackedWeight>,
    /// `[out]`, kept dense (as bitsandbytes' `Linear4bit` does).
    pub bias: Option<Param<Tensor<1>>>,
    /// Where the de-quantised weight is placed when the layer is made dense.
    #[module(skip)]
    pub device: Device,
    /// The dtype the product is computed in (`bnb_4bit_compute_dtype`).
    #[module(skip)]
    pub compute: ComputeDtype,
    /// The weight resident on a GPU device, de-quantised there (`None` on the CPU backend,
    /// which uses the packed operation, and for formats without a device form).
    #[module(skip)]
    pub on_device: Option<Arc<dyn DeviceWeight>>,
}

impl PackedLinear {
    /// The de-quantised weight in burn's `[in, out]` layout on `device` (contiguous).
    pub fn dense_weight(&self, device: &Device) -> Tensor<2> {
        peft_tensors::layout::burn_linear_weight(
            &self.weight.dequantize(),
            self.weight.shape(),
            device,
        )
    }

    /// `[batch, seq, in]` → `[batch, seq, out]`, computed in [`Self::compute`] and returned in
    /// f32. On the CPU backend the product is one operation that de-quantises in the forward
    /// pass and again in the backward pass, so no dense weight stays alive in the autodiff graph
    /// (bf16 is computed there as f32 products of bf16-rounded operands, rounded once — what a
    /// bf16 GEMM with f32 accumulation gives); elsewhere the de-quantised weight is an ordinary
    /// constant operand.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let bf16 = self.compute == ComputeDtype::Bf16;
        if peft_ops::device::runs_cpu_kernels(&x.device()) {
            if !bf16 {
                let out = peft_ops::packed_op::packed_linear(x, &self.weight, None);
                return match &self.bias {
                    Some(b) => out + b.val().unsqueeze::<3>(),
                    None => out,
                };
            }
            // A frozen bias goes into the one bf16 operation; a trained one (BitFit) is added
            // here, where its gradient is tracked, before the output's rounding.
            let trained_bias = self
                .bias
                .as_ref()
                .map(|b| b.val())
                .filter(|b| b.is_require_grad());
            let layer = Bf16Layer {
                bias: match (&self.bias, &trained_bias) {
                    (Some(b), None) => Some(rounded_values(b.val())),
                    _ => None,
                },
                round_output: trained_bias.is_none(),
            };
            let out = peft_ops::packed_op::packed_linear(x, &self.weight, Some(layer));
            return match trained_bias {
                Some(b) => round_bf16(out + round_bf16(b).unsqueeze::<3>()),
                None => out,
            };
        }
        let weight = match &self.on_device {
            Some(on_device) => on_device.dequantize(self.weight.shape()).transpose(),
            None => self.dense_weight(&x.device()),
        };
        linear_in(
            self.compute.dtype(),
            x,
            weight,
            self.bias.as_ref().map(|b| b.val()),
        )
    }
}

/// A frozen bias's values rounded to bf16, for the bf16 operation.
fn rounded_values(bias: Tensor<1>) -> Arc<[f32]> {
    bias.into_data()
        .iter::<f32>()
        .map(|v| half::bf16::from_f32(v).to_f32())
        .collect()
}

/// `x · weight + bias` (`weight: [in, out]`) with every operand cast to `dtype` (the backend's own
/// kernels), returned in f32: bf16 compute off the CPU backend.
pub fn linear_in(
    dtype: DType,
    x: Tensor<3>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
) -> Tensor<3> {
    let bias = bias.map(|b| b.cast(dtype));
    linear(x.cast(dtype), weight.cast(dtype), bias).cast(DType::F32)
}

/// The frozen base of an [`AdaptableLinear`]: a dense burn [`Linear`] or a packed 4-bit weight.
#[derive(Module, Debug)]
pub enum BaseLinear {
    /// Full-precision weight, `[in, out]`.
    Dense(Linear),
    /// Packed weight (4-bit, or bf16 on the CPU backend), de-quantised per forward pass.
    Packed(PackedLinear),
}

impl BaseLinear {
    /// `[batch, seq, in]` → `[batch, seq, out]` in f32. A dense layer computes in its weight's
    /// dtype (bf16 when loaded for bf16 compute), a packed one in its compute dtype.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        match self {
            BaseLinear::Dense(l) => {
                let weight = l.weight.val();
                let dtype = weight.dtype();
                if dtype == DType::F32 {
                    return peft_ops::blas::linear(x, weight, l.bias.as_ref().map(|b| b.val()));
                }
                linear_in(dtype, x, weight, l.bias.as_ref().map(|b| b.val()))
            }
            BaseLinear::Packed(q) => q.forward(x),
        }
    }

    /// `(in_features, out_features)`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            BaseLinear::Dense(l) => {
                let [d_in, d_out] = l.weight.shape().dims();
                (d_in, d_out)
            }
            BaseLinear::Packed(q) => {
                let [d_out, d_in] = q.weight.shape();
                (d_in, d_out)
            }
        }
    }

    /// The layer as a dense f32 [`Linear`], de-quantising a packed weight (exactly, no
    /// re-rounding) or widening a bf16 one.
    pub fn into_dense(self) -> Linear {
        match self {
            BaseLinear::Dense(l) => with_weight_dtype(l, DType::F32),
            BaseLinear::Packed(q) => Linear {
                weight: Param::from_tensor(q.dense_weight(&q.device)).set_require_grad(false),
                bias: q.bias,
            },
        }
    }

    /// The packed weight, if this layer is quantised.
    pub fn packed(&self) -> Option<&Arc<dyn PackedWeight>> {
        match self {
            BaseLinear::Packed(q) => Some(&q.weight),
            BaseLinear::Dense(_) => None,
        }
    }
}

/// `linear` with its (frozen) weight converted to `dtype`; the bias stays as it is (f32).
pub fn with_weight_dtype(linear: Linear, dtype: DType) -> Linear {
    if linear.weight.val().dtype() == dtype {
        return linear;
    }
    let require_grad = linear.weight.is_require_grad();
    Linear {
        weight: Param::from_tensor(linear.weight.val().cast(dtype)).set_require_grad(require_grad),
        bias: linear.bias,
    }
}

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

    /// The adapter's additive term alone, `[batch, seq, in]` → `[batch, seq, out]`, for
    /// methods whose output is `base(x) + Δ(x)` (LoRA); `None` for the others (IA3 scales the
    /// base output). Several adapters active at once, and batches whose rows use different
    /// adapters ([`AdapterSet`](crate::adapter_set::AdapterSet)), need it.
    fn delta_linear(&self, _x: Tensor<3>) -> Option<Tensor<3>> {
        None
    }

    /// The additive term of an adapted embedding for `ids: [batch, seq]`, as
    /// [`delta_linear`](Self::delta_linear).
    fn delta_embedding(&self, _ids: Tensor<2, Int>) -> Option<Tensor<3>> {
        None
    }

    /// Whether [`delta_linear`](Self::delta_linear) and
    /// [`delta_embedding`](Self::delta_embedding) give this adapter's whole effect.
    fn is_additive(&self) -> bool {
        false
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
    fn forward_linear(&self, base: &BaseLinear, x: Tensor<3>) -> Tensor<3> {
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
    /// The frozen base layer; dense `weight: [in, out]` or packed 4-bit, `bias: [out]`.
    pub base: BaseLinear,
    /// The adapter, if this layer is targeted.
    pub adapter: Option<A>,
    /// Whether `adapter` is currently folded into `base` (then the forward pass skips it).
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
        self.base.dims()
    }

    /// The weight `[in, out]` when this layer is a frozen, bias-free dense f32 product with no
    /// active adapter — what a caller may multiply by itself (the chunked output loss).
    pub fn frozen_dense_weight(&self) -> Option<Tensor<2>> {
        let active = self.adapter.is_some() && !self.merged;
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
        let active = self.adapter.is_some() && !self.merged;
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
        if let (Some(adapter), false) = (&self.adapter, self.merged) {
            self.base = BaseLinear::Dense(adapter.merge_linear(self.base.into_dense())?);
            self.merged = true;
        }
        Ok(self)
    }

    /// Undoes [`merge`](Self::merge) (the base stays dense).
    pub fn unmerge(mut self) -> Result<Self> {
        if let (Some(adapter), true) = (&self.adapter, self.merged) {
            self.base = BaseLinear::Dense(adapter.unmerge_linear(self.base.into_dense())?);
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
