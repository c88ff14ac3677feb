//! [`SharedPool`]: a shared-memory pool registered with the daemon, and
//! [`PoolRange`]s allocated in it.
//!
//! A client on the same host as the daemon can move block payloads through
//! shared memory instead of gRPC messages (`docs/protocol.md`, "Shared-memory
//! pools"). [`SharedPool::create`] makes an anonymous memory file
//! (`memfd_create`), maps it read-write, and registers it on the daemon's
//! mempool socket (`kvstrata serve --mempool-socket PATH`) by passing the file
//! descriptor with `SCM_RIGHTS`, in kvstrata's wide format
//! ([`kvstrata_types::wire::pool`]): 8 bytes little-endian magic
//! `0x2_8DF6FBFD`, a u32 little-endian name length, the name, with the
//! descriptor attached; the daemon answers a u64 little-endian pool id. The
//! registration connection stays open for the life of the [`SharedPool`];
//! dropping the pool closes it, and the daemon unmaps the pool (later requests
//! naming it get `region_error` / `BadRegion`).
//!
//! Pool ids are unique to one run of the daemon: after a daemon restart the
//! old id names no pool (requests naming it are refused the same way), so a
//! client that sees its registration connection closed registers a new pool.
//!
//! [`SharedPool::alloc`] hands out [`PoolRange`]s: 64-byte aligned byte ranges of
//! the pool (first fit, freed ranges are coalesced). A range frees itself when
//! dropped. [`PoolRange::to_proto`] is what
//! [`Client::batch_put_ranges`](crate::Client::batch_put_ranges) and
//! [`Client::batch_get_into`](crate::Client::batch_get_into) send: a put reads
//! the block from the range, a get writes a found block into it.
//!
//! The daemon reads and writes the pool's memory while a request that names a
//! range is in flight; do not touch a range between sending such a request and
//! its answer (the borrow rules do not see the other process).
//!
//! ```no_run
//! # async fn demo() -> Result<(), kvstrata_client::ClientError> {
//! use kvstrata_client::{Client, RangePutItem, SharedPool};
//! use kvstrata_client::proto::PutStatus;
//! use kvstrata_client::{Dtype, NamespaceSpec};
//!
//! let client = Client::connect("unix:///run/kvstrata/kvstrata.sock").await?;
//! let spec = NamespaceSpec::layer_major("my-model", 30, 3, 64, Dtype::F16, 16);
//! let ns = client.register_namespace(&spec).await?;
//! let block = ns.block_bytes as usize;
//!
//! // One pool per process (or per thread), sized for the blocks in flight.
//! let pool = SharedPool::create("unix:///run/kvstrata/mempool.sock", "worker-0", 4 * block)?;
//! let mut range = pool.alloc(block)?;
//! range.as_mut_slice().fill(7); // the block's bytes
//!
//! let put = client
//!     .batch_put_ranges(&ns.id, vec![RangePutItem::new(&b"key-0"[..], range.to_proto())])
//!     .await?;
//! assert_eq!(put.results, vec![PutStatus::Stored as i32]);
//!
//! // Read it back into the same range (or any other of the same length).
//! let got = client.batch_get_into(&ns.id, &[b"key-0"], &[range.to_proto()]).await?;
//! assert!(got[0].found && got[0].region_error.is_empty());
//! assert!(range.as_slice().iter().all(|&b| b == 7));
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{ErrorKind, IoSlice, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kvstrata_proto::v1 as proto;
use kvstrata_types::wire::pool as wire;
use memmap2::{MmapOptions, MmapRaw};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};

use crate::error::ClientError;
use crate::target::Target;

/// Alignment of every [`PoolRange`]'s offset, in bytes.
pub const RANGE_ALIGN: usize = 64;
/// How long [`SharedPool::create`] waits for the daemon's answer.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// The mapping and the allocator, shared by a pool and its ranges.
struct PoolShared {
    id: u64,
    name: String,
    map: MmapRaw,
    free: Mutex<FreeList>,
}

