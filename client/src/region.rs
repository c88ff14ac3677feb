//! [`KvRegion`]: an engine's paged KV memory registered with the daemon, so
//! that puts and gets can name page ids instead of carrying payloads
//! (`docs/protocol.md`, "CUDA IPC regions").
//!
//! An engine registers its KV cache once on the daemon's region socket
//! (`kvstrata serve --kv-region-socket PATH`), describing it with a
//! [`PagedGeometry`] (layout, layers, page_tokens, kv_heads, head_dim,
//! dtype_bytes, num_pages, layer_stride):
//!
//! - [`KvRegion::register_cuda_ipc`]: the 64-byte `cuIpcGetMemHandle` handle of
//!   a `cuMemAlloc` buffer and its device ordinal (the daemon opens it on that
//!   GPU and runs its gather/scatter kernels there);
//! - [`KvRegion::create_memfd`]: host memory (a sealed memfd passed with
//!   `SCM_RIGHTS`), the CPU path — it works without a GPU.
//!
//! The registration connection stays open for the life of the [`KvRegion`];
//! dropping it unregisters the region (later requests naming it get
//! `PutStatus::BadRegion` / `region_error`). [`Client::put_pages`] stores
//! blocks gathered from pages, [`Client::get_pages`] scatters found blocks
//! into pages. A block is `block_tokens / page_tokens` pages of the region,
//! listed in token order ([`KvRegion::pages`]).
//!
//! [`check_pages_round_trip`] runs a put-by-pages / get-by-pages round trip
//! on a registered region and checks every byte against the CPU references
//! of `kvstrata-kernels`; the GPU check calls it from an engine process
//! holding a real CUDA buffer.

use std::fs::File;
use std::io::{ErrorKind, IoSlice, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvstrata_kernels::{PageLayout, PagedGeometry};
use kvstrata_proto::v1 as proto;
use kvstrata_tiers::{Dtype, NamespaceSpec};
use memmap2::{MmapOptions, MmapRaw};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};

use crate::client::{Client, PutItem};
use crate::error::ClientError;
use crate::target::Target;

