//! [`WeightLoader`]: Hugging Face tensors into burn layers, each shape checked against the
//! config, each linear layer held as the load options ask (packed f32, bf16/f16 as stored, 4-bit).

use std::sync::Arc;

use burn::module::Param;
use burn::nn::{Embedding, Linear};
use burn::tensor::{Device, Tensor, TensorData};
use peft_core::{
    AdaptableLinear, BaseLinear, ComputeDtype, LayerAdapter, PackedLinear, PackedWeight, PeftError,
    Result, TensorStore, adapter::with_weight_dtype,
};
use peft_ops::device::runs_cpu_kernels;
use peft_ops::half::{HalfDtype, HalfWeight};
use peft_quant::{Quantized4bit, SourceDtype};
use peft_tensors::layout::burn_linear_weight;

use super::{LayerNorm, RmsNorm, TiedHead};

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
