//! The remote tier against a real 3-node Redis Cluster on loopback ports:
//! demotion and promotion, write-through seen by a second cache, exact bytes
//! or a miss under corruption, wrong namespaces, superseded and deleted
//! blocks, a killed node and a cluster that is not there.

#[path = "../../cli/tests/common/redis_cluster.rs"]
mod redis_cluster;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvstrata_tiers::remote::record;
use kvstrata_tiers::{
    BlockCache, BlockKey, CacheConfig, Dtype, EventBus, HostTierConfig, NamespaceId,
    NamespacePolicy, NamespaceSpec, PutBlock, RemoteTier, RemoteTierConfig, TierKind,
};
use redis::Commands;
use redis_cluster::RedisCluster;

/// 2 layers × 1 head × dim 64 × f16 × 16 tokens × K,V = 8 KiB blocks.
fn spec(model: &str) -> NamespaceSpec {
    NamespaceSpec::layer_major(model, 2, 1, 64, Dtype::F16, 16)
}

/// The runtime the remote tiers of these tests run on (the daemon passes
/// its own); it outlives every cache.
fn runtime() -> tokio::runtime::Handle {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("remote-tier-test")
                .enable_all()
                .build()
                .expect("test runtime")
        })
        .handle()
        .clone()
}

fn remote_config(cluster: &RedisCluster) -> RemoteTierConfig {
    RemoteTierConfig {
        nodes: cluster.urls(),
        deadline: Duration::from_millis(500),
        retry_interval: Duration::from_millis(200),
        ..RemoteTierConfig::default()
    }
}

fn cache(
    cluster: &RedisCluster,
    host_bytes: u64,
    tweak: impl FnOnce(&mut RemoteTierConfig),
) -> BlockCache {
    let mut rc = remote_config(cluster);
    tweak(&mut rc);
    let c = BlockCache::open(
        CacheConfig {
            host: HostTierConfig {
                capacity_bytes: host_bytes,
                segment_bytes: 1 << 20,
            },
            remote: Some(rc),
            ..CacheConfig::default()
        },
        Vec::new(),
        Some(runtime()),
    )
    .expect("cache opens");
    assert!(
        c.remote()
            .expect("remote tier")
            .wait_connected(Duration::from_secs(10)),
        "remote tier did not connect"
    );
    c
}

fn key(i: usize) -> BlockKey {
    BlockKey::new("key", format!("block-{i:05}").as_bytes()).expect("key")
}

