//! KV regions: an engine's paged KV memory, registered with the daemon on the
//! region socket so that `BatchPut` / `BatchGet` can name page ids in it
//! (`KvPages`) instead of carrying payloads. The daemon gathers a block's pages
//! into its layer-major layout (puts) and scatters found blocks into pages
//! (gets) with the kernels of `kvstrata-kernels` (see [`io`]).
//!
//! Two kinds of region (docs/protocol.md, "CUDA IPC regions"):
//!
//! 1. **CUDA IPC**: the 64-byte `cuIpcGetMemHandle` handle of the engine's
//!    `cuMemAlloc` buffer and its device ordinal; the daemon opens it on that
//!    GPU (`cuIpcOpenMemHandle`), so gathers and scatters run on the device.
//! 2. **memfd**: host memory passed with `SCM_RIGHTS`; the daemon maps it and
//!    runs the same gather/scatter logic on the CPU backend. It is the CPU
//!    fallback that CI tests, and it works without a GPU.
//!
//! The wire format ([`kvstrata_types::wire::kv_region`]) is a fixed 144-byte
//! little-endian header (128 bytes in version 2, without the page and K/V
//! strides) and a name ([`parse_preamble`]); the daemon answers a
//! status, a message and a 64-bit region id ([`encode_reply`]) and keeps the
//! connection open. Region ids are unique to one run of the daemon (a random
//! base plus a counter, [`crate::shm::pool::IdSequence`]), so an engine that kept
//! its id across a daemon restart names no region of the new run and its
//! requests are refused ([`RegionLookupError::Unknown`]). When the engine
//! closes it (or dies), the region leaves the [`RegionRegistry`] at once —
//! later requests naming it fail — and is unmapped once the last request still
//! copying from or into it is done (each request holds an `Arc`). A refused
//! registration closes the connection; every fd received is closed with it.

pub mod calls;
pub mod io;

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kvstrata_kernels::{
    Backend, DeviceBuffer, Gpu, GpuError, GpuStream, IpcEvent, IpcHandle, PagedGeometry,
};
use kvstrata_types::InvalidField;
use kvstrata_types::wire::kv_region as wire;
use memmap2::MmapRaw;
use parking_lot::RwLock;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::shm::pool::{IdSequence, IdSpace};
use crate::transport::registration::{self, PREAMBLE_TIMEOUT, Parsed, peer_pid};
pub use calls::{CallHandler, RegionCalls};

/// The preamble's constants, the parsed preamble, the refusal codes and the
/// reply encoder, defined in [`kvstrata_types::wire::kv_region`].
pub use kvstrata_types::wire::kv_region::{
    HEADER_BYTES, KIND_CUDA_IPC, KIND_MEMFD, PreambleParse, RefuseReason, RegionPreamble,
    encode_reply,
};

/// More fds than this attached to a preamble are refused.
const MAX_FDS_RECEIVED: usize = 16;

/// A refused registration: the reason and a message naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub reason: RefuseReason,
    pub message: String,
}

impl Refusal {
    fn new(reason: RefuseReason, message: impl Into<String>) -> Self {
        Refusal {
            reason,
            message: message.into(),
        }
    }

    fn preamble(message: impl Into<String>) -> Self {
        Refusal::new(RefuseReason::Preamble, message)
    }
}

/// A preamble [`wire::parse_preamble`] refused: [`RefuseReason::Geometry`]
/// for the layout, [`RefuseReason::Preamble`] for every other field.
impl From<InvalidField> for Refusal {
    fn from(e: InvalidField) -> Self {
        Refusal::new(RefuseReason::of_preamble_field(&e), e.to_string())
    }
}

/// Parses a registration preamble received so far
/// ([`kvstrata_types::wire::kv_region::parse_preamble`]), its refusal
/// classified for the reply.
pub fn parse_preamble(buf: &[u8]) -> Result<PreambleParse, Refusal> {
    wire::parse_preamble(buf).map_err(Refusal::from)
}

/// Where a region's bytes live in the daemon.
enum Memory {
    /// A mapped memfd: the "device address" is the host address (CPU backend).
    Host {
        map: MmapRaw,
        file: File,
        sealed: bool,
    },
    /// An opened CUDA IPC handle (unmapped on drop).
    Device(DeviceBuffer),
}

