//! bitsandbytes' serialised form of a 4-bit tensor, as transformers saves a
//! `BitsAndBytesConfig(load_in_4bit=True)` model and as `peft quantize` writes it.
//!
//! For a tensor `NAME`: `NAME` (packed codes, u8 `[ceil(numel/2), 1]`), `NAME.absmax` (f32, or u8
//! codes with double quantisation), `NAME.quant_map` (the 16 code values), with double
//! quantisation `NAME.nested_absmax` and `NAME.nested_quant_map`, and
//! `NAME.quant_state.bitsandbytes__nf4|fp4`: the remaining fields as the UTF-8 bytes of
//! `json.dumps` of a dict.

use peft_tensors::HostTensor;
use safetensors::Dtype;
use serde_json::Value;

use crate::block::{Absmax, NESTED_BLOCKSIZE, Quantized4bit, SourceDtype, check_blocksize};
use crate::error::{QuantError, Result};

/// The suffixes of the extra tensors stored beside a 4-bit `NAME`.
pub const COMPONENT_SUFFIXES: [&str; 4] =
    ["absmax", "quant_map", "nested_absmax", "nested_quant_map"];

/// The key of the packed quant-state JSON for `name`, whichever quant type it holds.
pub fn quant_state_key(name: &str, quant_type: &str) -> String {
    format!("{name}.quant_state.bitsandbytes__{quant_type}")
}

/// Whether `key` is one of the tensors of a 4-bit layout other than the packed weight itself.
pub fn is_component_key(key: &str) -> bool {
    COMPONENT_SUFFIXES
        .iter()
        .any(|s| key.ends_with(&format!(".{s}")))
        || key.contains(".quant_state.bitsandbytes__")
}

/// Finds the quant-state key of `name` among `keys`, if `name` is stored in 4-bit form.
pub fn find_quant_state<'a>(
    name: &str,
    mut keys: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    let prefix = format!("{name}.quant_state.bitsandbytes__");
    keys.find(|k| k.starts_with(&prefix))
}

fn u8_tensor(shape: Vec<usize>, bytes: Vec<u8>) -> HostTensor {
    HostTensor {
        dtype: Dtype::U8,
        shape,
        data: bytes,
    }
}

/// A float as Python's `repr` prints it (`json.dumps` uses the same form): the shortest digits
/// that round-trip, positional from 1e-4 to below 1e16, scientific (`1e-05`) outside.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let sci = format!("{x:e}");
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if negative { "-" } else { "" };
    if (-4..16).contains(&exponent) {
        let point = exponent + 1;
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            let (int, frac) = digits.split_at(point as usize);
            format!("{int}.{frac}")
        };
        format!("{sign}{body}")
    } else {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exponent < 0 { '-' } else { '+' };
        format!("{sign}{first}{frac}e{esign}{:02}", exponent.abs())
    }
}

impl Quantized4bit {
    /// The JSON bitsandbytes packs into `quant_state.bitsandbytes__*`, byte for byte.
    pub fn quant_state_json(&self) -> String {
        let shape = self
            .shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let mut json = format!(
            "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
            self.quant_type.as_str(),
            self.blocksize,
            self.dtype.as_str(),
            shape
        );
        if let Absmax::Nested { offset, .. } = &self.absmax {
            json.push_str(&format!(
                ", \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                python_float_repr(*offset as f64)
            ));
        }
        json.push('}');
        json
    }

    /// The tensors of bitsandbytes' layout for `name`.
    pub fn to_tensors(&self, name: &str) -> Vec<(String, HostTensor)> {
        let mut out = vec![(
            name.to_string(),
            u8_tensor(vec![self.packed.len(), 1], self.packed.clone()),
        )];
        let values = self.quant_type.codebook().values;
        match &self.absmax {
            Absmax::Plain(absmax) => {
                out.push((
                    format!("{name}.absmax"),
                    HostTensor::from_f32(vec![absmax.len()], absmax),
                ));
                out.push((
                    format!("{name}.quant_map"),
                    HostTensor::from_f32(vec![16], &values),
                ));
            }
            Absmax::Nested {
                codes,
                nested_absmax,
                map,
                ..
            } => {
                out.push((
                    format!("{name}.absmax"),
                    u8_tensor(vec![codes.len()], codes.clone()),
                ));
                out.push((
                    format!("{name}.quant_map"),
                    HostTensor::from_f32(vec![16], &values),
                ));
                out.push((
                    format!("{name}.nested_absmax"),
                    HostTensor::from_f32(vec![nested_absmax.len()], nested_absmax),
                ));
                out.push((
                    format!("{name}.nested_quant_map"),
                    HostTensor::from_f32(vec![256], map.as_slice()),
                ));
            }
        }
        let json = self.quant_state_json().into_bytes();
        out.push((
            quant_state_key(name, self.quant_type.as_str()),
            u8_tensor(vec![json.len()], json),
        ));
        out
    }

