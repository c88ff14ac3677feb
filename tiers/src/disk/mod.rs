//! `DiskTier` (T2): blocks in preallocated `O_DIRECT` slot files, indexed in
//! RocksDB, verified on every read, kept across restarts and crashes.
//!
//! # Modules
//!
//! - [`file`]: slot files (`fallocate`, `O_DIRECT`) and 4 KiB-aligned buffers.
//! - [`header`]: the self-describing slot header and its verification.
//! - [`io`]: the io_uring and pread/pwrite engines, the start-up probe,
//!   deadlines and the fault hook (`FaultPlan`, `testing` feature).
//! - [`index`]: the RocksDB index.
//! - [`checksum`]: xxh3-64 of payloads (AVX2 where the CPU has it).
//! - [`error`]: the error type, [`DiskError`].
//!
//! The tier itself is spread over files by behaviour: `config.rs` (the
//! settings), `meta.rs` (the in-memory block table, slots and LRU, behind
//! one lock), `write.rs` and `read.rs` (the batch paths), `stream.rs` (the
//! pipelined puts and gets), `recover.rs` (open and start-up recovery),
//! `verify.rs` (the slot verifier and header inspection), `stats.rs`
//! (counters and transfer bookkeeping) and `tier_impl.rs` (the
//! [`Tier`](crate::tier::Tier) trait).
//!
//! # Following a write and a read
//!
//! A write: [`DiskTier::put_many`] (`write.rs`) → `reserve_write` (a slot
//! from `Meta::reserve` in `meta.rs`, evicting through the shared LRU
//! policy) → `start_write` (header and payload into an aligned buffer,
//! hashed while copied) → an [`io::Batch`] on the engine → `publish_writes`
//! (the block enters `Meta` and one index `WriteBatch`, only once its data
//! has landed).
//!
//! A read: [`DiskTier::get_many`] → [`DiskTier::read_many`] (`read.rs`) →
//! `plan_read` (a reader count on each block, under the lock) →
//! `read_planned` (one [`io::Batch`] of slot reads) → `check_read`
//! ([`header::verify`]: the header against the index, the payload against
//! its xxh3) → a verified payload handed out without a copy, or
//! `drop_corrupt` for a slot that failed.
//!
//! # Layout
//!
//! Each configured file is carved by its own [`SlotArena`](crate::arena::SlotArena) into segments of
//! `segment_bytes`, each serving one slot size. A slot is a 4 KiB header
//! region plus the payload rounded up to 4 KiB (see [`header`]). Files are
//! created at their configured size and never grow: capacity is a hard limit.
//! The layout (format version, header size, segment size, file sizes) is
//! stored in the index; opening with another layout fails with
//! [`DiskError::LayoutMismatch`].
//!
//! # Write path and durability
//!
//! A put reserves a slot (evicting if needed) under the metadata lock, writes
//! header and payload in one direct write outside the lock, and only after
//! that write has completed publishes the block in memory and writes its
//! index entry (with the deletions of any blocks it evicted) as one RocksDB
//! `WriteBatch`. So:
//!
//! - a slot whose data landed but whose index entry did not is simply free
//!   after a restart (the free map is rebuilt from the index);
//! - an index entry whose slot holds anything else (torn write, reused slot,
//!   lost deletion) fails the header check on read and is dropped.
//!
//! [`Durability::ProcessCrash`] (default): `Stored` means the data write was
//! completed by the kernel (`O_DIRECT`, so it is not in the page cache) and
//! the index batch is in RocksDB's WAL (written, not fsynced). Everything
//! acknowledged survives a SIGKILL of the daemon; after a power loss some
//! recent blocks may be missing (never wrong).
//! [`Durability::PowerLoss`]: the files are opened `O_DSYNC` (each data write
//! is on stable media when it completes) and the WAL is fsynced before a put
//! returns.
//!
//! # Read path
//!
//! A get takes a reader count on the block (so its slot is not reused while
//! read), reads the whole slot, and verifies the header against the index
//! and the payload against its xxh3 ([`header::verify`]). A mismatch drops
//! the block from memory and index, counts `corrupt_blocks` and answers a
//! miss. An I/O error, short read or timeout counts `io_errors` or
//! `timeouts` and answers a miss, but leaves the block indexed: a transient
//! fault must not empty the tier, and the next read verifies again.
//!
//! # Batches and streams
//!
//! [`DiskTier::put_many`] and [`DiskTier::read_many`] / [`DiskTier::get_many`]
//! run one batch per call: all of the call's transfers are started together
//! (bounded only by the ring's size), with one deadline for the whole call,
//! and the call returns when its last transfer has completed. So every call
//! starts with an empty queue and ends draining it; a single caller issuing
//! calls of N blocks keeps fewer than N in flight on average.
//! [`DiskTier::put_stream`] and [`DiskTier::read_stream`] /
//! [`DiskTier::get_stream`] take a whole stream of blocks and a depth, keep
//! up to that many transfers in flight from the first block to the last
//! (an [`io::Pipeline`]: the next transfer starts as each completes,
//! before the finished one is verified or published), give each transfer
//! its own deadline, and answer each block through a callback as it
//! completes. Their checks are those of the batch calls: reads verified
//! (corrupt: dropped, counted, a miss), writes published in index batches
//! only after their data landed.
//!
//! # Eviction and access times
//!
//! Prefix-aware LRU as in the host tier: least recently used leaf first,
//! then inner blocks; pinned blocks and blocks being read never. When the
//! least recently used leaf is of another size class, its whole segment is
//! reclaimed, so capacity follows recency across block sizes. Access
//! times live in memory; [`DiskTier::persist_access`] writes the ones that
//! changed to the index (the tier does so when dropped), and start-up orders
//! the LRU by the persisted times.
//!
//! # Threads and blocking
//!
//! Every data-path call blocks its caller for at most its deadline
//! (`read_timeout`, `write_timeout`) plus the index write. The io_uring
//! engine runs one ring thread, the pread engine `io_threads` workers.
//!
//! # Closing
//!
//! [`DiskTier::close`] shuts the tier down in order, once: it waits for the
//! operations in flight (each holds the tier open while it runs) and
//! refuses writes from then on, stops the engine's threads once the kernel
//! has finished every transfer (abandoned ones included), writes the
//! access times and queued deletions to the index, then syncs, flushes and
//! closes the index, releasing its lock file, so the same directory can be
//! opened again at once. Afterwards the tier still answers reads, verified
//! as ever, with blocking `pread`s on the caller's thread (no deadline);
//! puts answer `NoSpace`, removes `Missing`, and calls that need the index
//! [`DiskError::Closed`]; nothing changes on disk. Dropping the last clone
//! of an open tier closes it the same way.

