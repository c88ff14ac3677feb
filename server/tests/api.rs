//! Integration tests of the gRPC API against a real daemon (ephemeral TCP port
//! and a temp Unix socket), through the real client.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use kvstrata_client::{Client, PutItem};
use kvstrata_proto::v1 as pb;
use tokio_stream::StreamExt;
use tonic::Code;

#[tokio::test]
async fn round_trip_over_tcp_and_uds() {
    let t = start(1 << 20).await;
    let (ns, bb) = register(&t.tcp, "m").await;
    assert_eq!(bb, 8192);
    let items = vec![
        item("a", None, bb),
        item("b", Some("a"), bb),
        item("c", Some("b"), bb),
    ];
    let r = t.tcp.batch_put(&ns, items).await.unwrap();
    assert_eq!(r.stored, 3);
    assert!(r.results.iter().all(|s| *s == pb::PutStatus::Stored as i32));
    // Written over TCP, read over the Unix socket.
    let got = t.uds.batch_get(&ns, &["a", "b", "c", "zz"]).await.unwrap();
    for (i, k) in ["a", "b", "c"].iter().enumerate() {
        assert!(got[i].found);
        assert_eq!(got[i].key, Bytes::from(*k));
        assert_eq!(got[i].payload, payload(k, 0, bb), "bytes of {k}");
        assert_eq!(got[i].tier, pb::Tier::Host as i32);
    }
    assert!(!got[3].found);
    assert!(got[3].payload.is_empty());
    // Overwrite: the read returns the latest bytes.
    let v1 = payload("a", 1, bb);
    t.uds
        .batch_put(&ns, vec![PutItem::new("a", v1.clone())])
        .await
        .unwrap();
    assert_eq!(t.tcp.batch_get(&ns, &["a"]).await.unwrap()[0].payload, v1);
    let s = host_stats(&t.tcp).await;
    assert_eq!(s.blocks, 3);
    assert_eq!(s.used_bytes, 3 * bb as u64);
    assert_eq!(s.hits, 4);
    assert_eq!(s.misses, 1);
    t.stop().await;
}

#[tokio::test]
async fn large_blocks_pass_message_limits() {
    let t = start(64 << 20).await;
    let spec = kvstrata_tiers::NamespaceSpec::layer_major(
        "big",
        32,
        8,
        128,
        kvstrata_tiers::Dtype::F16,
        16,
    );
    let r = t.uds.register_namespace(&spec).await.unwrap();
    let bb = r.block_bytes as usize;
    assert_eq!(bb, 32 * 2 * 16 * 8 * 128 * 2); // 2 MiB
    let items: Vec<_> = (0..4).map(|i| item(&format!("big{i}"), None, bb)).collect(); // 8 MiB message
    assert_eq!(t.uds.batch_put(&r.id, items).await.unwrap().stored, 4);
    let keys: Vec<String> = (0..4).map(|i| format!("big{i}")).collect();
    let got = t.tcp.batch_get(&r.id, &keys).await.unwrap();
    for (k, g) in keys.iter().zip(&got) {
        assert_eq!(g.payload, payload(k, 0, bb));
    }
    t.stop().await;
}

#[tokio::test]
async fn lookup_finds_longest_cached_prefix() {
    let t = start(1 << 20).await;
    let (ns, bb) = register(&t.tcp, "m").await;
    let tokens: Vec<u32> = (0..80).map(|i| i * 7 + 3).collect();
    let keys = kvstrata_client::hash::block_keys(&ns, &tokens, 16);
    assert_eq!(keys.len(), 5);
    let items: Vec<_> = keys[..3]
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let it = PutItem::new(
                Bytes::copy_from_slice(k),
                payload(&format!("blk{i}"), 0, bb),
            );
            if i > 0 {
                it.with_parent(Bytes::copy_from_slice(&keys[i - 1]))
            } else {
                it
            }
        })
        .collect();
    t.tcp.batch_put(&ns, items).await.unwrap();
    let r = t.tcp.lookup(&ns, &keys).await.unwrap();
    assert_eq!(r.matched, 3);
    assert_eq!(r.tiers, vec![pb::Tier::Host as i32; 3]);
    // A gap stops the match even if later blocks are cached.
    t.tcp
        .batch_put(
            &ns,
            vec![PutItem::new(
                Bytes::copy_from_slice(&keys[4]),
                payload("x", 0, bb),
            )],
        )
        .await
        .unwrap();
    t.tcp.delete(&ns, &[keys[1]]).await.unwrap();
    assert_eq!(t.tcp.lookup(&ns, &keys).await.unwrap().matched, 1);
    assert_eq!(t.tcp.lookup(&ns, &[keys[2]]).await.unwrap().matched, 1);
    t.stop().await;
}

