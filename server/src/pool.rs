//! Shared-memory pools: memory that a client on the same host registered on the
//! mempool socket ([`crate::mempool`]) and that the daemon has mapped. Requests
//! then name a byte range of a pool — `(pool id, offset, length)` — instead of
//! carrying the bytes, and the daemon copies between the pool and its tiers.
//!
//! A pool lives as long as its registration connection: when the client closes
//! it (or dies), the pool leaves the [`PoolRegistry`] and is unmapped once the
//! last request still copying from or into it is done.
//!
//! The daemon reads and writes a pool with plain memory copies while the client
//! may touch the same pages: a client that writes a region while a request on
//! that region is in flight gets whatever bytes the copy saw, exactly as with
//! any shared buffer. Each copy is bounds-checked against the mapped size. A
//! client may grow its memfd after registering it (SGLang's allocator extends
//! the file as it allocates): a region past the mapped end makes the daemon
//! look at the file's size again and map the larger file. The registry seals
//! the memfd against shrinking where the client allowed sealing
//! (`MFD_ALLOW_SEALING`), since touching a page past the end of a shrunk file
//! would fault; for a pool it could not seal (SGLang's memfds), every copy
//! first checks the file's current size, so a client that truncated its pool
//! gets refusals instead of crashing the daemon (only a truncation racing a
//! copy in flight still can).

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use bytes::Bytes;
use memmap2::MmapRaw;
use parking_lot::RwLock;

/// Longest pool name accepted, in bytes (defined with the preamble in
/// [`kvstrata_types::wire::pool`]).
pub use kvstrata_types::wire::pool::MAX_NAME_BYTES as MAX_POOL_NAME_BYTES;

/// Why a registration was refused. Each is logged with the connection.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("the fd is not a regular file or memfd")]
    NotAFile,
    #[error("the pool is empty (0 bytes)")]
    Empty,
    #[error("the pool is {size} bytes, more than the limit of {limit}")]
    TooLarge { size: u64, limit: u64 },
    #[error("{count} pools are registered already, the limit")]
    TooManyPools { count: usize },
    #[error("cannot map the fd read-write: {0}")]
    Map(#[source] std::io::Error),
    #[error("cannot stat the fd: {0}")]
    Stat(#[source] std::io::Error),
}

/// Why a request's pool region cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    #[error("pool {0} is not registered (never, or its connection closed)")]
    UnknownPool(u32),
    #[error(
        "pool {pool_id} was truncated below {offset}+{length} by its client (pools must not shrink)"
    )]
    Shrunk {
        pool_id: u32,
        offset: u64,
        length: u64,
    },
    #[error("bytes {offset}..{offset}+{length} lie outside pool {pool_id} of {size} bytes")]
    OutOfBounds {
        pool_id: u32,
        offset: u64,
        length: u64,
        size: u64,
    },
}

/// One mapped pool.
pub struct Pool {
    id: u32,
    name: String,
    file: File,
    /// The current mapping; replaced by a larger one when the file grows.
    /// Requests in flight keep the mapping they started with.
    map: RwLock<Arc<MmapRaw>>,
    max_bytes: u64,
    sealed: bool,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("len", &self.len())
            .field("sealed", &self.sealed)
            .finish()
    }
}

