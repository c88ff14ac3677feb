//! One CUDA device as the GPU engine uses it: the primary context, one stream,
//! a cuBLAS handle on that stream, the model kernels compiled with NVRTC for the
//! device's compute capability, plain `cuMemAlloc` memory ([`DevMem`]), and one
//! launch wrapper per kernel.
//!
//! Everything is queued on the one stream, so kernels and matrix products run
//! in the order they are called; [`CudaDevice::synchronize`] waits for them.
//! Pointers are passed to kernels as plain `u64` device addresses.

use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::cublas::sys as blas_sys;
use cudarc::driver::sys;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};

use super::error::{CudaError, cublas, driver};
use super::reference::Storage;
use super::sources::{SOURCES, compile};

/// Another process's CUDA event opened by its IPC handle
/// (`cuIpcOpenEventHandle`): a KV region's ready event in the daemon, which
/// it records after the copies of a get it answered before they completed.
/// Closed on drop.
pub struct PeerEvent {
    ev: sys::CUevent,
    handle: [u8; 64],
    ctx: Arc<CudaContext>,
}

// SAFETY: CUDA events may be used from any thread of the process.
unsafe impl Send for PeerEvent {}
unsafe impl Sync for PeerEvent {}

impl std::fmt::Debug for PeerEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerEvent(..)")
    }
}

impl PeerEvent {
    /// The handle it was opened by.
    pub fn handle(&self) -> &[u8; 64] {
        &self.handle
    }

    /// Waits until the work before the event's latest record (in the
    /// process that records it) has completed, polling, for at most
    /// `limit`: an event whose process died with its work queued may never
    /// complete, and a blocking wait on it would never return.
    pub fn wait_within(&self, limit: std::time::Duration) -> Result<(), CudaError> {
        self.ctx
            .bind_to_thread()
            .map_err(driver("cuCtxSetCurrent"))?;
        let began = std::time::Instant::now();
        loop {
            // SAFETY: a live event opened in this context.
            match unsafe { sys::cuEventQuery(self.ev) } {
                sys::CUresult::CUDA_SUCCESS => return Ok(()),
                sys::CUresult::CUDA_ERROR_NOT_READY if began.elapsed() < limit => {
                    std::thread::yield_now()
                }
                sys::CUresult::CUDA_ERROR_NOT_READY => {
                    return Err(CudaError::Timeout {
                        what: "the daemon's copies (its KV region's ready event)",
                        after: limit,
                    });
                }
                e => return Err(driver("cuEventQuery")(cudarc::driver::DriverError(e))),
            }
        }
    }
}

impl Drop for PeerEvent {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: opened by cuIpcOpenEventHandle and released once, here.
            let _ = unsafe { cudarc::driver::result::event::destroy(self.ev) };
        }
    }
}

/// What the engine knows about its device.
#[derive(Debug, Clone)]
pub struct CudaDeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_bytes: u64,
    pub multiprocessors: u32,
}

/// Device memory from plain `cuMemAlloc` (so CUDA IPC can export it), freed on drop.
pub struct DevMem {
    ptr: u64,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

impl std::fmt::Debug for DevMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevMem({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}

impl DevMem {
    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Bytes allocated.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DevMem {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by cuMemAlloc in this context and freed once,
            // here. The stream's work using it was synchronized by its owner
            // (every owner synchronizes before dropping); a failure leaks.
            let _ = unsafe { cudarc::driver::result::free_sync(self.ptr) };
        }
    }
}

/// The model kernels of one storage type.
struct TypedKernels {
    embed: CudaFunction,
    rms_norm: CudaFunction,
    swiglu: CudaFunction,
    synthetic: CudaFunction,
    synthetic_f32: CudaFunction,
    /// Head dims up to 64, up to 128.
    attention: [CudaFunction; 2],
    /// Tensor-core attention for head dims 32, 64, 128 (the first version,
    /// `KVSTRATA_GPU_ATTENTION=mma-v1`).
    attention_mma: [CudaFunction; 3],
    /// Flash attention with fixed key spans for head dims 32, 64, 128.
    attention_flash: [CudaFunction; 3],
    /// The same with two stages of K/V tiles (`KVSTRATA_GPU_ATTENTION=flash2`).
    attention_flash2: [CudaFunction; 3],
    /// The fold of span partials written by a split flash launch.
    attention_combine: CudaFunction,
}

/// Which attention kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernel {
    /// `kvs_attention_*`: CUDA cores, f32 throughout, any even head dim up to 128.
    Simple,
    /// `kvs_attention_flash_*`: tensor cores (q and probabilities rounded to
    /// f16), head dims 32, 64 and 128; keys in fixed spans, split over CTAs
    /// for short chunks (decode) and folded in one CTA for long ones, with
    /// bit-identical results either way. `KVSTRATA_GPU_ATTENTION=mma-v1` runs
    /// the first tensor-core kernel (`kvs_attention_mma_*`) instead.
    TensorCore,
}

