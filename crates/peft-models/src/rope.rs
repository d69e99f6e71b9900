//! Rotary position embeddings and their scaling variants, as transformers 5.24's
//! `modeling_rope_utils` computes them: `default`, `linear`, `dynamic` (NTK-aware), `yarn` and
//! `llama3`.
//!
//! Settings come from either config layout: transformers 4.x writes a top-level `rope_theta`
//! plus `rope_scaling: {rope_type (or type), factor, …}`; transformers 5 writes one
//! `rope_parameters: {rope_type, rope_theta, factor, …}`. Frequencies are computed in f32 as
//! torch does. Each variant gives inverse frequencies `[rotary_dim / 2]` and an attention factor
//! that scales both `cos` and `sin` (only YaRN's differs from 1).
//!
//! `dynamic` depends on the sequence: transformers grows its frequencies once the longest
//! position seen exceeds `max_position_embeddings` and resets them below it; here they are
//! computed per forward pass from `past + seq` (the same values for any single pass or any
//! generation, which only ever grows).

use std::sync::Arc;

use burn::tensor::{Device, Tensor, TensorData};
use serde_json::Value;

use peft_core::{PeftError, Result};

/// A RoPE variant with its parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Position interpolation: frequencies divided by `factor`.
    Linear {
        /// Interpolation factor.
        factor: f32,
    },
    /// NTK-aware scaling of the base once a sequence exceeds `max_position_embeddings`.
    Dynamic {
        /// Scaling factor.
        factor: f32,
        /// Length beyond which the base grows (the config's `max_position_embeddings`).
        max_position_embeddings: usize,
    },
    /// YaRN: interpolation blended with extrapolation per frequency, `cos`/`sin` scaled.
    Yarn {
        /// Scaling factor.
        factor: f32,
        /// Context length of pre-training.
        original_max_position_embeddings: usize,
        /// Rotations marking the fast (extrapolated) end.
        beta_fast: f32,
        /// Rotations marking the slow (interpolated) end.
        beta_slow: f32,
        /// Round the correction range outwards to whole dimensions.
        truncate: bool,
        /// Factor applied to `cos` and `sin`.
        attention_factor: f32,
    },
    /// Llama 3.1's smooth interpolation between scaled low and unscaled high frequencies.
    Llama3 {
        /// Scaling factor of the low frequencies.
        factor: f32,
        /// Wavelengths above `original / low_freq_factor` are fully scaled.
        low_freq_factor: f32,
        /// Wavelengths below `original / high_freq_factor` are left alone.
        high_freq_factor: f32,
        /// Context length of pre-training.
        original_max_position_embeddings: usize,
    },
}

/// Everything a Llama-family model needs to build its rotary tables.
#[derive(Debug, Clone, PartialEq)]
pub struct Rotary {
    /// RoPE base θ.
    pub theta: f64,
    /// Rotated width of each head (`head_dim · partial_rotary_factor`, even).
    pub dim: usize,
    /// The variant.
    pub scaling: RopeScaling,
}

fn number(params: &serde_json::Map<String, Value>, key: &str) -> Option<f64> {
    params.get(key).and_then(Value::as_f64)
}

