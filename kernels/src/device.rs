//! `Gpu`: one device kvstrata copies with, behind one API with two backends.
//!
//! - **CUDA** ([`Gpu::cuda`]): the driver API through `cudarc` (loaded at run
//!   time, so nothing CUDA is needed to build or to run without a GPU); device
//!   memory from plain `cuMemAlloc` (CUDA IPC works on it), page-locked host
//!   memory from `cuMemHostAlloc` (portable, mapped, not write-combined), the
//!   kernels of `kernels/cuda/` compiled with NVRTC for the device at start-up.
//! - **CPU** ([`Gpu::cpu`]): "device" memory is ordinary host memory and every
//!   operation runs its CPU reference at once. Everything built on a `Gpu`
//!   (the HBM tier, the paged gather/scatter data path) runs the same logic on
//!   it, so CI tests that logic on machines without a GPU.
//!
//! Device addresses are `u64`s (with unified addressing, device memory and
//! mapped pinned memory share one address space). Operations are queued on a
//! [`GpuStream`] and complete in order; a [`Fence`] recorded after them says
//! when. The CPU backend completes every operation before returning.

use std::sync::Arc;

use crate::cuda::{CudaDevice, CudaStreamState};
use crate::error::GpuError;
use crate::layout::PagedGeometry;
use crate::reference::{self, CopyOp};
use crate::staging::StagingBuffer;
use crate::xxh3::HashRun;

/// Which backend a [`Gpu`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Cpu,
    Cuda,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
        }
    }
}

/// What the device is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub backend: Backend,
    pub ordinal: usize,
    pub name: String,
    /// (major, minor); (0, 0) on the CPU backend.
    pub compute_capability: (i32, i32),
    pub total_bytes: u64,
    pub multiprocessors: u32,
}

/// Default size from which [`GpuStream::copy_blocks`] moves a run with DMA
/// (one `cuMemcpyBatchAsync` for all such runs) instead of the batched
/// kernel. Measured on an H200 (docs/benchmarks.md, "GPU tiers"): the
/// kernel reaches 86-95 % of the pinned-copy ceiling from 16 KiB blocks up;
/// batched DMA 89-92 % at 256 KiB (even with the kernel), 96-98 % at 1 MiB
/// and 99 % from 4 MiB; scattered 720 KiB blocks promoted through the HBM tier
/// reached 93-94 % with DMA from 512 KiB against 86-88 % with the kernel.
pub const DEFAULT_DMA_THRESHOLD: u64 = 512 << 10;

#[derive(Clone)]
pub struct Gpu {
    inner: Arc<GpuInner>,
    /// Returned staging buffers ([`Gpu::staging`]).
    staging: Arc<parking_lot::Mutex<crate::staging::StagingCache>>,
    /// Device staging sets not lent ([`Gpu::device_staging`]).
    device_staging: Arc<crate::device_staging::StagingSets>,
}

enum GpuInner {
    Cpu(DeviceInfo),
    Cuda(CudaDevice),
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("info", self.info()).finish()
    }
}

impl Gpu {
    /// The CPU backend.
    pub fn cpu() -> Gpu {
        Gpu {
            staging: Arc::default(),
            device_staging: Arc::default(),
            inner: Arc::new(GpuInner::Cpu(DeviceInfo {
                backend: Backend::Cpu,
                ordinal: 0,
                name: "cpu".to_string(),
                compute_capability: (0, 0),
                total_bytes: 0,
                multiprocessors: 0,
            })),
        }
    }

    /// CUDA device `ordinal`, with the kernels compiled for it. Fails with
    /// [`GpuError::NoLibrary`] when the CUDA driver library is absent and
    /// [`GpuError::NoDevice`] when it has no such device: callers treat both
    /// as "no GPU" and run without one.
    pub fn cuda(ordinal: usize) -> Result<Gpu, GpuError> {
        Ok(Gpu {
            inner: Arc::new(GpuInner::Cuda(CudaDevice::open(ordinal)?)),
            staging: Arc::default(),
            device_staging: Arc::default(),
        })
    }

