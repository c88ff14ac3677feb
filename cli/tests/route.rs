//! Cache-aware routing against real daemons: the router follows two daemons'
//! `Watch` streams (after a `ListBlocks` snapshot), picks the node with the best
//! tier-weighted prefix minus load, follows evictions and deletions, drops a
//! node that goes away; and `kvstrata route` (one-shot, `--json`, `--serve`) as
//! a real process.

#[path = "../../server/tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytesize::ByteSize;
use common::{TestDaemon, payload};
use kvstrata_client::{Client, PutItem, block_keys};
use kvstrata_router::{Decision, NodeSpec, NodeStatus, Router, RouterConfig};
use kvstrata_server::{Config, Daemon};
use kvstrata_types::NamespaceId;

const BIN: &str = env!("CARGO_BIN_EXE_kvstrata");
/// 128 blocks of 8 KiB.
const CAP: u64 = 1 << 20;
const BLOCK_TOKENS: usize = 16;
const MODEL: &str = "route-test";

/// `n` full blocks of tokens, different for each `seed`.
fn tokens(seed: u32, n: usize) -> Vec<u32> {
    (0..(n * BLOCK_TOKENS) as u32)
        .map(|i| seed.wrapping_mul(100_003).wrapping_add(i))
        .collect()
}

/// The canonical keys of `n` blocks of `tokens(seed, n)`.
fn chain(ns: &NamespaceId, seed: u32, n: usize) -> Vec<Bytes> {
    block_keys(ns, &tokens(seed, n), BLOCK_TOKENS)
        .into_iter()
        .map(|k| Bytes::copy_from_slice(&k))
        .collect()
}

/// Stores `keys` as one chain (each block names its parent).
async fn put_chain(c: &Client, ns: &NamespaceId, keys: &[Bytes], len: usize) {
    let items: Vec<PutItem> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let it = PutItem::new(k.clone(), payload(&hex::encode(k), 0, len));
            match i {
                0 => it,
                _ => it.with_parent(keys[i - 1].clone()),
            }
        })
        .collect();
    let r = c.batch_put(ns, items).await.expect("put");
    assert_eq!(r.stored as usize, keys.len(), "chain not stored");
}

async fn register_both(a: &TestDaemon, b: &TestDaemon) -> (NamespaceId, usize) {
    let (ns, len) = common::register(&a.tcp, MODEL).await;
    let (ns_b, _) = common::register(&b.tcp, MODEL).await;
    assert_eq!(ns, ns_b, "one geometry, one id on every node");
    (ns, len)
}

fn tcp(d: &TestDaemon) -> String {
    d.daemon().addrs().tcp_target().expect("tcp")
}

fn uds(d: &TestDaemon) -> String {
    d.daemon().addrs().uds_target().expect("uds")
}

fn config() -> RouterConfig {
    RouterConfig {
        reconnect_interval: Duration::from_millis(100),
        ..RouterConfig::default()
    }
}

/// A router over a (TCP) and b (Unix socket), synced.
async fn router(a: &TestDaemon, b: &TestDaemon) -> Router {
    let r = Router::start(
        vec![NodeSpec::new("a", tcp(a)), NodeSpec::new("b", uds(b))],
        config(),
    )
    .expect("router starts");
    assert!(
        r.wait_synced(Duration::from_secs(10)).await,
        "nodes did not sync: {:?}",
        r.stats()
    );
    r
}