impl AttentionKernel {
    /// The tensor-core kernel where the head dim allows it, unless
    /// `KVSTRATA_GPU_ATTENTION=simple` (`=mma-v1`: the first tensor-core
    /// kernel, see [`AttentionKernel::TensorCore`]).
    pub fn auto(head_dim: usize) -> Self {
        let forced_simple = std::env::var("KVSTRATA_GPU_ATTENTION").is_ok_and(|v| v == "simple");
        if !forced_simple && MMA_DIMS.contains(&head_dim) {
            AttentionKernel::TensorCore
        } else {
            AttentionKernel::Simple
        }
    }
}

/// Head dims of the tensor-core attention kernels.
const MMA_DIMS: [usize; 3] = [32, 64, 128];

/// Head-dim bounds of the attention kernels (`PER * 8`).
const ATTENTION_DIMS: [usize; 2] = [64, 128];

/// Threads per CTA of the grid-stride kernels.
const THREADS: u32 = 256;

/// Query rows (times heads of a group) per CTA of the flash kernel.
const FLASH_MROWS: u32 = 128;

/// Threads per CTA of the flash kernel.
const FLASH_THREADS: u32 = 256;

/// Keys per span of the flash kernel (a multiple of its 64-key tile). A
/// model's results depend on it, so it is fixed per process.
const FLASH_SPAN: u32 = 256;

/// The most scratch memory a split flash launch may use for its partials.
const FLASH_SCRATCH_MAX: usize = 256 << 20;

/// Dynamic shared memory of the flash kernel with `stages` K/V buffers
/// (`FLASH_SMEM` in attention.cu).
fn flash_smem(head_dim: u32, stages: u32) -> u32 {
    stages * 2 * 64 * (head_dim + 8) * 2 + head_dim / 2 * FLASH_THREADS * 4
}

/// How `AttentionKernel::TensorCore` runs, fixed when the device opens (from
/// the environment, for tests and as an escape hatch).
#[derive(Debug, Clone, Copy)]
struct AttentionPolicy {
    /// `KVSTRATA_GPU_ATTENTION=mma-v1`: the first tensor-core kernel.
    v1: bool,
    /// `KVSTRATA_GPU_ATTENTION=flash2`: two stages of K/V tiles.
    two_stages: bool,
    /// `KVSTRATA_GPU_ATTENTION_SPAN`: keys per span (multiple of 64).
    span: u32,
    /// `KVSTRATA_GPU_ATTENTION_SPLIT_ROWS`: split launches of at most this
    /// many rows (else: when the unsplit grid would not fill the GPU).
    split_rows: Option<u32>,
}

impl AttentionPolicy {
    fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok();
        let span = var("KVSTRATA_GPU_ATTENTION_SPAN")
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|v| *v >= 64 && v.is_multiple_of(64))
            .unwrap_or(FLASH_SPAN);
        AttentionPolicy {
            v1: var("KVSTRATA_GPU_ATTENTION").is_some_and(|v| v == "mma-v1"),
            two_stages: var("KVSTRATA_GPU_ATTENTION").is_some_and(|v| v == "flash2"),
            span,
            split_rows: var("KVSTRATA_GPU_ATTENTION_SPLIT_ROWS").and_then(|v| v.parse().ok()),
        }
    }
}

/// A CUDA device ready to run the model kernels.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    typed: [TypedKernels; 2],
    rope: CudaFunction,
    kv_store: CudaFunction,
    top_k: CudaFunction,
    info: CudaDeviceInfo,
    attention_policy: AttentionPolicy,
    /// Partials of split flash launches (grown on demand, never shrunk).
    attention_scratch: std::sync::Mutex<Option<DevMem>>,
    /// The stream's priority, when it was made with one.
    stream_priority: Option<i32>,
}

/// Whether `KVSTRATA_GPU_STREAM_PRIORITY` (its value, if set) asks for stream
/// priorities: on unless it is `off`, `0`, `false` or `no`.
fn stream_priority_wanted(value: Option<&str>) -> bool {
    !matches!(
        value.map(|v| v.trim().to_ascii_lowercase()).as_deref(),
        Some("off" | "0" | "false" | "no")
    )
}

