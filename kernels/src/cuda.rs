//! The CUDA backend of [`crate::Gpu`]: driver calls through `cudarc` (the
//! library is loaded at run time), kernels compiled with NVRTC at start-up.

use std::sync::Arc;

use cudarc::driver::sys;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg,
};
use parking_lot::Mutex;

use crate::device::{
    Backend, DeviceBuffer, DeviceInfo, DeviceOwner, IpcHandle, PinnedBuffer, PinnedOwner,
};
use crate::error::GpuError;
use crate::layout::PagedGeometry;
use crate::reference::CopyOp;
use crate::xxh3::HashRun;

/// The kernel sources, each compiled with `common.cuh` in front.
pub const COMMON_SOURCE: &str = include_str!("../cuda/common.cuh");
pub const BATCHED_COPY_SOURCE: &str = include_str!("../cuda/batched_copy.cu");
pub const PAGED_SOURCE: &str = include_str!("../cuda/paged.cu");
pub const XXH3_SOURCE: &str = include_str!("../cuda/xxh3.cu");

/// Threads per CTA of every kernel.
const THREADS: u32 = 256;
/// Longest run one CTA copies of a batched copy; longer runs are split so a
/// large block spreads over many multiprocessors.
const PIECE_BYTES: u64 = 64 << 10;

// `kvs_xxh3` is written for 8 warps per CTA (its shared window layout).
const _: () = assert!(THREADS == 256);

fn driver(call: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> GpuError {
    move |source| GpuError::Driver { call, source }
}

/// Whether the CUDA driver library can be loaded (calling into a missing
/// library panics, so this comes first).
pub fn driver_library_present() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { sys::is_culib_present() }
}

/// Whether the NVRTC library can be loaded.
pub fn nvrtc_library_present() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Loads NVRTC from the directory named by `KVSTRATA_NVRTC_DIR` (the
/// `nvidia-cuda-nvrtc` wheel's `lib`, as `make test` installs it), so that
/// tests compile kernels on a machine without CUDA: `libnvrtc-builtins.so.13.0`
/// first (NVRTC opens it by name while compiling), then `libnvrtc.so.13`; once
/// loaded, the loader finds them by soname when cudarc asks. `Ok(false)` when
/// the variable is unset; the libraries stay loaded for the life of the process.
pub fn load_nvrtc_from_env() -> Result<bool, String> {
    let Some(dir) = std::env::var_os("KVSTRATA_NVRTC_DIR") else {
        return Ok(false);
    };
    let dir = std::path::PathBuf::from(dir);
    for name in ["libnvrtc-builtins.so.13.0", "libnvrtc.so.13"] {
        let path = dir.join(name);
        // SAFETY: loading NVRTC runs no initialisation with requirements on us.
        let lib = unsafe { libloading::Library::new(&path) }
            .map_err(|e| format!("KVSTRATA_NVRTC_DIR: cannot load {}: {e}", path.display()))?;
        std::mem::forget(lib);
    }
    Ok(true)
}

/// Compiles one kernel source (with `common.cuh` in front) to PTX for the
/// virtual architecture `compute_<major><minor>`.
pub fn compile(name: &'static str, source: &str, cc: (i32, i32)) -> Result<String, GpuError> {
    compile_with_prelude(name, COMMON_SOURCE, source, cc)
}

/// Compiles `source` with `prelude` in front (a header of shared helpers) to
/// PTX for the virtual architecture `compute_<major><minor>`, C++17. The GPU
/// engine compiles its model kernels (`engine/cuda/*.cu`) with this too.
pub fn compile_with_prelude(
    name: &'static str,
    prelude: &str,
    source: &str,
    cc: (i32, i32),
) -> Result<String, GpuError> {
    if !nvrtc_library_present() {
        return Err(GpuError::NoNvrtc);
    }
    let arch: &'static str = Box::leak(format!("compute_{}{}", cc.0, cc.1).into_boxed_str());
    let full = format!("{prelude}\n{source}");
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        name: Some(name.to_string()),
        options: vec!["--std=c++17".to_string()],
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(full, opts).map_err(|e| GpuError::Compile {
        file: name,
        log: match &e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                log.to_string_lossy().into_owned()
            }
            other => format!("{other:?}"),
        },
    })?;
    Ok(ptx.to_src())
}