impl PoolShared {
    fn free_list(&self) -> MutexGuard<'_, FreeList> {
        // A panic while the lock was held cannot leave the list half-updated
        // (every update is a few map operations), so a poisoned lock is usable.
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A shared-memory pool registered with the daemon. See the [module docs](self).
///
/// Dropping it closes the registration connection, which unregisters the pool
/// on the daemon; [`PoolRange`]s still alive keep the client's own mapping valid.
pub struct SharedPool {
    shared: Arc<PoolShared>,
    /// The registration connection: open for as long as the pool is registered.
    _conn: UnixStream,
}

impl fmt::Debug for SharedPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedPool")
            .field("id", &self.shared.id)
            .field("name", &self.shared.name)
            .field("len", &self.shared.map.len())
            .field("free_bytes", &self.free_bytes())
            .finish()
    }
}

impl SharedPool {
    /// Creates a pool of `bytes` bytes and registers it on the daemon's mempool
    /// socket (`unix:///path` or `/path`) under `name` (1 to 240 bytes, no NUL).
    ///
    /// Blocks until the daemon answers, at most [`REGISTER_TIMEOUT`]. Fails
    /// with [`ClientError::PoolRefused`] when the daemon closes the connection
    /// instead of answering (its log says why).
    pub fn create(
        mempool_socket: &str,
        name: &str,
        bytes: usize,
    ) -> Result<SharedPool, ClientError> {
        let invalid = |reason: String| ClientError::PoolInvalid {
            name: name.to_string(),
            reason,
        };
        if name.is_empty() || name.len() > wire::MAX_NAME_BYTES {
            return Err(invalid(format!(
                "the name is {} bytes; it must be 1 to {}",
                name.len(),
                wire::MAX_NAME_BYTES
            )));
        }
        if name.contains('\0') {
            return Err(invalid("the name contains a NUL byte".into()));
        }
        if bytes == 0 {
            return Err(invalid("the pool size must be at least 1 byte".into()));
        }
        let path = match Target::parse(mempool_socket)? {
            Target::Unix(path) => path,
            Target::Http(_) => {
                return Err(invalid(format!(
                    "the mempool socket {mempool_socket:?} is not a Unix socket path \
                     (use unix:///path or /path)"
                )));
            }
        };
        let io = |what: String| {
            let name = name.to_string();
            move |source: std::io::Error| ClientError::PoolIo { name, what, source }
        };
        let size = libc::off_t::try_from(bytes)
            .map_err(|_| invalid(format!("{bytes} bytes is too large")))?;

        let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
            .map_err(|e| io("create the memory file (memfd_create)".into())(e.into()))?;
        nix::unistd::ftruncate(&fd, size)
            .map_err(|e| io(format!("size the memory file to {bytes} bytes"))(e.into()))?;
        // The size is fixed from here on: a shrink would make the daemon's
        // accesses fault, so the daemon can rely on the size it maps.
        fcntl(
            &fd,
            FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW),
        )
        .map_err(|e| io("seal the memory file's size".into())(e.into()))?;
        let file = File::from(fd);
        let map = MmapOptions::new()
            .len(bytes)
            .populate()
            .map_raw(&file)
            .map_err(io(format!("map {bytes} bytes")))?;

        let conn = UnixStream::connect(&path).map_err(io(format!(
            "connect to the mempool socket {}",
            path.display()
        )))?;
        let id = register(&conn, &file, name, &path)?;
        // The daemon holds its own reference to the file; the mapping keeps ours.
        drop(file);
        Ok(SharedPool {
            shared: Arc::new(PoolShared {
                id,
                name: name.to_string(),
                map,
                free: Mutex::new(FreeList::new(bytes)),
            }),
            _conn: conn,
        })
    }

    /// The pool id the daemon assigned: 64 bits, unique to this run of the
    /// daemon.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The name the pool was registered under.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Size of the pool in bytes.
    pub fn len(&self) -> usize {
        self.shared.map.len()
    }

    /// Always false: a pool has at least one byte.
    pub fn is_empty(&self) -> bool {
        self.shared.map.len() == 0
    }

    /// Bytes not held by any range.
    pub fn free_bytes(&self) -> usize {
        self.shared.free_list().free_bytes()
    }

    /// Allocates `len` bytes at a 64-byte aligned offset (first fit). Fails
    /// with [`ClientError::PoolExhausted`] when no free range is large enough.
    pub fn alloc(&self, len: usize) -> Result<PoolRange, ClientError> {
        if len == 0 {
            return Err(ClientError::PoolInvalid {
                name: self.shared.name.clone(),
                reason: "cannot allocate a range of 0 bytes".into(),
            });
        }
        let mut free = self.shared.free_list();
        let (offset, extent) = free.alloc(len).ok_or_else(|| ClientError::PoolExhausted {
            name: self.shared.name.clone(),
            requested: len,
            free: free.free_bytes(),
            largest: free.largest(),
        })?;
        drop(free);
        Ok(PoolRange {
            pool: self.shared.clone(),
            offset,
            len,
            extent,
        })
    }
}

