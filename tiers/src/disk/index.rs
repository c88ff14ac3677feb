//! The disk tier's index in RocksDB: (namespace, key) → where the block's
//! slot is and what it must contain.
//!
//! Keys: `b'b' ‖ namespace id (16) ‖ key bytes` for blocks, `b'n' ‖ namespace
//! id` for the cache's namespace records, `b'm' ‖ name` for metadata (the
//! layout string and the sequence-number watermark). Values
//! are a fixed little-endian record ([`IndexEntry::encode`]) so start-up
//! decodes an entry with a few loads and no allocation.
//!
//! Ordering rule (see the module docs of [`super`]): an entry is written only
//! after its slot's data write has completed, in one `WriteBatch` with the
//! deletions of the blocks it evicted.

use std::path::{Path, PathBuf};

use parking_lot::{MappedRwLockReadGuard, RwLock, RwLockReadGuard};
use rocksdb::{DB, Options, WriteBatch, WriteOptions};

use super::error::DiskError;
use crate::key::{BlockKey, MAX_KEY_BYTES};
use crate::namespace::NamespaceId;

const BLOCK_PREFIX: u8 = b'b';
const NAMESPACE_PREFIX: u8 = b'n';
const META_LAYOUT: &[u8] = b"mlayout";
const META_SEQ: &[u8] = b"mseq";
const ENTRY_VERSION: u8 = 1;
const FIXED_LEN: usize = 1 + 2 + 4 + 4 + 4 + 8 * 5 + 1;

/// One block's index record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// Position of the slot file in the configured list.
    pub file: u16,
    pub segment: u32,
    pub slot: u32,
    pub slot_bytes: u32,
    /// Byte offset of the slot in its file (redundant with segment/slot; checked at start-up).
    pub offset: u64,
    pub payload_len: u64,
    /// xxh3-64 of the payload.
    pub checksum: u64,
    pub seq: u64,
    /// Unix milliseconds of the last access persisted (see `persist_access`).
    pub last_access_ms: u64,
    pub parent: Option<BlockKey>,
}

impl IndexEntry {
    pub fn encode(&self) -> Vec<u8> {
        let parent = self.parent.as_ref().map(|p| p.as_bytes()).unwrap_or(&[]);
        let mut v = Vec::with_capacity(FIXED_LEN + parent.len());
        v.push(ENTRY_VERSION);
        v.extend_from_slice(&self.file.to_le_bytes());
        v.extend_from_slice(&self.segment.to_le_bytes());
        v.extend_from_slice(&self.slot.to_le_bytes());
        v.extend_from_slice(&self.slot_bytes.to_le_bytes());
        for x in [
            self.offset,
            self.payload_len,
            self.checksum,
            self.seq,
            self.last_access_ms,
        ] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.push(parent.len() as u8);
        v.extend_from_slice(parent);
        v
    }

    pub fn decode(v: &[u8]) -> Option<IndexEntry> {
        if v.len() < FIXED_LEN || v[0] != ENTRY_VERSION {
            return None;
        }
        let u32_at = |at: usize| u32::from_le_bytes([v[at], v[at + 1], v[at + 2], v[at + 3]]);
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&v[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let parent_len = v[FIXED_LEN - 1] as usize;
        if v.len() != FIXED_LEN + parent_len || parent_len > MAX_KEY_BYTES {
            return None;
        }
        let parent = match parent_len {
            0 => None,
            _ => Some(BlockKey::new("parent", &v[FIXED_LEN..]).ok()?),
        };
        Some(IndexEntry {
            file: u16::from_le_bytes([v[1], v[2]]),
            segment: u32_at(3),
            slot: u32_at(7),
            slot_bytes: u32_at(11),
            offset: u64_at(15),
            payload_len: u64_at(23),
            checksum: u64_at(31),
            seq: u64_at(39),
            last_access_ms: u64_at(47),
            parent,
        })
    }
}

/// The RocksDB key of a block.
pub fn block_key(ns: &NamespaceId, key: &BlockKey) -> Vec<u8> {
    let mut k = Vec::with_capacity(17 + key.as_bytes().len());
    k.push(BLOCK_PREFIX);
    k.extend_from_slice(ns.as_bytes());
    k.extend_from_slice(key.as_bytes());
    k
}

fn parse_block_key(k: &[u8]) -> Option<(NamespaceId, BlockKey)> {
    if k.len() < 18 || k[0] != BLOCK_PREFIX {
        return None;
    }
    let mut ns = [0u8; 16];
    ns.copy_from_slice(&k[1..17]);
    Some((NamespaceId(ns), BlockKey::new("key", &k[17..]).ok()?))
}

/// A set of index changes applied atomically.
#[derive(Default)]
pub struct IndexBatch {
    batch: WriteBatch,
}

impl IndexBatch {
    pub fn put(&mut self, ns: &NamespaceId, key: &BlockKey, entry: &IndexEntry) {
        self.batch.put(block_key(ns, key), entry.encode());
    }

