//! The engine's one error type, with a kind per thing that can go wrong.

use std::path::PathBuf;

/// Everything the engines, the model loader and the tokenizer can fail with.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The default model is not on disk and could not be fetched.
    #[error("model not available: {0}")]
    ModelUnavailable(String),
    /// A model file exists but is not what was expected (size, hash, format).
    #[error("model file {path}: {reason}")]
    BadModel { path: PathBuf, reason: String },
    /// The GGUF metadata lacks a key the engine needs, or holds a wrong type.
    #[error("model metadata: {0}")]
    Metadata(String),
    /// Tokenizer construction, encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be parsed or rendered.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// Tensor math failed (shape mismatch, unsupported dtype).
    #[error("model math: {0}")]
    Candle(#[from] candle_core::Error),
    /// The KV cache was asked for something its geometry cannot hold.
    #[error("kv cache: {0}")]
    Kv(String),
    /// A request was malformed (empty prompt, context over the model's limit, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Talking to the kvstrata daemon failed.
    #[error("kvstrata: {0}")]
    Client(#[from] kvstrata_client::ClientError),
    /// A block loaded from kvstrata did not fit the engine's geometry.
    #[error("block {key}: {reason}")]
    BadBlock { key: String, reason: String },
    /// The GPU engine failed (device, kernels, KV pool).
    #[error("gpu: {0}")]
    Cuda(#[from] crate::cuda::CudaError),
    /// Registering the GPU engine's KV pool with the daemon failed.
    #[error("{0}")]
    Region(#[from] kvstrata_client::KvRegionError),
    /// Local I/O (model cache directory, downloads).
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl EngineError {
    /// An [`EngineError::Io`] with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        EngineError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result with [`EngineError`].
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