/// Sends the registration preamble with the memory file attached, and reads the pool id.
fn register(
    conn: &UnixStream,
    file: &File,
    name: &str,
    path: &std::path::Path,
) -> Result<u64, ClientError> {
    let io = |what: &str, source: std::io::Error| ClientError::PoolIo {
        name: name.to_string(),
        what: format!("{what} (mempool socket {})", path.display()),
        source,
    };
    conn.set_read_timeout(Some(REGISTER_TIMEOUT))
        .and_then(|()| conn.set_write_timeout(Some(REGISTER_TIMEOUT)))
        .map_err(|e| io("set socket timeouts", e))?;
    let format = wire::PoolFormat::Wide;
    let preamble = wire::encode_preamble(format, name);
    let fds = [file.as_raw_fd()];
    let cmsgs = [ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(&preamble)];
    let sent = loop {
        match sendmsg::<UnixAddr>(conn.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Err(Errno::EINTR) => continue,
            other => break other,
        }
    }
    .map_err(|e| io("send the registration", e.into()))?;
    if sent != preamble.len() {
        return Err(io(
            "send the registration",
            std::io::Error::new(
                ErrorKind::WriteZero,
                format!("sent {sent} of {} bytes in one message", preamble.len()),
            ),
        ));
    }
    let mut answer = [0u8; wire::WIDE_REPLY_BYTES];
    match (&*conn).read_exact(&mut answer) {
        Ok(()) => {}
        Err(e)
            if e.kind() == ErrorKind::UnexpectedEof || e.kind() == ErrorKind::ConnectionReset =>
        {
            return Err(ClientError::PoolRefused {
                name: name.to_string(),
                socket: path.display().to_string(),
            });
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            return Err(io(
                &format!(
                    "read the pool id (no answer within {} s)",
                    REGISTER_TIMEOUT.as_secs()
                ),
                e,
            ));
        }
        Err(e) => return Err(io("read the pool id", e)),
    }
    wire::parse_reply(format, &answer).map_err(|e| {
        ClientError::InvalidResponse(format!(
            "mempool socket {} answered an invalid reply for pool {name:?}: {e}",
            path.display()
        ))
    })
}

/// A byte range of a [`SharedPool`], freed when dropped. It keeps the client's
/// mapping of the pool alive, even after the pool itself is dropped (the daemon
/// then no longer knows the pool, so requests naming the range fail).
pub struct PoolRange {
    pool: Arc<PoolShared>,
    offset: usize,
    len: usize,
    /// Bytes reserved: `len` rounded up to [`RANGE_ALIGN`] (less at the end of the pool).
    extent: usize,
}

impl fmt::Debug for PoolRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolRange")
            .field("pool_id", &self.pool.id)
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

impl PoolRange {
    /// Id of the pool the range lies in.
    pub fn pool_id(&self) -> u64 {
        self.pool.id
    }

