//! # peft-ptuning
//!
//! P-tuning (Liu et al., 2021) with Hugging Face PEFT parity: virtual tokens re-encoded by an
//! MLP (`Linear(d,h) → ReLU → Linear(h,h) → ReLU → Linear(h,d)`, PEFT's `mlp_head.0/.2/.4`) or a
//! bidirectional LSTM (`encoder_num_layers` layers, dropout between them, PyTorch's `nn.LSTM`
//! weight layout, `lstm_head.*_l{k}[_reverse]`) followed by `Linear(2h,2h) → ReLU → Linear(2h,d)`,
//! then put before the input embeddings like prompt tuning (peft-core's
//! [`VirtualTokens`]).
//!
//! PEFT's `adapter_model.safetensors` holds only the encoder's output (`prompt_embeddings`);
//! peft-rs also writes the encoder's weights, under PEFT's state-dict names, to
//! `adapter_encoder.safetensors`, so that training can resume. A folder without it loads as a
//! table, as PEFT does in inference mode. As in PEFT, `encoder_num_layers` is ignored (with a
//! warning) for the MLP, which always has three layers.

use peft_core::MethodConfig;
use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig};
use burn::tensor::activation::{relu, sigmoid};
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use peft_core::adapter_files::{CONFIG_NAME, WEIGHTS_NAME, save_adapter};
use peft_core::params::{ParamUpdate, map_params, named_params};
use peft_core::prompt_learning::{VirtualTokenEncoder, VirtualTokens};
use peft_core::{
    AdapterModel, CausalLm, ConfigHeader, HostTensor, ModelSpec, NoAdapter, PeftError, PeftType,
    Result, TensorStore, TrainableSummary,
};
use peft_tensors::save_safetensors;

/// The file peft-rs writes beside PEFT's with the encoder's weights.
pub const ENCODER_NAME: &str = "adapter_encoder.safetensors";

/// PEFT's `encoder_reparameterization_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum EncoderType {
    /// Three linear layers with ReLU.
    #[default]
    #[serde(rename = "MLP")]
    Mlp,
    /// A bidirectional LSTM and two linear layers.
    #[serde(rename = "LSTM")]
    Lstm,
}

/// PEFT's `PromptEncoderConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptEncoderConfig {
    /// PEFT's shared fields (`peft_type` = `P_TUNING`, `task_type`,
    /// `base_model_name_or_path`, `inference_mode`).
    #[serde(flatten)]
    pub header: ConfigHeader<PromptEncoderConfig>,
    /// Number of virtual tokens.
    #[serde(default)]
    pub num_virtual_tokens: usize,
    /// The model's hidden size (filled in).
    #[serde(default)]
    pub token_dim: Option<usize>,
    /// 1 for decoder-only models.
    #[serde(default)]
    pub num_transformer_submodules: Option<usize>,
    /// The model's attention heads (recorded as PEFT does).
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    /// The model's layers (recorded as PEFT does).
    #[serde(default)]
    pub num_layers: Option<usize>,
    /// MLP or LSTM.
    #[serde(default)]
    pub encoder_reparameterization_type: EncoderType,
    /// Hidden width of the encoder (default: the model's hidden size).
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    /// LSTM layers (ignored for the MLP, as in PEFT).
    #[serde(default = "two")]
    pub encoder_num_layers: usize,
    /// Dropout between LSTM layers.
    #[serde(default)]
    pub encoder_dropout: f64,
    /// Everything else PEFT writes.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

fn two() -> usize {
    2
}

impl peft_core::MethodConfig for PromptEncoderConfig {
    const NAME: &'static str = "PromptEncoderConfig";
    const PEFT_TYPE: PeftType = PeftType::PTuning;

    /// Checks the values.
    fn validate(&self, context: &str) -> Result<()> {
        let bad = |field: &str, reason: &str| Err(PeftError::config(context, field, reason));
        self.header.check(context)?;
        if self.num_virtual_tokens == 0 {
            return bad("num_virtual_tokens", "must be at least 1");
        }
        if self.encoder_hidden_size == Some(0) || self.encoder_num_layers == 0 {
            return bad(
                "encoder_hidden_size / encoder_num_layers",
                "must be at least 1",
            );
        }
        if !(0.0..1.0).contains(&self.encoder_dropout) {
            return bad("encoder_dropout", "must be in [0, 1)");
        }
        if self.encoder_reparameterization_type == EncoderType::Mlp && self.encoder_num_layers != 2
        {
            tracing::warn!(
                "{context}: for MLP, encoder_num_layers is ignored; exactly 3 MLP layers are used (as PEFT)"
            );
        }
        Ok(())
    }
}