/// Deterministic, never-constant payload for (block, version).
fn payload(i: usize, version: u32, len: usize) -> Bytes {
    let mut x = xxhash_rust::xxh3::xxh3_64(format!("{i}/{version}").as_bytes()) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

fn chain(n: usize, version: u32, len: usize) -> Vec<PutBlock> {
    (0..n)
        .map(|i| PutBlock {
            key: key(i),
            parent: i.checked_sub(1).map(key),
            payload: payload(i, version, len),
        })
        .collect()
}

fn raw(cluster: &RedisCluster) -> redis::cluster::ClusterConnection {
    redis::cluster::ClusterClient::new(cluster.urls())
        .expect("client")
        .get_connection()
        .expect("raw cluster connection")
}

fn redis_key(ns: &NamespaceId, k: &BlockKey) -> String {
    record::redis_key("kvstrata", ns, k)
}

#[test]
fn demoted_blocks_come_back_exact_and_are_promoted() {
    let cluster = RedisCluster::start(3);
    // Host tier of 8 blocks, working set of 40: most blocks leave the host.
    let c = cache(&cluster, 8 * 8192, |_| {});
    let (ns, _) = c.register_namespace(spec("demote")).unwrap();
    let items = chain(40, 1, ns.block_bytes as usize);
    for item in &items {
        c.put_batch(&ns.id, std::slice::from_ref(item)).unwrap();
    }
    assert!(c.flush_remote(Duration::from_secs(10)));
    let r = c.remote().unwrap().stats();
    assert!(r.demoted >= 32, "{r:?}");
    assert_eq!(r.writes, r.demoted, "{r:?}");

    let keys: Vec<BlockKey> = items.iter().map(|i| i.key).collect();
    let tiers = c.lookup(&ns.id, &keys).unwrap();
    assert_eq!(tiers.len(), 40, "every block is somewhere: {tiers:?}");
    assert!(tiers.contains(&TierKind::Remote));

    let mut from_remote = 0;
    for item in &items {
        let got = c.get_batch(&ns.id, &[item.key]).unwrap();
        let (bytes, tier) = got[0].clone().expect("hit");
        assert_eq!(bytes, item.payload, "block {} wrong bytes", item.key);
        from_remote += usize::from(tier == TierKind::Remote);
    }
    assert!(from_remote >= 32, "{from_remote}");
    let r = c.remote().unwrap().stats();
    assert!(r.promoted >= 1, "{r:?}");
    assert_eq!(r.corrupt_blocks, 0);
}

#[test]
fn write_through_is_served_to_another_cache_and_deletes_follow() {
    let cluster = RedisCluster::start(3);
    let a = cache(&cluster, 1 << 20, |_| {});
    let b = cache(&cluster, 1 << 20, |_| {});
    let policy = NamespacePolicy {
        remote_write_through: true,
        ..NamespacePolicy::default()
    };
    let (ns, _) = a.register_namespace_with(spec("wt"), Some(policy)).unwrap();
    let (ns_b, _) = b.register_namespace(spec("wt")).unwrap();
    assert_eq!(ns.id, ns_b.id);
    let items = chain(12, 1, ns.block_bytes as usize);
    a.put_batch(&ns.id, &items).unwrap();
    assert!(a.flush_remote(Duration::from_secs(10)));

    let keys: Vec<BlockKey> = items.iter().map(|i| i.key).collect();
    assert_eq!(b.lookup(&ns.id, &keys).unwrap(), vec![TierKind::Remote; 12]);
    let got = b.get_batch(&ns.id, &keys).unwrap();
    for (item, got) in items.iter().zip(&got) {
        let (bytes, tier) = got.clone().expect("B finds A's block");
        assert_eq!(tier, TierKind::Remote);
        assert_eq!(bytes, item.payload);
    }
    // Promoted: the second read is local.
    let again = b.get_batch(&ns.id, &keys[..1]).unwrap();
    assert_eq!(again[0].as_ref().map(|g| g.1), Some(TierKind::Host));

    // A deletes block 5: after the queue drains the cluster no longer has it.
    assert_eq!(a.delete(&ns.id, &keys[5..6]).unwrap(), 1);
    assert!(a.flush_remote(Duration::from_secs(10)));
    let mut conn = raw(&cluster);
    let present: bool = conn.exists(redis_key(&ns.id, &keys[5])).unwrap();
    assert!(!present);
    assert!(a.remote().unwrap().stats().deletes >= 1);
}

#[test]
fn corrupt_or_foreign_values_are_misses_and_are_dropped() {
    let cluster = RedisCluster::start(3);
    let c = cache(&cluster, 1 << 20, |r| r.write_through = true);
    let (ns, _) = c.register_namespace(spec("corrupt")).unwrap();
    let (other, _) = c.register_namespace(spec("corrupt-other")).unwrap();
    let items = chain(4, 1, ns.block_bytes as usize);
    c.put_batch(&ns.id, &items).unwrap();
    assert!(c.flush_remote(Duration::from_secs(10)));
    let remote = c.remote().unwrap();
    let mut conn = raw(&cluster);

    // Flip one payload byte and one header byte of two blocks.
    for (i, at) in [(0usize, 200 + 4000), (1, 40)] {
        let rk = redis_key(&ns.id, &items[i].key);
        let mut v: Vec<u8> = conn.get(&rk).unwrap();
        v[at] ^= 0x01;
        let _: () = conn.set(&rk, v).unwrap();
    }
    // Block 2's value copied under the other namespace's key: names the wrong namespace.
    let v: Vec<u8> = conn.get(redis_key(&ns.id, &items[2].key)).unwrap();
    let _: () = conn.set(redis_key(&other.id, &items[2].key), v).unwrap();
    // Block 3 truncated.
    let rk3 = redis_key(&ns.id, &items[3].key);
    let v: Vec<u8> = conn.get(&rk3).unwrap();
    let _: () = conn.set(&rk3, &v[..v.len() - 1]).unwrap();

    let keys: Vec<BlockKey> = items.iter().map(|i| i.key).collect();
    let got = remote.get_many(&ns.id, &keys, ns.block_bytes);
    assert!(got[0].is_none() && got[1].is_none() && got[3].is_none());
    assert_eq!(
        got[2].as_ref().map(|b| b.payload.clone()),
        Some(items[2].payload.clone())
    );
    let foreign = remote.get_many(&other.id, &keys[2..3], other.block_bytes);
    assert!(
        foreign[0].is_none(),
        "a value naming another namespace was served"
    );
    assert_eq!(remote.stats().corrupt_blocks, 4);
    // The bad values are deleted; the good one stays.
    assert!(remote.flush(Duration::from_secs(10)));
    for (k, want) in [
        (redis_key(&ns.id, &keys[0]), false),
        (redis_key(&ns.id, &keys[1]), false),
        (redis_key(&ns.id, &keys[2]), true),
        (rk3, false),
        (redis_key(&other.id, &keys[2]), false),
    ] {
        let present: bool = conn.exists(&k).unwrap();
        assert_eq!(present, want, "{k}");
    }
}

#[test]
fn a_put_supersedes_the_cluster_copy() {
    let cluster = RedisCluster::start(3);
    // A writes v1 through to the cluster; B (no write-through) then puts v2.
    let a = cache(&cluster, 1 << 20, |r| r.write_through = true);
    let b = cache(&cluster, 1 << 20, |_| {});
    let (ns, _) = a.register_namespace(spec("supersede")).unwrap();
    b.register_namespace(spec("supersede")).unwrap();
    let v1 = chain(3, 1, ns.block_bytes as usize);
    a.put_batch(&ns.id, &v1).unwrap();
    assert!(a.flush_remote(Duration::from_secs(10)));
    let v2 = chain(3, 2, ns.block_bytes as usize);
    b.put_batch(&ns.id, &v2).unwrap();
    // Until the delete reaches the cluster, B's own remote reads miss.
    let keys: Vec<BlockKey> = v2.iter().map(|i| i.key).collect();
    assert!(
        b.remote()
            .unwrap()
            .get_many(&ns.id, &keys, ns.block_bytes)
            .iter()
            .all(Option::is_none)
    );
    assert!(b.flush_remote(Duration::from_secs(10)));
    // B's host copy is v2; the cluster's v1 is gone, so no node can get it.
    let got = b.get_batch(&ns.id, &keys).unwrap();
    for (item, got) in v2.iter().zip(&got) {
        assert_eq!(
            got.as_ref().map(|g| g.0.clone()),
            Some(item.payload.clone())
        );
    }
    assert!(
        a.remote()
            .unwrap()
            .get_many(&ns.id, &keys, ns.block_bytes)
            .iter()
            .all(Option::is_none)
    );
}

#[test]
fn a_killed_node_gives_misses_not_errors_and_local_tiers_keep_serving() {
    let mut cluster = RedisCluster::start(3);
    let c = cache(&cluster, 1 << 20, |r| {
        r.write_through = true;
        r.deadline = Duration::from_millis(300);
    });
    let (ns, _) = c.register_namespace(spec("kill")).unwrap();
    let items = chain(30, 1, ns.block_bytes as usize);
    c.put_batch(&ns.id, &items).unwrap();
    assert!(c.flush_remote(Duration::from_secs(10)));
    let keys: Vec<BlockKey> = items.iter().map(|i| i.key).collect();
    let on_node: Vec<usize> = keys
        .iter()
        .map(|k| cluster.node_of(&redis_key(&ns.id, k)))
        .collect();
    assert!(on_node.contains(&0), "some block must live on node 0");
    cluster.kill(0);

    let remote = c.remote().unwrap();
    for round in 0..3 {
        let t = Instant::now();
        let got = remote.get_many(&ns.id, &keys, ns.block_bytes);
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "round {round}: {:?}",
            t.elapsed()
        );
        for (i, g) in got.iter().enumerate() {
            match g {
                Some(b) => assert_eq!(b.payload, items[i].payload, "block {i}"),
                None => assert_eq!(
                    on_node[i], 0,
                    "block {i} on a live node missed (round {round})"
                ),
            }
        }
        // Blocks on the live nodes are still served.
        assert!(
            got.iter()
                .enumerate()
                .any(|(i, g)| on_node[i] != 0 && g.is_some())
        );
    }
    let s = remote.stats();
    assert!(s.errors + s.timeouts > 0, "{s:?}");
    // The host tier is unaffected.
    let local = c.get_batch(&ns.id, &keys).unwrap();
    assert!(
        local
            .iter()
            .all(|g| g.as_ref().is_some_and(|g| g.1 == TierKind::Host))
    );
}

