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

use crate::pool::PoolRegistry;
use crate::region::RegionRegistry;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

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
            "Requests refused by the limits: overloaded (server.max_inflight_requests) or deadline (past grpc-timeout / server.request_timeout_ms)",
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

    /// Counts one request refused by the limits (`overloaded`, `deadline`).
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

#[derive(Debug)]
struct PoolCollector {
    pools: Arc<PoolRegistry>,
}

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.pools.stats();
        single(
            &mut encoder,
            Kind::Gauge,
            "kvstrata_pools",
            "Shared-memory pools registered now",
            s.pools as u64,
        )?;
        single(
            &mut encoder,
            Kind::Gauge,
            "kvstrata_pool_bytes",
            "Bytes of the shared-memory pools mapped now",
            s.bytes,
        )?;
        family(
            &mut encoder,
            Kind::Counter,
            "kvstrata_pool_registrations",
            "Pool registrations on the mempool socket, by result",
            "result",
            &[("ok", s.registered), ("refused", s.refused)],
        )?;
        single(
            &mut encoder,
            Kind::Counter,
            "kvstrata_pools_unsealed",
            "Pools registered without a shrink seal (a client truncating one would fault the daemon)",
            s.unsealed,
        )
    }
}

/// KV regions and GPUs, read from the [`RegionRegistry`] at scrape time.
#[derive(Debug)]
pub struct RegionCollector {
    regions: Arc<RegionRegistry>,
}

impl RegionCollector {
    pub fn new(regions: Arc<RegionRegistry>) -> Self {
        RegionCollector { regions }
    }
}

impl Collector for RegionCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.regions.stats();
        single(
            &mut encoder,
            Kind::Gauge,
            "kvstrata_gpus",
            "GPUs the daemon uses (0: none found, or gpu.enabled = off)",
            self.regions.gpus().devices.len() as u64,
        )?;
        single(
            &mut encoder,
            Kind::Gauge,
            "kvstrata_kv_regions",
            "KV regions (engines' paged KV memory) registered now",
            s.regions as u64,
        )?;
        single(
            &mut encoder,
            Kind::Gauge,
            "kvstrata_kv_region_bytes",
            "Bytes of the KV regions registered now",
            s.bytes,
        )?;
        single(
            &mut encoder,
            Kind::Counter,
            "kvstrata_kv_region_registrations",
            "KV regions registered on the region socket",
            s.registered,
        )?;
        family(
            &mut encoder,
            Kind::Counter,
            "kvstrata_kv_regions_refused",
            "KV region registrations refused, by reason",
            "reason",
            &s.refused,
        )?;
        single(
            &mut encoder,
            Kind::Counter,
            "kvstrata_kv_region_gathered_bytes",
            "Block bytes gathered out of KV-region pages (puts)",
            s.gathered,
        )?;
        single(
            &mut encoder,
            Kind::Counter,
            "kvstrata_kv_region_scattered_bytes",
            "Block bytes scattered into KV-region pages (gets)",
            s.scattered,
        )
    }
}

#[derive(Debug)]
struct CacheCollector {
    cache: Arc<BlockCache>,
}

/// Whether a metric only grows (counter) or goes both ways (gauge).
#[derive(Debug, Clone, Copy)]
enum Kind {
    Gauge,
    Counter,
}

fn encode_value(
    kind: Kind,
    v: u64,
    sample: prometheus_client::encoding::MetricEncoder<'_>,
) -> Result<(), std::fmt::Error> {
    match kind {
        Kind::Gauge => ConstGauge::new(v as i64).encode(sample),
        Kind::Counter => ConstCounter::new(v).encode(sample),
    }
}

fn metric_type(kind: Kind) -> MetricType {
    match kind {
        Kind::Gauge => MetricType::Gauge,
        Kind::Counter => MetricType::Counter,
    }
}

/// One metric family with one sample per `(label value, value)` under `label`.
fn family(
    encoder: &mut DescriptorEncoder,
    kind: Kind,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, metric_type(kind))?;
    for (value_label, v) in values {
        encode_value(kind, *v, family.encode_family(&[(label, *value_label)])?)?;
    }
    Ok(())
}

/// One unlabelled sample.
fn single(
    encoder: &mut DescriptorEncoder,
    kind: Kind,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    encode_value(
        kind,
        value,
        encoder.encode_descriptor(name, help, None, metric_type(kind))?,
    )
}