/// The first 8 bytes of a registration.
pub const REGION_MAGIC: [u8; 8] = *b"KVSREGN\0";
/// The preamble version this client speaks.
pub const REGION_VERSION: u16 = 1;
/// Bytes of the fixed part of the preamble (the name follows).
pub const REGION_HEADER_BYTES: usize = 128;
/// Longest region name the daemon accepts, in bytes.
pub const MAX_REGION_NAME_BYTES: usize = 240;
/// Kind 1: a CUDA IPC handle.
pub const KIND_CUDA_IPC: u16 = 1;
/// Kind 2: a memfd passed with `SCM_RIGHTS`.
pub const KIND_MEMFD: u16 = 2;
/// How long a registration waits for the daemon's answer.
pub const REGION_REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of KV-region registration and checks. Every variant displays on one line.
#[derive(Debug, thiserror::Error)]
pub enum KvRegionError {
    /// An argument is unusable; nothing was sent.
    #[error("KV region {name:?}: {reason}")]
    Invalid { name: String, reason: String },
    /// A system call failed.
    #[error("KV region {name:?}: cannot {what}: {source}")]
    Io {
        name: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The daemon refused the registration; `message` names the field.
    #[error("KV region {name:?}: the daemon refused the registration ({reason}): {message}")]
    Refused {
        name: String,
        /// The reply's status code (docs/protocol.md).
        status: u32,
        reason: &'static str,
        message: String,
    },
    /// The daemon closed the connection without answering (see its log).
    #[error("KV region {name:?}: the daemon closed the region socket {socket} without answering")]
    Closed { name: String, socket: String },
    #[error(transparent)]
    Client(#[from] ClientError),
    /// [`check_pages_round_trip`] found wrong bytes or a wrong answer.
    #[error("KV region check: {0}")]
    Check(String),
}

/// The label of a refusal status code (the daemon's `kvstrata_kv_regions_refused` reasons).
pub fn refusal_reason(status: u32) -> &'static str {
    match status {
        1 => "preamble",
        2 => "geometry",
        3 => "limit",
        4 => "map",
        5 => "no_gpu",
        6 => "uid",
        _ => "unknown",
    }
}

/// The registration preamble (docs/protocol.md, "CUDA IPC regions"): a
/// 128-byte little-endian header and the name.
pub fn encode_preamble(
    kind: u16,
    device: u32,
    bytes: u64,
    handle: &[u8; 64],
    geometry: &PagedGeometry,
    name: &str,
) -> Vec<u8> {
    let mut b = vec![0u8; REGION_HEADER_BYTES];
    b[..8].copy_from_slice(&REGION_MAGIC);
    b[8..10].copy_from_slice(&REGION_VERSION.to_le_bytes());
    b[10..12].copy_from_slice(&kind.to_le_bytes());
    b[12..16].copy_from_slice(&device.to_le_bytes());
    b[16..24].copy_from_slice(&bytes.to_le_bytes());
    b[24..88].copy_from_slice(handle);
    let layout: u32 = match geometry.layout {
        PageLayout::PerLayer => 1,
        PageLayout::CrossLayer => 2,
    };
    for (at, v) in [
        (88, layout),
        (92, geometry.layers),
        (96, geometry.page_tokens),
        (100, geometry.kv_heads),
        (104, geometry.head_dim),
        (108, geometry.dtype_bytes),
        (112, geometry.num_pages),
        (116, u32::try_from(name.len()).unwrap_or(u32::MAX)),
    ] {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    b[120..128].copy_from_slice(&geometry.layer_stride.to_le_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// Sends a preamble (with `fd` attached, if any) on a connected region socket
/// and reads the answer: the region id, or the daemon's refusal. Public so
/// that tests can send hand-made preambles.
pub fn register_raw(
    conn: &UnixStream,
    preamble: &[u8],
    fd: Option<&File>,
    name: &str,
    socket: &str,
) -> Result<u32, KvRegionError> {
    let io = |what: &str, source: std::io::Error| KvRegionError::Io {
        name: name.to_string(),
        what: format!("{what} (region socket {socket})"),
        source,
    };
    conn.set_read_timeout(Some(REGION_REGISTER_TIMEOUT))
        .and_then(|()| conn.set_write_timeout(Some(REGION_REGISTER_TIMEOUT)))
        .map_err(|e| io("set socket timeouts", e))?;
    let fds: Vec<i32> = fd.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs: Vec<ControlMessage> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&fds)]
    };
    let iov = [IoSlice::new(preamble)];
    let sent = loop {
        match sendmsg::<UnixAddr>(conn.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Err(Errno::EINTR) => continue,
            other => break other,
        }
    }
    .map_err(|e| io("send the registration", e.into()))?;
    if sent < preamble.len() {
        // The fd went with the first bytes; the rest follows as plain data.
        use std::io::Write;
        (&*conn)
            .write_all(&preamble[sent..])
            .map_err(|e| io("send the registration", e))?;
    }
    let closed = || KvRegionError::Closed {
        name: name.to_string(),
        socket: socket.to_string(),
    };
    let mut head = [0u8; 12];
    match (&*conn).read_exact(&mut head) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
            ) =>
        {
            return Err(closed());
        }
        Err(e) => return Err(io("read the daemon's answer", e)),
    }
    let word = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    let (status, id, len) = (word(0), word(4), word(8) as usize);
    let mut msg = vec![0u8; len.min(4096)];
    (&*conn)
        .read_exact(&mut msg)
        .map_err(|e| io("read the daemon's answer", e))?;
    let message = String::from_utf8_lossy(&msg).into_owned();
    if status != 0 {
        return Err(KvRegionError::Refused {
            name: name.to_string(),
            status,
            reason: refusal_reason(status),
            message,
        });
    }
    if id == 0 {
        return Err(KvRegionError::Check(format!(
            "region socket {socket} answered region id 0 for {name:?}"
        )));
    }
    Ok(id)
}

/// A KV region registered with the daemon. See the [module docs](self).
pub struct KvRegion {
    id: u32,
    name: String,
    geometry: PagedGeometry,
    bytes: u64,
    /// CUDA device ordinal for a CUDA IPC region.
    device: Option<u32>,
    /// The client's mapping of a memfd region.
    map: Option<MmapRaw>,
    /// The registration connection: open for as long as the region is registered.
    _conn: UnixStream,
}

