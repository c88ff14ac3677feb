//! Prometheus metrics on their own HTTP port (`GET /metrics`): per-tier
//! occupancy and counters read from the cache at scrape time, and request
//! counts by method and status code.
//!
//! This file holds the [`Metrics`] the services update on every request and
//! the HTTP endpoint; the scrape-time collectors live beside it (`cache.rs`:
//! the tiers; `registries.rs`: pools, KV regions and GPUs), all written with
//! the helpers of `family.rs`.

mod cache;
mod connections;
mod family;
mod registries;

pub use connections::{
    ConnClosed, ConnCollector, ConnCounters, ConnListener, ConnRefused, Malformed,
};
pub use registries::RegionCollector;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use kvstrata_tiers::BlockCache;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::shm::pool::PoolRegistry;
use cache::CacheCollector;
use registries::PoolCollector;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransferLabels {
    method: &'static str,
    result: &'static str,
}

/// Metrics the services update on every request.
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    sglang_transfers: Family<TransferLabels, Counter>,
    rejected: Family<RejectLabels, Counter>,
    in_flight: Gauge,
    blocking: Gauge,
    registry: Registry,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new(cache: Arc<BlockCache>, pools: Arc<PoolRegistry>) -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let sglang_transfers = Family::<TransferLabels, Counter>::default();
        let mut registry = Registry::default();
        registry.register(
            "kvstrata_requests",
            "gRPC requests by method and status code",
            requests.clone(),
        );
        registry.register(
            "kvstrata_sglang_transfers",
            "SGLang StorageServer transfers by method and result",
            sglang_transfers.clone(),
        );
        let rejected = Family::<RejectLabels, Counter>::default();
        registry.register(
            "kvstrata_requests_rejected",
            "Requests refused by the limits: overloaded (server.max_inflight_requests), peer_limit (server.max_inflight_per_peer) or deadline (past grpc-timeout / server.request_timeout_ms)",
            rejected.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "kvstrata_requests_in_flight",
            "gRPC requests executing now (open GetStream/PutStream streams included)",
            in_flight.clone(),
        );
        let blocking = Gauge::default();
        registry.register(
            "kvstrata_blocking_tasks",
            "Cache calls running on the blocking pool now (at most server.max_blocking_tasks)",
            blocking.clone(),
        );
        registry.register_collector(Box::new(CacheCollector { cache }));
        registry.register_collector(Box::new(PoolCollector { pools }));
        Metrics {
            requests,
            sglang_transfers,
            rejected,
            in_flight,
            blocking,
            registry,
        }
    }

    /// Counts one SGLang transfer's result (`ok`, `not_found`, ...).
    pub fn record_sglang_transfer(&self, method: &'static str, result: &'static str) {
        self.sglang_transfers
            .get_or_create(&TransferLabels { method, result })
            .inc();
    }

    /// Counts one request refused by the limits (`overloaded`, `peer_limit`, `deadline`).
    pub fn record_rejected(&self, reason: &'static str) {
        self.rejected.get_or_create(&RejectLabels { reason }).inc();
    }

    /// How many requests were refused for `reason` so far.
    pub fn rejected(&self, reason: &'static str) -> u64 {
        self.rejected.get_or_create(&RejectLabels { reason }).get()
    }

    /// The gauge of requests in flight (see [`crate::limits`]).
    pub fn in_flight_gauge(&self) -> Gauge {
        self.in_flight.clone()
    }

    /// The gauge of cache calls on the blocking pool.
    pub fn blocking_gauge(&self) -> Gauge {
        self.blocking.clone()
    }

    pub fn record_request(&self, method: &'static str, code: tonic::Code) {
        self.requests
            .get_or_create(&RequestLabels {
                method,
                code: format!("{code:?}"),
            })
            .inc();
    }

    /// Adds a collector (e.g. the auth counters) before the metrics are shared.
    pub fn register_collector(&mut self, collector: Box<dyn Collector>) {
        self.registry.register_collector(collector);
    }

    /// The text exposition format.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// What `/metrics` serves: the metrics, and the auth state when a scrape
/// needs an admin token (`auth.metrics_require_token`).
#[derive(Clone)]
struct Scrape {
    metrics: Arc<Metrics>,
    auth: Option<Arc<crate::auth::Auth>>,
}

async fn metrics_handler(
    State(scrape): State<Scrape>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    if let Some(auth) = &scrape.auth {
        let presented = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
        if let Err(s) = auth.check_metrics_scrape(presented) {
            let code = match s.code() {
                tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
                _ => StatusCode::UNAUTHORIZED,
            };
            return (
                code,
                [
                    (header::CONTENT_TYPE, "text/plain"),
                    (header::WWW_AUTHENTICATE, "Bearer"),
                ],
                format!("{}\n", s.message()),
            )
                .into_response();
        }
    }
    render_metrics(&scrape.metrics).into_response()
}

fn render_metrics(metrics: &Metrics) -> impl IntoResponse {
    match metrics.render() {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            String::from("encoding failed\n"),
        ),
    }
}

/// Serves `/metrics` (and `/healthz`) until `shutdown` is cancelled; with
/// `auth`, a scrape needs an admin bearer token (`/healthz` stays open).
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    auth: Option<Arc<crate::auth::Auth>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(Scrape { metrics, auth });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Binds the metrics listener.
pub async fn bind(addr: &str) -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    let a = l.local_addr()?;
    Ok((l, a))
}