impl Collector for CacheCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.cache.stats();
        // One label per tier row: with several GPUs, one `hbm<ordinal>` per device.
        let mut hbm_seen = 0;
        let labels: Vec<String> = s
            .tiers
            .iter()
            .map(|(k, _)| match k {
                kvstrata_tiers::TierKind::Hbm if s.hbm.len() > 1 => {
                    let ordinal = s.hbm.get(hbm_seen).map(|h| h.ordinal).unwrap_or(hbm_seen);
                    hbm_seen += 1;
                    format!("hbm{ordinal}")
                }
                k => k.name().to_string(),
            })
            .collect();
        let per = |f: fn(&kvstrata_tiers::TierStats) -> u64| -> Vec<(&str, u64)> {
            s.tiers
                .iter()
                .zip(&labels)
                .map(|((_, t), l)| (l.as_str(), f(t)))
                .collect()
        };
        type TierMetric = (
            Kind,
            &'static str,
            &'static str,
            fn(&kvstrata_tiers::TierStats) -> u64,
        );
        let tier_metrics: [TierMetric; 10] = [
            (
                Kind::Gauge,
                "kvstrata_tier_capacity_bytes",
                "Configured capacity",
                |t| t.capacity_bytes,
            ),
            (
                Kind::Gauge,
                "kvstrata_tier_used_bytes",
                "Bytes in use (never above capacity)",
                |t| t.used_bytes,
            ),
            (Kind::Gauge, "kvstrata_tier_blocks", "Blocks held", |t| {
                t.blocks
            }),
            (
                Kind::Gauge,
                "kvstrata_tier_pinned_blocks",
                "Blocks pinned by leases",
                |t| t.pinned_blocks,
            ),
            (Kind::Counter, "kvstrata_tier_hits", "Reads served", |t| {
                t.hits
            }),
            (
                Kind::Counter,
                "kvstrata_tier_misses",
                "Reads that found nothing",
                |t| t.misses,
            ),
            (
                Kind::Counter,
                "kvstrata_tier_evictions",
                "Blocks evicted",
                |t| t.evictions,
            ),
            (
                Kind::Counter,
                "kvstrata_tier_bytes_in",
                "Payload bytes written",
                |t| t.bytes_in,
            ),
            (
                Kind::Counter,
                "kvstrata_tier_bytes_out",
                "Payload bytes read",
                |t| t.bytes_out,
            ),
            (
                Kind::Counter,
                "kvstrata_tier_rejected_puts",
                "Puts refused because everything evictable was pinned or being read",
                |t| t.rejected_puts,
            ),
        ];
        for (kind, name, help, f) in tier_metrics {
            family(&mut encoder, kind, name, help, "tier", &per(f))?;
        }
        if let Some(d) = &s.disk {
            let disk: [(&str, &str, u64); 6] = [
                (
                    "kvstrata_disk_corrupt_blocks",
                    "Disk slots that failed verification (dropped; each read answered a miss)",
                    d.corrupt_blocks,
                ),
                (
                    "kvstrata_disk_io_errors",
                    "Disk transfers that failed or were short, and failed index writes",
                    d.io_errors,
                ),
                (
                    "kvstrata_disk_timeouts",
                    "Disk transfers abandoned at their deadline",
                    d.timeouts,
                ),
                (
                    "kvstrata_disk_read_bytes",
                    "Bytes read from slot files (headers included)",
                    d.read_bytes,
                ),
                (
                    "kvstrata_disk_write_bytes",
                    "Bytes written to slot files (headers included)",
                    d.write_bytes,
                ),
                (
                    "kvstrata_disk_busy_read_ms",
                    "Milliseconds with at least one disk read in flight",
                    d.read_busy.as_millis() as u64,
                ),
            ];
            for (name, help, v) in disk {
                single(&mut encoder, Kind::Counter, name, help, v)?;
            }
            family(
                &mut encoder,
                Kind::Gauge,
                "kvstrata_disk_engine",
                "The disk I/O engine in use (1 for the engine's label)",
                "engine",
                &[(d.engine, 1)],
            )?;
        }
        if let Some(m) = &s.movement {
            let movement: [(Kind, &str, &str, u64); 7] = [
                (
                    Kind::Counter,
                    "kvstrata_demoted_blocks",
                    "Blocks written to disk by the demotion writer",
                    m.demoted,
                ),
                (
                    Kind::Counter,
                    "kvstrata_demote_dropped_blocks",
                    "Evictions dropped because the demotion queue was full",
                    m.demote_dropped,
                ),
                (
                    Kind::Counter,
                    "kvstrata_demote_failed_blocks",
                    "Demotions the disk refused or a newer put made stale",
                    m.demote_failed,
                ),
                (
                    Kind::Counter,
                    "kvstrata_demote_skipped_blocks",
                    "Evictions not written because the disk held the same bytes",
                    m.demote_skipped,
                ),
                (
                    Kind::Gauge,
                    "kvstrata_demote_queued_bytes",
                    "Payload bytes waiting in the demotion queue",
                    m.queued_bytes,
                ),
                (
                    Kind::Counter,
                    "kvstrata_promoted_blocks",
                    "Blocks copied from disk into host memory by reads",
                    m.promoted,
                ),
                (
                    Kind::Counter,
                    "kvstrata_write_through_blocks",
                    "Write-through copies queued",
                    m.write_through,
                ),
            ];
            for (kind, name, help, v) in movement {
                single(&mut encoder, kind, name, help, v)?;
            }
        }
        if !s.hbm.is_empty() {
            // One sample per device, labelled by its ordinal.
            let devices: Vec<String> = s.hbm.iter().map(|h| h.ordinal.to_string()).collect();
            type Get = fn(&kvstrata_tiers::HbmStats) -> u64;
            let hbm: [(Kind, &str, &str, Get); 7] = [
                (
                    Kind::Counter,
                    "kvstrata_hbm_demoted_blocks",
                    "Blocks copied from the HBM tier to the host tier",
                    |h| h.demoted,
                ),
                (
                    Kind::Counter,
                    "kvstrata_hbm_demote_skipped_blocks",
                    "Blocks that left the HBM tier without a copy (the host tier held the same bytes)",
                    |h| h.demote_skipped,
                ),
                (
                    Kind::Counter,
                    "kvstrata_hbm_demote_dropped_blocks",
                    "Blocks dropped on the way out of the HBM tier (no host room, failed copy or check)",
                    |h| h.demote_dropped,
                ),
                (
                    Kind::Counter,
                    "kvstrata_hbm_promoted_blocks",
                    "Blocks copied from the host tier into the HBM tier",
                    |h| h.promoted,
                ),
                (
                    Kind::Counter,
                    "kvstrata_hbm_checksum_failures",
                    "Blocks whose bytes did not match their checksum on the way out of the HBM tier (dropped)",
                    |h| h.checksum_failures,
                ),
                (
                    Kind::Gauge,
                    "kvstrata_hbm_draining_blocks",
                    "Blocks whose copy out of the HBM tier is in flight",
                    |h| h.draining,
                ),
                (
                    Kind::Gauge,
                    "kvstrata_gpu_staging_cached_bytes",
                    "Pinned staging buffers a device keeps for reuse",
                    |h| h.staging_cached_bytes,
                ),
            ];
            for (kind, name, help, get) in hbm {
                let values: Vec<(&str, u64)> = s
                    .hbm
                    .iter()
                    .zip(&devices)
                    .map(|(h, d)| (d.as_str(), get(h)))
                    .collect();
                family(&mut encoder, kind, name, help, "device", &values)?;
            }
        }
        if let Some(r) = &s.remote {
            let remote: [(Kind, &str, &str, u64); 15] = [
                (
                    Kind::Gauge,
                    "kvstrata_remote_connected",
                    "1 while a cluster connection is held",
                    u64::from(r.connected),
                ),
                (
                    Kind::Counter,
                    "kvstrata_remote_hits",
                    "Reads answered from the cluster",
                    r.hits,
                ),
                (
                    Kind::Counter,
                    "kvstrata_remote_misses",
                    "Reads the cluster could not answer (absent, error, deadline, corrupt)",
                    r.misses,
                ),
                (
                    Kind::Counter,
                    "kvstrata_remote_errors",
                    "Cluster commands that failed",
                    r.errors,
                ),
                (
                    Kind::Counter,
                    "kvstrata_remote_timeouts",
                    "Cluster commands abandoned at their deadline",
                    r.timeouts,
                ),
                (
                    Kind::Counter,
                    "kvstrata_remote_corrupt_blocks",
                    "Values that failed verification (read as misses, then deleted)",
                    r.corrupt_blocks,
                ),
                (
                    Kind::Counter,
                    "kvstrata_remote_writes",
                    "Blocks written to the cluster",
                    r.writes,
                ),
                (
                    Kind::Counter,
                    "kvstrata_remote_write_bytes",
                    "Payload bytes written to the cluster",
                    r.write_bytes,
                ),
                (
                    Kind::Counter,
                    "kvstrata_remote_read_bytes",
                    "Payload bytes read from the cluster",
                    r.read_bytes,
                ),
                (
                    Kind::Counter,
                    "kvstrata_remote_deletes",
                    "Keys deleted on the cluster",
                    r.deletes,
                ),
                (
                    Kind::Counter,
                    "kvstrata_remote_queue_dropped",
                    "Writes dropped because the queue was full",
                    r.queue_dropped,
                ),
                (
                    Kind::Gauge,
                    "kvstrata_remote_queued_bytes",
                    "Payload bytes waiting for the cluster",
                    r.queued_bytes,
                ),
                (
                    Kind::Counter,
                    "kvstrata_remote_promoted_blocks",
                    "Blocks copied from the cluster into host memory by reads",
                    r.promoted,
                ),
                (
                    Kind::Counter,
                    "kvstrata_remote_demoted_blocks",
                    "Host-tier evictions queued for the cluster",
                    r.demoted,
                ),
                (
                    Kind::Counter,
                    "kvstrata_remote_connect_failures",
                    "Failed attempts to connect to the cluster",
                    r.connect_failures,
                ),
            ];
            for (kind, name, help, v) in remote {
                single(&mut encoder, kind, name, help, v)?;
            }
        }
        single(
            &mut encoder,
            Kind::Gauge,
            "kvstrata_namespaces",
            "Registered namespaces",
            u64::from(s.namespaces),
        )?;
        single(
            &mut encoder,
            Kind::Gauge,
            "kvstrata_leases_active",
            "Leases not yet ended",
            u64::from(s.active_leases),
        )?;
        single(
            &mut encoder,
            Kind::Counter,
            "kvstrata_lookups",
            "Lookup requests",
            s.lookups,
        )?;
        single(
            &mut encoder,
            Kind::Counter,
            "kvstrata_events",
            "Watch events published",
            s.event_seq,
        )?;
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
