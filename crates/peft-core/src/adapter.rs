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
use burn::tensor::{DType, Device, Int, Tensor, TensorData};

use crate::HostTensor;
use crate::error::Result;
use crate::precision::{ComputeDtype, round_bf16};

/// A frozen weight kept in a compressed form and de-quantised on demand: 4-bit NF4/FP4 for QLoRA
/// (peft-quant implements it; peft-core only sees this trait) or bf16
/// ([`HalfWeight`](crate::precision::HalfWeight)).
pub trait PackedWeight: std::fmt::Debug + Send + Sync {
    /// `[out, in]`, PyTorch's order.
    fn shape(&self) -> [usize; 2];
    /// The de-quantised weight, row-major `[out, in]`, in f32.
    fn dequantize(&self) -> Vec<f32>;
    /// Bytes held (codes plus statistics).
    fn storage_bytes(&self) -> usize;
    /// The tensors this weight is saved as under `name` (bitsandbytes' layout for 4-bit).
    fn to_tensors(&self, name: &str) -> Vec<(String, HostTensor)>;

    /// The de-quantised weight rounded to bf16 (held as f32): what bf16 compute multiplies by.
    /// bitsandbytes de-quantises in f32 and casts to the compute dtype, one rounding; a format
    /// already in bf16 returns its values as they are.
    fn dequantize_bf16_rounded(&self) -> Vec<f32> {
        let mut values = self.dequantize();
        for v in &mut values {
            *v = half::bf16::from_f32(*v).to_f32();
        }
        values
    }

    /// The weight as 4-bit codes and per-block scales, for de-quantising with tensor operations
    /// on a GPU ([`DeviceCodes`]); `None` for formats that are not 4-bit codes.
    fn code_blocks(&self) -> Option<CodeBlocks> {
        None
    }

    /// The checkpoint dtype the weight's values are exactly representable in when it is held as
    /// stored (bf16/f16 weights); `None` for quantised formats.
    fn stored_dtype(&self) -> Option<safetensors::Dtype> {
        None
    }

    /// `x · Wᵀ` for `x: [rows, in]` (row-major) computed straight from the packed values, for
    /// the few rows of a decoding step; `None` where the format has no such path (the caller
    /// de-quantises and multiplies).
    fn matmul_few_rows(&self, _x: &[f32], _rows: usize) -> Option<Vec<f32>> {
        None
    }

    /// De-quantises the block `rows × cols` of the `[out, in]` weight into `out`
    /// (`rows.len() · cols.len()` values, row-major), exactly as
    /// [`dequantize`](Self::dequantize) would; `false` where the format cannot (the caller
    /// de-quantises the whole weight instead). Products then go through the weight block by
    /// block, each block still in cache when it is multiplied.
    fn dequantize_block(
        &self,
        _rows: std::ops::Range<usize>,
        _cols: std::ops::Range<usize>,
        _out: &mut [f32],
    ) -> bool {
        false
    }
}

/// Where element `8w + j` of a weight sits in word `w` of [`CodeBlocks::words`]: the nibble at
/// bit `NIBBLE_SHIFTS[j]`. Words are bitsandbytes' packed bytes read four at a time as a
/// little-endian `i32`, and byte `b` holds element `2b` in its high nibble.
pub const NIBBLE_SHIFTS: [i32; 8] = [4, 0, 12, 8, 20, 16, 28, 24];

/// A 4-bit weight as plain arrays: `value[i] = codebook[code(i)] · absmax[i / blocksize]`.
#[derive(Debug, Clone, PartialEq)]
pub struct CodeBlocks {
    /// Eight codes per word (see [`NIBBLE_SHIFTS`]); the last word is zero-padded.
    pub words: Vec<i32>,
    /// One f32 scale per block (double quantisation already resolved).
    pub absmax: Vec<f32>,
    /// The 16 code values (NF4 or FP4).
    pub codebook: [f32; 16],
    /// Elements per block.
    pub blocksize: usize,
}

