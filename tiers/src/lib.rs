//! kvstrata's storage core: namespaces and keys, the tiers that hold blocks, the
//! slot allocators and the eviction policy. It knows nothing of gRPC: the server
//! maps requests onto [`BlockCache`].

pub mod error;
pub mod key;
pub mod namespace;

pub use error::CacheError;
pub use key::{BlockKey, MAX_KEY_BYTES};
pub use namespace::{Dtype, Layout, Namespace, NamespaceId, NamespaceSpec};
