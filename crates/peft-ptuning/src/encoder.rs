//! P-tuning's prompt encoder (an embedding re-encoded by an MLP or a bidirectional LSTM, PyTorch's
//! layout and inits), and its weights under PyTorch/PEFT state-dict names.

use crate::config::{EncoderType, PromptEncoderConfig};
use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig};
use burn::tensor::activation::{relu, sigmoid};
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use peft_core::params::host_tensor;
use peft_core::prompt_learning::VirtualTokenEncoder;
use peft_core::{HostTensor, Result, TensorStore};
use std::collections::BTreeMap;
use std::path::Path;

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
                peft_core::dropout::forward(&self.dropout, both)
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

impl PTuningEncoder {
    /// The virtual tokens as inference computes them: without the encoder's dropout, whatever the
    /// device. What is saved as `prompt_embeddings`, so that a checkpoint written mid-training
    /// holds the encoder's output and not one random draw of its dropout.
    pub fn inference_tokens(&self) -> Tensor<2> {
        match &self.encoder {
            Some(e) if e.dropout.prob > 0.0 => {
                let mut without = e.clone();
                without.dropout = DropoutConfig::new(0.0).init();
                without.virtual_tokens()
            }
            _ => self.virtual_tokens(),
        }
    }
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
    let n = config.prompt.num_virtual_tokens;
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

/// The encoder's weights under PyTorch/PEFT state-dict names.
pub fn encoder_tensors(e: &PromptEncoder) -> Result<BTreeMap<String, HostTensor>> {
    let mut out = BTreeMap::new();
    out.insert("embedding.weight".into(), host_tensor(e.embedding.val())?);
    // PyTorch's Sequential numbers the linear layers 0, 2, 4 (the ReLUs sit between them).
    for (k, linear) in e.mlp_head.iter().enumerate() {
        out.insert(
            format!("mlp_head.{}.weight", 2 * k),
            host_tensor(linear.weight.val().transpose())?,
        );
        if let Some(b) = &linear.bias {
            out.insert(format!("mlp_head.{}.bias", 2 * k), host_tensor(b.val())?);
        }
    }
    for (k, layer) in e.lstm_head.iter().enumerate() {
        for (dir, suffix) in [
            (&layer.forward, format!("l{k}")),
            (&layer.reverse, format!("l{k}_reverse")),
        ] {
            out.insert(
                format!("lstm_head.weight_ih_{suffix}"),
                host_tensor(dir.w_ih.val().transpose())?,
            );
            out.insert(
                format!("lstm_head.weight_hh_{suffix}"),
                host_tensor(dir.w_hh.val().transpose())?,
            );
            out.insert(
                format!("lstm_head.bias_ih_{suffix}"),
                host_tensor(dir.b_ih.val())?,
            );
            out.insert(
                format!("lstm_head.bias_hh_{suffix}"),
                host_tensor(dir.b_hh.val())?,
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EncoderType;

    /// What is saved is the encoder's output without dropout: the same on every call, and not
    /// what a training forward (dropout drawn) computes.
    #[test]
    fn saved_tokens_are_drawn_without_dropout() {
        let device = Device::flex().autodiff();
        let config = PromptEncoderConfig {
            prompt: peft_core::PromptLearningConfig::new(4),
            encoder_reparameterization_type: EncoderType::Lstm,
            encoder_hidden_size: Some(8),
            encoder_num_layers: 2,
            encoder_dropout: 0.5,
            ..PromptEncoderConfig::default()
        };
        let encoder = PTuningEncoder {
            encoder: Some(new_encoder(&config, 6, &device)),
            table: None,
        };
        let values = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap();
        let saved = values(encoder.inference_tokens());
        assert_eq!(saved, values(encoder.inference_tokens()));
        peft_core::dropout::seed_thread(3);
        let trained = values(encoder.virtual_tokens());
        peft_core::dropout::unseed_thread();
        assert_eq!(trained.len(), saved.len());
        assert_ne!(saved, trained, "a training forward draws dropout masks");
    }
}
