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

/// Parses `cpu` (burn's flex backend), `wgpu` (the best adapter wgpu finds) or `cuda` (GPU 0).
///
/// A GPU name in a build without its Cargo feature is an error that says which feature to enable.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" | "flex" => Ok(Device::flex()),
        "wgpu" => wgpu(),
        "cuda" => cuda(),
        other => Err(PeftError::InvalidInput(format!(
            "unknown device `{other}` (expected one of: cpu, wgpu, cuda)"
        ))),
    }
}

#[cfg(not(all(feature = "wgpu", feature = "cuda")))]
fn missing_feature(name: &str) -> PeftError {
    PeftError::Unsupported(format!(
        "device `{name}` needs a build with `--features {name}`"
    ))
}

#[cfg(feature = "wgpu")]
fn wgpu() -> Result<Device> {
    Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu() -> Result<Device> {
    Err(missing_feature("wgpu"))
}

#[cfg(feature = "cuda")]
fn cuda() -> Result<Device> {
    Ok(Device::cuda(0))
}

#[cfg(not(feature = "cuda"))]
fn cuda() -> Result<Device> {
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
        #[cfg(not(feature = "cuda"))]
        {
            let err = parse_device("cuda").unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
    }
}
