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
//! every block.
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

/// Recycles aligned buffers, keeping at most `limit` bytes of idle buffers.
#[derive(Debug)]
pub struct BufPool {
    idle: Mutex<(Vec<AlignedBuf>, usize)>,
    limit: usize,
}

impl BufPool {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(BufPool {
            idle: Mutex::new((Vec::new(), 0)),
            limit,
        })
    }

    /// A buffer of at least `len` bytes (exactly `align_up(len)`), reused when
    /// one of that size is idle. Its contents are unspecified (but initialised).
    pub fn get(self: &Arc<Self>, len: usize) -> Option<AlignedBuf> {
        let len = align_up(len);
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
}