pub(crate) struct CudaDevice {
    ctx: Arc<CudaContext>,
    info: DeviceInfo,
    batched_copy: CudaFunction,
    gather: CudaFunction,
    scatter: CudaFunction,
    xxh3: CudaFunction,
    ptx: Vec<(&'static str, String)>,
    /// Whether the driver has `cuMemcpyBatchAsync_v2` (CUDA 13.0 drivers):
    /// many DMA copies in one call.
    batch_dma: bool,
}

impl CudaDevice {
    pub(crate) fn open(ordinal: usize) -> Result<Self, GpuError> {
        if !driver_library_present() {
            return Err(GpuError::NoLibrary);
        }
        cudarc::driver::result::init().map_err(driver("cuInit"))?;
        let count = CudaContext::device_count().map_err(driver("cuDeviceGetCount"))?;
        if ordinal >= count.max(0) as usize {
            return Err(GpuError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(driver("cuDevicePrimaryCtxRetain"))?;
        let name = ctx.name().map_err(driver("cuDeviceGetName"))?;
        let cc = ctx
            .compute_capability()
            .map_err(driver("cuDeviceGetAttribute"))?;
        let total = ctx.total_mem().map_err(driver("cuDeviceTotalMem"))?;
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver("cuDeviceGetAttribute"))?;
        let copy_ptx = compile("batched_copy.cu", BATCHED_COPY_SOURCE, cc)?;
        let paged_ptx = compile("paged.cu", PAGED_SOURCE, cc)?;
        let xxh3_ptx = compile("xxh3.cu", XXH3_SOURCE, cc)?;
        let copy_mod = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(copy_ptx.clone()))
            .map_err(driver("cuModuleLoadData"))?;
        let paged_mod = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(paged_ptx.clone()))
            .map_err(driver("cuModuleLoadData"))?;
        let xxh3_mod = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(xxh3_ptx.clone()))
            .map_err(driver("cuModuleLoadData"))?;
        let function = |m: &Arc<cudarc::driver::CudaModule>, name| {
            m.load_function(name).map_err(driver("cuModuleGetFunction"))
        };
        Ok(CudaDevice {
            batched_copy: function(&copy_mod, "kvs_batched_copy")?,
            gather: function(&paged_mod, "kvs_gather")?,
            scatter: function(&paged_mod, "kvs_scatter")?,
            xxh3: function(&xxh3_mod, "kvs_xxh3")?,
            info: DeviceInfo {
                backend: Backend::Cuda,
                ordinal,
                name,
                compute_capability: cc,
                total_bytes: total as u64,
                multiprocessors: sms.max(1) as u32,
            },
            ptx: vec![
                ("batched_copy.cu", copy_ptx),
                ("paged.cu", paged_ptx),
                ("xxh3.cu", xxh3_ptx),
            ],
            // SAFETY: looking a symbol up in the loaded driver library.
            batch_dma: unsafe { sys::culib().get::<*const ()>(b"cuMemcpyBatchAsync_v2") }.is_ok(),
            ctx,
        })
    }

    pub(crate) fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub(crate) fn ptx(&self) -> Vec<(&'static str, String)> {
        self.ptx.clone()
    }

    fn bind(&self) -> Result<(), GpuError> {
        self.ctx.bind_to_thread().map_err(driver("cuCtxSetCurrent"))
    }

    pub(crate) fn alloc_device(&self, bytes: usize) -> Result<DeviceBuffer, GpuError> {
        self.bind()?;
        // SAFETY: a plain allocation; freed by DeviceBuffer's drop.
        let ptr = unsafe { cudarc::driver::result::malloc_sync(bytes.max(1)) }
            .map_err(driver("cuMemAlloc"))?;
        Ok(DeviceBuffer {
            ptr,
            len: bytes,
            owner: DeviceOwner::Cuda(Arc::clone(&self.ctx)),
        })
    }

    pub(crate) fn alloc_pinned(&self, bytes: usize) -> Result<PinnedBuffer, GpuError> {
        self.bind()?;
        let flags = sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP;
        // SAFETY: a plain allocation; freed by PinnedBuffer's drop.
        let host = unsafe { cudarc::driver::result::malloc_host(bytes.max(1), flags) }
            .map_err(driver("cuMemHostAlloc"))? as *mut u8;
        let mut device: sys::CUdeviceptr = 0;
        // SAFETY: `host` is a mapped pinned allocation of this context.
        let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device, host.cast(), 0) }.result();
        if let Err(e) = r {
            free_pinned(&self.ctx, host);
            return Err(GpuError::Driver {
                call: "cuMemHostGetDevicePointer",
                source: e,
            });
        }
        Ok(PinnedBuffer {
            host,
            device,
            len: bytes,
            owner: PinnedOwner::Cuda(Arc::clone(&self.ctx)),
        })
    }

    /// A stream for the daemon's copies, gathers, scatters and hashes: at the
    /// device's lowest priority, so that an engine's kernels in the same
    /// context go first; a plain stream with `KVSTRATA_GPU_STREAM_PRIORITY=off`.
    /// (On current GPUs the lowest priority is the default one, 0; priorities
    /// order work within one context only, see docs/gpu.md, "Decode
    /// interference".)
    pub(crate) fn new_stream(&self) -> Result<CudaStreamState, GpuError> {
        self.bind()?;
        let stream = match low_priority_wanted() {
            false => self.ctx.new_stream().map_err(driver("cuStreamCreate"))?,
            true => {
                // (least, greatest): least is the numerically largest.
                let (least, _) = cudarc::driver::result::stream::get_priority_range()
                    .map_err(driver("cuCtxGetStreamPriorityRange"))?;
                self.ctx
                    .new_stream_with_priority(least)
                    .map_err(driver("cuStreamCreateWithPriority"))?
            }
        };
        Ok(CudaStreamState {
            stream,
            args: Mutex::new(ArgsState::new()),
        })
    }

    pub(crate) fn ipc_handle(&self, buffer: &DeviceBuffer) -> Result<IpcHandle, GpuError> {
        if !matches!(buffer.owner, DeviceOwner::Cuda(_)) {
            return Err(GpuError::Unsupported {
                what: "IPC handles of memory this process did not allocate",
            });
        }
        self.bind()?;
        let mut h = std::mem::MaybeUninit::<sys::CUipcMemHandle>::zeroed();
        // SAFETY: `buffer.ptr` is a cuMemAlloc allocation of this context.
        unsafe { sys::cuIpcGetMemHandle(h.as_mut_ptr(), buffer.ptr) }
            .result()
            .map_err(driver("cuIpcGetMemHandle"))?;
        // SAFETY: initialised by the driver above.
        let h = unsafe { h.assume_init() };
        let mut out = [0u8; 64];
        for (o, c) in out.iter_mut().zip(h.reserved.iter()) {
            *o = *c as u8;
        }
        Ok(IpcHandle(out))
    }

    pub(crate) fn open_ipc(
        &self,
        handle: &IpcHandle,
        bytes: usize,
    ) -> Result<DeviceBuffer, GpuError> {
        self.bind()?;
        // SAFETY: a plain struct of 64 chars; all zeroes is a valid value.
        let mut h: sys::CUipcMemHandle = unsafe { std::mem::zeroed() };
        for (r, b) in h.reserved.iter_mut().zip(handle.0.iter()) {
            *r = *b as _;
        }
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: the driver validates the handle; 1 = lazy peer access.
        unsafe { sys::cuIpcOpenMemHandle_v2(&mut ptr, h, 1) }
            .result()
            .map_err(driver("cuIpcOpenMemHandle"))?;
        let mapped = DeviceBuffer {
            ptr,
            len: bytes,
            owner: DeviceOwner::Ipc(Arc::clone(&self.ctx)),
        };
        // The exporter announced `bytes`; a kernel must never run past the
        // real allocation (a fault would take down this whole context).
        let (mut base, mut size): (sys::CUdeviceptr, usize) = (0, 0);
        // SAFETY: `ptr` is a live mapping of this context.
        unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr) }
            .result()
            .map_err(driver("cuMemGetAddressRange"))?;
        let available = (base + size as u64).saturating_sub(ptr);
        if available < bytes as u64 {
            return Err(GpuError::IpcTooSmall {
                announced: bytes as u64,
                available,
            });
        }
        Ok(mapped)
    }

    /// # Safety
    /// See `GpuStream::copy`.
    pub(crate) unsafe fn memcpy(
        &self,
        s: &CudaStreamState,
        dst: u64,
        src: u64,
        len: u64,
    ) -> Result<(), GpuError> {
        if len == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: the caller's contract.
        unsafe { sys::cuMemcpyAsync(dst, src, len as usize, s.stream.cu_stream()) }
            .result()
            .map_err(driver("cuMemcpyAsync"))
    }

    /// Whether [`CudaDevice::memcpy_batch`] is one driver call.
    pub(crate) fn has_batch_dma(&self) -> bool {
        self.batch_dma
    }

    /// Every run with the DMA engines in one `cuMemcpyBatchAsync` call
    /// (sources read in stream order), or one `cuMemcpyAsync` per run on
    /// drivers without it.
    ///
    /// # Safety
    /// See `GpuStream::dma_copies`.
    pub(crate) unsafe fn memcpy_batch(
        &self,
        s: &CudaStreamState,
        ops: &[CopyOp],
    ) -> Result<(), GpuError> {
        let ops: Vec<&CopyOp> = ops.iter().filter(|op| op.len > 0).collect();
        if ops.is_empty() {
            return Ok(());
        }
        if !self.batch_dma || ops.len() == 1 {
            for op in ops {
                // SAFETY: the caller's contract.
                unsafe { self.memcpy(s, op.dst, op.src, op.len)? };
            }
            return Ok(());
        }
        self.bind()?;
        let mut dsts: Vec<sys::CUdeviceptr> = ops.iter().map(|op| op.dst).collect();
        let mut srcs: Vec<sys::CUdeviceptr> = ops.iter().map(|op| op.src).collect();
        let mut sizes: Vec<usize> = ops.iter().map(|op| op.len as usize).collect();
        let hint = sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_INVALID,
            id: 0,
        };
        let mut attrs = [sys::CUmemcpyAttributes {
            srcAccessOrder: sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM,
            srcLocHint: hint,
            dstLocHint: hint,
            flags: 0,
        }];
        let mut attr_index = [0usize];
        // SAFETY: the arrays live through the call (the driver reads them
        // during it); the runs are the caller's contract.
        unsafe {
            sys::cuMemcpyBatchAsync_v2(
                dsts.as_mut_ptr(),
                srcs.as_mut_ptr(),
                sizes.as_mut_ptr(),
                ops.len(),
                attrs.as_mut_ptr(),
                attr_index.as_mut_ptr(),
                1,
                s.stream.cu_stream(),
            )
        }
        .result()
        .map_err(driver("cuMemcpyBatchAsync"))
    }

    /// # Safety
    /// See `GpuStream::batched_copy`.
    pub(crate) unsafe fn batched_copy(
        &self,
        s: &CudaStreamState,
        ops: &[CopyOp],
    ) -> Result<(), GpuError> {
        let mut pieces: Vec<CopyOp> = Vec::with_capacity(ops.len());
        for op in ops {
            let mut at = 0;
            while at < op.len {
                let len = (op.len - at).min(PIECE_BYTES);
                pieces.push(CopyOp {
                    src: op.src + at,
                    dst: op.dst + at,
                    len,
                });
                at += len;
            }
        }
        if pieces.is_empty() {
            return Ok(());
        }
        self.bind()?;
        let mut args = s.args.lock();
        let table = args.stage(self, &[bytemuck_ops(&pieces)])?;
        let n = pieces.len() as u32;
        let grid = n.min(self.info.multiprocessors * 16).max(1);
        let mut launch = s.stream.launch_builder(&self.batched_copy);
        launch.arg(&table[0]).arg(&n);
        // SAFETY: the table is in mapped pinned memory held until the fence
        // below completes; the runs are the caller's contract.
        unsafe { launch.launch(config(grid)) }.map_err(driver("cuLaunchKernel"))?;
        args.launched(self.record(s, false)?);
        Ok(())
    }

    /// # Safety
    /// See `GpuStream::gather`; geometry and page ids already checked.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn paged(
        &self,
        s: &CudaStreamState,
        geometry: &PagedGeometry,
        pages_per_block: u32,
        engine: u64,
        page_ids: &[u32],
        blocks: &[u64],
        gather: bool,
    ) -> Result<(), GpuError> {
        self.bind()?;
        let mut args = s.args.lock();
        let block_bytes: Vec<u8> = blocks.iter().flat_map(|b| b.to_le_bytes()).collect();
        let page_bytes: Vec<u8> = page_ids.iter().flat_map(|p| p.to_le_bytes()).collect();
        let staged = args.stage(self, &[&block_bytes, &page_bytes])?;
        let p = PagedArgs {
            engine,
            layer_stride: geometry.effective_layer_stride(),
            page_stride: geometry.page_stride(),
            kv_stride: geometry.effective_kv_stride(),
            chunk: geometry.chunk_bytes(),
            layers: geometry.layers,
            ppb: pages_per_block,
            n_blocks: blocks.len() as u32,
            small16: u32::from(small16(geometry, engine, blocks)),
        };
        // One warp per (block, layer, K|V, page) chunk; on the short-chunk
        // path, 32 chunks per warp at a time.
        let items = blocks.len() as u64 * geometry.layers as u64 * 2 * pages_per_block as u64;
        let per_warp = if p.small16 == 1 { 32 } else { 1 };
        let warps_per_cta = (THREADS / 32) as u64;
        let grid = items
            .div_ceil(warps_per_cta * per_warp)
            .min(self.info.multiprocessors as u64 * 16)
            .max(1) as u32;
        let f = if gather { &self.gather } else { &self.scatter };
        let mut launch = s.stream.launch_builder(f);
        launch.arg(&p).arg(&staged[1]).arg(&staged[0]);
        // SAFETY: tables staged in mapped pinned memory held until the fence
        // below completes; the region and blocks are the caller's contract.
        unsafe { launch.launch(config(grid)) }.map_err(driver("cuLaunchKernel"))?;
        args.launched(self.record(s, false)?);
        Ok(())
    }

    /// # Safety
    /// See `GpuStream::xxh3`.
    pub(crate) unsafe fn xxh3(
        &self,
        s: &CudaStreamState,
        runs: &[HashRun],
        out: u64,
    ) -> Result<(), GpuError> {
        if runs.is_empty() {
            return Ok(());
        }
        let n = u32::try_from(runs.len()).map_err(|_| GpuError::Unsupported {
            what: "kvs_xxh3 launches of 2^32 runs or more",
        })?;
        self.bind()?;
        let mut args = s.args.lock();
        let table = args.stage(self, &[bytemuck_runs(runs)])?;
        // One CTA per run (grid-stride beyond 16 CTAs per multiprocessor).
        let grid = n.min(self.info.multiprocessors * 16).max(1);
        let mut launch = s.stream.launch_builder(&self.xxh3);
        launch.arg(&table[0]).arg(&n).arg(&out);
        // SAFETY: the table is in mapped pinned memory held until the fence
        // below completes; the runs and `out` are the caller's contract.
        unsafe { launch.launch(config(grid)) }.map_err(driver("cuLaunchKernel"))?;
        args.launched(self.record(s, false)?);
        Ok(())
    }

    /// Makes later work on `s` wait for `event` (`cuStreamWaitEvent`).
    pub(crate) fn wait_event(&self, s: &CudaStreamState, event: &Event) -> Result<(), GpuError> {
        self.bind()?;
        // SAFETY: a live stream and event of this context.
        unsafe { sys::cuStreamWaitEvent(s.stream.cu_stream(), event.ev, 0) }
            .result()
            .map_err(driver("cuStreamWaitEvent"))
    }

    pub(crate) fn record(&self, s: &CudaStreamState, timed: bool) -> Result<Event, GpuError> {
        self.bind()?;
        let flags = if timed {
            sys::CUevent_flags::CU_EVENT_DEFAULT
        } else {
            sys::CUevent_flags::CU_EVENT_DISABLE_TIMING
        };
        let ev = cudarc::driver::result::event::create(flags).map_err(driver("cuEventCreate"))?;
        let event = Event {
            ev,
            ctx: Arc::clone(&self.ctx),
        };
        // SAFETY: a live event and stream of this context.
        unsafe { cudarc::driver::result::event::record(ev, s.stream.cu_stream()) }
            .map_err(driver("cuEventRecord"))?;
        Ok(event)
    }

    /// A new event another process can open (`CU_EVENT_INTERPROCESS`,
    /// without timing) and its 64-byte `cuIpcGetEventHandle` handle.
    pub(crate) fn ipc_event(&self) -> Result<(Event, [u8; 64]), GpuError> {
        self.bind()?;
        let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32
            | sys::CUevent_flags::CU_EVENT_INTERPROCESS as u32;
        let mut ev: sys::CUevent = std::ptr::null_mut();
        // SAFETY: creates an event of this (bound) context.
        unsafe { sys::cuEventCreate(&mut ev, flags) }
            .result()
            .map_err(driver("cuEventCreate"))?;
        let event = Event {
            ev,
            ctx: Arc::clone(&self.ctx),
        };
        let mut h = std::mem::MaybeUninit::<sys::CUipcEventHandle>::zeroed();
        // SAFETY: an interprocess event of this context, just created.
        unsafe { sys::cuIpcGetEventHandle(h.as_mut_ptr(), ev) }
            .result()
            .map_err(driver("cuIpcGetEventHandle"))?;
        // SAFETY: initialised by the driver above.
        let h = unsafe { h.assume_init() };
        let mut out = [0u8; 64];
        for (o, c) in out.iter_mut().zip(h.reserved.iter()) {
            *o = *c as u8;
        }
        Ok((event, out))
    }

    /// Opens another process's interprocess event by its handle.
    pub(crate) fn open_ipc_event(&self, handle: &[u8; 64]) -> Result<Event, GpuError> {
        self.bind()?;
        // SAFETY: a plain struct of 64 chars; all zeroes is a valid value.
        let mut h: sys::CUipcEventHandle = unsafe { std::mem::zeroed() };
        for (r, b) in h.reserved.iter_mut().zip(handle.iter()) {
            *r = *b as _;
        }
        let mut ev: sys::CUevent = std::ptr::null_mut();
        // SAFETY: the driver validates the handle.
        unsafe { sys::cuIpcOpenEventHandle(&mut ev, h) }
            .result()
            .map_err(driver("cuIpcOpenEventHandle"))?;
        Ok(Event {
            ev,
            ctx: Arc::clone(&self.ctx),
        })
    }

    /// Records `event` (of this context) after everything queued on `s`.
    pub(crate) fn record_event(&self, s: &CudaStreamState, event: &Event) -> Result<(), GpuError> {
        self.bind()?;
        // SAFETY: a live event and stream of this context.
        unsafe { cudarc::driver::result::event::record(event.ev, s.stream.cu_stream()) }
            .map_err(driver("cuEventRecord"))
    }

    pub(crate) fn synchronize(&self, s: &CudaStreamState) -> Result<(), GpuError> {
        self.bind()?;
        s.stream
            .synchronize()
            .map_err(driver("cuStreamSynchronize"))
    }
}