    /// Reads `name` back from bitsandbytes' layout; `get` returns a stored tensor by key.
    /// Every size is checked against the shape and block size in the quant state.
    pub fn from_tensors(
        name: &str,
        state_key: &str,
        mut get: impl FnMut(&str) -> Option<HostTensor>,
    ) -> Result<Self> {
        let invalid = |reason: String| QuantError::InvalidQuantState {
            name: name.to_string(),
            reason,
        };
        let mut fetch = |suffix: &str| {
            let key = if suffix.is_empty() {
                name.to_string()
            } else {
                format!("{name}.{suffix}")
            };
            get(&key).ok_or(QuantError::MissingComponent {
                name: name.to_string(),
                key,
            })
        };
        let state = fetch(
            state_key
                .strip_prefix(&format!("{name}."))
                .unwrap_or(state_key),
        )?;
        let json: Value =
            serde_json::from_slice(&state.data).map_err(|e| invalid(format!("not JSON: {e}")))?;
        let field = |key: &str| {
            json.get(key)
                .ok_or_else(|| invalid(format!("missing `{key}`")))
        };
        let quant_type: crate::QuantType = field("quant_type")?
            .as_str()
            .ok_or_else(|| invalid("`quant_type` is not a string".into()))?
            .parse()?;
        if !state_key.ends_with(quant_type.as_str()) {
            return Err(invalid(format!(
                "key `{state_key}` disagrees with quant_type `{}`",
                quant_type.as_str()
            )));
        }
        let blocksize = field("blocksize")?
            .as_u64()
            .ok_or_else(|| invalid("`blocksize` is not a positive integer".into()))?
            as usize;
        check_blocksize(blocksize)?;
        let dtype: SourceDtype = field("dtype")?
            .as_str()
            .ok_or_else(|| invalid("`dtype` is not a string".into()))?
            .parse()?;
        let shape: Vec<usize> = field("shape")?
            .as_array()
            .ok_or_else(|| invalid("`shape` is not a list".into()))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| invalid("`shape` holds a non-integer".into()))?;
        shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| invalid(format!("shape {shape:?} is too large")))?;

        let packed = fetch("")?;
        if packed.dtype != Dtype::U8 {
            return Err(invalid(format!(
                "packed weight has dtype {:?}, expected U8",
                packed.dtype
            )));
        }
        let absmax_t = fetch("absmax")?;
        let absmax = match json.get("nested_offset") {
            None if absmax_t.dtype == Dtype::U8 => {
                return Err(invalid(
                    "`absmax` holds U8 codes but the state has no `nested_offset`".into(),
                ));
            }
            None => Absmax::Plain(f32_values(name, "absmax", &absmax_t)?),
            Some(offset) => {
                let offset = offset
                    .as_f64()
                    .ok_or_else(|| invalid("`nested_offset` is not a number".into()))?
                    as f32;
                if let Some(b) = json.get("nested_blocksize")
                    && b.as_u64() != Some(NESTED_BLOCKSIZE as u64)
                {
                    return Err(invalid(format!(
                        "nested_blocksize {b} (only {NESTED_BLOCKSIZE} is supported)"
                    )));
                }
                if absmax_t.dtype != Dtype::U8 {
                    return Err(invalid(
                        "double-quantised absmax must be stored as U8 codes".into(),
                    ));
                }
                let nested_absmax = f32_values(name, "nested_absmax", &fetch("nested_absmax")?)?;
                let map_values = f32_values(name, "nested_quant_map", &fetch("nested_quant_map")?)?;
                let map: [f32; 256] =
                    map_values
                        .try_into()
                        .map_err(|v: Vec<f32>| QuantError::SizeMismatch {
                            name: name.to_string(),
                            what: "nested_quant_map",
                            found: v.len(),
                            expected: 256,
                        })?;
                Absmax::Nested {
                    codes: absmax_t.data,
                    nested_absmax,
                    offset,
                    map: Box::new(map),
                }
            }
        };
        let q = Quantized4bit {
            packed: packed.data,
            absmax,
            shape,
            dtype,
            blocksize,
            quant_type,
        };
        q.validate(name)?;
        Ok(q)
    }
}

