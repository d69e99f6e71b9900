//! Choosing the compute device at run time (`--device`, `PEFT_DEVICE`).

use burn::backend::DispatchDevice;
use burn::tensor::Device;

use peft_tensors::{PeftError, Result};

/// Whether peft-rs' CPU kernels (the fused operations, packed-weight products, OpenBLAS
/// products, the chunked loss) run on `device`: burn's flex backend, with or without autodiff.
/// Every other device runs burn's composed operations. This is the one place that decides it.
pub fn runs_cpu_kernels(device: &Device) -> bool {
    matches!(
        device.as_dispatch().clone().inner(),
        DispatchDevice::Flex(_)
    )
}

/// The device names peft-rs accepts, with the Cargo feature each needs.
pub const DEVICE_NAMES: [(&str, &str); 3] =
    [("cpu", "default"), ("wgpu", "wgpu"), ("cuda", "cuda")];

/// Parses `cpu` (burn's flex backend), `wgpu` (the best adapter wgpu finds), `wgpu:N` (discrete
/// GPU N), `cuda` (GPU 0) or `cuda:N`.
///
/// A GPU name in a build without its Cargo feature is an error that says which feature to enable.
pub fn parse_device(name: &str) -> Result<Device> {
    let (kind, index) = match name.split_once(':') {
        Some((kind, index)) => {
            let index = index.parse::<usize>().map_err(|_| {
                PeftError::InvalidInput(format!(
                    "device `{name}`: the index after `:` must be a number (e.g. cuda:1)"
                ))
            })?;
            (kind, Some(index))
        }
        None => (name, None),
    };
    match (kind, index) {
        ("cpu" | "flex", None) => Ok(Device::flex()),
        ("wgpu", index) => wgpu(index),
        ("cuda", index) => cuda(index.unwrap_or(0)),
        ("cpu" | "flex", Some(_)) => Err(PeftError::InvalidInput(format!(
            "device `{name}`: the CPU has no index (use cpu)"
        ))),
        _ => Err(PeftError::InvalidInput(format!(
            "unknown device `{name}` (expected one of: cpu, wgpu, wgpu:N, cuda, cuda:N)"
        ))),
    }
}

/// Parses a comma-separated device list (`--devices cuda:0,cuda:1`), one device per entry.
pub fn parse_devices(names: &str) -> Result<Vec<Device>> {
    let names: Vec<&str> = names.split(',').map(str::trim).collect();
    if names.iter().any(|n| n.is_empty()) {
        return Err(PeftError::InvalidInput(format!(
            "devices `{}`: an empty entry",
            names.join(",")
        )));
    }
    names.into_iter().map(parse_device).collect()
}

#[cfg(not(all(feature = "wgpu", feature = "cuda")))]
fn missing_feature(name: &str) -> PeftError {
    PeftError::Unsupported(format!(
        "device `{name}` needs a build with `--features {name}`"
    ))
}

#[cfg(feature = "wgpu")]
fn wgpu(index: Option<usize>) -> Result<Device> {
    use burn::tensor::DeviceKind;
    Ok(Device::wgpu(index.map_or(
        DeviceKind::DefaultDevice,
        DeviceKind::DiscreteGpu,
    )))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu(_index: Option<usize>) -> Result<Device> {
    Err(missing_feature("wgpu"))
}

#[cfg(feature = "cuda")]
fn cuda(index: usize) -> Result<Device> {
    Ok(Device::cuda(index))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_index: usize) -> Result<Device> {
    Err(missing_feature("cuda"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(parse_device("cpu").is_ok());
        let err = parse_device("tpu").unwrap_err().to_string();
        assert!(err.contains("unknown device `tpu`"), "{err}");
        let err = parse_device("cuda:x").unwrap_err().to_string();
        assert!(err.contains("must be a number"), "{err}");
        let err = parse_device("cpu:1").unwrap_err().to_string();
        assert!(err.contains("the CPU has no index"), "{err}");
        assert_eq!(parse_devices("cpu, cpu").unwrap().len(), 2);
        let err = parse_devices("cpu,,cpu").unwrap_err().to_string();
        assert!(err.contains("an empty entry"), "{err}");
        #[cfg(not(feature = "cuda"))]
        {
            let err = parse_device("cuda:1").unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
    }
}
