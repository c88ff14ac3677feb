//! Binding the daemon's listeners: a TCP port whose connections skip
//! Nagle's algorithm, and Unix sockets only the daemon's user can open
//! (mode 0600, in a 0700 directory it creates), each turned into the stream
//! of accepted connections a gRPC server takes.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::TcpIncoming;

use super::AuthorityFix;
use crate::auth::Auth;
use crate::error::DaemonError;

/// Binds the TCP listener at `addr` (`host:port`; port 0 picks one).
pub async fn bind_tcp(addr: &str) -> Result<(TcpIncoming, SocketAddr), DaemonError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Listen {
            what: format!("tcp {addr}"),
            source,
        })?;
    let bound = listener.local_addr()?;
    // Nagle's algorithm would hold back the last frame of a response
    // waiting for an ACK (40 ms tails); the builder's tcp_nodelay only
    // applies to listeners it binds itself.
    Ok((TcpIncoming::from(listener).with_nodelay(Some(true)), bound))
}

/// Accepted Unix-socket connections, each wrapped so that grpc-core clients'
/// socket-path `:authority` is accepted (see [`AuthorityFix`]).
pub fn authority_fixed(
    listener: UnixListener,
) -> impl Stream<Item = std::io::Result<AuthorityFix<UnixStream>>> {
    UnixListenerStream::new(listener).map(|r| r.map(AuthorityFix::new))
}

/// [`authority_fixed`], closing at accept time every connection whose peer
/// uid `auth` does not allow (`what` names the socket in the refusal log).
pub fn admitted_authority_fixed(
    listener: UnixListener,
    auth: Arc<Auth>,
    what: &'static str,
) -> impl Stream<Item = std::io::Result<AuthorityFix<UnixStream>>> {
    UnixListenerStream::new(listener)
        .filter(move |r| {
            r.as_ref().is_err() || r.as_ref().is_ok_and(|s| auth.admit_unix_peer(what, s))
        })
        .map(|r| r.map(AuthorityFix::new))
}

/// Binds a Unix socket with mode 0600, creating its directory (0700) if
/// needed and replacing a stale socket file left by a dead daemon.
pub async fn bind_unix(path: &Path) -> Result<UnixListener, DaemonError> {
    let what = || format!("unix {}", path.display());
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(|source| DaemonError::Listen {
            what: what(),
            source,
        })?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(
            |source| DaemonError::Listen {
                what: what(),
                source,
            },
        )?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(DaemonError::SocketInUse(path.display().to_string()));
        }
        std::fs::remove_file(path).map_err(|source| DaemonError::Listen {
            what: what(),
            source,
        })?;
    }
    // Create the socket with no group/other bits at all, then make it explicit.
    let old = umask(0o177);
    let bound = UnixListener::bind(path);
    umask(old);
    let listener = bound.map_err(|source| DaemonError::Listen {
        what: what(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        DaemonError::Listen {
            what: what(),
            source,
        }
    })?;
    Ok(listener)
}

/// Sets the process file-mode mask; returns the previous one.
fn umask(mask: libc::mode_t) -> libc::mode_t {
    // SAFETY: umask only swaps the process file-mode mask; it cannot fail.
    unsafe { libc::umask(mask) }
}
