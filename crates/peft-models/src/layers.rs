//! Building blocks shared by the architectures: norms, attention masking, and construction of
//! burn layers from Hugging Face tensors.

use burn::module::{Module, Param};
use burn::nn::{Embedding, Linear};
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use std::sync::Arc;

use peft_core::{
    AdaptableLinear, BaseLinear, ComputeDtype, LayerAdapter, ModelInput, PackedLinear,
    PackedWeight, PeftError, Result, TensorStore, adapter::with_weight_dtype,
};
use peft_ops::device::runs_cpu_kernels;
use peft_ops::half::{HalfDtype, HalfWeight};
use peft_quant::{Quantized4bit, SourceDtype};
use peft_tensors::layout::burn_linear_weight;

/// GELU with the tanh approximation (BLOOM's `bloom_gelu_forward`): one fused pass on the CPU
/// backend, see [`peft_ops::fused::gelu_tanh`].
pub fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    peft_ops::fused::gelu_tanh(x)
}

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

/// Reads Hugging Face tensors into burn layers, checking every shape against the config.
pub struct WeightLoader<'a> {
    /// The checkpoint.
    pub store: &'a TensorStore,
    /// Where the layers are created.
    pub device: &'a Device,
    /// How to load: 4-bit quantisation, the compute dtype, bf16/f16 weights held as stored or
    /// widened, `lm_head` in bf16 (see [`crate::LoadOptions`]).
    pub options: &'a crate::LoadOptions,
}

impl<'a> WeightLoader<'a> {
    /// A loader of `store` onto `device` as `options` ask.
    pub fn new(
        store: &'a TensorStore,
        device: &'a Device,
        options: &'a crate::LoadOptions,
    ) -> Self {
        Self {
            store,
            device,
            options,
        }
    }

    /// Whether the output projection computes in bf16.
    fn head_in_bf16(&self) -> bool {
        self.options.bf16_lm_head && self.options.compute_dtype == ComputeDtype::Bf16
    }

    /// The output projection: `lm_head` (`[vocab, h]` from `lm_head.weight`) for an untied
    /// model; for a tied one no layer (the embedding table `{table}.weight` is the projection)
    /// and, where it computes in bf16, the table's bf16 copy.
    pub fn output_head<A: LayerAdapter>(
        &self,
        tied: bool,
        table: &str,
        h: usize,
        vocab: usize,
    ) -> Result<(Option<AdaptableLinear<A>>, TiedHead)> {
        if !tied {
            return Ok((
                Some(self.adaptable("lm_head", h, vocab, false)?),
                TiedHead::default(),
            ));
        }
        if !self.head_in_bf16() {
            return Ok((None, TiedHead::default()));
        }
        // The table is read again for the input embeddings: its bytes are kept.
        let weight: Option<Arc<dyn PackedWeight>> = match runs_cpu_kernels(self.device) {
            false => None,
            true => Some(Arc::new(self.held_bf16(
                &format!("{table}.weight"),
                h,
                vocab,
                true,
            )?)),
        };
        Ok((None, TiedHead { bf16: true, weight }))
    }
    fn tensor<const D: usize>(&self, key: &str, shape: [usize; D]) -> Result<Tensor<D>> {
        let values = self.store.f32_shaped(key, &shape)?;
        Ok(Tensor::from_data(
            TensorData::new(values, shape),
            self.device,
        ))
    }

    /// A `[dim]` vector.
    pub fn vector(&self, key: &str, dim: usize) -> Result<Param<Tensor<1>>> {
        Ok(Param::from_tensor(self.tensor(key, [dim])?))
    }

    /// A linear layer from `{prefix}.weight` (`[out, in]`, transposed to burn's `[in, out]`) and,
    /// when `bias`, `{prefix}.bias`.
    pub fn linear(&self, prefix: &str, d_in: usize, d_out: usize, bias: bool) -> Result<Linear> {
        let values = self
            .store
            .f32_shaped(&format!("{prefix}.weight"), &[d_out, d_in])?;
        let weight = burn_linear_weight(&values, [d_out, d_in], self.device);
        let bias = if bias {
            Some(self.vector(&format!("{prefix}.bias"), d_out)?)
        } else {
            None
        };
        Ok(Linear {
            weight: Param::from_tensor(weight),
            bias,
        })
    }

