//! Shared-memory pools: memory that a client on the same host registered on the
//! mempool socket ([`crate::shm::mempool`]) and that the daemon has mapped. Requests
//! then name a byte range of a pool — `(pool id, offset, length)` — instead of
//! carrying the bytes, and the daemon copies between the pool and its tiers.
//!
//! A pool lives as long as its registration connection: when the client closes
//! it (or dies), the pool leaves the [`PoolRegistry`] and is unmapped once the
//! last request still copying from or into it is done.
//!
//! The daemon reads and writes a pool with plain memory copies while the client
//! may touch the same pages: a client that writes a range while a request on
//! that range is in flight gets whatever bytes the copy saw, exactly as with
//! any shared buffer. Each copy is bounds-checked against the mapped size. A
//! client may grow its memfd after registering it (SGLang's allocator extends
//! the file as it allocates): a range past the mapped end makes the daemon
//! look at the file's size again and map the larger file. The registry seals
//! the memfd against shrinking where the client allowed sealing
//! (`MFD_ALLOW_SEALING`), since touching a page past the end of a shrunk file
//! would fault; for a pool it could not seal (SGLang's memfds), every copy
//! first checks the file's current size, so a client that truncated its pool
//! gets refusals instead of crashing the daemon (only a truncation racing a
//! copy in flight still can).
//!
//! Pool ids are unique to one run of the daemon ([`IdSequence`]): each run
//! counts from a random base, so a client that kept its id across a daemon
//! restart names no pool of the new run — its requests are refused
//! ([`RangeError::UnknownPool`]) instead of reaching another client's
//! memory. Pools registered in SGLang's format get ids that fit its `int32`
//! (31 bits, [`IdSpace::Sglang`]); kvstrata's own clients get 64-bit ids
//! ([`IdSpace::Wide`]). The two ranges do not overlap.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use memmap2::MmapRaw;
use parking_lot::RwLock;

/// Longest pool name accepted, in bytes (defined with the preamble in
/// [`kvstrata_types::wire::pool`]).
pub use kvstrata_types::wire::pool::MAX_NAME_BYTES as MAX_POOL_NAME_BYTES;
pub use kvstrata_types::wire::pool::{MAX_SGLANG_POOL_ID, MIN_WIDE_POOL_ID, PoolFormat};

/// The ranges ids are drawn from ([`IdSequence`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdSpace {
    /// 1 to [`MAX_SGLANG_POOL_ID`] (2^31 - 1): ids that SGLang's `int32
    /// pool_id` can carry.
    Sglang,
    /// [`MIN_WIDE_POOL_ID`] (2^31) to `u64::MAX`: kvstrata's 64-bit pool and
    /// KV-region ids.
    Wide,
}

impl IdSpace {
    /// Whether `id` lies in this range.
    pub fn holds(self, id: u64) -> bool {
        match self {
            IdSpace::Sglang => (1..=MAX_SGLANG_POOL_ID).contains(&id),
            IdSpace::Wide => id >= MIN_WIDE_POOL_ID,
        }
    }
}

/// The ids of one registry in one daemon run: a base drawn from the OS's
/// random source when the daemon starts, plus a counter, wrapping around
/// inside the [`IdSpace`]. Consecutive ids of a run are consecutive numbers
/// (never 0); two runs start at independent random points, so an id of an
/// earlier run falls among the `n` ids a later run has handed out with
/// probability about `n / 2^31` ([`IdSpace::Sglang`]) or `n / 2^64`
/// ([`IdSpace::Wide`]). The base guards against accidents (a client that was
/// not restarted with the daemon), not against a malicious client of the
/// same uid, which can name any id.
#[derive(Debug)]
pub struct IdSequence {
    space: IdSpace,
    base: u64,
    next: AtomicU64,
}

impl IdSequence {
    /// A sequence starting at a random point of `space`.
    pub fn random(space: IdSpace) -> Self {
        IdSequence::with_base(space, os_random_u64())
    }