    pub fn delete(&mut self, ns: &NamespaceId, key: &BlockKey) {
        self.batch.delete(block_key(ns, key));
    }

    /// Deletes a raw RocksDB key (an undecodable entry found at start-up).
    pub fn delete_raw(&mut self, key: &[u8]) {
        self.batch.delete(key);
    }

    pub fn set_seq_watermark(&mut self, seq: u64) {
        self.batch.put(META_SEQ, seq.to_le_bytes());
    }

    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    pub fn len(&self) -> usize {
        self.batch.len()
    }
}

/// What start-up found in the index.
#[derive(Debug, Default)]
pub struct Loaded {
    pub entries: Vec<(NamespaceId, BlockKey, IndexEntry)>,
    /// Raw keys of records that could not be decoded.
    pub undecodable: Vec<Vec<u8>>,
}

/// The RocksDB database holding the index, open until [`IndexStore::close`]
/// (or drop); after a close every call answers [`DiskError::Closed`].
pub struct IndexStore {
    db: RwLock<Option<DB>>,
    path: PathBuf,
}

impl std::fmt::Debug for IndexStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexStore")
            .field("path", &self.path)
            .finish()
    }
}

impl IndexStore {
    /// Opens (creating if needed) the index at `dir`.
    pub fn open(dir: &Path) -> Result<Self, DiskError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_keep_log_file_num(4);
        opts.set_max_total_wal_size(64 << 20);
        opts.set_write_buffer_size(32 << 20);
        let db = DB::open(&opts, dir)?;
        Ok(IndexStore {
            db: RwLock::new(Some(db)),
            path: dir.to_path_buf(),
        })
    }

    /// The open database, or [`DiskError::Closed`].
    fn db(&self) -> Result<MappedRwLockReadGuard<'_, DB>, DiskError> {
        RwLockReadGuard::try_map(self.db.read(), Option::as_ref).map_err(|_| DiskError::Closed)
    }

    /// Syncs the WAL, flushes the memtables (so the next open replays no
    /// log) and closes the database, releasing its lock file: the same
    /// directory can be opened again at once, in this process or another.
    /// Later calls do nothing. The database is closed even if the flush
    /// fails; the flush's error is returned (what the WAL held is kept
    /// either way).
    pub fn close(&self) -> Result<(), DiskError> {
        let Some(db) = self.db.write().take() else {
            return Ok(());
        };
        let flushed = db.flush_wal(true).and_then(|()| db.flush());
        drop(db);
        flushed.map_err(DiskError::from)
    }

    /// The layout string stored by the first open, if any.
    pub fn layout(&self) -> Result<Option<String>, DiskError> {
        Ok(self
            .db()?
            .get(META_LAYOUT)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    pub fn set_layout(&self, layout: &str) -> Result<(), DiskError> {
        let mut w = WriteOptions::default();
        w.set_sync(true);
        self.db()?.put_opt(META_LAYOUT, layout.as_bytes(), &w)?;
        Ok(())
    }

    /// The persisted sequence-number watermark (every sequence number handed
    /// out so far is below it).
    pub fn seq_watermark(&self) -> Result<u64, DiskError> {
        Ok(match self.db()?.get(META_SEQ)? {
            Some(v) if v.len() == 8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&v);
                u64::from_le_bytes(b)
            }
            _ => 0,
        })
    }

    /// Reads every block entry, in key order.
    pub fn load(&self) -> Result<Loaded, DiskError> {
        let db = self.db()?;
        let mut out = Loaded::default();
        if let Ok(Some(n)) = db.property_int_value("rocksdb.estimate-num-keys") {
            out.entries
                .reserve(usize::try_from(n).unwrap_or(0).min(1 << 26));
        }
        let mut it = db.raw_iterator();
        it.seek([BLOCK_PREFIX]);
        while it.valid() {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            if k.first() != Some(&BLOCK_PREFIX) {
                break;
            }
            match (parse_block_key(k), IndexEntry::decode(v)) {
                (Some((ns, key)), Some(e)) => out.entries.push((ns, key, e)),
                _ => out.undecodable.push(k.to_vec()),
            }
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// Applies a batch. The WAL is written (so the batch survives a process
    /// crash) but not fsynced; call [`IndexStore::sync`] for power-loss durability.
    pub fn write(&self, batch: IndexBatch) -> Result<(), DiskError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.db()?.write(batch.batch)?;
        Ok(())
    }

    /// Stores a namespace record under `n ‖ id` (synced: namespaces are few).
    pub fn put_namespace(&self, ns: &NamespaceId, record: &[u8]) -> Result<(), DiskError> {
        let mut k = Vec::with_capacity(17);
        k.push(NAMESPACE_PREFIX);
        k.extend_from_slice(ns.as_bytes());
        let mut w = WriteOptions::default();
        w.set_sync(true);
        self.db()?.put_opt(k, record, &w)?;
        Ok(())
    }

    /// Every namespace record, in id order.
    pub fn namespaces(&self) -> Result<Vec<(NamespaceId, Vec<u8>)>, DiskError> {
        let db = self.db()?;
        let mut out = Vec::new();
        let mut it = db.raw_iterator();
        it.seek([NAMESPACE_PREFIX]);
        while it.valid() {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            if k.first() != Some(&NAMESPACE_PREFIX) {
                break;
            }
            if let Ok(id) = <[u8; 16]>::try_from(&k[1..]) {
                out.push((NamespaceId(id), v.to_vec()));
            }
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// Fsyncs the WAL: every batch written so far survives power loss.
    pub fn sync(&self) -> Result<(), DiskError> {
        self.db()?.flush_wal(true)?;
        Ok(())
    }

    /// Test support (`testing` feature): writes entries straight into the
    /// index (no slot data), in batches of 10 000 without the WAL, then
    /// flushes.
    #[cfg(feature = "testing")]
    pub fn insert_synthetic(
        &self,
        entries: impl IntoIterator<Item = (NamespaceId, BlockKey, IndexEntry)>,
    ) -> Result<(), DiskError> {
        let db = self.db()?;
        let mut w = WriteOptions::default();
        w.disable_wal(true);
        let mut batch = WriteBatch::default();
        for (ns, key, e) in entries {
            batch.put(block_key(&ns, &key), e.encode());
            if batch.len() >= 10_000 {
                db.write_opt(std::mem::take(&mut batch), &w)?;
            }
        }
        db.write_opt(batch, &w)?;
        db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trip() {
        let e = IndexEntry {
            file: 3,
            segment: 77,
            slot: 5,
            slot_bytes: 8192,
            offset: 77 * (64 << 20) + 5 * 8192,
            payload_len: 4000,
            checksum: 0xdead_beef,
            seq: 9,
            last_access_ms: 1_700_000_000_000,
            parent: Some(BlockKey::new("p", b"parent").unwrap()),
        };
        assert_eq!(IndexEntry::decode(&e.encode()), Some(e));
        let e2 = IndexEntry { parent: None, ..e };
        assert_eq!(IndexEntry::decode(&e2.encode()), Some(e2));
        assert_eq!(IndexEntry::decode(&e.encode()[..20]), None);
        let k = block_key(&NamespaceId([1; 16]), &BlockKey::new("k", b"abc").unwrap());
        assert_eq!(
            parse_block_key(&k).map(|(_, k)| k.to_string()),
            Some("abc".to_string())
        );
    }
}