impl std::fmt::Debug for KvRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvRegion")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("bytes", &self.bytes)
            .field("device", &self.device)
            .field("geometry", &self.geometry)
            .finish()
    }
}

fn check_name(name: &str) -> Result<(), KvRegionError> {
    if name.is_empty() || name.len() > MAX_REGION_NAME_BYTES || name.contains('\0') {
        return Err(KvRegionError::Invalid {
            name: name.to_string(),
            reason: format!("the name must be 1 to {MAX_REGION_NAME_BYTES} bytes without NUL"),
        });
    }
    Ok(())
}

fn connect(socket: &str, name: &str) -> Result<(UnixStream, String), KvRegionError> {
    let path = match Target::parse(socket)? {
        Target::Unix(path) => path,
        Target::Http(_) => {
            return Err(KvRegionError::Invalid {
                name: name.to_string(),
                reason: format!(
                    "the region socket {socket:?} is not a Unix socket path (use unix:///path or /path)"
                ),
            });
        }
    };
    let shown = path.display().to_string();
    let conn = UnixStream::connect(&path).map_err(|source| KvRegionError::Io {
        name: name.to_string(),
        what: format!("connect to the region socket {shown}"),
        source,
    })?;
    Ok((conn, shown))
}

impl KvRegion {
    /// Creates a memfd of `geometry.region_bytes()` bytes (zeroed), maps it,
    /// and registers it on the daemon's region socket (`unix:///path` or
    /// `/path`). Host memory: the daemon's CPU path, no GPU needed.
    pub fn create_memfd(
        socket: &str,
        name: &str,
        geometry: PagedGeometry,
    ) -> Result<KvRegion, KvRegionError> {
        check_name(name)?;
        let invalid = |reason: String| KvRegionError::Invalid {
            name: name.to_string(),
            reason,
        };
        geometry
            .validate()
            .map_err(|e| invalid(format!("{}: {}", e.field, e.reason)))?;
        let bytes = geometry.region_bytes();
        let len = usize::try_from(bytes).map_err(|_| invalid(format!("{bytes} bytes")))?;
        let io = |what: &str| {
            let name = name.to_string();
            let what = what.to_string();
            move |source: std::io::Error| KvRegionError::Io { name, what, source }
        };
        let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
            .map_err(|e| io("create the memory file (memfd_create)")(e.into()))?;
        let size = libc::off_t::try_from(bytes).map_err(|_| invalid(format!("{bytes} bytes")))?;
        nix::unistd::ftruncate(&fd, size).map_err(|e| io("size the memory file")(e.into()))?;
        fcntl(
            &fd,
            FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW),
        )
        .map_err(|e| io("seal the memory file's size")(e.into()))?;
        let file = File::from(fd);
        let map = MmapOptions::new()
            .len(len)
            .map_raw(&file)
            .map_err(io("map the memory file"))?;
        let (conn, shown) = connect(socket, name)?;
        let preamble = encode_preamble(KIND_MEMFD, 0, bytes, &[0u8; 64], &geometry, name);
        let id = register_raw(&conn, &preamble, Some(&file), name, &shown)?;
        Ok(KvRegion {
            id,
            name: name.to_string(),
            geometry,
            bytes,
            device: None,
            map: Some(map),
            _conn: conn,
        })
    }

    /// Registers device memory by its CUDA IPC handle (`cuIpcGetMemHandle` of
    /// a `cuMemAlloc` buffer of `bytes` bytes on device `device`). The buffer
    /// must stay allocated while the region is registered.
    pub fn register_cuda_ipc(
        socket: &str,
        name: &str,
        handle: [u8; 64],
        device: u32,
        bytes: u64,
        geometry: PagedGeometry,
    ) -> Result<KvRegion, KvRegionError> {
        check_name(name)?;
        let (conn, shown) = connect(socket, name)?;
        let preamble = encode_preamble(KIND_CUDA_IPC, device, bytes, &handle, &geometry, name);
        let id = register_raw(&conn, &preamble, None, name, &shown)?;
        Ok(KvRegion {
            id,
            name: name.to_string(),
            geometry,
            bytes,
            device: Some(device),
            map: None,
            _conn: conn,
        })
    }

    /// The region id the daemon assigned (from 1).
    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn geometry(&self) -> &PagedGeometry {
        &self.geometry
    }

    /// Bytes of the region.
    pub fn len(&self) -> u64 {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// The CUDA device of a CUDA IPC region.
    pub fn device(&self) -> Option<u32> {
        self.device
    }

    /// The `KvPages` of one block: `page_ids` in token order.
    pub fn pages(&self, page_ids: impl Into<Vec<u32>>) -> proto::KvPages {
        proto::KvPages {
            region_id: self.id,
            page_ids: page_ids.into(),
        }
    }

    /// A memfd region's bytes (`None` for device memory). The daemon writes
    /// them during a `get_pages`: do not hold this across one.
    pub fn as_slice(&self) -> Option<&[u8]> {
        // SAFETY: the mapping is `bytes` long and lives as long as `self`.
        self.map
            .as_ref()
            .map(|m| unsafe { std::slice::from_raw_parts(m.as_ptr(), m.len()) })
    }

    /// A memfd region's bytes, for writing (`None` for device memory).
    pub fn as_mut_slice(&mut self) -> Option<&mut [u8]> {
        // SAFETY: as above; `&mut self`.
        self.map
            .as_ref()
            .map(|m| unsafe { std::slice::from_raw_parts_mut(m.as_mut_ptr(), m.len()) })
    }
}

