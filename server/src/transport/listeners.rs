//! Binding the daemon's listeners: a TCP port whose connections skip
//! Nagle's algorithm (and, from a loopback peer, get a congestion
//! controller that does not pace), and Unix sockets only the daemon's user can open
//! (mode 0600, in a 0700 directory it creates), each turned into the stream
//! of accepted connections a gRPC server takes ([`Incoming`]), under the
//! daemon's connection limits and deadlines ([`super::conn`]).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::time::Sleep;
use tokio_stream::Stream;

use super::AuthorityFix;
use super::conn::{ConnLimiter, PeerKey, Tracked};
use crate::auth::Auth;
use crate::error::DaemonError;
use crate::metrics::ConnListener;

/// How long a listener pauses after a failed `accept(2)` (out of file
/// descriptors, say) before it tries again, instead of spinning.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Binds the TCP listener at `addr` (`host:port`; port 0 picks one).
pub async fn bind_tcp(addr: &str) -> Result<(TcpListener, SocketAddr), DaemonError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Listen {
            what: format!("tcp {addr}"),
            source,
        })?;
    let bound = listener.local_addr()?;
    Ok((listener, bound))
}

/// A listening socket the [`Incoming`] stream accepts from.
pub trait Accept: Unpin + Send + 'static {
    type Raw;
    type Io;
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Raw>>;
    /// Whether the peer may connect at all (checked before the limits).
    fn admit(&self, raw: &Self::Raw) -> bool;
    fn peer(raw: &Self::Raw) -> PeerKey;
    /// The stream the server reads.
    fn prepare(raw: Self::Raw) -> Self::Io;
}

/// The TCP listener. Its connections skip Nagle's algorithm, which would
/// hold back the last frame of a response waiting for an ACK (40 ms tails),
/// and a loopback peer's get [`kvstrata_types::sockets::LOOPBACK_CONGESTION`]
/// (a pacing controller such as BBR spaces a large answer out with timers).
#[derive(Debug)]
pub struct TcpAccept(pub TcpListener);

impl Accept for TcpAccept {
    type Raw = TcpStream;
    type Io = TcpStream;

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<TcpStream>> {
        self.0.poll_accept(cx).map_ok(|(s, _)| s)
    }

    fn admit(&self, _: &TcpStream) -> bool {
        true
    }

    fn peer(raw: &TcpStream) -> PeerKey {
        PeerKey::of_tcp(raw)
    }

    fn prepare(raw: TcpStream) -> TcpStream {
        if crate::service::codec::tonic_path_requested() {
            let _ = raw.set_nodelay(true);
            return raw;
        }
        // No Nagle delay; a non-pacing congestion controller for a
        // loopback peer (see kvstrata_types::sockets).
        let tuned = raw
            .peer_addr()
            .and_then(|peer| kvstrata_types::sockets::tune_tcp(&raw, peer));
        if let Err(error) = tuned {
            tracing::debug!(%error, "could not tune a TCP connection");
        }
        raw
    }
}

/// A Unix-socket listener whose connections are wrapped so that grpc-core
/// clients' socket-path `:authority` is accepted (see [`AuthorityFix`]);
/// with `auth`, peers whose uid it does not allow are closed at accept
/// (`what` names the socket in the refusal log).
pub struct UnixAccept {
    pub listener: UnixListener,
    pub auth: Option<(Arc<Auth>, &'static str)>,
}

impl Accept for UnixAccept {
    type Raw = UnixStream;
    type Io = AuthorityFix<UnixStream>;

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<UnixStream>> {
        self.listener.poll_accept(cx).map_ok(|(s, _)| s)
    }

    fn admit(&self, raw: &UnixStream) -> bool {
        self.auth
            .as_ref()
            .is_none_or(|(auth, what)| auth.admit_unix_peer(what, raw))
    }

    fn peer(raw: &UnixStream) -> PeerKey {
        PeerKey::of_unix(raw)
    }

    fn prepare(raw: UnixStream) -> AuthorityFix<UnixStream> {
        if !crate::service::codec::tonic_path_requested()
            && let Err(error) = kvstrata_types::sockets::raise_unix_buffers(&raw)
        {
            tracing::debug!(%error, "could not raise a Unix socket's buffers");
        }
        AuthorityFix::new(raw)
    }
}

/// The accepted connections of one gRPC listener, as the server takes them:
/// each admitted by the daemon's connection limits and wrapped in
/// [`Tracked`] (handshake and idle deadlines); refused ones are closed at
/// once. A failed accept is counted, logged and followed by a short pause;
/// the stream never ends (the server stops polling it at shutdown).
pub struct Incoming<A: Accept> {
    accept: A,
    listener: ConnListener,
    limiter: Arc<ConnLimiter>,
    tls: bool,
    pause: Option<Pin<Box<Sleep>>>,
}

impl<A: Accept> Incoming<A> {
    /// `tls`: the connections start with a TLS handshake.
    pub fn new(accept: A, listener: ConnListener, limiter: Arc<ConnLimiter>, tls: bool) -> Self {
        Incoming {
            accept,
            listener,
            limiter,
            tls,
            pause: None,
        }
    }
}

impl<A: Accept> Stream for Incoming<A>
where
    A::Io: tonic::transport::server::Connected,
    <A::Io as tonic::transport::server::Connected>::ConnectInfo: super::conn::InnerConnectInfo,
{
    type Item = io::Result<Tracked<A::Io>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(pause) = this.pause.as_mut() {
                if pause.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.pause = None;
            }
            let raw = match this.accept.poll_accept(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(raw)) => raw,
                Poll::Ready(Err(e)) if is_connection_error(&e) => continue,
                Poll::Ready(Err(e)) => {
                    this.limiter.counters().accept_error();
                    tracing::warn!(listener = this.listener.label(), error = %e, "accept failed; pausing the listener for 100 ms");
                    this.pause = Some(Box::pin(tokio::time::sleep(ACCEPT_ERROR_PAUSE)));
                    continue;
                }
            };
            if !this.accept.admit(&raw) {
                continue;
            }
            let Ok(permit) = this.limiter.admit(this.listener, A::peer(&raw)) else {
                continue;
            };
            return Poll::Ready(Some(Ok(Tracked::new(A::prepare(raw), permit, this.tls))));
        }
    }
}

/// Errors of one connection that came and went before it was accepted.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// Raises the soft open-file limit to the hard one (connections, slot
/// files and the index all take descriptors); returns the soft limit now.
pub fn raise_open_file_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    Some(lim.rlim_cur)
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

#[cfg(test)]
mod tests {
    use super::*;
    use kvstrata_types::sockets;

    #[tokio::test]
    async fn an_accepted_loopback_connection_is_tuned() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let _client = client.unwrap();
        let stream = TcpAccept::prepare(accepted.unwrap().0);
        assert!(stream.nodelay().unwrap());
        assert_eq!(
            sockets::congestion(&stream).unwrap(),
            sockets::LOOPBACK_CONGESTION
        );
    }
}
