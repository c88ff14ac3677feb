//! Overload protection and request deadlines for the gRPC services.
//!
//! [`Limited`] wraps a generated tonic service (`KvCacheServer`,
//! `StorageServerServer`) and, before the request body is even decoded:
//!
//! - refuses a request at once with `RESOURCE_EXHAUSTED` ("overloaded: N
//!   requests in flight") when `server.max_inflight_requests` requests are
//!   already executing — nothing queues without bound;
//! - refuses it the same way ("overloaded: per-peer limit: this client (…)
//!   has N requests in flight") when its [`Peer`] — the client's IP address on
//!   TCP, its process on a Unix socket — already holds
//!   `server.max_inflight_per_peer` of them, so that one client holding its
//!   share (idle streams, say) leaves room for every other;
//! - bounds the request by its deadline: the client's `grpc-timeout` or
//!   `server.request_timeout_ms`, whichever is shorter. A unary request past
//!   it ends with `DEADLINE_EXCEEDED` (a tenth, at most 50 ms, before a client
//!   deadline, so that the client reads the daemon's answer). Streaming calls (`GetStream`,
//!   `PutStream`, `Watch`) are bounded only by a client `grpc-timeout`
//!   (a `Watch` may rightly last for days); the service checks it between
//!   messages (see [`Deadline`]). The handler's own task can read when the
//!   daemon gives the call up ([`request_cutoff`]): work it hands to the
//!   blocking pool may start after that, and must not then touch an engine's
//!   KV pages.
//!
//! The permit of a streaming call travels in the request extensions
//! ([`InflightPermit`]) so the service can keep it until the stream ends.
//!
//! A request message that does not decode is the client's fault, but tonic
//! answers it `INTERNAL` (prost's "failed to decode Protobuf message: …"):
//! [`Limited`] turns such answers — in the headers of a unary or
//! server-streaming call, in the trailers of `PutStream` — into
//! `INVALID_ARGUMENT`, naming the call and keeping prost's account of which
//! field failed ([`client_fault`]).
//!
//! [`BlockingPool`] bounds the cache work the services run on tokio's blocking
//! pool: at most `server.max_blocking_tasks` run at once; the others wait
//! (asynchronously, each within its request's deadline, and their number is
//! bounded by the in-flight cap).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tonic::codegen::http;
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, UdsConnectInfo};
use tonic::{Code, Status};

use crate::metrics::Metrics;
use prometheus_client::metrics::gauge::Gauge;

/// The limits [`Limited`] and [`BlockingPool`] enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Requests executing at once (streams count until they end); beyond, refused.
    pub max_inflight: usize,
    /// Requests one [`Peer`] may have executing at once; beyond, refused.
    pub max_inflight_per_peer: usize,
    /// Deadline of a unary request that names none (or a longer one).
    pub request_timeout: Duration,
    /// Cache calls running on the blocking pool at once.
    pub max_blocking: usize,
}

/// Holds one in-flight slot (and its peer's share); a streaming handler
/// clones it into its task.
#[derive(Debug, Clone)]
pub struct InflightPermit(Arc<Held>);

impl InflightPermit {
    /// When [`Limited`] admitted the call, before its message was decoded:
    /// handlers time their requests from it (debug lines).
    pub fn received(&self) -> std::time::Instant {
        self.0.received
    }
}

/// What an in-flight request holds: a slot of the daemon-wide cap, and one
/// of its peer's share when the peer is known.
#[derive(Debug)]
pub struct Held {
    _slot: Slot,
    _peer: Option<PeerSlot>,
    received: std::time::Instant,
}

