//! [`ArenaMemory`]: the one fixed block of memory an arena's offsets point into.

use std::io;

use kvstrata_kernels::PinnedBuffer;
use memmap2::MmapMut;

/// A fixed-size, page-aligned memory region shared by the threads of a tier.
///
/// Either anonymous memory (committed lazily by the OS as slots are first
/// written) or a [`PinnedBuffer`] from [`kvstrata_kernels::Gpu::alloc_pinned`]
/// (page-locked and mapped on CUDA, so copies to and from the GPU run at
/// PCIe speed and its bytes have a device address).
pub struct ArenaMemory {
    ptr: *mut u8,
    len: usize,
    /// Device address of the first byte, when a device can reach the region.
    device_base: Option<u64>,
    backing: Backing,
}

enum Backing {
    Anonymous { _map: MmapMut },
    Pinned(PinnedBuffer),
}

// SAFETY: the region is plain memory; which thread may touch which bytes is
// decided by the slot protocol of the owning tier (a slot is written only by
// the writer that reserved it, before it is published, and is reused only
// after its last reader is gone).
unsafe impl Send for ArenaMemory {}
unsafe impl Sync for ArenaMemory {}

impl ArenaMemory {
    /// Maps `len` bytes of anonymous memory.
    pub fn anonymous(len: usize) -> io::Result<Self> {
        let mut map = MmapMut::map_anon(len.max(1))?;
        let ptr = map.as_mut_ptr();
        Ok(ArenaMemory {
            ptr,
            len,
            device_base: None,
            backing: Backing::Anonymous { _map: map },
        })
    }

    /// A region over host memory a device reaches (the region owns it and
    /// frees it on drop). Only the first `len` bytes of the buffer are used.
    pub fn pinned(buffer: PinnedBuffer, len: usize) -> Self {
        let len = len.min(buffer.len());
        ArenaMemory {
            ptr: buffer.host_ptr(),
            len,
            device_base: Some(buffer.device_ptr()),
            backing: Backing::Pinned(buffer),
        }
    }

    /// Whether the memory is page-locked (a pinned buffer of a CUDA device).
    pub fn is_page_locked(&self) -> bool {
        match &self.backing {
            Backing::Pinned(b) => b.is_page_locked(),
            Backing::Anonymous { .. } => false,
        }
    }

    /// Device address of byte `offset`, when the region comes from a device
    /// ([`ArenaMemory::pinned`]).
    pub fn device_addr(&self, offset: usize) -> Option<u64> {
        debug_assert!(offset <= self.len);
        self.device_base.map(|b| b + offset as u64)
    }

    /// Offset of `data` in the region, if it lies entirely inside.
    pub fn offset_of(&self, data: &[u8]) -> Option<usize> {
        let start = (data.as_ptr() as usize).checked_sub(self.ptr as usize)?;
        (start.checked_add(data.len())? <= self.len).then_some(start)
    }

    /// Host address of byte `offset`.
    pub fn host_addr(&self, offset: usize) -> u64 {
        debug_assert!(offset <= self.len);
        self.ptr as u64 + offset as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// # Safety
    /// `offset + len` must be within the region, and no one may write these
    /// bytes while the returned slice lives.
    pub unsafe fn slice(&self, offset: usize, len: usize) -> &[u8] {
        debug_assert!(offset + len <= self.len);
        // SAFETY: bounds and exclusivity are the caller's contract.
        unsafe { std::slice::from_raw_parts(self.ptr.add(offset), len) }
    }

    /// # Safety
    /// `offset + len` must be within the region, and the caller must be the
    /// only one touching these bytes while the returned slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, offset: usize, len: usize) -> &mut [u8] {
        debug_assert!(offset + len <= self.len);
        // SAFETY: bounds and exclusivity are the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset), len) }
    }
}