#[tokio::test]
async fn eviction_takes_lru_leaves_before_parents() {
    // Room for exactly 4 blocks of 8 KiB.
    let t = start(4 * 8192).await;
    let c = &t.tcp;
    let (ns, bb) = register(c, "m").await;
    put(c, &ns, "p", None, bb).await; // oldest, but will have a child
    put(c, &ns, "child", Some("p"), bb).await;
    put(c, &ns, "x", None, bb).await;
    put(c, &ns, "y", None, bb).await;
    // Touch x so y... order of leaves by recency: child (oldest), y, x.
    assert!(present(c, &ns, "x", bb).await);
    put(c, &ns, "n1", None, bb).await; // evicts the LRU leaf: child
    assert!(!present(c, &ns, "child", bb).await);
    assert!(
        present(c, &ns, "p", bb).await,
        "a parent outlives its children"
    );
    // Leaves now by recency: y (oldest), n1, x, p (just read). y goes next.
    put(c, &ns, "n2", None, bb).await;
    assert!(!present(c, &ns, "y", bb).await);
    for k in ["p", "x", "n1", "n2"] {
        assert!(present(c, &ns, k, bb).await, "{k} should still be cached");
    }
    let s = host_stats(c).await;
    assert_eq!(s.evictions, 2);
    assert_eq!(s.blocks, 4);
    assert!(s.used_bytes <= s.capacity_bytes);
    t.stop().await;
}

#[tokio::test]
async fn parents_stay_while_children_are_cached() {
    let t = start(3 * 8192).await;
    let c = &t.tcp;
    let (ns, bb) = register(c, "m").await;
    put(c, &ns, "root", None, bb).await;
    put(c, &ns, "mid", Some("root"), bb).await;
    put(c, &ns, "leaf", Some("mid"), bb).await;
    // Full. Each new block evicts the current leaf, never an inner block.
    put(c, &ns, "other", None, bb).await;
    assert!(present(c, &ns, "root", bb).await);
    assert!(present(c, &ns, "mid", bb).await);
    assert!(!present(c, &ns, "leaf", bb).await);
    t.stop().await;
}