    /// An adaptable linear layer without adapter: packed 4-bit when the checkpoint stores it so
    /// or when loading quantised (never for `lm_head`), dense otherwise.
    pub fn adaptable<A: LayerAdapter>(
        &self,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
    ) -> Result<AdaptableLinear<A>> {
        let key = format!("{prefix}.weight");
        let packed = match peft_quant::find_quant_state(&key, self.store.keys()) {
            Some(state_key) => Some(self.read_4bit(&key, state_key, d_in, d_out)?),
            None => match self.options.quantize {
                Some(config) if prefix != "lm_head" => {
                    let values = self.store.f32_shaped(&key, &[d_out, d_in])?;
                    let dtype = SourceDtype::from_safetensors(self.store.dtype(&key)?)
                        .unwrap_or(SourceDtype::F32);
                    Some(Quantized4bit::quantize(
                        &values,
                        &[d_out, d_in],
                        dtype,
                        config,
                    )?)
                }
                _ => None,
            },
        };
        let packed: Arc<dyn PackedWeight> = match packed {
            Some(q) => Arc::new(q),
            // bf16 compute: `lm_head` stays f32 (as after prepare_model_for_kbit_training)
            // unless asked to compute in bf16 too (as under torch.autocast).
            None if self.options.compute_dtype == ComputeDtype::Bf16
                && (prefix != "lm_head" || self.head_in_bf16()) =>
            {
                if !runs_cpu_kernels(self.device) {
                    let dense = self.linear(prefix, d_in, d_out, bias)?;
                    return Ok(AdaptableLinear::plain(with_weight_dtype(
                        dense,
                        self.options.compute_dtype.dtype(),
                    )));
                }
                Arc::new(self.held_bf16(&key, d_in, d_out, false)?)
            }
            // f32 compute over a bf16/f16 checkpoint: the weight stays in its stored 2 bytes
            // (widened exactly inside each product) unless asked otherwise; else dense f32.
            None => {
                let hold = !self.options.widen_half
                    && prefix != "lm_head"
                    && runs_cpu_kernels(self.device);
                match hold.then(|| self.stored_half(&key)).transpose()?.flatten() {
                    Some(dtype) => Arc::new(self.half_as_stored(&key, d_in, d_out, dtype)?),
                    None => {
                        return Ok(AdaptableLinear::plain(
                            self.linear(prefix, d_in, d_out, bias)?,
                        ));
                    }
                }
            }
        };
        let bias = if bias {
            Some(self.vector(&format!("{prefix}.bias"), d_out)?)
        } else {
            None
        };
        // On a GPU the codes live on the device and are de-quantised there (CPU: packed op).
        let on_device = (!runs_cpu_kernels(self.device))
            .then(|| packed.to_device(self.device))
            .flatten();
        Ok(AdaptableLinear::over(BaseLinear::Packed(PackedLinear {
            weight: packed,
            bias,
            device: self.device.clone(),
            compute: self.options.compute_dtype,
            on_device,
        })))
    }

    /// `{key}` (`[d_out, d_in]`) held in bf16 for bf16 compute: a bf16 checkpoint's values as
    /// stored (they already are bf16 compute's weights; in place from the file's mapping), any
    /// other dtype rounded once. `keep`: the tensor is read again (a tied table), so bytes
    /// copied out of a store without a mapping are not released.
    fn held_bf16(&self, key: &str, d_in: usize, d_out: usize, keep: bool) -> Result<HalfWeight> {
        let stored_bf16 = self.stored_half(key)? == Some(HalfDtype::Bf16);
        if stored_bf16 && (!keep || self.store.mapped(key)?.is_some()) {
            return self.half_as_stored(key, d_in, d_out, HalfDtype::Bf16);
        }
        let values = self.store.f32_shaped(key, &[d_out, d_in])?;
        HalfWeight::bf16_from_f32([d_out, d_in], &values)
    }

    /// The 16-bit format `{key}` is stored in, if it is one.
    fn stored_half(&self, key: &str) -> Result<Option<HalfDtype>> {
        Ok(HalfDtype::from_safetensors(self.store.dtype(key)?))
    }

