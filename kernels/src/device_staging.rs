//! Device staging: a few device buffers per device, allocated once and lent
//! in sets ([`crate::Gpu::device_staging`]), for moves between page-locked
//! host memory and an engine's pages that pass through device memory.
//!
//! Kernels that read page-locked host memory over PCIe reach only about 0.6
//! of the pinned-copy ceiling, the DMA engines about 1.0. So a move from the
//! host tier into an engine's pages copies the blocks with DMA into a device
//! buffer and scatters them from there (device to device), and a move out
//! gathers into a device buffer, hashes it there and copies it out with DMA.
//! A set holds [`DEVICE_STAGING_BUFFERS`] buffers, so one group's DMA
//! overlaps the other's kernel, and two streams of its own (one for the DMA
//! copies, one for hashing) that go back to the pool with it. A device keeps
//! at most [`DEVICE_STAGING_SETS`] sets, made when first needed and kept
//! until the [`crate::Gpu`] is dropped. When every set is lent, a request
//! waits for one to come back ([`Gpu::device_staging_within`], up to
//! [`DEVICE_STAGING_WAIT`] in the cache): the requests share the PCIe link
//! either way, and the path without staging (kernels reading host memory)
//! would move its blocks at about 0.6 of the link while slowing the others.
//! Only after the wait does it take that path (counted:
//! [`Gpu::device_staging_counts`]).

use std::mem::ManuallyDrop;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::cuda::CudaStreamState;
use crate::device::{DeviceBuffer, Gpu, GpuStream};
use crate::error::GpuError;

/// Sets of staging buffers a device keeps (requests moving at once through
/// device staging; more take their slower path).
pub const DEVICE_STAGING_SETS: usize = 2;

/// Buffers per set: while the DMA engines fill (or drain) one, a kernel
/// works on the other.
pub const DEVICE_STAGING_BUFFERS: usize = 2;

/// How long the cache's moves wait for a set when every set is lent, before
/// they move their blocks without one (about one 16 GiB move of the PCIe
/// link: a set comes back when the request holding it ends).
pub const DEVICE_STAGING_WAIT: Duration = Duration::from_millis(500);

/// A device's staging sets and the requests' waits for them.
#[derive(Default)]
pub(crate) struct StagingSets {
    pool: Mutex<DeviceStagingPool>,
    /// Signalled when a set goes back to the pool (or may be made).
    returned: Condvar,
    waits: AtomicU64,
    bypasses: AtomicU64,
}

/// How often requests found every staging set of a device lent
/// ([`Gpu::device_staging_counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceStagingCounts {
    /// Requests that waited for a set to come back.
    pub waits: u64,
    /// Requests that moved without a set: every set still lent after the
    /// wait, or no device memory for one.
    pub bypasses: u64,
}

/// The sets of one device that are not lent.
#[derive(Default)]
pub(crate) struct DeviceStagingPool {
    /// Bytes per buffer of the sets made from now on (0: not set yet; the
    /// first request's size is taken).
    buffer_bytes: usize,
    free: Vec<SetParts>,
    /// Sets that exist (free or lent).
    made: usize,
    /// Whether an allocation failed: no more are tried (until
    /// [`Gpu::set_device_staging_bytes`]).
    failed: bool,
}

impl std::fmt::Debug for DeviceStagingPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceStagingPool")
            .field("buffer_bytes", &self.buffer_bytes)
            .field("free", &self.free.len())
            .field("made", &self.made)
            .finish()
    }
}

/// What a set is made of, without the [`Gpu`] its streams point back to (a
/// pool kept inside a `Gpu` must not hold one).
struct SetParts {
    buffers: Vec<DeviceBuffer>,
    buffer_bytes: usize,
    copy: Option<CudaStreamState>,
    hash: Option<CudaStreamState>,
}

impl DeviceStagingPool {
    /// Bytes of device memory the sets hold (free and lent).
    pub(crate) fn allocated_bytes(&self) -> usize {
        self.made * DEVICE_STAGING_BUFFERS * self.buffer_bytes
    }
}

/// A set of device staging buffers and its two streams, lent to one request
/// by [`Gpu::device_staging`]; back to the device's pool on drop. The
/// streams are synchronised on drop, but work the borrower queued on other
/// streams that touches the buffers must have completed before (wait for
/// its fence), as for any buffer.
pub struct DeviceStaging {
    buffers: Vec<DeviceBuffer>,
    buffer_bytes: usize,
    /// Taken back (into the pool) only by drop.
    copy: ManuallyDrop<GpuStream>,
    hash: ManuallyDrop<GpuStream>,
    sets: Arc<StagingSets>,
}