    /// A sequence whose first id is derived from `base` (tests).
    pub fn with_base(space: IdSpace, base: u64) -> Self {
        IdSequence {
            space,
            base,
            next: AtomicU64::new(0),
        }
    }

    pub fn space(&self) -> IdSpace {
        self.space
    }

    /// The next id: in the space (so never 0), one past the previous one,
    /// wrapping from the top of the space to its bottom.
    pub fn next_id(&self) -> u64 {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let (first, span) = match self.space {
            IdSpace::Sglang => (1u128, u128::from(MAX_SGLANG_POOL_ID)),
            IdSpace::Wide => (
                u128::from(MIN_WIDE_POOL_ID),
                u128::from(u64::MAX - MIN_WIDE_POOL_ID) + 1,
            ),
        };
        // Below 2^64 by construction: `first + span - 1` is the space's top.
        (first + (u128::from(self.base) + u128::from(n)) % span) as u64
    }
}

/// 8 random bytes from the kernel (`getrandom(2)`, which waits for the
/// entropy pool once at boot). Should that fail, std's randomly keyed hasher
/// mixes the time and the pid, with a warning: the ids then still differ
/// between runs, only less surely.
pub fn os_random_u64() -> u64 {
    let mut b = [0u8; 8];
    loop {
        // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if n == b.len() as isize {
            return u64::from_ne_bytes(b);
        }
        let e = std::io::Error::last_os_error();
        if n < 0 && e.kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        tracing::warn!(error = %e, "getrandom failed: id bases come from the clock and the pid");
        break;
    }
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    h.write_u128(now);
    h.write_u32(std::process::id());
    h.finish()
}

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

/// Why a request's pool range cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error(
        "pool {0} is not registered with this daemon (never, its connection closed, or an id \
         from before a daemon restart: register the pool again)"
    )]
    UnknownPool(u64),
    #[error(
        "pool {pool_id} was truncated below {offset}+{length} by its client (pools must not shrink)"
    )]
    Shrunk {
        pool_id: u64,
        offset: u64,
        length: u64,
    },
    #[error("bytes {offset}..{offset}+{length} lie outside pool {pool_id} of {size} bytes")]
    OutOfBounds {
        pool_id: u64,
        offset: u64,
        length: u64,
        size: u64,
    },
}

/// One mapped pool.
pub struct Pool {
    id: u64,
    name: String,
    format: PoolFormat,
    /// The pid of the process that registered the pool, where the kernel
    /// told (`SO_PEERCRED`; 0 or unknown: `None`).
    peer_pid: Option<i32>,
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
            .field("format", &self.format)
            .field("peer_pid", &self.peer_pid)
            .field("len", &self.len())
            .field("sealed", &self.sealed)
            .finish()
    }
}

impl Pool {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The preamble format the pool was registered with.
    pub fn format(&self) -> PoolFormat {
        self.format
    }

