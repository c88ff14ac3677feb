//! The one error type of the tiers crate, with one kind per decided policy.

use thiserror::Error;

/// Errors of cache operations. Each kind maps to exactly one gRPC code in the
/// server (see [`CacheError::code_name`]); every request-validation kind names
/// the offending field, and a failed request changes nothing.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CacheError {
    /// A request field is malformed. → `InvalidArgument`.
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// The namespace id names no registered namespace. → `NotFound`.
    #[error("{field}: namespace {namespace} is not registered")]
    UnknownNamespace { field: String, namespace: String },
    /// A batch is larger than the configured limit. → `ResourceExhausted`.
    #[error("{field}: batch of {len} exceeds the limit of {max}")]
    BatchTooLarge {
        field: String,
        len: usize,
        max: usize,
    },
    /// The operation needs a cached block that is not there. → `FailedPrecondition`.
    #[error("{field}: block {key} is not cached")]
    BlockNotCached { field: String, key: String },
    /// No such lease (never granted, ended or expired). → `NotFound`.
    #[error("lease_id: lease {0} does not exist (ended or expired)")]
    LeaseNotFound(u64),
    /// A namespace's blocks do not fit the tiers' slots. → `InvalidArgument`.
    #[error(
        "{field}: block of {block_bytes} bytes is larger than the largest block every tier can hold ({max} bytes)"
    )]
    BlockTooLarge {
        field: String,
        block_bytes: u64,
        max: u64,
    },
    /// The operation needs a tier the daemon was started without. → `FailedPrecondition`.
    #[error("{field}: the daemon has no {tier} tier (see `kvstrata serve --help`)")]
    TierNotConfigured { field: String, tier: &'static str },
    /// A GPU operation failed (allocation, copy, stream). → `Internal`.
    #[error("{field}: GPU operation failed: {reason}")]
    Device { field: String, reason: String },
    /// A write after [`crate::BlockCache::close`]: the cache is shutting
    /// down and takes no more puts, deletes or evictions. → `Unavailable`.
    #[error("the cache is closed (the daemon is shutting down)")]
    Closed,
}

/// A key, namespace id or spec that `kvstrata-types` refused: the same field
/// and reason, as [`CacheError::InvalidArgument`].
impl From<kvstrata_types::InvalidField> for CacheError {
    fn from(e: kvstrata_types::InvalidField) -> Self {
        CacheError::InvalidArgument {
            field: e.field,
            reason: e.reason,
        }
    }
}

impl CacheError {
    /// An [`CacheError::InvalidArgument`] naming `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        CacheError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// A [`CacheError::Device`] naming `field`.
    pub fn device(field: impl Into<String>, error: &kvstrata_kernels::GpuError) -> Self {
        CacheError::Device {
            field: field.into(),
            reason: error.to_string(),
        }
    }

    /// Name of the gRPC status code this error maps to.
    pub fn code_name(&self) -> &'static str {
        match self {
            CacheError::InvalidArgument { .. } | CacheError::BlockTooLarge { .. } => {
                "InvalidArgument"
            }
            CacheError::UnknownNamespace { .. } | CacheError::LeaseNotFound(_) => "NotFound",
            CacheError::BatchTooLarge { .. } => "ResourceExhausted",
            CacheError::BlockNotCached { .. } | CacheError::TierNotConfigured { .. } => {
                "FailedPrecondition"
            }
            CacheError::Device { .. } => "Internal",
            CacheError::Closed => "Unavailable",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_of_types_keep_their_field_and_message() {
        let e = kvstrata_types::BlockKey::new("items[2].key", &[]).unwrap_err();
        let message = e.to_string();
        let c = CacheError::from(e);
        assert_eq!(
            c,
            CacheError::invalid("items[2].key", "key must not be empty")
        );
        assert_eq!(c.to_string(), message);
        assert_eq!(c.code_name(), "InvalidArgument");
    }
}
