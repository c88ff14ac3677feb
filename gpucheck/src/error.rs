//! [`GpuCheckError`]: why a `kvstrata gpu-check` run, or a KV-region round
//! trip ([`crate::pages::check_pages_round_trip`]), could not finish. A check
//! that ran and failed is a failed [`crate::report::CheckRow`], not an error.

use std::path::PathBuf;

use kvstrata_client::ClientError;
use kvstrata_kernels::GpuError;

/// Errors of this crate. Every variant displays on one line.
#[derive(Debug, thiserror::Error)]
pub enum GpuCheckError {
    /// The CUDA device asked for is present but cannot be opened.
    #[error("cannot open CUDA device {device}: {source}")]
    OpenDevice {
        device: usize,
        #[source]
        source: GpuError,
    },
    /// The report could not be encoded as JSON.
    #[error("encoding the report as JSON: {0}")]
    EncodeReport(#[from] serde_json::Error),
    /// The `--json-out` file could not be written.
    #[error("writing {}: {source}", path.display())]
    WriteReport {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A KV-region round trip was asked for with an unusable region or
    /// argument; nothing was stored.
    #[error("KV region {name:?}: {reason}")]
    InvalidRegion { name: String, reason: String },
    /// A request of a KV-region round trip failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A KV-region round trip found wrong bytes or a wrong answer.
    #[error("KV region check: {0}")]
    RoundTrip(String),
}
