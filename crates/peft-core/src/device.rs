//! Choosing the compute device at run time (`--device`, `PEFT_DEVICE`).

use burn::tensor::Device;

use crate::error::{PeftError, Result};

/// The device names peft-rs accepts, with the Cargo feature each needs.
pub const DEVICE_NAMES: [(&str, &str); 3] =
    [("cpu", "default"), ("wgpu", "wgpu"), ("cuda", "cuda")];

/// Parses `cpu` (burn's flex backend), `wgpu` (the best adapter wgpu finds) or `cuda` (GPU 0).
///
/// A GPU name in a build without its Cargo feature is an error that says which feature to enable.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" | "flex" => Ok(Device::flex()),
        #[cfg(feature = "wgpu")]
        "wgpu" => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Device::cuda(0)),
        "wgpu" | "cuda" => Err(PeftError::Unsupported(format!(
            "device `{name}` needs a build with `--features {name}`"
        ))),
        other => Err(PeftError::InvalidInput(format!(
            "unknown device `{other}` (expected one of: cpu, wgpu, cuda)"
        ))),
    }
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