pub mod checksum;
mod config;
pub mod error;
pub mod file;
pub mod header;
pub mod index;
pub mod io;
mod meta;
mod read;
mod recover;
mod stats;
mod stream;
mod tier_impl;
mod verify;
mod write;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock, RwLockReadGuard};

use crate::events::EventBus;
use crate::key::BlockKey;
use crate::namespace::NamespaceId;
use crate::tier::TierCounters;

pub use config::{DiskFileConfig, DiskTierConfig, Durability};
pub use error::DiskError;
pub use header::{CorruptKind, SlotHeader};
#[cfg(feature = "testing")]
pub use io::FaultPlan;
pub use io::{EngineChoice, IoFailure};
pub use stats::DiskStats;

use file::{BufPool, SlotFile};
use index::IndexStore;
use io::{FaultCell, IoEngine};
use meta::Meta;
use stats::DiskCounters;

/// One block of [`DiskTier::put_many`].
#[derive(Debug, Clone, Copy)]
pub struct DiskPut<'a> {
    pub key: BlockKey,
    pub parent: Option<BlockKey>,
    pub payload: &'a [u8],
}

/// One block of [`DiskTier::put_stream`]: as [`DiskPut`], with a payload
/// the stream takes (`Bytes`, `Vec<u8>`, a borrowed slice, or any buffer
/// the caller recycles on drop). It is needed only until the tier has
/// copied it into its I/O buffer, when the block's write starts.
#[derive(Debug, Clone)]
pub struct StreamPut<P> {
    pub key: BlockKey,
    pub parent: Option<BlockKey>,
    pub payload: P,
}

