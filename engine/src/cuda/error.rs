//! The GPU engine's error type.

/// Everything the GPU engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// `libcuda.so.1` cannot be loaded (no NVIDIA driver here).
    #[error("the CUDA driver library (libcuda.so.1) is not installed")]
    NoDriver,
    /// `libnvrtc.so` cannot be loaded (kernels cannot be compiled).
    #[error("the NVRTC library (libnvrtc.so) is not installed")]
    NoNvrtc,
    /// `libcublas.so` cannot be loaded (no matrix products).
    #[error("the cuBLAS library (libcublas.so) is not installed")]
    NoCublas,
    /// The device ordinal does not exist.
    #[error("no CUDA device {ordinal} (the driver sees {count})")]
    NoDevice { ordinal: usize, count: usize },
    /// A driver call failed.
    #[error("{call}: {source}")]
    Driver {
        call: &'static str,
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// A cuBLAS call failed.
    #[error("{call}: {source}")]
    Cublas {
        call: &'static str,
        #[source]
        source: cudarc::cublas::result::CublasError,
    },
    /// NVRTC refused a kernel source.
    #[error("compiling {file}: {log}")]
    Compile { file: &'static str, log: String },
    /// The model or request does not fit what the GPU engine supports.
    #[error("{0}")]
    Unsupported(String),
    /// A request was malformed (no tokens, context too long, token out of range).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The KV pool has no free page left.
    #[error("KV pool full: {needed} pages needed, {free} free")]
    PoolFull { needed: usize, free: usize },
    /// Reading model weights failed.
    #[error("model weights: {0}")]
    Weights(String),
    /// Work of another process did not complete in time.
    #[error("{what} did not complete within {after:?}")]
    Timeout {
        what: &'static str,
        after: std::time::Duration,
    },
}

impl CudaError {
    /// Whether the error only says that there is no usable GPU here.
    pub fn is_absent(&self) -> bool {
        matches!(
            self,
            CudaError::NoDriver
                | CudaError::NoNvrtc
                | CudaError::NoCublas
                | CudaError::NoDevice { .. }
        )
    }
}

pub(crate) fn driver(call: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> CudaError {
    move |source| CudaError::Driver { call, source }
}

pub(crate) fn cublas(
    call: &'static str,
) -> impl FnOnce(cudarc::cublas::result::CublasError) -> CudaError {
    move |source| CudaError::Cublas { call, source }
}