#[test]
fn no_cluster_means_quick_misses_and_counted_connect_failures() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tier = RemoteTier::open(
        RemoteTierConfig {
            nodes: vec![format!("redis://127.0.0.1:{port}")],
            connect_timeout: Duration::from_millis(200),
            retry_interval: Duration::from_millis(50),
            ..RemoteTierConfig::default()
        },
        Arc::new(EventBus::new(16)),
        runtime(),
    )
    .expect("opens without the cluster");
    assert!(!tier.wait_connected(Duration::from_millis(500)));
    let ns = NamespaceId([7; 16]);
    let t = Instant::now();
    assert!(tier.get_many(&ns, &[key(1)], 8192)[0].is_none());
    assert_eq!(tier.exists_many(&ns, &[key(1)]), vec![false]);
    assert!(t.elapsed() < Duration::from_millis(100));
    let s = tier.stats();
    assert!(
        !s.connected && s.connect_failures >= 1 && !s.last_error.is_empty(),
        "{s:?}"
    );

    // Bad configuration is refused with the field named.
    let e = RemoteTier::open(
        RemoteTierConfig {
            nodes: vec!["not a url".into()],
            ..RemoteTierConfig::default()
        },
        Arc::new(EventBus::new(16)),
        runtime(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("remote.nodes"), "{e}");
}