impl Pool {
    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes mapped now.
    pub fn len(&self) -> usize {
        self.map.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the memfd is sealed against shrinking.
    pub fn sealed(&self) -> bool {
        self.sealed
    }

    /// The byte range `offset..offset+length`, if it lies inside the pool.
    pub fn range(&self, offset: u64, length: u64) -> Result<Range<usize>, RegionError> {
        self.mapping(offset, length).map(|(_, r)| r)
    }

    /// The mapping that holds `offset..offset+length`, and that range. Past
    /// the mapped end, checks whether the file grew and maps it again.
    fn mapping(
        &self,
        offset: u64,
        length: u64,
    ) -> Result<(Arc<MmapRaw>, Range<usize>), RegionError> {
        let end = offset.checked_add(length);
        let map = Arc::clone(&self.map.read());
        if let Some(end) = end
            && end <= map.len() as u64
        {
            // An unsealed file may have been truncated under the mapping;
            // touching a page past its end would fault the daemon.
            if !self.sealed && !self.file.metadata().is_ok_and(|m| m.len() >= end) {
                return Err(RegionError::Shrunk {
                    pool_id: self.id,
                    offset,
                    length,
                });
            }
            return Ok((map, offset as usize..end as usize));
        }
        let map = match end {
            Some(end) if end <= self.max_bytes => self.remap_if_grown(end).unwrap_or(map),
            _ => map,
        };
        match end {
            Some(end) if end <= map.len() as u64 => Ok((map, offset as usize..end as usize)),
            _ => Err(RegionError::OutOfBounds {
                pool_id: self.id,
                offset,
                length,
                size: map.len() as u64,
            }),
        }
    }

    /// Maps the file again if it has grown to at least `need` bytes.
    fn remap_if_grown(&self, need: u64) -> Option<Arc<MmapRaw>> {
        let size = self.file.metadata().ok()?.len().min(self.max_bytes);
        if size < need {
            return None;
        }
        let mut current = self.map.write();
        if current.len() as u64 >= size {
            return Some(Arc::clone(&current));
        }
        let map = memmap2::MmapOptions::new()
            .len(size as usize)
            .map_raw(&self.file)
            .ok()?;
        tracing::debug!(
            pool_id = self.id,
            from = current.len(),
            to = size,
            "pool grew: mapped again"
        );
        *current = Arc::new(map);
        Some(Arc::clone(&current))
    }

    /// The region's bytes without a copy; the mapping stays alive as long as
    /// the returned `Bytes` (or a clone of it) does.
    pub fn region_bytes(&self, offset: u64, length: u64) -> Result<Bytes, RegionError> {
        let (map, range) = self.mapping(offset, length)?;
        Ok(Bytes::from_owner(PoolSlice { map, range }))
    }

    /// Appends the region's bytes to `out`.
    pub fn read_into(
        &self,
        offset: u64,
        length: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), RegionError> {
        let (map, range) = self.mapping(offset, length)?;
        // SAFETY: the range lies inside the mapping, which `map` keeps alive;
        // the client may write the same pages concurrently, which yields
        // unspecified bytes but no unsoundness for a byte copy.
        let src = unsafe { std::slice::from_raw_parts(map.as_ptr().add(range.start), range.len()) };
        out.extend_from_slice(src);
        Ok(())
    }

    /// Copies `data` into the pool at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), RegionError> {
        let (map, range) = self.mapping(offset, data.len() as u64)?;
        // SAFETY: the range lies inside the mapping (checked above), which is
        // writable and kept alive by `map`; `data` is daemon memory and cannot
        // overlap the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                map.as_mut_ptr().add(range.start),
                data.len(),
            );
        }
        Ok(())
    }
}

/// A byte range of a pool's mapping that keeps the mapping alive (the owner
/// of a zero-copy `Bytes`).
struct PoolSlice {
    map: Arc<MmapRaw>,
    range: Range<usize>,
}

impl AsRef<[u8]> for PoolSlice {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `range` was checked against this mapping, which `map` keeps
        // alive.
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(self.range.start), self.range.len())
        }
    }
}

/// Limits of the registry.
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    /// Most pools registered at once.
    pub max_pools: usize,
    /// Largest pool accepted, in bytes.
    pub max_pool_bytes: u64,
}

/// Counters of the registry, for `Stats` and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub pools: u32,
    pub bytes: u64,
    pub registered: u64,
    pub refused: u64,
    pub unregistered: u64,
    pub unsealed: u64,
}

