//! Slot files and aligned buffers: the two things `O_DIRECT` needs.
//!
//! A slot file is created once at its configured size with `fallocate`
//! (so the space is reserved on the drive and the file never grows), and
//! opened with `O_DIRECT` (and `O_DSYNC` for [`Durability::PowerLoss`]).
//! Every transfer uses a 4 KiB-aligned buffer, a 4 KiB-aligned offset and a
//! length that is a multiple of 4 KiB ([`ALIGN`]).
//!
//! [`AlignedBuf`]s come from a [`BufPool`] and go back to it when dropped, so
//! the data path does not pay for allocating and faulting in fresh pages for
//! every block. A pool made with [`BufPool::with_arena`] carves its buffers
//! out of one contiguous region allocated up front, which the io_uring engine
//! registers with the kernel once (fixed buffers): transfers from it skip the
//! per-operation page pinning of `O_DIRECT`. When the region is used up,
//! buffers come from the heap as before (and transfers from them are plain
//! reads and writes).
//!
//! [`Durability::PowerLoss`]: super::Durability::PowerLoss

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use parking_lot::Mutex;

use super::error::DiskError;

/// Alignment of every buffer, offset and length of a direct transfer.
pub const ALIGN: usize = 4096;

/// Rounds `n` up to a multiple of [`ALIGN`].
pub const fn align_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// A heap buffer aligned to [`ALIGN`] whose length is a multiple of it.
/// Returned to its pool (if any) on drop.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    pool: Option<Arc<BufPool>>,
}