/// One registered region. Requests hold an `Arc`; the memory is unmapped
/// when the registry and every request have let go.
pub struct KvRegion {
    id: u64,
    name: String,
    kind: u16,
    device: u32,
    bytes: u64,
    geometry: PagedGeometry,
    memory: Memory,
    /// The device the gathers and scatters run on (the CPU backend for memfd).
    gpu: Gpu,
    /// Operations on this region run in order on this stream.
    stream: GpuStream,
    /// The event a client answered before its copies complete waits on
    /// (CUDA regions; made at registration, `None` on the CPU backend or if
    /// that failed).
    ready_event: Option<IpcEvent>,
    gathered: AtomicU64,
    scattered: AtomicU64,
}

/// The interprocess event of a region on `gpu` (none on the CPU backend,
/// whose copies complete as they are queued). A failure is logged: gets
/// into the region are then answered after their copies.
fn ready_event_for(gpu: &Gpu, name: &str) -> Option<IpcEvent> {
    if gpu.backend() == Backend::Cpu {
        return None;
    }
    gpu.ipc_event()
        .inspect_err(|e| {
            tracing::warn!(region = name, error = %e, "KV region: no CUDA IPC event for answers before the copies complete; gets into it are answered after their copies");
        })
        .ok()
}

impl std::fmt::Debug for KvRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvRegion")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("kind", &self.kind_name())
            .field("bytes", &self.bytes)
            .field("geometry", &self.geometry)
            .finish()
    }
}

/// Why a request's KV pages cannot be used (answered per item, as for pools).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionLookupError {
    #[error(
        "KV region {0} is not registered with this daemon (never, its connection closed, or an id \
         from before a daemon restart: register the region again)"
    )]
    Unknown(u64),
    #[error("KV region {0} was truncated by its client (regions must not shrink)")]
    Shrunk(u64),
}

impl KvRegion {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn geometry(&self) -> &PagedGeometry {
        &self.geometry
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn device(&self) -> u32 {
        self.device
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    pub fn stream(&self) -> &GpuStream {
        &self.stream
    }

    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            KIND_CUDA_IPC => "cuda-ipc",
            _ => "memfd",
        }
    }

    /// The device address of the region's first byte (the host address for
    /// a memfd region), after checking that the memory is still all there.
    pub fn base(&self) -> Result<u64, RegionLookupError> {
        match &self.memory {
            Memory::Device(b) => Ok(b.ptr()),
            Memory::Host { map, file, sealed } => {
                // An unsealed file may have been truncated under the mapping;
                // touching a page past its end would fault the daemon.
                if !*sealed && !file.metadata().is_ok_and(|m| m.len() >= self.bytes) {
                    return Err(RegionLookupError::Shrunk(self.id));
                }
                Ok(map.as_mut_ptr() as u64)
            }
        }
    }

    /// Marks the end of what is queued on the region's stream so far for a
    /// client answered before its copies complete: `Ok(Some(handle))`, the
    /// CUDA IPC handle of the region's event, recorded now, that the client
    /// waits on; `Ok(None)`, nothing to wait for (the CPU backend's copies
    /// complete as they are queued). `Err`: no event (it could not be made
    /// or recorded): answer after the copies instead.
    pub fn record_ready(&self) -> Result<Option<[u8; 64]>, GpuError> {
        if self.gpu.backend() == Backend::Cpu {
            return Ok(None);
        }
        let event = self.ready_event.as_ref().ok_or(GpuError::Unsupported {
            what: "a CUDA IPC event for this region",
        })?;
        self.stream.record_ipc(event)?;
        Ok(Some(*event.handle()))
    }