/// Every registered pool, by id. Ids start at 1 and are never reused.
#[derive(Debug)]
pub struct PoolRegistry {
    limits: PoolLimits,
    next_id: AtomicU32,
    pools: RwLock<HashMap<u32, Arc<Pool>>>,
    registered: AtomicU64,
    refused: AtomicU64,
    unregistered: AtomicU64,
    unsealed: AtomicU64,
}

impl PoolRegistry {
    pub fn new(limits: PoolLimits) -> Self {
        PoolRegistry {
            limits,
            next_id: AtomicU32::new(1),
            pools: RwLock::new(HashMap::new()),
            registered: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            unregistered: AtomicU64::new(0),
            unsealed: AtomicU64::new(0),
        }
    }

    /// Maps `fd` read-write and registers it under a new id.
    pub fn register(&self, name: String, fd: OwnedFd) -> Result<Arc<Pool>, RegisterError> {
        let r = self.try_register(name, fd);
        match &r {
            Ok(_) => self.registered.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.refused.fetch_add(1, Ordering::Relaxed),
        };
        r
    }

    /// Counts a registration refused before it reached [`Self::register`]
    /// (a malformed preamble).
    pub fn count_refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    fn try_register(&self, name: String, fd: OwnedFd) -> Result<Arc<Pool>, RegisterError> {
        let file = File::from(fd);
        let meta = file.metadata().map_err(RegisterError::Stat)?;
        if !meta.file_type().is_file() {
            return Err(RegisterError::NotAFile);
        }
        let size = meta.len();
        if size == 0 {
            return Err(RegisterError::Empty);
        }
        if size > self.limits.max_pool_bytes {
            return Err(RegisterError::TooLarge {
                size,
                limit: self.limits.max_pool_bytes,
            });
        }
        {
            let count = self.pools.read().len();
            if count >= self.limits.max_pools {
                return Err(RegisterError::TooManyPools { count });
            }
        }
        let sealed = seal_against_shrinking(&file);
        if !sealed {
            self.unsealed.fetch_add(1, Ordering::Relaxed);
        }
        let map = memmap2::MmapOptions::new()
            .len(size as usize)
            .map_raw(&file)
            .map_err(RegisterError::Map)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let pool = Arc::new(Pool {
            id,
            name,
            file,
            map: RwLock::new(Arc::new(map)),
            max_bytes: self.limits.max_pool_bytes,
            sealed,
        });
        self.pools.write().insert(id, Arc::clone(&pool));
        Ok(pool)
    }

    /// Removes a pool; it is unmapped when the last request using it is done.
    pub fn unregister(&self, id: u32) -> bool {
        let removed = self.pools.write().remove(&id).is_some();
        if removed {
            self.unregistered.fetch_add(1, Ordering::Relaxed);
        }
        removed
    }

    /// The pool registered under `id`.
    pub fn get(&self, id: u32) -> Result<Arc<Pool>, RegionError> {
        self.pools
            .read()
            .get(&id)
            .cloned()
            .ok_or(RegionError::UnknownPool(id))
    }

    /// Names of the registered pools (sorted, without duplicates).
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.pools.read().values().map(|p| p.name.clone()).collect();
        names.sort();
        names.dedup();
        names
    }

    pub fn stats(&self) -> PoolStats {
        let pools = self.pools.read();
        PoolStats {
            pools: pools.len() as u32,
            bytes: pools.values().map(|p| p.len() as u64).sum(),
            registered: self.registered.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            unregistered: self.unregistered.load(Ordering::Relaxed),
            unsealed: self.unsealed.load(Ordering::Relaxed),
        }
    }
}