// SAFETY: the buffer is plain owned memory; `&AlignedBuf` only gives shared
// access and `&mut AlignedBuf` exclusive access, like a `Vec<u8>`.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (rounded up to [`ALIGN`]); `None` if the
    /// allocation fails or `len` is 0.
    pub fn zeroed(len: usize) -> Option<Self> {
        let len = align_up(len);
        if len == 0 {
            return None;
        }
        let layout = Layout::from_size_align(len, ALIGN).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) })?;
        Some(AlignedBuf {
            ptr,
            len,
            pool: None,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` owns `len` initialised bytes (zeroed at allocation).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            if let Some(arena) = &pool.arena
                && arena.contains(self.ptr.as_ptr(), self.len)
            {
                arena.free(self.ptr.as_ptr(), self.len);
                return;
            }
            let buf = AlignedBuf {
                ptr: self.ptr,
                len: self.len,
                pool: None,
            };
            if let Some(rejected) = pool.give_back(buf) {
                drop(rejected);
            }
            return;
        }
        // The layout was valid when the buffer was allocated.
        if let Ok(layout) = Layout::from_size_align(self.len, ALIGN) {
            // SAFETY: allocated by `alloc_zeroed` with this layout.
            unsafe { dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

/// One contiguous region that pool buffers are carved from, page by page
/// (first fit over a bitmap of [`ALIGN`]-sized pages). Allocated zeroed once
/// and freed only with the pool, so an engine that registered it with the
/// kernel can rely on it for as long as it holds the pool.
struct Arena {
    base: NonNull<u8>,
    len: usize,
    /// One bit per page, set while the page belongs to a buffer.
    used: Mutex<Vec<u64>>,
}

// SAFETY: the region is plain owned memory; the bitmap hands each page to at
// most one buffer at a time, and buffers are `Send`/`Sync` like a `Vec<u8>`.
unsafe impl Send for Arena {}
unsafe impl Sync for Arena {}

impl Arena {
    fn new(len: usize) -> Option<Self> {
        let len = align_up(len);
        if len == 0 {
            return None;
        }
        let layout = Layout::from_size_align(len, ALIGN).ok()?;
        // SAFETY: the layout has a non-zero size.
        let base = NonNull::new(unsafe { alloc_zeroed(layout) })?;
        let pages = len / ALIGN;
        Some(Arena {
            base,
            len,
            used: Mutex::new(vec![0; pages.div_ceil(64)]),
        })
    }

    fn pages(&self) -> usize {
        self.len / ALIGN
    }

    fn contains(&self, ptr: *const u8, len: usize) -> bool {
        let start = self.base.as_ptr() as usize;
        let p = ptr as usize;
        p >= start && p + len <= start + self.len
    }

    /// `len` bytes (a multiple of [`ALIGN`]) of free pages, first fit.
    fn alloc(&self, len: usize) -> Option<NonNull<u8>> {
        let want = len / ALIGN;
        let total = self.pages();
        if want == 0 || want > total {
            return None;
        }
        let mut used = self.used.lock();
        let (mut start, mut run, mut i) = (0usize, 0usize, 0usize);
        while i < total {
            let word = used[i / 64];
            let step = if i % 64 == 0 && i + 64 <= total && (word == 0 || word == u64::MAX) {
                // A whole word at once: 64 free or 64 used pages.
                64
            } else {
                1
            };
            let free = if step == 64 {
                word == 0
            } else {
                (word >> (i % 64)) & 1 == 0
            };
            if free {
                if run == 0 {
                    start = i;
                }
                run += step;
            } else {
                run = 0;
            }
            i += step;
            if run >= want {
                for page in start..start + want {
                    used[page / 64] |= 1 << (page % 64);
                }
                // SAFETY: `start + want <= total`, so the offset is inside the region.
                return NonNull::new(unsafe { self.base.as_ptr().add(start * ALIGN) });
            }
        }
        None
    }

    /// Returns the pages of a buffer [`Arena::alloc`] handed out.
    fn free(&self, ptr: *const u8, len: usize) {
        let first = (ptr as usize - self.base.as_ptr() as usize) / ALIGN;
        let mut used = self.used.lock();
        for page in first..first + len / ALIGN {
            used[page / 64] &= !(1 << (page % 64));
        }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        if let Ok(layout) = Layout::from_size_align(self.len, ALIGN) {
            // SAFETY: allocated by `alloc_zeroed` with this layout; every
            // buffer carved from it holds the pool (and so the arena) alive.
            unsafe { dealloc(self.base.as_ptr(), layout) };
        }
    }
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena").field("len", &self.len).finish()
    }
}

/// Recycles aligned buffers, keeping at most `limit` bytes of idle buffers.
#[derive(Debug)]
pub struct BufPool {
    idle: Mutex<(Vec<AlignedBuf>, usize)>,
    limit: usize,
    /// The region buffers are carved from first, if the pool has one.
    arena: Option<Arena>,
}

impl BufPool {
    /// A pool of heap buffers.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(BufPool {
            idle: Mutex::new((Vec::new(), 0)),
            limit,
            arena: None,
        })
    }

    /// A pool that carves buffers out of one region of `arena_bytes`
    /// (allocated now, zeroed) and falls back to heap buffers, of which it
    /// keeps at most `limit` bytes idle, when the region is used up. Without
    /// memory for the region, a pool of heap buffers only.
    pub fn with_arena(limit: usize, arena_bytes: usize) -> Arc<Self> {
        let arena = Arena::new(arena_bytes);
        if arena.is_none() {
            tracing::warn!(
                bytes = arena_bytes,
                "disk tier: no memory for the I/O buffer region; heap buffers only"
            );
        }
        Arc::new(BufPool {
            idle: Mutex::new((Vec::new(), 0)),
            limit,
            arena,
        })
    }

    /// The pool's contiguous region (start, length), for registering it
    /// with the kernel. It stays valid as long as the pool lives.
    pub fn region(&self) -> Option<(*mut u8, usize)> {
        self.arena.as_ref().map(|a| (a.base.as_ptr(), a.len))
    }

    /// A buffer of at least `len` bytes (exactly `align_up(len)`), from the
    /// pool's region if there is room, else reused when one of that size is
    /// idle. Its contents are unspecified (but initialised).
    pub fn get(self: &Arc<Self>, len: usize) -> Option<AlignedBuf> {
        let len = align_up(len);
        if let Some(ptr) = self.arena.as_ref().and_then(|a| a.alloc(len)) {
            return Some(AlignedBuf {
                ptr,
                len,
                pool: Some(Arc::clone(self)),
            });
        }
        let reused = {
            let mut idle = self.idle.lock();
            let pos = idle.0.iter().rposition(|b| b.len == len);
            pos.map(|p| {
                let b = idle.0.swap_remove(p);
                idle.1 -= b.len;
                b
            })
        };
        let mut buf = match reused {
            Some(b) => b,
            None => AlignedBuf::zeroed(len)?,
        };
        buf.pool = Some(Arc::clone(self));
        Some(buf)
    }

    /// Keeps `buf` if there is room; returns it otherwise (to be freed).
    fn give_back(&self, buf: AlignedBuf) -> Option<AlignedBuf> {
        let mut idle = self.idle.lock();
        if idle.1 + buf.len > self.limit {
            // Make room by dropping the oldest idle buffers of other sizes.
            while idle.1 + buf.len > self.limit && !idle.0.is_empty() {
                let old = idle.0.remove(0);
                idle.1 -= old.len;
                drop(old);
            }
            if idle.1 + buf.len > self.limit {
                return Some(buf);
            }
        }
        idle.1 += buf.len;
        idle.0.push(buf);
        None
    }
}

/// One preallocated slot file opened for direct I/O.
#[derive(Debug)]
pub struct SlotFile {
    pub path: PathBuf,
    pub size: u64,
    /// True when this open created (or sized) the file.
    pub created: bool,
    file: File,
}

impl SlotFile {
    /// Opens `path` for direct I/O, creating and preallocating it to `size`
    /// bytes if it does not exist or is empty. An existing file of another
    /// size is refused (the layout would not match the index).
    pub fn open(path: &Path, size: u64, dsync: bool) -> Result<Self, DiskError> {
        let io_err = |op: &'static str| {
            move |source: io::Error| DiskError::Io {
                path: path.to_path_buf(),
                op,
                source,
            }
        };
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(io_err("create directory"))?;
        }
        let mut flags = libc::O_DIRECT | libc::O_CLOEXEC;
        if dsync {
            flags |= libc::O_DSYNC;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(flags)
            .open(path)
            .map_err(|source| {
                if source.raw_os_error() == Some(libc::EINVAL) {
                    DiskError::DirectIoUnsupported {
                        path: path.to_path_buf(),
                    }
                } else {
                    DiskError::Io {
                        path: path.to_path_buf(),
                        op: "open",
                        source,
                    }
                }
            })?;
        let len = file.metadata().map_err(io_err("stat"))?.len();
        let created = len == 0;
        if created {
            preallocate(&file, size).map_err(io_err("fallocate"))?;
        } else if len != size {
            return Err(DiskError::LayoutMismatch {
                stored: format!("{} is {len} bytes", path.display()),
                configured: format!("{size} bytes"),
            });
        }
        Ok(SlotFile {
            path: path.to_path_buf(),
            size,
            created,
            file,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Reserves `size` bytes with `fallocate` (mode 0: allocate and extend).
/// Filesystems without `fallocate` get a sparse file of that size and a
/// warning: the size limit still holds, but a full drive may answer ENOSPC
/// later (which the tier turns into a failed put).
fn preallocate(file: &File, size: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: plain syscall on an open descriptor.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
        tracing::warn!("fallocate is not supported here; the slot file is sparse");
        return file.set_len(size);
    }
    Err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_reuses_and_aligns() {
        let pool = BufPool::new(1 << 20);
        let mut a = pool.get(5000).unwrap();
        assert_eq!(a.len(), 8192);
        assert_eq!(a.as_ptr() as usize % ALIGN, 0);
        a.as_mut_slice()[0] = 7;
        let p = a.as_ptr();
        drop(a);
        let b = pool.get(8192).unwrap();
        assert_eq!(b.as_ptr(), p);
        drop(b);
        // Over the limit: freed instead of kept.
        let big = pool.get(2 << 20).unwrap();
        drop(big);
        assert!(pool.idle.lock().1 <= 1 << 20);
    }

    #[test]
    fn arena_first_fit_and_heap_overflow() {
        let pool = BufPool::with_arena(1 << 20, 64 * ALIGN);
        let (base, len) = pool.region().unwrap();
        assert_eq!(len, 64 * ALIGN);
        let inside = |b: &AlignedBuf| {
            let p = b.as_ptr() as usize;
            p >= base as usize && p + b.len() <= base as usize + len
        };
        let a = pool.get(3 * ALIGN).unwrap();
        let b = pool.get(ALIGN + 1).unwrap();
        assert_eq!(a.as_ptr(), base as *const u8);
        assert_eq!(b.as_ptr() as usize, base as usize + 3 * ALIGN);
        assert_eq!(b.len(), 2 * ALIGN);
        // 59 pages left: a 60-page buffer comes from the heap.
        let c = pool.get(60 * ALIGN).unwrap();
        assert!(!inside(&c));
        assert_eq!(c.as_ptr() as usize % ALIGN, 0);
        let d = pool.get(59 * ALIGN).unwrap();
        assert!(inside(&d));
        drop(a);
        // The freed 3 pages are reused; 4 pages do not fit anywhere.
        let e = pool.get(3 * ALIGN).unwrap();
        assert_eq!(e.as_ptr(), base as *const u8);
        assert!(!inside(&pool.get(4 * ALIGN).unwrap()));
        drop((b, d, e));
        // Everything free again: one buffer can take the whole region,
        // across bitmap words.
        let mut f = pool.get(64 * ALIGN).unwrap();
        assert!(inside(&f));
        f.as_mut_slice().fill(9);
        drop(f);
        let g = pool.get(70 * ALIGN).unwrap();
        assert!(!inside(&g));
        drop(c);
        assert!(pool.idle.lock().1 <= 1 << 20);
    }
}