/// The engine's one stream: at the device's highest priority, so that a
/// decode step's kernels are scheduled before lower-priority work of this
/// context (another engine's prefill, copies) when both wait for
/// multiprocessors; a plain stream with `KVSTRATA_GPU_STREAM_PRIORITY=off`.
/// Priorities order work within one context only: the daemon's kernels run
/// in its own process's context, which the GPU time-slices with this one
/// (docs/gpu.md, "Decode interference").
fn engine_stream(ctx: &Arc<CudaContext>) -> Result<(Arc<CudaStream>, Option<i32>), CudaError> {
    let wanted = stream_priority_wanted(
        std::env::var("KVSTRATA_GPU_STREAM_PRIORITY")
            .ok()
            .as_deref(),
    );
    if !wanted {
        let stream = ctx.new_stream().map_err(driver("cuStreamCreate"))?;
        return Ok((stream, None));
    }
    ctx.bind_to_thread().map_err(driver("cuCtxSetCurrent"))?;
    // (least, greatest): greatest is the numerically smallest.
    let (_, greatest) = cudarc::driver::result::stream::get_priority_range()
        .map_err(driver("cuCtxGetStreamPriorityRange"))?;
    let stream = ctx
        .new_stream_with_priority(greatest)
        .map_err(driver("cuStreamCreateWithPriority"))?;
    Ok((stream, Some(greatest)))
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("info", &self.info)
            .finish()
    }
}

fn typed_index(s: Storage) -> usize {
    match s {
        Storage::Bf16 => 0,
        Storage::F16 => 1,
    }
}

