//! kvstrata's storage core: namespaces and keys, the tiers that hold blocks, the
//! slot allocators and the eviction policy. It knows nothing of gRPC: the server
//! maps requests onto [`BlockCache`].
//!
//! Data path: [`BlockCache::put_batch`] → [`Tier::put`] of the
//! [`HostTier`] → [`arena::SlotArena`] reservation, copy, publish;
//! [`BlockCache::get_batch`] → [`Tier::get`] → a `Bytes` that borrows the slot.

pub mod arena;
pub mod cache;
pub mod disk;
pub mod error;
pub mod events;
mod eviction;
pub mod host;
pub mod key;
pub mod movement;
pub mod namespace;
pub mod remote;
pub mod tier;

pub use cache::{BlockCache, CacheConfig, CacheStats, Inspection, LeaseInfo, OpenError, PutBlock};
pub use disk::{
    DiskError, DiskFileConfig, DiskPut, DiskStats, DiskTier, DiskTierConfig, Durability,
    EngineChoice, FaultPlan, HeaderInspection, VerifyReport,
};
pub use error::CacheError;
pub use events::{CacheEvent, EventBus, EventKind};
pub use host::{EvictionSink, HostTier, HostTierConfig, Victim};
pub use key::{BlockKey, MAX_KEY_BYTES};
pub use movement::{MovementConfig, MovementStats};
pub use namespace::{Dtype, Layout, Namespace, NamespaceId, NamespacePolicy, NamespaceSpec};
pub use remote::{RemoteError, RemoteStats, RemoteTier, RemoteTierConfig};
pub use tier::{BlockMeta, PutOutcome, RemoveOutcome, RemoveReason, Tier, TierKind, TierStats};