/// A 4-bit weight resident on a device (4.5 bits per parameter with f32 block scales),
/// de-quantised there by tensor operations for each product: no host work and no f32 upload per
/// pass on a GPU.
#[derive(Debug, Clone)]
pub struct DeviceCodes {
    /// `[ceil(n / 8)]` words of eight codes.
    pub words: Tensor<1, Int>,
    /// `[blocks]` scales.
    pub absmax: Tensor<1>,
    /// `[16]` code values.
    pub codebook: Tensor<1>,
    /// `[1, 8]` [`NIBBLE_SHIFTS`], in the words' integer dtype.
    pub shifts: Tensor<2, Int>,
    /// Elements per block.
    pub blocksize: usize,
}

impl DeviceCodes {
    /// Uploads `blocks` to `device`.
    pub fn upload(blocks: &CodeBlocks, device: &Device) -> Self {
        let words = Tensor::<1, Int>::from_data(
            TensorData::new(blocks.words.clone(), [blocks.words.len()]),
            device,
        );
        let absmax = Tensor::<1>::from_data(
            TensorData::new(blocks.absmax.clone(), [blocks.absmax.len()]),
            device,
        );
        let codebook =
            Tensor::<1>::from_data(TensorData::new(blocks.codebook.to_vec(), [16]), device);
        let shifts =
            Tensor::<2, Int>::from_data(TensorData::new(NIBBLE_SHIFTS.to_vec(), [1, 8]), device)
                .cast(words.dtype());
        Self {
            words,
            absmax,
            codebook,
            shifts,
            blocksize: blocks.blocksize,
        }
    }

    /// The de-quantised `[rows, cols]` weight (row-major, `rows · cols` elements), computed on
    /// the device: unpack the nibbles, look the codes up, scale each block.
    pub fn dequantize(&self, [rows, cols]: [usize; 2]) -> Tensor<2> {
        let device = self.words.device();
        let n = rows * cols;
        let n_words = self.words.dims()[0];
        let shifts = self.shifts.clone().expand([n_words, 8]);
        let codes = self
            .words
            .clone()
            .reshape([n_words, 1])
            .expand([n_words, 8])
            .bitwise_right_shift(shifts)
            .bitwise_and_scalar(15)
            .reshape([n_words * 8])
            .slice(0..n);
        let values = self.codebook.clone().select(0, codes);
        let blocks = self.absmax.dims()[0];
        let padded = blocks * self.blocksize;
        let values = if padded > n {
            Tensor::cat(vec![values, Tensor::zeros([padded - n], &device)], 0)
        } else {
            values
        };
        let scaled =
            values.reshape([blocks, self.blocksize]) * self.absmax.clone().reshape([blocks, 1]);
        scaled.reshape([padded]).slice(0..n).reshape([rows, cols])
    }
}

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
    /// The codes resident on a GPU device, de-quantised there (`None` on the CPU backend, which
    /// uses the packed operation, and for non-4-bit formats).
    #[module(skip)]
    pub on_device: Option<Box<DeviceCodes>>,
}

impl PackedLinear {
    /// The de-quantised weight in burn's `[in, out]` layout on `device` (contiguous).
    pub fn dense_weight(&self, device: &Device) -> Tensor<2> {
        crate::adapter_files::burn_linear_weight(
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
        if crate::packed_op::supports_packed_matmul(&x.device()) {
            if !bf16 {
                let out = crate::packed_op::packed_linear(x, &self.weight, false);
                return match &self.bias {
                    Some(b) => out + b.val().unsqueeze::<3>(),
                    None => out,
                };
            }
            let out = crate::packed_op::packed_linear(round_bf16(x), &self.weight, true);
            let out = match &self.bias {
                Some(b) => out + round_bf16(b.val()).unsqueeze::<3>(),
                None => out,
            };
            return round_bf16(out);
        }
        let weight = match &self.on_device {
            Some(codes) => codes.dequantize(self.weight.shape()).transpose(),
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

/// `x · weight + bias` with every operand cast to `dtype` (the backend's own kernels), returned in
/// f32: bf16 compute off the CPU backend.
fn linear_in(dtype: DType, x: Tensor<3>, weight: Tensor<2>, bias: Option<Tensor<1>>) -> Tensor<3> {
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
                    return crate::blas::linear(x, weight, l.bias.as_ref().map(|b| b.val()));
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
