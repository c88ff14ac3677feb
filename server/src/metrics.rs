//! Prometheus metrics on their own HTTP port (`GET /metrics`): per-tier
//! occupancy and counters read from the cache at scrape time, and request
//! counts by method and status code.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use kvstrata_tiers::BlockCache;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    code: String,
}

/// Metrics the service updates on every request.
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    registry: Registry,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new(cache: Arc<BlockCache>) -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let mut registry = Registry::default();
        registry.register(
            "kvstrata_requests",
            "gRPC requests by method and status code",
            requests.clone(),
        );
        registry.register_collector(Box::new(CacheCollector { cache }));
        Metrics { requests, registry }
    }

    pub fn record_request(&self, method: &'static str, code: tonic::Code) {
        self.requests
            .get_or_create(&RequestLabels {
                method,
                code: format!("{code:?}"),
            })
            .inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[derive(Debug)]
struct CacheCollector {
    cache: Arc<BlockCache>,
}

fn gauge_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(&str, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for (tier, v) in values {
        let g = ConstGauge::new(*v as i64);
        g.encode(family.encode_family(&[("tier", *tier)])?)?;
    }
    Ok(())
}

fn counter_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(&str, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (tier, v) in values {
        let c = ConstCounter::new(*v);
        c.encode(family.encode_family(&[("tier", *tier)])?)?;
    }
    Ok(())
}

impl Collector for CacheCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.cache.stats();
        let per = |f: fn(&kvstrata_tiers::TierStats) -> u64| -> Vec<(&'static str, u64)> {
            s.tiers.iter().map(|(k, t)| (k.name(), f(t))).collect()
        };
        gauge_family(
            &mut encoder,
            "kvstrata_tier_capacity_bytes",
            "Configured capacity",
            &per(|t| t.capacity_bytes),
        )?;
        gauge_family(
            &mut encoder,
            "kvstrata_tier_used_bytes",
            "Bytes in use (never above capacity)",
            &per(|t| t.used_bytes),
        )?;
        gauge_family(
            &mut encoder,
            "kvstrata_tier_blocks",
            "Blocks held",
            &per(|t| t.blocks),
        )?;
        gauge_family(
            &mut encoder,
            "kvstrata_tier_pinned_blocks",
            "Blocks pinned by leases",
            &per(|t| t.pinned_blocks),
        )?;
        counter_family(
            &mut encoder,
            "kvstrata_tier_hits",
            "Reads served",
            &per(|t| t.hits),
        )?;
        counter_family(
            &mut encoder,
            "kvstrata_tier_misses",
            "Reads that found nothing",
            &per(|t| t.misses),
        )?;
        counter_family(
            &mut encoder,
            "kvstrata_tier_evictions",
            "Blocks evicted",
            &per(|t| t.evictions),
        )?;
        counter_family(
            &mut encoder,
            "kvstrata_tier_bytes_in",
            "Payload bytes written",
            &per(|t| t.bytes_in),
        )?;
        counter_family(
            &mut encoder,
            "kvstrata_tier_bytes_out",
            "Payload bytes read",
            &per(|t| t.bytes_out),
        )?;
        counter_family(
            &mut encoder,
            "kvstrata_tier_rejected_puts",
            "Puts refused because everything evictable was pinned or being read",
            &per(|t| t.rejected_puts),
        )?;
        let g = ConstGauge::new(s.namespaces as i64);
        g.encode(encoder.encode_descriptor(
            "kvstrata_namespaces",
            "Registered namespaces",
            None,
            g.metric_type(),
        )?)?;
        let g = ConstGauge::new(s.active_leases as i64);
        g.encode(encoder.encode_descriptor(
            "kvstrata_leases_active",
            "Leases not yet ended",
            None,
            g.metric_type(),
        )?)?;
        let c = ConstCounter::new(s.lookups);
        c.encode(encoder.encode_descriptor(
            "kvstrata_lookups",
            "Lookup requests",
            None,
            c.metric_type(),
        )?)?;
        let c = ConstCounter::new(s.event_seq);
        c.encode(encoder.encode_descriptor(
            "kvstrata_events",
            "Watch events published",
            None,
            c.metric_type(),
        )?)?;
        let g = ConstGauge::new(s.uptime.as_secs_f64());
        g.encode(encoder.encode_descriptor(
            "kvstrata_uptime_seconds",
            "Seconds since start",
            None,
            g.metric_type(),
        )?)?;
        Ok(())
    }
}

async fn metrics_handler(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
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

/// Serves `/metrics` (and `/healthz`) until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(metrics);
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