/// Who a request comes from, for the per-peer share of the in-flight cap
/// (`server.max_inflight_per_peer`).
///
/// A TCP client is its IP address: every connection from one host is one
/// peer, whatever its port or token (clients behind one NAT share a share).
/// A Unix-socket client is its process (`SO_PEERCRED`), since every local
/// client usually runs as the daemon's own uid. The bearer token's tenant is
/// not the key: one tenant's many engines on many hosts each get a share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    /// A TCP client, by source address.
    Ip(IpAddr),
    /// A Unix-socket client, by process id.
    Process(i32),
    /// A Unix-socket client whose pid the kernel did not report, by uid.
    User(u32),
}

impl Peer {
    /// The peer of a request, from the connection info the server attaches
    /// (`None` when there is none, e.g. a service called in-process).
    pub fn of<B>(req: &http::Request<B>) -> Option<Peer> {
        let ext = req.extensions();
        // With TLS, tonic attaches the inner TcpConnectInfo too.
        if let Some(tcp) = ext.get::<TcpConnectInfo>() {
            return tcp.remote_addr().map(|a| Peer::Ip(a.ip().to_canonical()));
        }
        let cred = ext.get::<UdsConnectInfo>()?.peer_cred?;
        Some(cred.pid().map_or(Peer::User(cred.uid()), Peer::Process))
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Ip(a) => write!(f, "{a}"),
            Peer::Process(p) => write!(f, "pid {p}"),
            Peer::User(u) => write!(f, "uid {u}"),
        }
    }
}

/// Requests in flight per peer (peers with none are not kept).
#[derive(Debug, Default)]
struct PeerCounts(Mutex<HashMap<Peer, usize>>);

