//! `DiskTier` (T2): blocks in preallocated `O_DIRECT` slot files, indexed in
//! RocksDB, verified on every read, kept across restarts and crashes.
//!
//! # Modules
//!
//! - [`file`]: slot files (`fallocate`, `O_DIRECT`) and 4 KiB-aligned buffers.
//! - [`header`]: the self-describing slot header and its verification.
//! - [`engine`]: the io_uring and pread/pwrite engines, the start-up probe,
//!   deadlines and the fault hook ([`FaultPlan`]).
//! - [`index`]: the RocksDB index.
//!
//! # Layout
//!
//! Each configured file is carved by its own [`SlotArena`] into segments of
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
//! (an [`engine::Pipeline`]: the next transfer starts as each completes,
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
//! engine runs one ring thread, the pread engine `io_threads` workers; they
//! stop when the last clone of the tier is dropped (after the kernel has
//! finished every transfer still in flight).

pub mod checksum;
pub mod engine;
pub mod error;
pub mod file;
pub mod header;
pub mod index;

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

use hashbrown::HashTable;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use slab::Slab;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::arena::{SlotArena, SlotRef};
use crate::events::{EventBus, EventKind, PendingEvent};
use crate::eviction::{Evictable, LruSets, choose_victims};
use crate::key::BlockKey;
use crate::namespace::NamespaceId;
use crate::tier::{
    BlockMeta, PinToken, PutOutcome, RemoveOutcome, RemoveReason, Tier, TierCounters, TierKind,
    TierStats,
};

pub use engine::{EngineChoice, FaultPlan, IoFailure};
pub use error::DiskError;
pub use header::{CorruptKind, SlotHeader};

use checksum::{copy_and_xxh3_64, xxh3_64};
use engine::{FaultCell, IoDone, IoEngine, IoOp, OpKind, PreadEngine};
use file::{AlignedBuf, BufPool, SlotFile, align_up};
use header::{Expected, HEADER_REGION};
use index::{IndexBatch, IndexEntry, IndexStore};

/// One slot file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskFileConfig {
    pub path: PathBuf,
    /// Bytes preallocated for the file (a multiple of 4 KiB).
    pub size_bytes: u64,
}

/// What `Stored` guarantees (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Survives a crash or SIGKILL of the process.
    #[default]
    ProcessCrash,
    /// Survives power loss: `O_DSYNC` data writes and an fsynced WAL.
    PowerLoss,
}

/// Configuration of the disk tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskTierConfig {
    /// Slot files, one per drive; at least one. Their sizes add up to the capacity.
    pub files: Vec<DiskFileConfig>,
    /// Directory of the RocksDB index.
    pub index_dir: PathBuf,
    /// Segment size of the slot arenas; the largest slot (header included).
    /// A multiple of 4 KiB, at least 8 KiB. Default 64 MiB.
    pub segment_bytes: u64,
    /// I/O engine. Default `Auto` (io_uring if the probe passes).
    pub engine: EngineChoice,
    /// io_uring submission queue entries. Default 128.
    pub queue_depth: u32,
    /// Worker threads of the pread/pwrite engine. Default 8.
    pub io_threads: usize,
    /// A read slower than this is abandoned and answers a miss. Default 2 s.
    pub read_timeout: Duration,
    /// A write slower than this is abandoned and the put fails. Default 10 s.
    pub write_timeout: Duration,
    /// Default [`Durability::ProcessCrash`].
    pub durability: Durability,
    /// Aligned I/O buffers: the size of the region they are carved from,
    /// allocated at open (and, with io_uring and `fixed_buffers`, registered
    /// with the kernel, so pinned); also the most idle heap buffers kept
    /// once the region is used up. Default 64 MiB.
    pub buffer_pool_bytes: usize,
    /// io_uring: register the buffer region as fixed buffers (falls back to
    /// plain reads and writes, with a log line, where the kernel refuses).
    /// Default true.
    pub fixed_buffers: bool,
    /// Injected faults (tests). Default none.
    pub faults: FaultPlan,
}

impl Default for DiskTierConfig {
    fn default() -> Self {
        DiskTierConfig {
            files: Vec::new(),
            index_dir: PathBuf::new(),
            segment_bytes: 64 << 20,
            engine: EngineChoice::Auto,
            queue_depth: 128,
            io_threads: 8,
            read_timeout: Duration::from_secs(2),
            write_timeout: Duration::from_secs(10),
            durability: Durability::ProcessCrash,
            buffer_pool_bytes: 64 << 20,
            fixed_buffers: true,
            faults: FaultPlan::default(),
        }
    }
}

impl DiskTierConfig {
    /// One slot file `dir/slots-0.kvs` of `capacity` bytes and the index in
    /// `dir/index`; other settings default.
    pub fn in_dir(dir: &Path, capacity: u64) -> Self {
        DiskTierConfig {
            files: vec![DiskFileConfig {
                path: dir.join("slots-0.kvs"),
                size_bytes: capacity,
            }],
            index_dir: dir.join("index"),
            ..DiskTierConfig::default()
        }
    }

    fn layout(&self) -> String {
        let sizes: Vec<String> = self
            .files
            .iter()
            .map(|f| f.size_bytes.to_string())
            .collect();
        format!(
            "kvstrata-disk format={} header={} segment={} files={}",
            header::FORMAT_VERSION,
            HEADER_REGION,
            self.segment_bytes,
            sizes.join(",")
        )
    }

    fn validate(&self) -> Result<(), DiskError> {
        let a = file::ALIGN as u64;
        if self.files.is_empty() {
            return Err(DiskError::config(
                "files",
                "at least one slot file is needed",
            ));
        }
        if self.files.len() > u16::MAX as usize {
            return Err(DiskError::config("files", "too many slot files"));
        }
        if self.segment_bytes < 2 * a || !self.segment_bytes.is_multiple_of(a) {
            return Err(DiskError::config(
                "segment_bytes",
                "must be a multiple of 4096 and at least 8192",
            ));
        }
        if self.segment_bytes > u32::MAX as u64 {
            return Err(DiskError::config("segment_bytes", "must be below 4 GiB"));
        }
        for f in &self.files {
            if f.size_bytes < 2 * a || !f.size_bytes.is_multiple_of(a) {
                return Err(DiskError::config(
                    "files.size_bytes",
                    format!(
                        "{}: must be a multiple of 4096 and at least 8192",
                        f.path.display()
                    ),
                ));
            }
        }
        if self.index_dir.as_os_str().is_empty() {
            return Err(DiskError::config("index_dir", "must be set"));
        }
        if self.read_timeout.is_zero() || self.write_timeout.is_zero() {
            return Err(DiskError::config(
                "read_timeout",
                "timeouts must be positive",
            ));
        }
        Ok(())
    }
}

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

/// Disk-specific counters plus the tier's occupancy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskStats {
    pub tier: TierStats,
    /// "io_uring" or "pread".
    pub engine: &'static str,
    pub files: Vec<(PathBuf, u64)>,
    /// Slots that failed verification (dropped).
    pub corrupt_blocks: u64,
    /// Transfers that failed with an errno or were short; failed index writes.
    pub io_errors: u64,
    /// Transfers abandoned at their deadline.
    pub timeouts: u64,
    pub read_ops: u64,
    pub write_ops: u64,
    /// Bytes moved by successful transfers (headers and padding included).
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Wall time with at least one read (write) in flight.
    pub read_busy: Duration,
    pub write_busy: Duration,
}

impl DiskStats {
    /// Read throughput while busy, in bytes per second.
    pub fn read_bytes_per_sec(&self) -> f64 {
        rate(self.read_bytes, self.read_busy)
    }

    /// Write throughput while busy, in bytes per second.
    pub fn write_bytes_per_sec(&self) -> f64 {
        rate(self.write_bytes, self.write_busy)
    }
}

fn rate(bytes: u64, busy: Duration) -> f64 {
    if busy.is_zero() {
        0.0
    } else {
        bytes as f64 / busy.as_secs_f64()
    }
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

type IndexKey = (NamespaceId, BlockKey);
type FastMap<K, V> = HashMap<K, V, SeededXxh3>;

/// Keyed xxh3 for the in-memory maps: several times faster than SipHash on
/// 81-byte block keys (start-up inserts a million of them), and seeded per
/// process so that client-chosen keys cannot be aimed at one bucket.
#[derive(Debug, Clone)]
struct SeededXxh3 {
    seed: u64,
}

impl SeededXxh3 {
    fn random() -> Self {
        SeededXxh3 {
            seed: std::collections::hash_map::RandomState::new().hash_one(0x6b76_7374_7261_7461u64),
        }
    }
}

impl BuildHasher for SeededXxh3 {
    type Hasher = Xxh3Buf;

    fn build_hasher(&self) -> Xxh3Buf {
        Xxh3Buf {
            seed: self.seed,
            acc: 0,
            len: 0,
            buf: [0; 128],
        }
    }
}

const NO_OWNER: usize = usize::MAX;

/// Which entry owns each published slot: per file, per segment, by slot
/// index (dense vectors, grown on first use; no hashing on the data path).
#[derive(Debug, Default)]
struct SlotOwners {
    files: Vec<Vec<Vec<usize>>>,
}

impl SlotOwners {
    fn for_arenas(arenas: &[SlotArena]) -> Self {
        SlotOwners {
            files: arenas
                .iter()
                .map(|a| vec![Vec::new(); a.segment_count()])
                .collect(),
        }
    }

    fn get(&self, file: u16, slot: SlotRef) -> Option<usize> {
        let v = *self
            .files
            .get(file as usize)?
            .get(slot.segment as usize)?
            .get(slot.index as usize)?;
        (v != NO_OWNER).then_some(v)
    }

    fn set(&mut self, file: u16, slot: SlotRef, id: usize) {
        if let Some(v) = self
            .files
            .get_mut(file as usize)
            .and_then(|f| f.get_mut(slot.segment as usize))
        {
            let i = slot.index as usize;
            if v.len() <= i {
                v.resize(i + 1, NO_OWNER);
            }
            v[i] = id;
        }
    }

    fn clear(&mut self, file: u16, slot: SlotRef) {
        if let Some(v) = self
            .files
            .get_mut(file as usize)
            .and_then(|f| f.get_mut(slot.segment as usize))
            .and_then(|s| s.get_mut(slot.index as usize))
        {
            *v = NO_OWNER;
        }
    }
}

/// Buffers the (short) key and hashes it once in `finish`.
struct Xxh3Buf {
    seed: u64,
    acc: u64,
    len: usize,
    buf: [u8; 128],
}

/// (namespace, key) → slab id. Buckets hold only (hash, id), 16 bytes a
/// block; keys are compared against the slab entries. Small buckets keep
/// start-up (a million inserts) and lookups cache- and TLB-friendly.
struct KeyIndex {
    table: HashTable<(u64, usize)>,
    hasher: SeededXxh3,
}

impl KeyIndex {
    fn with_capacity(n: usize, hasher: SeededXxh3) -> Self {
        KeyIndex {
            table: HashTable::with_capacity(n),
            hasher,
        }
    }

    fn hash(&self, ns: &NamespaceId, key: &BlockKey) -> u64 {
        self.hasher.hash_one((ns, key))
    }

    fn get(&self, entries: &Slab<Entry>, ns: &NamespaceId, key: &BlockKey) -> Option<usize> {
        let h = self.hash(ns, key);
        self.table
            .find(h, |&(eh, id)| {
                eh == h
                    && entries
                        .get(id)
                        .is_some_and(|e| e.ns == *ns && e.key == *key)
            })
            .map(|&(_, id)| id)
    }

    /// Adds an id whose key is not in the table.
    fn insert_new(&mut self, hash: u64, id: usize) {
        self.table.insert_unique(hash, (hash, id), |&(h, _)| h);
    }

    fn remove_id(&mut self, hash: u64, id: usize) {
        if let Ok(e) = self.table.find_entry(hash, |&(h, i)| h == hash && i == id) {
            e.remove();
        }
    }

    fn len(&self) -> usize {
        self.table.len()
    }

    fn ids(&self) -> impl Iterator<Item = usize> + '_ {
        self.table.iter().map(|&(_, id)| id)
    }
}