#[tokio::test]
async fn pins_survive_pressure_and_leases_expire() {
    let t = start(3 * 8192).await;
    let c = &t.uds;
    let (ns, bb) = register(c, "m").await;
    put(c, &ns, "keep", None, bb).await;
    let lease = c
        .pin(&ns, &["keep"], Duration::from_secs(60))
        .await
        .unwrap();
    assert!(lease.lease_id > 0);
    for i in 0..12 {
        put(c, &ns, &format!("f{i}"), None, bb).await;
    }
    assert!(present(c, &ns, "keep", bb).await);
    assert_eq!(host_stats(c).await.pinned_blocks, 1);
    // Explicit evict skips pinned blocks.
    let ev = c.evict(&ns, &["keep"], false).await.unwrap();
    assert_eq!((ev.evicted, ev.skipped_pinned), (0, 1));
    c.unpin(lease.lease_id).await.unwrap();
    assert_eq!(host_stats(c).await.pinned_blocks, 0);
    for i in 0..3 {
        put(c, &ns, &format!("g{i}"), None, bb).await;
    }
    assert!(!present(c, &ns, "keep", bb).await);

    // A short lease ends by itself.
    put(c, &ns, "brief", None, bb).await;
    c.pin(&ns, &["brief"], Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(c.stats().await.unwrap().active_leases, 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let s = c.stats().await.unwrap();
    assert_eq!(s.active_leases, 0);
    assert_eq!(host_stats(c).await.pinned_blocks, 0);
    t.stop().await;
}

#[tokio::test]
async fn all_pinned_means_no_space_not_overflow() {
    let t = start(2 * 8192).await;
    let c = &t.tcp;
    let (ns, bb) = register(c, "m").await;
    put(c, &ns, "a", None, bb).await;
    put(c, &ns, "b", None, bb).await;
    c.pin(&ns, &["a", "b"], Duration::from_secs(60))
        .await
        .unwrap();
    let r = c.batch_put(&ns, vec![item("c", None, bb)]).await.unwrap();
    assert_eq!(r.stored, 0);
    assert_eq!(r.results, vec![pb::PutStatus::NoSpace as i32]);
    let s = host_stats(c).await;
    assert_eq!(s.rejected_puts, 1);
    assert_eq!(s.used_bytes, 2 * 8192);
    t.stop().await;
}

fn expect_err<T: std::fmt::Debug>(
    r: Result<T, kvstrata_client::ClientError>,
    code: Code,
    field: &str,
) {
    let e = r.expect_err("request should fail");
    let status = e.status().unwrap_or_else(|| panic!("not a status: {e}"));
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(field),
        "message {:?} should name {field}",
        status.message()
    );
}

#[tokio::test]
async fn bad_input_gets_the_right_code_and_changes_nothing() {
    let t = start_with(1 << 20, 8).await;
    let c = &t.tcp;
    let (ns, bb) = register(c, "m").await;
    put(c, &ns, "a", None, bb).await;
    let before = c.stats().await.unwrap();

    // Payload of the wrong size, even with a good item first: nothing stored.
    let r = c
        .batch_put(&ns, vec![item("ok", None, bb), item("bad", None, bb - 1)])
        .await;
    expect_err(r, Code::InvalidArgument, "items[1].payload");
    // Unknown namespace / malformed namespace id.
    let other = kvstrata_tiers::NamespaceId([0xab; 16]);
    expect_err(
        c.batch_put(&other, vec![item("x", None, bb)]).await,
        Code::NotFound,
        "namespace_id",
    );
    expect_err(
        c.batch_get(&other, &["a"]).await,
        Code::NotFound,
        "namespace_id",
    );
    expect_err(
        c.lookup(&other, &["a"]).await,
        Code::NotFound,
        "namespace_id",
    );
    let mut raw = c.raw();
    let bad_id = raw
        .batch_get(pb::BatchGetRequest {
            namespace_id: Bytes::from_static(b"short"),
            keys: vec![Bytes::from("a")],
            ranges: Vec::new(),
            pages: Vec::new(),
            ..Default::default()
        })
        .await;
    let s = bad_id.expect_err("short id");
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("namespace_id"));
    // Empty and oversized keys.
    expect_err(
        c.batch_put(&ns, vec![PutItem::new(Bytes::new(), payload("e", 0, bb))])
            .await,
        Code::InvalidArgument,
        "items[0].key",
    );
    expect_err(
        c.batch_get(&ns, &[vec![1u8; 65]]).await,
        Code::InvalidArgument,
        "keys[0]",
    );
    expect_err(
        c.lookup(&ns, &["a", ""]).await,
        Code::InvalidArgument,
        "keys[1]",
    );
    let bad_parent = item("q", None, bb).with_parent(Bytes::from(vec![0u8; 65]));
    expect_err(
        c.batch_put(&ns, vec![bad_parent]).await,
        Code::InvalidArgument,
        "items[0].parent",
    );
    // Batch over the limit (8).
    let nine: Vec<String> = (0..9).map(|i| format!("k{i}")).collect();
    expect_err(
        c.batch_get(&ns, &nine).await,
        Code::ResourceExhausted,
        "keys",
    );
    let nine_items: Vec<_> = nine.iter().map(|k| item(k, None, bb)).collect();
    expect_err(
        c.batch_put(&ns, nine_items).await,
        Code::ResourceExhausted,
        "items",
    );
    // Lease on a missing block; bad lease lengths; unknown lease.
    expect_err(
        c.pin(&ns, &["a", "missing"], Duration::from_secs(1)).await,
        Code::FailedPrecondition,
        "keys[1]",
    );
    expect_err(
        c.pin(&ns, &["a"], Duration::ZERO).await,
        Code::InvalidArgument,
        "lease_ms",
    );
    expect_err(
        c.pin(&ns, &["a"], Duration::from_secs(3600)).await,
        Code::InvalidArgument,
        "lease_ms",
    );
    expect_err(c.unpin(987654).await, Code::NotFound, "lease_id");
    // Bad namespace specs.
    let mut spec = small_spec("m");
    spec.head_dim = 0;
    expect_err(
        c.register_namespace(&spec).await,
        Code::InvalidArgument,
        "spec.head_dim",
    );
    let mut spec = small_spec("");
    spec.model_id.clear();
    expect_err(
        c.register_namespace(&spec).await,
        Code::InvalidArgument,
        "spec.model_id",
    );
    let r = raw
        .register_namespace(pb::RegisterNamespaceRequest {
            spec: Some(pb::NamespaceSpec {
                dtype: 0,
                ..Default::default()
            }),
            policy: None,
        })
        .await;
    let s = r.expect_err("dtype 0");
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("spec.dtype"));
    let big = kvstrata_tiers::NamespaceSpec::layer_major(
        "huge",
        80,
        8,
        128,
        kvstrata_tiers::Dtype::F32,
        256,
    );
    expect_err(
        c.register_namespace(&big).await,
        Code::InvalidArgument,
        "spec",
    );
    // Malformed paging token, evict without keys, inspect of a missing block.
    expect_err(
        c.list_blocks(None, None, 10, Bytes::from_static(b"xyz"))
            .await,
        Code::InvalidArgument,
        "page_token",
    );
    expect_err(
        c.evict(&ns, &[] as &[&str], false).await,
        Code::InvalidArgument,
        "keys",
    );
    expect_err(c.inspect(&ns, "missing").await, Code::NotFound, "key");

    // Nothing changed: same blocks, same bytes, no events, no leases.
    let after = c.stats().await.unwrap();
    assert_eq!(after.tiers[0].blocks, before.tiers[0].blocks);
    assert_eq!(after.tiers[0].used_bytes, before.tiers[0].used_bytes);
    assert_eq!(after.event_seq, before.event_seq);
    assert_eq!(after.active_leases, 0);
    assert_eq!(after.namespaces, 1);
    assert!(present(c, &ns, "a", bb).await);
    assert!(!present(c, &ns, "ok", bb).await);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_concurrent_tasks_read_exact_bytes_within_capacity() {
    // Working set (8 tasks x 40 keys x 8 KiB = 2.5 MiB) larger than the tier (1 MiB).
    let capacity = 1u64 << 20;
    let t = start(capacity).await;
    let (ns, bb) = register(&t.tcp, "m").await;
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let c = t.uds.clone();
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut max_seen = 0;
            while !stop.load(Ordering::Relaxed) {
                let s = host_stats(&c).await;
                assert!(
                    s.used_bytes <= s.capacity_bytes,
                    "used {} > capacity {}",
                    s.used_bytes,
                    s.capacity_bytes
                );
                max_seen = max_seen.max(s.used_bytes);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            max_seen
        })
    };
    let mut tasks = Vec::new();
    for task in 0..8 {
        let c: Client = if task % 2 == 0 {
            t.tcp.clone()
        } else {
            t.uds.clone()
        };
        tasks.push(tokio::spawn(async move {
            let mut latest: HashMap<String, u32> = HashMap::new();
            let (mut hits, mut misses) = (0u32, 0u32);
            for round in 0..60u32 {
                // Write a batch of 4 keys with new versions.
                let mut items = Vec::new();
                for j in 0..4 {
                    let key = format!("t{task}-k{}", (round * 4 + j) % 40);
                    let version = latest.get(&key).map_or(0, |v| v + 1);
                    latest.insert(key.clone(), version);
                    items.push(PutItem::new(
                        Bytes::from(key.clone()),
                        payload(&key, version, bb),
                    ));
                }
                let r = c.batch_put(&ns, items).await.expect("put");
                assert_eq!(r.results.len(), 4);
                // Read back 8 keys this task wrote: exact latest bytes or a miss.
                let keys: Vec<String> = (0..8)
                    .map(|j| format!("t{task}-k{}", (round * 3 + j) % 40))
                    .collect();
                let got = c.batch_get(&ns, &keys).await.expect("get");
                for (k, g) in keys.iter().zip(got) {
                    if g.found {
                        let v = *latest.get(k).expect("only written keys are found");
                        assert_eq!(
                            g.payload,
                            payload(k, v, bb),
                            "task {task} read wrong bytes for {k}"
                        );
                        hits += 1;
                    } else {
                        misses += 1;
                    }
                }
            }
            (hits, misses)
        }));
    }
    let mut hits = 0;
    for task in tasks {
        hits += task.await.expect("task").0;
    }
    stop.store(true, Ordering::Relaxed);
    let max_used = poller.await.expect("poller");
    assert!(hits > 0, "some reads should hit");
    assert!(max_used <= capacity);
    let s = host_stats(&t.tcp).await;
    assert!(
        s.evictions > 0,
        "the working set exceeds the tier, so blocks were evicted"
    );
    assert!(s.used_bytes <= capacity);
    assert_eq!(s.pinned_blocks, 0);
    t.stop().await;
}

