//! Beyond one machine, for real: a 3-node Redis Cluster on loopback ports, two
//! kvstrata daemons with their own data dirs (host + disk tiers) sharing it as
//! their remote tier, and the built-in engines on the default model.
//!
//! - A conversation prefilled through daemon A is decoded through daemon B from
//!   the cluster, with the tokens of a full recompute.
//! - The router, following both daemons' Watch streams, sends the next turn to
//!   the node holding its prefix (B, which decoded the answer), and B reuses it.
//! - With one Redis node killed, a third daemon's decode still gives the same
//!   tokens: blocks on the dead node are misses (recomputed), never errors.
//! - Bad remote configuration is refused at start with the key named.

#[path = "../../server/tests/common/mod.rs"]
mod common;
#[path = "common/redis_cluster.rs"]
mod redis_cluster;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytesize::ByteSize;
use kvstrata_client::Client;
use kvstrata_engine::chat::Conversation;
use kvstrata_engine::engine::{Engine, EngineOptions, LoadedModel};
use kvstrata_engine::fetch;
use kvstrata_engine::sampling::SamplingParams;
use kvstrata_proto::v1 as proto;
use kvstrata_router::{NodeSpec, Router, RouterConfig};
use kvstrata_server::{Config, Daemon};
use redis_cluster::RedisCluster;

fn model() -> Arc<LoadedModel> {
    let path: PathBuf = fetch::ensure_default_model(&fetch::default_model_dir(), false)
        .expect("the default model must be fetchable (network) or present");
    Arc::new(LoadedModel::load(&path).expect("model loads"))
}

struct Node {
    daemon: Daemon,
    client: Client,
    target: String,
    _dir: tempfile::TempDir,
}

fn node_config(dir: &std::path::Path, cluster: &RedisCluster) -> Config {
    let mut c: Config = common::config(dir, 256 << 20, 4096);
    c.host.segment_bytes = ByteSize::mib(4);
    c.disk.paths = vec![format!("{}=256MiB", dir.join("slots.kv").display())];
    c.disk.segment_bytes = ByteSize::mib(4);
    c.remote.nodes = cluster.urls();
    c.remote.write_through = true;
    c.remote.deadline_ms = 500;
    c
}

async fn start_node(cluster: &RedisCluster) -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(node_config(dir.path(), cluster))
        .await
        .expect("daemon starts");
    let target = daemon.addrs().tcp_target().expect("tcp");
    let client = Client::connect(&target).await.expect("connect");
    Node {
        daemon,
        client,
        target,
        _dir: dir,
    }
}

async fn remote_stats(c: &Client) -> proto::RemoteStats {
    c.stats()
        .await
        .expect("stats")
        .remote
        .expect("remote stats present")
}