impl std::fmt::Debug for DeviceStaging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceStaging")
            .field("buffers", &self.buffers.len())
            .field("buffer_bytes", &self.buffer_bytes)
            .finish()
    }
}

impl DeviceStaging {
    /// The buffers, [`DeviceStaging::buffer_bytes`] each.
    pub fn buffers(&self) -> &[DeviceBuffer] {
        &self.buffers
    }

    pub fn buffer_bytes(&self) -> usize {
        self.buffer_bytes
    }

    /// The set's stream for DMA copies into and out of its buffers.
    pub fn copy_stream(&self) -> &GpuStream {
        &self.copy
    }

    /// The set's stream for hashing its buffers.
    pub fn hash_stream(&self) -> &GpuStream {
        &self.hash
    }
}

impl Drop for DeviceStaging {
    fn drop(&mut self) {
        // SAFETY: the streams are never used again after this.
        let (copy, hash) = unsafe {
            (
                ManuallyDrop::take(&mut self.copy),
                ManuallyDrop::take(&mut self.hash),
            )
        };
        // Nothing queued on the set's own streams may outlive the loan.
        let _ = copy.synchronize();
        let _ = hash.synchronize();
        let parts = SetParts {
            buffers: std::mem::take(&mut self.buffers),
            buffer_bytes: self.buffer_bytes,
            copy: copy.into_state(),
            hash: hash.into_state(),
        };
        let mut pool = self.sets.pool.lock();
        if parts.buffer_bytes == pool.buffer_bytes {
            pool.free.push(parts);
            drop(pool);
            self.sets.returned.notify_one();
            return;
        }
        // Resized meanwhile: freed (outside the lock); a waiter may make one.
        pool.made -= 1;
        drop(pool);
        self.sets.returned.notify_one();
        drop(parts);
    }
}

impl Gpu {
    /// A set of device staging buffers for one request (see
    /// [`crate::device_staging`]): a free one, or a new one of
    /// `buffer_bytes` per buffer (the size set by
    /// [`Gpu::set_device_staging_bytes`] wins; a set keeps the size it was
    /// made with) while the device has fewer than [`DEVICE_STAGING_SETS`].
    /// `Ok(None)`: every set is lent. An error: the memory could not be had;
    /// the device then stops trying (later calls answer `Ok(None)`) until
    /// [`Gpu::set_device_staging_bytes`]. Either way the caller takes its
    /// path without device staging.
    pub fn device_staging(&self, buffer_bytes: usize) -> Result<Option<DeviceStaging>, GpuError> {
        self.device_staging_within(buffer_bytes, Duration::ZERO)
    }

    /// As [`Gpu::device_staging`], but when every set is lent, waits up to
    /// `wait` for one to come back (counted as a wait); `Ok(None)` after
    /// that, or at once when the device could not make one, is counted as a
    /// bypass (the caller moves without staging).
    pub fn device_staging_within(
        &self,
        buffer_bytes: usize,
        wait: Duration,
    ) -> Result<Option<DeviceStaging>, GpuError> {
        let sets = Arc::clone(self.device_staging_sets());
        let deadline = Instant::now() + wait;
        // Whether the wait has begun, and whether it has run out.
        let (mut waiting, mut out_of_time) = (false, false);
        let bytes = {
            let mut p = sets.pool.lock();
            loop {
                if let Some(parts) = p.free.pop() {
                    drop(p);
                    return Ok(Some(self.lend(parts, sets)));
                }
                if p.failed || (out_of_time && p.made >= DEVICE_STAGING_SETS) {
                    sets.bypasses.fetch_add(1, Ordering::Relaxed);
                    return Ok(None);
                }
                if p.made < DEVICE_STAGING_SETS {
                    break;
                }
                if !waiting && !wait.is_zero() {
                    sets.waits.fetch_add(1, Ordering::Relaxed);
                }
                waiting = true;
                // Then one more look at the pool, also when time ran out.
                out_of_time = Instant::now() >= deadline
                    || sets.returned.wait_until(&mut p, deadline).timed_out();
            }
            if p.buffer_bytes == 0 {
                p.buffer_bytes = buffer_bytes.max(1);
            }
            p.made += 1;
            p.buffer_bytes
        };
        match self.make_set(bytes) {
            Ok(parts) => Ok(Some(self.lend(parts, sets))),
            Err(e) => {
                let mut p = sets.pool.lock();
                p.made -= 1;
                p.failed = true;
                drop(p);
                sets.bypasses.fetch_add(1, Ordering::Relaxed);
                // Waiters stop waiting for sets that will not be made.
                sets.returned.notify_all();
                Err(e)
            }
        }
    }