    pub fn count_gathered(&self, bytes: u64) {
        self.gathered.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn count_scattered(&self, bytes: u64) {
        self.scattered.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn info(&self) -> RegionInfo {
        RegionInfo {
            id: self.id,
            name: self.name.clone(),
            kind: self.kind_name(),
            device: self.device,
            bytes: self.bytes,
            geometry: self.geometry,
            gathered: self.gathered.load(Ordering::Relaxed),
            scattered: self.scattered.load(Ordering::Relaxed),
        }
    }
}

/// A region as `Stats` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionInfo {
    pub id: u64,
    pub name: String,
    pub kind: &'static str,
    pub device: u32,
    pub bytes: u64,
    pub geometry: PagedGeometry,
    pub gathered: u64,
    pub scattered: u64,
}

/// Limits of the registry.
#[derive(Debug, Clone, Copy)]
pub struct RegionLimits {
    /// Most regions registered at once.
    pub max_regions: usize,
    /// Largest region accepted, in bytes.
    pub max_region_bytes: u64,
}

/// The GPUs the daemon found at start-up (empty: none, and `status` says why).
#[derive(Debug, Clone, Default)]
pub struct GpuSet {
    pub devices: Vec<Gpu>,
    /// Without GPUs, why; empty with GPUs.
    pub status: String,
    /// `gpu.hbm_bytes`: the HBM tier bytes per device.
    pub hbm_bytes: u64,
}

impl GpuSet {
    /// The device of CUDA ordinal `ordinal`, if the daemon uses it.
    pub fn device(&self, ordinal: u32) -> Option<&Gpu> {
        self.devices
            .iter()
            .find(|g| g.info().ordinal == ordinal as usize)
    }
}

/// Counters of the registry, for `Stats` and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionStats {
    pub regions: u32,
    pub bytes: u64,
    pub registered: u64,
    pub unregistered: u64,
    /// Refusals by reason label.
    pub refused: Vec<(&'static str, u64)>,
    /// Bytes gathered out of / scattered into regions, over all regions ever.
    pub gathered: u64,
    pub scattered: u64,
    /// Lookups of an id that names no registered region (a closed region, or
    /// a stale id from before a daemon restart).
    pub unknown_ids: u64,
    /// Gets into pages answered before their copies completed.
    pub answered_before_copies: u64,
    /// Of those, gets whose copies then failed (logged as errors): the
    /// client was told its pages would be written (a device fault).
    pub failed_after_answer: u64,
}

/// Every registered region, by id. Ids are 64-bit and unique to this run of
/// the daemon ([`IdSequence`]; never two live regions with one id).
#[derive(Debug)]
pub struct RegionRegistry {
    limits: RegionLimits,
    gpus: Arc<GpuSet>,
    /// The backend of memfd regions.
    cpu: Gpu,
    ids: IdSequence,
    regions: RwLock<HashMap<u64, Arc<KvRegion>>>,
    registered: AtomicU64,
    unregistered: AtomicU64,
    refused: [AtomicU64; RefuseReason::ALL.len()],
    gathered: AtomicU64,
    scattered: AtomicU64,
    unknown_ids: AtomicU64,
    answered_before_copies: AtomicU64,
    failed_after_answer: AtomicU64,
}

impl RegionRegistry {
    /// A registry whose ids start at a random point.
    pub fn new(limits: RegionLimits, gpus: Arc<GpuSet>) -> Self {
        RegionRegistry::with_ids(limits, gpus, IdSequence::random(IdSpace::Wide))
    }

    /// A registry with the given id sequence (tests pin it).
    pub fn with_ids(limits: RegionLimits, gpus: Arc<GpuSet>, ids: IdSequence) -> Self {
        RegionRegistry {
            limits,
            gpus,
            cpu: Gpu::cpu(),
            ids,
            regions: RwLock::new(HashMap::new()),
            registered: AtomicU64::new(0),
            unregistered: AtomicU64::new(0),
            refused: Default::default(),
            gathered: AtomicU64::new(0),
            scattered: AtomicU64::new(0),
            unknown_ids: AtomicU64::new(0),
            answered_before_copies: AtomicU64::new(0),
            failed_after_answer: AtomicU64::new(0),
        }
    }

    pub fn gpus(&self) -> &Arc<GpuSet> {
        &self.gpus
    }

