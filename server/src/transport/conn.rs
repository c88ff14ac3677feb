//! Each accepted gRPC connection: admitted by the connection limits
//! ([`ConnLimiter`]), then wrapped in [`Tracked`], which closes it when its
//! handshake does not complete in time or when it stays without a call for
//! the idle timeout.
//!
//! The wrapper sits under hyper (and under TLS), so it closes a connection
//! the only way it can: its next read or write fails with `TimedOut` and
//! hyper drops the connection. Which calls are open is counted above, by
//! [`super::grpc_guard`], through the [`ConnInfo`] every request of the
//! connection carries.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo, UdsConnectInfo};

use crate::config::ServerConfig;
use crate::metrics::{ConnClosed, ConnCounters, ConnListener, ConnRefused};

/// The connection settings of `[server]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnSettings {
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    pub handshake_timeout: Duration,
    /// `None`: idle connections stay open.
    pub idle_timeout: Option<Duration>,
    /// `None`: no HTTP/2 keepalive pings.
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Duration,
}

impl ConnSettings {
    pub fn from_config(s: &ServerConfig) -> ConnSettings {
        let ms = Duration::from_millis;
        ConnSettings {
            max_connections: s.max_connections,
            max_connections_per_peer: s.max_connections_per_peer,
            handshake_timeout: ms(s.handshake_timeout_ms),
            idle_timeout: (s.idle_timeout_ms > 0).then(|| ms(s.idle_timeout_ms)),
            keepalive_interval: (s.keepalive_interval_ms > 0).then(|| ms(s.keepalive_interval_ms)),
            keepalive_timeout: ms(s.keepalive_timeout_ms),
        }
    }
}

/// Who a connection comes from, for `server.max_connections_per_peer`: a TCP
/// client by its IP address (whatever its port), a Unix-socket client by its
/// process (every local client usually runs as the daemon's own uid), or by
/// its uid when the kernel reports no pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerKey {
    Ip(IpAddr),
    Process(i32),
    User(u32),
    /// No address or credentials (counted against the daemon limit only).
    Unknown,
}

impl PeerKey {
    pub fn of_tcp(stream: &tokio::net::TcpStream) -> PeerKey {
        stream
            .peer_addr()
            .map_or(PeerKey::Unknown, |a| PeerKey::Ip(a.ip().to_canonical()))
    }

    pub fn of_unix(stream: &tokio::net::UnixStream) -> PeerKey {
        match stream.peer_cred() {
            Ok(c) => c.pid().map_or(PeerKey::User(c.uid()), PeerKey::Process),
            Err(_) => PeerKey::Unknown,
        }
    }
}

impl std::fmt::Display for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerKey::Ip(a) => write!(f, "{a}"),
            PeerKey::Process(p) => write!(f, "pid {p}"),
            PeerKey::User(u) => write!(f, "uid {u}"),
            PeerKey::Unknown => f.write_str("unknown peer"),
        }
    }
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    per_peer: HashMap<PeerKey, usize>,
}

/// The connection limits of one daemon, shared by its gRPC listeners, and
/// its connection counters.
#[derive(Debug)]
pub struct ConnLimiter {
    settings: ConnSettings,
    open: Mutex<Open>,
    counters: Arc<ConnCounters>,
    /// When a refusal was last logged (ms since `epoch`), to log at most one a second.
    last_refusal_log: AtomicU64,
    epoch: Instant,
}