impl Default for PromptEncoderConfig {
    fn default() -> Self {
        Self {
            num_virtual_tokens: 8,
            ..serde_json::from_str("{}").expect("every field has a default")
        }
    }
}

impl PromptEncoderConfig {}

/// One direction of one LSTM layer, PyTorch's gate order (input, forget, cell, output).
/// burn layout: `w_ih: [in, 4h]`, `w_hh: [h, 4h]`.
#[derive(Module, Debug)]
pub struct LstmDirection {
    /// Input weights.
    pub w_ih: Param<Tensor<2>>,
    /// Recurrent weights.
    pub w_hh: Param<Tensor<2>>,
    /// Input bias `[4h]`.
    pub b_ih: Param<Tensor<1>>,
    /// Recurrent bias `[4h]`.
    pub b_hh: Param<Tensor<1>>,
}

impl LstmDirection {
    /// Runs over `x: [n, in]` (backwards when `reverse`), returning `[n, h]` in input order.
    fn run(&self, x: Tensor<2>, reverse: bool) -> Tensor<2> {
        let [n, _] = x.dims();
        let h_dim = self.w_hh.shape().dims::<2>()[0];
        let device = x.device();
        let mut h = Tensor::<2>::zeros([1, h_dim], &device);
        let mut c = Tensor::<2>::zeros([1, h_dim], &device);
        let bias = (self.b_ih.val() + self.b_hh.val()).reshape([1, 4 * h_dim]);
        let projected = x.matmul(self.w_ih.val()) + bias;
        let mut outputs = vec![None; n];
        let order: Vec<usize> = if reverse {
            (0..n).rev().collect()
        } else {
            (0..n).collect()
        };
        for t in order {
            let gates = projected.clone().slice_dim(0, t..t + 1) + h.matmul(self.w_hh.val());
            let gate = |k: usize| gates.clone().slice_dim(1, k * h_dim..(k + 1) * h_dim);
            let (i, f, g, o) = (
                sigmoid(gate(0)),
                sigmoid(gate(1)),
                gate(2).tanh(),
                sigmoid(gate(3)),
            );
            c = f * c + i * g;
            h = o * c.clone().tanh();
            outputs[t] = Some(h.clone());
        }
        Tensor::cat(
            outputs
                .into_iter()
                .map(|o| o.expect("every step ran"))
                .collect(),
            0,
        )
    }
}

/// One bidirectional layer.
#[derive(Module, Debug)]
pub struct LstmLayer {
    /// Left to right.
    pub forward: LstmDirection,
    /// Right to left (`_reverse` in PyTorch).
    pub reverse: LstmDirection,
}

/// P-tuning's encoder: the embedding of the virtual tokens, re-encoded.
#[derive(Module, Debug)]
pub struct PromptEncoder {
    /// `[n, d]` input embedding (PEFT's `embedding.weight`).
    pub embedding: Param<Tensor<2>>,
    /// Bidirectional LSTM layers (LSTM encoder only).
    pub lstm_head: Vec<LstmLayer>,
    /// Dropout between LSTM layers (training only).
    pub dropout: Dropout,
    /// The linear layers, ReLU between them.
    pub mlp_head: Vec<Linear>,
}

impl VirtualTokenEncoder for PromptEncoder {
    fn virtual_tokens(&self) -> Tensor<2> {
        let mut x = self.embedding.val();
        let layers = self.lstm_head.len();
        for (k, layer) in self.lstm_head.iter().enumerate() {
            let both = Tensor::cat(
                vec![
                    layer.forward.run(x.clone(), false),
                    layer.reverse.run(x, true),
                ],
                1,
            );
            x = if k + 1 < layers {
                self.dropout.forward(both)
            } else {
                both
            };
        }
        let last = self.mlp_head.len().saturating_sub(1);
        for (k, linear) in self.mlp_head.iter().enumerate() {
            x = linear.forward(x);
            if k < last {
                x = relu(x);
            }
        }
        x
    }
}