    /// `{key}`, stored in `dtype`, read as stored with its shape checked, left in the file's
    /// mapping.
    fn half_as_stored(
        &self,
        key: &str,
        d_in: usize,
        d_out: usize,
        dtype: HalfDtype,
    ) -> Result<HalfWeight> {
        let (bytes, _, shape) = self.store.raw(key)?;
        if shape != [d_out, d_in] {
            return Err(PeftError::ShapeMismatch {
                path: self.store.label(),
                key: key.to_string(),
                found: shape.to_vec(),
                expected: vec![d_out, d_in],
            });
        }
        // Kept in the checkpoint's mapping, no copy (safetensors' zero-copy load); a store
        // parsed from memory copies the bytes.
        if let Some(mapped) = self.store.mapped(key)? {
            return HalfWeight::from_mapped(dtype, [d_out, d_in], mapped);
        }
        let weight = HalfWeight::from_le_bytes(dtype, [d_out, d_in], bytes)?;
        self.store.release(key);
        Ok(weight)
    }

    /// A weight stored in bitsandbytes' 4-bit layout, checked against the expected shape.
    fn read_4bit(
        &self,
        key: &str,
        state_key: &str,
        d_in: usize,
        d_out: usize,
    ) -> Result<Quantized4bit> {
        let q = Quantized4bit::from_tensors(key, state_key, |k| self.store.get(k).ok()).map_err(
            |e| PeftError::Quantization(format!("{}: {e}", self.store.label().display())),
        )?;
        if q.shape != [d_out, d_in] {
            return Err(PeftError::ShapeMismatch {
                path: self.store.label(),
                key: key.to_string(),
                found: q.shape.clone(),
                expected: vec![d_out, d_in],
            });
        }
        Ok(q)
    }

    /// An embedding table `{prefix}.weight`, `[num, dim]`.
    pub fn embedding(&self, prefix: &str, num: usize, dim: usize) -> Result<Embedding> {
        Ok(Embedding {
            weight: Param::from_tensor(self.tensor(&format!("{prefix}.weight"), [num, dim])?),
        })
    }

    /// A LayerNorm `{prefix}.weight` / `{prefix}.bias`.
    pub fn layer_norm(&self, prefix: &str, dim: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.vector(&format!("{prefix}.weight"), dim)?,
            bias: self.vector(&format!("{prefix}.bias"), dim)?,
            eps,
        })
    }

    /// An RMSNorm `{prefix}.weight`.
    pub fn rms_norm(&self, prefix: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: self.vector(&format!("{prefix}.weight"), dim)?,
            eps,
        })
    }
}

/// Checks that ids and mask agree and returns `(batch, seq)`.
pub fn check_input(input: &ModelInput) -> Result<(usize, usize)> {
    let [b, s] = input.input_ids.dims();
    if input.attention_mask.dims() != [b, s] {
        return Err(PeftError::InvalidInput(format!(
            "attention_mask has shape {:?} but input_ids has {:?}",
            input.attention_mask.dims(),
            [b, s]
        )));
    }
    if s == 0 && b > 0 {
        return Err(PeftError::InvalidInput("input_ids has no positions".into()));
    }
    if let Some(positions) = &input.position_ids {
        if positions.dims() != [b, s] {
            return Err(PeftError::InvalidInput(format!(
                "position_ids has shape {:?} but input_ids has {:?}",
                positions.dims(),
                [b, s]
            )));
        }
        if input.virtual_tokens.is_some() {
            return Err(PeftError::InvalidInput(
                "position_ids with virtual tokens (prompt learning) are not supported".into(),
            ));
        }
    }
    Ok((b, s))
}

/// `position_ids` as host values, row-major `[batch, seq]` (negative ids count as 0).
fn host_positions(positions: &Tensor<2, Int>) -> Vec<usize> {
    positions
        .clone()
        .into_data()
        .iter::<i64>()
        .map(|p| p.max(0) as usize)
        .collect()
}

/// Which key positions each query may attend to: `[batch, 1, q_len, kv_len]`.
///
/// `full_mask: [batch, kv_len]` covers past and current positions (1 = real); queries sit at the
/// last `q_len` positions, and each sees real keys at or before its own position.
pub fn attention_allowed(full_mask: &Tensor<2, Int>, q_len: usize) -> Tensor<4, Bool> {
    let [batch, kv_len] = full_mask.dims();
    let device = full_mask.device();
    let past = kv_len - q_len;
    let q_pos = Tensor::<1, Int>::arange(past as i64..kv_len as i64, &device).reshape([q_len, 1]);
    let k_pos = Tensor::<1, Int>::arange(0..kv_len as i64, &device).reshape([1, kv_len]);
    let causal = k_pos
        .expand([q_len, kv_len])
        .lower_equal(q_pos.expand([q_len, kv_len]))
        .reshape([1, 1, q_len, kv_len])
        .expand([batch, 1, q_len, kv_len]);
    let real = full_mask
        .clone()
        .equal_elem(1)
        .reshape([batch, 1, 1, kv_len])
        .expand([batch, 1, q_len, kv_len]);
    causal.bool_and(real)
}