/// One verified read of [`DiskTier::read_many`] or [`DiskTier::read_stream`].
#[derive(Debug, Clone)]
pub struct DiskRead {
    pub payload: Bytes,
    pub parent: Option<BlockKey>,
    /// Write sequence number of the slot read.
    pub seq: u64,
}

/// A slot that failed [`DiskTier::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptSlot {
    pub namespace: NamespaceId,
    pub key: BlockKey,
    pub file: PathBuf,
    pub offset: u64,
    pub slot_bytes: u64,
    pub reason: CorruptKind,
}

/// What [`DiskTier::verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub scanned: u64,
    pub corrupt: Vec<CorruptSlot>,
    /// Slots that could not be read (errno, short read or timeout); not judged.
    pub unreadable: Vec<(NamespaceId, BlockKey, IoFailure)>,
}

/// What [`DiskTier::inspect_header`] found in one slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderInspection {
    pub file: PathBuf,
    pub offset: u64,
    pub slot_bytes: u64,
    /// The index's record of the block.
    pub index_payload_len: u64,
    pub index_checksum: u64,
    pub index_seq: u64,
    /// The decoded header, or why it could not be decoded (magic, version, header checksum).
    pub header: Result<SlotHeader, CorruptKind>,
    /// The first check against the index that fails, if any.
    pub problem: Option<CorruptKind>,
    /// Whether the payload hashes to the header's recorded checksum.
    pub payload_checksum_ok: bool,
    /// xxh3-64 of the slot's payload bytes (the index's length of them), now.
    pub payload_xxh3: u64,
}

/// The tier's shared state; [`DiskTier`] clones share one.
struct Inner {
    /// Whether the tier is closed; every operation holds a read guard
    /// while it runs, so [`Inner::close`] waits for them.
    closed: RwLock<bool>,
    // Dropped first: stops the engine after the kernel is done with every buffer.
    engine: Box<dyn IoEngine>,
    meta: Arc<Mutex<Meta>>,
    files: Vec<SlotFile>,
    index: IndexStore,
    faults: Arc<FaultCell>,
    pool: Arc<BufPool>,
    counters: TierCounters,
    disk: DiskCounters,
    events: Arc<EventBus>,
    config: DiskTierConfig,
    capacity: u64,
    max_payload: u64,
}

impl Inner {
    /// The ordered close (module docs, "Closing"); later calls return `Ok`
    /// at once. Every step runs even if an earlier one failed; the first
    /// error is returned.
    fn close(&self) -> Result<(), DiskError> {
        // Waits for the operations in flight.
        let mut closed = self.closed.write();
        if *closed {
            return Ok(());
        }
        *closed = true;
        self.engine.shutdown();
        let persisted = meta::persist_access(&self.meta, &self.index);
        if let Err(e) = &persisted {
            tracing::warn!(error = %e, "disk tier: access times not persisted at close");
        }
        let index = self.index.close();
        if let Err(e) = &index {
            tracing::warn!(error = %e, "disk tier: index not flushed at close");
        }
        tracing::debug!("disk tier closed");
        persisted.and(index)
    }
}

impl Drop for Inner {
    /// The backstop of [`DiskTier::close`] (errors are logged there).
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// The disk tier. Cheap to clone (shared state).
#[derive(Clone)]
pub struct DiskTier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DiskTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskTier")
            .field("capacity", &self.inner.capacity)
            .field("engine", &self.inner.engine.name())
            .finish()
    }
}