/// What computes the virtual tokens: the encoder (trainable), or PEFT's saved output (a table).
#[derive(Module, Debug)]
pub struct PTuningEncoder {
    /// The encoder, when its weights are known.
    pub encoder: Option<PromptEncoder>,
    /// PEFT's `prompt_embeddings` when only the output is known.
    pub table: Option<Param<Tensor<2>>>,
}

impl VirtualTokenEncoder for PTuningEncoder {
    fn virtual_tokens(&self) -> Tensor<2> {
        match (&self.encoder, &self.table) {
            (Some(e), _) => e.virtual_tokens(),
            (None, Some(t)) => t.val(),
            (None, None) => unreachable!("a P-tuning encoder holds weights or a table"),
        }
    }
}

/// A frozen model with P-tuning's virtual tokens.
pub type PTuning<M> = VirtualTokens<M, PTuningEncoder>;

/// A P-tuned model and its config.
#[derive(Debug)]
pub struct PTuningModel<M: CausalLm> {
    /// The model with its encoder.
    pub model: PTuning<M>,
    /// The config, sizes filled in.
    pub config: PromptEncoderConfig,
}

fn with_sizes(mut config: PromptEncoderConfig, spec: &ModelSpec) -> PromptEncoderConfig {
    config.token_dim = Some(spec.hidden_size);
    config.num_transformer_submodules = Some(1);
    config.num_attention_heads = Some(spec.num_heads);
    config.num_layers = Some(spec.num_layers);
    config.encoder_hidden_size = Some(config.encoder_hidden_size.unwrap_or(spec.hidden_size));
    config
}

fn uniform(shape: [usize; 2], bound: f64, device: &Device) -> Param<Tensor<2>> {
    Param::from_tensor(Tensor::random(
        shape,
        Distribution::Uniform(-bound, bound),
        device,
    ))
}

fn uniform1(len: usize, bound: f64, device: &Device) -> Param<Tensor<1>> {
    Param::from_tensor(Tensor::random(
        [len],
        Distribution::Uniform(-bound, bound),
        device,
    ))
}

/// A freshly initialised encoder (PyTorch's inits: N(0,1) embedding, U(±1/√h) LSTM, Kaiming-
/// uniform linear layers).
pub fn new_encoder(config: &PromptEncoderConfig, d: usize, device: &Device) -> PromptEncoder {
    let n = config.num_virtual_tokens;
    let h = config.encoder_hidden_size.unwrap_or(d);
    let linear = |i: usize, o: usize| LinearConfig::new(i, o).init(device);
    let (lstm_head, mlp_head) = match config.encoder_reparameterization_type {
        EncoderType::Mlp => (Vec::new(), vec![linear(d, h), linear(h, h), linear(h, d)]),
        EncoderType::Lstm => {
            let bound = 1.0 / (h as f64).sqrt();
            let direction = |input: usize| LstmDirection {
                w_ih: uniform([input, 4 * h], bound, device),
                w_hh: uniform([h, 4 * h], bound, device),
                b_ih: uniform1(4 * h, bound, device),
                b_hh: uniform1(4 * h, bound, device),
            };
            let layers = (0..config.encoder_num_layers)
                .map(|k| {
                    let input = if k == 0 { d } else { 2 * h };
                    LstmLayer {
                        forward: direction(input),
                        reverse: direction(input),
                    }
                })
                .collect();
            (layers, vec![linear(2 * h, 2 * h), linear(2 * h, d)])
        }
    };
    PromptEncoder {
        embedding: Param::from_tensor(Tensor::random(
            [n, d],
            Distribution::Normal(0.0, 1.0),
            device,
        )),
        lstm_head,
        dropout: DropoutConfig::new(config.encoder_dropout).init(),
        mlp_head,
    }
}

fn freeze<M: Module>(model: M) -> M {
    map_params(model, |_, _| ParamUpdate::Trainable(false))
}