/// One in-flight request of a peer, given back when dropped.
#[derive(Debug)]
pub struct PeerSlot {
    counts: Arc<PeerCounts>,
    peer: Peer,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut map = self.counts.0.lock();
        if let Entry::Occupied(mut e) = map.entry(self.peer) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

/// An in-flight slot, counted in the `kvstrata_requests_in_flight` gauge.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    gauge: Gauge,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, gauge: Gauge) -> Self {
        gauge.inc();
        Slot {
            _permit: permit,
            gauge,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// The deadline a client gave a call (`grpc-timeout`), as a request extension.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(pub Instant);

impl Deadline {
    pub fn passed(&self) -> bool {
        Instant::now() >= self.0
    }

    pub fn status(&self) -> Status {
        Status::deadline_exceeded("deadline exceeded: the client's grpc-timeout has passed")
    }
}

tokio::task_local! {
    /// When the daemon gives up on the unary call its task is handling: the
    /// instant [`Limited`] answers it `DEADLINE_EXCEEDED` ([`request_cutoff`]).
    static CUTOFF: Instant;
}

/// The instant at which the daemon answers the unary call being handled
/// `DEADLINE_EXCEEDED` (its client's `grpc-timeout`, a little early, or
/// `server.request_timeout_ms`). Known in the call's own task only: a handler
/// reads it before it hands work to the blocking pool or spawns a task, and
/// work that must not start late (a KV-region gather or scatter) checks it
/// there. `None` where no deadline bounds the call ([`Limited`] sets it around
/// the handler's future).
pub fn request_cutoff() -> Option<Instant> {
    CUTOFF.try_with(|c| *c).ok()
}

thread_local! {
    /// The cutoff of the region call this thread is serving ([`with_thread_cutoff`]).
    static THREAD_CUTOFF: std::cell::Cell<Option<std::time::Instant>> =
        const { std::cell::Cell::new(None) };
}

/// Runs `f` with `cutoff` as this thread's request cutoff
/// ([`thread_cutoff`]): a region call is served on its connection's own
/// thread, not in a task, and work that must not start late checks it as it
/// checks [`request_cutoff`].
pub fn with_thread_cutoff<R>(cutoff: std::time::Instant, f: impl FnOnce() -> R) -> R {
    struct Reset(Option<std::time::Instant>);
    impl Drop for Reset {
        fn drop(&mut self) {
            THREAD_CUTOFF.with(|c| c.set(self.0));
        }
    }
    let _reset = Reset(THREAD_CUTOFF.with(|c| c.replace(Some(cutoff))));
    f()
}

/// The cutoff [`with_thread_cutoff`] set on this thread, if any.
pub fn thread_cutoff() -> Option<std::time::Instant> {
    THREAD_CUTOFF.with(|c| c.get())
}

/// A unary call's deadline from its client's timeout `t`: a little before
/// it (so the answer reaches the client in time), and never after the
/// daemon's own `request_timeout`.
pub fn call_timeout(t: Option<Duration>, request_timeout: Duration) -> Duration {
    t.map_or(request_timeout, |t| early(t).min(request_timeout))
}

/// Shared state of every [`Limited`] service of one daemon.
#[derive(Debug)]
pub struct Limiter {
    inflight: Arc<Semaphore>,
    peers: Arc<PeerCounts>,
    limits: RequestLimits,
    metrics: Arc<Metrics>,
}

impl Limiter {
    pub fn new(limits: RequestLimits, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Limiter {
            inflight: Arc::new(Semaphore::new(limits.max_inflight)),
            peers: Arc::default(),
            limits,
            metrics,
        })
    }

    /// Requests executing now.
    pub fn in_flight(&self) -> usize {
        self.limits
            .max_inflight
            .saturating_sub(self.inflight.available_permits())
    }

    /// Requests `peer` has executing now.
    pub fn in_flight_of(&self, peer: Peer) -> usize {
        self.peers.0.lock().get(&peer).copied().unwrap_or(0)
    }

    /// Takes one of `peer`'s share, or `Err` with the requests it holds.
    fn take_peer_slot(&self, peer: Peer) -> Result<PeerSlot, usize> {
        let mut map = self.peers.0.lock();
        let n = map.entry(peer).or_insert(0);
        if *n >= self.limits.max_inflight_per_peer {
            return Err(*n);
        }
        *n += 1;
        Ok(PeerSlot {
            counts: Arc::clone(&self.peers),
            peer,
        })
    }

    /// The in-flight slots for a request from `peer`, or the refusal
    /// (counted). The daemon-wide cap is checked first: when it is full,
    /// that is what every caller is told.
    fn admit(&self, peer: Option<Peer>, path: &str) -> Result<InflightPermit, Status> {
        let Ok(permit) = Arc::clone(&self.inflight).try_acquire_owned() else {
            self.metrics.record_rejected("overloaded");
            let n = self.limits.max_inflight;
            tracing::debug!(path, "refused: overloaded");
            return Err(Status::resource_exhausted(format!(
                "overloaded: {n} requests in flight (server.max_inflight_requests); retry later"
            )));
        };
        let peer_slot = match peer.map(|p| (p, self.take_peer_slot(p))) {
            None => None,
            Some((_, Ok(s))) => Some(s),
            Some((p, Err(n))) => {
                self.metrics.record_rejected("peer_limit");
                tracing::debug!(path, peer = %p, in_flight = n, "refused: per-peer limit");
                return Err(Status::resource_exhausted(format!(
                    "overloaded: per-peer limit: this client ({p}) has {n} requests in flight \
                     (server.max_inflight_per_peer); retry later, or end idle streams"
                )));
            }
        };
        Ok(InflightPermit(Arc::new(Held {
            _slot: Slot::new(permit, self.metrics.in_flight_gauge()),
            _peer: peer_slot,
            received: std::time::Instant::now(),
        })))
    }
}

/// Paths whose calls stream (their deadline is the client's alone).
fn is_streaming(path: &str) -> bool {
    path.ends_with("/GetStream") || path.ends_with("/PutStream") || path.ends_with("/Watch")
}

/// Parses a `grpc-timeout` header value: up to 8 digits and a unit
/// (`H`, `M`, `S`, `m`, `u`, `n`).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if !v.is_ascii() {
        return None;
    }
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A unary call given a client deadline ends a little before it (a tenth,
/// at most 50 ms): the client then reads the daemon's DEADLINE_EXCEEDED rather
/// than cancelling on its own timer, and knows the daemon gave the call up.
fn early(t: Duration) -> Duration {
    t.saturating_sub((t / 10).min(Duration::from_millis(50)))
}

/// A generated tonic service with the in-flight cap and deadlines in front.
#[derive(Debug, Clone)]
pub struct Limited<S> {
    inner: S,
    limiter: Arc<Limiter>,
}

impl<S> Limited<S> {
    pub fn new(inner: S, limiter: Arc<Limiter>) -> Self {
        Limited { inner, limiter }
    }
}

impl<S: NamedService> NamedService for Limited<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Limited<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let limiter = Arc::clone(&self.limiter);
        let permit = match limiter.admit(Peer::of(&req), req.uri().path()) {
            Ok(p) => p,
            Err(status) => return Box::pin(async move { Ok(status.into_http()) }),
        };
        let uri = req.uri().clone();
        let client_timeout = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let streaming = is_streaming(req.uri().path());
        let now = Instant::now();
        if let Some(t) = client_timeout {
            req.extensions_mut().insert(Deadline(now + t));
        }
        req.extensions_mut().insert(permit.clone());
        let timeout = match (streaming, client_timeout) {
            (true, t) => t,
            (false, t) => Some(call_timeout(t, limiter.limits.request_timeout)),
        };
        // The service may not be ready for another call: take the ready one
        // and leave a fresh clone (tower's rule for cloned services).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let _permit = permit;
            let fut = inner.call(req);
            let Some(t) = timeout else {
                return fut.await.map(|r| answer_client_faults(r, uri));
            };
            match tokio::time::timeout_at(now + t, CUTOFF.scope(now + t, fut)).await {
                Ok(r) => r.map(|r| answer_client_faults(r, uri)),
                Err(_) => {
                    limiter.metrics.record_rejected("deadline");
                    Ok(Status::deadline_exceeded(format!(
                        "deadline exceeded: {} ms (the client's grpc-timeout or server.request_timeout_ms)",
                        t.as_millis()
                    ))
                    .into_http())
                }
            }
        })
    }
}