impl ConnLimiter {
    pub fn new(settings: ConnSettings, counters: Arc<ConnCounters>) -> Arc<ConnLimiter> {
        Arc::new(ConnLimiter {
            settings,
            open: Mutex::new(Open::default()),
            counters,
            last_refusal_log: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    pub fn settings(&self) -> &ConnSettings {
        &self.settings
    }

    pub fn counters(&self) -> &Arc<ConnCounters> {
        &self.counters
    }

    /// Admits a new connection of `peer` on `listener`, or refuses it (the
    /// refusal is counted and logged, at most once a second).
    pub fn admit(
        self: &Arc<Self>,
        listener: ConnListener,
        peer: PeerKey,
    ) -> Result<ConnPermit, ConnRefused> {
        let refused = {
            let mut open = self.open.lock();
            let of_peer = match peer {
                PeerKey::Unknown => 0,
                _ => open.per_peer.get(&peer).copied().unwrap_or(0),
            };
            if open.total >= self.settings.max_connections {
                Some((ConnRefused::DaemonLimit, open.total, of_peer))
            } else if of_peer >= self.settings.max_connections_per_peer {
                Some((ConnRefused::PeerLimit, open.total, of_peer))
            } else {
                open.total += 1;
                if peer != PeerKey::Unknown {
                    *open.per_peer.entry(peer).or_insert(0) += 1;
                }
                None
            }
        };
        if let Some((reason, total, of_peer)) = refused {
            self.counters.refused(reason);
            if self.may_log() {
                tracing::warn!(
                    listener = listener.label(),
                    %peer,
                    open = total,
                    open_of_peer = of_peer,
                    max_connections = self.settings.max_connections,
                    max_connections_per_peer = self.settings.max_connections_per_peer,
                    reason = reason.label(),
                    "connection refused: too many connections (server.max_connections / server.max_connections_per_peer); further refusals within 1 s are only counted"
                );
            }
            return Err(reason);
        }
        self.counters.opened(listener);
        Ok(ConnPermit {
            limiter: Arc::clone(self),
            listener,
            peer,
        })
    }

    /// Whether a rate-limited warning may be logged now (one a second).
    fn may_log(&self) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64 + 1000;
        let last = self.last_refusal_log.load(Ordering::Relaxed);
        now >= last + 1000
            && self
                .last_refusal_log
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    fn release(&self, listener: ConnListener, peer: PeerKey) {
        let mut open = self.open.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_peer.get_mut(&peer) {
            *n -= 1;
            if *n == 0 {
                open.per_peer.remove(&peer);
            }
        }
        drop(open);
        self.counters.closed(listener);
    }
}

/// One admitted connection's place under the limits, given back when dropped.
#[derive(Debug)]
pub struct ConnPermit {
    limiter: Arc<ConnLimiter>,
    listener: ConnListener,
    peer: PeerKey,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.limiter.release(self.listener, self.peer);
    }
}

/// What the requests of one connection share: the calls open on it and
/// since when it has had none.
#[derive(Debug)]
pub struct ConnState {
    open_calls: AtomicUsize,
    /// Milliseconds since `epoch` when the last call ended (or the
    /// connection was accepted).
    idle_since_ms: AtomicU64,
    epoch: Instant,
}

impl ConnState {
    fn new() -> ConnState {
        ConnState {
            open_calls: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// A call started; it counts as open until the guard is dropped.
    pub fn call_started(self: &Arc<Self>) -> CallGuard {
        self.open_calls.fetch_add(1, Ordering::AcqRel);
        CallGuard {
            conn: Arc::clone(self),
        }
    }

    fn open_calls(&self) -> usize {
        self.open_calls.load(Ordering::Acquire)
    }

    fn idle_since(&self) -> Instant {
        self.epoch + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire))
    }

    fn mark_idle_now(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.idle_since_ms.store(ms, Ordering::Release);
    }
}

/// One open call of a connection (see [`ConnState::call_started`]).
#[derive(Debug)]
pub struct CallGuard {
    conn: Arc<ConnState>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.conn.open_calls.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.conn.mark_idle_now();
        }
    }
}

/// The connection info of a [`Tracked`] connection, which tonic attaches to
/// each of its requests: the connection's call counter, and the info of the
/// stream underneath, which [`super::grpc_guard`] attaches in turn for the
/// layers that read it (the auth interceptor, the per-peer request limits).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub conn: Arc<ConnState>,
    pub tcp: Option<TcpConnectInfo>,
    pub uds: Option<UdsConnectInfo>,
}

/// The connect info types a tracked stream may carry underneath.
pub trait InnerConnectInfo {
    fn into_parts(self) -> (Option<TcpConnectInfo>, Option<UdsConnectInfo>);
}

impl InnerConnectInfo for TcpConnectInfo {
    fn into_parts(self) -> (Option<TcpConnectInfo>, Option<UdsConnectInfo>) {
        (Some(self), None)
    }
}

impl InnerConnectInfo for UdsConnectInfo {
    fn into_parts(self) -> (Option<TcpConnectInfo>, Option<UdsConnectInfo>) {
        (None, Some(self))
    }
}

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const H2_PREFACE_BYTES: usize = 24;
const H2_FRAME_HEADER_BYTES: usize = 9;
const TLS_RECORD_HEADER_BYTES: usize = 5;
const TLS_APPLICATION_DATA: u8 = 23;

/// How far the client's side of the handshake has come. The bytes are
/// only counted, never changed: hyper (or rustls) checks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handshake {
    /// Plain HTTP/2: preface bytes still to come.
    Preface(usize),
    /// Plain HTTP/2: the first frame's header, `n` bytes of it seen.
    FrameHeader { seen: usize, len: usize },
    /// Plain HTTP/2: payload bytes of the first frame (SETTINGS) to come.
    FramePayload(usize),
    /// TLS: the header of a record, `n` bytes of it seen, and its type.
    TlsHeader { seen: usize, kind: u8, len: usize },
    /// TLS: bytes of a handshake record to skip.
    TlsBody(usize),
    /// Complete: plain HTTP/2 got its preface and first frame; TLS got its
    /// first application-data record (the handshake is over and the client
    /// is talking HTTP/2).
    Done,
}