/// Polls `f` until it answers `Some`, for at most 10 s.
async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn candidate<'a>(d: &'a Decision, name: &str) -> &'a kvstrata_router::Candidate {
    d.candidates
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no candidate {name} in {d:?}"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn route_follows_snapshot_and_events_to_the_longest_weighted_prefix() {
    let a = common::start(CAP).await;
    let b = common::start(CAP).await;
    let (ns, len) = register_both(&a, &b).await;
    let keys = chain(&ns, 1, 6);
    // Stored before the router starts: known only through the snapshot.
    put_chain(&a.tcp, &ns, &keys[..4], len).await;

    let r = router(&a, &b).await;
    let s = r.stats();
    assert_eq!(s.nodes[0].index_blocks, 4);
    assert_eq!(s.nodes[0].snapshots, 1);
    assert_eq!(s.nodes[0].events, 0, "nothing happened after subscribing");

    let d = r.route(&ns, &keys[..4]);
    assert_eq!(d.node.as_deref(), Some("a"), "{d:?}");
    assert_eq!(d.target, Some(tcp(&a)));
    assert_eq!((d.matched, d.requested, d.tiers.host), (4, 4, 4));
    assert!(close(d.score, 4.0 * 0.8), "{}", d.score);
    let cb = candidate(&d, "b");
    assert!(cb.synced);
    assert_eq!((cb.matched, cb.score), (0, 0.0));
    // Another namespace matches nothing anywhere.
    let other = r.route(&NamespaceId([9; 16]), &keys[..4]);
    assert_eq!(other.matched, 0);

    // A longer chain on B, learnt from B's events: B wins that chain.
    put_chain(&b.tcp, &ns, &keys, len).await;
    let d = until("b to hold the whole long chain", || {
        let d = r.route(&ns, &keys);
        (candidate(&d, "b").matched == 6).then_some(d)
    })
    .await;
    assert_eq!(d.node.as_deref(), Some("b"), "{d:?}");
    assert_eq!((d.matched, d.tiers.host), (6, 6));
    assert!(close(d.score, 6.0 * 0.8), "{}", d.score);
    assert_eq!(
        candidate(&d, "a").matched,
        4,
        "a stops at its missing 5th block"
    );
    // On the shared 4-block prefix both score the same: the earlier node wins.
    assert_eq!(r.route(&ns, &keys[..4]).node.as_deref(), Some("a"));

    // Evicting on A (no disk tier: the blocks are dropped) shortens A's prefix.
    let ev = a.tcp.evict(&ns, &keys[2..4], false).await.expect("evict");
    assert_eq!(ev.evicted, 2);
    let d = until("a's index to follow the eviction", || {
        let d = r.route(&ns, &keys);
        (candidate(&d, "a").matched == 2).then_some(d)
    })
    .await;
    assert_eq!(d.node.as_deref(), Some("b"));
    until("a's index size", || {
        (r.stats().nodes[0].index_blocks == 2).then_some(())
    })
    .await;
    // A delete on B cuts B's chain at the deleted block.
    b.tcp.delete(&ns, &keys[1..2]).await.expect("delete");
    let d = until("b's index to follow the delete", || {
        let d = r.route(&ns, &keys);
        (candidate(&d, "b").matched == 1).then_some(d)
    })
    .await;
    assert_eq!(
        d.node.as_deref(),
        Some("a"),
        "a's 2 blocks beat b's 1: {d:?}"
    );
    assert_eq!(d.matched, 2);

    let s = r.stats();
    assert!(
        s.nodes[0].decisions >= 2 && s.nodes[1].decisions >= 1,
        "{s:?}"
    );
    assert!(s.nodes.iter().all(|n| n.synced && n.lagged == 0));
    assert!(s.nodes[1].events >= 6, "b's puts came as events: {s:?}");
    assert!(s.matched_blocks.host > 0);
    assert_eq!(s.unrouted, 0);
    r.shutdown();
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn route_moves_a_small_overlap_off_a_busy_node() {
    let a = common::start(CAP).await;
    let b = common::start(CAP).await;
    let (ns, len) = register_both(&a, &b).await;
    let keys = chain(&ns, 2, 10);
    put_chain(&a.tcp, &ns, &keys, len).await;
    put_chain(&b.tcp, &ns, &keys[..1], len).await;
    let r = router(&a, &b).await;

    let small = &keys[..2]; // a: 1.6, b: 0.8
    let d = r.route(&ns, small);
    assert_eq!(d.node.as_deref(), Some("a"));
    let guard = r.begin(&d);
    assert_eq!(guard.node(), Some("a"));
    assert_eq!(r.stats().nodes[0].in_flight, 1);

    // a: 1.6 - 4 = -2.4 < b: 0.8.
    let d = r.route(&ns, small);
    assert_eq!(d.node.as_deref(), Some("b"), "{d:?}");
    let ca = candidate(&d, "a");
    assert_eq!(ca.in_flight, 1);
    assert!(close(ca.score, 1.6 - 4.0), "{}", ca.score);
    // A large overlap still goes to a: 8.0 - 4 = 4.0 > 0.8.
    let d = r.route(&ns, &keys);
    assert_eq!(d.node.as_deref(), Some("a"));
    assert!(close(d.score, 4.0), "{}", d.score);
    // A second request in flight tips that one too: 8.0 - 8 = 0 < 0.8.
    let second = r.begin_on("a").expect("node a");
    assert_eq!(r.route(&ns, &keys).node.as_deref(), Some("b"));

    drop(second);
    drop(guard);
    assert_eq!(r.stats().nodes[0].in_flight, 0);
    assert_eq!(r.route(&ns, small).node.as_deref(), Some("a"));
    // With nothing matched anywhere, load alone decides.
    let none = chain(&ns, 3, 2);
    let _on_a = r.begin_on("a").expect("node a");
    assert_eq!(r.route(&ns, &none).node.as_deref(), Some("b"));
    r.shutdown();
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn route_never_picks_a_node_that_went_away() {
    let a = common::start(CAP).await;
    let b = common::start(CAP).await;
    let (ns, len) = register_both(&a, &b).await;
    let keys = chain(&ns, 4, 4);
    put_chain(&a.tcp, &ns, &keys, len).await;
    put_chain(&b.tcp, &ns, &keys[..1], len).await;
    let r = router(&a, &b).await;
    assert_eq!(r.route(&ns, &keys).node.as_deref(), Some("a"));

    a.stop().await;
    until("a to be marked not synced", || {
        (r.status("a").ok() != Some(NodeStatus::Synced)).then_some(())
    })
    .await;
    for _ in 0..3 {
        let d = r.route(&ns, &keys);
        assert_eq!(d.node.as_deref(), Some("b"), "{d:?}");
        assert_eq!(d.matched, 1);
        let ca = candidate(&d, "a");
        assert!(!ca.synced);
        assert_eq!(ca.matched, 0);
    }
    // It keeps trying to come back.
    let s = until("a reconnect attempt", || {
        let s = r.stats();
        (s.nodes[0].reconnects >= 1).then_some(s)
    })
    .await;
    assert!(s.nodes[0].last_error.is_some(), "{s:?}");
    assert_eq!(s.nodes[1].status, NodeStatus::Synced);

    // No node left: the decision names none and says why.
    b.stop().await;
    let d = until("no node synced", || {
        let d = r.route(&ns, &keys);
        d.node.is_none().then_some(d)
    })
    .await;
    assert_eq!(d.reason.as_deref(), Some("no node is synced"));
    assert!(r.stats().unrouted >= 1);
    r.shutdown();
}

/// A directory on a real filesystem (O_DIRECT is refused by tmpfs).
fn disk_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kvs-route-disk-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("tempdir")
}