impl Hasher for Xxh3Buf {
    fn write(&mut self, bytes: &[u8]) {
        if self.len + bytes.len() > self.buf.len() {
            self.acc = xxh3_64_with_seed(&self.buf[..self.len], self.seed ^ self.acc);
            self.len = 0;
            if bytes.len() > self.buf.len() {
                self.acc = xxh3_64_with_seed(bytes, self.seed ^ self.acc);
                return;
            }
        }
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    fn finish(&self) -> u64 {
        xxh3_64_with_seed(&self.buf[..self.len], self.seed ^ self.acc)
    }
}

#[derive(Debug)]
struct Entry {
    ns: NamespaceId,
    key: BlockKey,
    /// `KeyIndex::hash` of (ns, key).
    hash: u64,
    parent: Option<BlockKey>,
    file: u16,
    slot: SlotRef,
    slot_bytes: usize,
    offset: u64,
    len: u64,
    checksum: u64,
    seq: u64,
    tick: u64,
    last_access_ms: u64,
    access_dirty: bool,
    pins: u32,
    readers: u32,
    live: bool,
    incarnation: u64,
}

impl Entry {
    fn index_entry(&self) -> IndexEntry {
        IndexEntry {
            file: self.file,
            segment: self.slot.segment,
            slot: self.slot.index,
            slot_bytes: self.slot_bytes as u32,
            offset: self.offset,
            payload_len: self.len,
            checksum: self.checksum,
            seq: self.seq,
            last_access_ms: self.last_access_ms,
            parent: self.parent,
        }
    }
}

/// Sequence numbers are reserved in the index in steps of this many.
const SEQ_STEP: u64 = 1 << 20;

struct Meta {
    arenas: Vec<SlotArena>,
    entries: Slab<Entry>,
    index: KeyIndex,
    /// Cached blocks per parent (by key hash), whether or not the parent is cached.
    child_count: FastMap<u64, u32>,
    sets: LruSets,
    slot_owner: SlotOwners,
    tick: u64,
    next_incarnation: u64,
    pinned_blocks: u64,
    next_seq: u64,
    seq_watermark: u64,
    next_file: usize,
    /// Index deletions not yet written (blocks evicted by a reservation).
    pending_deletes: Vec<IndexKey>,
    /// Entries whose access time changed since the last `persist_access`.
    dirty_access: Vec<usize>,
}

impl Meta {
    fn lookup(&self, ns: &NamespaceId, key: &BlockKey) -> Option<usize> {
        self.index.get(&self.entries, ns, key)
    }

    fn children(&self, hash: u64) -> u32 {
        self.child_count.get(&hash).copied().unwrap_or(0)
    }

    fn set_insert(&mut self, id: usize) {
        let Some(e) = self.entries.get(id) else {
            return;
        };
        if !e.live || e.pins > 0 {
            return;
        }
        let leaf = self.children(e.hash) == 0;
        let (tick, slot_bytes) = (e.tick, e.slot_bytes);
        self.sets.insert(slot_bytes, tick, id, leaf);
    }

    fn set_remove(&mut self, id: usize) {
        let Some(e) = self.entries.get(id) else {
            return;
        };
        let (class, tick) = (e.slot_bytes, e.tick);
        self.sets.remove(class, tick);
    }

    fn touch(&mut self, id: usize, now_ms: u64) {
        self.set_remove(id);
        self.tick += 1;
        let tick = self.tick;
        let mut newly_dirty = false;
        if let Some(e) = self.entries.get_mut(id) {
            e.tick = tick;
            e.last_access_ms = now_ms;
            newly_dirty = !e.access_dirty;
            e.access_dirty = true;
        }
        if newly_dirty {
            self.dirty_access.push(id);
        }
        self.set_insert(id);
    }

    fn reclassify(&mut self, ns: &NamespaceId, key: &BlockKey) {
        if let Some(pid) = self.lookup(ns, key) {
            self.set_remove(pid);
            self.set_insert(pid);
        }
    }

    fn add_child(&mut self, ns: &NamespaceId, parent: &BlockKey) {
        let c = self
            .child_count
            .entry(self.index.hash(ns, parent))
            .or_insert(0);
        *c += 1;
        if *c == 1 {
            self.reclassify(ns, parent);
        }
    }

    fn remove_child(&mut self, ns: &NamespaceId, parent: &BlockKey) {
        let k = self.index.hash(ns, parent);
        if let Some(c) = self.child_count.get_mut(&k) {
            *c -= 1;
            if *c == 0 {
                self.child_count.remove(&k);
                self.reclassify(ns, parent);
            }
        }
    }

    /// Takes a block out of memory and queues its index deletion. Its slot is
    /// freed now, or by its last reader.
    fn unlink(&mut self, id: usize, kind: EventKind) -> Option<PendingEvent> {
        self.set_remove(id);
        let (ns, key, hash, parent, pins) = {
            let e = self.entries.get_mut(id)?;
            if !e.live {
                return None;
            }
            e.live = false;
            (e.ns, e.key, e.hash, e.parent, e.pins)
        };
        if pins > 0 {
            self.pinned_blocks -= 1;
        }
        self.index.remove_id(hash, id);
        self.pending_deletes.push((ns, key));
        if let Some(p) = parent {
            self.remove_child(&ns, &p);
        }
        self.release_if_unused(id);
        Some(PendingEvent {
            kind,
            namespace: ns,
            key,
            parent,
            tier: TierKind::Disk,
        })
    }

    fn release_if_unused(&mut self, id: usize) {
        let free = matches!(self.entries.get(id), Some(e) if !e.live && e.readers == 0);
        if free {
            let e = self.entries.remove(id);
            self.slot_owner.clear(e.file, e.slot);
            if let Some(a) = self.arenas.get_mut(e.file as usize) {
                a.free(e.slot);
            }
        }
    }

    /// A segment (of any file) of another class whose blocks can all be
    /// evicted now, with the fewest live blocks.
    fn pick_reclaim(&self, slot_bytes: usize) -> Option<Vec<usize>> {
        let mut best: Option<(u32, Vec<usize>)> = None;
        for (f, arena) in self.arenas.iter().enumerate() {
            // A segment of this file cannot hold the slot at all.
            if arena.max_slot_bytes() < slot_bytes {
                continue;
            }
            for (seg, seg_slot_bytes, live) in arena.foreign_segments(slot_bytes) {
                if best.as_ref().is_some_and(|(n, _)| *n <= live) {
                    continue;
                }
                let mut owners = Vec::with_capacity(live as usize);
                let mut ok = true;
                for index in 0..arena.slots_per_segment(seg_slot_bytes) {
                    if let Some(id) = self.slot_owner.get(
                        f as u16,
                        SlotRef {
                            segment: seg,
                            index,
                        },
                    ) {
                        match self.entries.get(id) {
                            Some(e) if e.live && e.pins == 0 && e.readers == 0 => owners.push(id),
                            _ => {
                                ok = false;
                                break;
                            }
                        }
                    }
                }
                if ok && owners.len() as u32 == live {
                    best = Some((live, owners));
                }
            }
        }
        best.map(|(_, owners)| owners)
    }

    /// A free slot of `slot_bytes`, evicting as needed; `None` if nothing can go.
    fn reserve(
        &mut self,
        slot_bytes: usize,
        events: &mut Vec<PendingEvent>,
        counters: &TierCounters,
    ) -> Option<(u16, SlotRef)> {
        loop {
            let n = self.arenas.len();
            for k in 0..n {
                let f = (self.next_file + k) % n;
                if let Some(slot) = self.arenas[f].alloc(slot_bytes) {
                    self.next_file = (f + 1) % n;
                    return Some((f as u16, slot));
                }
            }
            let victims = choose_victims(self, slot_bytes)?;
            for id in victims {
                if let Some(ev) = self.unlink(id, EventKind::Evicted) {
                    TierCounters::add(&counters.evictions, 1);
                    events.push(ev);
                }
            }
        }
    }

    /// Every block of the segment holding `id`, if all of them can be evicted
    /// now and the freed segment can hold a slot of `slot_bytes`.
    fn reclaimable_segment_of(&self, id: usize, slot_bytes: usize) -> Option<Vec<usize>> {
        let e = self.entries.get(id)?;
        let arena = self.arenas.get(e.file as usize)?;
        if arena.max_slot_bytes() < slot_bytes {
            return None;
        }
        let segment = e.slot.segment;
        let mut owners = Vec::new();
        for index in 0..arena.slots_per_segment(e.slot_bytes) {
            if let Some(owner) = self.slot_owner.get(e.file, SlotRef { segment, index }) {
                match self.entries.get(owner) {
                    Some(o) if o.live && o.pins == 0 && o.readers == 0 => owners.push(owner),
                    _ => return None,
                }
            }
        }
        // Slots counted live without an owner are reserved by writers.
        (owners.len() as u32 == arena.segment_live(segment)).then_some(owners)
    }

