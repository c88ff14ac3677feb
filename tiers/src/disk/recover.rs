//! Opening the tier and start-up recovery. [`DiskTier::open`] checks the
//! config and the layout kept in the index, opens the slot files, starts
//! the I/O engine, and rebuilds the in-memory state from the RocksDB index
//! alone: every entry that cannot be right (unknown file, inconsistent
//! offset, a file created by this open, a slot claimed twice) is dropped,
//! the rest claim their slots in fresh arenas and enter the LRU in their
//! persisted access order. Slot headers are not read at start-up: a slot
//! whose contents do not match its entry fails verification on its first
//! read and is dropped then.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use slab::Slab;

use super::checksum;
use super::config::{DiskTierConfig, Durability};
use super::error::DiskError;
use super::file::{self, BufPool, SlotFile};
use super::header::HEADER_REGION;
use super::index::{IndexBatch, IndexEntry, IndexStore};
use super::io::{FaultCell, pick_engine};
use super::meta::{Entry, FastMap, KeyIndex, Meta, SEQ_STEP, SeededXxh3, SlotOwners};
use super::stats::DiskCounters;
use super::{DiskTier, Inner};
use crate::arena::{SlotArena, SlotRef};
use crate::events::EventBus;
use crate::eviction::LruSets;
use crate::key::BlockKey;
use crate::namespace::NamespaceId;
use crate::tier::TierCounters;

impl DiskTier {
    /// Opens (or creates) the tier: validates the config, opens the index and
    /// checks the layout, creates or opens the slot files, picks the I/O
    /// engine, and rebuilds the block table and free-slot state from the
    /// index. Blocks only as long as reading the index takes (O(entries)).
    pub fn open(config: &DiskTierConfig, events: Arc<EventBus>) -> Result<Self, DiskError> {
        let started = Instant::now();
        config.validate()?;
        let (index, layout, layout_stored) = open_index(config)?;
        let dsync = config.durability == Durability::PowerLoss;
        let mut files = Vec::with_capacity(config.files.len());
        for f in &config.files {
            files.push(SlotFile::open(&f.path, f.size_bytes, dsync)?);
        }
        if !layout_stored {
            index.set_layout(&layout)?;
        }
        let faults = FaultCell::new(config.initial_faults());
        // Buffers come from one region, which io_uring registers as fixed buffers.
        let pool = BufPool::with_arena(config.buffer_pool_bytes, config.buffer_pool_bytes);
        let engine = pick_engine(config, &faults, &files, &pool)?;

        let (meta, kept, corrupt) = recover_meta(config, &files, &index)?;
        let max_slot = meta
            .arenas
            .iter()
            .map(|a| a.max_slot_bytes())
            .min()
            .unwrap_or(0);
        let max_payload = max_slot.saturating_sub(HEADER_REGION) as u64;
        let capacity = files.iter().map(|f| f.size).sum();
        let tier = DiskTier {
            inner: Arc::new(Inner {
                closed: RwLock::new(false),
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
}

/// Opens (or creates) the index and checks the layout it keeps against the
/// configured one. Returns the index, the configured layout, and whether
/// the index already holds it.
fn open_index(config: &DiskTierConfig) -> Result<(IndexStore, String, bool), DiskError> {
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
    Ok((index, layout, stored_layout.is_some()))
}

/// Rebuilds the in-memory state from the index: fresh arenas for the files,
/// the entries restored into them ([`restore`]), the sequence numbers
/// resumed past both the newest entry and the stored watermark. Deletes
/// the entries dropped (and those that do not decode) from the index and
/// syncs it. Returns the state, the blocks kept and the entries dropped.
fn recover_meta(
    config: &DiskTierConfig,
    files: &[SlotFile],
    index: &IndexStore,
) -> Result<(Meta, usize, u64), DiskError> {
    let mut arenas = Vec::with_capacity(files.len());
    for f in files {
        let (arena, _) = SlotArena::new(f.size, config.segment_bytes);
        arenas.push(arena);
    }
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
        files,
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
    Ok((meta, kept, (dropped + undecodable) as u64))
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