fn f32_values(name: &str, what: &'static str, t: &HostTensor) -> Result<Vec<f32>> {
    peft_tensors::bytes_to_f32(t.dtype, &t.data).ok_or_else(|| QuantError::InvalidQuantState {
        name: name.to_string(),
        reason: format!("`{what}` has dtype {:?}, expected a float type", t.dtype),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{QuantConfig, QuantType};
    use std::collections::HashMap;

    #[test]
    fn python_repr_of_floats() {
        assert_eq!(python_float_repr(2.8534767627716064), "2.8534767627716064");
        assert_eq!(python_float_repr(0.1), "0.1");
        assert_eq!(python_float_repr(3.0), "3.0");
        assert_eq!(python_float_repr(1e-5), "1e-05");
        assert_eq!(python_float_repr(0.0001), "0.0001");
        assert_eq!(python_float_repr(-1.5e-7), "-1.5e-07");
        assert_eq!(python_float_repr(1e16), "1e+16");
        assert_eq!(python_float_repr(123456.0), "123456.0");
        assert_eq!(python_float_repr(0.0), "0.0");
    }

    fn round_trip(config: QuantConfig) {
        let values: Vec<f32> = (0..300).map(|i| ((i * 7919) % 113) as f32 - 56.0).collect();
        let q = Quantized4bit::quantize(&values, &[3, 100], SourceDtype::Bf16, config).unwrap();
        let map: HashMap<String, HostTensor> = q.to_tensors("w").into_iter().collect();
        let key = find_quant_state("w", map.keys().map(|k| k.as_str())).unwrap();
        let back = Quantized4bit::from_tensors("w", key, |k| map.get(k).cloned()).unwrap();
        assert_eq!(back, q);
    }

    #[test]
    fn layout_round_trips() {
        for quant_type in [QuantType::Nf4, QuantType::Fp4] {
            for double_quant in [false, true] {
                round_trip(QuantConfig {
                    quant_type,
                    blocksize: 64,
                    double_quant,
                });
            }
        }
    }

    #[test]
    fn corrupted_state_is_named() {
        let config = QuantConfig {
            double_quant: false,
            ..QuantConfig::default()
        };
        let q = Quantized4bit::quantize(&[1.0; 64], &[8, 8], SourceDtype::F32, config).unwrap();
        let mut map: HashMap<String, HostTensor> = q.to_tensors("w").into_iter().collect();
        let key = "w.quant_state.bitsandbytes__nf4";
        map.get_mut(key).unwrap().data = b"{\"quant_type\": \"nf4\"".to_vec();
        let err = Quantized4bit::from_tensors("w", key, |k| map.get(k).cloned())
            .unwrap_err()
            .to_string();
        assert!(err.contains("`w`") && err.contains("not JSON"), "{err}");

        map.get_mut(key).unwrap().data =
            br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [8, 16]}"#
                .to_vec();
        let err = Quantized4bit::from_tensors("w", key, |k| map.get(k).cloned())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("packed weight has 32 elements, expected 64"),
            "{err}"
        );

        map.remove("w.absmax");
        let err = Quantized4bit::from_tensors("w", key, |k| map.get(k).cloned())
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing `w.absmax`"), "{err}");

        let nested = Quantized4bit::quantize(
            &[1.0; 64],
            &[8, 8],
            SourceDtype::F32,
            QuantConfig::default(),
        )
        .unwrap();
        let mut map: HashMap<String, HostTensor> = nested.to_tensors("w").into_iter().collect();
        map.get_mut(key).unwrap().data =
            br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [8, 8]}"#
                .to_vec();
        let err = Quantized4bit::from_tensors("w", key, |k| map.get(k).cloned())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no `nested_offset`"), "{err}");
    }
}