/// Narrows `allowed: [batch, 1, q_len, kv_len]` (from [`attention_allowed`]) to a sliding
/// window: a query at position `p` keeps the keys at positions `p - window < k ≤ p`, as
/// transformers' `sliding_window_overlay` (`kv_idx > q_idx - sliding_window`).
pub fn sliding_window(allowed: &Tensor<4, Bool>, window: usize) -> Tensor<4, Bool> {
    let [batch, _, q_len, kv_len] = allowed.dims();
    let device = allowed.device();
    let past = kv_len - q_len;
    let q_pos = Tensor::<1, Int>::arange(past as i64..kv_len as i64, &device).reshape([q_len, 1]);
    let k_pos = Tensor::<1, Int>::arange(0..kv_len as i64, &device).reshape([1, kv_len]);
    let near = (k_pos.expand([q_len, kv_len]) + window as i64)
        .greater(q_pos.expand([q_len, kv_len]))
        .reshape([1, 1, q_len, kv_len])
        .expand([batch, 1, q_len, kv_len]);
    allowed.clone().bool_and(near)
}

/// The attention mask of each layer: `allowed` for full-attention layers (`None`), narrowed by
/// [`sliding_window`] for windowed ones; layers sharing a window share one mask.
pub fn layer_masks(allowed: &Tensor<4, Bool>, windows: &[Option<usize>]) -> Vec<Tensor<4, Bool>> {
    let mut narrowed: Vec<(usize, Tensor<4, Bool>)> = Vec::new();
    windows
        .iter()
        .map(|window| match window {
            None => allowed.clone(),
            Some(w) => match narrowed.iter().find(|(v, _)| v == w) {
                Some((_, mask)) => mask.clone(),
                None => {
                    let mask = sliding_window(allowed, *w);
                    narrowed.push((*w, mask.clone()));
                    mask
                }
            },
        })
        .collect()
}

/// Softmax attention. `q: [b, h, q, d]`, `k`/`v`: `[b, kv_h, kv, d]` with `kv_h` dividing `h`
/// (grouped-query attention: query head `i` reads key/value head `i / (h / kv_h)`, as
/// transformers' `repeat_kv` arranges them), `bias: [b, h, 1, kv]` added to the scores (ALiBi),
/// `allowed: [b, 1, q, kv]`. Masked scores get the dtype's minimum, as transformers' eager
/// attention does. Returns `[b, h, q, d]`.
///
/// On the CPU backend this is one fused operation ([`peft_ops::fused::attention`]) whose output
/// is laid out `[b, q, h, d]` underneath, so the caller's merge of the heads is free.
pub fn attend(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    scale: f64,
    bias: Option<Tensor<4>>,
    allowed: &Tensor<4, Bool>,
) -> Tensor<4> {
    let [b, h, q_len, _] = q.dims();
    let kv_len = k.dims()[2];
    if peft_ops::fused::is_fused(&q) {
        let (host_allowed, host_bias) = host_masks(allowed, bias.as_ref(), [b, h, q_len, kv_len]);
        if let Some(out) = peft_ops::fused::attention(
            q.clone(),
            k.clone(),
            v.clone(),
            scale as f32,
            host_bias,
            host_allowed,
        ) {
            return out.swap_dims(1, 2);
        }
    }
    composed_attend(q, k, v, scale, bias, None, allowed)
}

/// [`attend`] with Gemma 2's soft-capping of the scores, `cap · tanh(scores / cap)`, between
/// the scaling and the mask (burn operations on every backend: the fused CPU attention has no
/// capping).
pub fn attend_softcapped(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    scale: f64,
    softcap: Option<f64>,
    allowed: &Tensor<4, Bool>,
) -> Tensor<4> {
    match softcap {
        None => attend(q, k, v, scale, None, allowed),
        Some(cap) => composed_attend(q, k, v, scale, None, Some(cap), allowed),
    }
}