    /// Offset of the first byte in the pool (a multiple of 64).
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Length in bytes, as allocated.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: ranges have at least one byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The range's bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: [offset, offset + len) lies inside the mapping (the
        // allocator hands out only such ranges, and the file's size is sealed),
        // the mapping lives as long as `self.pool`, and no other `PoolRange`
        // covers these bytes, so no `&mut` to them exists while `&self` is
        // borrowed. The daemon may write them during a request naming this
        // range; the module docs forbid touching the range meanwhile.
        unsafe { std::slice::from_raw_parts(self.pool.map.as_ptr().add(self.offset), self.len) }
    }

    /// The range's bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` makes this the only reference.
        unsafe {
            std::slice::from_raw_parts_mut(self.pool.map.as_mut_ptr().add(self.offset), self.len)
        }
    }

    /// The wire form, for `PutItem.range` and `BatchGetRequest.ranges`.
    pub fn to_proto(&self) -> proto::PoolRange {
        proto::PoolRange {
            pool_id: self.pool.id,
            offset: self.offset as u64,
            length: self.len as u64,
        }
    }
}

impl From<&PoolRange> for proto::PoolRange {
    fn from(r: &PoolRange) -> Self {
        r.to_proto()
    }
}

impl Drop for PoolRange {
    fn drop(&mut self) {
        self.pool.free_list().free(self.offset, self.extent);
    }
}

/// Free ranges of a pool, by offset: first-fit allocation at 64-byte aligned
/// offsets, coalescing on free.
///
/// Invariants: ranges are disjoint, never adjacent (adjacent ones are merged),
/// start at multiples of [`RANGE_ALIGN`], and have lengths that are multiples
/// of it, except a range that ends at the end of the pool.
#[derive(Debug)]
struct FreeList {
    /// offset -> length
    ranges: BTreeMap<usize, usize>,
    total: usize,
    free: usize,
}

impl FreeList {
    fn new(total: usize) -> Self {
        let mut ranges = BTreeMap::new();
        if total > 0 {
            ranges.insert(0, total);
        }
        FreeList {
            ranges,
            total,
            free: total,
        }
    }

    fn free_bytes(&self) -> usize {
        self.free
    }

    fn largest(&self) -> usize {
        self.ranges.values().copied().max().unwrap_or(0)
    }

    /// Reserves `len` (> 0) bytes; returns (offset, bytes reserved).
    fn alloc(&mut self, len: usize) -> Option<(usize, usize)> {
        let want = len.checked_next_multiple_of(RANGE_ALIGN)?;
        let (&offset, &range) = self.ranges.iter().find(|&(_, &r)| r >= len)?;
        // A range shorter than `want` but at least `len` long is the one at the
        // end of the pool (all others have aligned lengths): take all of it.
        let extent = want.min(range);
        self.ranges.remove(&offset);
        if range > extent {
            self.ranges.insert(offset + extent, range - extent);
        }
        self.free -= extent;
        Some((offset, extent))
    }

