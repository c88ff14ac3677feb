//! The benchmark's error type.

use crate::disk::DiskBenchReport;
use crate::report::BenchReport;

/// Everything that can stop a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A flag has a bad value; `field` names the flag.
    #[error("invalid {field}: {reason}")]
    InvalidArg { field: &'static str, reason: String },
    /// The `--addr` value cannot be understood.
    #[error("invalid --addr {addr:?}: {reason}")]
    BadAddr { addr: String, reason: String },
    /// The daemon cannot be reached.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// An RPC answered an error status.
    #[error("{op} RPC failed: {status}")]
    Rpc {
        op: &'static str,
        status: Box<tonic::Status>,
    },
    /// The daemon answered something the protocol does not allow.
    #[error("protocol violation in {op}: {reason}")]
    Protocol { op: &'static str, reason: String },
    /// Some reads returned wrong bytes. The run finished; its report is attached.
    #[error("VERIFY FAILED: {failures} blocks read back wrong bytes (first: {first})")]
    VerifyFailed {
        failures: u64,
        first: String,
        report: Box<BenchReport>,
    },
    /// An HDR histogram could not be created or merged.
    #[error("latency histogram: {0}")]
    Histogram(String),
    /// A client task panicked or was cancelled.
    #[error("benchmark task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The report could not be encoded as JSON.
    #[error("cannot encode the report as JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The disk tier could not be opened (bench-disk).
    #[error("disk tier: {0}")]
    Disk(#[from] kvstrata_tiers::DiskError),
    /// A file-system operation of the benchmark itself failed.
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The disk tier did not store a block of the write phase (bench-disk).
    #[error("disk tier put of block {block} answered {outcome}")]
    DiskPut { block: u64, outcome: String },
    /// Disk-tier reads missed or returned wrong bytes. The run finished; its
    /// report is attached.
    #[error(
        "VERIFY FAILED: {failures} blocks read back wrong bytes and {misses} missed (first: {first})"
    )]
    DiskVerifyFailed {
        failures: u64,
        misses: u64,
        first: String,
        report: Box<DiskBenchReport>,
    },
    /// A shared-memory pool could not be registered or allocated from (`--mode shm`).
    #[error("shared-memory pool: {0}")]
    Pool(#[from] kvstrata_client::ClientError),
    /// A Redis command failed (`--mode redis`).
    #[error("redis {op} on {url} failed: {source}")]
    Redis {
        op: &'static str,
        url: String,
        #[source]
        source: redis::RedisError,
    },
    /// The remote tier could not be opened (bench-remote).
    #[error("remote tier: {0}")]
    Remote(#[from] kvstrata_tiers::RemoteError),
    /// A bench-remote write was not stored, or a read missed or returned
    /// wrong bytes; `path` is `kvstrata` or `raw`.
    #[error("bench-remote: {path} {op} of {block_size}-byte blocks failed: {reason}")]
    RemoteFailed {
        path: &'static str,
        op: &'static str,
        block_size: u64,
        reason: String,
    },
    /// A benchmark thread panicked or stopped early.
    #[error("benchmark thread failed: {0}")]
    Thread(String),
}

impl BenchError {
    /// The report of a run that finished but failed verification.
    pub fn report(&self) -> Option<&BenchReport> {
        match self {
            BenchError::VerifyFailed { report, .. } => Some(report),
            _ => None,
        }
    }

    /// The report of a bench-disk run that finished but failed verification.
    pub fn disk_report(&self) -> Option<&DiskBenchReport> {
        match self {
            BenchError::DiskVerifyFailed { report, .. } => Some(report),
            _ => None,
        }
    }

    pub(crate) fn rpc(op: &'static str, status: tonic::Status) -> Self {
        BenchError::Rpc {
            op,
            status: Box::new(status),
        }
    }
}