fn disk_config(dir: &Path) -> Config {
    let mut c = common::config(dir, CAP, 4096);
    c.host.segment_bytes = ByteSize::b(CAP);
    c.disk.paths = vec![format!("{}={}", dir.join("slots-0.kvs").display(), 8 << 20)];
    c.disk.engine = kvstrata_server::config::DiskIoEngine::Pread;
    c.disk.segment_bytes = ByteSize::mib(1);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn route_counts_blocks_demoted_to_disk_with_the_disk_weight() {
    let dir = disk_dir();
    let daemon = Daemon::start(disk_config(dir.path()))
        .await
        .expect("daemon with a disk tier");
    let target = daemon.addrs().uds_target().expect("uds");
    let c = Client::connect(&target).await.expect("connect");
    let b = common::start(CAP).await;
    let (ns, len) = common::register(&c, MODEL).await;
    common::register(&b.tcp, MODEL).await;
    let keys = chain(&ns, 5, 4);
    put_chain(&c, &ns, &keys, len).await;
    put_chain(&b.tcp, &ns, &keys[..3], len).await;
    let r = Router::start(
        vec![NodeSpec::new("a", target), NodeSpec::new("b", uds(&b))],
        config(),
    )
    .expect("router");
    assert!(r.wait_synced(Duration::from_secs(10)).await);
    let d = r.route(&ns, &keys);
    assert_eq!(d.node.as_deref(), Some("a"));
    assert_eq!(d.tiers.host, 4);

    // Evict moves the blocks host -> disk: a now scores 4 x 0.5 = 2.0 < b's 3 x 0.8.
    c.evict(&ns, &keys, false).await.expect("evict");
    let d = until("a's blocks to show on disk", || {
        let d = r.route(&ns, &keys);
        (candidate(&d, "a").tiers.disk == 4).then_some(d)
    })
    .await;
    let ca = candidate(&d, "a");
    assert_eq!((ca.matched, ca.tiers.host), (4, 0));
    assert!(close(ca.score, 2.0), "{}", ca.score);
    assert_eq!(d.node.as_deref(), Some("b"), "{d:?}");
    // A read promotes a block back into host memory: both tiers hold it, the
    // better one counts.
    let got = c.batch_get(&ns, &keys[..1]).await.expect("get");
    assert!(got[0].found);
    let d = until("the promoted block to count as host", || {
        let d = r.route(&ns, &keys);
        (candidate(&d, "a").tiers.host == 1).then_some(d)
    })
    .await;
    assert_eq!(candidate(&d, "a").tiers.disk, 3);
    r.shutdown();
    drop(c);
    daemon.shutdown().await.expect("clean shutdown");
    b.stop().await;
}

// ---- the `kvstrata route` binary ----

fn run_bin(args: Vec<String>) -> std::process::Output {
    Command::new(BIN)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .expect("run kvstrata")
}

async fn run_route(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || run_bin(args))
        .await
        .expect("join")
}