/// Whether `KVSTRATA_GPU_STREAM_PRIORITY` asks for stream priorities: on
/// unless it is `off`, `0`, `false` or `no`.
fn low_priority_wanted() -> bool {
    let v = std::env::var("KVSTRATA_GPU_STREAM_PRIORITY").unwrap_or_default();
    !matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "off" | "0" | "false" | "no"
    )
}

fn config(grid: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn bytemuck_ops(ops: &[CopyOp]) -> &[u8] {
    // SAFETY: CopyOp is repr(C), three u64s, no padding.
    unsafe { std::slice::from_raw_parts(ops.as_ptr().cast::<u8>(), std::mem::size_of_val(ops)) }
}

fn bytemuck_runs(runs: &[HashRun]) -> &[u8] {
    // SAFETY: HashRun is repr(C), two u64s, no padding.
    unsafe { std::slice::from_raw_parts(runs.as_ptr().cast::<u8>(), std::mem::size_of_val(runs)) }
}

/// Kernel parameter block of `kvs_gather` / `kvs_scatter` (struct KvsPaged).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct PagedArgs {
    engine: u64,
    layer_stride: u64,
    page_stride: u64,
    kv_stride: u64,
    chunk: u64,
    layers: u32,
    ppb: u32,
    n_blocks: u32,
    small16: u32,
}