#[tokio::test]
async fn streams_move_many_blocks_in_order() {
    let t = start(4 << 20).await;
    let (ns, bb) = register(&t.uds, "m").await;
    let batches: Vec<Vec<PutItem>> = (0..5)
        .map(|b| {
            (0..20)
                .map(|i| item(&format!("s{b}-{i}"), None, bb))
                .collect()
        })
        .collect();
    let resps = t.uds.put_batches(&ns, batches).await.unwrap();
    assert_eq!(resps.len(), 5);
    assert!(resps.iter().all(|r| r.stored == 20));
    let mut keys: Vec<String> = (0..5)
        .flat_map(|b| (0..20).map(move |i| format!("s{b}-{i}")))
        .collect();
    keys.push("absent".into());
    let mut stream = t.tcp.get_stream(&ns, &keys).await.unwrap();
    let mut n = 0;
    while let Some(r) = stream.next().await {
        let r = r.unwrap();
        assert_eq!(r.key, Bytes::from(keys[n].clone()));
        if keys[n] == "absent" {
            assert!(!r.found);
        } else {
            assert!(r.found);
            assert_eq!(r.payload, payload(&keys[n], 0, bb));
        }
        n += 1;
    }
    assert_eq!(n, keys.len());
    // A bad batch in a stream fails the stream; earlier batches stay stored.
    let bad = vec![vec![item("ok1", None, bb)], vec![item("bad", None, 10)]];
    let r = t.uds.put_batches(&ns, bad).await;
    assert_eq!(r.unwrap_err().code(), Some(Code::InvalidArgument));
    assert!(present(&t.uds, &ns, "ok1", bb).await);
    t.stop().await;
}