    fn meta_of(&self, e: &Entry, now_ms: u64) -> BlockMeta {
        BlockMeta {
            namespace: e.ns,
            key: e.key,
            parent: e.parent,
            tier: TierKind::Disk,
            payload_bytes: e.len,
            children: self.children(e.hash),
            pins: e.pins,
            idle_ms: now_ms.saturating_sub(e.last_access_ms),
            checksum: e.checksum,
        }
    }

    /// Moves the queued deletions into `batch` (they must precede its puts).
    fn drain_deletes(&mut self, batch: &mut IndexBatch) {
        for (ns, key) in self.pending_deletes.drain(..) {
            batch.delete(&ns, &key);
        }
    }
}

impl Evictable for Meta {
    fn sets(&self) -> &LruSets {
        &self.sets
    }

    fn idle(&self, id: usize) -> bool {
        self.entries.get(id).is_some_and(|e| e.readers == 0)
    }

    fn whole_segment_of(&self, id: usize, class: usize) -> Option<Vec<usize>> {
        self.reclaimable_segment_of(id, class)
    }

    fn any_reclaimable_segment(&self, class: usize) -> Option<Vec<usize>> {
        self.pick_reclaim(class)
    }
}

/// Wall time during which at least one transfer of a kind was in flight.
#[derive(Debug, Default)]
struct BusyClock {
    state: Mutex<(u32, Option<Instant>)>,
    busy_ns: AtomicU64,
}

impl BusyClock {
    fn enter(&self) {
        let mut s = self.state.lock();
        if s.0 == 0 {
            s.1 = Some(Instant::now());
        }
        s.0 += 1;
    }

    fn exit(&self) {
        let mut s = self.state.lock();
        s.0 = s.0.saturating_sub(1);
        if s.0 == 0
            && let Some(t) = s.1.take()
        {
            self.busy_ns
                .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
    }

    fn get(&self) -> Duration {
        Duration::from_nanos(self.busy_ns.load(Ordering::Relaxed))
    }

    /// Counts as busy until the guard drops (also when a caller's callback
    /// panics meanwhile).
    fn busy(&self) -> Busy<'_> {
        self.enter();
        Busy(self)
    }
}

/// A transfer phase counted by a [`BusyClock`] ([`BusyClock::busy`]).
struct Busy<'a>(&'a BusyClock);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.exit();
    }
}

/// The writes a [`DiskTier::put_stream`] has in flight, each with its
/// reserved slot. If the caller's callback panics, dropping this waits for
/// them (each up to its deadline) and frees the slots of those that
/// completed, unpublished; a write abandoned at its deadline frees its slot
/// through its late hook, as always. On the normal path nothing is left.
struct StreamWrites<'a, 'e> {
    meta: &'a Mutex<Meta>,
    pipe: engine::Pipeline<'e>,
    /// (pipeline index, write).
    open: Vec<(usize, PlannedWrite)>,
}

impl Drop for StreamWrites<'_, '_> {
    fn drop(&mut self) {
        let mut done = Vec::new();
        while !self.open.is_empty() {
            self.pipe.wait_some(&mut done);
            for (index, d) in done.drain(..) {
                let Some(k) = self.open.iter().position(|(i, _)| *i == index) else {
                    continue;
                };
                let (_, p) = self.open.swap_remove(k);
                // A timed-out write frees its slot through its late hook.
                if !matches!(d.result, Err(IoFailure::Timeout))
                    && let Some(a) = self.meta.lock().arenas.get_mut(p.file as usize)
                {
                    a.free(p.slot);
                }
            }
        }
    }
}

/// The reader counts a [`DiskTier::read_stream`] holds: reads in flight and
/// reads finished but not yet released. Dropping it releases them all, so a
/// caller's callback that panics leaves no slot pinned by a reader count (an
/// abandoned read still in flight reads into a buffer the engine keeps, and
/// nobody looks at what it reads).
struct StreamReads<'a> {
    meta: &'a Mutex<Meta>,
    /// (pipeline index, key index, plan).
    open: Vec<(usize, usize, PlannedRead)>,
    /// (entry id, incarnation) of finished reads.
    release: Vec<(usize, u64)>,
}

impl Drop for StreamReads<'_> {
    fn drop(&mut self) {
        if self.open.is_empty() && self.release.is_empty() {
            return;
        }
        let mut meta = self.meta.lock();
        let open = self.open.drain(..).map(|(_, _, p)| (p.id, p.incarnation));
        for (id, incarnation) in self.release.drain(..).chain(open) {
            release_read(&mut meta, id, incarnation);
        }
    }
}

#[derive(Debug, Default)]
struct DiskCounters {
    corrupt_blocks: AtomicU64,
    io_errors: AtomicU64,
    timeouts: AtomicU64,
    read_ops: AtomicU64,
    write_ops: AtomicU64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    read_busy: BusyClock,
    write_busy: BusyClock,
}

struct Inner {
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

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = persist_access(&self.meta, &self.index) {
            tracing::warn!(error = %e, "disk tier: access times not persisted at shutdown");
        }
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn persist_access(meta: &Mutex<Meta>, index: &IndexStore) -> Result<usize, DiskError> {
    let mut meta = meta.lock();
    let mut batch = IndexBatch::default();
    meta.drain_deletes(&mut batch);
    let dirty = std::mem::take(&mut meta.dirty_access);
    let mut n = 0;
    for id in dirty {
        if let Some(e) = meta.entries.get_mut(id)
            && e.access_dirty
        {
            e.access_dirty = false;
            if e.live {
                batch.put(&e.ns, &e.key, &e.index_entry());
                n += 1;
            }
        }
    }
    index.write(batch)?;
    Ok(n)
}

/// A block being read: where, and what the index says it holds.
struct PlannedRead {
    id: usize,
    incarnation: u64,
    ns: NamespaceId,
    key: BlockKey,
    parent: Option<BlockKey>,
    file: u16,
    offset: u64,
    slot_bytes: usize,
    len: u64,
    checksum: u64,
    seq: u64,
}

impl PlannedRead {
    /// What the slot must hold, according to the index.
    fn expected(&self) -> Expected<'_> {
        Expected {
            namespace: &self.ns,
            key: &self.key,
            parent: self.parent.as_ref(),
            payload_len: self.len,
            checksum: self.checksum,
            seq: self.seq,
        }
    }
}

/// Takes a reader count on block `id` (so its slot is not reused while
/// read) and says what to read; touches it first if `touch`.
fn plan_read(meta: &mut Meta, id: usize, touch: bool, now_ms: u64) -> Option<PlannedRead> {
    if touch {
        meta.touch(id, now_ms);
    }
    let e = meta.entries.get_mut(id)?;
    if !e.live {
        return None;
    }
    e.readers += 1;
    Some(PlannedRead {
        id,
        incarnation: e.incarnation,
        ns: e.ns,
        key: e.key,
        parent: e.parent,
        file: e.file,
        offset: e.offset,
        slot_bytes: e.slot_bytes,
        len: e.len,
        checksum: e.checksum,
        seq: e.seq,
    })
}

/// Drops a reader count taken by [`plan_read`] (freeing the slot if the
/// block was unlinked meanwhile and this was its last reader).
fn release_read(meta: &mut Meta, id: usize, incarnation: u64) {
    if let Some(e) = meta.entries.get_mut(id)
        && e.incarnation == incarnation
    {
        e.readers = e.readers.saturating_sub(1);
    }
    meta.release_if_unused(id);
}

/// Judges a finished read of `p`'s slot: the header must match the index
/// and the payload its xxh3 ([`header::verify`]).
fn check_read(p: &PlannedRead, d: IoDone) -> ReadOutcome {
    match (d.result, d.buf) {
        (Ok(()), Some(buf)) => match header::verify(buf.as_slice(), &p.expected()) {
            Ok(_) => ReadOutcome::Good(buf),
            Err(kind) => ReadOutcome::Corrupt(kind),
        },
        (Ok(()), None) => ReadOutcome::Failed(IoFailure::Shutdown),
        (Err(f), _) => ReadOutcome::Failed(f),
    }
}

impl PlannedRead {
    /// The verified payload, handed out without a copy.
    fn verified_read(&self, buf: AlignedBuf) -> DiskRead {
        DiskRead {
            payload: Bytes::from_owner(Payload {
                buf,
                len: self.len as usize,
            }),
            parent: self.parent,
            seq: self.seq,
        }
    }
}

enum ReadOutcome {
    Good(AlignedBuf),
    Corrupt(CorruptKind),
    Failed(IoFailure),
}

/// A slot being written.
struct PlannedWrite {
    /// Position of the block in the caller's items.
    item: usize,
    key: BlockKey,
    parent: Option<BlockKey>,
    /// Payload bytes.
    len: u64,
    /// xxh3-64 of the payload, once the buffer is filled.
    checksum: u64,
    file: u16,
    slot: SlotRef,
    slot_bytes: usize,
    offset: u64,
    seq: u64,
}

/// The payload of a verified read, handed out without a copy.
struct Payload {
    buf: AlignedBuf,
    len: usize,
}

impl AsRef<[u8]> for Payload {
    fn as_ref(&self) -> &[u8] {
        &self.buf.as_slice()[HEADER_REGION..HEADER_REGION + self.len]
    }
}