/// Self-attention over a fused query/key/value projection `qkv: [b, s, h, 3, d]` (BLOOM's
/// layout), as [`attend`] of its three parts; on the CPU backend one operation that reads the
/// parts in place and returns one gradient for `qkv` ([`peft_ops::fused::packed_qkv_attention`]).
/// Returns `[b, h, s, d]`.
pub fn attend_packed(
    qkv: Tensor<5>,
    scale: f64,
    bias: Option<Tensor<4>>,
    allowed: &Tensor<4, Bool>,
) -> Tensor<4> {
    let [b, s, h, _, _] = qkv.dims();
    if peft_ops::fused::is_fused(&qkv) {
        let (host_allowed, host_bias) = host_masks(allowed, bias.as_ref(), [b, h, s, s]);
        if let Some(out) = peft_ops::fused::packed_qkv_attention(
            qkv.clone(),
            scale as f32,
            host_bias,
            host_allowed,
        ) {
            return out.swap_dims(1, 2);
        }
    }
    let [q, k, v] = split_qkv(&qkv);
    composed_attend(q, k, v, scale, bias, None, allowed)
}

/// The query, key and value parts of a fused projection `qkv: [b, s, h, 3, d]` (BLOOM's layout),
/// each as `[b, h, s, d]`.
pub fn split_qkv(qkv: &Tensor<5>) -> [Tensor<4>; 3] {
    let [b, s, h, _, d] = qkv.dims();
    [0, 1, 2].map(|i| {
        qkv.clone()
            .slice_dim(3, i..i + 1)
            .reshape([b, s, h, d])
            .swap_dims(1, 2)
    })
}

/// The attention mask `[b, q, kv]` and bias `[b, h, kv]` on the host, for the fused operations.
fn host_masks(
    allowed: &Tensor<4, Bool>,
    bias: Option<&Tensor<4>>,
    [b, h, q_len, kv_len]: [usize; 4],
) -> (Vec<bool>, Option<Vec<f32>>) {
    let host_allowed = allowed
        .clone()
        .expand([b, 1, q_len, kv_len])
        .into_data()
        .try_to_vec::<bool>()
        .unwrap_or_default();
    let host_bias = bias.map(|bias| {
        bias.clone()
            .expand([b, h, 1, kv_len])
            .into_data()
            .try_to_vec::<f32>()
            .unwrap_or_default()
    });
    (host_allowed, host_bias)
}

/// [`attend`] from burn operations (any backend).
fn composed_attend(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    scale: f64,
    bias: Option<Tensor<4>>,
    softcap: Option<f64>,
    allowed: &Tensor<4, Bool>,
) -> Tensor<4> {
    let [b, h, q_len, _] = q.dims();
    let [_, kv_heads, kv_len, _] = k.dims();
    let (k, v) = (repeat_kv(k, h / kv_heads), repeat_kv(v, h / kv_heads));
    let mut scores = q.matmul(k.swap_dims(2, 3)) * scale;
    if let Some(cap) = softcap {
        scores = (scores / cap).tanh() * cap;
    }
    if let Some(bias) = bias {
        scores = scores + bias;
    }
    let blocked = allowed.clone().expand([b, h, q_len, kv_len]).bool_not();
    let probs = softmax(scores.mask_fill(blocked, f32::MIN), 3);
    probs.matmul(v)
}

/// Repeats `[b, kv_heads, len, d]` keys or values to `[b, kv_heads · n_rep, len, d]`, each head
/// `n_rep` times in a row (transformers' `repeat_kv`).
pub fn repeat_kv(x: Tensor<4>, n_rep: usize) -> Tensor<4> {
    if n_rep == 1 {
        return x;
    }
    let [b, kvh, len, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kvh, n_rep, len, d])
        .reshape([b, kvh * n_rep, len, d])
}

/// Appends this pass' keys and values to a layer's cache entry and returns the full ones.
pub fn extend_cache(
    slot: Option<&mut Option<peft_core::LayerKv>>,
    key: Tensor<4>,
    value: Tensor<4>,
) -> (Tensor<4>, Tensor<4>) {
    match slot {
        None => (key, value),
        Some(slot) => {
            let (k, v) = match slot.take() {
                Some(past) => (
                    Tensor::cat(vec![past.key, key], 2),
                    Tensor::cat(vec![past.value, value], 2),
                ),
                None => (key, value),
            };
            *slot = Some(peft_core::LayerKv {
                key: k.clone(),
                value: v.clone(),
            });
            (k, v)
        }
    }
}