#[tokio::test]
async fn watch_reports_stored_evicted_deleted_in_sequence() {
    let t = start(2 * 8192).await;
    let (ns, bb) = register(&t.tcp, "m").await;
    let mut events = t.uds.watch(Some(&ns)).await.unwrap();
    // Let the subscription reach the server before producing events.
    tokio::time::sleep(SHORT).await;
    put(&t.tcp, &ns, "a", None, bb).await;
    put(&t.tcp, &ns, "b", Some("a"), bb).await;
    put(&t.tcp, &ns, "c", None, bb).await; // evicts b (the LRU leaf)
    t.tcp.delete(&ns, &["a"]).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let e = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("event in time")
            .unwrap()
            .unwrap();
        seen.push(e);
    }
    let kinds: Vec<_> = seen
        .iter()
        .map(|e| (e.kind, String::from_utf8_lossy(&e.key).into_owned()))
        .collect();
    use pb::EventKind::*;
    assert_eq!(
        kinds,
        vec![
            (Stored as i32, "a".into()),
            (Stored as i32, "b".into()),
            (Evicted as i32, "b".into()),
            (Stored as i32, "c".into()),
            (Deleted as i32, "a".into()),
        ]
    );
    assert!(
        seen.windows(2).all(|w| w[1].seq == w[0].seq + 1),
        "sequence numbers increase by one"
    );
    assert_eq!(seen[1].parent, Bytes::from("a"));
    assert!(
        seen.iter()
            .all(|e| e.tier == pb::Tier::Host as i32 && e.namespace_id.as_ref() == ns.as_bytes())
    );
    t.stop().await;
}