impl DiskTier {
    /// Opens (or creates) the tier: validates the config, opens the index and
    /// checks the layout, creates or opens the slot files, picks the I/O
    /// engine, and rebuilds the block table and free-slot state from the
    /// index. Blocks only as long as reading the index takes (O(entries)).
    pub fn open(config: &DiskTierConfig, events: Arc<EventBus>) -> Result<Self, DiskError> {
        let started = Instant::now();
        config.validate()?;
        std::fs::create_dir_all(&config.index_dir).map_err(|source| DiskError::Io {
            path: config.index_dir.clone(),
            op: "create index directory",
            source,
        })?;
        let index = IndexStore::open(&config.index_dir)?;
        let layout = config.layout();
        let stored_layout = index.layout()?;
        if let Some(stored) = &stored_layout
            && stored != &layout
        {
            return Err(DiskError::LayoutMismatch {
                stored: stored.clone(),
                configured: layout,
            });
        }
        let dsync = config.durability == Durability::PowerLoss;
        let mut files = Vec::with_capacity(config.files.len());
        for f in &config.files {
            files.push(SlotFile::open(&f.path, f.size_bytes, dsync)?);
        }
        if stored_layout.is_none() {
            index.set_layout(&layout)?;
        }
        let faults = FaultCell::new(config.faults);
        // Buffers come from one region, which io_uring registers as fixed buffers.
        let pool = BufPool::with_arena(config.buffer_pool_bytes, config.buffer_pool_bytes);
        let engine = pick_engine(config, &faults, &files, &pool)?;

        let mut arenas = Vec::with_capacity(files.len());
        for f in &files {
            let (arena, _) = SlotArena::new(f.size, config.segment_bytes);
            arenas.push(arena);
        }
        let max_slot = arenas.iter().map(|a| a.max_slot_bytes()).min().unwrap_or(0);
        let max_payload = max_slot.saturating_sub(HEADER_REGION) as u64;
        let capacity = files.iter().map(|f| f.size).sum();

        let loaded = index.load()?;
        let hasher = SeededXxh3::random();
        let slot_owner = SlotOwners::for_arenas(&arenas);
        let mut meta = Meta {
            arenas,
            entries: Slab::with_capacity(loaded.entries.len()),
            index: KeyIndex::with_capacity(loaded.entries.len(), hasher.clone()),
            child_count: FastMap::with_capacity_and_hasher(loaded.entries.len(), hasher.clone()),
            sets: LruSets::default(),
            slot_owner,
            tick: 0,
            next_incarnation: 1,
            pinned_blocks: 0,
            next_seq: 1,
            seq_watermark: 0,
            next_file: 0,
            pending_deletes: Vec::new(),
            dirty_access: Vec::new(),
        };
        let mut cleanup = IndexBatch::default();
        for k in &loaded.undecodable {
            cleanup.delete_raw(k);
        }
        let (kept, dropped) = restore(
            &mut meta,
            &files,
            config.segment_bytes,
            loaded.entries,
            &mut cleanup,
        );
        let max_seq = meta.entries.iter().map(|(_, e)| e.seq).max().unwrap_or(0);
        let watermark = index.seq_watermark()?;
        meta.next_seq = (max_seq + 1).max(watermark);
        meta.seq_watermark = meta.next_seq + SEQ_STEP;
        cleanup.set_seq_watermark(meta.seq_watermark);
        let undecodable = loaded.undecodable.len();
        index.write(cleanup)?;
        index.sync()?;

        let tier = DiskTier {
            inner: Arc::new(Inner {
                engine,
                meta: Arc::new(Mutex::new(meta)),
                files,
                index,
                faults,
                pool,
                counters: TierCounters::default(),
                disk: DiskCounters::default(),
                events,
                config: config.clone(),
                capacity,
                max_payload,
            }),
        };
        let corrupt = (dropped + undecodable) as u64;
        TierCounters::add(&tier.inner.disk.corrupt_blocks, corrupt);
        tracing::info!(
            engine = tier.engine_name(),
            fixed_buffers = tier.fixed_buffers(),
            checksum = checksum::simd_path(),
            blocks = kept,
            dropped_entries = corrupt,
            capacity_bytes = capacity,
            open_ms = started.elapsed().as_millis() as u64,
            "disk tier open"
        );
        Ok(tier)
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

    /// Replaces the injected fault plan (tests and fault drills).
    pub fn set_fault_plan(&self, plan: FaultPlan) {
        self.inner.faults.set(plan);
    }

    /// Occupancy, counters, engine and throughput.
    pub fn disk_stats(&self) -> DiskStats {
        let d = &self.inner.disk;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DiskStats {
            tier: self.stats(),
            engine: self.engine_name(),
            files: self
                .inner
                .files
                .iter()
                .map(|f| (f.path.clone(), f.size))
                .collect(),
            corrupt_blocks: get(&d.corrupt_blocks),
            io_errors: get(&d.io_errors),
            timeouts: get(&d.timeouts),
            read_ops: get(&d.read_ops),
            write_ops: get(&d.write_ops),
            read_bytes: get(&d.read_bytes),
            write_bytes: get(&d.write_bytes),
            read_busy: d.read_busy.get(),
            write_busy: d.write_busy.get(),
        }
    }

    /// Writes changed access times (and queued deletions) to the index.
    /// Cheap when nothing changed; call it periodically (e.g. every few
    /// seconds) so a restart keeps the LRU order. Returns entries written.
    pub fn persist_access(&self) -> Result<usize, DiskError> {
        persist_access(&self.inner.meta, &self.inner.index)
    }

    /// Runs a batch of transfers with the right deadline and bookkeeping.
    fn transfer(&self, kind: OpKind, ops: Vec<IoOp>) -> Vec<IoDone> {
        let inner = &*self.inner;
        let d = &inner.disk;
        let (timeout, clock, ops_c, bytes_c) = match kind {
            OpKind::Read => (
                inner.config.read_timeout,
                &d.read_busy,
                &d.read_ops,
                &d.read_bytes,
            ),
            OpKind::Write => (
                inner.config.write_timeout,
                &d.write_busy,
                &d.write_ops,
                &d.write_bytes,
            ),
        };
        let lens: Vec<usize> = ops.iter().map(|o| o.buf.len()).collect();
        let busy = clock.busy();
        let done = engine::run(&*inner.engine, ops, Instant::now() + timeout);
        drop(busy);
        for (d_, len) in done.iter().zip(lens) {
            self.count(d_.result, ops_c, bytes_c, len);
        }
        done
    }

    /// Counts one finished transfer of `len` bytes.
    fn count(&self, result: Result<(), IoFailure>, ops: &AtomicU64, bytes: &AtomicU64, len: usize) {
        let d = &self.inner.disk;
        match result {
            Ok(()) => {
                TierCounters::add(ops, 1);
                TierCounters::add(bytes, len as u64);
            }
            Err(IoFailure::Timeout) => TierCounters::add(&d.timeouts, 1),
            Err(_) => TierCounters::add(&d.io_errors, 1),
        }
    }

    /// Stores blocks, writing all their slots as one batch of transfers.
    pub fn put_many(&self, ns: &NamespaceId, items: &[DiskPut<'_>]) -> Vec<PutOutcome> {
        self.put_many_if(ns, items, &|_| true)
    }

    /// [`DiskTier::put_many`], publishing item `i` only if `keep(i)` still
    /// holds once its data is on disk. `keep` runs under the tier's metadata
    /// lock, in the same critical section that publishes the block and writes
    /// its index entry, so a caller can order publication against its own
    /// invalidations (the cache uses it to drop demotions made stale by a
    /// newer put). `keep` must not call back into this tier. A dropped item
    /// answers `NoSpace` and its slot is freed.
    pub fn put_many_if(
        &self,
        ns: &NamespaceId,
        items: &[DiskPut<'_>],
        keep: &dyn Fn(usize) -> bool,
    ) -> Vec<PutOutcome> {
        let inner = &*self.inner;
        let mut out = vec![PutOutcome::NoSpace; items.len()];
        let mut events = Vec::new();
        let mut planned = Vec::with_capacity(items.len());
        {
            let mut meta = inner.meta.lock();
            for (i, it) in items.iter().enumerate() {
                if let Some(p) = self.reserve_write(
                    &mut meta,
                    i,
                    it.key,
                    it.parent,
                    it.payload.len(),
                    &mut events,
                ) {
                    planned.push(p);
                }
            }
        }
        let rejected = items.len() - planned.len();
        TierCounters::add(&inner.counters.rejected_puts, rejected as u64);
        if planned.is_empty() {
            inner.events.publish(events);
            return out;
        }

        let mut batch = engine::Batch::new(&*inner.engine, planned.len());
        let mut lens = Vec::with_capacity(planned.len());
        let deadline = Instant::now() + inner.config.write_timeout;
        let busy = inner.disk.write_busy.busy();
        let mut no_buffer = Vec::new();
        for (pi, p) in planned.iter_mut().enumerate() {
            let Some(op) = self.start_write(ns, p, items[p.item].payload) else {
                no_buffer.push(pi);
                continue;
            };
            lens.push(op.buf.len());
            // Each write starts as soon as its buffer is filled.
            batch.submit(op);
        }
        let done_v = batch.wait(deadline);
        drop(busy);
        for (d_, len) in done_v.iter().zip(lens) {
            self.count(
                d_.result,
                &inner.disk.write_ops,
                &inner.disk.write_bytes,
                len,
            );
        }
        let mut results: Vec<Result<(), IoFailure>> =
            done_v.into_iter().map(|d| d.result).collect();
        for &pi in &no_buffer {
            results.insert(pi, Err(IoFailure::Errno(libc::ENOMEM)));
        }
        let written: Vec<(PlannedWrite, Result<(), IoFailure>)> =
            planned.into_iter().zip(results).collect();
        let stored = self.publish_writes(ns, &written, &|p| keep(p.item), false);
        for &w in &stored {
            let p = &written[w].0;
            out[p.item] = PutOutcome::Stored;
            self.stored_event(ns, p, &mut events);
        }
        let failed = written.len() - stored.len();
        TierCounters::add(&inner.counters.rejected_puts, failed as u64);
        inner.events.publish(events);
        out
    }

    /// Reserves a slot for a block of `len` payload bytes (evicting as
    /// needed) and assigns its write sequence number; `None` when the block
    /// is empty, too large, or nothing can be evicted.
    fn reserve_write(
        &self,
        meta: &mut Meta,
        item: usize,
        key: BlockKey,
        parent: Option<BlockKey>,
        len: usize,
        events: &mut Vec<PendingEvent>,
    ) -> Option<PlannedWrite> {
        let inner = &*self.inner;
        if len == 0 || len as u64 > inner.max_payload {
            return None;
        }
        let slot_bytes = HEADER_REGION + align_up(len);
        let (file, slot) = meta.reserve(slot_bytes, events, &inner.counters)?;
        let offset = meta.arenas[file as usize].offset(slot) as u64;
        let seq = meta.next_seq;
        meta.next_seq += 1;
        if meta.next_seq >= meta.seq_watermark {
            let wm = meta.next_seq + SEQ_STEP;
            let mut b = IndexBatch::default();
            b.set_seq_watermark(wm);
            match inner.index.write(b) {
                Ok(()) => meta.seq_watermark = wm,
                Err(e) => {
                    tracing::warn!(error = %e, "disk tier: sequence watermark not written")
                }
            }
        }
        Some(PlannedWrite {
            item,
            key,
            parent,
            len: len as u64,
            checksum: 0,
            file,
            slot,
            slot_bytes,
            offset,
            seq,
        })
    }

    /// Fills a buffer with the slot (header, payload, zero padding), hashing
    /// the payload while copying it (into `p.checksum`), and returns the
    /// write; `None` when no buffer can be had.
    fn start_write(&self, ns: &NamespaceId, p: &mut PlannedWrite, payload: &[u8]) -> Option<IoOp> {
        let inner = &*self.inner;
        let Some(mut buf) = inner.pool.get(p.slot_bytes) else {
            p.checksum = xxh3_64(payload);
            return None;
        };
        let b = buf.as_mut_slice();
        let end = HEADER_REGION + payload.len();
        // One pass over the payload: copied into the buffer and hashed.
        p.checksum = copy_and_xxh3_64(&mut b[HEADER_REGION..end], payload);
        let header = SlotHeader {
            namespace: *ns,
            key: p.key,
            parent: p.parent,
            payload_len: payload.len() as u64,
            payload_xxh3: p.checksum,
            seq: p.seq,
        };
        header.encode(&mut b[..HEADER_REGION]);
        b[end..].fill(0);
        let weak: Weak<Mutex<Meta>> = Arc::downgrade(&inner.meta);
        let (file, slot) = (p.file, p.slot);
        // Releases the slot once a write abandoned at its deadline has finished.
        let on_late: Box<dyn FnOnce() + Send> = Box::new(move || {
            if let Some(m) = weak.upgrade()
                && let Some(a) = m.lock().arenas.get_mut(file as usize)
            {
                a.free(slot);
            }
        });
        Some(IoOp {
            kind: OpKind::Write,
            fd: inner.files[p.file as usize].fd(),
            offset: p.offset,
            buf,
            on_late: Some(on_late),
        })
    }

    /// Publishes finished writes: in memory, and as one index `WriteBatch`
    /// (with any queued deletions), all under the metadata lock, and only
    /// for writes whose data has landed. A write that failed frees its slot
    /// (an abandoned one is freed by its late hook), as does one that `keep`
    /// rejects or, with `newer_wins`, one whose key already holds a block of
    /// a later sequence number (it was replaced by a later put and counts as
    /// stored). With [`Durability::PowerLoss`] the WAL is synced before
    /// anything counts as stored. Returns the positions in `writes` of the
    /// blocks stored.
    fn publish_writes(
        &self,
        ns: &NamespaceId,
        writes: &[(PlannedWrite, Result<(), IoFailure>)],
        keep: &dyn Fn(&PlannedWrite) -> bool,
        newer_wins: bool,
    ) -> Vec<usize> {
        let inner = &*self.inner;
        let skip_index = inner.faults.get().drop_index_writes;
        let mut stored = Vec::new();
        let mut superseded = Vec::new();
        {
            let mut meta = inner.meta.lock();
            let mut puts: Vec<(IndexKey, IndexEntry)> = Vec::new();
            for (w, (p, result)) in writes.iter().enumerate() {
                match result {
                    Ok(()) if !skip_index && keep(p) => {}
                    // Abandoned: the late hook frees the slot.
                    Err(IoFailure::Timeout) => continue,
                    _ => {
                        meta.arenas[p.file as usize].free(p.slot);
                        continue;
                    }
                }
                if let Some(old) = meta.lookup(ns, &p.key) {
                    if newer_wins && meta.entries.get(old).is_some_and(|e| e.seq > p.seq) {
                        meta.arenas[p.file as usize].free(p.slot);
                        superseded.push(w);
                        continue;
                    }
                    // A replaced block emits no event of its own.
                    let _ = meta.unlink(old, EventKind::Deleted);
                }
                meta.tick += 1;
                let incarnation = meta.next_incarnation;
                meta.next_incarnation += 1;
                let hash = meta.index.hash(ns, &p.key);
                let entry = Entry {
                    ns: *ns,
                    key: p.key,
                    hash,
                    parent: p.parent,
                    file: p.file,
                    slot: p.slot,
                    slot_bytes: p.slot_bytes,
                    offset: p.offset,
                    len: p.len,
                    checksum: p.checksum,
                    seq: p.seq,
                    tick: meta.tick,
                    last_access_ms: now_ms(),
                    access_dirty: false,
                    pins: 0,
                    readers: 0,
                    live: true,
                    incarnation,
                };
                puts.push(((*ns, p.key), entry.index_entry()));
                let id = meta.entries.insert(entry);
                meta.slot_owner.set(p.file, p.slot, id);
                meta.index.insert_new(hash, id);
                if let Some(parent) = &p.parent {
                    meta.add_child(ns, parent);
                }
                meta.set_insert(id);
                stored.push((w, id));
            }
            let mut batch = IndexBatch::default();
            meta.drain_deletes(&mut batch);
            for ((n, k), e) in &puts {
                batch.put(n, k, e);
            }
            if let Err(e) = inner.index.write(batch) {
                tracing::error!(error = %e, "disk tier: index write failed; puts dropped");
                TierCounters::add(&inner.disk.io_errors, 1);
                for (_, id) in stored.drain(..) {
                    let _ = meta.unlink(id, EventKind::Deleted);
                }
            }
        }
        if inner.config.durability == Durability::PowerLoss
            && !stored.is_empty()
            && let Err(e) = inner.index.sync()
        {
            tracing::error!(error = %e, "disk tier: WAL sync failed; puts dropped");
            TierCounters::add(&inner.disk.io_errors, 1);
            let mut meta = inner.meta.lock();
            for (_, id) in stored.drain(..) {
                let _ = meta.unlink(id, EventKind::Deleted);
            }
        }
        let mut out: Vec<usize> = stored.into_iter().map(|(w, _)| w).collect();
        out.extend(superseded);
        out
    }

    /// Counts a stored block and queues its event.
    fn stored_event(&self, ns: &NamespaceId, p: &PlannedWrite, events: &mut Vec<PendingEvent>) {
        TierCounters::add(&self.inner.counters.bytes_in, p.len);
        events.push(PendingEvent {
            kind: EventKind::Stored,
            namespace: *ns,
            key: p.key,
            parent: p.parent,
            tier: TierKind::Disk,
        });
    }

    /// Stores a stream of blocks with up to `depth` writes in flight the
    /// whole time, like fio's `iodepth`: the window is filled at the start,
    /// and each time writes complete the next blocks' writes start (their
    /// slots reserved and buffers filled) before the finished ones are
    /// published, so the drive never waits for the caller between blocks.
    /// [`DiskTier::put_many`] instead starts with an empty queue and ends
    /// with its slowest write, every call.
    ///
    /// `items` is pulled lazily, only when a place in the window is free,
    /// and each payload is needed only until it has been copied into its
    /// I/O buffer, so a caller can generate payloads on the fly.
    /// `on_done(i, outcome)` answers item `i` (its position in `items`) as
    /// soon as its outcome is known: in completion order, not item order.
    /// `Stored` is answered only after the block's data has landed and its
    /// index entry is written; finished writes are published together, one
    /// index `WriteBatch` per wake-up, as in `put_many`. Each write has the
    /// tier's `write_timeout` from its own start; a failed, timed-out or
    /// refused block (empty, too large, no evictable space, no buffer)
    /// answers `NoSpace`. If the same key occurs twice in the stream, the
    /// later item's bytes are kept, whichever write completes first.
    /// Returns the number of blocks stored. If `on_done` panics, the panic
    /// reaches the caller once the writes in flight have completed and the
    /// slots of the unpublished ones are free again.
    pub fn put_stream<P, I>(
        &self,
        ns: &NamespaceId,
        items: I,
        depth: usize,
        mut on_done: impl FnMut(usize, PutOutcome),
    ) -> usize
    where
        I: IntoIterator<Item = StreamPut<P>>,
        P: AsRef<[u8]>,
    {
        let inner = &*self.inner;
        let depth = depth.max(1);
        let timeout = inner.config.write_timeout;
        let mut items = items.into_iter().enumerate();
        let mut exhausted = false;
        // Writes in flight, with their pipeline index; on a panic in
        // `on_done`, their slots are given back when they complete.
        let mut held = StreamWrites {
            meta: &inner.meta,
            pipe: engine::Pipeline::new(&*inner.engine, depth),
            open: Vec::with_capacity(depth),
        };
        let StreamWrites { pipe, open, .. } = &mut held;
        let mut finished: Vec<(PlannedWrite, Result<(), IoFailure>)> = Vec::new();
        let mut done = Vec::with_capacity(depth);
        let mut pulled: Vec<(usize, StreamPut<P>)> = Vec::with_capacity(depth);
        let mut planned: Vec<Option<PlannedWrite>> = Vec::with_capacity(depth);
        let mut refused: Vec<usize> = Vec::new();
        let mut events = Vec::new();
        let mut stored_total = 0usize;
        let busy = inner.disk.write_busy.busy();
        loop {
            // Refill the window; a refused item does not take a place.
            while !exhausted && open.len() < depth {
                pulled.clear();
                while open.len() + pulled.len() < depth {
                    match items.next() {
                        Some(it) => pulled.push(it),
                        None => {
                            exhausted = true;
                            break;
                        }
                    }
                }
                if pulled.is_empty() {
                    break;
                }
                planned.clear();
                {
                    let mut meta = inner.meta.lock();
                    for (i, it) in &pulled {
                        planned.push(self.reserve_write(
                            &mut meta,
                            *i,
                            it.key,
                            it.parent,
                            it.payload.as_ref().len(),
                            &mut events,
                        ));
                    }
                }
                for ((i, it), p) in pulled.drain(..).zip(planned.drain(..)) {
                    let Some(mut p) = p else {
                        refused.push(i);
                        continue;
                    };
                    match self.start_write(ns, &mut p, it.payload.as_ref()) {
                        Some(op) => {
                            let index = pipe.push(op, Instant::now() + timeout);
                            // Each write starts as soon as its buffer is filled.
                            pipe.flush();
                            open.push((index, p));
                        }
                        None => finished.push((p, Err(IoFailure::Errno(libc::ENOMEM)))),
                    }
                }
            }
            // The window is full again: now publish what finished.
            if !refused.is_empty() {
                TierCounters::add(&inner.counters.rejected_puts, refused.len() as u64);
                for i in refused.drain(..) {
                    on_done(i, PutOutcome::NoSpace);
                }
            }
            if !finished.is_empty() {
                let stored = self.publish_writes(ns, &finished, &|_| true, true);
                let mut ok = vec![false; finished.len()];
                for &w in &stored {
                    ok[w] = true;
                    self.stored_event(ns, &finished[w].0, &mut events);
                }
                stored_total += stored.len();
                let failed = finished.len() - stored.len();
                TierCounters::add(&inner.counters.rejected_puts, failed as u64);
                for ((p, _), ok) in finished.drain(..).zip(ok) {
                    let outcome = if ok {
                        PutOutcome::Stored
                    } else {
                        PutOutcome::NoSpace
                    };
                    on_done(p.item, outcome);
                }
            }
            if !events.is_empty() {
                inner.events.publish(std::mem::take(&mut events));
            }
            if open.is_empty() {
                if exhausted {
                    break;
                }
                continue;
            }
            pipe.wait_some(&mut done);
            for (index, d) in done.drain(..) {
                let Some(k) = open.iter().position(|(i, _)| *i == index) else {
                    continue;
                };
                let (_, p) = open.swap_remove(k);
                let len = d.buf.as_ref().map_or(p.slot_bytes, |b| b.len());
                self.count(
                    d.result,
                    &inner.disk.write_ops,
                    &inner.disk.write_bytes,
                    len,
                );
                finished.push((p, d.result));
            }
        }
        drop(busy);
        stored_total
    }

    /// Takes reader counts on the blocks to read (and touches them if `touch`).
    fn plan_reads(
        &self,
        meta: &mut Meta,
        ids: impl IntoIterator<Item = usize>,
        touch: bool,
    ) -> Vec<PlannedRead> {
        let now = now_ms();
        ids.into_iter()
            .filter_map(|id| plan_read(meta, id, touch, now))
            .collect()
    }

    /// Drops the reader counts taken by [`DiskTier::plan_reads`].
    fn release_reads(&self, plans: &[PlannedRead]) {
        let mut meta = self.inner.meta.lock();
        for p in plans {
            release_read(&mut meta, p.id, p.incarnation);
        }
    }

    /// Reads and verifies planned slots, then releases their reader counts.
    fn read_planned(&self, plans: &[PlannedRead]) -> Vec<ReadOutcome> {
        let inner = &*self.inner;
        let mut outcomes: Vec<Option<ReadOutcome>> = (0..plans.len()).map(|_| None).collect();
        let mut ops = Vec::with_capacity(plans.len());
        let mut op_of = Vec::with_capacity(plans.len());
        for (i, p) in plans.iter().enumerate() {
            let want = HEADER_REGION + align_up(p.len as usize);
            match inner.pool.get(want.min(p.slot_bytes)) {
                Some(buf) => {
                    ops.push(IoOp {
                        kind: OpKind::Read,
                        fd: inner.files[p.file as usize].fd(),
                        offset: p.offset,
                        buf,
                        on_late: None,
                    });
                    op_of.push(i);
                }
                None => outcomes[i] = Some(ReadOutcome::Failed(IoFailure::Errno(libc::ENOMEM))),
            }
        }
        let mut batch = engine::Batch::new(&*inner.engine, ops.len());
        for op in ops {
            batch.push(op);
        }
        let busy = inner.disk.read_busy.busy();
        batch.wait_each(Instant::now() + inner.config.read_timeout, |k, d| {
            let i = op_of[k];
            let p = &plans[i];
            let len = d.buf.as_ref().map_or(0, |b| b.len());
            self.count(d.result, &inner.disk.read_ops, &inner.disk.read_bytes, len);
            outcomes[i] = Some(check_read(p, d));
        });
        drop(busy);
        self.release_reads(plans);
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or(ReadOutcome::Failed(IoFailure::Shutdown)))
            .collect()
    }

    /// Drops blocks that failed verification (if still the same incarnation).
    fn drop_corrupt(&self, bad: &[(&PlannedRead, CorruptKind)]) {
        if bad.is_empty() {
            return;
        }
        let inner = &*self.inner;
        let mut events = Vec::new();
        {
            let mut meta = inner.meta.lock();
            for (p, kind) in bad {
                TierCounters::add(&inner.disk.corrupt_blocks, 1);
                tracing::warn!(
                    namespace = %p.ns,
                    key = %p.key,
                    file = %inner.files[p.file as usize].path.display(),
                    offset = p.offset,
                    reason = kind.name(),
                    "disk tier: slot failed verification; block dropped"
                );
                let same = meta.lookup(&p.ns, &p.key) == Some(p.id)
                    && meta
                        .entries
                        .get(p.id)
                        .is_some_and(|e| e.incarnation == p.incarnation);
                if same && let Some(ev) = meta.unlink(p.id, EventKind::Evicted) {
                    events.push(ev);
                }
            }
            let mut batch = IndexBatch::default();
            meta.drain_deletes(&mut batch);
            if let Err(e) = inner.index.write(batch) {
                tracing::error!(error = %e, "disk tier: index delete failed");
                TierCounters::add(&inner.disk.io_errors, 1);
            }
        }
        inner.events.publish(events);
    }

    /// Reads blocks, all transfers submitted together. Each answer is the
    /// exact bytes stored under the key, or `None` (miss, failed verification,
    /// I/O error or timeout).
    pub fn get_many(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Vec<Option<Bytes>> {
        self.read_many(ns, keys)
            .into_iter()
            .map(|r| r.map(|r| r.payload))
            .collect()
    }

    /// [`DiskTier::get_many`] with what the cache needs to promote a block:
    /// its parent and write sequence number (see [`DiskTier::is_current`]).
    pub fn read_many(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Vec<Option<DiskRead>> {
        let inner = &*self.inner;
        let mut out: Vec<Option<DiskRead>> = (0..keys.len()).map(|_| None).collect();
        let (plans, pos) = {
            let mut meta = inner.meta.lock();
            let mut ids = Vec::new();
            let mut pos = Vec::new();
            for (i, k) in keys.iter().enumerate() {
                if let Some(id) = meta.lookup(ns, k) {
                    ids.push(id);
                    pos.push(i);
                }
            }
            (self.plan_reads(&mut meta, ids, true), pos)
        };
        let outcomes = self.read_planned(&plans);
        let mut bad = Vec::new();
        for ((p, o), i) in plans.iter().zip(outcomes).zip(pos) {
            match o {
                ReadOutcome::Good(buf) => out[i] = Some(p.verified_read(buf)),
                ReadOutcome::Corrupt(kind) => bad.push((p, kind)),
                ReadOutcome::Failed(f) => {
                    tracing::debug!(key = %p.key, failure = ?f, "disk tier: read failed");
                }
            }
        }
        self.drop_corrupt(&bad);
        let hits = out.iter().filter(|o| o.is_some()).count() as u64;
        let bytes: u64 = out.iter().flatten().map(|r| r.payload.len() as u64).sum();
        TierCounters::add(&inner.counters.hits, hits);
        TierCounters::add(&inner.counters.misses, keys.len() as u64 - hits);
        TierCounters::add(&inner.counters.bytes_out, bytes);
        out
    }

    /// Reads a stream of blocks with up to `depth` reads in flight the
    /// whole time, like fio's `iodepth`: each time reads complete, the next
    /// ones start before the finished ones are verified and handed out, so
    /// the drive never waits for the caller between blocks
    /// ([`DiskTier::read_many`] instead starts with an empty queue and ends
    /// with its slowest read, every call).
    ///
    /// `on_block(i, read)` answers `keys[i]` once: in completion order (a
    /// key that is not on disk at once, when the stream reaches it), not
    /// key order. Every answer is verified exactly as in `read_many`: the
    /// exact bytes stored under the key, or `None` for a miss, a slot that
    /// fails verification (dropped and counted in `corrupt_blocks`), an
    /// I/O error or a read slower than the tier's `read_timeout` (counted;
    /// the block stays indexed). Blocks are looked up (and their reader
    /// counts taken) only when their read starts. Returns the number of hits.
    /// If `on_block` panics, the panic reaches the caller with every reader
    /// count of the stream released.
    pub fn read_stream(
        &self,
        ns: &NamespaceId,
        keys: &[BlockKey],
        depth: usize,
        mut on_block: impl FnMut(usize, Option<DiskRead>),
    ) -> usize {
        let inner = &*self.inner;
        let depth = depth.max(1);
        let timeout = inner.config.read_timeout;
        let mut next = 0usize;
        let mut pipe = engine::Pipeline::new(&*inner.engine, depth);
        // Reads in flight, and reader counts to drop (reads that have
        // finished); released on drop, also if `on_block` panics.
        let mut held = StreamReads {
            meta: &inner.meta,
            open: Vec::with_capacity(depth),
            release: Vec::with_capacity(depth),
        };
        let StreamReads { open, release, .. } = &mut held;
        let mut planned: Vec<(usize, PlannedRead)> = Vec::with_capacity(depth);
        let mut finished: Vec<(usize, PlannedRead, IoDone)> = Vec::with_capacity(depth);
        let mut misses: Vec<usize> = Vec::new();
        let mut done = Vec::with_capacity(depth);
        let (mut hits, mut bytes) = (0u64, 0u64);
        let busy = inner.disk.read_busy.busy();
        loop {
            // One lock: drop the reader counts of finished reads, plan the next ones.
            let room = depth - open.len();
            if !release.is_empty() || (room > 0 && next < keys.len()) {
                let mut meta = inner.meta.lock();
                for (id, incarnation) in release.drain(..) {
                    release_read(&mut meta, id, incarnation);
                }
                let now = now_ms();
                while planned.len() < room && next < keys.len() {
                    let i = next;
                    next += 1;
                    match meta
                        .lookup(ns, &keys[i])
                        .and_then(|id| plan_read(&mut meta, id, true, now))
                    {
                        Some(p) => planned.push((i, p)),
                        None => misses.push(i),
                    }
                }
            }
            for (i, p) in planned.drain(..) {
                let want = HEADER_REGION + align_up(p.len as usize);
                match inner.pool.get(want.min(p.slot_bytes)) {
                    Some(buf) => {
                        let op = IoOp {
                            kind: OpKind::Read,
                            fd: inner.files[p.file as usize].fd(),
                            offset: p.offset,
                            buf,
                            on_late: None,
                        };
                        let index = pipe.push(op, Instant::now() + timeout);
                        open.push((index, i, p));
                    }
                    None => {
                        release.push((p.id, p.incarnation));
                        let failed = IoDone {
                            buf: None,
                            result: Err(IoFailure::Errno(libc::ENOMEM)),
                        };
                        finished.push((i, p, failed));
                    }
                }
            }
            pipe.flush();
            // The window is full again: now answer, verifying what finished.
            for i in misses.drain(..) {
                on_block(i, None);
            }
            for (i, p, d) in finished.drain(..) {
                let read = match check_read(&p, d) {
                    ReadOutcome::Good(buf) => Some(p.verified_read(buf)),
                    ReadOutcome::Corrupt(kind) => {
                        self.drop_corrupt(&[(&p, kind)]);
                        None
                    }
                    ReadOutcome::Failed(f) => {
                        tracing::debug!(key = %p.key, failure = ?f, "disk tier: read failed");
                        None
                    }
                };
                if let Some(r) = &read {
                    hits += 1;
                    bytes += r.payload.len() as u64;
                }
                on_block(i, read);
            }
            if open.is_empty() {
                if next >= keys.len() {
                    break;
                }
                continue;
            }
            pipe.wait_some(&mut done);
            for (index, d) in done.drain(..) {
                let Some(k) = open.iter().position(|(x, _, _)| *x == index) else {
                    continue;
                };
                let (_, i, p) = open.swap_remove(k);
                let len = d.buf.as_ref().map_or(0, |b| b.len());
                self.count(d.result, &inner.disk.read_ops, &inner.disk.read_bytes, len);
                // The read is over: its slot may be reused from now on.
                release.push((p.id, p.incarnation));
                finished.push((i, p, d));
            }
        }
        drop(busy);
        // The last reader counts go back.
        drop(held);
        TierCounters::add(&inner.counters.hits, hits);
        TierCounters::add(&inner.counters.misses, keys.len() as u64 - hits);
        TierCounters::add(&inner.counters.bytes_out, bytes);
        hits as usize
    }

    /// [`DiskTier::read_stream`] answering payloads only (as
    /// [`DiskTier::get_many`] does for [`DiskTier::read_many`]).
    pub fn get_stream(
        &self,
        ns: &NamespaceId,
        keys: &[BlockKey],
        depth: usize,
        mut on_block: impl FnMut(usize, Option<Bytes>),
    ) -> usize {
        self.read_stream(ns, keys, depth, |i, r| on_block(i, r.map(|r| r.payload)))
    }

    /// Reads and verifies every indexed slot, 32 slots (one batch of
    /// transfers) at a time; blocks for the whole scan.
    /// With `drop_corrupt` the slots that fail are dropped (and counted) as a
    /// read would; otherwise they are only reported.
    pub fn verify(&self, drop_corrupt: bool) -> VerifyReport {
        let inner = &*self.inner;
        let mut report = VerifyReport::default();
        let ids: Vec<usize> = inner
            .meta
            .lock()
            .entries
            .iter()
            .filter(|(_, e)| e.live)
            .map(|(id, _)| id)
            .collect();
        for chunk in ids.chunks(32) {
            let plans = {
                let mut meta = inner.meta.lock();
                self.plan_reads(&mut meta, chunk.iter().copied(), false)
            };
            let outcomes = self.read_planned(&plans);
            let mut bad = Vec::new();
            for (p, o) in plans.iter().zip(outcomes) {
                report.scanned += 1;
                match o {
                    ReadOutcome::Good(_) => {}
                    ReadOutcome::Corrupt(kind) => {
                        report.corrupt.push(CorruptSlot {
                            namespace: p.ns,
                            key: p.key,
                            file: inner.files[p.file as usize].path.clone(),
                            offset: p.offset,
                            slot_bytes: p.slot_bytes as u64,
                            reason: kind,
                        });
                        bad.push((p, kind));
                    }
                    ReadOutcome::Failed(f) => report.unreadable.push((p.ns, p.key, f)),
                }
            }
            if drop_corrupt {
                self.drop_corrupt(&bad);
            }
        }
        report
    }

    /// Reads one block's slot and reports its header fields and checks,
    /// without dropping it (a diagnostic, for `kvstrata inspect`).
    pub fn inspect_header(
        &self,
        ns: &NamespaceId,
        key: &BlockKey,
    ) -> Result<HeaderInspection, DiskError> {
        let inner = &*self.inner;
        let plans = {
            let mut meta = inner.meta.lock();
            let id = meta.lookup(ns, key).ok_or(DiskError::NotFound)?;
            self.plan_reads(&mut meta, [id], false)
        };
        let p = plans.first().ok_or(DiskError::NotFound)?;
        let done = match inner.pool.get(HEADER_REGION + align_up(p.len as usize)) {
            Some(buf) => {
                let fd = inner.files[p.file as usize].fd();
                let op = IoOp {
                    kind: OpKind::Read,
                    fd,
                    offset: p.offset,
                    buf,
                    on_late: None,
                };
                self.transfer(OpKind::Read, vec![op]).pop()
            }
            None => Some(IoDone {
                buf: None,
                result: Err(IoFailure::Errno(libc::ENOMEM)),
            }),
        };
        self.release_reads(&plans);
        let buf = match done {
            Some(IoDone {
                result: Ok(()),
                buf: Some(buf),
            }) => buf,
            Some(IoDone { result: Err(f), .. }) => return Err(DiskError::ReadFailed(f)),
            _ => return Err(DiskError::ReadFailed(IoFailure::Shutdown)),
        };
        let slot = buf.as_slice();
        let header = SlotHeader::decode(slot);
        let payload_xxh3 = usize::try_from(p.len)
            .ok()
            .and_then(|len| slot.get(HEADER_REGION..HEADER_REGION.checked_add(len)?))
            .map_or(0, xxh3_64);
        let want = p.expected();
        let (problem, payload_checksum_ok) = match &header {
            Ok(h) => {
                let end = (HEADER_REGION as u64).saturating_add(h.payload_len);
                let ok = usize::try_from(end)
                    .ok()
                    .and_then(|end| slot.get(HEADER_REGION..end))
                    .is_some_and(|pl| xxh3_64(pl) == h.payload_xxh3);
                let problem = header::check_fields(h, &want)
                    .err()
                    .or((!ok).then_some(CorruptKind::PayloadChecksum));
                (problem, ok)
            }
            Err(kind) => (Some(*kind), false),
        };
        Ok(HeaderInspection {
            file: inner.files[p.file as usize].path.clone(),
            offset: p.offset,
            slot_bytes: p.slot_bytes as u64,
            index_payload_len: p.len,
            index_checksum: p.checksum,
            index_seq: p.seq,
            header,
            problem,
            payload_checksum_ok,
            payload_xxh3,
        })
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

    /// Where a block's slot is: (file path, byte offset, slot bytes). For tests and tools.
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

/// Picks the engine: forced pread, forced io_uring, or probe with fallback.
fn pick_engine(
    config: &DiskTierConfig,
    faults: &Arc<FaultCell>,
    files: &[SlotFile],
    pool: &Arc<BufPool>,
) -> Result<Box<dyn IoEngine>, DiskError> {
    let fixed = config.fixed_buffers.then(|| Arc::clone(pool));
    let pread = || -> Result<Box<dyn IoEngine>, DiskError> {
        PreadEngine::start(config.io_threads, Arc::clone(faults))
            .map(|e| Box::new(e) as Box<dyn IoEngine>)
            .map_err(|source| DiskError::Io {
                path: PathBuf::new(),
                op: "spawn I/O threads",
                source,
            })
    };
    let fd = files
        .first()
        .map(|f| f.fd())
        .ok_or_else(|| DiskError::config("files", "no slot file"))?;
    match config.engine {
        EngineChoice::Pread => {
            tracing::info!("disk tier: pread/pwrite engine (forced by config)");
            pread()
        }
        EngineChoice::IoUring => {
            match engine::probe_uring(config.queue_depth, Arc::clone(faults), fd, fixed.clone()) {
                Ok(u) => {
                    tracing::info!("disk tier: io_uring engine");
                    Ok(Box::new(u))
                }
                Err(reason) => Err(DiskError::EngineUnavailable(reason)),
            }
        }
        EngineChoice::Auto => {
            match engine::probe_uring(config.queue_depth, Arc::clone(faults), fd, fixed.clone()) {
                Ok(u) => {
                    tracing::info!("disk tier: io_uring engine");
                    Ok(Box::new(u))
                }
                Err(reason) => {
                    tracing::warn!(%reason, "disk tier: io_uring unavailable; using pread/pwrite");
                    pread()
                }
            }
        }
    }
}

/// Whether an index entry describes a slot that can exist in this layout.
fn entry_fits(e: &IndexEntry, files: &[SlotFile], arenas: &[SlotArena]) -> bool {
    let (Some(file), Some(arena)) = (files.get(e.file as usize), arenas.get(e.file as usize))
    else {
        return false;
    };
    let slot_bytes = e.slot_bytes as u64;
    let segment = arena.max_slot_bytes() as u64;
    !file.created
        && slot_bytes.is_multiple_of(file::ALIGN as u64)
        && slot_bytes
            >= (HEADER_REGION as u64)
                .saturating_add(e.payload_len.next_multiple_of(file::ALIGN as u64))
        && (e.segment as usize) < arena.segment_count()
        && (e.slot as u64 + 1) * slot_bytes <= segment
        && e.segment as u64 * segment + e.slot as u64 * slot_bytes == e.offset
}

/// Claims the slots of the entries at `order` (earlier ones win conflicts)
/// in fresh arenas. Returns which entries were kept and whether any
/// conflict (a slot or segment claimed twice) was found.
fn claim_slots(
    arenas: &mut [SlotArena],
    entries: &[(NamespaceId, BlockKey, IndexEntry)],
    fits: &[bool],
    order: impl Iterator<Item = usize>,
) -> (Vec<bool>, bool) {
    let mut counts = vec![0usize; arenas.len()];
    for (pos, (_, _, e)) in entries.iter().enumerate() {
        if fits[pos] {
            counts[e.file as usize] += 1;
        }
    }
    let mut per_file: Vec<Vec<(SlotRef, usize)>> =
        counts.iter().map(|&c| Vec::with_capacity(c)).collect();
    let mut per_file_pos: Vec<Vec<usize>> = counts.iter().map(|&c| Vec::with_capacity(c)).collect();
    let mut ok = vec![false; entries.len()];
    for pos in order {
        if !fits[pos] {
            continue;
        }
        let e = &entries[pos].2;
        per_file[e.file as usize].push((
            SlotRef {
                segment: e.segment,
                index: e.slot,
            },
            e.slot_bytes as usize,
        ));
        per_file_pos[e.file as usize].push(pos);
        ok[pos] = true;
    }
    let mut conflict = false;
    for (f, arena) in arenas.iter_mut().enumerate() {
        for r in arena.restore(&per_file[f]) {
            ok[per_file_pos[f][r]] = false;
            conflict = true;
        }
    }
    (ok, conflict)
}

/// Rebuilds the block table and the arenas from index entries: O(entries),
/// plus one sort for the LRU order. Entries that cannot be right (unknown
/// file, inconsistent offset, a file created by this open, a slot claimed
/// twice: the newest write wins) are dropped and their deletions added to
/// `cleanup`. Returns (kept, dropped).
fn restore(
    meta: &mut Meta,
    files: &[SlotFile],
    segment_bytes: u64,
    entries: Vec<(NamespaceId, BlockKey, IndexEntry)>,
    cleanup: &mut IndexBatch,
) -> (usize, usize) {
    let n = entries.len();
    let fits: Vec<bool> = entries
        .iter()
        .map(|(_, _, e)| entry_fits(e, files, &meta.arenas))
        .collect();
    let (mut ok, conflict) = claim_slots(&mut meta.arenas, &entries, &fits, 0..n);
    if conflict {
        // Lost deletions or a damaged index: retry, newest write first.
        tracing::warn!("disk index: slots claimed twice; keeping the newest writes");
        meta.arenas = files
            .iter()
            .map(|f| SlotArena::new(f.size, segment_bytes).0)
            .collect();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_unstable_by_key(|&i| std::cmp::Reverse(entries[i].2.seq));
        ok = claim_slots(&mut meta.arenas, &entries, &fits, order.into_iter()).0;
    }
    // Ticks follow the persisted LRU order (oldest access first).
    let mut order: Vec<usize> = (0..n).filter(|&i| ok[i]).collect();
    order.sort_unstable_by_key(|&i| (entries[i].2.last_access_ms, entries[i].2.seq));
    let mut tick_of = vec![0u64; n];
    for (t, &i) in order.iter().enumerate() {
        tick_of[i] = t as u64 + 1;
    }
    meta.tick = order.len() as u64;
    let mut dropped = 0;
    let mut id_of = vec![usize::MAX; n];
    for (pos, (ns, key, e)) in entries.into_iter().enumerate() {
        if !ok[pos] {
            dropped += 1;
            cleanup.delete(&ns, &key);
            continue;
        }
        let incarnation = meta.next_incarnation;
        meta.next_incarnation += 1;
        let slot = SlotRef {
            segment: e.segment,
            index: e.slot,
        };
        let hash = meta.index.hash(&ns, &key);
        let id = meta.entries.insert(Entry {
            ns,
            key,
            hash,
            parent: e.parent,
            file: e.file,
            slot,
            slot_bytes: e.slot_bytes as usize,
            offset: e.offset,
            len: e.payload_len,
            checksum: e.checksum,
            seq: e.seq,
            tick: tick_of[pos],
            last_access_ms: e.last_access_ms,
            access_dirty: false,
            pins: 0,
            readers: 0,
            live: true,
            incarnation,
        });
        meta.slot_owner.set(e.file, slot, id);
        meta.index.insert_new(hash, id);
        if let Some(p) = e.parent {
            let ph = meta.index.hash(&ns, &p);
            *meta.child_count.entry(ph).or_insert(0) += 1;
        }
        id_of[pos] = id;
    }
    // LRU sets, built in bulk from tick order (a BTreeMap from sorted input is O(n)).
    type TickList = Vec<(u64, usize)>;
    let mut lists: HashMap<usize, (TickList, TickList)> = HashMap::new();
    for &pos in &order {
        let id = id_of[pos];
        let Some(e) = meta.entries.get(id) else {
            continue;
        };
        let leaf = meta.children(e.hash) == 0;
        let l = lists
            .entry(e.slot_bytes)
            .or_insert_with(|| (Vec::with_capacity(order.len()), Vec::new()));
        if leaf { &mut l.0 } else { &mut l.1 }.push((e.tick, id));
    }
    for (class, (leaves, inner)) in lists {
        meta.sets.load_sorted(class, leaves, inner);
    }
    (order.len(), dropped)
}

impl Tier for DiskTier {
    fn kind(&self) -> TierKind {
        TierKind::Disk
    }

    fn max_block_bytes(&self) -> u64 {
        self.inner.max_payload
    }

    fn put(
        &self,
        ns: &NamespaceId,
        key: &BlockKey,
        parent: Option<&BlockKey>,
        payload: &[u8],
    ) -> PutOutcome {
        let item = DiskPut {
            key: *key,
            parent: parent.copied(),
            payload,
        };
        self.put_many(ns, &[item])
            .pop()
            .unwrap_or(PutOutcome::NoSpace)
    }

    fn get(&self, ns: &NamespaceId, key: &BlockKey) -> Option<Bytes> {
        self.get_many(ns, std::slice::from_ref(key)).pop().flatten()
    }

    fn contains(&self, ns: &NamespaceId, key: &BlockKey) -> bool {
        self.inner.meta.lock().lookup(ns, key).is_some()
    }

    fn remove(&self, ns: &NamespaceId, key: &BlockKey, reason: RemoveReason) -> RemoveOutcome {
        let inner = &self.inner;
        let event = {
            let mut meta = inner.meta.lock();
            let Some(id) = meta.lookup(ns, key) else {
                return RemoveOutcome::Missing;
            };
            let pinned = meta.entries.get(id).is_some_and(|e| e.pins > 0);
            if pinned && reason == RemoveReason::Evict {
                return RemoveOutcome::Pinned;
            }
            let kind = match reason {
                RemoveReason::Evict => EventKind::Evicted,
                RemoveReason::Delete => EventKind::Deleted,
            };
            let ev = meta.unlink(id, kind);
            let mut batch = IndexBatch::default();
            meta.drain_deletes(&mut batch);
            if let Err(e) = inner.index.write(batch) {
                tracing::error!(error = %e, "disk tier: index delete failed");
                TierCounters::add(&inner.disk.io_errors, 1);
            }
            ev
        };
        if reason == RemoveReason::Evict {
            TierCounters::add(&inner.counters.evictions, 1);
        }
        inner.events.publish(event);
        RemoveOutcome::Removed
    }

    fn pin(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Result<Vec<PinToken>, usize> {
        let mut meta = self.inner.meta.lock();
        let mut ids = Vec::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            match meta.lookup(ns, k) {
                Some(id) => ids.push(id),
                None => return Err(i),
            }
        }
        let mut tokens = Vec::with_capacity(ids.len());
        for id in ids {
            meta.set_remove(id);
            let mut newly_pinned = false;
            if let Some(e) = meta.entries.get_mut(id) {
                e.pins += 1;
                newly_pinned = e.pins == 1;
                tokens.push(PinToken {
                    namespace: e.ns,
                    key: e.key,
                    tier: TierKind::Disk,
                    incarnation: e.incarnation,
                });
            }
            if newly_pinned {
                meta.pinned_blocks += 1;
            }
        }
        Ok(tokens)
    }

    fn unpin(&self, token: &PinToken) {
        let mut meta = self.inner.meta.lock();
        let Some(id) = meta.lookup(&token.namespace, &token.key) else {
            return;
        };
        let mut now_free = false;
        if let Some(e) = meta.entries.get_mut(id) {
            if e.incarnation != token.incarnation || e.pins == 0 {
                return;
            }
            e.pins -= 1;
            now_free = e.pins == 0;
        }
        if now_free {
            meta.pinned_blocks -= 1;
            meta.set_insert(id);
        }
    }

    fn meta(&self, ns: &NamespaceId, key: &BlockKey) -> Option<BlockMeta> {
        let meta = self.inner.meta.lock();
        let id = meta.lookup(ns, key)?;
        meta.entries.get(id).map(|e| meta.meta_of(e, now_ms()))
    }

    fn list(
        &self,
        ns: Option<&NamespaceId>,
        cursor: u64,
        limit: usize,
    ) -> (Vec<BlockMeta>, Option<u64>) {
        let meta = self.inner.meta.lock();
        let now = now_ms();
        let mut out = Vec::new();
        let end = meta.entries.capacity();
        let mut pos = cursor as usize;
        while pos < end {
            if out.len() >= limit {
                return (out, Some(pos as u64));
            }
            if let Some(e) = meta.entries.get(pos)
                && e.live
                && ns.is_none_or(|n| *n == e.ns)
            {
                out.push(meta.meta_of(e, now));
            }
            pos += 1;
        }
        (out, None)
    }

    fn keys_of(&self, ns: &NamespaceId) -> Vec<BlockKey> {
        let meta = self.inner.meta.lock();
        meta.index
            .ids()
            .filter_map(|id| meta.entries.get(id))
            .filter(|e| e.ns == *ns)
            .map(|e| e.key)
            .collect()
    }

    fn stats(&self) -> TierStats {
        let meta = self.inner.meta.lock();
        let mut s = TierStats {
            capacity_bytes: self.inner.capacity,
            used_bytes: meta.arenas.iter().map(|a| a.used_bytes()).sum(),
            blocks: meta.index.len() as u64,
            pinned_blocks: meta.pinned_blocks,
            ..TierStats::default()
        };
        drop(meta);
        self.inner.counters.fill(&mut s);
        s
    }
}