    pub fn info(&self) -> &DeviceInfo {
        match &*self.inner {
            GpuInner::Cpu(info) => info,
            GpuInner::Cuda(d) => d.info(),
        }
    }

    pub fn backend(&self) -> Backend {
        self.info().backend
    }

    fn cuda_device(&self) -> Option<&CudaDevice> {
        match &*self.inner {
            GpuInner::Cuda(d) => Some(d),
            GpuInner::Cpu(_) => None,
        }
    }

    /// `bytes` of device memory (uninitialised).
    pub fn alloc_device(&self, bytes: usize) -> Result<DeviceBuffer, GpuError> {
        match self.cuda_device() {
            Some(d) => d.alloc_device(bytes),
            None => DeviceBuffer::host_backed(bytes),
        }
    }

    /// `bytes` of host memory the device can reach: page-locked and mapped
    /// on CUDA, ordinary anonymous memory on the CPU backend.
    pub fn alloc_pinned(&self, bytes: usize) -> Result<PinnedBuffer, GpuError> {
        match self.cuda_device() {
            Some(d) => d.alloc_pinned(bytes),
            None => PinnedBuffer::anonymous(bytes),
        }
    }

    /// `len` bytes of pinned memory lent for one request from this device's
    /// staging cache (reused, not allocated, when a returned buffer fits;
    /// see [`crate::staging`]).
    pub fn staging(&self, len: usize) -> Result<StagingBuffer, GpuError> {
        let cached = self.staging.lock().take(len);
        let buf = match cached {
            Some(b) => b,
            None => self.alloc_pinned(crate::staging::allocation_for(len))?,
        };
        Ok(StagingBuffer {
            buf: std::mem::ManuallyDrop::new(buf),
            len,
            cache: Arc::clone(&self.staging),
        })
    }

    /// Bytes of returned staging buffers kept for reuse.
    pub fn staging_cached_bytes(&self) -> usize {
        self.staging.lock().cached_bytes()
    }

    pub(crate) fn device_staging_sets(&self) -> &Arc<crate::device_staging::StagingSets> {
        &self.device_staging
    }

    /// A new stream (operations on one stream run in order).
    pub fn stream(&self) -> Result<GpuStream, GpuError> {
        let state = match self.cuda_device() {
            Some(d) => Some(d.new_stream()?),
            None => None,
        };
        Ok(GpuStream {
            gpu: self.clone(),
            cuda: state,
        })
    }

    /// The CUDA IPC handle of a device buffer, for another process on this
    /// node ([`Gpu::open_ipc`]). CUDA only.
    pub fn ipc_handle(&self, buffer: &DeviceBuffer) -> Result<IpcHandle, GpuError> {
        match self.cuda_device() {
            Some(d) => d.ipc_handle(buffer),
            None => Err(GpuError::Unsupported {
                what: "CUDA IPC handles",
            }),
        }
    }

    /// Maps another process's device buffer; unmapped when the returned
    /// buffer is dropped. `bytes` is the size the exporter announced. CUDA
    /// only; a handle of this very process is refused by the driver.
    pub fn open_ipc(&self, handle: &IpcHandle, bytes: usize) -> Result<DeviceBuffer, GpuError> {
        match self.cuda_device() {
            Some(d) => d.open_ipc(handle, bytes),
            None => Err(GpuError::Unsupported {
                what: "CUDA IPC handles",
            }),
        }
    }

    /// A new CUDA event another process on this node can open by its
    /// handle ([`IpcEvent::handle`], [`Gpu::open_ipc_event`]) and wait on.
    /// CUDA only.
    pub fn ipc_event(&self) -> Result<IpcEvent, GpuError> {
        match self.cuda_device() {
            Some(d) => {
                let (event, handle) = d.ipc_event()?;
                Ok(IpcEvent { event, handle })
            }
            None => Err(GpuError::Unsupported {
                what: "CUDA IPC events",
            }),
        }
    }

