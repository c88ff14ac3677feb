//! Overload protection and request deadlines for the gRPC services.
//!
//! [`Limited`] wraps a generated tonic service (`KvCacheServer`,
//! `StorageServerServer`) and, before the request body is even decoded:
//!
//! - refuses a request at once with `RESOURCE_EXHAUSTED` ("overloaded: N
//!   requests in flight") when `server.max_inflight_requests` requests are
//!   already executing — nothing queues without bound;
//! - bounds the request by its deadline: the client's `grpc-timeout` or
//!   `server.request_timeout_ms`, whichever is shorter. A unary request past
//!   it ends with `DEADLINE_EXCEEDED` (a tenth, at most 50 ms, before a client
//!   deadline, so that the client reads the daemon's answer). Streaming calls (`GetStream`,
//!   `PutStream`, `Watch`) are bounded only by a client `grpc-timeout`
//!   (a `Watch` may rightly last for days); the service checks it between
//!   messages (see [`Deadline`]).
//!
//! The permit of a streaming call travels in the request extensions
//! ([`InflightPermit`]) so the service can keep it until the stream ends.
//!
//! [`BlockingPool`] bounds the cache work the services run on tokio's blocking
//! pool: at most `server.max_blocking_tasks` run at once; the others wait
//! (asynchronously, each within its request's deadline, and their number is
//! bounded by the in-flight cap).

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tonic::Status;
use tonic::codegen::http;
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;

use crate::metrics::Metrics;
use prometheus_client::metrics::gauge::Gauge;

/// The limits [`Limited`] and [`BlockingPool`] enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Requests executing at once (streams count until they end); beyond, refused.
    pub max_inflight: usize,
    /// Deadline of a unary request that names none (or a longer one).
    pub request_timeout: Duration,
    /// Cache calls running on the blocking pool at once.
    pub max_blocking: usize,
}

/// Holds one in-flight slot; a streaming handler clones it into its task.
#[derive(Debug, Clone)]
pub struct InflightPermit(#[allow(dead_code)] Arc<Slot>);

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

/// Shared state of every [`Limited`] service of one daemon.
#[derive(Debug)]
pub struct Limiter {
    inflight: Arc<Semaphore>,
    limits: RequestLimits,
    metrics: Arc<Metrics>,
}

impl Limiter {
    pub fn new(limits: RequestLimits, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Limiter {
            inflight: Arc::new(Semaphore::new(limits.max_inflight)),
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
        let permit = match Arc::clone(&limiter.inflight).try_acquire_owned() {
            Ok(p) => InflightPermit(Arc::new(Slot::new(p, limiter.metrics.in_flight_gauge()))),
            Err(_) => {
                limiter.metrics.record_rejected("overloaded");
                let n = limiter.limits.max_inflight;
                tracing::debug!(path = req.uri().path(), "refused: overloaded");
                let status = Status::resource_exhausted(format!(
                    "overloaded: {n} requests in flight (server.max_inflight_requests); retry later"
                ));
                return Box::pin(async move { Ok(status.into_http()) });
            }
        };
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
            (false, Some(t)) => Some(early(t).min(limiter.limits.request_timeout)),
            (false, None) => Some(limiter.limits.request_timeout),
        };
        // The service may not be ready for another call: take the ready one
        // and leave a fresh clone (tower's rule for cloned services).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let _permit = permit;
            let fut = inner.call(req);
            let Some(t) = timeout else {
                return fut.await;
            };
            match tokio::time::timeout_at(now + t, fut).await {
                Ok(r) => r,
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