/// The `INVALID_ARGUMENT` that a decoding failure of the request (the
/// client's fault, which tonic answers `INTERNAL`) becomes; `None` for every
/// other status. `call` is the method (`BatchPut`).
pub fn client_fault(status: &Status, call: &str) -> Option<Status> {
    if status.code() != Code::Internal {
        return None;
    }
    let m = status.message();
    let what = if m.starts_with("failed to decode Protobuf message")
        || m.starts_with("protocol error:")
        || m == "Unexpected EOF decoding stream."
    {
        m
    } else if m == "Missing request message." {
        "no message"
    } else {
        return None;
    };
    Some(Status::invalid_argument(format!(
        "request: the {call} request does not decode: {what}"
    )))
}

/// The method named by a gRPC path (`/kvstrata.v1.KvCache/BatchPut`).
fn method_of(uri: &http::Uri) -> &str {
    uri.path().rsplit('/').next().unwrap_or_default()
}

/// Rewrites a decode failure in `headers` (a trailers-only answer, or the
/// trailers of a stream) as [`client_fault`] says.
fn rewrite_client_fault(headers: &mut http::HeaderMap, uri: &http::Uri) {
    if headers.get("grpc-status").is_none_or(|v| v != "13") {
        return;
    }
    let Some(fault) =
        Status::from_header_map(headers).and_then(|s| client_fault(&s, method_of(uri)))
    else {
        return;
    };
    for h in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        headers.remove(h);
    }
    if fault.add_header(headers).is_err() {
        tracing::warn!(call = method_of(uri), "cannot encode a decode-error status");
    }
}