    /// Opens another process's event by its 64-byte handle (on this
    /// device); closed when the returned event is dropped. CUDA only.
    pub fn open_ipc_event(&self, handle: &[u8; 64]) -> Result<IpcEvent, GpuError> {
        match self.cuda_device() {
            Some(d) => Ok(IpcEvent {
                event: d.open_ipc_event(handle)?,
                handle: *handle,
            }),
            None => Err(GpuError::Unsupported {
                what: "CUDA IPC events",
            }),
        }
    }

    /// The NVRTC output (PTX) of each kernel source, for inspection.
    pub fn ptx(&self) -> Vec<(&'static str, String)> {
        self.cuda_device().map(|d| d.ptx()).unwrap_or_default()
    }
}

/// The 64-byte CUDA IPC handle of a device allocation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct IpcHandle(pub [u8; 64]);

impl std::fmt::Debug for IpcHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IpcHandle(..)")
    }
}

/// A CUDA event shared between processes: made by [`Gpu::ipc_event`] and
/// recorded with [`GpuStream::record_ipc`] in one, opened by
/// [`Gpu::open_ipc_event`] and waited on in another. A wait covers the
/// work before the event's most recent record at the time of the wait.
pub struct IpcEvent {
    event: crate::cuda::Event,
    handle: [u8; 64],
}

impl std::fmt::Debug for IpcEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IpcEvent(..)")
    }
}

impl IpcEvent {
    /// The 64-byte `cudaIpcEventHandle_t` another process opens it by.
    pub fn handle(&self) -> &[u8; 64] {
        &self.handle
    }

    /// Blocks until the work before the most recent record has completed.
    pub fn wait(&self) -> Result<(), GpuError> {
        self.event.wait()
    }
}

pub(crate) enum DeviceOwner {
    Host { _map: memmap2::MmapMut },
    Cuda(Arc<cudarc::driver::CudaContext>),
    Ipc(Arc<cudarc::driver::CudaContext>),
}

/// Device memory, freed (or, for an IPC mapping, unmapped) on drop.
pub struct DeviceBuffer {
    pub(crate) ptr: u64,
    pub(crate) len: usize,
    pub(crate) owner: DeviceOwner,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBuffer")
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .field("len", &self.len)
            .finish()
    }
}

impl DeviceBuffer {
    fn host_backed(bytes: usize) -> Result<Self, GpuError> {
        let mut map = memmap2::MmapMut::map_anon(bytes.max(1)).map_err(GpuError::HostMemory)?;
        Ok(DeviceBuffer {
            ptr: map.as_mut_ptr() as u64,
            len: bytes,
            owner: DeviceOwner::Host { _map: map },
        })
    }

    /// Device address of the first byte.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

// SAFETY: a device allocation is plain memory; which thread touches which
// bytes is the users' protocol (streams and fences).
unsafe impl Send for DeviceBuffer {}
unsafe impl Sync for DeviceBuffer {}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        match &self.owner {
            DeviceOwner::Host { .. } => {}
            DeviceOwner::Cuda(ctx) => crate::cuda::free_device(ctx, self.ptr),
            DeviceOwner::Ipc(ctx) => crate::cuda::close_ipc(ctx, self.ptr),
        }
    }
}

pub(crate) enum PinnedOwner {
    Host { _map: memmap2::MmapMut },
    Cuda(Arc<cudarc::driver::CudaContext>),
}

/// Host memory the device reaches: page-locked and mapped on CUDA.
pub struct PinnedBuffer {
    pub(crate) host: *mut u8,
    pub(crate) device: u64,
    pub(crate) len: usize,
    pub(crate) owner: PinnedOwner,
}

// SAFETY: as for DeviceBuffer.
unsafe impl Send for PinnedBuffer {}
unsafe impl Sync for PinnedBuffer {}

impl std::fmt::Debug for PinnedBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedBuffer")
            .field("len", &self.len)
            .field("page_locked", &self.is_page_locked())
            .finish()
    }
}

impl PinnedBuffer {
    fn anonymous(bytes: usize) -> Result<Self, GpuError> {
        let mut map = memmap2::MmapMut::map_anon(bytes.max(1)).map_err(GpuError::HostMemory)?;
        let host = map.as_mut_ptr();
        Ok(PinnedBuffer {
            host,
            device: host as u64,
            len: bytes,
            owner: PinnedOwner::Host { _map: map },
        })
    }