/// One block to store, gathered from KV-region pages ([`Client::put_pages`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagesPutItem {
    /// The block key (1 to 64 bytes).
    pub key: Bytes,
    /// The key of the previous block in the chain, if any.
    pub parent: Option<Bytes>,
    /// The block's pages ([`KvRegion::pages`]).
    pub pages: proto::KvPages,
}

impl PagesPutItem {
    pub fn new(key: impl Into<Bytes>, pages: proto::KvPages) -> Self {
        PagesPutItem {
            key: key.into(),
            parent: None,
            pages,
        }
    }

    pub fn with_parent(mut self, parent: impl Into<Bytes>) -> Self {
        self.parent = Some(parent.into());
        self
    }
}

impl From<PagesPutItem> for proto::PutItem {
    fn from(item: PagesPutItem) -> Self {
        proto::PutItem {
            key: item.key,
            parent: item.parent.unwrap_or_default(),
            payload: Bytes::new(),
            region: None,
            pages: Some(item.pages),
        }
    }
}

/// Reads and writes a whole region's bytes, for [`check_pages_round_trip`]:
/// a memfd [`KvRegion`] does it through its mapping; an engine holding a
/// CUDA buffer implements it with device copies.
pub trait RegionBytes {
    fn read_all(&mut self) -> Result<Vec<u8>, String>;
    fn write_all(&mut self, bytes: &[u8]) -> Result<(), String>;
}

impl RegionBytes for KvRegion {
    fn read_all(&mut self) -> Result<Vec<u8>, String> {
        self.as_slice()
            .map(<[u8]>::to_vec)
            .ok_or_else(|| "a CUDA IPC region's bytes live on the device".to_string())
    }

    fn write_all(&mut self, bytes: &[u8]) -> Result<(), String> {
        let dst = self
            .as_mut_slice()
            .ok_or_else(|| "a CUDA IPC region's bytes live on the device".to_string())?;
        if dst.len() != bytes.len() {
            return Err(format!(
                "{} bytes for a region of {}",
                bytes.len(),
                dst.len()
            ));
        }
        dst.copy_from_slice(bytes);
        Ok(())
    }
}

/// [`RegionBytes`] of device memory (an engine's `cuMemAlloc` buffer), copied
/// through pinned host memory on the buffer's device. On the CPU backend the
/// "device" memory is host memory and the same code runs.
pub struct DeviceBytes<'a> {
    gpu: &'a kvstrata_kernels::Gpu,
    buffer: &'a kvstrata_kernels::DeviceBuffer,
}

