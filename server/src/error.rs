//! Errors of the daemon library.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("config: {0}")]
    Config(String),
    #[error("cannot listen on {what}: {source}")]
    Listen {
        what: String,
        source: std::io::Error,
    },
    #[error("unix socket {0} is in use by a running daemon")]
    SocketInUse(String),
    #[error("cannot open the cache: {0}")]
    Cache(#[from] kvstrata_tiers::OpenError),
    #[error("server reflection: {0}")]
    Reflection(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("a server task failed: {0}")]
    Task(String),
}