/// Whether every chunk is at most 32 16-byte words at 16-byte aligned
/// addresses on both sides (the kernels' short-chunk path: 32 chunks per
/// warp, eight loads in flight per lane).
fn small16(g: &PagedGeometry, engine: u64, blocks: &[u64]) -> bool {
    let chunk = g.chunk_bytes();
    chunk <= 512
        && (chunk | engine | g.page_stride() | g.effective_kv_stride() | g.effective_layer_stride())
            .is_multiple_of(16)
        && blocks.iter().all(|b| b.is_multiple_of(16))
}

// SAFETY: plain old data with the C layout the kernel declares.
unsafe impl DeviceRepr for PagedArgs {}

pub(crate) struct CudaStreamState {
    stream: Arc<CudaStream>,
    args: Mutex<ArgsState>,
}

/// The pinned buffer a stream stages kernel tables in, and the fence of the
/// last launch that reads it.
/// Kernel argument tables of one stream, staged in mapped pinned memory: a
/// ring of [`ARG_RING`] buffers, so a launch waits for the launch that last
/// used its buffer, not for the one before it (a caller can keep several
/// batched copies queued while it works on finished ones).
struct ArgsState {
    ring: Vec<ArgSlot>,
    next: usize,
}

#[derive(Default)]
struct ArgSlot {
    buf: Option<PinnedBuffer>,
    in_use: Option<Event>,
}