impl Handshake {
    fn new(tls: bool) -> Handshake {
        if tls {
            Handshake::TlsHeader {
                seen: 0,
                kind: 0,
                len: 0,
            }
        } else {
            Handshake::Preface(H2_PREFACE_BYTES)
        }
    }

    /// Moves over bytes the client sent.
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match *self {
                Handshake::Preface(left) => {
                    let n = left.min(bytes.len());
                    bytes = &bytes[n..];
                    *self = if n == left {
                        Handshake::FrameHeader { seen: 0, len: 0 }
                    } else {
                        Handshake::Preface(left - n)
                    };
                }
                Handshake::FrameHeader { mut seen, mut len } => {
                    while seen < H2_FRAME_HEADER_BYTES && !bytes.is_empty() {
                        if seen < 3 {
                            len = (len << 8) | usize::from(bytes[0]);
                        }
                        seen += 1;
                        bytes = &bytes[1..];
                    }
                    *self = if seen == H2_FRAME_HEADER_BYTES {
                        if len == 0 {
                            Handshake::Done
                        } else {
                            Handshake::FramePayload(len)
                        }
                    } else {
                        Handshake::FrameHeader { seen, len }
                    };
                }
                Handshake::FramePayload(left) => {
                    let n = left.min(bytes.len());
                    bytes = &bytes[n..];
                    *self = if n == left {
                        Handshake::Done
                    } else {
                        Handshake::FramePayload(left - n)
                    };
                }
                Handshake::TlsHeader {
                    mut seen,
                    mut kind,
                    mut len,
                } => {
                    while seen < TLS_RECORD_HEADER_BYTES && !bytes.is_empty() {
                        match seen {
                            0 => kind = bytes[0],
                            3 | 4 => len = (len << 8) | usize::from(bytes[0]),
                            _ => {}
                        }
                        seen += 1;
                        bytes = &bytes[1..];
                    }
                    *self = if seen < TLS_RECORD_HEADER_BYTES {
                        Handshake::TlsHeader { seen, kind, len }
                    } else if kind == TLS_APPLICATION_DATA {
                        Handshake::Done
                    } else {
                        Handshake::TlsBody(len)
                    };
                }
                Handshake::TlsBody(left) => {
                    let n = left.min(bytes.len());
                    bytes = &bytes[n..];
                    *self = if n == left {
                        Handshake::TlsHeader {
                            seen: 0,
                            kind: 0,
                            len: 0,
                        }
                    } else {
                        Handshake::TlsBody(left - n)
                    };
                }
                Handshake::Done => return,
            }
        }
    }
}

/// An accepted connection under the daemon's deadlines: closed (its reads
/// and writes fail with `TimedOut`) when the handshake is not complete
/// within `handshake_timeout`, or when no call has been open on it for
/// `idle_timeout`. Holds its [`ConnPermit`] until dropped.
#[derive(Debug)]
pub struct Tracked<S> {
    inner: S,
    info: ConnInfo,
    handshake: Handshake,
    /// The next deadline to check; `None` once there is none left (the
    /// handshake is done and there is no idle timeout).
    timer: Option<Pin<Box<Sleep>>>,
    idle_timeout: Option<Duration>,
    handshake_timeout: Duration,
    /// Set once a deadline closed the connection.
    expired: Option<ConnClosed>,
    counters: Arc<ConnCounters>,
    _permit: ConnPermit,
}

impl<S: Connected> Tracked<S>
where
    S::ConnectInfo: InnerConnectInfo,
{
    /// Wraps an admitted stream; `tls` when a TLS handshake comes first.
    pub fn new(inner: S, permit: ConnPermit, tls: bool) -> Tracked<S> {
        let limiter = Arc::clone(&permit.limiter);
        let settings = limiter.settings();
        let (tcp, uds) = inner.connect_info().into_parts();
        Tracked {
            inner,
            info: ConnInfo {
                conn: Arc::new(ConnState::new()),
                tcp,
                uds,
            },
            handshake: Handshake::new(tls),
            timer: Some(Box::pin(tokio::time::sleep(settings.handshake_timeout))),
            idle_timeout: settings.idle_timeout,
            handshake_timeout: settings.handshake_timeout,
            expired: None,
            counters: Arc::clone(limiter.counters()),
            _permit: permit,
        }
    }
}

impl<S> Tracked<S> {
    fn expired_error(reason: ConnClosed) -> io::Error {
        let what = match reason {
            ConnClosed::HandshakeTimeout => "no handshake within server.handshake_timeout_ms",
            ConnClosed::IdleTimeout => "no call within server.idle_timeout_ms",
        };
        io::Error::new(io::ErrorKind::TimedOut, what)
    }

