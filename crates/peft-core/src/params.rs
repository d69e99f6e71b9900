//! Parameters by their Hugging Face names.
//!
//! burn walks a module tree with field names; peft-rs' models name their fields after the HF
//! weights, so a burn path such as `Bloom.transformer.h.0.self_attention.query_key_value.base.weight`
//! maps to the HF name `transformer.h.0.self_attention.query_key_value.weight` by dropping the enum
//! variant and the `base` of an [`AdaptableLinear`](crate::AdaptableLinear). Parameters inside an
//! adapter keep an `adapter` component (`….query_key_value.adapter.lora_a`), which method crates
//! translate to PEFT's key names.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::{DType, Tensor};

/// One float parameter of a module tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedParam {
    /// Hugging Face name (`model.layers.0.self_attn.q_proj.weight`); adapter parameters contain
    /// `.adapter.`.
    pub name: String,
    /// burn's id of the parameter (keys gradients and optimizer state).
    pub id: ParamId,
    /// Shape in burn's layout (`[in, out]` for a linear weight).
    pub shape: Vec<usize>,
    /// Whether this is the weight of a burn `Linear` (stored transposed relative to PyTorch).
    pub is_linear_weight: bool,
}

impl NamedParam {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether this parameter belongs to an adapter rather than the base model.
    pub fn is_adapter(&self) -> bool {
        is_adapter_name(&self.name)
    }

    /// Shape in PyTorch's layout.
    pub fn torch_shape(&self) -> Vec<usize> {
        let mut s = self.shape.clone();
        if self.is_linear_weight {
            s.reverse();
        }
        s
    }
}

/// The burn path of the parameter being visited: `(field name, container type)` pairs.
///
/// burn enters a module for every struct field, parameter fields included, with the type of the
/// struct that holds the field: a linear weight is `("weight", "Struct:Linear")`, an enum variant
/// `("Bloom", "Enum:AnyModel")`.
#[derive(Default)]
struct PathStack(Vec<(String, String)>);

impl PathStack {
    fn enter(&mut self, name: &str, container_type: &str) {
        self.0.push((name.to_string(), container_type.to_string()));
    }

    fn exit(&mut self) {
        self.0.pop();
    }

    /// The Hugging Face name: enum variants and the `base` field of a wrapper (an
    /// `AdaptableLinear`, a prompt-learning model, ...) dropped.
    fn hf_name(&self) -> String {
        self.0
            .iter()
            .filter(|(name, kind)| {
                !(kind.starts_with("Enum:") || name == "base" && kind.starts_with("Struct:"))
            })
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>()
            .join(".")
    }

    fn is_linear_weight(&self) -> bool {
        self.0
            .last()
            .is_some_and(|(n, kind)| n == "weight" && kind == "Struct:Linear")
    }
}

#[derive(Default)]
struct Collector {
    path: PathStack,
    out: Vec<NamedParam>,
}

impl ModuleVisitor for Collector {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.out.push(NamedParam {
            name: self.path.hf_name(),
            id: param.id,
            shape: param.lazy_shape().to_vec(),
            is_linear_weight: self.path.is_linear_weight(),
        });
    }
}

/// Every float parameter of `module`, with Hugging Face names, in visiting order.
pub fn named_params<M: Module>(module: &M) -> Vec<NamedParam> {
    let mut collector = Collector::default();
    module.visit(&mut collector);
    collector.out
}

struct Mapper<'a, F> {
    path: PathStack,
    f: &'a mut F,
}

/// What [`map_params`] does with one parameter.
pub enum ParamUpdate {
    /// Leave it as it is.
    Keep,
    /// Set whether it requires gradients.
    Trainable(bool),
    /// Replace its value (burn layout, same rank; the id and gradient setting are kept).
    Value(burn::tensor::TensorData),
}

impl<F: FnMut(&str, bool) -> ParamUpdate> burn::module::ModuleMapper for Mapper<'_, F> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let name = self.path.hf_name();
        let linear = self.path.is_linear_weight();
        match (self.f)(&name, linear) {
            ParamUpdate::Keep => param,
            // A parameter that trains is kept in f32 (the master copy), whatever the dtype the
            // frozen model was loaded in (bf16 compute).
            ParamUpdate::Trainable(true) if param.val().dtype() != DType::F32 => {
                param.map(|old| old.cast(DType::F32)).set_require_grad(true)
            }
            ParamUpdate::Trainable(t) => param.set_require_grad(t),
            ParamUpdate::Value(data) if data.shape().len() == D => {
                let trainable = param.val().is_require_grad();
                param
                    .map(|old| Tensor::<D>::from_data(data, &old.device()).cast(old.dtype()))
                    .set_require_grad(trainable)
            }
            ParamUpdate::Value(_) => param,
        }
    }
}

