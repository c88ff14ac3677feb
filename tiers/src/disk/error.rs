//! Errors of the disk tier, one kind per policy.
//!
//! | kind | when | policy |
//! |---|---|---|
//! | [`DiskError::Config`] | `open` with an invalid configuration | refuse to open |
//! | [`DiskError::LayoutMismatch`] | files or index were made with another layout | refuse to open; nothing is changed on disk |
//! | [`DiskError::DirectIoUnsupported`] | the filesystem refuses `O_DIRECT` (e.g. tmpfs) | refuse to open |
//! | [`DiskError::Io`] | creating, sizing or opening a slot file fails | refuse to open |
//! | [`DiskError::Index`] | RocksDB cannot be opened or read at start-up | refuse to open |
//! | [`DiskError::Index`] | an index write fails on the data path | that put fails (`NoSpace`), `io_errors` + 1 |
//! | [`DiskError::EngineUnavailable`] | io_uring was forced but the probe failed | refuse to open (`Auto` falls back to pread instead) |
//! | [`DiskError::NotFound`] | `inspect_header` of a key not on disk | answer to the caller |
//! | [`DiskError::ReadFailed`] | `inspect_header` could not read the slot | answer to the caller (nothing dropped) |
//! | [`DiskError::Closed`] | a call that needs the index after [`DiskTier::close`](super::DiskTier::close) | answer to the caller; nothing changes |
//!
//! Faults of single transfers are not errors of the API: a failed or timed
//! out read is a miss, a failed write a failed put, each counted in
//! [`DiskStats`](super::DiskStats) (`io_errors`, `timeouts`), and a slot that
//! fails verification is dropped and counted (`corrupt_blocks`); see
//! [`IoFailure`](super::io::IoFailure) and
//! [`CorruptKind`](super::header::CorruptKind).

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum DiskError {
    #[error("disk tier config: {field}: {reason}")]
    Config { field: &'static str, reason: String },
    #[error(
        "disk tier layout mismatch: on disk {stored}, configured {configured}; \
         use the original settings or remove the slot files and index"
    )]
    LayoutMismatch { stored: String, configured: String },
    #[error("{}: the filesystem does not support O_DIRECT (tmpfs?); put slot files on a real drive", path.display())]
    DirectIoUnsupported { path: PathBuf },
    #[error("{op} {}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("disk index: {0}")]
    Index(String),
    #[error("io_uring engine unavailable: {0}")]
    EngineUnavailable(String),
    #[error("block is not on the disk tier")]
    NotFound,
    #[error("reading the slot failed: {0:?}")]
    ReadFailed(super::io::IoFailure),
    #[error("the disk tier is closed")]
    Closed,
}

impl DiskError {
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        DiskError::Config {
            field,
            reason: reason.into(),
        }
    }
}

impl From<rocksdb::Error> for DiskError {
    fn from(e: rocksdb::Error) -> Self {
        DiskError::Index(e.into_string())
    }
}
