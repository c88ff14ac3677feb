//! [`KvRegion`]: an engine's paged KV memory registered with the daemon, so
//! that puts and gets can name page ids instead of carrying payloads
//! (`docs/protocol.md`, "CUDA IPC regions").
//!
//! An engine registers its KV cache once on the daemon's region socket
//! (`kvstrata serve --kv-region-socket PATH`), describing it with a
//! [`PagedGeometry`] (layout, layers, page_tokens, kv_heads, head_dim,
//! dtype_bytes, num_pages, and for per-layer regions the layer, page and K/V
//! strides, so that layouts like vLLM's `(2, num_pages, page_tokens, heads,
//! dim)` tensors register as they are):
//!
//! - [`KvRegion::register_cuda_ipc`]: the 64-byte `cuIpcGetMemHandle` handle of
//!   a `cuMemAlloc` buffer and its device ordinal (the daemon opens it on that
//!   GPU and runs its gather/scatter kernels there);
//! - [`KvRegion::create_memfd`]: host memory (a sealed memfd passed with
//!   `SCM_RIGHTS`), the CPU path — it works without a GPU.
//!
//! The registration connection stays open for the life of the [`KvRegion`];
//! dropping it unregisters the region (later requests naming it get
//! `PutStatus::BadRegion` / `region_error`). Region ids are 64-bit and unique
//! to one run of the daemon: after a daemon restart the old id names no
//! region (requests naming it are refused the same way), so register again. [`Client::put_pages`] stores
//! blocks gathered from pages, [`Client::get_pages`] scatters found blocks
//! into pages. A block is `block_tokens / page_tokens` pages of the region,
//! listed in token order ([`KvRegion::pages`]).
//!
//! kvstrata-gpucheck's `pages::check_pages_round_trip` runs a put-by-pages /
//! get-by-pages round trip on a registered region and checks every byte
//! against the kernels' CPU references.

use std::fs::File;
use std::io::{ErrorKind, IoSlice, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use bytes::Bytes;
use kvstrata_proto::v1 as proto;
use kvstrata_types::PagedGeometry;
use kvstrata_types::wire::kv_region::{self as wire, RefuseReason};
use memmap2::{MmapOptions, MmapRaw};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};

#[cfg(doc)]
use crate::client::Client;
use crate::error::ClientError;
use crate::region_calls::CallChannel;
use crate::target::Target;

/// The registration preamble's kinds and its encoders (defined in
/// [`kvstrata_types::wire::kv_region`]; `encode_preamble_v2` writes what
/// clients before the strides sent), for hand-made preambles ([`register_raw`]).
pub use kvstrata_types::wire::kv_region::{
    KIND_CUDA_IPC, KIND_MEMFD, encode_preamble, encode_preamble_v2,
};

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
    /// The daemon's answer or a check of it is wrong (e.g. region id 0).
    #[error("KV region check: {0}")]
    Check(String),
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
) -> Result<u64, KvRegionError> {
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
    let mut head = [0u8; wire::REPLY_HEADER_BYTES];
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
    let wire::ReplyHeader {
        status,
        message_len,
    } = wire::parse_reply_header(&head);
    let mut msg = vec![0u8; (message_len as usize).min(wire::MAX_REPLY_MESSAGE_BYTES)];
    (&*conn)
        .read_exact(&mut msg)
        .map_err(|e| io("read the daemon's answer", e))?;
    let message = String::from_utf8_lossy(&msg).into_owned();
    if status != 0 {
        return Err(KvRegionError::Refused {
            name: name.to_string(),
            status,
            reason: RefuseReason::from_code(status).map_or("unknown", RefuseReason::label),
            message,
        });
    }
    let mut id = [0u8; wire::REPLY_ID_BYTES];
    (&*conn)
        .read_exact(&mut id)
        .map_err(|e| io("read the region id", e))?;
    wire::parse_reply_id(&id).map_err(|e| {
        KvRegionError::Check(format!(
            "region socket {socket} answered an invalid region id for {name:?}: {e}"
        ))
    })
}

/// A KV region registered with the daemon. See the [module docs](self).
pub struct KvRegion {
    id: u64,
    name: String,
    geometry: PagedGeometry,
    bytes: u64,
    /// CUDA device ordinal for a CUDA IPC region.
    device: Option<u32>,
    /// The client's mapping of a memfd region.
    map: Option<MmapRaw>,
    /// The registration connection (open for as long as the region is
    /// registered), which also carries region calls.
    calls: CallChannel,
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
    if name.is_empty() || name.len() > wire::MAX_NAME_BYTES || name.contains('\0') {
        return Err(KvRegionError::Invalid {
            name: name.to_string(),
            reason: format!(
                "the name must be 1 to {} bytes without NUL",
                wire::MAX_NAME_BYTES
            ),
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
            calls: CallChannel::new(conn),
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
            calls: CallChannel::new(conn),
        })
    }

    /// Sends a region call on the registration connection (see
    /// `crate::region_calls`): the answer's protobuf bytes, or `None` when
    /// another call holds the connection or it was lost.
    pub(crate) fn try_call(
        &self,
        kind: kvstrata_types::wire::region_calls::CallKind,
        body: &[u8],
        timeout: Option<Duration>,
    ) -> Option<Result<Vec<u8>, ClientError>> {
        self.calls.try_call(kind, body, timeout)
    }

    /// The region id the daemon assigned: 64 bits, unique to this run of the
    /// daemon.
    pub fn id(&self) -> u64 {
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
            range: None,
            pages: Some(item.pages),
        }
    }
}