impl Rotary {
    /// Reads the RoPE settings of a `config.json` (both layouts, see the module docs).
    /// `head_dim` is the model's head width; `context` names the file in errors.
    pub fn from_config(config: &Value, head_dim: usize, context: &str) -> Result<Self> {
        let bad = |field: &str, reason: String| PeftError::config(context, field, reason);
        let empty = serde_json::Map::new();
        let (field, params) = match (config.get("rope_parameters"), config.get("rope_scaling")) {
            (Some(Value::Object(p)), _) => ("rope_parameters", p),
            (_, Some(Value::Object(p))) => ("rope_scaling", p),
            _ => ("rope_parameters", &empty),
        };
        let theta = number(params, "rope_theta")
            .or_else(|| config.get("rope_theta").and_then(Value::as_f64))
            .unwrap_or(10000.0);
        // θ ≤ 0 or beyond f32 gives NaN or infinite tables (θ^(-2i/d)), and every logit NaN.
        if !(theta > 0.0 && theta.is_finite() && (theta as f32).is_finite()) {
            return Err(bad(
                "rope_theta",
                format!("must be a positive, finite number, got {theta}"),
            ));
        }
        let partial = number(params, "partial_rotary_factor")
            .or_else(|| config.get("partial_rotary_factor").and_then(Value::as_f64))
            .unwrap_or(1.0);
        let dim = (head_dim as f64 * partial) as usize;
        if dim == 0 || !dim.is_multiple_of(2) || dim > head_dim {
            return Err(bad(
                "partial_rotary_factor",
                format!(
                    "rotates {dim} of {head_dim} dimensions (needs an even number, at least 2)"
                ),
            ));
        }
        let rope_type = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let max_positions = config
            .get("max_position_embeddings")
            .and_then(Value::as_u64)
            .map(|v| v as usize);
        let factor = || {
            number(params, "factor")
                .filter(|f| *f >= 1.0 || rope_type == "linear" && *f > 0.0)
                .map(|f| f as f32)
                .ok_or_else(|| {
                    bad(
                        &format!("{field}.factor"),
                        format!("`{rope_type}` RoPE needs a `factor` of at least 1"),
                    )
                })
        };
        let original = || {
            number(params, "original_max_position_embeddings")
                .map(|v| v as usize)
                .or(max_positions)
                .filter(|&v| v > 0)
                .ok_or_else(|| {
                    bad(
                        &format!("{field}.original_max_position_embeddings"),
                        format!("`{rope_type}` RoPE needs the pre-training context length"),
                    )
                })
        };
        let scaling = match rope_type {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear { factor: factor()? },
            "dynamic" => RopeScaling::Dynamic {
                factor: factor()?,
                max_position_embeddings: max_positions.filter(|&v| v > 0).ok_or_else(|| {
                    bad(
                        "max_position_embeddings",
                        "`dynamic` RoPE needs max_position_embeddings".into(),
                    )
                })?,
            },
            "yarn" => {
                let original = original()?;
                // transformers: without a `factor`, the ratio of the two context lengths.
                let factor = match (number(params, "factor"), max_positions) {
                    (None, Some(max)) => max as f32 / original as f32,
                    _ => factor()?,
                };
                let mscale = |scale: f32, m: f32| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                let attention_factor = match (
                    number(params, "attention_factor"),
                    number(params, "mscale"),
                    number(params, "mscale_all_dim"),
                ) {
                    (Some(a), _, _) => a as f32,
                    (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                        mscale(factor, m as f32) / mscale(factor, all as f32)
                    }
                    _ => mscale(factor, 1.0),
                };
                RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: original,
                    beta_fast: number(params, "beta_fast").unwrap_or(32.0) as f32,
                    beta_slow: number(params, "beta_slow").unwrap_or(1.0) as f32,
                    truncate: params
                        .get("truncate")
                        .and_then(Value::as_bool)
                        .unwrap_or(true),
                    attention_factor,
                }
            }
            "llama3" => {
                let get = |key: &str| {
                    number(params, key).map(|v| v as f32).ok_or_else(|| {
                        bad(&format!("{field}.{key}"), "`llama3` RoPE needs it".into())
                    })
                };
                let (low, high) = (get("low_freq_factor")?, get("high_freq_factor")?);
                if high <= low {
                    return Err(bad(
                        &format!("{field}.high_freq_factor"),
                        format!("must exceed low_freq_factor ({high} ≤ {low})"),
                    ));
                }
                RopeScaling::Llama3 {
                    factor: factor()?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: original()?,
                }
            }
            other => {
                return Err(bad(
                    &format!("{field}.rope_type"),
                    format!(
                        "`{other}` is not supported (default, linear, dynamic, yarn, llama3 are)"
                    ),
                ));
            }
        };
        Ok(Self {
            theta,
            dim,
            scaling,
        })
    }

    /// Plain RoPE over the whole head.
    pub fn plain(theta: f64, head_dim: usize) -> Self {
        Self {
            theta,
            dim: head_dim,
            scaling: RopeScaling::Default,
        }
    }

    /// Inverse frequencies `[dim / 2]` and the factor on `cos`/`sin` for a pass whose last
    /// position is `seq_len - 1`.
    pub fn frequencies(&self, seq_len: usize) -> (Vec<f32>, f32) {
        let base = default_inv_freq(self.theta as f32, self.dim);
        match &self.scaling {
            RopeScaling::Default => (base, 1.0),
            RopeScaling::Linear { factor } => (base.iter().map(|f| f / factor).collect(), 1.0),
            RopeScaling::Dynamic {
                factor,
                max_position_embeddings,
            } => {
                if seq_len <= *max_position_embeddings {
                    return (base, 1.0);
                }
                let d = self.dim as f64;
                let ratio = factor * seq_len as f32 / *max_position_embeddings as f32;
                let exponent = (d / (d - 2.0)) as f32;
                let theta = self.theta as f32 * (ratio - (factor - 1.0)).powf(exponent);
                (default_inv_freq(theta, self.dim), 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate,
                attention_factor,
            } => {
                let d = self.dim as f32;
                let correction_dim = |rotations: f32| {
                    d * (*original_max_position_embeddings as f32
                        / (rotations * 2.0 * std::f32::consts::PI))
                        .ln()
                        / (2.0 * (self.theta as f32).ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
                if low == high {
                    high += 0.001;
                }
                let inv = base
                    .iter()
                    .enumerate()
                    .map(|(i, &extrapolated)| {
                        let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                        let keep = 1.0 - ramp;
                        let interpolated = extrapolated / factor;
                        interpolated * (1.0 - keep) + extrapolated * keep
                    })
                    .collect();
                (inv, *attention_factor)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f32;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let inv = base
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen > low_wavelen {
                            f / factor
                        } else if wavelen < high_wavelen {
                            f
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect();
                (inv, 1.0)
            }
        }
    }
}

/// `1 / θ^(2i/d)` for `i < d/2`, in f32 as torch computes `base ** (arange(0, d, 2) / d)`.
pub fn default_inv_freq(theta: f32, dim: usize) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / dim as f32))
        .collect()
}