    /// Host address of the first byte.
    pub fn host_ptr(&self) -> *mut u8 {
        self.host
    }

    /// Device address of the first byte (the host address under unified
    /// addressing).
    pub fn device_ptr(&self) -> u64 {
        self.device
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the memory is page-locked (CUDA backend).
    pub fn is_page_locked(&self) -> bool {
        matches!(self.owner, PinnedOwner::Cuda(_))
    }

    /// The bytes. No device operation may write them meanwhile (wait for
    /// the fence of any that does).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `host` points to `len` bytes owned by this buffer.
        unsafe { std::slice::from_raw_parts(self.host, self.len) }
    }

    /// The bytes, for writing. No device operation may read or write them
    /// meanwhile.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `host` points to `len` bytes owned by this buffer; `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.host, self.len) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        if let PinnedOwner::Cuda(ctx) = &self.owner {
            crate::cuda::free_pinned(ctx, self.host);
        }
    }
}

/// Completion of the operations queued on a stream before it was recorded.
pub struct Fence {
    pub(crate) event: Option<crate::cuda::Event>,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fence")
            .field("done", &self.is_done())
            .finish()
    }
}

impl Fence {
    /// A fence with nothing to wait for.
    pub fn done() -> Fence {
        Fence { event: None }
    }

    /// Whether everything before the fence has completed. A device error
    /// reads as done (the next operation on the stream reports it).
    pub fn is_done(&self) -> bool {
        self.event.as_ref().is_none_or(|e| e.is_done())
    }

    /// Blocks until everything before the fence has completed.
    pub fn wait(&self) -> Result<(), GpuError> {
        match &self.event {
            Some(e) => e.wait(),
            None => Ok(()),
        }
    }

    /// Milliseconds between two timed fences of one stream (both from
    /// [`GpuStream::record_timed`]); `None` on the CPU backend.
    pub fn elapsed_ms(&self, later: &Fence) -> Result<Option<f32>, GpuError> {
        match (&self.event, &later.event) {
            (Some(a), Some(b)) => a.elapsed_ms(b).map(Some),
            _ => Ok(None),
        }
    }
}

/// A queue of device operations. Methods take `&self`; one stream may be
/// shared by threads (its operations are serialised).
pub struct GpuStream {
    gpu: Gpu,
    cuda: Option<CudaStreamState>,
}

impl std::fmt::Debug for GpuStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuStream")
            .field("backend", &self.gpu.backend())
            .finish()
    }
}

impl GpuStream {
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// A stream of `gpu` from its CUDA state (`None` on the CPU backend).
    pub(crate) fn from_state(gpu: Gpu, cuda: Option<CudaStreamState>) -> GpuStream {
        GpuStream { gpu, cuda }
    }

    /// The CUDA state alone, without the [`Gpu`] (kept by the device's
    /// staging pool, which a `Gpu` holds).
    pub(crate) fn into_state(self) -> Option<CudaStreamState> {
        self.cuda
    }

    fn cuda(&self) -> Option<(&CudaDevice, &CudaStreamState)> {
        Some((self.gpu.cuda_device()?, self.cuda.as_ref()?))
    }

    /// Copies `len` bytes with the DMA engines (`cuMemcpyAsync`; any
    /// direction under unified addressing).
    ///
    /// # Safety
    /// `src..src+len` and `dst..dst+len` must be valid, non-overlapping
    /// device-reachable memory until a fence recorded after this completes,
    /// and nothing else may write them meanwhile. Pageable host memory is
    /// allowed (the copy is then synchronous with the host).
    pub unsafe fn copy(&self, dst: u64, src: u64, len: u64) -> Result<(), GpuError> {
        match self.cuda() {
            // SAFETY: the caller's contract.
            Some((d, s)) => unsafe { d.memcpy(s, dst, src, len) },
            // SAFETY: the caller's contract.
            None => unsafe {
                reference::copy_raw(src, dst, len);
                Ok(())
            },
        }
    }

