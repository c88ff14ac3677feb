//! The GPU engine's paged KV cache: a pool of pages in one plain `cuMemAlloc`
//! allocation (so it can be exported with `cuIpcGetMemHandle` and registered
//! with the daemon as a CUDA-IPC KV region), and sequences that own pages of it.
//!
//! A page is exactly one kvstrata block, in the CPU engine's layout
//! (`[layer][K|V][token][kv_head][head_dim]`, f16; `crate::kv::KvGeometry`), so a
//! full page's bytes are a block payload and a loaded block is one copy into a
//! page. A [`GpuSequence`] lists its pages in position order; the kernels find
//! position `p` in page `pages[p / block_tokens]`.

use std::sync::{Arc, Mutex};

use kvstrata_types::{PageLayout, PagedGeometry};

use super::device::{CudaDevice, DevMem};
use super::error::CudaError;
use crate::kv::KvGeometry;

/// The free pages of a pool: handed out lowest id first, all or nothing.
#[derive(Debug, Clone)]
pub struct PageAllocator {
    /// Free ids, highest first (the next one handed out is at the end).
    free: Vec<u32>,
    pages: usize,
}

impl PageAllocator {
    /// `pages` free pages, ids `0..pages`.
    pub fn new(pages: u32) -> Self {
        PageAllocator {
            free: (0..pages).rev().collect(),
            pages: pages as usize,
        }
    }

    /// Pages not handed out.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// `n` pages in ascending order, or none if fewer are free.
    pub fn take(&mut self, n: usize) -> Result<Vec<u32>, CudaError> {
        if self.free.len() < n {
            return Err(CudaError::PoolFull {
                needed: n,
                free: self.free.len(),
            });
        }
        let at = self.free.len() - n;
        let mut taken = self.free.split_off(at);
        taken.reverse();
        Ok(taken)
    }

    /// Returns pages; ids out of range or already free are ignored (a page is
    /// never handed out twice).
    pub fn give_back(&mut self, pages: impl IntoIterator<Item = u32>) {
        for p in pages {
            if (p as usize) < self.pages && !self.free.contains(&p) {
                self.free.push(p);
            }
        }
        // Lowest id out first again.
        self.free.sort_unstable_by(|a, b| b.cmp(a));
    }
}

/// The KV-region geometry of a pool of `pages` pages of `g`: cross-layer
/// pages of `block_tokens` tokens, f16 (`[page][layer][K|V][token][kv_head][head_dim]`,
/// the CPU engine's page layout), so a page is one layer-major block.
pub fn region_geometry(g: &KvGeometry, pages: usize) -> PagedGeometry {
    PagedGeometry::packed(
        PageLayout::CrossLayer,
        g.num_layers as u32,
        g.block_tokens as u32,
        g.num_kv_heads as u32,
        g.head_dim as u32,
        2,
        pages.min(u32::MAX as usize) as u32,
    )
}

/// A pool of KV pages on one device.
pub struct GpuKvPool {
    dev: Arc<CudaDevice>,
    mem: DevMem,
    geometry: KvGeometry,
    pages: usize,
    free: Mutex<PageAllocator>,
}

impl std::fmt::Debug for GpuKvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuKvPool")
            .field("geometry", &self.geometry)
            .field("pages", &self.pages)
            .field("free", &self.free_pages())
            .finish()
    }
}

impl GpuKvPool {
    /// A pool of `pages` pages of `geometry` (contents undefined until written).
    pub fn new(
        dev: Arc<CudaDevice>,
        geometry: KvGeometry,
        pages: usize,
    ) -> Result<Arc<Self>, CudaError> {
        if pages == 0 || pages > u32::MAX as usize || geometry.block_bytes() == 0 {
            return Err(CudaError::Unsupported(format!(
                "a KV pool of {pages} pages of {} bytes",
                geometry.block_bytes()
            )));
        }
        let mem = dev.alloc(pages * geometry.block_bytes())?;
        Ok(Arc::new(GpuKvPool {
            dev,
            mem,
            geometry,
            pages,
            free: Mutex::new(PageAllocator::new(pages as u32)),
        }))
    }

    /// The page geometry.
    pub fn geometry(&self) -> &KvGeometry {
        &self.geometry
    }