/// Rotary tables for one forward pass, as tensors and, for the fused CPU operation, on the host.
pub struct RopeTables {
    /// `[1 or batch, 1, seq, rotary_dim]`.
    cos: Tensor<4>,
    /// `[1 or batch, 1, seq, rotary_dim]`.
    sin: Tensor<4>,
    /// `cos` and `sin` on the host, when every row shares its positions.
    host: Option<HostTables>,
}

/// `cos` and `sin` as `[seq, rotary_dim]` values (the fused operation's layout).
struct HostTables {
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
}

impl RopeTables {
    /// The tables of a pass over positions `start .. start + seq` of a model with `rotary`.
    pub fn for_pass(rotary: &Rotary, start: usize, seq: usize, device: &Device) -> Self {
        let (inv_freq, scale) = rotary.frequencies(start + seq);
        Self::new(&inv_freq, scale, start, seq, device)
    }

    /// The tables of a pass whose row `b` has positions `positions[b · seq .. (b + 1) · seq]`
    /// (transformers' `position_ids`): `[batch, 1, seq, rotary_dim]`, for rows of different
    /// lengths sharing a batch. Scalings that depend on the length (dynamic NTK) take the
    /// largest position of the batch.
    pub fn for_positions(
        rotary: &Rotary,
        positions: &[usize],
        batch: usize,
        device: &Device,
    ) -> Self {
        let seq = positions.len() / batch.max(1);
        let longest = positions.iter().max().map_or(0, |&p| p + 1);
        let (inv_freq, scale) = rotary.frequencies(longest);
        let (cos, sin) = tables(&inv_freq, scale, positions.iter().copied());
        let hd = 2 * inv_freq.len();
        let make =
            |v: Vec<f32>| Tensor::<4>::from_data(TensorData::new(v, [batch, 1, seq, hd]), device);
        RopeTables {
            cos: make(cos),
            sin: make(sin),
            host: None,
        }
    }