    /// Copies every run of `ops` in one kernel launch (16-byte accesses
    /// where addresses and lengths allow).
    ///
    /// # Safety
    /// As [`GpuStream::copy`], for every run; runs must not overlap each
    /// other's destinations.
    pub unsafe fn batched_copy(&self, ops: &[CopyOp]) -> Result<(), GpuError> {
        match self.cuda() {
            // SAFETY: the caller's contract.
            Some((d, s)) => unsafe { d.batched_copy(s, ops) },
            None => {
                for op in ops {
                    // SAFETY: the caller's contract.
                    unsafe { reference::copy_raw(op.src, op.dst, op.len) };
                }
                Ok(())
            }
        }
    }

    /// Copies every run with the DMA engines: one `cuMemcpyBatchAsync`
    /// call where the driver has it (CUDA 13.0 drivers), else one
    /// `cuMemcpyAsync` per run.
    ///
    /// # Safety
    /// As [`GpuStream::batched_copy`].
    pub unsafe fn dma_copies(&self, ops: &[CopyOp]) -> Result<(), GpuError> {
        match self.cuda() {
            // SAFETY: the caller's contract.
            Some((d, s)) => unsafe { d.memcpy_batch(s, ops) },
            None => {
                for op in ops {
                    // SAFETY: the caller's contract.
                    unsafe { reference::copy_raw(op.src, op.dst, op.len) };
                }
                Ok(())
            }
        }
    }

    /// Whether [`GpuStream::dma_copies`] issues one driver call for many
    /// runs (true on the CPU backend, where nothing is issued).
    pub fn has_batch_dma(&self) -> bool {
        self.cuda().is_none_or(|(d, _)| d.has_batch_dma())
    }

    /// Copies runs, each by the cheaper path: runs that continue each other
    /// on both sides are merged first ([`reference::coalesce`]), then runs
    /// of at least `dma_threshold` bytes go with DMA (one batched driver
    /// call, [`GpuStream::dma_copies`]), the rest in one batched-kernel
    /// launch.
    ///
    /// # Safety
    /// As [`GpuStream::batched_copy`].
    pub unsafe fn copy_blocks(&self, ops: &[CopyOp], dma_threshold: u64) -> Result<(), GpuError> {
        let (large, small): (Vec<CopyOp>, Vec<CopyOp>) = reference::coalesce(ops)
            .into_iter()
            .partition(|op| op.len >= dma_threshold);
        if !large.is_empty() {
            // SAFETY: the caller's contract.
            unsafe { self.dma_copies(&large)? };
        }
        if !small.is_empty() {
            // SAFETY: the caller's contract.
            unsafe { self.batched_copy(&small)? };
        }
        Ok(())
    }

    /// Gathers the blocks named by `page_ids` (`pages_per_block` each) from
    /// an engine's paged region at `engine` into the layer-major blocks at
    /// `blocks[i]`. The geometry and page ids are checked first.
    ///
    /// # Safety
    /// `engine` must address `geometry.region_bytes()` readable bytes and
    /// each `blocks[i]` `geometry.block_bytes(pages_per_block)` writable
    /// bytes, device-reachable, until a fence recorded after this completes.
    pub unsafe fn gather(
        &self,
        geometry: &PagedGeometry,
        pages_per_block: u32,
        engine: u64,
        page_ids: &[u32],
        blocks: &[u64],
    ) -> Result<(), GpuError> {
        self.paged(geometry, pages_per_block, engine, page_ids, blocks, true)
    }

    /// Scatters layer-major blocks into an engine's pages: the inverse of
    /// [`GpuStream::gather`].
    ///
    /// # Safety
    /// As [`GpuStream::gather`], with the region written and the blocks read.
    pub unsafe fn scatter(
        &self,
        geometry: &PagedGeometry,
        pages_per_block: u32,
        engine: u64,
        page_ids: &[u32],
        blocks: &[u64],
    ) -> Result<(), GpuError> {
        self.paged(geometry, pages_per_block, engine, page_ids, blocks, false)
    }