/// Waits until the node's remote write queue is empty.
async fn drained(c: &Client) -> proto::RemoteStats {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let r = remote_stats(c).await;
        if r.queued_bytes == 0 {
            return r;
        }
        assert!(Instant::now() < end, "remote queue never drained: {r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const NEW_TOKENS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_on_a_decodes_on_b_from_the_cluster_and_survives_a_dead_node() {
    let mut cluster = RedisCluster::start(3);
    let m = model();
    let a = start_node(&cluster).await;
    let b = start_node(&cluster).await;
    assert!(remote_stats(&a.client).await.connected);

    // Reference: the same prompt recomputed with no cache at all.
    let mut convo = Conversation::new();
    let tokens = convo
        .next_prompt_tokens(
            &m.tokenizer,
            &m.template,
            "Name three colours of the rainbow, say which one has the longest wavelength, \
             and explain in one sentence why the sky looks blue at noon but red at sunset.",
        )
        .expect("prompt");
    let full_blocks = tokens.len() / 16;
    assert!(full_blocks >= 3, "{} tokens", tokens.len());
    let local = Engine::local(m.clone(), &EngineOptions::default()).expect("engine");
    let mut reference = local
        .prefill(&tokens, &mut |_, _| {})
        .await
        .expect("prefill");
    let want = local
        .continue_local(&mut reference, NEW_TOKENS)
        .expect("generate");

    // Prefill through A: every full block is computed, stored on A, written through.
    let engine_a = Engine::connect(m.clone(), a.client.clone(), &EngineOptions::default())
        .await
        .expect("engine A");
    let p = engine_a
        .prefill(&tokens, &mut |_, _| {})
        .await
        .expect("prefill on A");
    assert_eq!(p.reused_tokens, 0);
    assert_eq!(p.stored_blocks, full_blocks);
    let ra = drained(&a.client).await;
    assert!(ra.writes >= full_blocks as u64, "{ra:?}");

    // Decode through B, which has never seen this conversation: every block
    // comes from the cluster, and the tokens are the recompute's.
    let engine_b = Engine::connect(m.clone(), b.client.clone(), &EngineOptions::default())
        .await
        .expect("engine B");
    let d = engine_b
        .decode(
            &p.handoff,
            SamplingParams::default(),
            NEW_TOKENS,
            &mut |_| true,
        )
        .await
        .expect("decode on B");
    assert_eq!(d.tokens, want, "B's tokens differ from a full recompute");
    assert_eq!(d.loaded_tokens, full_blocks * 16);
    let rb = remote_stats(&b.client).await;
    assert!(rb.hits >= full_blocks as u64, "{rb:?}");
    assert!(rb.promoted >= full_blocks as u64, "{rb:?}");
    assert_eq!(rb.corrupt_blocks, 0);

    // The next turn: B holds the prompt (promoted) and the answer (stored by its
    // decode) in host memory; A holds the prompt, and the answer only through the
    // cluster. The router, following both daemons' Watch streams, picks B, and
    // B's prefill of the next turn reuses every full block.
    let answer = m.tokenizer.decode(&d.tokens, true).expect("answer text");
    convo.record_answer(&d.tokens, &answer);
    let turn2 = convo
        .next_prompt_tokens(
            &m.tokenizer,
            &m.template,
            "And what colour is the sea, in one word?",
        )
        .expect("turn 2 prompt");
    let ns_id = *engine_a.store().expect("store").namespace_id();
    let turn2_keys = kvstrata_types::block_keys(&ns_id, &turn2, 16);
    assert!(drained(&b.client).await.writes > 0);
    let router = Router::start(
        vec![
            NodeSpec::new("a", a.target.clone()),
            NodeSpec::new("b", b.target.clone()),
        ],
        RouterConfig::default(),
    )
    .expect("router starts");
    assert!(
        router.wait_synced(Duration::from_secs(10)).await,
        "router never synced"
    );
    let decision = router.route(&ns_id, &turn2_keys);
    assert_eq!(decision.node.as_deref(), Some("b"), "{decision:#?}");
    let score = |name: &str| {
        decision
            .candidates
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.score)
            .expect("candidate")
    };
    assert!(score("b") > score("a"), "{decision:#?}");
    let p2 = engine_b
        .prefill(&turn2, &mut |_, _| {})
        .await
        .expect("turn 2 prefill on B");
    let reusable = (tokens.len() + d.tokens.len() - 1) / 16;
    assert!(
        p2.reused_tokens >= reusable * 16 - 16,
        "{} of {}",
        p2.reused_tokens,
        turn2.len()
    );
    router.shutdown();

    // Kill one Redis node. A third daemon, empty, decodes the same hand-off:
    // blocks on the dead node are misses and get recomputed; same tokens, no error.
    let keys = p.handoff.keys().expect("keys");
    let ns = engine_a.store().expect("store").namespace_id().to_hex();
    let on_node: Vec<usize> = keys
        .iter()
        .map(|k| cluster.node_of(&format!("kvstrata:{ns}:{}", hex::encode(k))))
        .collect();
    let victim = on_node[0];
    cluster.kill(victim);
    let c = start_node(&cluster).await;
    let engine_c = Engine::connect(m.clone(), c.client.clone(), &EngineOptions::default())
        .await
        .expect("engine C");
    let t = Instant::now();
    let d = engine_c
        .decode(
            &p.handoff,
            SamplingParams::default(),
            NEW_TOKENS,
            &mut |_| true,
        )
        .await
        .expect("decode on C with a dead Redis node is not an error");
    assert_eq!(d.tokens, want, "C's tokens differ from a full recompute");
    // The first block lives on the dead node: nothing past it can be loaded.
    assert_eq!(d.loaded_tokens, 0);
    assert!(t.elapsed() < Duration::from_secs(60));
    let rc = remote_stats(&c.client).await;
    assert!(rc.errors + rc.timeouts + rc.misses > 0, "{rc:?}");
    // A and B still serve what they hold locally.
    let lookup = a
        .client
        .lookup(engine_a.store().expect("store").namespace_id(), &keys)
        .await
        .expect("lookup on A");
    assert!(lookup.matched as usize >= full_blocks, "{lookup:?}");

    for n in [a, b, c] {
        n.daemon.shutdown().await.expect("shutdown");
    }
}

#[tokio::test]
async fn bad_remote_settings_are_refused_with_the_key_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c: Config = common::config(dir.path(), 1 << 20, 16);
    c.remote.nodes = vec!["127.0.0.1:6379".into()];
    let e = Daemon::start(c.clone()).await.err().expect("refused");
    assert!(e.to_string().contains("remote.nodes"), "{e}");
    c.remote.nodes = vec!["redis://127.0.0.1:1".into()];
    c.remote.deadline_ms = 0;
    let e = Daemon::start(c.clone()).await.err().expect("refused");
    assert!(e.to_string().contains("remote.deadline_ms"), "{e}");
    c.remote.deadline_ms = 100;
    c.remote.key_prefix = "a{b}".into();
    let e = Daemon::start(c).await.err().expect("refused");
    assert!(e.to_string().contains("remote.key_prefix"), "{e}");
}