    fn new(inv_freq: &[f32], scale: f32, start: usize, seq: usize, device: &Device) -> Self {
        let hd = 2 * inv_freq.len();
        let (cos, sin) = tables(inv_freq, scale, start..start + seq);
        let make = |v: &Vec<f32>| {
            Tensor::<4>::from_data(TensorData::new(v.clone(), [1, 1, seq, hd]), device)
        };
        RopeTables {
            cos: make(&cos),
            sin: make(&sin),
            host: Some(HostTables {
                cos: Arc::new(cos),
                sin: Arc::new(sin),
            }),
        }
    }
}

/// `cos` and `sin` rows (`[positions, 2 · inv_freq.len()]`, each angle serving both halves of a
/// head), multiplied by `scale` (YaRN's attention factor).
fn tables(
    inv_freq: &[f32],
    scale: f32,
    positions: impl ExactSizeIterator<Item = usize>,
) -> (Vec<f32>, Vec<f32>) {
    let hd = 2 * inv_freq.len();
    let mut cos = Vec::with_capacity(positions.len() * hd);
    let mut sin = Vec::with_capacity(positions.len() * hd);
    for pos in positions {
        let angles: Vec<f32> = inv_freq.iter().map(|f| pos as f32 * f).collect();
        for _ in 0..2 {
            cos.extend(angles.iter().map(|a| a.cos() * scale));
            sin.extend(angles.iter().map(|a| a.sin() * scale));
        }
    }
    (cos, sin)
}

/// `x · cos + rotate_half(x) · sin` on `[b, heads, seq, head_dim]`: one fused operation on the
/// CPU backend, burn operations elsewhere. Where the tables are narrower than a head (Phi-3's
/// `partial_rotary_factor`), only the leading columns rotate and the rest pass through.
pub fn apply_rope(x: Tensor<4>, rope: &RopeTables) -> Tensor<4> {
    let [.., hd] = x.dims();
    let rotated = rope.cos.dims()[3];
    if rotated < hd {
        let head = apply_rope(x.clone().narrow(3, 0, rotated), rope);
        return Tensor::cat(vec![head, x.narrow(3, rotated, hd - rotated)], 3);
    }
    match &rope.host {
        Some(host) => peft_ops::fused::rope(x.clone(), &host.cos, &host.sin)
            .unwrap_or_else(|| composed_rope(x, rope)),
        None => composed_rope(x, rope),
    }
}