/// Staging buffers per stream.
const ARG_RING: usize = 8;

impl ArgsState {
    fn new() -> Self {
        ArgsState {
            ring: (0..ARG_RING).map(|_| ArgSlot::default()).collect(),
            next: 0,
        }
    }

    /// Copies `parts` into the next staging buffer of the ring (each part
    /// 16-byte aligned), after the launch that last read that buffer has
    /// completed; returns each part's device address. The caller launches,
    /// then hands the launch's event to [`ArgsState::launched`].
    fn stage(&mut self, dev: &CudaDevice, parts: &[&[u8]]) -> Result<Vec<u64>, GpuError> {
        let slot = &mut self.ring[self.next];
        if let Some(e) = slot.in_use.take() {
            e.wait()?;
        }
        let need: usize = parts.iter().map(|p| p.len().next_multiple_of(16)).sum();
        if slot.buf.as_ref().is_none_or(|b| b.len() < need) {
            slot.buf = None;
            slot.buf = Some(dev.alloc_pinned(need.next_power_of_two().max(64 << 10))?);
        }
        let Some(buf) = slot.buf.as_mut() else {
            return Err(GpuError::Unsupported {
                what: "staging buffer",
            });
        };
        let base = buf.device_ptr();
        let bytes = buf.as_mut_slice();
        let mut at = 0;
        let mut out = Vec::with_capacity(parts.len());
        for p in parts {
            bytes[at..at + p.len()].copy_from_slice(p);
            out.push(base + at as u64);
            at += p.len().next_multiple_of(16);
        }
        Ok(out)
    }

