//! The GPU engine: a Llama-family forward pass on one CUDA device, over a paged
//! KV cache whose pages are kvstrata blocks in GPU memory.
//!
//! - [`sources`]: the model kernels' CUDA C (`engine/cuda/*.cu`, embedded with
//!   `include_str!`) and their NVRTC compilation for the device's compute
//!   capability (at start-up; nothing CUDA is needed to build).
//! - [`reference`]: a CPU reference for every kernel (tested in CI against
//!   naive loops) and the whole forward pass built from them.
//! - [`CudaDevice`]: context, stream, cuBLAS handle, kernels, plain
//!   `cuMemAlloc` memory, one launch wrapper per kernel.
//! - [`GpuWeights`]: 16-bit weights on the device, from host weights (a GGUF
//!   file dequantized at load) or generated on the device (synthetic models).
//! - [`GpuKvPool`] / [`GpuSequence`]: pages in one `cuMemAlloc` allocation
//!   (exportable through CUDA IPC), same layout as the CPU engine's pages.
//! - [`GpuModel`]: prefill chunks and decode steps, logits or top-k.
//!
//! The CUDA libraries (driver, NVRTC, cuBLAS) are loaded at run time
//! (`cudarc` with `dynamic-loading`); [`CudaDevice::open`] checks each one
//! before any call and answers [`CudaError::is_absent`] errors on a machine
//! without a GPU.

mod device;
mod error;
mod forward;
mod kv;
pub mod reference;
pub mod sources;
mod weights;

pub use device::{AttentionKernel, CudaDevice, CudaDeviceInfo, DevMem};
pub use error::CudaError;
pub use forward::{GpuModel, GpuModelOptions, MAX_TOP_K};
pub use kv::{GpuKvPool, GpuSequence, PageAllocator};
pub use reference::Storage;
pub use weights::{GpuLayer, GpuWeights, host_weights_from_gguf};

/// Which device the engines run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    /// CUDA device with this ordinal.
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;

    /// `cpu`, `cuda` (device 0) or `cuda:N`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceChoice::Cuda(n)),
                _ => Err(format!("device {s:?}: want cpu, cuda or cuda:N")),
            },
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Cpu => write!(f, "cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_choice_parses() {
        assert_eq!("cpu".parse::<DeviceChoice>(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            assert!(bad.parse::<DeviceChoice>().is_err(), "{bad}");
        }
        assert_eq!(DeviceChoice::Cuda(2).to_string(), "cuda:2");
    }

    /// Without a GPU (CI), opening a device fails with an "absent" error and
    /// never panics.
    #[test]
    fn opening_without_a_gpu_says_absent() {
        match CudaDevice::open(0) {
            Ok(dev) => assert!(!dev.info().name.is_empty()),
            Err(e) => assert!(e.is_absent(), "{e}"),
        }
        match CudaDevice::open(1 << 20) {
            Ok(_) => panic!("device 2^20 opened"),
            Err(e) => assert!(e.is_absent(), "{e}"),
        }
    }
}