/// An answer with its decode failures rewritten: a unary or server-streaming
/// call fails to decode its one request before the handler runs, answered in
/// the headers; a client stream (`PutStream`) fails in its trailers.
fn answer_client_faults(
    mut resp: http::Response<tonic::body::Body>,
    uri: http::Uri,
) -> http::Response<tonic::body::Body> {
    if resp.headers().contains_key("grpc-status") {
        rewrite_client_fault(resp.headers_mut(), &uri);
        return resp;
    }
    if !uri.path().ends_with("/PutStream") {
        return resp;
    }
    resp.map(|inner| tonic::body::Body::new(FaultTrailers { inner, uri }))
}

/// A response body whose trailers go through [`rewrite_client_fault`].
struct FaultTrailers {
    inner: tonic::body::Body,
    uri: http::Uri,
}

impl http_body::Body for FaultTrailers {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => match frame.into_trailers() {
                Ok(mut trailers) => {
                    rewrite_client_fault(&mut trailers, &this.uri);
                    Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
                }
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            other => Poll::Ready(other),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Bounds cache work on tokio's blocking pool.
#[derive(Debug, Clone)]
pub struct BlockingPool {
    slots: Arc<Semaphore>,
    max: usize,
    gauge: Gauge,
}

impl BlockingPool {
    /// At most `max` calls at once, counted in `gauge`.
    pub fn new(max: usize, gauge: Gauge) -> Self {
        BlockingPool {
            slots: Arc::new(Semaphore::new(max.max(1))),
            max: max.max(1),
            gauge,
        }
    }

    /// Blocking calls running now.
    pub fn running(&self) -> usize {
        self.max.saturating_sub(self.slots.available_permits())
    }