fn one_error_line(o: &std::process::Output) -> String {
    assert!(!o.status.success(), "should fail");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line on stderr, got {err:?}"
    );
    assert!(err.starts_with("error: "), "{err}");
    err
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cli_route_prints_the_decision() {
    let a = common::start(CAP).await;
    let b = common::start(CAP).await;
    let (ns, len) = register_both(&a, &b).await;
    let toks = tokens(6, 4);
    let keys = chain(&ns, 6, 4);
    put_chain(&a.tcp, &ns, &keys[..1], len).await;
    put_chain(&b.tcp, &ns, &keys, len).await;
    let node_a = format!("a={}", tcp(&a));
    let node_b = format!("b={}", uds(&b));
    let token_list = toks
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");

    // --tokens: keys from the canonical hash, block_tokens from the nodes.
    let mut args = strings(&["--json", "route", "--node", &node_a, "--node", &node_b]);
    args.extend(strings(&[
        "--namespace",
        &ns.to_hex(),
        "--tokens",
        &token_list,
    ]));
    let o = run_route(args).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON decision");
    assert_eq!(v["node"], "b", "{v}");
    assert_eq!(v["target"], uds(&b));
    assert_eq!(v["matched"], 4);
    assert_eq!(v["requested"], 4);
    assert_eq!(v["tiers"]["host"], 4);
    assert!((v["score"].as_f64().unwrap() - 3.2).abs() < 1e-9, "{v}");
    assert_eq!(v["candidates"][0]["name"], "a");
    assert_eq!(v["candidates"][0]["matched"], 1);
    assert_eq!(v["namespace_id"], ns.to_hex());

    // --keys with the model id as namespace, table output.
    let hex_keys = keys[..2]
        .iter()
        .map(hex::encode)
        .collect::<Vec<_>>()
        .join(",");
    let mut args = strings(&["route", "--node", &node_a, "--node", &node_b]);
    args.extend(strings(&["--namespace", MODEL, "--keys", &hex_keys]));
    let o = run_route(args).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(&format!("b ({})", uds(&b))), "{out}");
    assert!(out.contains("2 of 2 blocks (host=2)"), "{out}");
    assert!(out.contains("1.60"), "{out}");

    // A bad --node: one clear line, non-zero exit, nothing contacted.
    for (bad, want) in [
        ("nonsense", "expected NAME=TARGET"),
        ("a=ftp://h:1", "unsupported scheme"),
        ("=h:1", "empty node name"),
    ] {
        let mut args = strings(&["route", "--node", &node_a, "--node", bad]);
        args.extend(strings(&["--namespace", &ns.to_hex(), "--keys", &hex_keys]));
        let o = run_route(args).await;
        let err = one_error_line(&o);
        assert!(
            err.contains("invalid node") && err.contains(want),
            "{bad}: {err}"
        );
    }
    // Duplicate names, bad keys, unknown namespace for --tokens: one line each.
    let mut args = strings(&["route", "--node", &node_a, "--node", &node_a]);
    args.extend(strings(&["--namespace", &ns.to_hex(), "--keys", &hex_keys]));
    assert!(one_error_line(&run_route(args).await).contains("duplicate node name"));
    let mut args = strings(&["route", "--node", &node_a, "--namespace", &ns.to_hex()]);
    args.extend(strings(&["--keys", "00,zz"]));
    assert!(one_error_line(&run_route(args).await).contains("--keys: key 1"));
    let mut args = strings(&["route", "--node", &node_a, "--namespace", &"ab".repeat(16)]);
    args.extend(strings(&["--tokens", "1,2"]));
    assert!(one_error_line(&run_route(args).await).contains("not registered"));
    a.stop().await;
    b.stop().await;
}

