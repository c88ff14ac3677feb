//! The crate's error type.

use crate::layout::GeometryError;

/// Why a device operation failed. `NoLibrary` and `NoDevice` mean "no GPU
/// here": callers run without one.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("the CUDA driver library (libcuda.so.1) is not installed")]
    NoLibrary,
    #[error("no CUDA device {ordinal} (the driver sees {count})")]
    NoDevice { ordinal: usize, count: i32 },
    #[error("the NVRTC library (libnvrtc.so) is not installed: the kernels cannot be compiled")]
    NoNvrtc,
    #[error("NVRTC could not compile {file}: {log}")]
    Compile { file: &'static str, log: String },
    #[error("CUDA driver call {call} failed: {source}")]
    Driver {
        call: &'static str,
        #[source]
        source: cudarc::driver::DriverError,
    },
    #[error("the CUDA IPC allocation has {available} bytes, fewer than the {announced} announced")]
    IpcTooSmall { announced: u64, available: u64 },
    #[error("host memory: {0}")]
    HostMemory(#[source] std::io::Error),
    #[error(transparent)]
    Geometry(#[from] GeometryError),
    #[error("not supported by this backend: {what}")]
    Unsupported { what: &'static str },
}

impl GpuError {
    /// Whether the error only says there is no GPU here.
    pub fn is_absent(&self) -> bool {
        matches!(
            self,
            GpuError::NoLibrary | GpuError::NoDevice { .. } | GpuError::NoNvrtc
        )
    }
}