/// Rebuilds `module`, calling `f(hf_name, is_linear_weight)` for each float parameter and applying
/// the [`ParamUpdate`] it returns. Used to freeze or unfreeze parameters by name (BitFit,
/// `modules_to_save`, `bias`) and to load named values into them.
pub fn map_params<M: Module>(module: M, mut f: impl FnMut(&str, bool) -> ParamUpdate) -> M {
    let mut mapper = Mapper {
        path: PathStack::default(),
        f: &mut f,
    };
    module.map(&mut mapper)
}

/// `module` with the parameters named in `values` set to them: values in PyTorch's layout by
/// Hugging Face name (a linear weight `[out, in]`, transposed here to burn's `[in, out]`); every
/// other parameter kept.
pub fn set_values<M: Module>(
    module: M,
    mut values: std::collections::BTreeMap<String, burn::tensor::TensorData>,
) -> M {
    if values.is_empty() {
        return module;
    }
    map_params(module, |name, linear| match values.remove(name) {
        Some(data) if linear => ParamUpdate::Value(peft_tensors::layout::transpose_data(data)),
        Some(data) => ParamUpdate::Value(data),
        None => ParamUpdate::Keep,
    })
}

/// A device tensor as an f32 host tensor of its own shape (an encoder's or a prefix table's
/// weights to be saved).
pub fn host_tensor<const D: usize>(t: Tensor<D>) -> crate::Result<crate::HostTensor> {
    let shape = t.dims().to_vec();
    let values = t.into_data().try_to_vec_as::<f32>().map_err(|e| {
        crate::PeftError::InvalidInput(format!("reading a tensor back from the device: {e:?}"))
    })?;
    Ok(crate::HostTensor::from_f32(shape, &values))
}

/// One float parameter whose value is read only when asked for: a handle on the tensor, not a
/// copy (see [`lazy_values`]).
pub struct LazyValue {
    /// Hugging Face name.
    pub name: String,
    /// Shape in PyTorch's layout.
    pub shape: Vec<usize>,
    read: Box<dyn Fn() -> crate::Result<Vec<f32>> + Send + Sync>,
}

/// Whether a Hugging Face parameter name belongs to an adapter rather than the base model.
/// (PEFT's trainable tokens are `….token_adapter.trainable_tokens_delta`.)
pub fn is_adapter_name(name: &str) -> bool {
    name.contains(".adapter.") || name.starts_with("adapter.") || name.contains(".token_adapter.")
}

impl LazyValue {
    /// Whether this parameter belongs to an adapter rather than the base model.
    pub fn is_adapter(&self) -> bool {
        is_adapter_name(&self.name)
    }

    /// The values in PyTorch's layout, as f32 (a linear weight transposed back to `[out, in]`).
    pub fn values(&self) -> crate::Result<Vec<f32>> {
        (self.read)()
    }
}

#[derive(Default)]
struct ValueCollector {
    path: PathStack,
    out: Vec<LazyValue>,
}

impl ModuleVisitor for ValueCollector {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let name = self.path.hf_name();
        let tensor = param.val();
        let transpose = self.path.is_linear_weight() && D == 2;
        let mut shape = tensor.dims().to_vec();
        if transpose {
            shape.reverse();
        }
        let label = name.clone();
        let read = move || {
            let tensor = if transpose {
                tensor.clone().transpose()
            } else {
                tensor.clone()
            };
            tensor
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .map_err(|e| {
                    crate::PeftError::InvalidInput(format!("reading parameter {label}: {e:?}"))
                })
        };
        self.out.push(LazyValue {
            name,
            shape,
            read: Box::new(read),
        });
    }
}

/// Every float parameter of `module` with its Hugging Face name and PyTorch-order shape, its
/// values read one parameter at a time when asked for (writing a checkpoint tensor by tensor).
pub fn lazy_values<M: Module>(module: &M) -> Vec<LazyValue> {
    let mut collector = ValueCollector::default();
    module.visit(&mut collector);
    collector.out
}

/// Every float parameter's value as an f32 host tensor in PyTorch's layout (linear weights
/// transposed back to `[out, in]`), with Hugging Face names.
pub fn named_values<M: Module>(module: &M) -> crate::Result<Vec<(String, crate::HostTensor)>> {
    lazy_values(module)
        .into_iter()
        .map(|v| {
            let values = v.values()?;
            Ok((v.name, crate::HostTensor::from_f32(v.shape, &values)))
        })
        .collect()
}

/// FNV-1a, 64 bits: a stable hash of a parameter name.
fn stable_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

struct StableIds {
    path: PathStack,
}

impl burn::module::ModuleMapper for StableIds {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let id = ParamId::from(stable_hash(&self.path.hf_name()));
        let (_, value, mapper) = param.consume();
        Param::from_mapped_value(id, value, mapper)
    }
}

/// Gives every parameter an id derived from its Hugging Face name, so that optimizer state saved
/// in one process (keyed by parameter id) applies to the same parameters in another — what exact
/// training resumption needs. Gradient settings are kept.
pub fn with_stable_ids<M: Module>(module: M) -> M {
    module.map(&mut StableIds {
        path: PathStack::default(),
    })
}