/// One HTTP/1.1 request; (status, body).
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to route --serve");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let (head, body) = resp.split_once("\r\n\r\n").expect("HTTP response");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    (code, body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cli_route_serves_http_and_metrics() {
    let a = common::start(CAP).await;
    let b = common::start(CAP).await;
    let (ns, len) = register_both(&a, &b).await;
    let keys = chain(&ns, 7, 3);
    put_chain(&a.tcp, &ns, &keys, len).await;
    let mut child = Command::new(BIN)
        .args(["route", "--serve", "127.0.0.1:0", "--log-level", "warn"])
        .args(["--node", &format!("a={}", tcp(&a))])
        .args(["--node", &format!("b={}", uds(&b))])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn route --serve");
    let stdout = child.stdout.take().expect("stdout");
    let addr = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read");
        line
    })
    .await
    .expect("join");
    let addr = addr
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {addr:?}"))
        .to_string();

    let body = serde_json::json!({
        "namespace_id": ns.to_hex(),
        "keys": keys.iter().map(hex::encode).collect::<Vec<_>>(),
    })
    .to_string();
    let a2 = addr.clone();
    let (code, resp) = tokio::task::spawn_blocking(move || http(&a2, "POST", "/route", &body))
        .await
        .expect("join");
    assert_eq!(code, 200, "{resp}");
    let v: serde_json::Value = serde_json::from_str(&resp).expect("JSON");
    assert_eq!(v["node"], "a", "{v}");
    assert_eq!(v["matched"], 3);

    let a2 = addr.clone();
    let (code, resp) =
        tokio::task::spawn_blocking(move || http(&a2, "POST", "/route", r#"{"keys":[]}"#))
            .await
            .expect("join");
    assert_eq!(code, 400);
    assert!(resp.contains("namespace_id"), "{resp}");

    let a2 = addr.clone();
    let (code, metrics) = tokio::task::spawn_blocking(move || http(&a2, "GET", "/metrics", ""))
        .await
        .expect("join");
    assert_eq!(code, 200);
    for want in [
        "kvstrata_route_decisions_total{node=\"a\"} 1",
        "kvstrata_route_decisions_total{node=\"b\"} 0",
        "kvstrata_route_matched_blocks_total{tier=\"host\"} 3",
        "kvstrata_route_last_score{node=\"a\"} 2.4",
        "kvstrata_route_index_blocks{node=\"a\"} 3",
        "kvstrata_route_synced{node=\"b\"} 1",
        "kvstrata_route_reconnects_total{node=\"a\"} 0",
        "kvstrata_route_lagged_total{node=\"a\"} 0",
    ] {
        assert!(metrics.contains(want), "{want} not in:\n{metrics}");
    }

    // Ctrl-C ends it cleanly.
    // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(rc, 0);
    let status = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = child.try_wait().expect("wait") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("route --serve did not stop on SIGINT");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .expect("join");
    assert!(status.success(), "{status:?}");
    a.stop().await;
    b.stop().await;
}
