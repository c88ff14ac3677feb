//! The `Tier` trait: what every tier (HBM, host, disk, remote) offers the
//! cache, and the types it speaks in.
//!
//! The cache keeps its tiers in one list, fastest first (HBM per device,
//! host, disk, remote), and its reads, lookups, pins, inspections, listings
//! and deletes walk that list through this trait, one call per tier and
//! batch ([`Tier::read_batch`], [`Tier::contains_batch`]). What only one tier
//! does (device copies, disk streams, queued writes) stays on its own type.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::disk::checksum::xxh3_64;
use crate::error::CacheError;
use crate::key::BlockKey;
use crate::namespace::NamespaceId;

/// Which tier. Ordered fastest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TierKind {
    Hbm,
    Host,
    Disk,
    /// The shared remote tier (a Redis/Valkey cluster).
    Remote,
}

impl TierKind {
    pub fn name(self) -> &'static str {
        match self {
            TierKind::Hbm => "hbm",
            TierKind::Host => "host",
            TierKind::Disk => "disk",
            TierKind::Remote => "remote",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "hbm" | "gpu" => Some(TierKind::Hbm),
            "host" | "dram" | "cpu" => Some(TierKind::Host),
            "disk" | "nvme" | "ssd" => Some(TierKind::Disk),
            "remote" | "redis" | "valkey" | "cluster" => Some(TierKind::Remote),
            _ => None,
        }
    }
}

/// Result of storing one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// Stored; any earlier block under the same key was replaced.
    Stored,
    /// No room: everything that could be evicted is pinned or being read.
    NoSpace,
    /// Not stored: the namespace's policy writes every put to disk before
    /// the acknowledgement (`sync_write_through`) and that write failed; an
    /// older block under the key was replaced (the key reads as a miss).
    DiskFailed,
}

/// Result of removing one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveOutcome {
    Removed,
    /// Left in place because it is pinned (only for evictions).
    Pinned,
    Missing,
}

/// Why a block is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveReason {
    /// Demoted or dropped to make room, or by an explicit `Evict`: skips pinned blocks.
    Evict,
    /// Deleted by a client: removes pinned blocks too.
    Delete,
}

/// What a tier knows about one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockMeta {
    pub namespace: NamespaceId,
    pub key: BlockKey,
    pub parent: Option<BlockKey>,
    pub tier: TierKind,
    pub payload_bytes: u64,
    /// Cached blocks (in this tier) that name this one as parent.
    pub children: u32,
    pub pins: u32,
    pub idle_ms: u64,
    /// xxh3-64 of the payload, recorded when it was written.
    pub checksum: u64,
}

/// A pin taken on a block: the block's identity plus the incarnation pinned,
/// so that releasing it never touches a newer block stored under the same key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinToken {
    pub namespace: NamespaceId,
    pub key: BlockKey,
    pub tier: TierKind,
    pub incarnation: u64,
}

/// One block read by [`Tier::read_batch`]: its exact bytes, and what the
/// cache needs to copy it into a faster tier.
#[derive(Debug, Clone)]
pub struct TierRead {
    pub payload: Bytes,
    pub parent: Option<BlockKey>,
    /// The version of the copy read, for [`Tier::is_current`] (the disk
    /// tier's write sequence; 0 where a tier keeps none).
    pub version: u64,
}

impl TierRead {
    /// A read of a tier that keeps no versions.
    pub fn unversioned(payload: Bytes, parent: Option<BlockKey>) -> Self {
        TierRead {
            payload,
            parent,
            version: 0,
        }
    }
}

/// A block's metadata with the xxh3-64 of its bytes computed now
/// ([`Tier::inspect`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierInspection {
    pub meta: BlockMeta,
    pub payload_xxh3: u64,
}

/// Occupancy and counters of one tier.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TierStats {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub blocks: u64,
    pub pinned_blocks: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub rejected_puts: u64,
}

/// Lock-free counters a tier bumps on its data path.
#[derive(Debug, Default)]
pub struct TierCounters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub evictions: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub rejected_puts: AtomicU64,
}