    /// Returns a range reserved by [`FreeList::alloc`], merging it with its neighbours.
    fn free(&mut self, offset: usize, extent: usize) {
        debug_assert!(offset + extent <= self.total);
        let mut start = offset;
        let mut len = extent;
        if let Some((&prev, &prev_len)) = self.ranges.range(..offset).next_back() {
            debug_assert!(prev + prev_len <= offset, "double free at {offset}");
            if prev + prev_len == offset {
                self.ranges.remove(&prev);
                start = prev;
                len += prev_len;
            }
        }
        if let Some(&next_len) = self.ranges.get(&(offset + extent)) {
            self.ranges.remove(&(offset + extent));
            len += next_len;
        }
        self.ranges.insert(start, len);
        self.free += extent;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::{FromRawFd, OwnedFd, RawFd};
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// What a fake daemon received on its mempool socket.
    struct Registration {
        magic: u64,
        name: String,
        bytes_in_one_message: usize,
        file: File,
        conn: UnixStream,
    }

    fn socket_path(tag: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kvstrata-pool-test-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("mempool.sock")
    }

    /// Accepts one registration; answers `answer` (or closes the connection
    /// without answering when `None`).
    fn fake_daemon(
        path: &std::path::Path,
        answer: Option<u64>,
    ) -> std::thread::JoinHandle<Registration> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 512];
            let mut cmsg = nix::cmsg_space!([RawFd; 1]);
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let msg = nix::sys::socket::recvmsg::<UnixAddr>(
                conn.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::empty(),
            )
            .unwrap();
            let n = msg.bytes;
            let mut fds = Vec::new();
            for c in msg.cmsgs().unwrap() {
                if let nix::sys::socket::ControlMessageOwned::ScmRights(f) = c {
                    fds.extend(f);
                }
            }
            assert_eq!(fds.len(), 1, "exactly one fd");
            // SAFETY: the fd was just received and is owned by nobody else.
            let file = File::from(unsafe { OwnedFd::from_raw_fd(fds[0]) });
            let magic = u64::from_le_bytes(buf[..8].try_into().unwrap());
            let len = u32::from_le_bytes(buf[8..12].try_into().unwrap()) as usize;
            let name = String::from_utf8(buf[12..12 + len].to_vec()).unwrap();
            assert_eq!(
                wire::parse_preamble(&buf[..n]),
                Ok(wire::PreambleParse::Complete(wire::PoolPreamble {
                    name: name.clone(),
                    format: wire::PoolFormat::Wide
                }))
            );
            if let Some(id) = answer {
                conn.write_all(&id.to_le_bytes()).unwrap();
            }
            Registration {
                magic,
                name,
                bytes_in_one_message: n,
                file,
                conn,
            }
        })
    }

    #[test]
    fn registers_with_the_wide_preamble_and_shares_memory() {
        let path = socket_path("ok");
        let id = 0x9e37_79b9_7f4a_7c15;
        let daemon = fake_daemon(&path, Some(id));
        let target = format!("unix://{}", path.display());
        let pool = SharedPool::create(&target, "worker-0", 10_000).unwrap();
        let mut reg = daemon.join().unwrap();
        assert_eq!(reg.magic, wire::MAGIC_WIDE);
        assert_eq!(reg.name, "worker-0");
        assert_eq!(reg.bytes_in_one_message, 12 + "worker-0".len());
        assert_eq!(
            (pool.id(), pool.name(), pool.len()),
            (id, "worker-0", 10_000)
        );
        assert_eq!(reg.file.metadata().unwrap().len(), 10_000);

        // The daemon's mapping of the fd sees what the client writes, and back.
        let peer = MmapOptions::new().map_raw(&reg.file).unwrap();
        let mut a = pool.alloc(1000).unwrap();
        let mut b = pool.alloc(5000).unwrap();
        assert_eq!((a.offset(), b.offset()), (0, 1024));
        assert_eq!(
            b.to_proto(),
            proto::PoolRange {
                pool_id: id,
                offset: 1024,
                length: 5000
            }
        );
        a.as_mut_slice().fill(0xab);
        // SAFETY: test-only view of the peer's mapping; no other reference to it.
        let daemon_view = unsafe { std::slice::from_raw_parts_mut(peer.as_mut_ptr(), peer.len()) };
        assert!(daemon_view[..1000].iter().all(|&x| x == 0xab));
        daemon_view[1024..1024 + 5000].fill(0x5c);
        assert!(b.as_slice().iter().all(|&x| x == 0x5c));
        b.as_mut_slice()[0] = 1;
        assert_eq!(daemon_view[1024], 1);

        // Exhaustion names the sizes.
        let e = pool.alloc(4000).unwrap_err();
        assert!(
            matches!(
                e,
                ClientError::PoolExhausted {
                    requested: 4000,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("exhausted"), "{e}");
        drop(a);
        assert_eq!(pool.alloc(1024).unwrap().offset(), 0);
        assert_eq!(pool.free_bytes(), 10_000 - 5056);

        // Dropping the pool closes the registration connection; the range
        // stays readable.
        drop(pool);
        let mut rest = Vec::new();
        reg.conn
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(reg.conn.read_to_end(&mut rest).unwrap(), 0);
        assert_eq!(b.as_slice()[0], 1);
        drop(b);
    }

    #[test]
    fn a_closed_connection_is_a_refusal() {
        let path = socket_path("refused");
        let daemon = fake_daemon(&path, None);
        let target = path.display().to_string();
        let h = std::thread::spawn(move || SharedPool::create(&target, "p", 4096));
        let reg = daemon.join().unwrap();
        drop(reg);
        let e = h.join().unwrap().unwrap_err();
        assert!(matches!(e, ClientError::PoolRefused { .. }), "{e:?}");
        assert!(
            e.to_string()
                .contains("daemon refused the pool registration"),
            "{e}"
        );
    }

    #[test]
    fn an_id_outside_the_wide_range_is_an_invalid_response() {
        // A 32-bit id counted from 1 is what daemons before 64-bit pool ids
        // answered; the client refuses it rather than naming a pool by it.
        let path = socket_path("narrow");
        let daemon = fake_daemon(&path, Some(7));
        let target = path.display().to_string();
        let e = SharedPool::create(&target, "p", 4096).unwrap_err();
        drop(daemon.join().unwrap());
        assert!(matches!(e, ClientError::InvalidResponse(_)), "{e:?}");
        assert!(e.to_string().contains("pool_id: 7 is not"), "{e}");
    }

    #[test]
    fn bad_arguments_are_refused_before_connecting() {
        let absent = socket_path("absent");
        let t = absent.display().to_string();
        for (name, bytes) in [
            ("", 4096),
            (&*"x".repeat(241), 4096),
            ("a\0b", 4096),
            ("p", 0),
        ] {
            let e = SharedPool::create(&t, name, bytes).unwrap_err();
            assert!(
                matches!(e, ClientError::PoolInvalid { .. }),
                "{name:?} {bytes}: {e:?}"
            );
        }
        let e = SharedPool::create("http://127.0.0.1:1", "p", 4096).unwrap_err();
        assert!(matches!(e, ClientError::PoolInvalid { .. }), "{e:?}");
        let e = SharedPool::create(&t, "p", 4096).unwrap_err();
        assert!(matches!(e, ClientError::PoolIo { .. }), "{e:?}");
        assert!(e.to_string().contains("mempool.sock"), "{e}");
        // A 240-byte name is fine up to the connection.
        let e = SharedPool::create(&t, &"x".repeat(240), 4096).unwrap_err();
        assert!(matches!(e, ClientError::PoolIo { .. }), "{e:?}");
    }

    fn ranges(f: &FreeList) -> Vec<(usize, usize)> {
        f.ranges.iter().map(|(&o, &l)| (o, l)).collect()
    }

    #[test]
    fn allocations_are_aligned_and_first_fit() {
        let mut f = FreeList::new(1000);
        let a = f.alloc(1).unwrap();
        let b = f.alloc(65).unwrap();
        let c = f.alloc(64).unwrap();
        assert_eq!(a, (0, 64));
        assert_eq!(b, (64, 128));
        assert_eq!(c, (192, 64));
        for (o, _) in [a, b, c] {
            assert_eq!(o % RANGE_ALIGN, 0);
        }
        assert_eq!(f.free_bytes(), 1000 - 256);
        // Free the middle one: the next small allocation reuses it (first fit).
        f.free(b.0, b.1);
        assert_eq!(f.alloc(10).unwrap(), (64, 64));
        assert_eq!(f.alloc(64).unwrap(), (128, 64));
        assert_eq!(f.alloc(64).unwrap(), (256, 64));
    }

    #[test]
    fn freeing_coalesces_with_both_neighbours() {
        let mut f = FreeList::new(64 * 10);
        let r: Vec<_> = (0..10).map(|_| f.alloc(64).unwrap()).collect();
        assert!(f.ranges.is_empty());
        assert_eq!(f.alloc(1), None);
        // Free 1, 3, 2 (in that order): one range 1..4.
        f.free(r[1].0, r[1].1);
        f.free(r[3].0, r[3].1);
        assert_eq!(ranges(&f), vec![(64, 64), (192, 64)]);
        f.free(r[2].0, r[2].1);
        assert_eq!(ranges(&f), vec![(64, 192)]);
        // Free the first: merges forward.
        f.free(r[0].0, r[0].1);
        assert_eq!(ranges(&f), vec![(0, 256)]);
        // Free the last, then the one before it: merges backward and forward.
        f.free(r[9].0, r[9].1);
        f.free(r[8].0, r[8].1);
        assert_eq!(ranges(&f), vec![(0, 256), (512, 128)]);
        for &(o, e) in &r[4..8] {
            f.free(o, e);
        }
        assert_eq!(ranges(&f), vec![(0, 640)]);
        assert_eq!(f.free_bytes(), 640);
    }

    #[test]
    fn fragmentation_fails_a_large_request_until_neighbours_are_freed() {
        let mut f = FreeList::new(64 * 8);
        let r: Vec<_> = (0..8).map(|_| f.alloc(64).unwrap()).collect();
        for i in (0..8).step_by(2) {
            f.free(r[i].0, r[i].1);
        }
        // 256 bytes free, but in four separate 64-byte holes.
        assert_eq!(f.free_bytes(), 256);
        assert_eq!(f.largest(), 64);
        assert_eq!(f.alloc(128), None);
        f.free(r[5].0, r[5].1);
        // Holes 4, 5, 6 merged: 192 bytes at 256.
        assert_eq!(f.largest(), 192);
        assert_eq!(f.alloc(128), Some((256, 128)));
        // First fit: the 64-byte hole at 0 takes the next small request.
        assert_eq!(f.alloc(64), Some((0, 64)));
    }

    #[test]
    fn the_unaligned_tail_of_the_pool_is_usable() {
        // 100 bytes: one 64-byte aligned range, then a 36-byte tail.
        let mut f = FreeList::new(100);
        assert_eq!(f.alloc(100), Some((0, 100)));
        assert_eq!(f.alloc(1), None);
        f.free(0, 100);
        assert_eq!(f.alloc(10), Some((0, 64)));
        assert_eq!(f.alloc(37), None);
        assert_eq!(f.alloc(36), Some((64, 36)));
        assert_eq!(f.free_bytes(), 0);
        f.free(64, 36);
        f.free(0, 64);
        assert_eq!(ranges(&f), vec![(0, 100)]);
    }

    #[test]
    fn exhaustion_and_absurd_sizes_fail_cleanly() {
        let mut f = FreeList::new(4096);
        assert_eq!(f.alloc(4097), None);
        assert_eq!(f.alloc(usize::MAX), None);
        assert_eq!(f.alloc(4096), Some((0, 4096)));
        assert_eq!(f.alloc(1), None);
        assert_eq!(f.free_bytes(), 0);
        assert_eq!(f.largest(), 0);
    }

    #[test]
    fn random_alloc_free_keeps_the_invariants() {
        use rand::rngs::SmallRng;
        use rand::{Rng, SeedableRng};
        let total = 64 * 1000 + 17;
        let mut f = FreeList::new(total);
        let mut live: Vec<(usize, usize)> = Vec::new();
        let mut rng = SmallRng::seed_from_u64(7);
        for _ in 0..20_000 {
            if live.is_empty() || rng.random_bool(0.55) {
                let len = rng.random_range(1..3000);
                if let Some((o, e)) = f.alloc(len) {
                    assert_eq!(o % RANGE_ALIGN, 0);
                    assert!(e >= len && o + e <= total);
                    live.push((o, e));
                }
            } else {
                let i = rng.random_range(0..live.len());
                let (o, e) = live.swap_remove(i);
                f.free(o, e);
            }
            // Free ranges and live allocations tile the pool exactly.
            let mut all: Vec<(usize, usize)> = ranges(&f).into_iter().chain(live.clone()).collect();
            all.sort_unstable();
            let mut end = 0;
            for (o, e) in all {
                assert_eq!(o, end);
                end = o + e;
            }
            assert_eq!(end, total);
            let fr = ranges(&f);
            for w in fr.windows(2) {
                assert!(w[0].0 + w[0].1 < w[1].0, "adjacent free ranges {w:?}");
            }
            assert_eq!(f.free_bytes(), fr.iter().map(|r| r.1).sum::<usize>());
        }
        for (o, e) in live {
            f.free(o, e);
        }
        assert_eq!(ranges(&f), vec![(0, total)]);
    }
}