/// Prepends ones for virtual tokens and the cache's past mask to this pass' mask:
/// `[batch, past + n_virtual + seq]`.
pub fn full_mask(
    cache_mask: Option<&Tensor<2, Int>>,
    n_virtual: usize,
    mask: &Tensor<2, Int>,
) -> Tensor<2, Int> {
    let [batch, _] = mask.dims();
    let mut parts = Vec::with_capacity(3);
    if let Some(past) = cache_mask {
        parts.push(past.clone());
    }
    if n_virtual > 0 {
        parts.push(Tensor::<2, Int>::ones([batch, n_virtual], &mask.device()));
    }
    parts.push(mask.clone());
    Tensor::cat(parts, 1)
}

/// The layer loop of a RoPE decoder (Llama and the architectures built like it): the input's
/// virtual tokens (prompt learning) prepended to `embedded: [b, s, hidden]`, its rotary
/// positions (`position_ids`, else `past .. past + seq`), the full mask (cache + virtual +
/// `attention_mask`), each layer's attention mask (its sliding window, if any), the rotary
/// tables of the pass, and the cache's per-layer slots; the mask is kept in the cache for the
/// next pass. `layer(i, x, rope, allowed, slot)` runs layer `i`. Returns `[b, n_virtual + s,
/// hidden]`.
pub fn decoder_pass(
    embedded: Tensor<3>,
    input: ModelInput,
    mut cache: Option<&mut peft_core::KvCache>,
    windows: &[Option<usize>],
    rotary: &crate::rope::Rotary,
    mut layer: impl FnMut(
        usize,
        Tensor<3>,
        &crate::rope::RopeTables,
        &Tensor<4, Bool>,
        Option<&mut Option<peft_core::LayerKv>>,
    ) -> Tensor<3>,
) -> Tensor<3> {
    let ModelInput {
        attention_mask,
        virtual_tokens,
        position_ids,
        ..
    } = input;
    let attention_mask = &attention_mask;
    let position_ids = position_ids.as_ref();
    let (mut x, n_virtual) = match virtual_tokens {
        Some(v) => {
            let n = v.dims()[1];
            (Tensor::cat(vec![v, embedded], 1), n)
        }
        None => (embedded, 0),
    };
    let q_len = x.dims()[1];
    let past = cache.as_ref().map_or(0, |c| c.past_len());
    let mask = full_mask(
        cache.as_ref().and_then(|c| c.mask.as_ref()),
        n_virtual,
        attention_mask,
    );
    let masks = layer_masks(&attention_allowed(&mask, q_len), windows);
    let rope = match position_ids {
        Some(positions) => crate::rope::RopeTables::for_positions(
            rotary,
            &host_positions(positions),
            x.dims()[0],
            &x.device(),
        ),
        None => crate::rope::RopeTables::for_pass(rotary, past, q_len, &x.device()),
    };
    if let Some(c) = cache.as_deref_mut()
        && c.layers.len() != windows.len()
    {
        c.layers.resize(windows.len(), None);
    }
    for (i, allowed) in masks.iter().enumerate() {
        let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
        x = layer(i, x, &rope, allowed, slot);
    }
    if let Some(c) = cache {
        c.mask = Some(mask);
    }
    x
}

/// How a tied output projection (the embedding table) computes: in f32 (the default, as after
/// `prepare_model_for_kbit_training`), or in bf16 as `torch.autocast` computes `lm_head`
/// ([`crate::LoadOptions::bf16_lm_head`]).
#[derive(Debug, Clone, Default)]
pub struct TiedHead {
    /// Compute the tied projection in bf16.
    pub bf16: bool,
    /// On the CPU backend, the table's values as bf16 (`[vocab, hidden]`, read in place from a
    /// bf16 checkpoint, else rounded once at load), which the bf16 products read. The table
    /// does not train while it is tied (training it unties it first), so the copy stays true.
    pub weight: Option<Arc<dyn PackedWeight>>,
}

/// The logits of the final hidden states: through `lm_head` where the model has its own, else
/// through the (tied) embedding `table: [vocab, hidden]`, in bf16 where `tied` says so.
pub fn output_logits<A: LayerAdapter>(
    hidden: Tensor<3>,
    lm_head: Option<&AdaptableLinear<A>>,
    table: &Param<Tensor<2>>,
    tied: &TiedHead,
) -> Tensor<3> {
    match lm_head {
        Some(head) => head.forward(hidden),
        None if tied.bf16 => tied_logits_bf16(hidden, table.val(), tied.weight.as_ref()),
        None => tied_logits(hidden, table.val()),
    }
}