#[tokio::test]
async fn list_blocks_pages_and_filters() {
    let t = start(1 << 20).await;
    let (ns, bb) = register(&t.tcp, "m").await;
    let (ns2, _) = register(&t.tcp, "other").await;
    for i in 0..10 {
        put(&t.tcp, &ns, &format!("b{i}"), None, bb).await;
    }
    put(&t.tcp, &ns2, "z", None, bb).await;
    let mut token = Bytes::new();
    let mut keys = Vec::new();
    loop {
        let page = t
            .tcp
            .list_blocks(Some(&ns), None, 3, token.clone())
            .await
            .unwrap();
        assert!(page.blocks.len() <= 3);
        keys.extend(
            page.blocks
                .iter()
                .map(|b| String::from_utf8_lossy(&b.key).into_owned()),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    keys.sort();
    let mut want: Vec<String> = (0..10).map(|i| format!("b{i}")).collect();
    want.sort();
    assert_eq!(keys, want);
    assert_eq!(
        t.tcp.list_all_blocks(None, None, None).await.unwrap().len(),
        11
    );
    assert_eq!(
        t.tcp
            .list_all_blocks(None, Some(pb::Tier::Host), None)
            .await
            .unwrap()
            .len(),
        11
    );
    assert_eq!(
        t.tcp
            .list_all_blocks(None, Some(pb::Tier::Disk), None)
            .await
            .unwrap()
            .len(),
        0
    );
    let i = t.tcp.inspect(&ns, "b3").await.unwrap();
    assert!(i.checksum_ok);
    assert_eq!(
        i.payload_xxh3,
        xxhash_rust::xxh3::xxh3_64(&payload("b3", 0, bb))
    );
    assert_eq!(i.block.unwrap().payload_bytes, bb as u64);
    t.stop().await;
}

#[tokio::test]
async fn health_reflection_and_metrics_answer() {
    let t = start(1 << 20).await;
    let target = t.daemon().addrs().tcp_target().unwrap();
    let channel = tonic::transport::Endpoint::from_shared(target)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "kvstrata.v1.KvCache"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap();
        assert_eq!(
            r.into_inner().status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut refl = ServerReflectionClient::new(channel);
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let msg = resp.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("{msg:?}")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"kvstrata.v1.KvCache"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

    // Metrics over plain HTTP.
    let (ns, bb) = register(&t.tcp, "m").await;
    put(&t.tcp, &ns, "a", None, bb).await;
    let addr = t.daemon().addrs().metrics.unwrap();
    let body = http_get(addr, "/metrics").await;
    assert!(
        body.contains("kvstrata_tier_used_bytes{tier=\"host\"} 8192"),
        "{body}"
    );
    assert!(
        body.contains("kvstrata_requests_total{method=\"BatchPut\",code=\"Ok\"} 1"),
        "{body}"
    );
    t.stop().await;
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

#[tokio::test]
async fn a_second_daemon_refuses_a_live_socket_and_shutdown_removes_it() {
    let t = start(1 << 20).await;
    let sock = t.daemon().addrs().uds.clone().unwrap();
    let mut cfg = config(t.dir.path(), 1 << 20, 16);
    cfg.server.uds_path = sock.display().to_string();
    let err = kvstrata_server::Daemon::start(cfg)
        .await
        .err()
        .expect("socket in use");
    assert!(err.to_string().contains("in use"), "{err}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    t.stop().await;
    assert!(!sock.exists(), "socket removed on shutdown");
}