impl CudaDevice {
    /// Opens device `ordinal`: checks that the driver, NVRTC and cuBLAS libraries
    /// load (a missing one would panic on first call), retains the primary
    /// context, compiles the kernels and creates the stream and cuBLAS handle.
    pub fn open(ordinal: usize) -> Result<Arc<Self>, CudaError> {
        // SAFETY: only try to open the libraries.
        if !unsafe { sys::is_culib_present() } {
            return Err(CudaError::NoDriver);
        }
        if !super::sources::nvrtc_library_present() {
            return Err(CudaError::NoNvrtc);
        }
        // SAFETY: as above.
        if !unsafe { blas_sys::is_culib_present() } {
            return Err(CudaError::NoCublas);
        }
        match cudarc::driver::result::init() {
            Ok(()) => {}
            Err(e) if e.0 == sys::cudaError_enum::CUDA_ERROR_NO_DEVICE => {
                return Err(CudaError::NoDevice { ordinal, count: 0 });
            }
            Err(e) => return Err(driver("cuInit")(e)),
        }
        let count = CudaContext::device_count().map_err(driver("cuDeviceGetCount"))?;
        if ordinal >= count.max(0) as usize {
            return Err(CudaError::NoDevice {
                ordinal,
                count: count.max(0) as usize,
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(driver("cuDevicePrimaryCtxRetain"))?;
        let cc = ctx
            .compute_capability()
            .map_err(driver("cuDeviceGetAttribute"))?;
        let info = CudaDeviceInfo {
            ordinal,
            name: ctx.name().map_err(driver("cuDeviceGetName"))?,
            compute_capability: cc,
            total_bytes: ctx.total_mem().map_err(driver("cuDeviceTotalMem"))? as u64,
            multiprocessors: ctx
                .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map_err(driver("cuDeviceGetAttribute"))?
                .max(1) as u32,
        };
        let mut functions = std::collections::HashMap::new();
        for (file, source, names) in SOURCES {
            let ptx = compile(file, source, cc)?;
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                .map_err(driver("cuModuleLoadData"))?;
            for name in names.iter() {
                let f = module
                    .load_function(name)
                    .map_err(driver("cuModuleGetFunction"))?;
                functions.insert(*name, f);
            }
        }
        let mut take = |name: String| {
            functions
                .remove(name.as_str())
                .ok_or_else(|| CudaError::Unsupported(format!("kernel {name} missing")))
        };
        let mut typed = |s: &str| -> Result<TypedKernels, CudaError> {
            Ok(TypedKernels {
                embed: take(format!("kvs_embed_{s}"))?,
                rms_norm: take(format!("kvs_rms_norm_{s}"))?,
                swiglu: take(format!("kvs_swiglu_{s}"))?,
                synthetic: take(format!("kvs_synthetic_{s}"))?,
                synthetic_f32: take(format!("kvs_synthetic_f32_{s}"))?,
                attention: [
                    take(format!("kvs_attention_{s}_d64"))?,
                    take(format!("kvs_attention_{s}_d128"))?,
                ],
                attention_mma: [
                    take(format!("kvs_attention_mma_{s}_d32"))?,
                    take(format!("kvs_attention_mma_{s}_d64"))?,
                    take(format!("kvs_attention_mma_{s}_d128"))?,
                ],
                attention_flash: [
                    take(format!("kvs_attention_flash_{s}_d32"))?,
                    take(format!("kvs_attention_flash_{s}_d64"))?,
                    take(format!("kvs_attention_flash_{s}_d128"))?,
                ],
                attention_flash2: [
                    take(format!("kvs_attention_flash2_{s}_d32"))?,
                    take(format!("kvs_attention_flash2_{s}_d64"))?,
                    take(format!("kvs_attention_flash2_{s}_d128"))?,
                ],
                attention_combine: take(format!("kvs_attention_combine_{s}"))?,
            })
        };
        let bf16 = typed("bf16")?;
        let f16 = typed("f16")?;
        // The flash kernel's shared memory (up to 98 KiB; 132 KiB with two
        // stages) needs an opt-in; a device that refuses it runs the first
        // tensor-core kernel (one stage) or the one-stage kernel (two) instead.
        let mut attention_policy = AttentionPolicy::from_env();
        for k in [&bf16, &f16] {
            for (stages, fs) in [(1u32, &k.attention_flash), (2, &k.attention_flash2)] {
                for (f, hd) in fs.iter().zip(MMA_DIMS) {
                    let bytes = flash_smem(hd as u32, stages);
                    let r = f.set_attribute(
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        bytes as i32,
                    );
                    if let Err(e) = r {
                        tracing::warn!(
                            "flash attention ({stages} stages) d{hd} cannot have {bytes} bytes of \
                             shared memory ({e}): another attention kernel runs instead"
                        );
                        if stages == 1 {
                            attention_policy.v1 = true;
                        } else {
                            attention_policy.two_stages = false;
                        }
                    }
                }
            }
        }
        let mut take = |name: &str| {
            functions
                .remove(name)
                .ok_or_else(|| CudaError::Unsupported(format!("kernel {name} missing")))
        };
        let rope = take("kvs_rope")?;
        let kv_store = take("kvs_kv_store")?;
        let top_k = take("kvs_top_k")?;
        let (stream, stream_priority) = engine_stream(&ctx)?;
        let blas = CudaBlas::new(Arc::clone(&stream)).map_err(cublas("cublasCreate"))?;
        Ok(Arc::new(CudaDevice {
            ctx,
            stream,
            blas,
            typed: [bf16, f16],
            rope,
            kv_store,
            top_k,
            info,
            attention_policy,
            attention_scratch: std::sync::Mutex::new(None),
            stream_priority,
        }))
    }

    /// The priority of the engine's stream (CUDA's convention: lower is
    /// higher), or `None` when it was made without one
    /// (`KVSTRATA_GPU_STREAM_PRIORITY=off`).
    pub fn stream_priority(&self) -> Option<i32> {
        self.stream_priority
    }

    /// The device's name, compute capability and memory.
    pub fn info(&self) -> &CudaDeviceInfo {
        &self.info
    }

    fn bind(&self) -> Result<(), CudaError> {
        self.ctx.bind_to_thread().map_err(driver("cuCtxSetCurrent"))
    }

    /// `bytes` of device memory (plain `cuMemAlloc`; contents undefined).
    pub fn alloc(&self, bytes: usize) -> Result<DevMem, CudaError> {
        self.bind()?;
        // SAFETY: a plain allocation, freed by DevMem's drop.
        let ptr = unsafe { cudarc::driver::result::malloc_sync(bytes.max(1)) }
            .map_err(driver("cuMemAlloc"))?;
        Ok(DevMem {
            ptr,
            bytes,
            ctx: Arc::clone(&self.ctx),
        })
    }

    /// The CUDA IPC handle (`cuIpcGetMemHandle`) of `mem`, a plain
    /// `cuMemAlloc` allocation of this device: another process opens it with
    /// `cuIpcOpenMemHandle` (the daemon, for a KV region).
    pub fn ipc_handle(&self, mem: &DevMem) -> Result<[u8; 64], CudaError> {
        self.bind()?;
        let mut h = std::mem::MaybeUninit::<sys::CUipcMemHandle>::zeroed();
        // SAFETY: `mem.ptr` is a live cuMemAlloc allocation of this context.
        unsafe { sys::cuIpcGetMemHandle(h.as_mut_ptr(), mem.ptr) }
            .result()
            .map_err(driver("cuIpcGetMemHandle"))?;
        // SAFETY: written by the driver above.
        let h = unsafe { h.assume_init() };
        let mut out = [0u8; 64];
        for (o, c) in out.iter_mut().zip(h.reserved.iter()) {
            *o = *c as u8;
        }
        Ok(out)
    }

    /// Opens another process's interprocess event by its 64-byte handle
    /// (a daemon's [`PeerEvent`]).
    pub fn open_ipc_event(&self, handle: &[u8; 64]) -> Result<PeerEvent, CudaError> {
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
        Ok(PeerEvent {
            ev,
            handle: *handle,
            ctx: Arc::clone(&self.ctx),
        })
    }

    /// Copies `src` to device address `dst` (stream-ordered; `src` may be
    /// reused when this returns: pageable sources are staged by the driver).
    pub fn upload<T: Copy>(&self, dst: u64, src: &[T]) -> Result<(), CudaError> {
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: `dst` holds at least size_of_val(src) bytes (the caller's
        // allocation); a pageable source is copied out before the call returns.
        unsafe { cudarc::driver::result::memcpy_htod_async(dst, src, self.stream.cu_stream()) }
            .map_err(driver("cuMemcpyHtoDAsync"))
    }

    /// Waits for the stream, then copies device address `src` into `dst`.
    pub fn download<T: Copy>(&self, dst: &mut [T], src: u64) -> Result<(), CudaError> {
        if dst.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: `src` holds at least size_of_val(dst) bytes; the stream is
        // synchronized before `dst` is read.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
            .map_err(driver("cuMemcpyDtoHAsync"))?;
        self.synchronize()
    }

    /// Device-to-device copy on the stream.
    pub fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<(), CudaError> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: both ranges are the caller's live allocations.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream())
        }
        .map_err(driver("cuMemcpyDtoDAsync"))
    }

    /// Waits until everything queued on the stream has run.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.bind()?;
        self.stream
            .synchronize()
            .map_err(driver("cuStreamSynchronize"))
    }

    fn grid_for(&self, n: u64) -> LaunchConfig {
        let blocks = n
            .div_ceil(THREADS as u64)
            .clamp(1, self.info.multiprocessors as u64 * 16) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn launched<T>(r: Result<T, cudarc::driver::DriverError>) -> Result<(), CudaError> {
        r.map(|_| ()).map_err(driver("cuLaunchKernel"))
    }

    /// `kvs_embed_*`: `rows` f32 rows of `table` (`[vocab][hidden]`) picked by the
    /// `u32` ids at `ids`, into `out`.
    ///
    /// # Safety
    /// Every address holds what the kernel reads or writes; ids are in range.
    pub unsafe fn embed(
        &self,
        s: Storage,
        table: u64,
        ids: u64,
        out: u64,
        rows: u32,
        hidden: u32,
    ) -> Result<(), CudaError> {
        self.bind()?;
        let f = &self.typed[typed_index(s)].embed;
        let mut l = self.stream.launch_builder(f);
        l.arg(&table).arg(&ids).arg(&out).arg(&rows).arg(&hidden);
        // SAFETY: the caller's contract.
        Self::launched(unsafe { l.launch(self.grid_for(rows as u64 * hidden as u64)) })
    }

    /// `kvs_rms_norm_*` over `rows` rows.
    ///
    /// # Safety
    /// As [`CudaDevice::embed`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rms_norm(
        &self,
        s: Storage,
        x: u64,
        x_stride: u64,
        w: u64,
        out: u64,
        out_stride: u64,
        rows: u32,
        hidden: u32,
        eps: f32,
    ) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        self.bind()?;
        let f = &self.typed[typed_index(s)].rms_norm;
        let mut l = self.stream.launch_builder(f);
        l.arg(&x)
            .arg(&x_stride)
            .arg(&w)
            .arg(&out)
            .arg(&out_stride)
            .arg(&hidden)
            .arg(&eps);
        let cfg = LaunchConfig {
            grid_dim: (rows, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the caller's contract.
        Self::launched(unsafe { l.launch(cfg) })
    }

    /// `kvs_swiglu_*`.
    ///
    /// # Safety
    /// As [`CudaDevice::embed`].
    pub unsafe fn swiglu(
        &self,
        s: Storage,
        gate_up: u64,
        out: u64,
        rows: u32,
        inter: u32,
    ) -> Result<(), CudaError> {
        self.bind()?;
        let f = &self.typed[typed_index(s)].swiglu;
        let mut l = self.stream.launch_builder(f);
        l.arg(&gate_up).arg(&out).arg(&rows).arg(&inter);
        // SAFETY: the caller's contract.
        Self::launched(unsafe { l.launch(self.grid_for(rows as u64 * inter as u64)) })
    }

    /// `kvs_synthetic_*` (16-bit values) or, with `widen`, `kvs_synthetic_f32_*`
    /// (the same values as f32) into `n` elements at `out`.
    ///
    /// # Safety
    /// `out` holds `n` elements of the output type.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn synthetic(
        &self,
        s: Storage,
        widen: bool,
        out: u64,
        n: u64,
        key: u64,
        scale: f32,
        offset: f32,
    ) -> Result<(), CudaError> {
        self.bind()?;
        let k = &self.typed[typed_index(s)];
        let f = if widen {
            &k.synthetic_f32
        } else {
            &k.synthetic
        };
        let mut l = self.stream.launch_builder(f);
        l.arg(&out).arg(&n).arg(&key).arg(&scale).arg(&offset);
        // SAFETY: the caller's contract.
        Self::launched(unsafe { l.launch(self.grid_for(n)) })
    }

    /// `kvs_rope` on the first `heads` heads of `rows` rows.
    ///
    /// # Safety
    /// As [`CudaDevice::embed`]; the tables cover positions `start + rows`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rope(
        &self,
        qkv: u64,
        stride: u64,
        cos: u64,
        sin: u64,
        rows: u32,
        start: u32,
        heads: u32,
        head_dim: u32,
        interleaved: bool,
    ) -> Result<(), CudaError> {
        self.bind()?;
        let inter = u32::from(interleaved);
        let mut l = self.stream.launch_builder(&self.rope);
        l.arg(&qkv)
            .arg(&stride)
            .arg(&cos)
            .arg(&sin)
            .arg(&rows)
            .arg(&start)
            .arg(&heads)
            .arg(&head_dim)
            .arg(&inter);
        let n = rows as u64 * heads as u64 * (head_dim / 2) as u64;
        // SAFETY: the caller's contract.
        Self::launched(unsafe { l.launch(self.grid_for(n)) })
    }