    /// Marks the buffer last staged as read by the launch `done` follows,
    /// and moves on to the next buffer of the ring.
    fn launched(&mut self, done: Event) {
        self.ring[self.next].in_use = Some(done);
        self.next = (self.next + 1) % self.ring.len();
    }
}

/// A CUDA event, destroyed on drop.
pub(crate) struct Event {
    ev: sys::CUevent,
    ctx: Arc<CudaContext>,
}

// SAFETY: CUDA events may be used from any thread of the process.
unsafe impl Send for Event {}
unsafe impl Sync for Event {}

impl Event {
    pub(crate) fn is_done(&self) -> bool {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: a live event.
        match unsafe { cudarc::driver::result::event::query(self.ev) } {
            Ok(()) => true,
            Err(e) => e.0 != sys::CUresult::CUDA_ERROR_NOT_READY,
        }
    }

    pub(crate) fn wait(&self) -> Result<(), GpuError> {
        self.ctx
            .bind_to_thread()
            .map_err(driver("cuCtxSetCurrent"))?;
        // SAFETY: a live event.
        unsafe { cudarc::driver::result::event::synchronize(self.ev) }
            .map_err(driver("cuEventSynchronize"))
    }

    pub(crate) fn elapsed_ms(&self, later: &Event) -> Result<f32, GpuError> {
        later.wait()?;
        // SAFETY: two live, completed, timed events.
        unsafe { cudarc::driver::result::event::elapsed(self.ev, later.ev) }
            .map_err(driver("cuEventElapsedTime"))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: destroyed once; the driver defers it past pending work.
        let _ = unsafe { cudarc::driver::result::event::destroy(self.ev) };
    }
}

pub(crate) fn free_device(ctx: &Arc<CudaContext>, ptr: u64) {
    let _ = ctx.bind_to_thread();
    // SAFETY: `ptr` came from cuMemAlloc and is freed once (by its owner's drop).
    let _ = unsafe { cudarc::driver::result::free_sync(ptr) };
}

pub(crate) fn close_ipc(ctx: &Arc<CudaContext>, ptr: u64) {
    let _ = ctx.bind_to_thread();
    // SAFETY: `ptr` came from cuIpcOpenMemHandle and is closed once.
    let _ = unsafe { sys::cuIpcCloseMemHandle(ptr) };
}

pub(crate) fn free_pinned(ctx: &Arc<CudaContext>, host: *mut u8) {
    let _ = ctx.bind_to_thread();
    // SAFETY: `host` came from cuMemHostAlloc and is freed once.
    let _ = unsafe { cudarc::driver::result::free_host(host.cast()) };
}
