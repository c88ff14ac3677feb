//! The mempool socket: where same-host clients register shared-memory pools.
//!
//! The wire format (docs/protocol.md, "Shared-memory pools"; constants and
//! parser in [`kvstrata_types::wire::pool`]): the client sends an 8-byte
//! little-endian magic, a u32 little-endian name length and the name, with
//! exactly one file descriptor attached (`SCM_RIGHTS`). The daemon maps the
//! fd, answers the pool id — a u64 for kvstrata's magic `0x2_8DF6FBFD`, a u32
//! of at most 31 bits for SGLang HiCache's `0x8DF6FBFD` — and keeps the pool
//! for as long as the connection stays open. Ids are unique to the daemon
//! run ([`crate::pool::IdSequence`]). Anything else — a wrong magic, no fd or
//! several, a name over
//! [`wire::MAX_NAME_BYTES`], a preamble cut short or too slow, an fd that
//! cannot be mapped — closes the connection with a log line; nothing is
//! registered and the daemon keeps serving.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use kvstrata_types::InvalidField;
use kvstrata_types::wire::pool as wire;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::pool::{PoolRegistry, Registrant};

/// The preamble's magic and its parser, defined in [`kvstrata_types::wire::pool`].
pub use kvstrata_types::wire::pool::{
    MAGIC, MAGIC_WIDE, PoolFormat, PoolPreamble, PreambleParse, parse_preamble,
};

/// A client must finish its preamble within this time.
pub const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Room for this many fds in one message's control data; more are refused.
const MAX_FDS_RECEIVED: usize = 64;

/// Why a preamble was refused.
#[derive(Debug, thiserror::Error)]
pub enum PreambleError {
    /// The bytes are not a preamble ([`parse_preamble`]): the field names
    /// the magic, the name length or the name.
    #[error(transparent)]
    Invalid(#[from] InvalidField),
    #[error("connection closed after {0} of the preamble's bytes")]
    Truncated(usize),
    #[error("{0} file descriptors attached (exactly one expected)")]
    FdCount(usize),
    #[error("too many file descriptors attached (control data truncated)")]
    FdOverflow,
    #[error("no complete preamble within {}s", PREAMBLE_TIMEOUT.as_secs())]
    Timeout,
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
}

/// A parsed registration.
#[derive(Debug)]
pub struct Preamble {
    pub name: String,
    /// The preamble's format: the width of the id answered.
    pub format: PoolFormat,
    pub fd: OwnedFd,
}

/// Accepts registrations until `shutdown`; one task per connection.
pub async fn serve(
    listener: UnixListener,
    registry: Arc<PoolRegistry>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    serve_checked(listener, registry, shutdown, None).await
}

/// [`serve`], closing at once every connection whose peer uid `auth` does
/// not allow (`auth.uid_allow`; counted as `uid_denied`).
pub async fn serve_checked(
    listener: UnixListener,
    registry: Arc<PoolRegistry>,
    shutdown: CancellationToken,
    auth: Option<Arc<crate::auth::Auth>>,
) -> io::Result<()> {
    while let Some(stream) =
        crate::auth::next_admitted_peer(&listener, &shutdown, auth.as_deref(), "mempool", || {
            registry.count_refused()
        })
        .await
    {
        let registry = Arc::clone(&registry);
        let token = shutdown.clone();
        tokio::spawn(async move { handle(stream, registry, token).await });
    }
    Ok(())
}

/// One registration connection: preamble, reply, then hold the pool until the
/// client hangs up (or the daemon stops).
async fn handle(mut stream: UnixStream, registry: Arc<PoolRegistry>, shutdown: CancellationToken) {
    let peer = peer_pid(&stream);
    let preamble = match tokio::time::timeout(PREAMBLE_TIMEOUT, read_preamble(&stream)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            registry.count_refused();
            tracing::warn!(peer_pid = peer, error = %e, "mempool socket: registration refused");
            return;
        }
        Err(_) => {
            registry.count_refused();
            tracing::warn!(peer_pid = peer, error = %PreambleError::Timeout, "mempool socket: registration refused");
            return;
        }
    };
    let name = preamble.name.clone();
    let format = preamble.format;
    let who = Registrant {
        format,
        peer_pid: peer,
    };
    let pool = match registry.register(preamble.name, preamble.fd, who) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(peer_pid = peer, pool_name = %name, error = %e, "mempool socket: registration refused");
            return;
        }
    };
    let id = pool.id();
    let bytes = pool.len();
    let sealed = pool.sealed();
    drop(pool);
    let sent = match wire::encode_reply(format, id) {
        Ok(reply) => stream.write_all(&reply).await,
        // The registry draws each format's ids from its own range.
        Err(e) => Err(io::Error::other(e.to_string())),
    };
    if let Err(e) = sent {
        registry.unregister(id);
        tracing::warn!(peer_pid = peer, pool_id = id, error = %e, "mempool socket: cannot answer the pool id; pool dropped");
        return;
    }
    tracing::info!(peer_pid = peer, pool_id = id, pool_name = %name, ?format, bytes, sealed, "pool registered");
    let mut buf = [0u8; 256];
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = stream.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => tracing::debug!(pool_id = id, bytes = n, "mempool socket: ignoring bytes after registration"),
            },
        }
    }
    registry.unregister(id);
    tracing::info!(pool_id = id, pool_name = %name, "pool unregistered (connection closed)");
}

