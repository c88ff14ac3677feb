//! `kvstrata route`: cache-aware routing over several daemons, from the command
//! line (one decision, as a table or JSON) or as a small HTTP service
//! (`--serve ADDR`: `POST /route`, `GET /metrics`, `GET /stats`, `GET /healthz`).
//! The routing itself is [`kvstrata_client::router`]; `docs/routing.md` has the
//! score, the defaults and the metrics.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use comfy_table::{CellAlignment, ContentArrangement, Table, presets};
use kvstrata_client::router::{
    Decision, NodeSpec, NodeStats, NodeStatus, RouteTier, Router, RouterConfig, RouterStats,
    TierWeights,
};
use kvstrata_client::{Client, ClientOptions, block_keys};
use kvstrata_proto::v1 as proto;
use kvstrata_tiers::{BlockKey, NamespaceId};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};

/// Arguments of `kvstrata route`.
#[derive(Debug, Clone, clap::Args)]
pub struct RouteArgs {
    /// A daemon to route over, as NAME=TARGET (TARGET: http://host:port, host:port,
    /// unix:///path or /path); repeat once per node
    #[arg(long = "node", value_name = "NAME=TARGET", required = true)]
    pub nodes: Vec<String>,
    /// Namespace of the request: its id (32 hex digits) or a model id registered on the nodes
    #[arg(long)]
    pub namespace: Option<String>,
    /// Block keys of the request, parent first, as comma-separated hex
    #[arg(
        long,
        value_name = "HEX,HEX,...",
        value_delimiter = ',',
        conflicts_with = "tokens"
    )]
    pub keys: Vec<String>,
    /// Token ids of the request, comma-separated; the keys are the canonical chained
    /// hash over full blocks of the namespace's block_tokens (docs/hashing.md)
    #[arg(long, value_name = "T,T,...", value_delimiter = ',')]
    pub tokens: Vec<String>,
    /// How long to wait for the reachable nodes to sync before deciding (or serving)
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub sync_timeout: Duration,
    /// Keep running and answer POST /route (JSON) and GET /metrics on this address
    #[arg(
        long,
        value_name = "ADDR",
        conflicts_with_all = ["namespace", "keys", "tokens"]
    )]
    pub serve: Option<String>,
    /// Score of a block matched in HBM
    #[arg(long, default_value_t = TierWeights::default().hbm)]
    pub weight_hbm: f64,
    /// Score of a block matched in host memory
    #[arg(long, default_value_t = TierWeights::default().host)]
    pub weight_host: f64,
    /// Score of a block matched on disk
    #[arg(long, default_value_t = TierWeights::default().disk)]
    pub weight_disk: f64,
    /// Score of a block matched in the shared remote tier
    #[arg(long, default_value_t = TierWeights::default().remote)]
    pub weight_remote: f64,
    /// Score (in blocks) subtracted per request in flight on a node
    #[arg(long, default_value_t = RouterConfig::default().load_penalty)]
    pub load_penalty: f64,
    /// Wait before reconnecting to a node whose stream broke or lagged
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    pub reconnect_interval: Duration,
    /// Log level (RUST_LOG overrides) [default: info with --serve, else error]
    #[arg(long)]
    pub log_level: Option<String>,
}

impl RouteArgs {
    /// The router config these flags describe.
    pub fn config(&self) -> RouterConfig {
        RouterConfig {
            weights: TierWeights {
                hbm: self.weight_hbm,
                host: self.weight_host,
                disk: self.weight_disk,
                remote: self.weight_remote,
            },
            load_penalty: self.load_penalty,
            reconnect_interval: self.reconnect_interval,
            ..RouterConfig::default()
        }
    }
}