impl<'a> DeviceBytes<'a> {
    pub fn new(gpu: &'a kvstrata_kernels::Gpu, buffer: &'a kvstrata_kernels::DeviceBuffer) -> Self {
        DeviceBytes { gpu, buffer }
    }
}

impl RegionBytes for DeviceBytes<'_> {
    fn read_all(&mut self) -> Result<Vec<u8>, String> {
        let len = self.buffer.len();
        let pinned = self.gpu.alloc_pinned(len).map_err(|e| e.to_string())?;
        let stream = self.gpu.stream().map_err(|e| e.to_string())?;
        // SAFETY: both ranges are `len` bytes of live allocations that nothing
        // else writes until the stream is synchronised below (the daemon only
        // touches the buffer during requests, and none is in flight).
        unsafe { stream.copy(pinned.device_ptr(), self.buffer.ptr(), len as u64) }
            .map_err(|e| e.to_string())?;
        stream.synchronize().map_err(|e| e.to_string())?;
        Ok(pinned.as_slice().to_vec())
    }

    fn write_all(&mut self, bytes: &[u8]) -> Result<(), String> {
        let len = self.buffer.len();
        if bytes.len() != len {
            return Err(format!("{} bytes for a buffer of {len}", bytes.len()));
        }
        let mut pinned = self.gpu.alloc_pinned(len).map_err(|e| e.to_string())?;
        pinned.as_mut_slice().copy_from_slice(bytes);
        let stream = self.gpu.stream().map_err(|e| e.to_string())?;
        // SAFETY: as in `read_all`, the other way round.
        unsafe { stream.copy(self.buffer.ptr(), pinned.device_ptr(), len as u64) }
            .map_err(|e| e.to_string())?;
        stream.synchronize().map_err(|e| e.to_string())
    }
}

/// What [`check_pages_round_trip`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct PagesCheckReport {
    pub region_id: u32,
    pub pages_per_block: u32,
    pub block_bytes: u64,
    /// Blocks put by pages (and as many got into other pages).
    pub blocks: usize,
    /// Wall time of the BatchPut by pages and of the BatchGet into pages.
    pub put: Duration,
    pub get: Duration,
    /// Of the blocks put by pages, how many the inline read-back found in
    /// the HBM tier (the direct path gathers into HBM when the daemon has one).
    pub read_back_from_hbm: usize,
}

/// Random bytes, never zero (xorshift; deterministic per seed).
pub fn nonzero_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        v.extend(state.to_le_bytes().map(|b| if b == 0 { 0xA5 } else { b }));
    }
    v.truncate(len);
    v
}