/// Reads the preamble and the fds sent with it.
pub async fn read_preamble(stream: &UnixStream) -> Result<Preamble, PreambleError> {
    let mut buf = vec![0u8; wire::FIXED_BYTES];
    let mut filled = 0usize;
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut need = wire::FIXED_BYTES;
    loop {
        while filled < need {
            stream.readable().await?;
            let r = stream.try_io(Interest::READABLE, || {
                recv_with_fds(stream.as_raw_fd(), &mut buf[filled..need], &mut fds)
            });
            match r {
                Ok((0, _)) => return Err(PreambleError::Truncated(filled)),
                Ok((n, truncated)) => {
                    if truncated {
                        return Err(PreambleError::FdOverflow);
                    }
                    filled += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let name = match parse_preamble(&buf[..filled]) {
            Ok(PreambleParse::Need(n)) => {
                need = n;
                buf.resize(need, 0);
                continue;
            }
            Ok(PreambleParse::Complete(p)) => Ok(p),
            // The fd count is checked before the name's encoding.
            Err(e) if e.field == "name" => Err(PreambleError::Invalid(e)),
            Err(e) => return Err(e.into()),
        };
        if fds.len() != 1 {
            return Err(PreambleError::FdCount(fds.len()));
        }
        let PoolPreamble { name, format } = name?;
        let fd = fds.pop().ok_or(PreambleError::FdCount(0))?;
        return Ok(Preamble { name, format, fd });
    }
}

/// One non-blocking `recvmsg`: data into `buf`, and every fd passed with it
/// into `fds` (owned, so closed if refused later). Returns the byte count and
/// whether the kernel truncated the control data (fds beyond our room are
/// closed by the kernel).
pub(crate) fn recv_with_fds(
    fd: RawFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<(usize, bool)> {
    // u64 words keep the control buffer aligned for `cmsghdr`.
    const CONTROL_WORDS: usize = (MAX_FDS_RECEIVED * 4 + 64) / 8;
    let mut control = [0u64; CONTROL_WORDS];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` points at live buffers of the stated sizes.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the CMSG_* walk stays within `msg_controllen` as the kernel set
    // it; every fd in an SCM_RIGHTS message is now ours to own (and close).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let header = data as usize - c as usize;
                let count = ((*c).cmsg_len as usize).saturating_sub(header) / size_of::<RawFd>();
                for i in 0..count {
                    let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, msg.msg_flags & libc::MSG_CTRUNC != 0))
}

/// The peer's pid (for log lines), if the kernel tells.
fn peer_pid(stream: &UnixStream) -> Option<i32> {
    stream.peer_cred().ok().and_then(|c| c.pid())
}
