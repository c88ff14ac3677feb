//! `kvstrata route`: cache-aware routing over several daemons, from the command
//! line (one decision, as a table or JSON) or as a small HTTP service
//! (`--serve ADDR`: `POST /route`, `GET /metrics`, `GET /stats`, `GET /healthz`).
//! The routing and the HTTP service are `kvstrata_router`; `docs/routing.md` has
//! the score, the defaults and the metrics. The global connection flags
//! (`--token`, `--token-file`, `--tls-*`) apply to every node.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use comfy_table::{CellAlignment, ContentArrangement, Table, presets};
use kvstrata_client::{Client, ClientOptions, block_keys};
use kvstrata_proto::v1 as proto;
use kvstrata_router::{
    Decision, NodeSpec, NodeStatus, RouteArgs, RouteTier, Router, RouterConfig, RouterStats,
    hex_namespace, parse_hex_key,
};
use kvstrata_types::NamespaceId;
use serde_json::json;

/// Runs `kvstrata route`, reaching every node with `connection`'s bearer
/// token and TLS settings. Errors are one line each.
pub async fn run(args: RouteArgs, connection: ClientOptions, json_out: bool) -> anyhow::Result<()> {
    let nodes = args
        .nodes
        .iter()
        .map(|n| NodeSpec::parse(n))
        .collect::<Result<Vec<_>, _>>()?;
    let config = RouterConfig {
        token: connection.token.clone(),
        tls: connection.tls.clone(),
        ..args.config()
    };
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
        (resolve_namespace(ns_arg, &synced, &connection).await?, keys)
    } else {
        let (ns, block_tokens) = namespace_block_tokens(ns_arg, &synced, &connection).await?;
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
    connection: &ClientOptions,
) -> anyhow::Result<Vec<Vec<proto::NamespaceInfo>>> {
    let options = ClientOptions {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Some(Duration::from_secs(5)),
        ..connection.clone()
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
async fn resolve_namespace(
    arg: &str,
    nodes: &[(String, String)],
    connection: &ClientOptions,
) -> anyhow::Result<NamespaceId> {
    if let Some(id) = hex_namespace(arg) {
        return Ok(id);
    }
    let lists = list_namespaces(nodes, connection).await?;
    find_model(arg, &lists)
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
    connection: &ClientOptions,
) -> anyhow::Result<(NamespaceId, u32)> {
    let lists = list_namespaces(nodes, connection).await?;
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
    kvstrata_router::serve(listener, router, shutdown_signal())
        .await
        .context("HTTP server")?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use kvstrata_router::parse_route_request;

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