    /// The pid of the registering process, if known.
    pub fn peer_pid(&self) -> Option<i32> {
        self.peer_pid
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
    pub fn range(&self, offset: u64, length: u64) -> Result<Range<usize>, RangeError> {
        self.mapping(offset, length).map(|(_, r)| r)
    }

    /// The mapping that holds `offset..offset+length`, and that range. Past
    /// the mapped end, checks whether the file grew and maps it again.
    fn mapping(
        &self,
        offset: u64,
        length: u64,
    ) -> Result<(Arc<MmapRaw>, Range<usize>), RangeError> {
        let end = offset.checked_add(length);
        let map = Arc::clone(&self.map.read());
        if let Some(end) = end
            && end <= map.len() as u64
        {
            // An unsealed file may have been truncated under the mapping;
            // touching a page past its end would fault the daemon.
            if !self.sealed && !self.file.metadata().is_ok_and(|m| m.len() >= end) {
                return Err(RangeError::Shrunk {
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
            _ => Err(RangeError::OutOfBounds {
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

    /// The range's bytes without a copy; the mapping stays alive as long as
    /// the returned `Bytes` (or a clone of it) does.
    pub fn range_bytes(&self, offset: u64, length: u64) -> Result<Bytes, RangeError> {
        let (map, range) = self.mapping(offset, length)?;
        Ok(Bytes::from_owner(PoolSlice { map, range }))
    }

    /// Appends the range's bytes to `out`.
    pub fn read_into(&self, offset: u64, length: u64, out: &mut Vec<u8>) -> Result<(), RangeError> {
        let (map, range) = self.mapping(offset, length)?;
        // SAFETY: the range lies inside the mapping, which `map` keeps alive;
        // the client may write the same pages concurrently, which yields
        // unspecified bytes but no unsoundness for a byte copy.
        let src = unsafe { std::slice::from_raw_parts(map.as_ptr().add(range.start), range.len()) };
        out.extend_from_slice(src);
        Ok(())
    }

    /// Copies `data` into the pool at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), RangeError> {
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
    /// Lookups of an id that names no registered pool (a closed pool, or a
    /// stale id from before a daemon restart).
    pub unknown_ids: u64,
}

/// Every registered pool, by id. Ids are unique to this run of the daemon
/// ([`IdSequence`]; never two live pools with one id, even after the counter
/// wraps).
#[derive(Debug)]
pub struct PoolRegistry {
    limits: PoolLimits,
    /// Ids of [`PoolFormat::Wide`] pools.
    wide_ids: IdSequence,
    /// Ids of [`PoolFormat::Sglang`] pools.
    sglang_ids: IdSequence,
    pools: RwLock<HashMap<u64, Arc<Pool>>>,
    registered: AtomicU64,
    refused: AtomicU64,
    unregistered: AtomicU64,
    unsealed: AtomicU64,
    unknown_ids: AtomicU64,
}

/// Who registers a pool, and how its id is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registrant {
    /// The preamble's format: which id range the pool's id comes from.
    pub format: PoolFormat,
    /// The registering process (`SO_PEERCRED`), if known.
    pub peer_pid: Option<i32>,
}

impl Registrant {
    /// A kvstrata client of unknown pid.
    pub const WIDE: Registrant = Registrant {
        format: PoolFormat::Wide,
        peer_pid: None,
    };
}

impl PoolRegistry {
    /// A registry whose id sequences start at random points.
    pub fn new(limits: PoolLimits) -> Self {
        PoolRegistry::with_ids(
            limits,
            IdSequence::random(IdSpace::Wide),
            IdSequence::random(IdSpace::Sglang),
        )
    }

    /// A registry with the given id sequences (tests pin them).
    pub fn with_ids(limits: PoolLimits, wide_ids: IdSequence, sglang_ids: IdSequence) -> Self {
        PoolRegistry {
            limits,
            wide_ids,
            sglang_ids,
            pools: RwLock::new(HashMap::new()),
            registered: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            unregistered: AtomicU64::new(0),
            unsealed: AtomicU64::new(0),
            unknown_ids: AtomicU64::new(0),
        }
    }

    /// Maps `fd` read-write and registers it under a new id of the
    /// registrant's format.
    pub fn register(
        &self,
        name: String,
        fd: OwnedFd,
        who: Registrant,
    ) -> Result<Arc<Pool>, RegisterError> {
        let r = self.try_register(name, fd, who);
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

    fn try_register(
        &self,
        name: String,
        fd: OwnedFd,
        who: Registrant,
    ) -> Result<Arc<Pool>, RegisterError> {
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
        let ids = match who.format {
            PoolFormat::Wide => &self.wide_ids,
            PoolFormat::Sglang => &self.sglang_ids,
        };
        let mut pools = self.pools.write();
        // Checked again under the lock: two registrations may race.
        if pools.len() >= self.limits.max_pools {
            return Err(RegisterError::TooManyPools { count: pools.len() });
        }
        // Skips an id still in use (possible only once a counter wrapped).
        let id = loop {
            let id = ids.next_id();
            if !pools.contains_key(&id) {
                break id;
            }
        };
        let pool = Arc::new(Pool {
            id,
            name,
            format: who.format,
            peer_pid: who.peer_pid.filter(|&p| p > 0),
            file,
            map: RwLock::new(Arc::new(map)),
            max_bytes: self.limits.max_pool_bytes,
            sealed,
        });
        pools.insert(id, Arc::clone(&pool));
        Ok(pool)
    }

    /// Removes a pool; it is unmapped when the last request using it is done.
    pub fn unregister(&self, id: u64) -> bool {
        let removed = self.pools.write().remove(&id).is_some();
        if removed {
            self.unregistered.fetch_add(1, Ordering::Relaxed);
        }
        removed
    }

    /// The pool registered under `id`. An unknown id is counted
    /// ([`PoolStats::unknown_ids`]).
    pub fn get(&self, id: u64) -> Result<Arc<Pool>, RangeError> {
        let found = self.pools.read().get(&id).cloned();
        found.ok_or_else(|| {
            self.unknown_ids.fetch_add(1, Ordering::Relaxed);
            RangeError::UnknownPool(id)
        })
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
            unknown_ids: self.unknown_ids.load(Ordering::Relaxed),
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
        let pool = reg
            .register("p".into(), memfd(&[7u8; 4096]), Registrant::WIDE)
            .unwrap();
        assert!(pool.id() >= MIN_WIDE_POOL_ID);
        assert_eq!(pool.range(4000, 96).unwrap(), 4000..4096);
        assert!(matches!(
            pool.range(4000, 97),
            Err(RangeError::OutOfBounds { .. })
        ));
        assert!(pool.range(u64::MAX, 2).is_err());
        pool.write(10, b"hello").unwrap();
        let b = pool.range_bytes(9, 7).unwrap();
        assert_eq!(&b[..], b"\x07hello\x07");
        let mut v = Vec::new();
        pool.read_into(10, 5, &mut v).unwrap();
        assert_eq!(v, b"hello");
        assert!(pool.write(4095, b"xx").is_err());
    }

    #[test]
    fn ids_follow_a_random_base_in_their_space_and_never_repeat_while_live() {
        // Wide ids: consecutive from the base, wrapping past the 31-bit range.
        let seq = IdSequence::with_base(IdSpace::Wide, u64::MAX - MIN_WIDE_POOL_ID - 1);
        let ids: Vec<u64> = (0..3).map(|_| seq.next_id()).collect();
        assert_eq!(ids, vec![u64::MAX - 1, u64::MAX, MIN_WIDE_POOL_ID]);
        // SGLang ids: 1 to 2^31 - 1, wrapping to 1, never 0.
        let seq = IdSequence::with_base(IdSpace::Sglang, MAX_SGLANG_POOL_ID - 2);
        let ids: Vec<u64> = (0..4).map(|_| seq.next_id()).collect();
        assert_eq!(ids, vec![MAX_SGLANG_POOL_ID - 1, MAX_SGLANG_POOL_ID, 1, 2]);
        // Random bases differ between "runs" (2^-64 to fail).
        let a = IdSequence::random(IdSpace::Wide).next_id();
        let b = IdSequence::random(IdSpace::Wide).next_id();
        assert_ne!(a, b);
        assert!(IdSpace::Wide.holds(a) && !IdSpace::Sglang.holds(a));
        // A wrapped counter skips the ids of live pools.
        let limits = PoolLimits {
            max_pools: 8,
            max_pool_bytes: 1 << 20,
        };
        let reg = PoolRegistry::with_ids(
            limits,
            IdSequence::with_base(IdSpace::Wide, 0),
            IdSequence::with_base(IdSpace::Sglang, MAX_SGLANG_POOL_ID - 1),
        );
        let sglang = Registrant {
            format: PoolFormat::Sglang,
            peer_pid: Some(42),
        };
        let p = reg.register("s".into(), memfd(&[0; 10]), sglang).unwrap();
        assert_eq!(
            (p.id(), p.format(), p.peer_pid()),
            (MAX_SGLANG_POOL_ID, PoolFormat::Sglang, Some(42))
        );
        let q = reg.register("s".into(), memfd(&[0; 10]), sglang).unwrap();
        assert_eq!(q.id(), 1);
        let w = reg
            .register("w".into(), memfd(&[0; 10]), Registrant::WIDE)
            .unwrap();
        assert_eq!(
            (w.id(), w.format(), w.peer_pid()),
            (MIN_WIDE_POOL_ID, PoolFormat::Wide, None)
        );
        let reg = PoolRegistry::with_ids(
            limits,
            IdSequence::with_base(IdSpace::Wide, MIN_WIDE_POOL_ID),
            IdSequence::with_base(IdSpace::Sglang, 0),
        );
        let first = reg.register("s".into(), memfd(&[0; 10]), sglang).unwrap();
        assert_eq!(first.id(), 1);
        // The counter comes round to 1 again after 2^31 - 1 ids.
        reg.sglang_ids
            .next
            .store(MAX_SGLANG_POOL_ID, Ordering::Relaxed);
        let next = reg.register("s".into(), memfd(&[0; 10]), sglang).unwrap();
        assert_eq!(next.id(), 2, "id 1 is still live");
    }

    #[test]
    fn ids_are_unique_and_limits_hold() {
        let reg = registry();
        let a = reg
            .register("a".into(), memfd(&[0; 10]), Registrant::WIDE)
            .unwrap();
        assert!(matches!(
            reg.register("e".into(), memfd(&[]), Registrant::WIDE),
            Err(RegisterError::Empty)
        ));
        assert!(matches!(
            reg.register(
                "big".into(),
                memfd(&vec![0; (1 << 20) + 1]),
                Registrant::WIDE
            ),
            Err(RegisterError::TooLarge { .. })
        ));
        let b = reg
            .register("b".into(), memfd(&[0; 10]), Registrant::WIDE)
            .unwrap();
        assert_ne!(b.id(), a.id());
        assert!(matches!(
            reg.register("c".into(), memfd(&[0; 10]), Registrant::WIDE),
            Err(RegisterError::TooManyPools { .. })
        ));
        assert!(reg.unregister(a.id()));
        assert!(!reg.unregister(a.id()));
        assert_eq!(
            reg.get(a.id()).unwrap_err(),
            RangeError::UnknownPool(a.id())
        );
        let c = reg
            .register("c".into(), memfd(&[0; 10]), Registrant::WIDE)
            .unwrap();
        assert!(c.id() != b.id() && c.id() != a.id());
        let s = reg.stats();
        assert_eq!((s.pools, s.bytes, s.registered, s.refused), (2, 20, 3, 3));
        assert_eq!(s.unknown_ids, 1);
        assert_eq!(reg.names(), vec!["b".to_string(), "c".to_string()]);
    }

    #[test]
    fn a_grown_file_is_mapped_again() {
        let reg = registry();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[1u8; 4096]).unwrap();
        let pool = reg
            .register(
                "grow".into(),
                OwnedFd::from(f.try_clone().unwrap()),
                Registrant::WIDE,
            )
            .unwrap();
        assert!(pool.range(4096, 4096).is_err());
        f.write_all(&[2u8; 4096]).unwrap();
        let b = pool.range_bytes(4090, 12).unwrap();
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
            .register(
                "shrink".into(),
                OwnedFd::from(f.try_clone().unwrap()),
                Registrant::WIDE,
            )
            .unwrap();
        assert!(!pool.sealed(), "a plain file cannot be sealed");
        pool.write(4096, b"ok").unwrap();
        f.set_len(4096).unwrap();
        assert!(matches!(
            pool.write(4096, b"no"),
            Err(RangeError::Shrunk { .. })
        ));
        assert!(pool.range_bytes(0, 4096).is_ok());
    }

    #[test]
    fn a_pipe_is_refused() {
        let (r, _w) = std::io::pipe().unwrap();
        let reg = registry();
        assert!(matches!(
            reg.register("p".into(), OwnedFd::from(r), Registrant::WIDE),
            Err(RegisterError::NotAFile)
        ));
    }
}