impl TierCounters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Copies the counters into `stats`.
    pub fn fill(&self, stats: &mut TierStats) {
        stats.hits = self.hits.load(Ordering::Relaxed);
        stats.misses = self.misses.load(Ordering::Relaxed);
        stats.evictions = self.evictions.load(Ordering::Relaxed);
        stats.bytes_in = self.bytes_in.load(Ordering::Relaxed);
        stats.bytes_out = self.bytes_out.load(Ordering::Relaxed);
        stats.rejected_puts = self.rejected_puts.load(Ordering::Relaxed);
    }
}

/// A storage tier. Implementations are internally synchronised; calls may
/// block for the time of a copy (the server runs them off the async executor).
pub trait Tier: Send + Sync {
    fn kind(&self) -> TierKind;

    /// Largest block this tier can hold.
    fn max_block_bytes(&self) -> u64;

    /// Stores a block, evicting unpinned blocks (leaves first, least recently
    /// used first) if it must.
    fn put(
        &self,
        ns: &NamespaceId,
        key: &BlockKey,
        parent: Option<&BlockKey>,
        payload: &[u8],
    ) -> PutOutcome;

    /// The exact bytes stored under the key, or `None`. The returned `Bytes`
    /// may keep the block's memory in use until it is dropped.
    fn get(&self, ns: &NamespaceId, key: &BlockKey) -> Option<Bytes>;

    /// Whether the key is cached here (does not count as an access).
    fn contains(&self, ns: &NamespaceId, key: &BlockKey) -> bool;

    /// Removes a block (see [`RemoveReason`]).
    fn remove(&self, ns: &NamespaceId, key: &BlockKey, reason: RemoveReason) -> RemoveOutcome;

    /// Pins every key or none: `Err(i)` names the first key that is not cached.
    fn pin(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Result<Vec<PinToken>, usize>;

    /// Releases a pin; a no-op if that incarnation of the block is gone.
    fn unpin(&self, token: &PinToken);

    /// Metadata of one block.
    fn meta(&self, ns: &NamespaceId, key: &BlockKey) -> Option<BlockMeta>;

    /// Up to `limit` blocks at or after `cursor` (an opaque position), filtered
    /// by namespace; returns the next cursor, or `None` at the end.
    fn list(
        &self,
        ns: Option<&NamespaceId>,
        cursor: u64,
        limit: usize,
    ) -> (Vec<BlockMeta>, Option<u64>);

    /// Keys of every block of a namespace held here.
    fn keys_of(&self, ns: &NamespaceId) -> Vec<BlockKey>;

    fn stats(&self) -> TierStats;

    /// [`Tier::get`] of many keys, one answer per key in order, each with
    /// its parent and version. `block_bytes` is the namespace's block size
    /// (a tier that verifies lengths checks it). Tiers answer a batch under
    /// one lock or one submission where they can.
    fn read_batch(
        &self,
        ns: &NamespaceId,
        keys: &[BlockKey],
        block_bytes: u64,
    ) -> Vec<Option<TierRead>> {
        let _ = block_bytes;
        keys.iter()
            .map(|k| {
                let payload = self.get(ns, k)?;
                let parent = self.meta(ns, k).and_then(|m| m.parent);
                Some(TierRead::unversioned(payload, parent))
            })
            .collect()
    }

    /// [`Tier::contains`] of many keys, one answer per key in order.
    fn contains_batch(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Vec<bool> {
        keys.iter().map(|k| self.contains(ns, k)).collect()
    }

    /// Whether the copy [`Tier::read_batch`] returned at `version` is still
    /// the one stored under the key (the cache promotes it only then).
    /// Tiers that keep no versions: always.
    fn is_current(&self, ns: &NamespaceId, key: &BlockKey, version: u64) -> bool {
        let _ = (ns, key, version);
        true
    }

    /// The block's metadata and the xxh3-64 of its bytes now, for `Inspect`
    /// (reports only: a tier whose read path drops corrupt blocks reads
    /// around it). Default: [`Tier::meta`] and a [`Tier::get`].
    fn inspect(
        &self,
        ns: &NamespaceId,
        key: &BlockKey,
    ) -> Result<Option<TierInspection>, CacheError> {
        let Some(meta) = self.meta(ns, key) else {
            return Ok(None);
        };
        Ok(self.get(ns, key).map(|bytes| TierInspection {
            meta,
            payload_xxh3: xxh3_64(&bytes),
        }))
    }
}