    /// Runs `f` on the blocking pool once a slot is free. A caller dropped
    /// while waiting (its deadline passed, its client left) never runs `f`;
    /// once started, `f` runs to the end.
    pub async fn run<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Status> {
        let permit = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("shutting down"))?;
        let slot = Slot::new(permit, self.gauge.clone());
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            f()
        })
        .await
        .map_err(|e| Status::internal(format!("{what} task failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout(""), None);
        assert_eq!(parse_grpc_timeout("1x"), None);
        assert_eq!(parse_grpc_timeout("-1S"), None);
    }

    #[test]
    fn limits_are_validated() {
        let mut c = crate::Config::default();
        c.server.request_timeout_ms = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("server.request_timeout_ms"), "{e}");
        let mut c = crate::Config::default();
        c.server.max_inflight_requests = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("server.max_inflight_requests"), "{e}");
        let mut c = crate::Config::default();
        c.server.max_blocking_tasks = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("server.max_blocking_tasks"), "{e}");
        let d = crate::Config::default().server;
        assert_eq!(
            (
                d.request_timeout_ms,
                d.max_inflight_requests,
                d.max_blocking_tasks
            ),
            (30_000, 1024, 64)
        );
    }

    #[test]
    fn the_per_peer_share_is_half_the_cap_by_default_and_checked() {
        let mut c = crate::Config::default();
        assert_eq!(c.server.inflight_per_peer(), 512);
        c.server.max_inflight_requests = 3;
        assert_eq!(c.server.inflight_per_peer(), 2);
        c.server.max_inflight_per_peer = 3;
        assert_eq!(c.server.inflight_per_peer(), 3);
        c.validate().unwrap();
        c.server.max_inflight_per_peer = 4;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("server.max_inflight_per_peer"), "{e}");
    }

    fn limiter(max_inflight: usize, per_peer: usize) -> Arc<Limiter> {
        let config = kvstrata_tiers::CacheConfig {
            host: kvstrata_tiers::HostTierConfig {
                capacity_bytes: 1 << 20,
                segment_bytes: 1 << 20,
            },
            ..Default::default()
        };
        let cache = kvstrata_tiers::BlockCache::open(config, Vec::new(), None).unwrap();
        let pools = Arc::new(crate::shm::pool::PoolRegistry::new(
            crate::shm::pool::PoolLimits {
                max_pools: 1,
                max_pool_bytes: 1,
            },
        ));
        Limiter::new(
            RequestLimits {
                max_inflight,
                max_inflight_per_peer: per_peer,
                request_timeout: Duration::from_secs(1),
                max_blocking: 1,
            },
            Arc::new(Metrics::new(Arc::new(cache), pools)),
        )
    }

    #[test]
    fn each_peer_gets_its_share_and_gives_it_back() {
        let l = limiter(5, 2);
        let pid1 = Peer::Process(1);
        let (a, b) = (Some(pid1), Some(Peer::Ip(IpAddr::from([127, 0, 0, 1]))));
        let a1 = l.admit(a, "/x").unwrap();
        let a2 = l.admit(a, "/x").unwrap();
        let e = l.admit(a, "/x").unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted);
        assert!(
            e.message()
                .contains("per-peer limit: this client (pid 1) has 2"),
            "{e:?}"
        );
        let b1 = l.admit(b, "/x").unwrap();
        let b2 = l.admit(b, "/x").unwrap();
        // An unknown peer has the daemon-wide cap only.
        let u = l.admit(None, "/x").unwrap();
        let e = l.admit(None, "/x").unwrap_err();
        assert!(
            e.message().contains("overloaded: 5 requests in flight"),
            "{e:?}"
        );
        assert_eq!((l.in_flight(), l.in_flight_of(pid1)), (5, 2));
        // A clone held by a stream keeps the slot until the last one goes.
        let a1_stream = a1.clone();
        drop(a1);
        assert_eq!(l.in_flight_of(pid1), 2);
        drop(a1_stream);
        assert_eq!(l.in_flight_of(pid1), 1);
        drop((a2, b1, b2, u));
        assert_eq!((l.in_flight(), l.in_flight_of(pid1)), (0, 0));
        assert!(l.peers.0.lock().is_empty());
        assert_eq!(
            (
                l.metrics.rejected("peer_limit"),
                l.metrics.rejected("overloaded")
            ),
            (1, 1)
        );
    }

    #[test]
    fn decode_failures_are_the_clients_fault() {
        let s = Status::internal(
            "failed to decode Protobuf message: BatchGetRequest.keys: invalid wire type",
        );
        let f = client_fault(&s, "BatchGet").unwrap();
        assert_eq!(f.code(), Code::InvalidArgument);
        assert_eq!(
            f.message(),
            "request: the BatchGet request does not decode: failed to decode Protobuf message: BatchGetRequest.keys: invalid wire type"
        );
        let f = client_fault(&Status::internal("Missing request message."), "Stats").unwrap();
        assert_eq!(
            f.message(),
            "request: the Stats request does not decode: no message"
        );
        assert!(client_fault(&Status::internal("put task failed: x"), "BatchPut").is_none());
        assert!(
            client_fault(&Status::not_found("failed to decode Protobuf message"), "X").is_none()
        );
        // In headers (a trailers-only answer).
        let mut h = http::HeaderMap::new();
        s.add_header(&mut h).unwrap();
        let uri: http::Uri = "/kvstrata.v1.KvCache/BatchGet".parse().unwrap();
        rewrite_client_fault(&mut h, &uri);
        let back = Status::from_header_map(&h).unwrap();
        assert_eq!(back.code(), Code::InvalidArgument);
        assert!(back.message().contains("the BatchGet request"), "{back:?}");
    }

    #[test]
    fn a_client_deadline_is_answered_early() {
        assert_eq!(
            early(Duration::from_millis(200)),
            Duration::from_millis(180)
        );
        assert_eq!(early(Duration::from_secs(10)), Duration::from_millis(9950));
        assert_eq!(early(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn streaming_paths() {
        assert!(is_streaming("/kvstrata.v1.KvCache/Watch"));
        assert!(is_streaming("/kvstrata.v1.KvCache/GetStream"));
        assert!(!is_streaming("/kvstrata.v1.KvCache/BatchGet"));
    }
}
