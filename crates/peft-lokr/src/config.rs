//! `LoKrConfig`: PEFT's `adapter_config.json` for LoKr, field for field, and PEFT's
//! factorisation of a layer's dimensions into the Kronecker factors' shapes.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use peft_core::modules::{LayerIndices, LayersPattern, check_pattern_keys, pattern_value};
use peft_core::{ConfigHeader, PeftError, PeftType, Result, TargetModules};

/// PEFT's `LoKrConfig` (a `LycorisConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LokrConfig {
    /// PEFT's shared fields (`peft_type` = `LOKR`, `task_type`,
    /// `base_model_name_or_path`, `inference_mode`).
    #[serde(flatten)]
    pub header: ConfigHeader<LokrConfig>,
    /// Rank of the factors that are decomposed (see [`LokrShape`]).
    #[serde(default = "eight")]
    pub r: usize,
    /// Scale numerator: the update is multiplied by `alpha / r`.
    #[serde(default = "eight_f")]
    pub alpha: f64,
    /// Probability of dropping each output row of the update during training.
    #[serde(default)]
    pub rank_dropout: f64,
    /// Probability of skipping the whole adapter of a layer in a training forward pass.
    #[serde(default)]
    pub module_dropout: f64,
    /// FedPara's effective decomposition of convolutions; these decoders have none, and PEFT
    /// turns it off for linear layers.
    #[serde(default)]
    pub use_effective_conv2d: bool,
    /// Decompose the left Kronecker factor `w1` too (into `lokr_w1_a · lokr_w1_b`) when the rank
    /// is small enough.
    #[serde(default)]
    pub decompose_both: bool,
    /// The factorisation's divider ([`factorization`]); -1 = near the square root.
    #[serde(default = "minus_one")]
    pub decompose_factor: i64,
    /// Divide the kept rows by the share kept under `rank_dropout` (LoKr leaves them as they are
    /// by default; LoHa always rescales).
    #[serde(default)]
    pub rank_dropout_scale: bool,
    /// Modules to adapt; `None` = PEFT's default for the architecture (LoRA's).
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// How the factors start (`true`, `false` or `"lycoris"` in the file).
    #[serde(default)]
    pub init_weights: LokrInit,
    /// Only these layer indices are adapted.
    #[serde(default)]
    pub layers_to_transform: Option<LayerIndices>,
    /// The name of the layer list, for `layers_to_transform`.
    #[serde(default)]
    pub layers_pattern: Option<LayersPattern>,
    /// Per-module rank overrides (pattern → r).
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides (pattern → alpha).
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Modules trained in full and saved with the adapter.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Everything else PEFT writes, kept so that a loaded config saves back unchanged.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// PEFT's `init_weights` for LoKr: which factor starts at zero, so that a fresh adapter is a
/// no-op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LokrInit {
    /// `true`: `w1` (or `lokr_w1_a`) zero, the rest Kaiming-uniform.
    #[default]
    Peft,
    /// `"lycoris"`: `w2` (or `lokr_w2_b`) zero, the rest Kaiming-uniform (the LyCORIS
    /// repository's way).
    Lycoris,
    /// `false`: every factor Kaiming-uniform (the adapter is not a no-op; for tests).
    Random,
}

impl Serialize for LokrInit {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            LokrInit::Peft => s.serialize_bool(true),
            LokrInit::Random => s.serialize_bool(false),
            LokrInit::Lycoris => s.serialize_str("lycoris"),
        }
    }
}

impl<'de> Deserialize<'de> for LokrInit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Bool(true) => Ok(LokrInit::Peft),
            Value::Bool(false) => Ok(LokrInit::Random),
            Value::String(s) if s == "lycoris" => Ok(LokrInit::Lycoris),
            other => Err(serde::de::Error::custom(format!(
                "init_weights must be true, false or \"lycoris\", got {other}"
            ))),
        }
    }
}

fn eight() -> usize {
    8
}
fn eight_f() -> f64 {
    8.0
}
fn minus_one() -> i64 {
    -1
}

/// PEFT keys with no effect on the computation.
const HARMLESS: &[&str] = &["peft_version", "auto_mapping", "revision"];

impl peft_core::MethodConfig for LokrConfig {
    const NAME: &'static str = "LoKrConfig";
    const PEFT_TYPE: PeftType = PeftType::Lokr;