fn dtype_of(bytes: u32) -> Option<Dtype> {
    match bytes {
        1 => Some(Dtype::Int8),
        2 => Some(Dtype::F16),
        4 => Some(Dtype::F32),
        _ => None,
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or(if a.len() == b.len() {
            None
        } else {
            Some(a.len().min(b.len()))
        })
}

/// Round trip through a registered region, checked byte for byte against the
/// CPU references (`kvstrata_kernels::reference::{gather, scatter}`):
///
/// 1. fills the region with fresh random bytes (never zeros) through `memory`;
/// 2. registers a fresh layer-major namespace matching the region's geometry
///    (`pages_per_block` pages per block);
/// 3. stores `blocks` blocks by page ids (distinct random pages), reads them
///    back inline and compares them with `reference::gather`;
/// 4. stores `blocks` random blocks inline, gets them into other pages, reads
///    the whole region and compares it with `reference::scatter` applied to
///    the bytes before (so untouched pages must be unchanged);
/// 5. deletes the blocks.
///
/// `memory` reads and writes the region's bytes; `None` uses the region's own
/// mapping (memfd regions). An engine process holding a CUDA buffer passes its
/// own [`RegionBytes`] (device-to-host and host-to-device copies).
pub async fn check_pages_round_trip(
    client: &Client,
    region: &mut KvRegion,
    memory: Option<&mut dyn RegionBytes>,
    pages_per_block: u32,
    blocks: usize,
    seed: u64,
) -> Result<PagesCheckReport, KvRegionError> {
    let g = *region.geometry();
    let region_id = region.id();
    let region_name = region.name().to_string();
    let region_len = region.len();
    let invalid = |reason: String| KvRegionError::Invalid {
        name: region_name.clone(),
        reason,
    };
    let pages_of = |ids: &[u32]| proto::KvPages {
        region_id,
        page_ids: ids.to_vec(),
    };
    let memory: &mut dyn RegionBytes = match memory {
        Some(m) => m,
        None => region,
    };
    let check = |what: String| KvRegionError::Check(what);
    let dtype = dtype_of(g.dtype_bytes)
        .ok_or_else(|| invalid(format!("dtype_bytes {} has no dtype", g.dtype_bytes)))?;
    let ppb = pages_per_block.max(1);
    let blocks = blocks.min(g.num_pages as usize / (2 * ppb as usize));
    if blocks == 0 {
        return Err(invalid(format!(
            "{} pages are too few for two blocks of {ppb} pages",
            g.num_pages
        )));
    }
    let region_len = usize::try_from(region_len).map_err(|_| invalid("too large".into()))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut spec = NamespaceSpec::layer_major(
        format!("kvstrata-region-check-{region_id}"),
        g.layers,
        g.kv_heads,
        g.head_dim,
        dtype,
        ppb * g.page_tokens,
    );
    spec.model_fingerprint = [seed.to_le_bytes(), nanos.to_le_bytes()].concat();
    let ns = client.register_namespace(&spec).await?;
    let block_bytes = g.block_bytes(ppb);
    if ns.block_bytes != block_bytes {
        return Err(check(format!(
            "the namespace's blocks are {} bytes, the region's {ppb} pages {block_bytes}",
            ns.block_bytes
        )));
    }
    // Distinct random pages: the first half for the put, the second for the get.
    let mut order: Vec<u32> = (0..g.num_pages).collect();
    let mut rng = nonzero_bytes(seed ^ 0x5EED, order.len() * 8);
    for i in (1..order.len()).rev() {
        let r = u64::from_le_bytes(rng[i * 8..i * 8 + 8].try_into().unwrap_or([1; 8]));
        order.swap(i, (r % (i as u64 + 1)) as usize);
    }
    rng.clear();
    let n_pages = blocks * ppb as usize;
    let put_pages = &order[..n_pages];
    let get_pages = &order[n_pages..2 * n_pages];

    // 1. Fresh random region.
    let before = nonzero_bytes(seed, region_len);
    memory.write_all(&before).map_err(check)?;

    // 3. Put by pages, read back inline, compare with the reference gather.
    let key = |what: &str, i: usize| Bytes::from(format!("region-check-{what}-{i}"));
    let items: Vec<PagesPutItem> = (0..blocks)
        .map(|i| {
            PagesPutItem::new(
                key("put", i),
                pages_of(&put_pages[i * ppb as usize..(i + 1) * ppb as usize]),
            )
        })
        .collect();
    let t0 = Instant::now();
    let put = client.put_pages(&ns.id, items).await?;
    let put_time = t0.elapsed();
    if put.stored as usize != blocks {
        return Err(check(format!(
            "put by pages stored {} of {blocks} blocks: {:?}",
            put.stored, put.results
        )));
    }
    let mut want = vec![0u8; blocks * block_bytes as usize];
    kvstrata_kernels::reference::gather(&g, ppb, put_pages, &before, &mut want)
        .map_err(|e| check(format!("reference gather: {e}")))?;
    let put_keys: Vec<Bytes> = (0..blocks).map(|i| key("put", i)).collect();
    let got = client.batch_get(&ns.id, &put_keys).await?;
    let read_back_from_hbm = got
        .iter()
        .filter(|r| r.found && r.tier == proto::Tier::Hbm as i32)
        .count();
    for (i, r) in got.iter().enumerate() {
        let w = &want[i * block_bytes as usize..(i + 1) * block_bytes as usize];
        if !r.found {
            return Err(check(format!("block {i} put by pages is not found")));
        }
        if let Some(at) = first_difference(&r.payload, w) {
            return Err(check(format!(
                "block {i} gathered from pages {:?} differs from the reference at byte {at}",
                &put_pages[i * ppb as usize..(i + 1) * ppb as usize]
            )));
        }
    }

    // 4. Random blocks inline, get into other pages, compare with the reference scatter.
    let new_blocks = nonzero_bytes(seed.wrapping_add(1), blocks * block_bytes as usize);
    let get_keys: Vec<Bytes> = (0..blocks).map(|i| key("get", i)).collect();
    let inline: Vec<PutItem> = (0..blocks)
        .map(|i| {
            PutItem::new(
                get_keys[i].clone(),
                Bytes::copy_from_slice(
                    &new_blocks[i * block_bytes as usize..(i + 1) * block_bytes as usize],
                ),
            )
        })
        .collect();
    let stored = client.batch_put(&ns.id, inline).await?;
    if stored.stored as usize != blocks {
        return Err(check(format!(
            "inline put stored {} of {blocks}",
            stored.stored
        )));
    }
    let pages: Vec<proto::KvPages> = (0..blocks)
        .map(|i| pages_of(&get_pages[i * ppb as usize..(i + 1) * ppb as usize]))
        .collect();
    let t0 = Instant::now();
    let got = client.get_pages(&ns.id, &get_keys, &pages).await?;
    let get_time = t0.elapsed();
    if let Some((i, r)) = got
        .iter()
        .enumerate()
        .find(|(_, r)| !r.found || !r.region_error.is_empty())
    {
        return Err(check(format!(
            "get into pages: block {i} found={} region_error={:?}",
            r.found, r.region_error
        )));
    }
    let mut want = before;
    kvstrata_kernels::reference::scatter(&g, ppb, get_pages, &new_blocks, &mut want)
        .map_err(|e| check(format!("reference scatter: {e}")))?;
    let after = memory.read_all().map_err(check)?;
    if let Some(at) = first_difference(&after, &want) {
        return Err(check(format!(
            "the region after the get differs from the reference scatter at byte {at} \
             (page stride {}, so around page {})",
            g.page_stride(),
            at as u64 % g.effective_layer_stride().max(1) / g.page_stride().max(1)
        )));
    }
    let mut all = put_keys;
    all.extend(get_keys);
    client.delete(&ns.id, &all).await?;
    Ok(PagesCheckReport {
        region_id,
        pages_per_block: ppb,
        block_bytes,
        blocks,
        put: put_time,
        get: get_time,
        read_back_from_hbm,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_bytes_round_trip_on_the_cpu_backend() {
        let gpu = kvstrata_kernels::Gpu::cpu();
        let buffer = gpu.alloc_device(1000).unwrap();
        let mut bytes = DeviceBytes::new(&gpu, &buffer);
        let data = nonzero_bytes(3, 1000);
        assert!(data.iter().all(|b| *b != 0));
        bytes.write_all(&data).unwrap();
        assert_eq!(bytes.read_all().unwrap(), data);
        assert!(bytes.write_all(&data[..10]).is_err());
    }

    #[test]
    fn the_preamble_has_the_documented_layout() {
        let g = PagedGeometry {
            layout: PageLayout::CrossLayer,
            layers: 2,
            page_tokens: 3,
            kv_heads: 4,
            head_dim: 5,
            dtype_bytes: 2,
            num_pages: 6,
            layer_stride: 0,
        };
        let b = encode_preamble(KIND_CUDA_IPC, 3, 999, &[7u8; 64], &g, "eng");
        assert_eq!(b.len(), REGION_HEADER_BYTES + 3);
        assert_eq!(&b[..8], b"KVSREGN\0");
        assert_eq!(u16::from_le_bytes([b[10], b[11]]), KIND_CUDA_IPC);
        assert_eq!(u32::from_le_bytes([b[12], b[13], b[14], b[15]]), 3);
        assert_eq!(b[24], 7);
        assert_eq!(u32::from_le_bytes([b[88], b[89], b[90], b[91]]), 2);
        assert_eq!(u32::from_le_bytes([b[112], b[113], b[114], b[115]]), 6);
        assert_eq!(&b[128..], b"eng");
        assert_eq!(refusal_reason(2), "geometry");
    }
}
