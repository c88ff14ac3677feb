//! The `Tier` trait: what every tier (HBM, host, disk) offers the cache, and
//! the types it speaks in.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

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
}
