//! The mempool socket: where same-host clients register shared-memory pools.
//!
//! The wire format (docs/protocol.md, "Shared-memory pools"; constants and
//! parser in [`kvstrata_types::wire::pool`]): the client sends an 8-byte
//! little-endian magic, a u32 little-endian name length and the name, with
//! exactly one file descriptor attached (`SCM_RIGHTS`). The daemon maps the
//! fd, answers the pool id — a u64 for kvstrata's magic `0x2_8DF6FBFD`, a u32
//! of at most 31 bits for SGLang HiCache's `0x8DF6FBFD` — and keeps the pool
//! for as long as the connection stays open. Ids are unique to the daemon
//! run ([`crate::shm::pool::IdSequence`]). Anything else — a wrong magic, no
//! fd or several, a name over [`wire::MAX_NAME_BYTES`], a preamble cut short
//! or too slow, an fd that cannot be mapped — closes the connection with a
//! log line; nothing is registered and the daemon keeps serving.
//!
//! The accept loop, the preamble reader and the wait for the client to hang
//! up are [`crate::transport::registration`]'s, shared with the KV-region
//! socket.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use kvstrata_types::InvalidField;
use kvstrata_types::wire::pool as wire;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::shm::pool::{PoolRegistry, Registrant};
use crate::transport::registration::{self, PREAMBLE_TIMEOUT, Parsed, ReadError, peer_pid};

/// The preamble's magic and its parser, defined in [`kvstrata_types::wire::pool`].
pub use kvstrata_types::wire::pool::{
    MAGIC, MAGIC_WIDE, PoolFormat, PoolPreamble, PreambleParse, parse_preamble,
};

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

impl From<ReadError<InvalidField>> for PreambleError {
    fn from(e: ReadError<InvalidField>) -> Self {
        match e {
            ReadError::Closed(n) => PreambleError::Truncated(n),
            ReadError::TooManyFds => PreambleError::FdOverflow,
            ReadError::Invalid(e) => PreambleError::Invalid(e),
            ReadError::Timeout => PreambleError::Timeout,
            ReadError::Io(e) => PreambleError::Io(e),
        }
    }
}

/// A parsed registration.
#[derive(Debug)]
pub struct Preamble {
    pub name: String,
    /// The preamble's format: the width of the id answered.
    pub format: PoolFormat,
    pub fd: OwnedFd,
}

/// Accepts registrations until `shutdown`, one task per connection; peers
/// whose uid `auth` does not allow (`auth.uid_allow`) are closed at once and
/// counted as refused.
pub async fn serve(
    listener: UnixListener,
    registry: Arc<PoolRegistry>,
    shutdown: CancellationToken,
    auth: Option<Arc<crate::auth::Auth>>,
) -> io::Result<()> {
    let denied = Arc::clone(&registry);
    let token = shutdown.clone();
    registration::serve(
        listener,
        shutdown,
        auth,
        "mempool",
        move || denied.count_refused(),
        move |stream| handle(stream, Arc::clone(&registry), token.clone()),
    )
    .await
}

/// One registration connection: preamble, reply, then hold the pool until the
/// client hangs up (or the daemon stops).
async fn handle(mut stream: UnixStream, registry: Arc<PoolRegistry>, shutdown: CancellationToken) {
    let peer = peer_pid(&stream);
    let preamble = match read_preamble(&stream).await {
        Ok(p) => p,
        Err(e) => {
            registry.count_refused();
            tracing::warn!(peer_pid = peer, error = %e, "mempool socket: registration refused");
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
    registration::hold_until_closed(&mut stream, &shutdown, "mempool socket", id).await;
    registry.unregister(id);
    tracing::info!(pool_id = id, pool_name = %name, "pool unregistered (connection closed)");
}

/// Reads the preamble and the fd sent with it (within [`PREAMBLE_TIMEOUT`]).
pub async fn read_preamble(stream: &UnixStream) -> Result<Preamble, PreambleError> {
    let received =
        registration::read_preamble(stream, wire::FIXED_BYTES, MAX_FDS_RECEIVED, |buf| {
            match parse_preamble(buf) {
                Ok(PreambleParse::Need(n)) => Ok(Parsed::Need(n)),
                Ok(PreambleParse::Complete(p)) => Ok(Parsed::Complete(Ok(p))),
                // The fd count is checked before the name's encoding.
                Err(e) if e.field == "name" => Ok(Parsed::Complete(Err(e))),
                Err(e) => Err(e),
            }
        })
        .await?;
    let mut fds = received.fds;
    if fds.len() != 1 {
        return Err(PreambleError::FdCount(fds.len()));
    }
    let PoolPreamble { name, format } = received.preamble?;
    let fd = fds.pop().ok_or(PreambleError::FdCount(0))?;
    Ok(Preamble { name, format, fd })
}