/// The mean next-token loss of the final hidden states against `labels` — the loss of
/// [`output_logits`] (soft-capped by `softcap` when given) — computed over row blocks without
/// whole logits where the projection is frozen and plain (see
/// [`peft_ops::chunked_loss`]); from whole logits otherwise (a trained or adapted `lm_head`,
/// a GPU backend).
pub fn output_loss<A: LayerAdapter>(
    hidden: Tensor<3>,
    lm_head: Option<&AdaptableLinear<A>>,
    table: &Param<Tensor<2>>,
    tied: &TiedHead,
    labels: Tensor<2, Int>,
    softcap: Option<f64>,
) -> Tensor<1> {
    use peft_ops::loss::OutputProjection;
    let projection = match lm_head {
        Some(head) => head
            .frozen_bf16_weight()
            .map(OutputProjection::Bf16)
            .or_else(|| head.frozen_dense_weight().map(OutputProjection::F32)),
        None => {
            let table = table.val();
            match (&tied.weight, table.is_require_grad()) {
                (_, true) => None,
                (Some(weight), false) => Some(OutputProjection::Bf16(weight.clone())),
                (None, false) => (!tied.bf16 && table.dtype() == burn::tensor::DType::F32)
                    .then(|| OutputProjection::F32(table.transpose())),
            }
        }
    };
    let cap = softcap.map(|c| c as f32);
    if let Some(projection) = projection
        && let Some(loss) =
            peft_ops::loss::linear_causal_lm_loss(hidden.clone(), projection, cap, labels.clone())
    {
        return loss;
    }
    let logits = output_logits(hidden, lm_head, table, tied);
    let logits = match softcap {
        Some(cap) => (logits / cap).tanh() * cap,
        None => logits,
    };
    peft_ops::loss::causal_lm_loss(logits, labels)
}

/// A frozen `lm_head` holding a copy of the embedding `table` (`[vocab, hidden]`), for a tied
/// model whose input embeddings are about to be trained apart from its output projection; it
/// computes as the tied projection did (in bf16 from the table's bf16 copy where `tied` has
/// one).
pub fn untied_head<A: LayerAdapter>(
    table: &Param<Tensor<2>>,
    tied: &TiedHead,
) -> AdaptableLinear<A> {
    let table = table.val().detach();
    if let Some(weight) = &tied.weight {
        return AdaptableLinear::over(BaseLinear::Packed(PackedLinear {
            weight: weight.clone(),
            bias: None,
            device: table.device(),
            compute: ComputeDtype::Bf16,
            on_device: None,
        }));
    }
    let head = Linear {
        weight: Param::from_tensor(table.transpose()).set_require_grad(false),
        bias: None,
    };
    AdaptableLinear::plain(match tied.bf16 {
        true => with_weight_dtype(head, burn::tensor::DType::BF16),
        false => head,
    })
}

/// `x @ weightᵀ` for a `[vocab, hidden]` table used as output projection (tied `lm_head`).
pub fn tied_logits(hidden: Tensor<3>, table: Tensor<2>) -> Tensor<3> {
    peft_ops::matmul::linear(hidden, table.transpose(), None)
}