    /// Counts client bytes toward the handshake; once it is complete the
    /// timer turns to the idle deadline.
    fn saw_client_bytes(&mut self, bytes: &[u8]) {
        if self.handshake == Handshake::Done || bytes.is_empty() {
            return;
        }
        self.handshake.feed(bytes);
        if self.handshake == Handshake::Done {
            self.info.conn.mark_idle_now();
            self.timer = self.idle_timeout.map(|t| Box::pin(tokio::time::sleep(t)));
        }
    }

    /// Polls the deadline: `Ready(reason)` when the connection must close.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<ConnClosed> {
        if let Some(reason) = self.expired {
            return Poll::Ready(reason);
        }
        loop {
            let Some(timer) = self.timer.as_mut() else {
                return Poll::Pending;
            };
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let reason = if self.handshake != Handshake::Done {
                ConnClosed::HandshakeTimeout
            } else {
                let Some(idle) = self.idle_timeout else {
                    self.timer = None;
                    return Poll::Pending;
                };
                let now = Instant::now();
                let conn = &self.info.conn;
                if conn.open_calls() > 0 {
                    // Look again one idle period from now; the last call to
                    // end moves the deadline on.
                    timer.as_mut().reset((now + idle).into());
                    continue;
                }
                let deadline = conn.idle_since() + idle;
                if deadline > now {
                    timer.as_mut().reset(deadline.into());
                    continue;
                }
                ConnClosed::IdleTimeout
            };
            self.expired = Some(reason);
            self.counters.closed_by_daemon(reason);
            match reason {
                ConnClosed::HandshakeTimeout => tracing::debug!(
                    timeout_ms = self.handshake_timeout.as_millis() as u64,
                    "connection closed: handshake not complete in time"
                ),
                ConnClosed::IdleTimeout => tracing::debug!(
                    timeout_ms = self.idle_timeout.map_or(0, |t| t.as_millis() as u64),
                    "connection closed: idle"
                ),
            }
            return Poll::Ready(reason);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(reason) = this.expired {
            return Poll::Ready(Err(Self::expired_error(reason)));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.saw_client_bytes(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.poll_deadline(cx) {
                Poll::Ready(reason) => Poll::Ready(Err(Self::expired_error(reason))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(reason) = this.expired {
            return Poll::Ready(Err(Self::expired_error(reason)));
        }
        match Pin::new(&mut this.inner).poll_write(cx, data) {
            Poll::Pending => match this.poll_deadline(cx) {
                Poll::Ready(reason) => Poll::Ready(Err(Self::expired_error(reason))),
                Poll::Pending => Poll::Pending,
            },
            ready => ready,
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(reason) = this.expired {
            return Poll::Ready(Err(Self::expired_error(reason)));
        }
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => match this.poll_deadline(cx) {
                Poll::Ready(reason) => Poll::Ready(Err(Self::expired_error(reason))),
                Poll::Pending => Poll::Pending,
            },
            ready => ready,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(reason) = this.expired {
            return Poll::Ready(Err(Self::expired_error(reason)));
        }
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => match this.poll_deadline(cx) {
                Poll::Ready(reason) => Poll::Ready(Err(Self::expired_error(reason))),
                Poll::Pending => Poll::Pending,
            },
            ready => ready,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S> Connected for Tracked<S> {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done_after(tls: bool, wire: &[u8], chunk: usize) -> Option<usize> {
        let mut h = Handshake::new(tls);
        let mut fed = 0;
        for piece in wire.chunks(chunk) {
            h.feed(piece);
            fed += piece.len();
            if h == Handshake::Done {
                return Some(fed);
            }
        }
        None
    }

    #[test]
    fn http2_handshake_is_the_preface_and_the_first_frame() {
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // SETTINGS with one setting (6 bytes), then a HEADERS frame.
        wire.extend([0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100]);
        wire.extend([0, 0, 1, 1, 4, 0, 0, 0, 1, 0x83]);
        for chunk in [1, 2, 7, 24, 1000] {
            assert_eq!(done_after(false, &wire, chunk).map(|n| n.min(39)), Some(39));
        }
        assert_eq!(done_after(false, &wire[..38], 1), None);
        // An empty SETTINGS frame completes at its header.
        let mut empty = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        empty.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(done_after(false, &empty, 1), Some(33));
    }

    #[test]
    fn tls_handshake_ends_at_the_first_application_data_record() {
        // ClientHello (handshake, 22), ChangeCipherSpec (20), then application data (23).
        let mut wire = vec![22, 3, 1, 0, 4, 1, 2, 3, 4];
        wire.extend([20, 3, 3, 0, 1, 1]);
        wire.extend([23, 3, 3, 0, 2, 9, 9]);
        assert_eq!(done_after(true, &wire, 1), Some(20));
        assert_eq!(done_after(true, &wire[..19], 3), None);
    }
}
