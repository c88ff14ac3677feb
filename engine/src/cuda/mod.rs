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
//! - [`GpuKvStore`]: the pool registered with the daemon as a CUDA-IPC KV
//!   region; blocks stored and loaded by page ids (shared-memory fallback).
//! - [`GpuEngine`]: prefill and decode through the daemon, like the CPU
//!   engine; [`resolve_device`] picks the device (`--device`).
//!
//! The CUDA libraries (driver, NVRTC, cuBLAS) are loaded at run time
//! (`cudarc` with `dynamic-loading`); [`CudaDevice::open`] checks each one
//! before any call and answers [`CudaError::is_absent`] errors on a machine
//! without a GPU.

mod device;
mod engine;
mod error;
mod forward;
mod kv;
pub mod reference;
mod region;
pub mod sources;
mod weights;

pub use device::{AttentionKernel, CudaDevice, CudaDeviceInfo, DevMem, PeerEvent};
pub use engine::{GpuDecoded, GpuEngine, GpuPrefill};
pub use error::CudaError;
pub use forward::{GpuModel, GpuModelOptions, MAX_TOP_K};
pub use kv::{GpuKvPool, GpuSequence, PageAllocator, region_geometry};
pub use reference::Storage;
pub use region::{
    GpuKvOptions, GpuKvStore, KvPath, PAGES_PER_REQUEST, PathChoice, RegionAttempt, choose_path,
    found_prefix, plan_store,
};
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

/// The device the engines run on, from `--device` (`requested`) and what
/// `probe` finds on CUDA device 0 (`CudaDevice::open`, or a stand-in in
/// tests), with the one line to say at start-up. Without `--device`: CUDA
/// when a GPU is found, else the CPU. An explicit `cuda[:N]` without a usable
/// GPU is an error, not a silent CPU run.
pub fn resolve_device<D>(
    requested: Option<DeviceChoice>,
    probe: impl FnOnce(usize) -> Result<D, CudaError>,
    describe: impl Fn(&D) -> String,
) -> Result<(DeviceChoice, Option<D>, String), CudaError> {
    match requested {
        Some(DeviceChoice::Cpu) => {
            Ok((DeviceChoice::Cpu, None, "device: cpu (--device cpu)".into()))
        }
        Some(DeviceChoice::Cuda(n)) => {
            let d = probe(n)?;
            let line = format!("device: cuda:{n} ({})", describe(&d));
            Ok((DeviceChoice::Cuda(n), Some(d), line))
        }
        None => match probe(0) {
            Ok(d) => {
                let line = format!(
                    "device: cuda:0 ({}; a GPU was found, --device cpu for the CPU)",
                    describe(&d)
                );
                Ok((DeviceChoice::Cuda(0), Some(d), line))
            }
            Err(e) if e.is_absent() => Ok((
                DeviceChoice::Cpu,
                None,
                format!("device: cpu (no GPU: {e})"),
            )),
            Err(e) => Err(e),
        },
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

    #[test]
    fn the_device_defaults_to_cuda_when_found_else_cpu() {
        let found = |n: usize| Ok::<_, CudaError>(format!("gpu{n}"));
        let absent = |_| Err::<String, _>(CudaError::NoDriver);
        let name = |d: &String| d.clone();
        let (c, d, line) = resolve_device(None, found, name).unwrap();
        assert_eq!((c, d.as_deref()), (DeviceChoice::Cuda(0), Some("gpu0")));
        assert!(line.starts_with("device: cuda:0 (gpu0"), "{line}");
        let (c, d, line) = resolve_device(None, absent, name).unwrap();
        assert_eq!((c, d), (DeviceChoice::Cpu, None));
        assert!(
            line.contains("no GPU") && line.contains("libcuda"),
            "{line}"
        );
        let (c, _, line) = resolve_device(Some(DeviceChoice::Cpu), found, name).unwrap();
        assert_eq!(c, DeviceChoice::Cpu);
        assert_eq!(line, "device: cpu (--device cpu)");
        let (c, d, _) = resolve_device(Some(DeviceChoice::Cuda(3)), found, name).unwrap();
        assert_eq!((c, d.as_deref()), (DeviceChoice::Cuda(3), Some("gpu3")));
        // Asked for explicitly: no GPU is an error.
        let e = resolve_device(Some(DeviceChoice::Cuda(1)), absent, name).unwrap_err();
        assert!(e.is_absent());
        // A GPU that is there but fails is an error even by default.
        let broken = |_| Err::<String, _>(CudaError::Unsupported("broken".into()));
        assert!(resolve_device(None, broken, name).is_err());
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