    fn paged(
        &self,
        geometry: &PagedGeometry,
        pages_per_block: u32,
        engine: u64,
        page_ids: &[u32],
        blocks: &[u64],
        gather: bool,
    ) -> Result<(), GpuError> {
        geometry.validate()?;
        let n = geometry.check_pages("page_ids", pages_per_block, page_ids)?;
        if n != blocks.len() {
            return Err(GpuError::Geometry(crate::layout::GeometryError::new(
                "blocks",
                format!(
                    "{} block addresses for {n} blocks of page ids",
                    blocks.len()
                ),
            )));
        }
        if n == 0 {
            return Ok(());
        }
        match self.cuda() {
            // SAFETY: the caller's contract (checked geometry and pages).
            Some((d, s)) => unsafe {
                d.paged(
                    s,
                    geometry,
                    pages_per_block,
                    engine,
                    page_ids,
                    blocks,
                    gather,
                )
            },
            None => {
                for c in geometry.chunk_plan(pages_per_block, page_ids) {
                    let e = engine + c.engine_offset;
                    let b = blocks[c.block] + c.block_offset;
                    // SAFETY: the caller's contract.
                    unsafe {
                        if gather {
                            reference::copy_raw(e, b, c.len)
                        } else {
                            reference::copy_raw(b, e, c.len)
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// xxh3-64 (seed 0, default secret) of every run, written as
    /// little-endian u64s at `out` (`out + 8 * i` for run `i`), in one
    /// `kvs_xxh3` launch.
    ///
    /// # Safety
    /// Every run must be readable device-reachable memory, and
    /// `out..out + 8 * runs.len()` writable device-reachable memory, until a
    /// fence recorded after this completes; nothing may write the runs
    /// meanwhile.
    pub unsafe fn xxh3(&self, runs: &[HashRun], out: u64) -> Result<(), GpuError> {
        if runs.is_empty() {
            return Ok(());
        }
        match self.cuda() {
            // SAFETY: the caller's contract.
            Some((d, s)) => unsafe { d.xxh3(s, runs, out) },
            None => {
                // SAFETY: the caller's contract.
                unsafe { crate::xxh3::xxh3_raw(runs, out) };
                Ok(())
            }
        }
    }

    /// Makes everything queued on this stream from now on wait until
    /// `fence` (of any stream of this device) has completed.
    pub fn wait_for(&self, fence: &Fence) -> Result<(), GpuError> {
        match (self.cuda(), &fence.event) {
            (Some((d, s)), Some(e)) => d.wait_event(s, e),
            _ => Ok(()),
        }
    }

    /// Records `event` (of this stream's device) after everything queued so
    /// far on this stream.
    pub fn record_ipc(&self, event: &IpcEvent) -> Result<(), GpuError> {
        match self.cuda() {
            Some((d, s)) => d.record_event(s, &event.event),
            None => Err(GpuError::Unsupported {
                what: "CUDA IPC events",
            }),
        }
    }

    /// Makes everything queued on this stream from now on wait for the
    /// work before `event`'s most recent record.
    pub fn wait_ipc(&self, event: &IpcEvent) -> Result<(), GpuError> {
        match self.cuda() {
            Some((d, s)) => d.wait_event(s, &event.event),
            None => Err(GpuError::Unsupported {
                what: "CUDA IPC events",
            }),
        }
    }

    /// A fence after everything queued so far.
    pub fn record(&self) -> Result<Fence, GpuError> {
        match self.cuda() {
            Some((d, s)) => Ok(Fence {
                event: Some(d.record(s, false)?),
            }),
            None => Ok(Fence::done()),
        }
    }

    /// A fence that can also time ([`Fence::elapsed_ms`]).
    pub fn record_timed(&self) -> Result<Fence, GpuError> {
        match self.cuda() {
            Some((d, s)) => Ok(Fence {
                event: Some(d.record(s, true)?),
            }),
            None => Ok(Fence::done()),
        }
    }

    /// Blocks until everything queued so far has completed.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        match self.cuda() {
            Some((d, s)) => d.synchronize(s),
            None => Ok(()),
        }
    }
}