    /// The pool's device memory (one `cuMemAlloc` allocation).
    pub fn memory(&self) -> &DevMem {
        &self.mem
    }

    /// The device the pool lives on.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// The pool as the daemon sees a KV region: cross-layer pages of
    /// `block_tokens` tokens, f16, so one page is exactly one layer-major
    /// kvstrata block (one page per block).
    pub fn paged_geometry(&self) -> PagedGeometry {
        region_geometry(&self.geometry, self.pages)
    }

    /// The CUDA IPC handle of the pool's memory (for a KV region).
    pub fn ipc_handle(&self) -> Result<[u8; 64], CudaError> {
        self.dev.ipc_handle(&self.mem)
    }

    /// Pages in the pool.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Pages not owned by any sequence.
    pub fn free_pages(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).free()
    }

    /// The device address of page `id`.
    pub fn page_ptr(&self, id: u32) -> u64 {
        self.mem.ptr() + id as u64 * self.geometry.block_bytes() as u64
    }

    /// f16 values per page.
    pub fn page_elems(&self) -> usize {
        self.geometry.page_elems()
    }

    /// A new, empty sequence over this pool.
    pub fn sequence(self: &Arc<Self>) -> Result<GpuSequence, CudaError> {
        let table = self.dev.alloc(self.pages * 4)?;
        Ok(GpuSequence {
            pool: Arc::clone(self),
            pages: Vec::new(),
            len: 0,
            table,
        })
    }

    fn take(&self, n: usize) -> Result<Vec<u32>, CudaError> {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).take(n)
    }

    fn give_back(&self, pages: impl IntoIterator<Item = u32>) {
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .give_back(pages);
    }
}

/// The KV of one sequence: pages of a [`GpuKvPool`] in position order.
pub struct GpuSequence {
    pool: Arc<GpuKvPool>,
    pages: Vec<u32>,
    len: usize,
    /// The page table on the device (`u32` page ids), uploaded before each pass.
    table: DevMem,
}

impl std::fmt::Debug for GpuSequence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuSequence")
            .field("len", &self.len)
            .field("pages", &self.pages)
            .finish()
    }
}

impl GpuSequence {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pool this sequence takes its pages from.
    pub fn pool(&self) -> &Arc<GpuKvPool> {
        &self.pool
    }

    /// Page ids in position order (the last one may be partly filled).
    pub fn page_ids(&self) -> &[u32] {
        &self.pages
    }

    /// Full pages (each one a storable block).
    pub fn full_pages(&self) -> usize {
        self.len / self.pool.geometry.block_tokens
    }

    /// The bytes of full page `index` (one block payload), copied to the host.
    pub fn page_bytes(&self, index: usize) -> Result<Vec<u8>, CudaError> {
        if index >= self.full_pages() {
            return Err(CudaError::InvalidRequest(format!(
                "page {index} is not full ({} full pages)",
                self.full_pages()
            )));
        }
        let mut out = vec![0u8; self.pool.geometry.block_bytes()];
        self.pool
            .dev
            .download(&mut out, self.pool.page_ptr(self.pages[index]))?;
        Ok(out)
    }

    /// Appends one block (copied from the host) as the next page. Only on a page
    /// boundary.
    pub fn push_block(&mut self, payload: &[u8]) -> Result<(), CudaError> {
        let g = self.pool.geometry;
        if !self.len.is_multiple_of(g.block_tokens) || self.pages.len() != self.full_pages() {
            return Err(CudaError::InvalidRequest(format!(
                "a block can only be appended on a page boundary (holding {} positions)",
                self.len
            )));
        }
        if payload.len() != g.block_bytes() {
            return Err(CudaError::InvalidRequest(format!(
                "block is {} bytes, a page is {}",
                payload.len(),
                g.block_bytes()
            )));
        }
        let page = self.pool.take(1)?[0];
        if let Err(e) = self.pool.dev.upload(self.pool.page_ptr(page), payload) {
            self.pool.give_back([page]);
            return Err(e);
        }
        self.pages.push(page);
        self.len += g.block_tokens;
        Ok(())
    }