    /// PEFT's checks (a positive rank, `layers_pattern` only with `layers_to_transform`) and the
    /// ranges of the dropouts.
    fn validate(&self, context: &str) -> Result<()> {
        let bad = |field: &str, reason: String| Err(PeftError::config(context, field, reason));
        self.header.check(context)?;
        if self.r == 0 {
            return bad(
                "r",
                "`r` should be a positive integer value but the value passed is 0".into(),
            );
        }
        if let Some((k, _)) = self.rank_pattern.iter().find(|(_, r)| **r == 0) {
            return bad("rank_pattern", format!("rank 0 for `{k}`"));
        }
        for (field, p) in [
            ("rank_dropout", self.rank_dropout),
            ("module_dropout", self.module_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(field, format!("must be in [0, 1), got {p}"));
            }
        }
        if !self.alpha.is_finite() {
            return bad("alpha", "must be finite".into());
        }
        if self.layers_pattern.is_some() && self.layers_to_transform.is_none() {
            return bad(
                "layers_pattern",
                "When `layers_pattern` is specified, `layers_to_transform` must also be \
                 specified."
                    .into(),
            );
        }
        check_pattern_keys(context, "rank_pattern", self.rank_pattern.keys())?;
        check_pattern_keys(context, "alpha_pattern", self.alpha_pattern.keys())?;
        for key in self.other.keys() {
            if !HARMLESS.contains(&key.as_str()) {
                tracing::warn!("{context}: unknown key `{key}` ignored");
            }
        }
        Ok(())
    }
}

impl Default for LokrConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

impl LokrConfig {
    /// The targets: the configured ones, or PEFT's default for `model_type` (LoKr copies
    /// LoRA's table).
    pub fn targets(&self, model_type: &str) -> Result<TargetModules> {
        match &self.target_modules {
            Some(t) => Ok(t.clone()),
            None => peft_core::modules::lora_family_targets("LoKrConfig", model_type),
        }
    }

    /// `(r, alpha)` for the module at `path`, after `rank_pattern` / `alpha_pattern`.
    pub fn rank_and_alpha(&self, path: &str) -> (usize, f64) {
        let r = pattern_value(&self.rank_pattern, path).unwrap_or(self.r);
        let alpha = pattern_value(&self.alpha_pattern, path).unwrap_or(self.alpha);
        (r, alpha)
    }

    /// The factors' shapes for a linear layer `[in → out]` at rank `r`, as PEFT's
    /// `LoKrLayer.update_layer` decides them.
    pub fn shape(&self, d_in: usize, d_out: usize, r: usize) -> LokrShape {
        LokrShape::new(d_in, d_out, r, self.decompose_both, self.decompose_factor)
    }
}

/// How one linear layer `[in → out]` is split: `out = a·b`, `in = c·d`, `ΔW = s · w1 ⊗ w2` with
/// `w1: [a, c]` and `w2: [b, d]`; each factor held whole or as a rank-`r` product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LokrShape {
    /// Rows of `w1` (PEFT's `out_l`).
    pub a: usize,
    /// Rows of `w2` (PEFT's `out_k`).
    pub b: usize,
    /// Columns of `w1` (PEFT's `in_m`).
    pub c: usize,
    /// Columns of `w2` (PEFT's `in_n`).
    pub d: usize,
    /// The rank of the decomposed factors.
    pub r: usize,
    /// `w1` held whole (`lokr_w1: [a, c]`) rather than as `lokr_w1_a: [a, r]` ·
    /// `lokr_w1_b: [r, c]`.
    pub whole_w1: bool,
    /// `w2` held whole (`lokr_w2: [b, d]`) rather than as `lokr_w2_a: [b, r]` ·
    /// `lokr_w2_b: [r, d]`.
    pub whole_w2: bool,
}

impl LokrShape {
    /// PEFT's rule: `w1` is decomposed only with `decompose_both` and `r < max(a, c) / 2`; `w2`
    /// whenever `r < max(b, d) / 2`.
    pub fn new(d_in: usize, d_out: usize, r: usize, decompose_both: bool, factor: i64) -> Self {
        let (c, d) = factorization(d_in, factor);
        let (a, b) = factorization(d_out, factor);
        // PEFT compares `r < max(...) / 2` in floating point.
        let small = |x: usize, y: usize| (r as f64) < x.max(y) as f64 / 2.0;
        Self {
            a,
            b,
            c,
            d,
            r,
            whole_w1: !(decompose_both && small(a, c)),
            whole_w2: !small(b, d),
        }
    }

    /// The layer's tensors with their shapes, in PEFT's order.
    pub fn tensors(&self) -> Vec<(&'static str, [usize; 2])> {
        let mut out = Vec::with_capacity(4);
        if self.whole_w1 {
            out.push(("lokr_w1", [self.a, self.c]));
        } else {
            out.push(("lokr_w1_a", [self.a, self.r]));
            out.push(("lokr_w1_b", [self.r, self.c]));
        }
        if self.whole_w2 {
            out.push(("lokr_w2", [self.b, self.d]));
        } else {
            out.push(("lokr_w2_a", [self.b, self.r]));
            out.push(("lokr_w2_b", [self.r, self.d]));
        }
        out
    }
}

