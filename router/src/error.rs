//! The router's errors: bad node lists and configs, and unknown node names.

use thiserror::Error;

/// Errors of the router.
#[derive(Debug, Error)]
pub enum RouterError {
    /// [`Router::start`] got an empty node list.
    #[error("no nodes to route over (give at least one)")]
    NoNodes,
    /// A node name or target is unusable (`arg` is what was given).
    #[error("invalid node {arg:?}: {reason}")]
    InvalidNode { arg: String, reason: String },
    /// Two nodes have the same name.
    #[error("duplicate node name {0:?}: every node needs its own name")]
    DuplicateNode(String),
    /// A [`RouterConfig`] value is out of range.
    #[error("invalid router config: {0}")]
    InvalidConfig(String),
    /// [`Router::start`] was called outside a tokio runtime.
    #[error("the router needs a tokio runtime (call Router::start from within one)")]
    NoRuntime,
    /// No node has this name.
    #[error("unknown node {0:?}")]
    UnknownNode(String),
}