    /// Counts a refusal.
    pub fn count_refused(&self, reason: RefuseReason) {
        if let Some(i) = RefuseReason::ALL.iter().position(|r| *r == reason) {
            self.refused[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a get answered before its copies completed, and whether they
    /// then failed.
    pub fn count_answered_before_copies(&self, failed_after: bool) {
        self.answered_before_copies.fetch_add(1, Ordering::Relaxed);
        if failed_after {
            self.failed_after_answer.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts bytes moved by a request (totals over every region).
    pub fn count_moved(&self, gathered: u64, scattered: u64) {
        self.gathered.fetch_add(gathered, Ordering::Relaxed);
        self.scattered.fetch_add(scattered, Ordering::Relaxed);
    }

    /// Validates, maps and registers a region. `fd` is the memfd of a kind-2
    /// region (none for kind 1); it is closed on refusal.
    pub fn register(
        &self,
        preamble: RegionPreamble,
        fd: Option<OwnedFd>,
    ) -> Result<Arc<KvRegion>, Refusal> {
        let r = self.try_register(preamble, fd);
        match &r {
            Ok(_) => {
                self.registered.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self.count_refused(e.reason),
        }
        r
    }

    fn try_register(
        &self,
        p: RegionPreamble,
        fd: Option<OwnedFd>,
    ) -> Result<Arc<KvRegion>, Refusal> {
        let geometry_err = |m: String| Refusal::new(RefuseReason::Geometry, m);
        p.geometry
            .validate()
            .map_err(|e| geometry_err(format!("{}: {}", e.field, e.reason)))?;
        let need = p.geometry.region_bytes();
        if need > p.bytes {
            return Err(geometry_err(format!(
                "bytes: {} announced, but the geometry's pages end at byte {need}",
                p.bytes
            )));
        }
        if p.bytes > self.limits.max_region_bytes {
            return Err(Refusal::new(
                RefuseReason::Limit,
                format!(
                    "bytes: {} is more than the limit of {} (gpu.max_region_bytes)",
                    p.bytes, self.limits.max_region_bytes
                ),
            ));
        }
        let count = self.regions.read().len();
        if count >= self.limits.max_regions {
            return Err(Refusal::new(
                RefuseReason::Limit,
                format!("{count} KV regions are registered already, the limit (gpu.max_regions)"),
            ));
        }
        let bytes = usize::try_from(p.bytes)
            .map_err(|_| geometry_err(format!("bytes: {} does not fit in memory", p.bytes)))?;
        let (memory, gpu) = match p.kind {
            KIND_CUDA_IPC => {
                if fd.is_some() {
                    return Err(Refusal::preamble(
                        "fds: a CUDA IPC registration (kind 1) carries no file descriptor",
                    ));
                }
                let Some(gpu) = self.gpus.device(p.device) else {
                    let why = if self.gpus.devices.is_empty() {
                        format!("the daemon has no GPU ({})", self.gpus.status)
                    } else {
                        let ords: Vec<usize> =
                            self.gpus.devices.iter().map(|g| g.info().ordinal).collect();
                        format!("the daemon uses devices {ords:?} (gpu.devices)")
                    };
                    return Err(Refusal::new(
                        RefuseReason::NoGpu,
                        format!("device: CUDA device {} is not available: {why}", p.device),
                    ));
                };
                let buffer = gpu.open_ipc(&IpcHandle(p.handle), bytes).map_err(|e| {
                    Refusal::new(
                        RefuseReason::Map,
                        format!(
                            "handle: cannot open the CUDA IPC handle on device {}: {e}",
                            p.device
                        ),
                    )
                })?;
                (Memory::Device(buffer), gpu.clone())
            }
            _ => {
                let Some(fd) = fd else {
                    return Err(Refusal::preamble(
                        "fds: a memfd registration (kind 2) needs exactly one file descriptor (SCM_RIGHTS)",
                    ));
                };
                (map_memfd(fd, p.bytes)?, self.cpu.clone())
            }
        };
        let stream = gpu
            .stream()
            .map_err(|e| Refusal::new(RefuseReason::Map, format!("cannot create a stream: {e}")))?;
        // Made now rather than on the first get that asks to be answered
        // before its copies: on an H100 that first get took about 0.25 ms
        // longer to be answered.
        let ready_event = ready_event_for(&gpu, &p.name);
        let mut regions = self.regions.write();
        // Checked again under the lock: two registrations may race.
        if regions.len() >= self.limits.max_regions {
            return Err(Refusal::new(
                RefuseReason::Limit,
                format!(
                    "{} KV regions are registered already, the limit (gpu.max_regions)",
                    regions.len()
                ),
            ));
        }
        // Skips an id still in use (possible only once the counter wrapped).
        let id = loop {
            let id = self.ids.next_id();
            if !regions.contains_key(&id) {
                break id;
            }
        };
        let region = Arc::new(KvRegion {
            id,
            name: p.name,
            kind: p.kind,
            device: if p.kind == KIND_CUDA_IPC { p.device } else { 0 },
            bytes: p.bytes,
            geometry: p.geometry,
            memory,
            gpu,
            stream,
            ready_event,
            gathered: AtomicU64::new(0),
            scattered: AtomicU64::new(0),
        });
        regions.insert(id, Arc::clone(&region));
        Ok(region)
    }

    /// Removes a region; it is unmapped when the last request using it is done.
    pub fn unregister(&self, id: u64) -> bool {
        let removed = self.regions.write().remove(&id).is_some();
        if removed {
            self.unregistered.fetch_add(1, Ordering::Relaxed);
        }
        removed
    }

    /// The region registered under `id`. An unknown id is counted
    /// ([`RegionStats::unknown_ids`]).
    pub fn get(&self, id: u64) -> Result<Arc<KvRegion>, RegionLookupError> {
        let found = self.regions.read().get(&id).cloned();
        found.ok_or_else(|| {
            self.unknown_ids.fetch_add(1, Ordering::Relaxed);
            RegionLookupError::Unknown(id)
        })
    }

    /// The regions registered now, by id.
    pub fn list(&self) -> Vec<RegionInfo> {
        let mut v: Vec<RegionInfo> = self.regions.read().values().map(|r| r.info()).collect();
        v.sort_by_key(|r| r.id);
        v
    }

    pub fn stats(&self) -> RegionStats {
        let regions = self.regions.read();
        RegionStats {
            regions: regions.len() as u32,
            bytes: regions.values().map(|r| r.bytes).sum(),
            registered: self.registered.load(Ordering::Relaxed),
            unregistered: self.unregistered.load(Ordering::Relaxed),
            refused: RefuseReason::ALL
                .iter()
                .zip(&self.refused)
                .map(|(r, c)| (r.label(), c.load(Ordering::Relaxed)))
                .collect(),
            gathered: self.gathered.load(Ordering::Relaxed),
            scattered: self.scattered.load(Ordering::Relaxed),
            unknown_ids: self.unknown_ids.load(Ordering::Relaxed),
            answered_before_copies: self.answered_before_copies.load(Ordering::Relaxed),
            failed_after_answer: self.failed_after_answer.load(Ordering::Relaxed),
        }
    }
}

/// Maps a memfd of at least `bytes` bytes read-write, sealing it against
/// shrinking where the client allowed sealing.
fn map_memfd(fd: OwnedFd, bytes: u64) -> Result<Memory, Refusal> {
    let map_err = |m: String| Refusal::new(RefuseReason::Map, m);
    let file = File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| map_err(format!("fds: cannot stat the file descriptor: {e}")))?;
    if !meta.file_type().is_file() {
        return Err(map_err(
            "fds: the file descriptor is not a regular file or memfd".into(),
        ));
    }
    if meta.len() < bytes {
        return Err(map_err(format!(
            "bytes: {bytes} announced, but the memfd has only {} bytes",
            meta.len()
        )));
    }
    // SAFETY: fcntl on a valid fd with integer arguments.
    let sealed =
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } == 0;
    let map = memmap2::MmapOptions::new()
        .len(bytes.max(1) as usize)
        .map_raw(&file)
        .map_err(|e| map_err(format!("fds: cannot map the memfd read-write: {e}")))?;
    Ok(Memory::Host { map, file, sealed })
}

/// Accepts registrations until `shutdown`, one task per connection; peers
/// whose uid `auth` does not allow are closed at once.
/// With `calls`, each registered region's connection then serves region
/// calls ([`calls`]); without, bytes sent after the reply are ignored.
pub async fn serve(
    listener: UnixListener,
    registry: Arc<RegionRegistry>,
    shutdown: CancellationToken,
    auth: Option<Arc<crate::auth::Auth>>,
    calls: Option<RegionCalls>,
) -> std::io::Result<()> {
    let denied = Arc::clone(&registry);
    let token = shutdown.clone();
    registration::serve(
        listener,
        shutdown,
        auth,
        "kv-region",
        move || denied.count_refused(RefuseReason::Uid),
        move |stream| handle(stream, Arc::clone(&registry), token.clone(), calls.clone()),
    )
    .await
}

async fn handle(
    mut stream: UnixStream,
    registry: Arc<RegionRegistry>,
    shutdown: CancellationToken,
    calls: Option<RegionCalls>,
) {
    let peer = peer_pid(&stream);
    let refuse = |reason: RefuseReason, message: String| Refusal { reason, message };
    let (preamble, fd) = match read_preamble(&stream).await {
        Ok(v) => v,
        Err(ReadError::Closed(n)) => {
            registry.count_refused(RefuseReason::Preamble);
            tracing::warn!(
                peer_pid = peer,
                "region socket: connection closed after {n} bytes of the preamble; nothing registered"
            );
            return;
        }
        Err(ReadError::Refused(r)) => {
            registry.count_refused(r.reason);
            reply_refusal(&mut stream, peer, &r).await;
            return;
        }
    };
    let name = preamble.name.clone();
    // Opening a CUDA IPC handle and mapping can take a while: off the executor.
    let reg = Arc::clone(&registry);
    let registered = tokio::task::spawn_blocking(move || reg.register(preamble, fd)).await;
    let region = match registered {
        Ok(Ok(r)) => r,
        Ok(Err(r)) => {
            reply_refusal(&mut stream, peer, &r).await;
            return;
        }
        Err(e) => {
            let r = refuse(RefuseReason::Map, format!("registration task failed: {e}"));
            registry.count_refused(r.reason);
            reply_refusal(&mut stream, peer, &r).await;
            return;
        }
    };
    let id = region.id();
    let info = region.info();
    drop(region);
    if let Err(e) = stream.write_all(&encode_reply(0, id, "")).await {
        registry.unregister(id);
        tracing::warn!(peer_pid = peer, region_id = id, error = %e, "region socket: cannot answer the region id; region dropped");
        return;
    }
    tracing::info!(
        peer_pid = peer,
        region_id = id,
        region_name = %name,
        kind = info.kind,
        device = info.device,
        bytes = info.bytes,
        layout = info.geometry.layout.name(),
        num_pages = info.geometry.num_pages,
        "KV region registered"
    );
    match calls {
        Some(calls) => serve_calls(stream, calls, id, &shutdown).await,
        None => registration::hold_until_closed(&mut stream, &shutdown, "region socket", id).await,
    }
    registry.unregister(id);
    tracing::info!(region_id = id, region_name = %name, "KV region unregistered (connection closed)");
}

/// Serves region `id`'s calls on a thread of its own until the engine closes
/// the connection or the daemon shuts down (the connection is then shut down
/// under the thread, which ends after the call it may be running).
async fn serve_calls(
    stream: UnixStream,
    calls: RegionCalls,
    id: u64,
    shutdown: &CancellationToken,
) {
    let stream = match stream.into_std().and_then(|s| {
        s.set_nonblocking(false)?;
        Ok(s)
    }) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(region_id = id, error = %e, "region socket: cannot serve calls; connection closed");
            return;
        }
    };
    let closer = match stream.try_clone() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(region_id = id, error = %e, "region socket: cannot serve calls; connection closed");
            return;
        }
    };
    // Dropped when the thread ends, however it ends.
    let (ended, thread_ended) = tokio::sync::oneshot::channel::<()>();
    // The calls run where the blocking pool's work runs: outside the
    // executor, with the runtime's handle (tiers may spawn or block on it).
    let runtime = tokio::runtime::Handle::current();
    let spawned = std::thread::Builder::new()
        .name(format!("kvs-region-{id}"))
        .spawn(move || {
            let _ended = ended;
            let _runtime = runtime.enter();
            calls::serve(&stream, &calls, id);
        });
    if let Err(e) = spawned {
        tracing::warn!(region_id = id, error = %e, "region socket: no thread for calls; connection closed");
        return;
    }
    tokio::pin!(thread_ended);
    tokio::select! {
        _ = &mut thread_ended => {}
        _ = shutdown.cancelled() => {
            let _ = closer.shutdown(std::net::Shutdown::Both);
            let _ = thread_ended.await;
        }
    }
}

async fn reply_refusal(stream: &mut UnixStream, peer: Option<i32>, r: &Refusal) {
    tracing::warn!(peer_pid = peer, reason = r.reason.label(), error = %r.message, "region socket: registration refused");
    let _ = stream
        .write_all(&encode_reply(r.reason.code(), 0, &r.message))
        .await;
    let _ = stream.shutdown().await;
}

enum ReadError {
    /// The peer hung up mid-preamble after this many bytes.
    Closed(usize),
    Refused(Refusal),
}

/// Reads the preamble and the fd sent with it, if any (within
/// [`PREAMBLE_TIMEOUT`]; fds are closed on refusal).
async fn read_preamble(
    stream: &UnixStream,
) -> Result<(RegionPreamble, Option<OwnedFd>), ReadError> {
    let received = registration::read_preamble(stream, HEADER_BYTES, MAX_FDS_RECEIVED, |buf| {
        Ok(match parse_preamble(buf)? {
            PreambleParse::Need(n) => Parsed::Need(n),
            PreambleParse::Complete(p) => Parsed::Complete(p),
        })
    })
    .await;
    let refused = |message: String| ReadError::Refused(Refusal::preamble(message));
    let mut received = match received {
        Ok(r) => r,
        Err(registration::ReadError::Closed(n)) => return Err(ReadError::Closed(n)),
        Err(registration::ReadError::TooManyFds) => {
            return Err(refused("fds: too many file descriptors attached".into()));
        }
        Err(registration::ReadError::Invalid(r)) => return Err(ReadError::Refused(r)),
        Err(registration::ReadError::Timeout) => {
            return Err(refused(format!(
                "no complete preamble within {}s",
                PREAMBLE_TIMEOUT.as_secs()
            )));
        }
        Err(registration::ReadError::Io(e)) => return Err(refused(format!("socket: {e}"))),
    };
    if received.fds.len() > 1 {
        return Err(refused(format!(
            "fds: {} file descriptors attached (at most one)",
            received.fds.len()
        )));
    }
    Ok((*received.preamble, received.fds.pop()))
}

#[cfg(test)]
mod tests {
    use super::*;