/// Wall-clock milliseconds (access times persist across restarts).
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl DiskTier {
    /// Closes the tier in order (module docs, "Closing"): waits for the
    /// operations in flight, stops the I/O threads, persists access times
    /// and closes the index. Blocks until done (at most about one
    /// `write_timeout` for a write in flight, or the rest of a stream in
    /// flight); must not be called from a stream's callback. Idempotent:
    /// later calls return `Ok` at once. An error says which step failed
    /// (the others ran); the tier is closed either way.
    pub fn close(&self) -> Result<(), DiskError> {
        self.inner.close()
    }

    /// Whether [`DiskTier::close`] has run.
    pub fn is_closed(&self) -> bool {
        *self.inner.closed.read_recursive()
    }

    /// Holds the tier open for one operation ([`DiskTier::close`] waits
    /// for it); recursive, as a stream's callback may call the tier.
    /// Dereferences to whether the tier is closed.
    fn enter(&self) -> RwLockReadGuard<'_, bool> {
        self.inner.closed.read_recursive()
    }

    /// [`DiskTier::enter`] for an operation that changes the tier: `None`
    /// (and a warning naming `op`) once the tier is closed.
    fn enter_write(&self, op: &'static str) -> Option<RwLockReadGuard<'_, bool>> {
        let open = self.enter();
        if *open {
            tracing::warn!(op, "disk tier is closed: refused");
            return None;
        }
        Some(open)
    }

    /// "io_uring" or "pread".
    pub fn engine_name(&self) -> &'static str {
        self.inner.engine.name()
    }

    /// Whether the engine transfers through registered (fixed) buffers.
    pub fn fixed_buffers(&self) -> bool {
        self.inner.engine.fixed_buffers()
    }

    pub fn config(&self) -> &DiskTierConfig {
        &self.inner.config
    }

    /// Largest payload a block may have.
    pub fn max_payload_bytes(&self) -> u64 {
        self.inner.max_payload
    }

    /// Replaces the injected fault plan (tests, `testing` feature).
    #[cfg(feature = "testing")]
    pub fn set_fault_plan(&self, plan: FaultPlan) {
        self.inner.faults.set(plan);
    }

    /// Writes changed access times (and queued deletions) to the index.
    /// Cheap when nothing changed; call it periodically (e.g. every few
    /// seconds) so a restart keeps the LRU order. Returns entries written.
    pub fn persist_access(&self) -> Result<usize, DiskError> {
        meta::persist_access(&self.inner.meta, &self.inner.index)
    }

    /// Whether the block under the key is still the one written with `seq`.
    pub fn is_current(&self, ns: &NamespaceId, key: &BlockKey, seq: u64) -> bool {
        let meta = self.inner.meta.lock();
        meta.lookup(ns, key)
            .and_then(|id| meta.entries.get(id))
            .is_some_and(|e| e.seq == seq)
    }

    /// Whether the tier holds the key with a payload of this xxh3-64 (so
    /// writing it again would change nothing).
    pub fn holds(&self, ns: &NamespaceId, key: &BlockKey, checksum: u64) -> bool {
        let meta = self.inner.meta.lock();
        meta.lookup(ns, key)
            .and_then(|id| meta.entries.get(id))
            .is_some_and(|e| e.checksum == checksum)
    }

    /// Stores a namespace record (the cache's registry survives restarts in
    /// the index, next to the blocks that need it).
    pub fn save_namespace(&self, ns: &NamespaceId, record: &[u8]) -> Result<(), DiskError> {
        self.inner.index.put_namespace(ns, record)
    }

    /// Every namespace record saved so far.
    pub fn load_namespaces(&self) -> Result<Vec<(NamespaceId, Vec<u8>)>, DiskError> {
        self.inner.index.namespaces()
    }

    /// Where a block's slot is: (file path, byte offset, slot bytes). For
    /// tests (`testing` feature).
    #[cfg(feature = "testing")]
    pub fn slot_location(&self, ns: &NamespaceId, key: &BlockKey) -> Option<(PathBuf, u64, u64)> {
        let meta = self.inner.meta.lock();
        let id = meta.lookup(ns, key)?;
        let e = meta.entries.get(id)?;
        Some((
            self.inner.files[e.file as usize].path.clone(),
            e.offset,
            e.slot_bytes as u64,
        ))
    }
}
