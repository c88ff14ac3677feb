//! Staging buffers: page-locked host memory lent to one request at a time
//! and reused, per device ([`crate::Gpu::staging`]).
//!
//! A request that moves blocks between a device and memory the device cannot
//! reach directly (bytes read from disk, a gRPC payload) stages them in
//! pinned memory. Allocating it per request is slow (`cuMemHostAlloc` locks
//! every page), and freeing it (`cuMemFreeHost`) waits for the whole device,
//! stalling every stream's copies. So returned buffers are kept, up to
//! [`STAGING_CACHE_BYTES`] per device, and lent again to the next request
//! that fits (the smallest that does).

use std::mem::ManuallyDrop;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::device::PinnedBuffer;

/// Bytes of returned staging buffers a device keeps for reuse; a buffer
/// that would take the cache above it is freed instead.
pub const STAGING_CACHE_BYTES: usize = 256 << 20;

/// Smallest staging allocation (smaller requests share its size class).
const MIN_STAGING_BYTES: usize = 64 << 10;

/// The returned buffers of one device.
#[derive(Debug, Default)]
pub(crate) struct StagingCache {
    free: Vec<PinnedBuffer>,
    cached_bytes: usize,
}

impl StagingCache {
    /// The smallest cached buffer of at least `len` bytes.
    pub(crate) fn take(&mut self, len: usize) -> Option<PinnedBuffer> {
        let (at, _) = self
            .free
            .iter()
            .enumerate()
            .filter(|(_, b)| b.len() >= len)
            .min_by_key(|(_, b)| b.len())?;
        let buf = self.free.swap_remove(at);
        self.cached_bytes -= buf.len();
        Some(buf)
    }

    /// Keeps `buf` if the cache has room; else hands it back (to be freed
    /// outside the lock).
    fn keep(&mut self, buf: PinnedBuffer) -> Option<PinnedBuffer> {
        if self.cached_bytes + buf.len() > STAGING_CACHE_BYTES {
            return Some(buf);
        }
        self.cached_bytes += buf.len();
        self.free.push(buf);
        None
    }

    pub(crate) fn cached_bytes(&self) -> usize {
        self.cached_bytes
    }
}

/// Size of a new staging allocation for a request of `len` bytes: the next
/// power of two (at least 64 KiB), so buffers of nearby sizes are reused.
pub(crate) fn allocation_for(len: usize) -> usize {
    len.max(MIN_STAGING_BYTES).next_power_of_two()
}

/// Pinned memory lent by [`crate::Gpu::staging`] for one request: `len`
/// bytes (the buffer behind may be larger), back to the device's cache on
/// drop. Drop it only after every device operation that touches it has
/// completed (wait for their fence), as for a [`PinnedBuffer`].
pub struct StagingBuffer {
    /// Taken back (into the cache) only by drop.
    pub(crate) buf: ManuallyDrop<PinnedBuffer>,
    pub(crate) len: usize,
    pub(crate) cache: Arc<Mutex<StagingCache>>,
}

impl std::fmt::Debug for StagingBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagingBuffer")
            .field("len", &self.len)
            .finish()
    }
}

impl StagingBuffer {
    /// Device address of the first byte.
    pub fn device_ptr(&self) -> u64 {
        self.buf.device_ptr()
    }

    /// Host address of the first byte.
    pub fn host_ptr(&self) -> *mut u8 {
        self.buf.host_ptr()
    }

    /// The bytes asked for.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the memory is page-locked (CUDA backend).
    pub fn is_page_locked(&self) -> bool {
        self.buf.is_page_locked()
    }

    /// The `len` bytes. No device operation may write them meanwhile.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf.as_slice()[..self.len]
    }

    /// The `len` bytes, for writing. No device operation may touch them
    /// meanwhile.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.buf.as_mut_slice()[..len]
    }
}

impl Drop for StagingBuffer {
    fn drop(&mut self) {
        // SAFETY: `buf` is never used again after this.
        let buf = unsafe { ManuallyDrop::take(&mut self.buf) };
        let refused = self.cache.lock().keep(buf);
        // Freed outside the lock (`cuMemFreeHost` can take a while).
        drop(refused);
    }
}

#[cfg(test)]
mod tests {
    use crate::Gpu;

    #[test]
    fn buffers_are_reused_smallest_fit_first_and_the_cache_is_bounded() {
        let gpu = Gpu::cpu();
        let a = gpu.staging(100_000).unwrap();
        let b = gpu.staging(1 << 20).unwrap();
        assert_eq!((a.len(), a.as_slice().len()), (100_000, 100_000));
        let (pa, pb) = (a.device_ptr(), b.device_ptr());
        assert_ne!(pa, pb);
        drop(a);
        drop(b);
        assert_eq!(gpu.staging_cached_bytes(), (128 << 10) + (1 << 20));
        // A small request takes the small buffer, a larger one the large.
        let small = gpu.staging(70_000).unwrap();
        assert_eq!(small.device_ptr(), pa);
        let large = gpu.staging(200_000).unwrap();
        assert_eq!(large.device_ptr(), pb);
        assert_eq!(gpu.staging_cached_bytes(), 0);
        // Writes through one loan are the bytes read through it.
        let mut w = small;
        w.as_mut_slice().fill(7);
        assert!(w.as_slice().iter().all(|&x| x == 7));
        drop(w);
        drop(large);
        // Nothing beyond the cache limit is kept.
        let huge = gpu.staging(super::STAGING_CACHE_BYTES).unwrap();
        drop(huge);
        assert!(gpu.staging_cached_bytes() <= super::STAGING_CACHE_BYTES);
        assert_eq!(gpu.staging_cached_bytes(), (128 << 10) + (1 << 20));
    }

    #[test]
    fn loans_from_many_threads_never_share_a_buffer() {
        let gpu = Gpu::cpu();
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let gpu = gpu.clone();
                s.spawn(move || {
                    for i in 0..200usize {
                        let mut b = gpu.staging(4096 + (i % 7) * 10_000).unwrap();
                        b.as_mut_slice().fill(t);
                        std::thread::yield_now();
                        assert!(b.as_slice().iter().all(|&x| x == t), "buffer shared");
                    }
                });
            }
        });
    }
}
