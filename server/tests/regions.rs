//! The KV-region data path against a real daemon, on the CPU backend with
//! memfd regions (what CI runs; the GPU machine runs the same checks with a
//! CUDA IPC region): registration on the region socket by the real client,
//! puts by page ids and gets into pages checked byte for byte against the
//! kernels' CPU references, bad page lists and bad preambles, closed regions,
//! limits, and start-up with and without a GPU. Regions are staged through
//! pinned memory unless the cache runs on the region's own device; with
//! `gpu.enabled = "cpu"` it does, and the `direct_*` tests of regions_direct.rs
//! run the direct path (gathers into HBM slots, scatters from them) that CUDA
//! IPC regions take on a GPU.

mod common;
#[path = "common/regions.rs"]
mod regions_support;

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvstrata_client::region::{KIND_CUDA_IPC, KIND_MEMFD, KvRegionError, encode_preamble};
use kvstrata_client::{KvRegion, PagesPutItem, PutItem};
use kvstrata_gpucheck::{check_pages_round_trip, nonzero_bytes};
use kvstrata_kernels::PagedGeometry;
use kvstrata_proto::v1 as pb;
use kvstrata_server::Daemon;
use kvstrata_tiers::{Dtype, NamespaceSpec};
use regions_support::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pages_round_trip_byte_for_byte_in_both_layouts() {
    let r = start().await;
    for (i, (g, ppb)) in [
        (per_layer(), 2),
        (cross_layer(), 1),
        (cross_layer(), 3),
        (k_then_v(), 2),
    ]
    .into_iter()
    .enumerate()
    {
        let mut region = r.region(&format!("engine-{i}"), g);
        // The region's bytes are the client's own memfd mapping here.
        let report = check_pages_round_trip(&r.client, &mut region, None, ppb, 3, 1000 + i as u64)
            .await
            .unwrap_or_else(|e| panic!("{:?} ppb {ppb}: {e}", g.layout));
        assert!(report.blocks >= 1, "{report:?}");
        assert_eq!(report.block_bytes, g.block_bytes(ppb));
        let s = r.stats().await;
        let info = s
            .kv_regions
            .iter()
            .find(|x| x.region_id == region.id())
            .expect("region listed");
        assert_eq!(info.kind, "memfd");
        assert_eq!(info.layout, g.layout.name());
        assert_eq!(info.num_pages, g.num_pages);
        assert_eq!(
            info.bytes_gathered,
            report.blocks as u64 * report.block_bytes
        );
        // Two gets into pages: per-key lists, then an array answered when
        // queued.
        assert_eq!(
            info.bytes_scattered,
            2 * report.blocks as u64 * report.block_bytes
        );
    }
    let m = r.metrics().await;
    assert!(m.contains("kvstrata_kv_region_gathered_bytes_total"), "{m}");
    assert!(
        m.contains("kvstrata_kv_region_registrations_total 4"),
        "{m}"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn put_by_pages_matches_the_reference_gather_and_get_leaves_other_pages() {
    let r = start().await;
    let g = per_layer();
    let mut region = r.region("direct", g);
    let fill = nonzero_bytes(7, region.len() as usize);
    region.as_mut_slice().expect("memfd").copy_from_slice(&fill);
    let (ns, block) = ns_for(&r.client, "direct", &g, 2).await;
    // A page named twice in one block, pages out of order, and an inline item
    // in the same request.
    let inline = nonzero_bytes(8, block);
    let put = r
        .client
        .put_pages(
            &ns,
            vec![
                PagesPutItem::new(key("a"), region.pages(vec![12, 0])),
                PagesPutItem::new(key("b"), region.pages(vec![5, 5])).with_parent(key("a")),
            ],
        )
        .await
        .expect("put");
    assert_eq!(put.stored, 2, "{put:?}");
    r.client
        .batch_put(&ns, vec![PutItem::new(key("c"), inline.clone())])
        .await
        .expect("inline put");
    let got = r.client.batch_get(&ns, &[b"a", b"b"]).await.expect("get");
    for (res, pages) in got.iter().zip([[12u32, 0], [5, 5]]) {
        let mut want = vec![0u8; block];
        kvstrata_kernels::reference::gather(&g, 2, &pages, &fill, &mut want).expect("reference");
        assert!(res.found);
        assert!(res.payload == want, "block of pages {pages:?} differs");
    }
    // Get "c" into pages 3 and 7: exactly those pages change.
    let got = r
        .client
        .get_pages(
            &ns,
            &[&b"c"[..], &b"missing"[..]],
            &[region.pages(vec![3, 7]), region.pages(vec![1, 2])],
        )
        .await
        .expect("get into pages");
    assert!(got[0].found && got[0].payload.is_empty() && got[0].region_error.is_empty());
    assert!(
        !got[1].found && got[1].region_error.is_empty(),
        "a miss leaves its pages"
    );
    let mut want = fill.clone();
    kvstrata_kernels::reference::scatter(&g, 2, &[3, 7], &inline, &mut want).expect("reference");
    assert!(
        region.as_slice().expect("memfd") == &want[..],
        "region differs from the reference scatter"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_page_lists_are_refused_naming_the_field_and_store_nothing() {
    let r = start().await;
    let g = cross_layer();
    let region = r.region("bad-pages", g);
    let (ns, _) = ns_for(&r.client, "bad-pages", &g, 2).await;
    let raw = r.client.raw();
    let put = |items: Vec<pb::PutItem>| {
        let mut raw = raw.clone();
        let ns = Bytes::copy_from_slice(ns.as_bytes());
        async move {
            raw.batch_put(pb::BatchPutRequest {
                namespace_id: ns,
                items,
                ..Default::default()
            })
            .await
        }
    };
    let item =
        |k: &str, pages: pb::KvPages| -> pb::PutItem { PagesPutItem::new(key(k), pages).into() };
    let refused = |r: Result<tonic::Response<pb::BatchPutResponse>, tonic::Status>, field: &str| {
        let e = r.expect_err("refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().starts_with(field),
            "want {field}: {}",
            e.message()
        );
    };
    // Page id out of range in the second item: nothing stored, not even the first.
    refused(
        put(vec![
            item("ok", region.pages(vec![0, 1])),
            item("bad", region.pages(vec![2, 11])),
        ])
        .await,
        "items[1].pages.page_ids[1]",
    );
    // Wrong number of pages for a block.
    refused(
        put(vec![item("x", region.pages(vec![0]))]).await,
        "items[0].pages.page_ids",
    );
    // Payload and pages together.
    let mut both = item("x", region.pages(vec![0, 1]));
    both.payload = Bytes::from_static(b"zz");
    refused(put(vec![both]).await, "items[0].payload");
    // A namespace whose blocks do not match the region's geometry.
    let mut other = g;
    other.head_dim += 1;
    let (ns_other, _) = ns_for(&r.client, "bad-pages-other", &other, 2).await;
    let e = r
        .client
        .put_pages(
            &ns_other,
            vec![PagesPutItem::new(key("x"), region.pages(vec![0, 1]))],
        )
        .await
        .expect_err("geometry");
    assert_eq!(e.code(), Some(Code::InvalidArgument));
    assert!(e.to_string().contains("items[0].pages.region_id"), "{e}");
    // Blocks that are not a whole number of pages.
    let odd = NamespaceSpec::layer_major(
        "bad-pages-odd",
        g.layers,
        g.kv_heads,
        g.head_dim,
        Dtype::Int8,
        7,
    );
    let odd = r
        .client
        .register_namespace(&odd)
        .await
        .expect("register")
        .id;
    let e = r
        .client
        .put_pages(
            &odd,
            vec![PagesPutItem::new(key("x"), region.pages(vec![0, 1]))],
        )
        .await
        .expect_err("block tokens");
    assert!(e.to_string().contains("items[0].pages.region_id"), "{e}");
    assert!(!r.client.batch_get(&ns, &[b"ok"]).await.expect("get")[0].found);

    // An unknown region id is the item's own problem: the others are stored.
    let resp = put(vec![
        item("stored", region.pages(vec![0, 1])),
        item(
            "unknown",
            pb::KvPages {
                region_id: 999,
                page_ids: vec![0, 1],
            },
        ),
    ])
    .await
    .expect("put")
    .into_inner();
    assert_eq!(
        resp.results,
        vec![
            pb::PutStatus::Stored as i32,
            pb::PutStatus::BadRegion as i32
        ]
    );

    // Gets: a bad page id, a count mismatch, pages with pool ranges, GetStream.
    let e = r
        .client
        .get_pages(&ns, &[b"stored"], &[region.pages(vec![0, 40])])
        .await
        .expect_err("page id");
    assert!(e.to_string().contains("pages[0].page_ids[1]"), "{e}");
    let mut raw2 = r.client.raw();
    let e = raw2
        .batch_get(pb::BatchGetRequest {
            namespace_id: Bytes::copy_from_slice(ns.as_bytes()),
            keys: vec![key("stored"), key("x")],
            ranges: Vec::new(),
            pages: vec![region.pages(vec![0, 1])],
            ..Default::default()
        })
        .await
        .expect_err("count");
    assert!(e.message().starts_with("pages:"), "{}", e.message());
    let e = raw2
        .batch_get(pb::BatchGetRequest {
            namespace_id: Bytes::copy_from_slice(ns.as_bytes()),
            keys: vec![key("stored")],
            ranges: vec![pb::PoolRange {
                pool_id: 1,
                offset: 0,
                length: 1,
            }],
            pages: vec![region.pages(vec![0, 1])],
            ..Default::default()
        })
        .await
        .expect_err("both");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = raw2
        .get_stream(pb::BatchGetRequest {
            namespace_id: Bytes::copy_from_slice(ns.as_bytes()),
            keys: vec![key("stored")],
            ranges: Vec::new(),
            pages: vec![region.pages(vec![0, 1])],
            ..Default::default()
        })
        .await
        .expect_err("stream");
    assert!(e.message().starts_with("pages:"), "{}", e.message());
    let got = r
        .client
        .get_pages(
            &ns,
            &[b"stored"],
            &[pb::KvPages {
                region_id: 999,
                page_ids: vec![0, 1],
            }],
        )
        .await
        .expect("get");
    assert!(
        !got[0].found && got[0].region_error.contains("999"),
        "{got:?}"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_closed_region_is_unregistered_and_refused() {
    let r = start().await;
    let g = per_layer();
    let region = r.region("closing", g);
    let id = region.id();
    let (ns, _) = ns_for(&r.client, "closing", &g, 2).await;
    r.client
        .put_pages(
            &ns,
            vec![PagesPutItem::new(key("k"), region.pages(vec![1, 2]))],
        )
        .await
        .expect("put");
    r.wait_regions(1).await;
    // The client closed its fd after registering: the one left is the daemon's.
    assert_eq!(memfd_fds("closing"), 1);
    drop(region);
    r.wait_regions(0).await;
    let pages = pb::KvPages {
        region_id: id,
        page_ids: vec![1, 2],
    };
    let put = r
        .client
        .put_pages(&ns, vec![PagesPutItem::new(key("k2"), pages.clone())])
        .await
        .expect("put");
    assert_eq!(put.results, vec![pb::PutStatus::BadRegion as i32]);
    let got = r
        .client
        .get_pages(&ns, &[b"k"], &[pages])
        .await
        .expect("get");
    assert!(
        !got[0].found && got[0].region_error.contains("not registered"),
        "{got:?}"
    );
    // The daemon dropped its mapping and fd of the memfd.
    let deadline = Instant::now() + Duration::from_secs(5);
    while memfd_fds("closing") > 0 {
        assert!(
            Instant::now() < deadline,
            "the daemon still holds the memfd"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_preambles_and_limits_are_refused_with_a_reason() {
    let r = start_with(|c| c.gpu.max_regions = 2).await;
    let g = cross_layer();
    let need = g.region_bytes();
    let pre = |kind: u16, bytes: u64, g: &PagedGeometry| {
        encode_preamble(kind, 0, bytes, &[0u8; 64], g, "raw")
    };
    let refused = |res: Result<u64, KvRegionError>, status: u32, field: &str| match res {
        Err(KvRegionError::Refused {
            status: s, message, ..
        }) => {
            assert_eq!(s, status, "{message}");
            assert!(message.starts_with(field), "want {field}: {message}");
        }
        other => panic!("want a refusal naming {field}, got {other:?}"),
    };
    let file = memfd_file("kvs-refused", need);
    let mut b = pre(KIND_MEMFD, need, &g);
    b[0] = b'X';
    refused(r.raw(&b, Some(&file)).1, 1, "magic");
    let mut b = pre(KIND_MEMFD, need, &g);
    b[8] = 9; // versions 3 and 2 are spoken
    refused(r.raw(&b, Some(&file)).1, 1, "version");
    // A version-1 client (32-bit ids counted from 1 in every run) is told why.
    b[8] = 1;
    match r.raw(&b, Some(&file)).1 {
        Err(KvRegionError::Refused {
            status: 1, message, ..
        }) => assert!(
            message.starts_with("version: 1 is not supported") && message.contains("64-bit"),
            "{message}"
        ),
        other => panic!("want a version refusal, got {other:?}"),
    }
    let mut b = pre(KIND_MEMFD, need, &g);
    b[10] = 9;
    refused(r.raw(&b, Some(&file)).1, 1, "kind");
    let mut zero = g;
    zero.kv_heads = 0;
    refused(
        r.raw(&pre(KIND_MEMFD, need, &zero), Some(&file)).1,
        2,
        "kv_heads",
    );
    refused(
        r.raw(&pre(KIND_MEMFD, need - 1, &g), Some(&file)).1,
        2,
        "bytes",
    );
    refused(r.raw(&pre(KIND_MEMFD, need, &g), None).1, 1, "fds");
    let small = memfd_file("kvs-refused", need - 1);
    refused(
        r.raw(&pre(KIND_MEMFD, need, &g), Some(&small)).1,
        4,
        "bytes",
    );
    drop(small);
    refused(
        r.raw(&pre(KIND_CUDA_IPC, need, &g), Some(&file)).1,
        1,
        "fds",
    );
    if r.stats().await.gpus.is_empty() {
        refused(r.raw(&pre(KIND_CUDA_IPC, need, &g), None).1, 5, "device");
    }
    assert_eq!(
        memfd_fds("kvs-refused"),
        1,
        "only the test's own fd is open"
    );
    drop(file);
    // Every fd the daemon received with a refused registration is closed.
    let deadline = Instant::now() + Duration::from_secs(5);
    while memfd_fds("kvs-refused") > 0 {
        assert!(Instant::now() < deadline, "a refused memfd is still open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A preamble cut short, then the connection closed: nothing registered.
    tokio::task::block_in_place(|| {
        use std::io::Write;
        let mut conn = UnixStream::connect(&r.socket).expect("connect");
        conn.write_all(&pre(KIND_MEMFD, need, &g)[..50])
            .expect("write");
    });
    // The limit of 2 regions.
    let a = r.region("limit-a", g);
    let b = r.region("limit-b", g);
    match r.try_region("limit-c", g) {
        Err(KvRegionError::Refused {
            status: 3, message, ..
        }) => {
            assert!(message.contains("gpu.max_regions"), "{message}")
        }
        other => panic!("want the limit, got {other:?}"),
    }
    let a_id = a.id();
    drop(a);
    r.wait_regions(1).await;
    let c = r.region("limit-c", g);
    assert!(c.id() != b.id() && c.id() != a_id);
    let s = r.stats().await;
    assert_eq!(s.kv_regions.len(), 2);
    let m = r.metrics().await;
    for reason in ["preamble", "geometry", "map", "limit"] {
        let line = m
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "kvstrata_kv_regions_refused_total{{reason=\"{reason}\"}}"
                ))
            })
            .unwrap_or_else(|| panic!("no {reason} line in {m}"));
        assert!(!line.ends_with(" 0"), "{line}");
    }
    drop((b, c));
    r.wait_regions(0).await;
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_daemon_serves_without_a_gpu_in_auto_and_refuses_to_start_with_on() {
    let has_gpu = kvstrata_kernels::Gpu::cuda(0).is_ok();
    let r = start_with(|c| c.gpu.enabled = kvstrata_server::config::GpuMode::Auto).await;
    let s = r.stats().await;
    if !has_gpu {
        assert!(s.gpus.is_empty());
        assert!(s.gpu_status.starts_with("no GPU"), "{}", s.gpu_status);
    }
    // The data path works all the same (memfd regions on the CPU backend).
    common::put(
        &r.client,
        &common::register(&r.client, "auto").await.0,
        "k",
        None,
        8192,
    )
    .await;
    let g = cross_layer();
    let mut region = r.region("auto", g);
    check_pages_round_trip(&r.client, &mut region, None, 1, 2, 5)
        .await
        .expect("round trip");
    drop(region);
    r.stop().await;

    let off = start_with(|c| c.gpu.enabled = kvstrata_server::config::GpuMode::Off).await;
    assert_eq!(off.stats().await.gpu_status, "disabled: gpu.enabled = off");
    off.stop().await;

    if has_gpu {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = region_config(dir.path());
    c.gpu.enabled = kvstrata_server::config::GpuMode::On;
    let e = Daemon::start(c).await.err().expect("refuses to start");
    let msg = e.to_string();
    assert!(msg.contains("gpu.enabled") && !msg.contains('\n'), "{msg}");
}

/// Set in the child process of `a_killed_engine_leaks_no_region`.
const HOLDER_ENV: &str = "KVSTRATA_TEST_REGION_HOLDER_SOCKET";

/// Not a test on its own: the child process of `a_killed_engine_leaks_no_region`
/// registers a region filled with known bytes, says so on stdout and waits to
/// be killed.
#[test]
fn region_holder_child() {
    use std::io::Write;
    let Ok(socket) = std::env::var(HOLDER_ENV) else {
        return;
    };
    let mut region = KvRegion::create_memfd(&socket, "held-region", per_layer()).expect("register");
    let fill = nonzero_bytes(42, region.len() as usize);
    region.as_mut_slice().expect("memfd").copy_from_slice(&fill);
    println!("registered {}", region.id());
    std::io::stdout().flush().expect("flush");
    std::thread::sleep(Duration::from_secs(120));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_engine_leaks_no_region() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let r = start().await;
    let g = per_layer();
    let (ns, block) = ns_for(&r.client, "killed", &g, 2).await;
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "region_holder_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HOLDER_ENV, &r.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the engine process");
    let stdout = child.stdout.take().expect("stdout");
    let id: u64 = tokio::task::block_in_place(|| {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| {
                // The harness prints "test region_holder_child ... " first.
                let at = l.find("registered ")?;
                l[at + "registered ".len()..].trim().parse().ok()
            })
            .expect("the child registered")
    });
    r.wait_regions(1).await;
    // The daemon gathers from the other process's memory.
    let pages = pb::KvPages {
        region_id: id,
        page_ids: vec![4, 9],
    };
    let put = r
        .client
        .put_pages(
            &ns,
            vec![PagesPutItem::new(key("from-child"), pages.clone())],
        )
        .await
        .expect("put");
    assert_eq!(put.stored, 1, "{put:?}");
    let fill = nonzero_bytes(42, g.region_bytes() as usize);
    let mut want = vec![0u8; block];
    kvstrata_kernels::reference::gather(&g, 2, &[4, 9], &fill, &mut want).expect("reference");
    let got = r
        .client
        .batch_get(&ns, &[b"from-child"])
        .await
        .expect("get");
    assert!(
        got[0].found && got[0].payload == want,
        "gathered bytes differ"
    );

    child.kill().expect("kill");
    child.wait().expect("wait");
    r.wait_regions(0).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while memfd_fds("held-region") > 0 {
        assert!(
            Instant::now() < deadline,
            "the daemon still holds the dead engine's memfd"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let put = r
        .client
        .put_pages(&ns, vec![PagesPutItem::new(key("after"), pages)])
        .await
        .expect("put");
    assert_eq!(put.results, vec![pb::PutStatus::BadRegion as i32]);
    r.stop().await;
}