    use kvstrata_kernels::PageLayout;

    pub(crate) fn header(kind: u16, bytes: u64, g: &PagedGeometry, name: &str) -> Vec<u8> {
        wire::encode_preamble(kind, 0, bytes, &[0; 64], g, name)
    }

    fn geometry() -> PagedGeometry {
        PagedGeometry::packed(PageLayout::CrossLayer, 3, 4, 2, 8, 2, 10)
    }

    #[test]
    fn preambles_parse_step_by_step_and_name_bad_fields() {
        let g = geometry();
        let b = header(KIND_MEMFD, g.region_bytes(), &g, "engine-0");
        assert_eq!(
            parse_preamble(&b[..3]),
            Ok(PreambleParse::Need(HEADER_BYTES))
        );
        assert_eq!(
            parse_preamble(&b[..HEADER_BYTES]),
            Ok(PreambleParse::Need(wire::HEADER_BYTES_V3))
        );
        assert_eq!(
            parse_preamble(&b[..wire::HEADER_BYTES_V3]),
            Ok(PreambleParse::Need(wire::HEADER_BYTES_V3 + 8))
        );
        let PreambleParse::Complete(p) = parse_preamble(&b).unwrap() else {
            panic!("complete")
        };
        assert_eq!(
            (p.kind, p.geometry, p.name.as_str()),
            (KIND_MEMFD, g, "engine-0")
        );
        let mut bad = b.clone();
        bad[0] = b'X';
        assert!(
            parse_preamble(&bad)
                .unwrap_err()
                .message
                .starts_with("magic")
        );
        let mut bad = b.clone();
        bad[8] = 9;
        assert!(
            parse_preamble(&bad)
                .unwrap_err()
                .message
                .starts_with("version")
        );
        let mut bad = b.clone();
        bad[10] = 3;
        assert!(
            parse_preamble(&bad)
                .unwrap_err()
                .message
                .starts_with("kind")
        );
        let mut bad = b.clone();
        bad[88] = 7;
        let e = parse_preamble(&bad).unwrap_err();
        assert!(e.message.starts_with("layout") && e.reason == RefuseReason::Geometry);
        let mut bad = b.clone();
        bad[116..120].copy_from_slice(&0u32.to_le_bytes());
        assert!(
            parse_preamble(&bad)
                .unwrap_err()
                .message
                .starts_with("name")
        );
        let reply = encode_reply(2, 0, "layers: must be at least 1");
        assert_eq!(&reply[..4], &2u32.to_le_bytes());
        assert_eq!(reply.len(), 12 + 26);
        let mut v1 = b.clone();
        v1[8] = 1;
        let e = parse_preamble(&v1).unwrap_err();
        assert!(
            e.message.starts_with("version: 1 is not supported")
                && e.reason == RefuseReason::Preamble,
            "{e}"
        );
    }