/// PEFT's `get_peft_model(model, PromptEncoderConfig(...))`.
pub fn get_peft_model<M: CausalLm<Adapter = NoAdapter>>(
    base: M,
    config: PromptEncoderConfig,
) -> Result<PTuningModel<M>> {
    config.validate("PromptEncoderConfig")?;
    let spec = base.spec().clone();
    let config = with_sizes(config, &spec);
    let encoder = new_encoder(&config, spec.hidden_size, &base.device());
    Ok(PTuningModel {
        model: VirtualTokens {
            base: freeze(base),
            encoder: PTuningEncoder {
                encoder: Some(encoder),
                table: None,
            },
        },
        config,
    })
}

/// Loads an encoder from PyTorch/PEFT state-dict names (`embedding.weight`, `mlp_head.K.*`,
/// `lstm_head.weight_ih_l{k}[_reverse]`, ...).
pub fn load_encoder(
    path: &Path,
    config: &PromptEncoderConfig,
    device: &Device,
) -> Result<PromptEncoder> {
    let store = TensorStore::open(path)?;
    let matrix = |key: &str, transpose: bool| -> Result<Param<Tensor<2>>> {
        let (v, s) = store.f32(key)?;
        let [rows, cols] = [s[0], *s.get(1).unwrap_or(&1)];
        let t = Tensor::<2>::from_data(TensorData::new(v, [rows, cols]), device);
        Ok(Param::from_tensor(if transpose {
            t.transpose()
        } else {
            t
        }))
    };
    let vector = |key: &str| -> Result<Param<Tensor<1>>> {
        let (v, s) = store.f32(key)?;
        Ok(Param::from_tensor(Tensor::from_data(
            TensorData::new(v, [s.iter().product::<usize>()]),
            device,
        )))
    };
    let linear = |k: usize| -> Result<Linear> {
        Ok(Linear {
            weight: matrix(&format!("mlp_head.{k}.weight"), true)?,
            bias: Some(vector(&format!("mlp_head.{k}.bias"))?),
        })
    };
    let (lstm_head, mlp_head) = match config.encoder_reparameterization_type {
        EncoderType::Mlp => (Vec::new(), vec![linear(0)?, linear(2)?, linear(4)?]),
        EncoderType::Lstm => {
            let direction = |suffix: String| -> Result<LstmDirection> {
                Ok(LstmDirection {
                    w_ih: matrix(&format!("lstm_head.weight_ih_{suffix}"), true)?,
                    w_hh: matrix(&format!("lstm_head.weight_hh_{suffix}"), true)?,
                    b_ih: vector(&format!("lstm_head.bias_ih_{suffix}"))?,
                    b_hh: vector(&format!("lstm_head.bias_hh_{suffix}"))?,
                })
            };
            let layers = (0..config.encoder_num_layers)
                .map(|k| {
                    Ok(LstmLayer {
                        forward: direction(format!("l{k}"))?,
                        reverse: direction(format!("l{k}_reverse"))?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            (layers, vec![linear(0)?, linear(2)?])
        }
    };
    Ok(PromptEncoder {
        embedding: matrix("embedding.weight", false)?,
        lstm_head,
        dropout: DropoutConfig::new(config.encoder_dropout).init(),
        mlp_head,
    })
}

/// PEFT's `PeftModel.from_pretrained` for a P-tuning folder: with `adapter_encoder.safetensors`
/// (peft-rs' own file) the encoder is restored; otherwise PEFT's saved output is used as a table.
///
/// With `trainable`, the loaded parameters can be trained further; otherwise they are frozen
/// (inference, as PEFT's `is_trainable=False`).
pub fn from_pretrained<M: CausalLm<Adapter = NoAdapter>>(
    base: M,
    adapter_dir: impl AsRef<Path>,
    trainable: bool,
) -> Result<PTuningModel<M>> {
    let dir = adapter_dir.as_ref();
    let config_path = dir.join(CONFIG_NAME);
    let config = PromptEncoderConfig::from_file(&config_path)?;
    let spec = base.spec().clone();
    if let Some(d) = config.token_dim
        && d != spec.hidden_size
    {
        return Err(PeftError::AdapterMismatch(format!(
            "{}: token_dim {d} but this {} model's hidden size is {} (adapter for another model?)",
            config_path.display(),
            spec.model_type,
            spec.hidden_size
        )));
    }
    let config = with_sizes(config, &spec);
    let device = base.device();
    let (n, d) = (config.num_virtual_tokens, spec.hidden_size);
    let encoder = if dir.join(ENCODER_NAME).is_file() {
        PTuningEncoder {
            encoder: Some(load_encoder(&dir.join(ENCODER_NAME), &config, &device)?),
            table: None,
        }
    } else {
        let store = TensorStore::open(dir.join(WEIGHTS_NAME))?;
        let values = store.f32_shaped("prompt_embeddings", &[n, d])?;
        PTuningEncoder {
            encoder: None,
            table: Some(Param::from_tensor(Tensor::from_data(
                TensorData::new(values, [n, d]),
                &device,
            ))),
        }
    };
    let model = PTuningModel {
        model: VirtualTokens {
            base: freeze(base),
            encoder,
        },
        config,
    };
    Ok(peft_core::tuner::trainable_or_frozen(model, trainable))
}

fn host<const D: usize>(t: Tensor<D>) -> Result<HostTensor> {
    let shape = t.dims().to_vec();
    let values = t
        .into_data()
        .try_to_vec_as::<f32>()
        .map_err(|e| PeftError::InvalidInput(format!("reading an encoder tensor: {e:?}")))?;
    Ok(HostTensor::from_f32(shape, &values))
}

/// The encoder's weights under PyTorch/PEFT state-dict names.
pub fn encoder_tensors(e: &PromptEncoder) -> Result<BTreeMap<String, HostTensor>> {
    let mut out = BTreeMap::new();
    out.insert("embedding.weight".into(), host(e.embedding.val())?);
    // PyTorch's Sequential numbers the linear layers 0, 2, 4 (the ReLUs sit between them).
    for (k, linear) in e.mlp_head.iter().enumerate() {
        out.insert(
            format!("mlp_head.{}.weight", 2 * k),
            host(linear.weight.val().transpose())?,
        );
        if let Some(b) = &linear.bias {
            out.insert(format!("mlp_head.{}.bias", 2 * k), host(b.val())?);
        }
    }
    for (k, layer) in e.lstm_head.iter().enumerate() {
        for (dir, suffix) in [
            (&layer.forward, format!("l{k}")),
            (&layer.reverse, format!("l{k}_reverse")),
        ] {
            out.insert(
                format!("lstm_head.weight_ih_{suffix}"),
                host(dir.w_ih.val().transpose())?,
            );
            out.insert(
                format!("lstm_head.weight_hh_{suffix}"),
                host(dir.w_hh.val().transpose())?,
            );
            out.insert(format!("lstm_head.bias_ih_{suffix}"), host(dir.b_ih.val())?);
            out.insert(format!("lstm_head.bias_hh_{suffix}"), host(dir.b_hh.val())?);
        }
    }
    Ok(out)
}

impl<M: CausalLm> AdapterModel for PTuningModel<M> {
    type Model = PTuning<M>;

    fn model(&self) -> &PTuning<M> {
        &self.model
    }

    fn with_model(mut self, model: PTuning<M>) -> Self {
        self.model = model;
        self
    }

    fn trainable_names(&self) -> Vec<String> {
        named_params(&self.model)
            .into_iter()
            .filter(|p| p.name.starts_with("encoder."))
            .map(|p| p.name)
            .collect()
    }

    fn trainable_summary(&self) -> TrainableSummary {
        let params = named_params(&self.model);
        TrainableSummary {
            trainable: params
                .iter()
                .filter(|p| p.name.starts_with("encoder."))
                .map(|p| p.numel())
                .sum(),
            all: params.iter().map(|p| p.numel()).sum(),
        }
    }

    fn save_pretrained(&self, dir: &Path) -> Result<()> {
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "prompt_embeddings".to_string(),
            host(self.model.encoder.virtual_tokens().detach())?,
        );
        save_adapter(dir, &self.config, &tensors)?;
        if let Some(e) = &self.model.encoder.encoder {
            save_safetensors(dir.join(ENCODER_NAME), &encoder_tensors(e)?, None)?;
        }
        Ok(())
    }

    fn merge_and_unload(self) -> Result<PTuning<M::WithAdapter<NoAdapter>>> {
        Err(PeftError::Unsupported(
            "P-tuning has no weights to merge: keep the adapter and load it with --adapter".into(),
        ))
    }
}