    /// Shares full page `index` of `other` (same pool) as this sequence's next
    /// page, by copying it on the device. Only on a page boundary.
    pub fn copy_page_from(&mut self, other: &GpuSequence, index: usize) -> Result<(), CudaError> {
        if !Arc::ptr_eq(&self.pool, &other.pool) || index >= other.full_pages() {
            return Err(CudaError::InvalidRequest(format!(
                "page {index} of another pool or not full"
            )));
        }
        let g = self.pool.geometry;
        if !self.len.is_multiple_of(g.block_tokens) || self.pages.len() != self.full_pages() {
            return Err(CudaError::InvalidRequest(
                "a page can only be appended on a page boundary".into(),
            ));
        }
        let page = self.pool.take(1)?[0];
        let r = self.pool.dev.copy(
            self.pool.page_ptr(page),
            self.pool.page_ptr(other.pages[index]),
            g.block_bytes(),
        );
        if let Err(e) = r {
            self.pool.give_back([page]);
            return Err(e);
        }
        self.pages.push(page);
        self.len += g.block_tokens;
        Ok(())
    }

    /// Takes `blocks` fresh pages for blocks that will be written into this
    /// sequence from outside (a load by page ids: the daemon scatters into
    /// them) and returns their ids, in position order. The positions count
    /// only after [`GpuSequence::keep_loaded`]. Only on a page boundary.
    pub fn reserve_blocks(&mut self, blocks: usize) -> Result<Vec<u32>, CudaError> {
        let bt = self.pool.geometry.block_tokens;
        if !self.len.is_multiple_of(bt) || self.pages.len() != self.full_pages() {
            return Err(CudaError::InvalidRequest(format!(
                "blocks can only be loaded on a page boundary (holding {} positions in {} pages)",
                self.len,
                self.pages.len()
            )));
        }
        let taken = self.pool.take(blocks)?;
        self.pages.extend_from_slice(&taken);
        Ok(taken)
    }

    /// After [`GpuSequence::reserve_blocks`]: the first `blocks` reserved
    /// pages now hold blocks (their positions count); the other reserved pages
    /// go back to the pool.
    pub fn keep_loaded(&mut self, blocks: usize) {
        let bt = self.pool.geometry.block_tokens;
        let reserved = self.pages.len().saturating_sub(self.full_pages());
        self.len += blocks.min(reserved) * bt;
        let keep = self.len.div_ceil(bt);
        let dropped = self.pages.split_off(keep.min(self.pages.len()));
        self.pool.give_back(dropped);
    }

    /// Drops every position from `len` on, returning whole pages to the pool.
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            self.len = len;
            let keep = len.div_ceil(self.pool.geometry.block_tokens);
            let dropped = self.pages.split_off(keep);
            self.pool.give_back(dropped);
        }
    }

    /// Makes room for `n` more positions and uploads the page table.
    pub(crate) fn reserve(&mut self, n: usize) -> Result<(), CudaError> {
        let need = (self.len + n).div_ceil(self.pool.geometry.block_tokens);
        if need > self.pages.len() {
            let more = self.pool.take(need - self.pages.len())?;
            self.pages.extend(more);
        }
        self.pool.dev.upload(self.table.ptr(), &self.pages)
    }

    /// Marks `n` more positions complete.
    pub(crate) fn commit(&mut self, n: usize) {
        self.len += n;
    }

    /// The device address of the page table.
    pub(crate) fn table_ptr(&self) -> u64 {
        self.table.ptr()
    }
}

impl Drop for GpuSequence {
    fn drop(&mut self) {
        self.pool.give_back(self.pages.drain(..));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_handed_out_lowest_first_all_or_nothing() {
        let mut a = PageAllocator::new(6);
        assert_eq!(a.take(2).unwrap(), vec![0, 1]);
        assert_eq!(a.take(3).unwrap(), vec![2, 3, 4]);
        assert!(matches!(
            a.take(2),
            Err(CudaError::PoolFull { needed: 2, free: 1 })
        ));
        assert_eq!(a.free(), 1, "a refused take changes nothing");
        a.give_back([3, 1]);
        // Twice, or out of range: ignored.
        a.give_back([1, 9]);
        assert_eq!(a.free(), 3);
        assert_eq!(a.take(3).unwrap(), vec![1, 3, 5]);
        assert_eq!(a.take(0).unwrap(), Vec::<u32>::new());
        assert_eq!(a.free(), 0);
    }
}