#[test]
fn a_slow_node_is_a_miss_within_the_deadline() {
    let cluster = RedisCluster::start(3);
    let c = cache(&cluster, 1 << 20, |r| {
        r.write_through = true;
        r.deadline = Duration::from_millis(200);
    });
    let (ns, _) = c.register_namespace(spec("slow")).unwrap();
    let items = chain(24, 1, ns.block_bytes as usize);
    c.put_batch(&ns.id, &items).unwrap();
    assert!(c.flush_remote(Duration::from_secs(10)));
    let keys: Vec<BlockKey> = items.iter().map(|i| i.key).collect();
    let on_node: Vec<usize> = keys
        .iter()
        .map(|k| cluster.node_of(&redis_key(&ns.id, k)))
        .collect();
    assert!(on_node.contains(&1) && on_node.iter().any(|&n| n != 1));
    // Node 1 stops answering commands for 3 s (it stays connected).
    assert!(
        cluster
            .cli(1, &["CLIENT", "PAUSE", "3000", "ALL"])
            .is_some()
    );
    let remote = c.remote().unwrap();
    let t = Instant::now();
    let got = remote.get_many(&ns.id, &keys, ns.block_bytes);
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "a paused node held a read for {took:?}"
    );
    for (i, g) in got.iter().enumerate() {
        match g {
            Some(b) => assert_eq!(b.payload, items[i].payload, "block {i}"),
            None => assert_eq!(on_node[i], 1, "block {i} on a live node missed"),
        }
    }
    assert!(
        got.iter()
            .enumerate()
            .any(|(i, g)| on_node[i] != 1 && g.is_some())
    );
    assert!(remote.stats().timeouts > 0, "{:?}", remote.stats());
}