    /// `kvs_kv_store`: K and V of `rows` rows into the pages of positions `start..`.
    ///
    /// # Safety
    /// As [`CudaDevice::embed`]; the page table covers `start + rows` positions
    /// and names pages inside the pool.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn kv_store(
        &self,
        qkv: u64,
        stride: u64,
        k_col: u32,
        v_col: u32,
        pool: u64,
        pages: u64,
        page_elems: u64,
        layer: u32,
        block_tokens: u32,
        row: u32,
        rows: u32,
        start: u32,
    ) -> Result<(), CudaError> {
        self.bind()?;
        let mut l = self.stream.launch_builder(&self.kv_store);
        l.arg(&qkv)
            .arg(&stride)
            .arg(&k_col)
            .arg(&v_col)
            .arg(&pool)
            .arg(&pages)
            .arg(&page_elems)
            .arg(&layer)
            .arg(&block_tokens)
            .arg(&row)
            .arg(&rows)
            .arg(&start);
        // SAFETY: the caller's contract.
        Self::launched(unsafe { l.launch(self.grid_for(rows as u64 * row as u64)) })
    }

    /// `kvs_attention_*` or `kvs_attention_mma_*` (`kernel`) for `rows` query
    /// rows of `heads` heads.
    ///
    /// # Safety
    /// As [`CudaDevice::kv_store`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn attention(
        &self,
        s: Storage,
        kernel: AttentionKernel,
        q: u64,
        q_stride: u64,
        pool: u64,
        pages: u64,
        page_elems: u64,
        layer: u32,
        block_tokens: u32,
        kv_heads: u32,
        head_dim: u32,
        heads: u32,
        rows: u32,
        start: u32,
        scale: f32,
        out: u64,
        out_stride: u64,
    ) -> Result<(), CudaError> {
        if kernel == AttentionKernel::TensorCore && !self.attention_policy.v1 {
            // SAFETY: the caller's contract.
            return unsafe {
                self.attention_flash(
                    s,
                    q,
                    q_stride,
                    pool,
                    pages,
                    page_elems,
                    layer,
                    block_tokens,
                    kv_heads,
                    head_dim,
                    heads,
                    rows,
                    start,
                    scale,
                    out,
                    out_stride,
                )
            };
        }
        let typed = &self.typed[typed_index(s)];
        let (f, rows_per_cta, threads) = match kernel {
            AttentionKernel::Simple => {
                match ATTENTION_DIMS.iter().position(|&d| head_dim as usize <= d) {
                    Some(i) if head_dim.is_multiple_of(2) => (&typed.attention[i], 32, 256),
                    _ => {
                        return Err(CudaError::Unsupported(format!(
                            "head dim {head_dim} (even, at most {})",
                            ATTENTION_DIMS[1]
                        )));
                    }
                }
            }
            AttentionKernel::TensorCore => {
                match MMA_DIMS.iter().position(|&d| head_dim as usize == d) {
                    Some(i) => (&typed.attention_mma[i], 64, 128),
                    None => {
                        return Err(CudaError::Unsupported(format!(
                            "head dim {head_dim} on the tensor cores (32, 64 or 128)"
                        )));
                    }
                }
            }
        };
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) || rows == 0 {
            return Err(CudaError::Unsupported(format!(
                "attention with {heads} heads over {kv_heads} kv heads, {rows} rows"
            )));
        }
        self.bind()?;
        let group = heads / kv_heads;
        let mut l = self.stream.launch_builder(f);
        l.arg(&q)
            .arg(&q_stride)
            .arg(&pool)
            .arg(&pages)
            .arg(&page_elems)
            .arg(&layer)
            .arg(&block_tokens)
            .arg(&kv_heads)
            .arg(&head_dim)
            .arg(&group)
            .arg(&rows)
            .arg(&start)
            .arg(&scale)
            .arg(&out)
            .arg(&out_stride);
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(rows_per_cta), heads, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the caller's contract.
        Self::launched(unsafe { l.launch(cfg) })
    }

    /// `kvs_attention_flash_*` (and `kvs_attention_combine_*` after a split
    /// launch): [`AttentionKernel::TensorCore`].
    ///
    /// A launch is split over the key spans (one CTA per span, partials into
    /// the device's scratch memory, then the combine kernel) when the unsplit
    /// grid would leave most of the GPU idle (decode steps, short chunks);
    /// the result is bit-identical either way.
    ///
    /// # Safety
    /// As [`CudaDevice::attention`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn attention_flash(
        &self,
        s: Storage,
        q: u64,
        q_stride: u64,
        pool: u64,
        pages: u64,
        page_elems: u64,
        layer: u32,
        block_tokens: u32,
        kv_heads: u32,
        head_dim: u32,
        heads: u32,
        rows: u32,
        start: u32,
        scale: f32,
        out: u64,
        out_stride: u64,
    ) -> Result<(), CudaError> {
        let typed = &self.typed[typed_index(s)];
        let Some(i) = MMA_DIMS.iter().position(|&d| head_dim as usize == d) else {
            return Err(CudaError::Unsupported(format!(
                "head dim {head_dim} on the tensor cores (32, 64 or 128)"
            )));
        };
        if kv_heads == 0
            || !heads.is_multiple_of(kv_heads)
            || heads / kv_heads > FLASH_MROWS
            || rows == 0
            || block_tokens == 0
        {
            return Err(CudaError::Unsupported(format!(
                "attention with {heads} heads over {kv_heads} kv heads, {rows} rows, \
                 {block_tokens}-token pages"
            )));
        }
        let policy = self.attention_policy;
        let group = heads / kv_heads;
        let per = FLASH_MROWS / group;
        let xblocks = rows.div_ceil(per);
        let kend = start as u64 + rows as u64;
        let nspans = kend.div_ceil(policy.span as u64);
        let nspans = u32::try_from(nspans)
            .map_err(|_| CudaError::Unsupported(format!("{kend} positions")))?;
        let part_bytes =
            rows as usize * heads as usize * nspans as usize * (head_dim as usize + 2) * 4;
        let wants_split = match policy.split_rows {
            Some(n) => rows <= n,
            None => xblocks.saturating_mul(kv_heads) < self.info.multiprocessors,
        };
        let split = nspans > 1 && wants_split && part_bytes <= FLASH_SCRATCH_MAX;
        self.bind()?;
        let mut scratch = self
            .attention_scratch
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let part = if split {
            if scratch.as_ref().is_none_or(|m| m.bytes() < part_bytes) {
                // Earlier launches may still use the old buffer.
                self.synchronize()?;
                *scratch = None;
                *scratch = Some(self.alloc(part_bytes.next_multiple_of(1 << 20))?);
            }
            scratch.as_ref().map_or(0, |m| m.ptr())
        } else {
            0
        };
        let scale_log2 = scale * std::f32::consts::LOG2_E;
        let span = policy.span;
        let split_flag = u32::from(split);
        let (f, stages) = if policy.two_stages {
            (&typed.attention_flash2[i], 2)
        } else {
            (&typed.attention_flash[i], 1)
        };
        let mut l = self.stream.launch_builder(f);
        l.arg(&q)
            .arg(&q_stride)
            .arg(&pool)
            .arg(&pages)
            .arg(&page_elems)
            .arg(&layer)
            .arg(&block_tokens)
            .arg(&kv_heads)
            .arg(&group)
            .arg(&rows)
            .arg(&start)
            .arg(&scale_log2)
            .arg(&span)
            .arg(&split_flag)
            .arg(&nspans)
            .arg(&part)
            .arg(&out)
            .arg(&out_stride);
        let cfg = LaunchConfig {
            grid_dim: (xblocks, kv_heads, if split { nspans } else { 1 }),
            block_dim: (FLASH_THREADS, 1, 1),
            shared_mem_bytes: flash_smem(head_dim, stages),
        };
        // SAFETY: the caller's contract; `part` holds the partials of
        // rows x heads x nspans.
        Self::launched(unsafe { l.launch(cfg) })?;
        if split {
            let mut l = self.stream.launch_builder(&typed.attention_combine);
            l.arg(&part)
                .arg(&rows)
                .arg(&heads)
                .arg(&head_dim)
                .arg(&start)
                .arg(&span)
                .arg(&nspans)
                .arg(&out)
                .arg(&out_stride);
            let cfg = LaunchConfig {
                grid_dim: (rows, heads, 1),
                block_dim: (head_dim, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: as above; the flash launch wrote every partial read.
            Self::launched(unsafe { l.launch(cfg) })?;
        }
        Ok(())
    }

    /// `kvs_top_k`: the `k` largest of `n` f32 values at `x` into `index` (u32)
    /// and `value` (f32), `k` each.
    ///
    /// # Safety
    /// As [`CudaDevice::embed`].
    pub unsafe fn top_k(
        &self,
        x: u64,
        n: u32,
        k: u32,
        index: u64,
        value: u64,
    ) -> Result<(), CudaError> {
        self.bind()?;
        let mut l = self.stream.launch_builder(&self.top_k);
        l.arg(&x).arg(&n).arg(&k).arg(&index).arg(&value);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the caller's contract.
        Self::launched(unsafe { l.launch(cfg) })
    }

    /// `y = x · wᵀ` (or `y += x · wᵀ` with `accumulate`): `x` `[rows][inp]` and
    /// `w` `[out][inp]` 16-bit row-major, `y` `[rows][out]` f32; cuBLAS with f32
    /// accumulation (tensor cores).
    ///
    /// # Safety
    /// Every address holds its matrix.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm(
        &self,
        s: Storage,
        x: u64,
        w: u64,
        y: u64,
        rows: usize,
        inp: usize,
        out: usize,
        accumulate: bool,
    ) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        let dim = |v: usize| {
            i32::try_from(v).map_err(|_| CudaError::Unsupported(format!("matrix dimension {v}")))
        };
        let (m, n, k) = (dim(out)?, dim(rows)?, dim(inp)?);
        self.bind()?;
        let dtype = match s {
            Storage::Bf16 => blas_sys::cudaDataType::CUDA_R_16BF,
            Storage::F16 => blas_sys::cudaDataType::CUDA_R_16F,
        };
        let alpha = 1.0f32;
        let beta = if accumulate { 1.0f32 } else { 0.0 };
        // Column-major view: yᵀ [out][rows] = (wᵀ)ᵀ [out][inp] · xᵀ [inp][rows].
        // SAFETY: the caller's contract; alpha/beta are host scalars read
        // during the call.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                m,
                n,
                k,
                (&alpha as *const f32).cast(),
                w as *const std::ffi::c_void,
                dtype,
                k,
                x as *const std::ffi::c_void,
                dtype,
                k,
                (&beta as *const f32).cast(),
                y as *mut std::ffi::c_void,
                blas_sys::cudaDataType::CUDA_R_32F,
                m,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(cublas("cublasGemmEx"))
    }
}

#[cfg(test)]
mod tests {
    use super::stream_priority_wanted;

    #[test]
    fn stream_priorities_are_on_unless_switched_off() {
        assert!(stream_priority_wanted(None));
        assert!(stream_priority_wanted(Some("on")));
        assert!(stream_priority_wanted(Some("1")));
        for off in ["off", "OFF", " 0", "false", "no"] {
            assert!(!stream_priority_wanted(Some(off)), "{off}");
        }
    }
}