    #[test]
    fn registry_validates_maps_and_unregisters() {
        use std::io::Write;
        let reg = RegionRegistry::with_ids(
            RegionLimits {
                max_regions: 1,
                max_region_bytes: 1 << 20,
            },
            Arc::new(GpuSet::default()),
            IdSequence::with_base(IdSpace::Wide, 41),
        );
        let g = geometry();
        let memfd = |len: usize| {
            let mut f = tempfile::tempfile().unwrap();
            f.write_all(&vec![1u8; len]).unwrap();
            OwnedFd::from(f)
        };
        let p = |bytes: u64, g: PagedGeometry| RegionPreamble {
            kind: KIND_MEMFD,
            device: 0,
            bytes,
            handle: [0; 64],
            geometry: g,
            name: "r".into(),
        };
        let need = g.region_bytes();
        let e = reg
            .register(p(need - 1, g), Some(memfd(need as usize)))
            .unwrap_err();
        assert_eq!(e.reason, RefuseReason::Geometry);
        assert!(e.message.starts_with("bytes"), "{e}");
        let mut zero = g;
        zero.head_dim = 0;
        assert!(
            reg.register(p(need, zero), Some(memfd(64)))
                .unwrap_err()
                .message
                .starts_with("head_dim")
        );
        let e = reg
            .register(p(need, g), Some(memfd(need as usize - 1)))
            .unwrap_err();
        assert_eq!(e.reason, RefuseReason::Map);
        assert_eq!(
            reg.register(p(need, g), None).unwrap_err().reason,
            RefuseReason::Preamble
        );
        let mut ipc = p(need, g);
        ipc.kind = KIND_CUDA_IPC;
        assert_eq!(
            reg.register(ipc, None).unwrap_err().reason,
            RefuseReason::NoGpu
        );
        let r = reg
            .register(p(need, g), Some(memfd(need as usize)))
            .unwrap();
        let id = crate::shm::pool::MIN_WIDE_POOL_ID + 41;
        assert_eq!(r.id(), id);
        assert_eq!(
            reg.register(p(need, g), Some(memfd(need as usize)))
                .unwrap_err()
                .reason,
            RefuseReason::Limit
        );
        assert!(reg.unregister(id));
        assert_eq!(reg.get(id).unwrap_err(), RegionLookupError::Unknown(id));
        assert_eq!(reg.stats().unknown_ids, 1);
        // The request holding the Arc still reaches the memory.
        assert!(r.base().is_ok());
        let s = reg.stats();
        assert_eq!((s.regions, s.registered, s.unregistered), (0, 1, 1));
        assert_eq!(s.refused.iter().map(|(_, n)| n).sum::<u64>(), 6);
    }