    /// How often requests found every staging set of this device lent.
    pub fn device_staging_counts(&self) -> DeviceStagingCounts {
        let sets = self.device_staging_sets();
        DeviceStagingCounts {
            waits: sets.waits.load(Ordering::Relaxed),
            bypasses: sets.bypasses.load(Ordering::Relaxed),
        }
    }

    /// Sets the bytes per buffer of the sets made from now on; free sets of
    /// another size are freed now, lent ones when they come back. (The
    /// first [`Gpu::device_staging`] request sets it otherwise.)
    pub fn set_device_staging_bytes(&self, buffer_bytes: usize) {
        let mut p = self.device_staging_sets().pool.lock();
        p.buffer_bytes = buffer_bytes.max(1);
        p.failed = false;
        let keep = p.buffer_bytes;
        let (kept, gone): (Vec<SetParts>, Vec<SetParts>) = std::mem::take(&mut p.free)
            .into_iter()
            .partition(|s| s.buffer_bytes == keep);
        p.free = kept;
        p.made -= gone.len();
        drop(p);
        if !gone.is_empty() {
            self.device_staging_sets().returned.notify_all();
        }
        drop(gone);
    }

    /// Bytes of device memory held by this device's staging sets.
    pub fn device_staging_bytes(&self) -> usize {
        self.device_staging_sets().pool.lock().allocated_bytes()
    }

    fn make_set(&self, buffer_bytes: usize) -> Result<SetParts, GpuError> {
        let buffers = (0..DEVICE_STAGING_BUFFERS)
            .map(|_| self.alloc_device(buffer_bytes))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SetParts {
            buffers,
            buffer_bytes,
            copy: self.stream()?.into_state(),
            hash: self.stream()?.into_state(),
        })
    }

    fn lend(&self, parts: SetParts, sets: Arc<StagingSets>) -> DeviceStaging {
        DeviceStaging {
            buffers: parts.buffers,
            buffer_bytes: parts.buffer_bytes,
            copy: ManuallyDrop::new(GpuStream::from_state(self.clone(), parts.copy)),
            hash: ManuallyDrop::new(GpuStream::from_state(self.clone(), parts.hash)),
            sets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_are_bounded_reused_and_resized() {
        let gpu = Gpu::cpu();
        let a = gpu.device_staging(4096).unwrap().expect("first set");
        let b = gpu.device_staging(8192).unwrap().expect("second set");
        // The size of the first request holds for every set.
        assert_eq!((a.buffer_bytes(), b.buffer_bytes()), (4096, 4096));
        assert_eq!(a.buffers().len(), DEVICE_STAGING_BUFFERS);
        assert!(a.buffers().iter().all(|x| x.len() == 4096));
        assert!(gpu.device_staging(4096).unwrap().is_none(), "all lent");
        assert_eq!(
            gpu.device_staging_bytes(),
            DEVICE_STAGING_SETS * DEVICE_STAGING_BUFFERS * 4096
        );
        let ptr = a.buffers()[0].ptr();
        drop(a);
        // Lent again, the same memory.
        let again = gpu.device_staging(4096).unwrap().expect("returned set");
        assert_eq!(again.buffers()[0].ptr(), ptr);
        // Streams of a lent set work (the CPU backend runs at once).
        again.copy_stream().record().unwrap().wait().unwrap();
        again.hash_stream().synchronize().unwrap();
        drop(again);
        // A new size: the free set goes now, the lent one when it returns.
        gpu.set_device_staging_bytes(1000);
        drop(b);
        assert_eq!(gpu.device_staging_bytes(), 0);
        let c = gpu.device_staging(4096).unwrap().expect("a new set");
        assert_eq!(c.buffer_bytes(), 1000);
    }

    #[test]
    fn clones_of_a_gpu_share_its_sets() {
        let gpu = Gpu::cpu();
        let other = gpu.clone();
        let held: Vec<_> = (0..DEVICE_STAGING_SETS)
            .map(|_| gpu.device_staging(64).unwrap().expect("a set"))
            .collect();
        assert!(other.device_staging(64).unwrap().is_none());
        drop(held);
        assert!(other.device_staging(64).unwrap().is_some());
        // Another device (here: another CPU backend) has its own.
        assert!(Gpu::cpu().device_staging(64).unwrap().is_some());
    }
}
