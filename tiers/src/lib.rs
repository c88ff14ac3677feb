//! kvstrata's storage core: namespaces and keys, the tiers that hold blocks, the
//! slot allocators and the eviction policy. It knows nothing of gRPC: the server
//! maps requests onto [`BlockCache`].
//!
//! Data path: [`BlockCache::put_batch`] → [`Tier::put`] of the
//! [`HostTier`] → [`arena::SlotArena`] reservation, copy, publish;
//! [`BlockCache::get_batch`] → [`Tier::read_batch`] of each tier in the
//! cache's list (HBM, host, disk, remote) for what the faster ones missed →
//! a `Bytes` that borrows the host slot (or owns a copy from below).
//!
//! With GPUs ([`BlockCache::with_gpus`]): an [`HbmTier`] per device in front
//! of the host tier, whose arena is then pinned memory; the CUDA-IPC data
//! path goes through [`BlockCache::put_from_device`] and
//! [`BlockCache::get_to_device`].

pub mod arena;
pub mod cache;
pub mod disk;
pub mod error;
pub mod events;
mod eviction;
pub mod hbm;
pub mod host;
pub use kvstrata_types::key;
pub mod movement;
pub use kvstrata_types::namespace;
pub mod remote;
mod table;
pub mod tier;

pub use cache::{
    BlockCache, CacheConfig, CacheStats, DeviceMoves, DevicePutError, Inspection, LeaseInfo,
    OpenError, PutBlock,
};
#[cfg(feature = "testing")]
pub use disk::FaultPlan;
pub use disk::{
    DiskError, DiskFileConfig, DiskPut, DiskStats, DiskTier, DiskTierConfig, Durability,
    EngineChoice, HeaderInspection, VerifyReport,
};
pub use error::CacheError;
pub use events::{CacheEvent, EventBus, EventKind};
pub use hbm::{DEFAULT_MOVE_GROUP_BYTES, HbmRead, HbmSlot, HbmStats, HbmTier, HbmTierConfig};
pub use host::{ChecksumMismatch, EvictionSink, HostSlot, HostTier, HostTierConfig, Victim};
pub use key::{BlockKey, MAX_KEY_BYTES};
pub use kvstrata_kernels::Gpu;
pub use movement::{MovementConfig, MovementStats};
pub use namespace::{Dtype, Layout, Namespace, NamespaceId, NamespacePolicy, NamespaceSpec};
pub use remote::{RemoteError, RemoteStats, RemoteTier, RemoteTierConfig};
pub use tier::{
    BlockMeta, PutOutcome, RemoveOutcome, RemoveReason, Tier, TierInspection, TierKind, TierRead,
    TierStats,
};