    #[test]
    fn strided_geometries_register_only_without_overlaps() {
        use std::io::Write;
        let reg = RegionRegistry::with_ids(
            RegionLimits {
                max_regions: 4,
                max_region_bytes: 1 << 20,
            },
            Arc::new(GpuSet::default()),
            IdSequence::with_base(IdSpace::Wide, 7),
        );
        // vLLM's (2, num_pages, page_tokens, heads, dim) tensors.
        let mut g = PagedGeometry::packed(PageLayout::PerLayer, 3, 4, 2, 8, 2, 10);
        g.page_stride = g.chunk_bytes();
        g.kv_stride = 10 * g.chunk_bytes();
        let memfd = |len: u64| {
            let mut f = tempfile::tempfile().unwrap();
            f.write_all(&vec![1u8; len as usize]).unwrap();
            OwnedFd::from(f)
        };
        let p = |bytes: u64, g: PagedGeometry| RegionPreamble {
            kind: KIND_MEMFD,
            device: 0,
            bytes,
            handle: [0; 64],
            geometry: g,
            name: "vllm".into(),
        };
        let need = g.region_bytes();
        assert_eq!(need, 3 * 20 * g.chunk_bytes());
        let r = reg.register(p(need, g), Some(memfd(need))).unwrap();
        assert_eq!(r.geometry().effective_kv_stride(), 10 * g.chunk_bytes());
        // The announced bytes must cover the last layer's V half.
        let e = reg.register(p(need - 1, g), Some(memfd(need))).unwrap_err();
        assert_eq!(e.reason, RefuseReason::Geometry);
        assert!(e.message.starts_with("bytes"), "{e}");
        // V of page 0 on K of page 9: refused, naming the stride.
        let mut bad = g;
        bad.kv_stride = 9 * g.chunk_bytes();
        let e = reg.register(p(need, bad), Some(memfd(need))).unwrap_err();
        assert_eq!(e.reason, RefuseReason::Geometry);
        assert!(e.message.starts_with("kv_stride"), "{e}");
        // Through the wire: a version-3 preamble carries the strides, a
        // version-2 one parses as packed.
        let v3 = wire::encode_preamble(KIND_MEMFD, 0, need, &[0; 64], &g, "vllm");
        let PreambleParse::Complete(parsed) = parse_preamble(&v3).unwrap() else {
            panic!("complete")
        };
        assert_eq!(parsed.geometry, g);
        let v2 = wire::encode_preamble_v2(KIND_MEMFD, 0, need, &[0; 64], &g, "vllm");
        let PreambleParse::Complete(parsed) = parse_preamble(&v2).unwrap() else {
            panic!("complete")
        };
        assert_eq!(
            (parsed.geometry.page_stride, parsed.geometry.kv_stride),
            (0, 0)
        );
        let packed = reg.register(*parsed, Some(memfd(need))).unwrap();
        assert_eq!(packed.geometry().page_stride(), 2 * g.chunk_bytes());
    }
}