/// PEFT's `factorization(dimension, factor)`: `dimension = m · n` with `m ≤ n`, `m` the divider
/// `factor` when it divides, else the largest divider not above `factor` (any, for -1: near the
/// square root) reached by PEFT's search from 1 upwards.
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dimension.is_multiple_of(factor as usize) {
        // PEFT returns this pair unsorted.
        return (factor as usize, dimension / factor as usize);
    }
    let factor = if factor == -1 {
        dimension as i64
    } else {
        factor
    };
    let (mut m, mut n) = (1usize, dimension);
    // PEFT fixes `length` before the loop and never updates it.
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while !dimension.is_multiple_of(new_m) {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m as i64 > factor {
            break;
        }
        (m, n) = (new_m, new_n);
    }
    if m > n { (n, m) } else { (m, n) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peft_core::MethodConfig;

    #[test]
    fn factorization_is_pefts() {
        // PEFT's docstring examples, and the shapes of the fixtures' layers.
        assert_eq!(factorization(256, -1), (16, 16));
        assert_eq!(factorization(128, -1), (8, 16));
        assert_eq!(factorization(127, -1), (1, 127));
        assert_eq!(factorization(128, 4), (4, 32));
        assert_eq!(factorization(192, -1), (12, 16));
        assert_eq!(factorization(64, 16), (16, 4));
        // A divider that does not divide: the search stops below it.
        assert_eq!(factorization(64, 3), (2, 32));
        assert_eq!(factorization(64, 0), (1, 64));
        assert_eq!(factorization(1, -1), (1, 1));
    }

    #[test]
    fn the_rank_decides_which_factors_are_decomposed() {
        // 64 → 8·8: r = 4 is not below 8/2, so both stay whole.
        let s = LokrShape::new(64, 64, 4, true, -1);
        assert!(s.whole_w1 && s.whole_w2);
        // r = 2 decomposes w2; w1 only with decompose_both.
        let s = LokrShape::new(64, 192, 2, false, -1);
        assert_eq!((s.a, s.b, s.c, s.d), (12, 16, 8, 8));
        assert!(s.whole_w1 && !s.whole_w2);
        assert_eq!(
            s.tensors(),
            vec![
                ("lokr_w1", [12, 8]),
                ("lokr_w2_a", [16, 2]),
                ("lokr_w2_b", [2, 8])
            ]
        );
        let s = LokrShape::new(64, 192, 2, true, -1);
        assert!(!s.whole_w1 && !s.whole_w2);
    }

    #[test]
    fn defaults_are_pefts() {
        let c = LokrConfig::default();
        assert_eq!(
            (
                c.r,
                c.alpha,
                c.rank_dropout,
                c.module_dropout,
                c.decompose_factor
            ),
            (8, 8.0, 0.0, 0.0, -1)
        );
        assert!(!c.decompose_both && !c.rank_dropout_scale);
        assert_eq!(c.init_weights, LokrInit::Peft);
        assert_eq!(
            c.targets("llama").unwrap(),
            TargetModules::List(vec!["q_proj".into(), "v_proj".into()])
        );
    }

    #[test]
    fn init_weights_reads_and_writes_pefts_three_values() {
        for (json, init) in [
            ("true", LokrInit::Peft),
            ("false", LokrInit::Random),
            ("\"lycoris\"", LokrInit::Lycoris),
        ] {
            let c =
                LokrConfig::from_json(&format!(r#"{{"init_weights": {json}}}"#), "cfg").unwrap();
            assert_eq!(c.init_weights, init);
            let back = serde_json::to_value(&c).unwrap();
            assert_eq!(back["init_weights"].to_string(), json);
        }
        let err = LokrConfig::from_json(r#"{"init_weights": "gaussian"}"#, "cfg")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(r#"init_weights must be true, false or "lycoris", got "gaussian""#),
            "{err}"
        );
    }

    #[test]
    fn bad_values_are_refused_naming_the_key() {
        let err = |json: &str| LokrConfig::from_json(json, "cfg").unwrap_err().to_string();
        assert_eq!(
            err(r#"{"r": 0}"#),
            "cfg: invalid `r`: `r` should be a positive integer value but the value passed is 0"
        );
        assert_eq!(
            err(r#"{"module_dropout": -0.5}"#),
            "cfg: invalid `module_dropout`: must be in [0, 1), got -0.5"
        );
        assert_eq!(
            err(r#"{"peft_type": "LOHA"}"#),
            "cfg: invalid `peft_type`: expected LOKR, found LOHA"
        );
        assert!(err(r#"{"alpha_pattern": {"[": 2}}"#).contains("invalid regex `[`"));
    }
}