/// [`apply_rope`] from burn operations (any backend).
fn composed_rope(x: Tensor<4>, rope: &RopeTables) -> Tensor<4> {
    let half = x.dims()[3] / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * rope.cos.clone() + rotated * rope.sin.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused rotary embedding equals the composed formula, value and gradient, on the
    /// strided `[b, heads, seq, head_dim]` view the layers pass it.
    #[test]
    fn fused_rope_matches_the_composed_one() {
        use burn::tensor::Distribution;
        let device = Device::flex().autodiff();
        let (b, s, h, hd) = (2, 5, 3, 8);
        let rope = RopeTables::new(&default_inv_freq(10000.0, hd), 1.0, 3, s, &device);
        let x = Tensor::<4>::random([b, s, h, hd], Distribution::Default, &device).require_grad();
        let r = Tensor::<4>::random([b, h, s, hd], Distribution::Default, &device);
        let fused = apply_rope(x.clone().swap_dims(1, 2), &rope);
        let composed = composed_rope(x.clone().swap_dims(1, 2), &rope);
        let diff: f32 = (fused.clone() - composed.clone()).abs().max().into_scalar();
        assert!(diff < 1e-6, "values differ by {diff}");
        let gf = x.grad(&(fused * r.clone()).sum().backward()).unwrap();
        let gc = x.grad(&(composed * r).sum().backward()).unwrap();
        let diff: f32 = (gf - gc).abs().max().into_scalar();
        assert!(diff < 1e-6, "gradients differ by {diff}");
    }

    fn rotary(json: &str) -> Result<Rotary> {
        Rotary::from_config(&serde_json::from_str(json).unwrap(), 64, "config.json")
    }

    #[test]
    fn both_config_layouts_give_the_same_settings() {
        let v4 = rotary(
            r#"{"rope_theta": 500000.0, "max_position_embeddings": 131072, "rope_scaling":
                {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#,
        )
        .unwrap();
        let v5 = rotary(
            r#"{"max_position_embeddings": 131072, "rope_parameters":
                {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}}"#,
        )
        .unwrap();
        assert_eq!(v4, v5);
        assert_eq!(v4.theta, 500000.0);
        let legacy = rotary(r#"{"rope_scaling": {"type": "linear", "factor": 2.0}}"#).unwrap();
        assert_eq!(legacy.scaling, RopeScaling::Linear { factor: 2.0 });
    }

    /// Llama 3.1's rule by hand: high frequencies untouched, low ones divided by the factor,
    /// the band between blended.
    #[test]
    fn llama3_scales_low_frequencies_only() {
        let r = rotary(
            r#"{"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                "rope_theta": 500000.0}"#,
        )
        .unwrap();
        let base = default_inv_freq(500000.0, 64);
        let (inv, scale) = r.frequencies(10);
        assert_eq!(scale, 1.0);
        assert_eq!(inv[0], base[0], "the highest frequency is kept");
        assert_eq!(
            inv[31],
            base[31] / 8.0,
            "the lowest is divided by the factor"
        );
        let mid = (0..32)
            .find(|&i| {
                let w = 2.0 * std::f32::consts::PI / base[i];
                w > 2048.0 && w < 8192.0
            })
            .unwrap();
        assert!(inv[mid] < base[mid] && inv[mid] > base[mid] / 8.0);
    }

    #[test]
    fn dynamic_grows_the_base_past_the_context() {
        let r = rotary(
            r#"{"max_position_embeddings": 16, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}"#,
        )
        .unwrap();
        assert_eq!(r.frequencies(16).0, default_inv_freq(10000.0, 64));
        // seq 32: base · (2·32/16 − 1)^(64/62).
        let theta = 10000f32 * 3f32.powf(64.0 / 62.0);
        assert_eq!(r.frequencies(32).0, default_inv_freq(theta, 64));
    }

    #[test]
    fn yarn_blends_and_scales() {
        let r = rotary(
            r#"{"max_position_embeddings": 64, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#,
        )
        .unwrap();
        let (inv, scale) = r.frequencies(8);
        assert!((scale - (0.1 * 4f32.ln() + 1.0)).abs() < 1e-7);
        let base = default_inv_freq(10000.0, 64);
        assert_eq!(inv[0], base[0], "fast dimensions extrapolate");
        assert_eq!(inv[31], base[31] / 4.0, "slow dimensions interpolate");
    }

    #[test]
    fn unsupported_or_incomplete_settings_are_refused() {
        let err = rotary(r#"{"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`longrope` is not supported"), "{err}");
        let err = rotary(r#"{"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("rope_scaling.low_freq_factor"), "{err}");
        let err = rotary(r#"{"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_position_embeddings"), "{err}");
        let err = rotary(r#"{"partial_rotary_factor": 0.01}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("partial_rotary_factor"), "{err}");
        // θ that would make the tables NaN or infinite, in either layout.
        for bad in [
            r#"{"rope_theta": 0.0}"#,
            r#"{"rope_theta": -10000.0}"#,
            r#"{"rope_theta": 1e300}"#,
            r#"{"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}"#,
        ] {
            let err = rotary(bad).unwrap_err().to_string();
            assert!(
                err.contains("rope_theta") && err.contains("positive, finite"),
                "{bad}: {err}"
            );
        }
        let (freqs, _) = rotary(r#"{"rope_theta": 500000.0}"#)
            .unwrap()
            .frequencies(16);
        assert!(freqs.iter().all(|f| f.is_finite() && *f > 0.0));
    }
}