/// Adds `F_SEAL_SHRINK` to a memfd so the client cannot truncate it under our
/// mapping. Fails (false) for files that are not memfds or were created
/// without `MFD_ALLOW_SEALING`.
fn seal_against_shrinking(file: &File) -> bool {
    // SAFETY: fcntl on a valid fd with integer arguments.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
    r == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn registry() -> PoolRegistry {
        PoolRegistry::new(PoolLimits {
            max_pools: 2,
            max_pool_bytes: 1 << 20,
        })
    }

    fn memfd(bytes: &[u8]) -> OwnedFd {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        OwnedFd::from(f)
    }

    #[test]
    fn ranges_are_checked_and_copies_are_exact() {
        let reg = registry();
        let pool = reg.register("p".into(), memfd(&[7u8; 4096])).unwrap();
        assert_eq!(pool.id(), 1);
        assert_eq!(pool.range(4000, 96).unwrap(), 4000..4096);
        assert!(matches!(
            pool.range(4000, 97),
            Err(RegionError::OutOfBounds { .. })
        ));
        assert!(pool.range(u64::MAX, 2).is_err());
        pool.write(10, b"hello").unwrap();
        let b = pool.region_bytes(9, 7).unwrap();
        assert_eq!(&b[..], b"\x07hello\x07");
        let mut v = Vec::new();
        pool.read_into(10, 5, &mut v).unwrap();
        assert_eq!(v, b"hello");
        assert!(pool.write(4095, b"xx").is_err());
    }

    #[test]
    fn ids_increase_and_limits_hold() {
        let reg = registry();
        let a = reg.register("a".into(), memfd(&[0; 10])).unwrap();
        assert!(matches!(
            reg.register("e".into(), memfd(&[])),
            Err(RegisterError::Empty)
        ));
        assert!(matches!(
            reg.register("big".into(), memfd(&vec![0; (1 << 20) + 1])),
            Err(RegisterError::TooLarge { .. })
        ));
        let b = reg.register("b".into(), memfd(&[0; 10])).unwrap();
        assert!(b.id() > a.id());
        assert!(matches!(
            reg.register("c".into(), memfd(&[0; 10])),
            Err(RegisterError::TooManyPools { .. })
        ));
        assert!(reg.unregister(a.id()));
        assert!(!reg.unregister(a.id()));
        assert_eq!(
            reg.get(a.id()).unwrap_err(),
            RegionError::UnknownPool(a.id())
        );
        let c = reg.register("c".into(), memfd(&[0; 10])).unwrap();
        assert!(c.id() > b.id());
        let s = reg.stats();
        assert_eq!((s.pools, s.bytes, s.registered, s.refused), (2, 20, 3, 3));
        assert_eq!(reg.names(), vec!["b".to_string(), "c".to_string()]);
    }

    #[test]
    fn a_grown_file_is_mapped_again() {
        let reg = registry();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[1u8; 4096]).unwrap();
        let pool = reg
            .register("grow".into(), OwnedFd::from(f.try_clone().unwrap()))
            .unwrap();
        assert!(pool.range(4096, 4096).is_err());
        f.write_all(&[2u8; 4096]).unwrap();
        let b = pool.region_bytes(4090, 12).unwrap();
        assert_eq!(&b[..], &[1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]);
        assert_eq!(pool.len(), 8192);
        // Never past the registry's limit.
        f.write_all(&vec![3u8; 1 << 20]).unwrap();
        assert!(pool.range(0, (1 << 20) + 1).is_err());
    }

    #[test]
    fn a_truncated_unsealed_file_is_refused_not_touched() {
        let reg = registry();
        let f = tempfile::tempfile().unwrap();
        f.set_len(8192).unwrap();
        let pool = reg
            .register("shrink".into(), OwnedFd::from(f.try_clone().unwrap()))
            .unwrap();
        assert!(!pool.sealed(), "a plain file cannot be sealed");
        pool.write(4096, b"ok").unwrap();
        f.set_len(4096).unwrap();
        assert!(matches!(
            pool.write(4096, b"no"),
            Err(RegionError::Shrunk { .. })
        ));
        assert!(pool.region_bytes(0, 4096).is_ok());
    }

    #[test]
    fn a_pipe_is_refused() {
        let (r, _w) = std::io::pipe().unwrap();
        let reg = registry();
        assert!(matches!(
            reg.register("p".into(), OwnedFd::from(r)),
            Err(RegisterError::NotAFile)
        ));
    }
}