#[test]
fn the_tier_reconnects_when_a_dead_node_returns() {
    let mut cluster = RedisCluster::start(3);
    let c = cache(&cluster, 1 << 20, |r| {
        r.write_through = true;
        r.deadline = Duration::from_millis(300);
    });
    let (ns, _) = c.register_namespace(spec("rejoin")).unwrap();
    let keys: Vec<BlockKey> = (0..30).map(key).collect();
    let on_node: Vec<usize> = keys
        .iter()
        .map(|k| cluster.node_of(&redis_key(&ns.id, k)))
        .collect();
    assert!(on_node.contains(&2));
    cluster.kill(2);
    // Writes to the dead node fail (and leave deletes to retry); reads of its keys miss.
    let v1 = chain(30, 1, ns.block_bytes as usize);
    c.put_batch(&ns.id, &v1).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let remote = c.remote().unwrap();
    let got = remote.get_many(&ns.id, &keys, ns.block_bytes);
    for (i, g) in got.iter().enumerate() {
        if on_node[i] == 2 {
            assert!(g.is_none(), "block {i} read from a dead node");
        }
    }
    assert!(remote.stats().errors + remote.stats().timeouts > 0);

    // The node comes back (empty: no persistence). Without any restart of the
    // daemon, new writes reach it and reads hit again.
    cluster.restart(2);
    let v2 = chain(30, 2, ns.block_bytes as usize);
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        c.put_batch(&ns.id, &v2).unwrap();
        let flushed = c.flush_remote(Duration::from_secs(5));
        let got = remote.get_many(&ns.id, &keys, ns.block_bytes);
        let all = got
            .iter()
            .zip(&v2)
            .all(|(g, item)| g.as_ref().is_some_and(|b| b.payload == item.payload));
        if flushed && all {
            break;
        }
        // Never wrong bytes on the way, only misses.
        for (g, item) in got.iter().zip(&v2) {
            if let Some(b) = g {
                assert_eq!(b.payload, item.payload);
            }
        }
        assert!(
            Instant::now() < end,
            "the tier never recovered: {:?}",
            remote.stats()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The tier runs on the runtime it was given: its blocking reads work from
/// that runtime's own workers (without starving it) and its async reads
/// from tasks; closing the cache drains the queue and stops the tasks.
#[test]
fn reads_from_the_runtime_itself_and_an_ordered_close() {
    let cluster = RedisCluster::start(3);
    let c = Arc::new(cache(&cluster, 1 << 20, |r| r.write_through = true));
    let (ns, _) = c.register_namespace(spec("runtime")).unwrap();
    let items = chain(8, 1, ns.block_bytes as usize);
    c.put_batch(&ns.id, &items).unwrap();
    assert!(c.flush_remote(Duration::from_secs(10)));
    let keys: Vec<BlockKey> = items.iter().map(|i| i.key).collect();
    let other = c.register_namespace(spec("runtime-other")).unwrap().0.id;
    let (ns_id, block_bytes) = (ns.id, ns.block_bytes);

    // From tasks on the tier's own runtime, several at once: the blocking
    // form (a lookup missing every local tier) and the async one.
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (c, keys) = (Arc::clone(&c), keys.clone());
            runtime().spawn(async move {
                let remote = c.remote().expect("remote tier").clone();
                let tiers = c.lookup(&other, &keys).unwrap();
                let got = remote.get_many_async(&ns_id, &keys, block_bytes).await;
                let exists = remote.exists_many_async(&ns_id, &keys).await;
                (tiers, got, exists)
            })
        })
        .collect();
    for task in tasks {
        let (tiers, got, exists) = runtime().block_on(task).unwrap();
        assert!(tiers.is_empty(), "nothing of the other namespace is cached");
        assert!(exists.iter().all(|e| *e));
        for (g, item) in got.iter().zip(&items) {
            assert_eq!(g.as_ref().map(|b| &b.payload), Some(&item.payload));
        }
    }

    // Written through after the close started: refused; queued before: on
    // the cluster afterwards.
    let late = chain(9, 2, ns.block_bytes as usize);
    c.put_batch(&ns.id, &late[8..]).unwrap();
    c.close();
    assert_eq!(
        c.put_batch(&ns.id, &late[..1]).unwrap_err(),
        kvstrata_tiers::CacheError::Closed
    );
    let mut conn = raw(&cluster);
    let v: Option<Vec<u8>> = conn.get(redis_key(&ns.id, &late[8].key)).unwrap();
    assert!(
        v.is_some(),
        "the queued write reached the cluster before the close returned"
    );
    let remote = c.remote().unwrap();
    assert!(!remote.is_connected());
    assert_eq!(remote.stats().queued_bytes, 0);
}
