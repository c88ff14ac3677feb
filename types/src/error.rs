//! The one error type of the types crate: a value that names the field it
//! blames, as the wire request (or the on-disk record) spells it.

use thiserror::Error;

/// A field holds a value the type does not accept. Displays as
/// `field: reason` (`items[3].key: key must not be empty`), the form every
/// kvstrata error message takes; `kvstrata_tiers::CacheError` wraps it as
/// `InvalidArgument` with the same field and reason.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field}: {reason}")]
pub struct InvalidField {
    /// The offending field (`spec.head_dim`, `items[2].key`, `layer_stride`).
    pub field: String,
    /// Why its value is refused.
    pub reason: String,
}

impl InvalidField {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        InvalidField {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
