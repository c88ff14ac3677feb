//! The HTTP service of `kvstrata route --serve`: `POST /route`, `GET /metrics`,
//! `GET /stats`, `GET /healthz`, and the router's metrics.
//!
//! The metric-family helper ([`family_u64`]) is a small copy of the daemon's
//! (kvstrata-server's metrics module): the router does not depend on the server.

use std::future::Future;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::config::RouteTier;
use crate::decision::NodeStats;
use crate::request::parse_route_request;
use crate::router::Router;

/// Answers HTTP on `listener` ([`app`]) until `shutdown` completes, then stops
/// following the nodes.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(router.clone()))
        .with_graceful_shutdown(shutdown)
        .await?;
    router.shutdown();
    Ok(())
}

/// The HTTP service of `--serve`: `POST /route`, `GET /metrics`, `GET /stats`, `GET /healthz`.
pub fn app(router: Router) -> axum::Router {
    axum::Router::new()
        .route("/route", post(route_handler))
        .route("/metrics", get(metrics_handler))
        .route("/stats", get(stats_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(router)
}

fn json_response(code: StatusCode, v: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{v}\n"),
    )
        .into_response()
}

fn bad_request(msg: String) -> Response {
    json_response(StatusCode::BAD_REQUEST, &json!({ "error": msg }))
}

async fn route_handler(State(router): State<Router>, body: Bytes) -> Response {
    let (ns, keys) = match parse_route_request(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    let decision = router.route(&ns, &keys);
    let code = if decision.node.is_some() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    match serde_json::to_value(&decision) {
        Ok(v) => json_response(code, &v),
        Err(e) => json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({ "error": format!("cannot encode the decision: {e}") }),
        ),
    }
}

async fn stats_handler(State(router): State<Router>) -> Response {
    match serde_json::to_value(router.stats()) {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({ "error": format!("cannot encode the stats: {e}") }),
        ),
    }
}

async fn metrics_handler(State(router): State<Router>) -> Response {
    match render_metrics(&router) {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n").into_response(),
    }
}

/// The router's metrics in the Prometheus text format.
pub fn render_metrics(router: &Router) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(RouteCollector {
        router: router.clone(),
    }));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

/// A per-node metric: name, help, and how to read it from the node's stats.
type NodeMetric = (&'static str, &'static str, fn(&NodeStats) -> u64);

/// Reads [`Router::stats`] at scrape time.
#[derive(Debug)]
struct RouteCollector {
    router: Router,
}

/// One family of per-label samples: counters (suffixed `_total`) or integer gauges.
fn family_u64(
    encoder: &mut DescriptorEncoder,
    counter: bool,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> Result<(), std::fmt::Error> {
    let kind = if counter {
        MetricType::Counter
    } else {
        MetricType::Gauge
    };
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (l, v) in values {
        let labels = [(label, *l)];
        let sample = family.encode_family(&labels)?;
        if counter {
            ConstCounter::new(*v).encode(sample)?;
        } else {
            ConstGauge::new(i64::try_from(*v).unwrap_or(i64::MAX)).encode(sample)?;
        }
    }
    Ok(())
}

impl Collector for RouteCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.router.stats();
        let per_node = |f: fn(&NodeStats) -> u64| -> Vec<(&str, u64)> {
            s.nodes.iter().map(|n| (n.name.as_str(), f(n))).collect()
        };
        family_u64(
            &mut encoder,
            true,
            "kvstrata_route_decisions",
            "Routing decisions that chose each node",
            "node",
            &per_node(|n| n.decisions),
        )?;
        let unrouted = ConstCounter::new(s.unrouted);
        unrouted.encode(encoder.encode_descriptor(
            "kvstrata_route_unrouted",
            "Routing decisions that found no synced node",
            None,
            MetricType::Counter,
        )?)?;
        let tiers: Vec<(&str, u64)> = RouteTier::ALL
            .iter()
            .map(|t| (t.name(), s.matched_blocks.get(*t)))
            .collect();
        family_u64(
            &mut encoder,
            true,
            "kvstrata_route_matched_blocks",
            "Matched blocks of the chosen nodes, by tier",
            "tier",
            &tiers,
        )?;
        {
            let mut family = encoder.encode_descriptor(
                "kvstrata_route_last_score",
                "Score of each node in the last decision that chose it",
                None,
                MetricType::Gauge,
            )?;
            for n in &s.nodes {
                if let Some(score) = n.last_score {
                    let labels = [("node", n.name.as_str())];
                    ConstGauge::new(score).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let gauges: [NodeMetric; 3] = [
            (
                "kvstrata_route_index_blocks",
                "Blocks (namespace, key) in each node's index, any local tier",
                |n| n.index_blocks,
            ),
            (
                "kvstrata_route_synced",
                "1 when the node's index is synced and the node may be chosen",
                |n| u64::from(n.synced),
            ),
            (
                "kvstrata_route_in_flight",
                "Requests counted in flight on each node",
                |n| n.in_flight,
            ),
        ];
        for (name, help, f) in gauges {
            family_u64(&mut encoder, false, name, help, "node", &per_node(f))?;
        }
        let counters: [NodeMetric; 4] = [
            (
                "kvstrata_route_reconnects",
                "Reconnects to each node after a failed attempt, a broken or a lagged stream",
                |n| n.reconnects,
            ),
            (
                "kvstrata_route_lagged",
                "LAGGED events from each node (each forces a resync)",
                |n| n.lagged,
            ),
            (
                "kvstrata_route_snapshots",
                "ListBlocks snapshots installed per node",
                |n| n.snapshots,
            ),
            (
                "kvstrata_route_events",
                "Watch events applied per node",
                |n| n.events,
            ),
        ];
        for (name, help, f) in counters {
            family_u64(&mut encoder, true, name, help, "node", &per_node(f))?;
        }
        let remote = ConstGauge::new(i64::try_from(s.remote_blocks).unwrap_or(i64::MAX));
        remote.encode(encoder.encode_descriptor(
            "kvstrata_route_remote_blocks",
            "Blocks in the shared remote set",
            None,
            MetricType::Gauge,
        )?)?;
        Ok(())
    }
}