/// [`tied_logits`] in bf16: `round(round(x) · round(table)ᵀ)`, through the packed bf16 product
/// of `weight` (the table's bf16 copy) on the CPU backend, else through the backend's bf16
/// matmul.
pub fn tied_logits_bf16(
    hidden: Tensor<3>,
    table: Tensor<2>,
    weight: Option<&Arc<dyn PackedWeight>>,
) -> Tensor<3> {
    use burn::tensor::DType;
    match weight {
        Some(weight) if !table.is_require_grad() => peft_ops::packed_op::packed_linear(
            hidden,
            weight,
            Some(peft_ops::packed_op::Bf16Layer {
                bias: None,
                round_output: true,
            }),
        ),
        _ => peft_core::adapter::linear_in(DType::BF16, hidden, table.transpose(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// The fused attention equals the composed one, output and all three gradients: grouped
    /// heads, ALiBi bias, left padding (a query row that sees no key), a key/value prefix
    /// longer than the queries, and q/k/v read through strided views as the models make them.
    #[test]
    fn fused_attention_matches_the_composed_one() {
        let device = Device::flex().autodiff();
        // 45 queries: two blocks of the kernel's 32 rows, with different key extents.
        let (b, h, kvh, q_len, prefix, d) = (2, 4, 2, 45, 3, 8);
        let kv_len = q_len + prefix;
        let padded = [vec![1i64; prefix], vec![0, 0], vec![1i64; q_len - 2]].concat();
        let mask = Tensor::<2, Int>::from_data(
            TensorData::new([vec![1i64; kv_len], padded].concat(), [b, kv_len]),
            &device,
        );
        let allowed = attention_allowed(&mask, q_len);
        let slopes = Tensor::<1>::from_data([0.5f32, 0.25, 0.125, 0.0625], &device);
        let bias = mask.clone().cumsum(1).float().reshape([b, 1, 1, kv_len])
            * slopes.reshape([1, h, 1, 1]);
        // [b, s, heads, d] projections viewed as [b, heads, s, d], as the models do.
        let leaf = |heads: usize, len: usize| {
            Tensor::<4>::random([b, len, heads, d], Distribution::Normal(0.0, 1.0), &device)
                .require_grad()
        };
        let (q, k, v) = (leaf(h, q_len), leaf(kvh, kv_len), leaf(kvh, kv_len));
        let weights = Tensor::<4>::random([b, h, q_len, d], Distribution::Default, &device);
        let run = |fused: bool| {
            let args = (
                q.clone().swap_dims(1, 2),
                k.clone().swap_dims(1, 2),
                v.clone().swap_dims(1, 2),
            );
            let out = if fused {
                attend(args.0, args.1, args.2, 0.3, Some(bias.clone()), &allowed)
            } else {
                composed_attend(
                    args.0,
                    args.1,
                    args.2,
                    0.3,
                    Some(bias.clone()),
                    None,
                    &allowed,
                )
            };
            let grads = (out.clone() * weights.clone()).sum().backward();
            let g = |t: &Tensor<4>| t.grad(&grads).unwrap();
            (out.inner(), g(&q), g(&k), g(&v))
        };
        let (fused, composed) = (run(true), run(false));
        let diff = |a: Tensor<4>, b: Tensor<4>| -> f32 { (a - b).abs().max().into_scalar() };
        assert!(diff(fused.0, composed.0) < 1e-5, "outputs differ");
        assert!(diff(fused.1, composed.1) < 1e-5, "∂q differs");
        assert!(diff(fused.2, composed.2) < 1e-5, "∂k differs");
        assert!(diff(fused.3, composed.3) < 1e-5, "∂v differs");
    }

    /// Attention over a fused qkv projection equals the composed attention of its three
    /// slices: output and the gradient of the projection, with ALiBi and left padding.
    #[test]
    fn packed_qkv_attention_matches_the_composed_one() {
        let device = Device::flex().autodiff();
        // 70 positions: three blocks of the kernel's 32 query rows.
        let (b, s, h, d) = (2, 70, 4, 8);
        let padded = [vec![0i64, 0], vec![1i64; s - 2]].concat();
        let mask = Tensor::<2, Int>::from_data(
            TensorData::new([vec![1i64; s], padded].concat(), [b, s]),
            &device,
        );
        let allowed = attention_allowed(&mask, s);
        let slopes = Tensor::<1>::from_data([0.5f32, 0.25, 0.125, 0.0625], &device);
        let bias =
            mask.clone().cumsum(1).float().reshape([b, 1, 1, s]) * slopes.reshape([1, h, 1, 1]);
        let qkv = Tensor::<5>::random([b, s, h, 3, d], Distribution::Normal(0.0, 1.0), &device)
            .require_grad();
        let weights = Tensor::<4>::random([b, h, s, d], Distribution::Default, &device);
        let run = |fused: bool| {
            let out = if fused {
                attend_packed(qkv.clone(), 0.3, Some(bias.clone()), &allowed)
            } else {
                let [q, k, v] = split_qkv(&qkv);
                composed_attend(q, k, v, 0.3, Some(bias.clone()), None, &allowed)
            };
            let grads = (out.clone() * weights.clone()).sum().backward();
            (out.inner(), qkv.grad(&grads).unwrap())
        };
        let ((out_f, grad_f), (out_c, grad_c)) = (run(true), run(false));
        let diff: f32 = (out_f - out_c).abs().max().into_scalar();
        assert!(diff < 1e-5, "outputs differ by {diff}");
        let diff: f32 = (grad_f - grad_c).abs().max().into_scalar();
        assert!(diff < 1e-5, "∂qkv differs by {diff}");
    }
}