/// Runs `kvstrata route`. Errors are one line each.
pub async fn run(args: RouteArgs, json_out: bool) -> anyhow::Result<()> {
    let nodes = args
        .nodes
        .iter()
        .map(|n| NodeSpec::parse(n))
        .collect::<Result<Vec<_>, _>>()?;
    let config = args.config();
    config.validate()?;
    if args.serve.is_none() {
        if args.namespace.is_none() {
            bail!("--namespace is required (or --serve ADDR to answer requests over HTTP)");
        }
        if args.keys.is_empty() && args.tokens.is_empty() {
            bail!("give the request's blocks with --keys HEX,HEX,... or --tokens T,T,...");
        }
    }
    // Parse what can be parsed before connecting anywhere.
    let keys = parse_hex_keys(&args.keys)?;
    let tokens = parse_tokens(&args.tokens)?;
    init_logging(
        args.log_level
            .as_deref()
            .unwrap_or(if args.serve.is_some() {
                "info"
            } else {
                "error"
            }),
    );
    if let Some(addr) = &args.serve {
        return serve(addr, nodes, config, args.sync_timeout, json_out).await;
    }
    let router = Router::start(nodes, config)?;
    router.wait_settled(args.sync_timeout).await;
    let ns_arg = args.namespace.as_deref().unwrap_or_default();
    let synced = synced_targets(&router);
    let (ns, keys) = if tokens.is_empty() {
        (resolve_namespace(ns_arg, &synced).await?, keys)
    } else {
        let (ns, block_tokens) = namespace_block_tokens(ns_arg, &synced).await?;
        (ns, key_vec(block_keys(&ns, &tokens, block_tokens as usize)))
    };
    let decision = router.route(&ns, &keys);
    let stats = router.stats();
    router.shutdown();
    if json_out {
        print_line(&serde_json::to_string_pretty(&decision)?)?;
    } else {
        print_line(&decision_table(&decision, &stats))?;
    }
    if decision.node.is_none() {
        bail!("no node is synced: {}", node_errors(&stats));
    }
    Ok(())
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // A subscriber set already (tests, embedding) stays.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn print_line(s: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{s}")
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

/// Parses hex keys (1 to 64 bytes each).
pub fn parse_hex_keys(args: &[String]) -> anyhow::Result<Vec<Bytes>> {
    args.iter()
        .enumerate()
        .map(|(i, a)| parse_hex_key(a).map_err(|e| anyhow!("--keys: key {i} {a:?}: {e}")))
        .collect()
}

fn parse_hex_key(s: &str) -> Result<Bytes, String> {
    let t = s.trim();
    let t = t.strip_prefix("hex:").unwrap_or(t);
    let bytes = hex::decode(t).map_err(|e| format!("not hex ({e})"))?;
    BlockKey::new("key", &bytes).map_err(|e| e.to_string())?;
    Ok(Bytes::from(bytes))
}

fn parse_tokens(args: &[String]) -> anyhow::Result<Vec<u32>> {
    args.iter()
        .enumerate()
        .map(|(i, a)| {
            a.trim().parse::<u32>().map_err(|_| {
                anyhow!("--tokens: token {i} {a:?} is not a token id (an integer 0 to 4294967295)")
            })
        })
        .collect()
}

fn key_vec(keys: Vec<kvstrata_client::BlockHash>) -> Vec<Bytes> {
    keys.into_iter()
        .map(|k| Bytes::copy_from_slice(&k))
        .collect()
}

/// (name, target) of the synced nodes, in order.
fn synced_targets(router: &Router) -> Vec<(String, String)> {
    router
        .stats()
        .nodes
        .into_iter()
        .filter(|n| n.synced)
        .map(|n| (n.name, n.target))
        .collect()
}

fn node_errors(stats: &RouterStats) -> String {
    stats
        .nodes
        .iter()
        .map(|n| {
            format!(
                "{} {} ({})",
                n.name,
                n.status.name(),
                n.last_error.as_deref().unwrap_or("no error yet")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The namespaces of the first synced node that answers.
async fn list_namespaces(
    nodes: &[(String, String)],
) -> anyhow::Result<Vec<Vec<proto::NamespaceInfo>>> {
    let options = ClientOptions {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Some(Duration::from_secs(5)),
        ..ClientOptions::default()
    };
    let mut all = Vec::new();
    let mut errors = Vec::new();
    for (name, target) in nodes {
        let answer = async {
            let c = Client::connect_with(target, options.clone()).await?;
            c.list_namespaces().await
        }
        .await;
        match answer {
            Ok(list) => all.push(list),
            Err(e) => errors.push(format!("{name}: {e}")),
        }
    }
    if all.is_empty() {
        if errors.is_empty() {
            bail!("no node is synced, so no node can tell the namespace's geometry");
        }
        bail!("cannot list namespaces: {}", errors.join("; "));
    }
    Ok(all)
}

/// A namespace argument: 32 hex digits are an id; anything else is a model id
/// that must name one namespace on the nodes.
async fn resolve_namespace(arg: &str, nodes: &[(String, String)]) -> anyhow::Result<NamespaceId> {
    if let Some(id) = hex_namespace(arg) {
        return Ok(id);
    }
    let lists = list_namespaces(nodes).await?;
    find_model(arg, &lists)
}

fn hex_namespace(arg: &str) -> Option<NamespaceId> {
    let t = arg.trim();
    if t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        NamespaceId::from_hex(t)
    } else {
        None
    }
}

fn find_model(model: &str, lists: &[Vec<proto::NamespaceInfo>]) -> anyhow::Result<NamespaceId> {
    let mut ids: Vec<&[u8]> = lists
        .iter()
        .flatten()
        .filter(|n| n.spec.as_ref().is_some_and(|s| s.model_id == model))
        .map(|n| n.namespace_id.as_ref())
        .collect();
    ids.sort();
    ids.dedup();
    match ids.as_slice() {
        [one] => NamespaceId::from_slice("namespace_id", one)
            .map_err(|e| anyhow!("invalid namespace id from a node: {e}")),
        [] => bail!(
            "--namespace {model:?}: not 32 hex digits, and no synced node has a namespace with that model id"
        ),
        many => bail!(
            "--namespace {model:?}: the model id names {} namespaces ({}); pass the namespace id",
            many.len(),
            many.iter().map(hex::encode).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// The namespace and its block_tokens, from ListNamespaces on the synced nodes.
async fn namespace_block_tokens(
    arg: &str,
    nodes: &[(String, String)],
) -> anyhow::Result<(NamespaceId, u32)> {
    let lists = list_namespaces(nodes).await?;
    let ns = match hex_namespace(arg) {
        Some(id) => id,
        None => find_model(arg, &lists)?,
    };
    let info = lists
        .iter()
        .flatten()
        .find(|n| n.namespace_id.as_ref() == ns.as_bytes())
        .ok_or_else(|| {
            anyhow!(
                "--tokens: namespace {ns} is not registered on any synced node, so its block_tokens is unknown (pass --keys instead)"
            )
        })?;
    let block_tokens = info.spec.as_ref().map_or(0, |s| s.block_tokens);
    if block_tokens == 0 {
        bail!("namespace {ns} has block_tokens 0 on the node");
    }
    Ok((ns, block_tokens))
}

/// The decision and every candidate, as text.
pub fn decision_table(d: &Decision, stats: &RouterStats) -> String {
    let mut head = Table::new();
    head.load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(["field", "value"]);
    let chosen = match (&d.node, &d.target) {
        (Some(n), Some(t)) => format!("{n} ({t})"),
        _ => format!(
            "none: {}",
            d.reason.as_deref().unwrap_or("no node was chosen")
        ),
    };
    head.add_row(vec!["node".to_string(), chosen]);
    head.add_row(vec!["score".to_string(), format!("{:.2}", d.score)]);
    head.add_row(vec![
        "matched".to_string(),
        format!("{} of {} blocks ({})", d.matched, d.requested, d.tiers),
    ]);
    head.add_row(vec!["in flight".to_string(), d.in_flight.to_string()]);
    head.add_row(vec!["namespace".to_string(), d.namespace_id.clone()]);

    let mut t = Table::new();
    t.load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header([
            "",
            "node",
            "target",
            "status",
            "score",
            "matched",
            "hbm",
            "host",
            "disk",
            "remote",
            "in flight",
        ]);
    for c in &d.candidates {
        let status = stats
            .nodes
            .iter()
            .find(|n| n.name == c.name)
            .map(|n| match (&n.status, &n.last_error) {
                (NodeStatus::Synced, _) | (_, None) => n.status.name().to_string(),
                (s, Some(e)) => format!("{}: {e}", s.name()),
            })
            .unwrap_or_default();
        let mark = if d.node.as_deref() == Some(c.name.as_str()) {
            "*"
        } else {
            ""
        };
        let (score, matched) = if c.synced {
            (format!("{:.2}", c.score), c.matched.to_string())
        } else {
            ("-".into(), "-".into())
        };
        let mut row = vec![
            mark.to_string(),
            c.name.clone(),
            c.target.clone(),
            status,
            score,
            matched,
        ];
        row.extend(
            RouteTier::ALL
                .iter()
                .map(|tier| c.tiers.get(*tier).to_string()),
        );
        row.push(c.in_flight.to_string());
        t.add_row(row);
    }
    for i in [4usize, 5, 6, 7, 8, 9, 10] {
        if let Some(col) = t.column_mut(i) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
    format!("{head}\n{t}")
}

/// `--serve`: answer over HTTP until Ctrl-C (or SIGTERM).
async fn serve(
    addr: &str,
    nodes: Vec<NodeSpec>,
    config: RouterConfig,
    sync_timeout: Duration,
    json_out: bool,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener
        .local_addr()
        .with_context(|| format!("cannot listen on {addr}"))?;
    let router = Router::start(nodes, config)?;
    router.wait_settled(sync_timeout).await;
    let stats = router.stats();
    tracing::info!(
        addr = %local,
        synced = stats.nodes.iter().filter(|n| n.synced).count(),
        nodes = stats.nodes.len(),
        "route: serving POST /route and GET /metrics"
    );
    if json_out {
        print_line(&json!({ "listening": local.to_string() }).to_string())?;
    } else {
        print_line(&format!("listening on http://{local}"))?;
    }
    let app = app(router.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("HTTP server")?;
    router.shutdown();
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = term => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
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

/// Parses a `POST /route` body: `{"namespace_id": hex, "keys": [hex, ...]}`.
pub fn parse_route_request(body: &[u8]) -> Result<(NamespaceId, Vec<Bytes>), String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not valid JSON: {e}"))?;
    let ns = v
        .get("namespace_id")
        .and_then(Value::as_str)
        .ok_or("namespace_id: missing (a string of 32 hex digits)")?;
    let ns =
        hex_namespace(ns).ok_or_else(|| format!("namespace_id: {ns:?} is not 32 hex digits"))?;
    let keys = v
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("keys: missing (an array of hex strings, parent first)")?;
    let keys = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let s = k
                .as_str()
                .ok_or_else(|| format!("keys[{i}]: not a string"))?;
            parse_hex_key(s).map_err(|e| format!("keys[{i}]: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((ns, keys))
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        route: RouteArgs,
    }

    fn parse(args: &[&str]) -> Result<RouteArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("route").chain(args.iter().copied())).map(|c| c.route)
    }

    #[test]
    fn arguments() {
        let a = parse(&[
            "--node",
            "a=h:1",
            "--node",
            "b=h:2",
            "--namespace",
            "x",
            "--keys",
            "00,11",
        ])
        .unwrap();
        assert_eq!(a.nodes, ["a=h:1", "b=h:2"]);
        assert_eq!(a.keys, ["00", "11"]);
        assert_eq!(a.sync_timeout, Duration::from_secs(5));
        assert_eq!(a.config(), RouterConfig::default());
        let a = parse(&[
            "--node",
            "a=h:1",
            "--tokens",
            "1,2,3",
            "--load-penalty",
            "2",
        ])
        .unwrap();
        assert_eq!(a.tokens, ["1", "2", "3"]);
        assert_eq!(a.config().load_penalty, 2.0);
        assert!(parse(&["--namespace", "x"]).is_err(), "--node is required");
        assert!(parse(&["--node", "a=h:1", "--keys", "00", "--tokens", "1"]).is_err());
        assert!(parse(&["--node", "a=h:1", "--serve", "x:1", "--keys", "00"]).is_err());
    }

    #[test]
    fn keys_tokens_and_requests_parse() {
        let k = parse_hex_keys(&["00ff".into(), "hex:0a".into()]).unwrap();
        assert_eq!(&k[0][..], &[0, 0xff]);
        assert_eq!(&k[1][..], &[0x0a]);
        for bad in ["", "0", "zz", &"00".repeat(65)] {
            let e = parse_hex_keys(&[bad.to_string()]).unwrap_err().to_string();
            assert!(e.starts_with("--keys: key 0"), "{e}");
        }
        assert_eq!(parse_tokens(&["1".into(), " 2".into()]).unwrap(), [1, 2]);
        assert!(parse_tokens(&["-1".into()]).is_err());
        let ns = "00112233445566778899aabbccddeeff";
        let (id, keys) = parse_route_request(
            format!(r#"{{"namespace_id":"{ns}","keys":["01","0203"]}}"#).as_bytes(),
        )
        .unwrap();
        assert_eq!(id.to_hex(), ns);
        assert_eq!(keys.len(), 2);
        for (body, want) in [
            ("nope", "not valid JSON"),
            (r#"{"keys":[]}"#, "namespace_id: missing"),
            (r#"{"namespace_id":"00","keys":[]}"#, "32 hex digits"),
            (
                &format!(r#"{{"namespace_id":"{ns}"}}"#) as &str,
                "keys: missing",
            ),
            (
                &format!(r#"{{"namespace_id":"{ns}","keys":[1]}}"#),
                "keys[0]: not a string",
            ),
            (
                &format!(r#"{{"namespace_id":"{ns}","keys":["01","x"]}}"#),
                "keys[1]: not hex",
            ),
        ] {
            let e = parse_route_request(body.as_bytes()).unwrap_err();
            assert!(e.contains(want), "{body}: {e}");
        }
    }

    #[test]
    fn model_ids_resolve_to_one_namespace() {
        let info = |model: &str, id: u8| proto::NamespaceInfo {
            namespace_id: Bytes::from(vec![id; 16]),
            spec: Some(proto::NamespaceSpec {
                model_id: model.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let lists = vec![
            vec![info("a", 1), info("b", 2)],
            vec![info("a", 1), info("b", 3)],
        ];
        assert_eq!(find_model("a", &lists).unwrap(), NamespaceId([1; 16]));
        assert!(
            find_model("b", &lists)
                .unwrap_err()
                .to_string()
                .contains("2 namespaces")
        );
        assert!(find_model("c", &lists).is_err());
    }
}
