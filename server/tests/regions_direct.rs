//! The direct path of KV regions against a real daemon: with `gpu.enabled =
//! "cpu"` the cache runs on the CPU backend (an HBM tier in host memory), so
//! memfd regions are on the cache's own device and their blocks are gathered
//! straight into HBM slots and scattered straight from them, the path CUDA IPC
//! regions take on a GPU. Staged regions are regions.rs.

mod common;
#[path = "common/regions.rs"]
mod regions_support;

use bytes::Bytes;
use kvstrata_client::region::{KIND_MEMFD, encode_preamble};
use kvstrata_client::{KvRegion, PagesPutItem};
use kvstrata_gpucheck::{check_pages_round_trip, nonzero_bytes};
use kvstrata_proto::v1 as pb;
use kvstrata_tiers::NamespaceId;
use regions_support::*;
use tonic::Code;

/// A daemon whose cache runs on the CPU backend (`gpu.enabled = "cpu"`, an
/// HBM tier in host memory): memfd regions are then on the cache's own
/// device, so their blocks take the direct path (gathered straight into HBM
/// slots, scattered straight from them) — the path a CUDA IPC region takes
/// on a GPU.
async fn start_direct() -> Running {
    start_with(|c| {
        c.gpu.enabled = kvstrata_server::config::GpuMode::Cpu;
        c.gpu.hbm_bytes = bytesize::ByteSize::mib(1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn direct_path_round_trips_byte_for_byte_in_both_layouts() {
    let r = start_direct().await;
    let s = r.stats().await;
    assert!(
        s.tiers.iter().any(|t| t.tier == pb::Tier::Hbm as i32),
        "an HBM tier on the CPU backend: {s:?}"
    );
    for (i, (g, ppb)) in [
        (per_layer(), 2),
        (cross_layer(), 1),
        (cross_layer(), 3),
        (k_then_v(), 2),
    ]
    .into_iter()
    .enumerate()
    {
        let mut region = r.region(&format!("direct-{i}"), g);
        let report = check_pages_round_trip(&r.client, &mut region, None, ppb, 3, 2000 + i as u64)
            .await
            .unwrap_or_else(|e| panic!("{:?} ppb {ppb}: {e}", g.layout));
        let s = r.stats().await;
        let info = s
            .kv_regions
            .iter()
            .find(|x| x.region_id == region.id())
            .expect("region listed");
        // Two gets into pages: per-key lists, then an array answered when
        // queued.
        assert_eq!(
            (info.bytes_gathered, info.bytes_scattered),
            (
                report.blocks as u64 * report.block_bytes,
                2 * report.blocks as u64 * report.block_bytes
            )
        );
    }
    // The HBM tier's movement, per device.
    let m = r.metrics().await;
    for family in [
        "kvstrata_hbm_demoted_blocks_total{device=\"0\"}",
        "kvstrata_hbm_promoted_blocks_total{device=\"0\"}",
        "kvstrata_hbm_demote_dropped_blocks_total{device=\"0\"}",
        "kvstrata_hbm_draining_blocks{device=\"0\"}",
        "kvstrata_gpu_staging_cached_bytes{device=\"0\"}",
    ] {
        assert!(m.contains(family), "no {family} in\n{m}");
    }
    assert!(
        m.contains("kvstrata_hbm_checksum_failures_total{device=\"0\"} 0"),
        "{m}"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn direct_and_staged_regions_in_one_request_keep_every_convention() {
    let r = start_direct().await;
    let g = per_layer();
    let bb = g.block_bytes(2) as usize;
    let mut a = r.region("first", g);
    let mut b = r.region("second", g);
    let fill_a = nonzero_bytes(31, a.len() as usize);
    let fill_b = nonzero_bytes(32, b.len() as usize);
    a.as_mut_slice().expect("memfd").copy_from_slice(&fill_a);
    b.as_mut_slice().expect("memfd").copy_from_slice(&fill_b);
    let (ns, block) = ns_for(&r.client, "mixed", &g, 2).await;
    assert_eq!(block, bb);
    let inline = nonzero_bytes(33, bb);
    let item =
        |k: &str, pages: pb::KvPages| -> pb::PutItem { PagesPutItem::new(key(k), pages).into() };
    let put = |items: Vec<pb::PutItem>| {
        let mut raw = r.client.raw();
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
    // Region "first" is the first direct-capable region named: its blocks go
    // direct (HBM); "second" is staged (host tier), as is the inline block;
    // an unknown region is refused for its item alone.
    let mut a1 = item("a1", a.pages(vec![5, 5]));
    a1.parent = key("a0");
    let items = vec![
        item("a0", a.pages(vec![12, 0])),
        item("b0", b.pages(vec![1, 2])),
        pb::PutItem {
            key: key("inline"),
            payload: Bytes::from(inline.clone()),
            ..Default::default()
        },
        a1,
        item(
            "gone",
            pb::KvPages {
                region_id: 999,
                page_ids: vec![0, 1],
            },
        ),
    ];
    let resp = put(items).await.expect("put").into_inner();
    let stored = pb::PutStatus::Stored as i32;
    assert_eq!(
        resp.results,
        vec![
            stored,
            stored,
            stored,
            stored,
            pb::PutStatus::BadRegion as i32
        ]
    );
    assert_eq!(resp.stored, 4);
    for (k, tier) in [
        ("a0", pb::Tier::Hbm),
        ("a1", pb::Tier::Hbm),
        ("b0", pb::Tier::Host),
        ("inline", pb::Tier::Host),
    ] {
        let l = r.client.lookup(&ns, &[k]).await.expect("lookup");
        assert_eq!((l.matched, l.tiers), (1, vec![tier as i32]), "{k}");
    }
    let got = r
        .client
        .batch_get(&ns, &[&b"a0"[..], b"a1", b"b0"])
        .await
        .expect("get");
    for (res, (fill, pages)) in
        got.iter()
            .zip([(&fill_a, [12u32, 0]), (&fill_a, [5, 5]), (&fill_b, [1, 2])])
    {
        let mut want = vec![0u8; bb];
        kvstrata_kernels::reference::gather(&g, 2, &pages, fill, &mut want).expect("reference");
        assert!(res.found, "{res:?}");
        assert!(res.payload == want, "block of pages {pages:?} differs");
    }
    let s = r.stats().await;
    let info = |id: u64| {
        s.kv_regions
            .iter()
            .find(|x| x.region_id == id)
            .expect("region listed")
            .clone()
    };
    assert_eq!(info(a.id()).bytes_gathered, 2 * bb as u64);
    assert_eq!(info(b.id()).bytes_gathered, bb as u64);

    // A second request names "second" first: now its blocks go direct.
    let resp = put(vec![
        item("b1", b.pages(vec![7, 8])),
        item("a2", a.pages(vec![3, 4])),
    ])
    .await
    .expect("put")
    .into_inner();
    assert_eq!(resp.results, vec![stored, stored]);
    let l = r.client.lookup(&ns, &["b1"]).await.expect("lookup");
    assert_eq!(l.tiers, vec![pb::Tier::Hbm as i32]);
    let l = r.client.lookup(&ns, &["a2"]).await.expect("lookup");
    assert_eq!(l.tiers, vec![pb::Tier::Host as i32]);

    // Gets: every region reached directly, from HBM and host slots alike;
    // misses and unknown regions leave their pages alone.
    let poison_a = nonzero_bytes(34, a.len() as usize);
    let poison_b = nonzero_bytes(35, b.len() as usize);
    a.as_mut_slice().expect("memfd").copy_from_slice(&poison_a);
    b.as_mut_slice().expect("memfd").copy_from_slice(&poison_b);
    let keys: [&[u8]; 6] = [b"a0", b"inline", b"missing", b"b0", b"a1", b"gone"];
    let pages = [
        b.pages(vec![3, 9]),
        a.pages(vec![8, 1]),
        a.pages(vec![2, 6]),
        a.pages(vec![10, 11]),
        b.pages(vec![0, 0]),
        pb::KvPages {
            region_id: 999,
            page_ids: vec![0, 1],
        },
    ];
    let got = r.client.get_pages(&ns, &keys, &pages).await.expect("get");
    let found: Vec<(bool, i32, bool)> = got
        .iter()
        .map(|x| (x.found, x.tier, x.region_error.is_empty()))
        .collect();
    let (hbm, host) = (pb::Tier::Hbm as i32, pb::Tier::Host as i32);
    assert_eq!(
        found,
        vec![
            (true, hbm, true),
            (true, host, true),
            (false, 0, true),
            (true, host, true),
            (true, hbm, true),
            (false, 0, false),
        ],
        "{got:?}"
    );
    let block_of = |fill: &[u8], pages: [u32; 2]| {
        let mut v = vec![0u8; bb];
        kvstrata_kernels::reference::gather(&g, 2, &pages, fill, &mut v).expect("reference");
        v
    };
    let a0 = block_of(&fill_a, [12, 0]);
    let a1 = block_of(&fill_a, [5, 5]);
    let b0 = block_of(&fill_b, [1, 2]);
    let mut want_a = poison_a.clone();
    let mut want_b = poison_b.clone();
    let scatter = |want: &mut Vec<u8>, pages: [u32; 2], blk: &[u8]| {
        kvstrata_kernels::reference::scatter(&g, 2, &pages, blk, want).expect("reference")
    };
    scatter(&mut want_b, [3, 9], &a0);
    scatter(&mut want_a, [8, 1], &inline);
    scatter(&mut want_a, [10, 11], &b0);
    scatter(&mut want_b, [0, 0], &a1);
    assert!(
        a.as_slice().expect("memfd") == &want_a[..],
        "region \"first\" differs from the reference scatter"
    );
    assert!(
        b.as_slice().expect("memfd") == &want_b[..],
        "region \"second\" differs from the reference scatter"
    );
    // Host-tier blocks a direct get served were promoted into HBM.
    let l = r.client.lookup(&ns, &["inline"]).await.expect("lookup");
    assert_eq!(l.tiers, vec![hbm]);
    let s = r.stats().await;
    let info = |id: u64| {
        s.kv_regions
            .iter()
            .find(|x| x.region_id == id)
            .expect("region listed")
            .clone()
    };
    assert_eq!(info(a.id()).bytes_scattered, 2 * bb as u64);
    assert_eq!(info(b.id()).bytes_scattered, 2 * bb as u64);
    let m = r.metrics().await;
    assert!(
        m.contains(&format!(
            "kvstrata_kv_region_gathered_bytes_total {}",
            5 * bb
        )),
        "{m}"
    );
    drop((a, b));
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn direct_gather_failure_stores_nothing_not_even_staged_or_inline_blocks() {
    let r = start_direct().await;
    let g = per_layer();
    let need = g.region_bytes();
    // A memfd created without MFD_ALLOW_SEALING: the daemon cannot seal it
    // against shrinking, so it checks its size before every copy.
    let file = memfd_file("kvs-shrinks", need);
    let (conn, id) = r.raw(
        &encode_preamble(KIND_MEMFD, 0, need, &[0u8; 64], &g, "shrinks"),
        Some(&file),
    );
    let id = id.expect("registered");
    let mut staged = r.region("staged", g);
    let fill = nonzero_bytes(41, staged.len() as usize);
    staged.as_mut_slice().expect("memfd").copy_from_slice(&fill);
    let (ns, bb) = ns_for(&r.client, "atomic", &g, 2).await;
    file.set_len(0).expect("truncate");
    let direct = pb::KvPages {
        region_id: id,
        page_ids: vec![0, 1],
    };
    let items: Vec<pb::PutItem> = vec![
        PagesPutItem::new(key("d0"), direct).into(),
        PagesPutItem::new(key("s0"), staged.pages(vec![2, 3])).into(),
        pb::PutItem {
            key: key("i0"),
            payload: Bytes::from(nonzero_bytes(42, bb)),
            ..Default::default()
        },
    ];
    let e = r
        .client
        .raw()
        .batch_put(pb::BatchPutRequest {
            namespace_id: Bytes::copy_from_slice(ns.as_bytes()),
            items,
            ..Default::default()
        })
        .await
        .expect_err("the direct gather fails");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().starts_with("items[0].pages.region_id: ") && e.message().contains("truncated"),
        "{}",
        e.message()
    );
    for k in ["d0", "s0", "i0"] {
        let l = r.client.lookup(&ns, &[k]).await.expect("lookup");
        assert_eq!(l.matched, 0, "{k} must not be stored");
    }
    let s = r.stats().await;
    let hbm = s
        .tiers
        .iter()
        .find(|t| t.tier == pb::Tier::Hbm as i32)
        .expect("HBM tier");
    assert_eq!((hbm.blocks, hbm.used_bytes), (0, 0), "reserved slots freed");
    // The staged gather ran first (and was thrown away).
    let info = s
        .kv_regions
        .iter()
        .find(|x| x.region_id == staged.id())
        .expect("region listed");
    assert_eq!(info.bytes_gathered, bb as u64);
    drop(conn);
    r.stop().await;
}

/// Pages of the three blocks [`three_blocks`] stores, in order.
const THREE_FROM: [[u32; 2]; 3] = [[0, 1], [2, 3], [4, 4]];

/// A per-layer memfd region `name` of random bytes (seed `seed`), three
/// blocks `{prefix}0..2` stored by its pages [`THREE_FROM`] (2 pages per
/// block), then the region overwritten with other random bytes (seed
/// `seed + 1`). Returns the region, the namespace, the bytes the blocks
/// were gathered from and the ones the region now holds.
async fn three_blocks(
    r: &Running,
    name: &str,
    prefix: &str,
    seed: u64,
) -> (KvRegion, NamespaceId, Vec<u8>, Vec<u8>) {
    let g = per_layer();
    let mut a = r.region(name, g);
    let fill = nonzero_bytes(seed, a.len() as usize);
    a.as_mut_slice().expect("memfd").copy_from_slice(&fill);
    let (ns, _) = ns_for(&r.client, name, &g, 2).await;
    let items: Vec<PagesPutItem> = THREE_FROM
        .iter()
        .enumerate()
        .map(|(i, p)| PagesPutItem::new(key(&format!("{prefix}{i}")), a.pages(p.to_vec())))
        .collect();
    assert_eq!(r.client.put_pages(&ns, items).await.expect("put").stored, 3);
    let poison = nonzero_bytes(seed + 1, a.len() as usize);
    a.as_mut_slice().expect("memfd").copy_from_slice(&poison);
    (a, ns, fill, poison)
}

/// The block [`three_blocks`] gathered from `pages` of `fill`.
fn block_of(fill: &[u8], pages: [u32; 2]) -> Vec<u8> {
    let g = per_layer();
    let mut v = vec![0u8; g.block_bytes(2) as usize];
    kvstrata_kernels::reference::gather(&g, 2, &pages, fill, &mut v).expect("reference");
    v
}

/// Writes each `(pages, block)` into `want` as the reference scatter does,
/// then checks that the region holds exactly `want` (`what` names the get).
fn expect_scattered(a: &KvRegion, want: &mut [u8], writes: &[([u32; 2], Vec<u8>)], what: &str) {
    let g = per_layer();
    for (pages, blk) in writes {
        kvstrata_kernels::reference::scatter(&g, 2, pages, blk, want).expect("reference");
    }
    assert!(
        a.as_slice().expect("memfd") == want,
        "{what}: the scatter differs from the reference"
    );
}

/// `inline` (a get without pages asking what only gets into pages may) is
/// refused `INVALID_ARGUMENT` naming `field`, as a BatchGet and as a
/// GetStream.
async fn refused_for_inline_gets(r: &Running, inline: pb::BatchGetRequest, field: &str) {
    let e = r
        .client
        .raw()
        .batch_get(inline.clone())
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().starts_with(&format!("{field}: ")), "{e:?}");
    let e = r
        .client
        .raw()
        .get_stream(inline)
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().starts_with(&format!("{field}: ")), "{e:?}");
}

/// A BatchGet's pages as one page-id array (`page_region_id`, `page_ids`):
/// the same scatter as one `KvPages` per key, checked byte for byte; bad
/// arrays are refused naming the field and change no page; a client that
/// has not heard the daemon say it reads arrays sends `KvPages` instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn page_id_arrays_scatter_like_page_lists_and_bad_ones_change_nothing() {
    let r = start_direct().await;
    let (a, ns, fill, poison) = three_blocks(&r, "arrays", "p", 41).await;
    let keys = ["p0", "p1", "p2"];
    let from = THREE_FROM;
    let block_of = |pages: [u32; 2]| block_of(&fill, pages);

    // Refused, naming the field, before any page is written.
    let raw_get = |req: pb::BatchGetRequest| {
        let mut raw = r.client.raw();
        async move { raw.batch_get(req).await }
    };
    let base = pb::BatchGetRequest {
        namespace_id: Bytes::copy_from_slice(ns.as_bytes()),
        keys: keys.iter().map(|k| key(k)).collect(),
        page_region_id: a.id(),
        page_ids: vec![7, 8, 9, 10, 11, 12],
        ..Default::default()
    };
    for (req, field) in [
        (
            pb::BatchGetRequest {
                page_ids: vec![7, 8, 9, 10, 11],
                ..base.clone()
            },
            "page_ids: 5 page ids for 3 keys; give 2 per key",
        ),
        (
            pb::BatchGetRequest {
                page_ids: vec![7, 8, 9, 10, 11, 13],
                ..base.clone()
            },
            "page_ids[5]",
        ),
        (
            pb::BatchGetRequest {
                pages: vec![a.pages(vec![7, 8]); 3],
                ..base.clone()
            },
            "page_ids: give `pages` or `page_region_id` and `page_ids`, not both",
        ),
    ] {
        let e = raw_get(req).await.expect_err("refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().starts_with(field), "{field}: {}", e.message());
    }
    assert!(
        a.as_slice().expect("memfd") == &poison[..],
        "a refused request wrote pages"
    );

    // An unknown region: every key a miss naming it, no page written.
    let got = raw_get(pb::BatchGetRequest {
        page_region_id: 999,
        ..base.clone()
    })
    .await
    .expect("get")
    .into_inner()
    .results;
    assert!(
        got.iter()
            .all(|x| !x.found && x.region_error.contains("999")),
        "{got:?}"
    );
    // The same compactly: no tier, every key failed naming the region.
    let compact = raw_get(pb::BatchGetRequest {
        page_region_id: 999,
        compact_answer: true,
        ..base.clone()
    })
    .await
    .expect("get")
    .into_inner();
    assert!(compact.results.is_empty(), "{compact:?}");
    assert_eq!(compact.tiers, vec![pb::Tier::Unspecified as i32; 3]);
    let failed: Vec<u32> = compact.failed.iter().map(|f| f.index).collect();
    assert_eq!(failed, vec![0, 1, 2]);
    assert!(
        compact.failed.iter().all(|f| f.message.contains("999")),
        "{compact:?}"
    );
    assert!(a.as_slice().expect("memfd") == &poison[..]);

    // A compact answer is for gets into pages only: an inline get or a
    // GetStream asking for one is refused naming the field.
    let inline = pb::BatchGetRequest {
        namespace_id: base.namespace_id.clone(),
        keys: base.keys.clone(),
        compact_answer: true,
        ..Default::default()
    };
    refused_for_inline_gets(&r, inline, "compact_answer").await;

    // The array form: one key missing, the others scattered exactly.
    let mut want = poison.clone();
    let got = r
        .client
        .get_page_ids(&ns, &["p0", "absent", "p2"], a.id(), &[7, 8, 9, 10, 11, 12])
        .await
        .expect("get");
    let found: Vec<bool> = got.tiers.iter().map(Option::is_some).collect();
    assert_eq!(found, vec![true, false, true], "{got:?}");
    assert!(got.failed.is_empty(), "{got:?}");
    expect_scattered(
        &a,
        &mut want,
        &[([7, 8], block_of(from[0])), ([11, 12], block_of(from[2]))],
        "the array form",
    );

    // A client that has not registered the namespace itself does not know
    // the daemon reads arrays: it sends one KvPages per key, same result.
    let other = kvstrata_client::Client::connect(&r.daemon.addrs().uds_target().expect("uds"))
        .await
        .expect("connect");
    let got = other
        .get_page_ids(&ns, &["p1"], a.id(), &[0, 6])
        .await
        .expect("get");
    assert!(got.tiers[0].is_some(), "{got:?}");
    expect_scattered(
        &a,
        &mut want,
        &[([0, 6], block_of(from[1]))],
        "the per-key form",
    );

    // Per-key page lists answered compactly: the same tiers, the same bytes.
    let compact = raw_get(pb::BatchGetRequest {
        namespace_id: base.namespace_id.clone(),
        keys: ["p2", "absent", "p0"].iter().map(|k| key(k)).collect(),
        pages: vec![
            a.pages(vec![1, 2]),
            a.pages(vec![3, 9]),
            a.pages(vec![4, 5]),
        ],
        compact_answer: true,
        ..Default::default()
    })
    .await
    .expect("get")
    .into_inner();
    let hit = |t: i32| t != pb::Tier::Unspecified as i32;
    let found: Vec<bool> = compact.tiers.iter().map(|&t| hit(t)).collect();
    assert_eq!(found, vec![true, false, true], "{compact:?}");
    assert!(
        compact.results.is_empty() && compact.failed.is_empty(),
        "{compact:?}"
    );
    expect_scattered(
        &a,
        &mut want,
        &[([1, 2], block_of(from[2])), ([4, 5], block_of(from[0]))],
        "the compact get",
    );
    let e = other
        .get_page_ids(&ns, &["p1", "p2"], a.id(), &[0, 6, 1])
        .await
        .expect_err("uneven");
    assert!(e.to_string().contains("page_ids"), "{e}");
}

/// The value of an unlabelled counter in the daemon's metrics text.
fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gets_answered_when_queued_write_exact_pages_and_are_refused_elsewhere() {
    let r = start_direct().await;
    let (a, ns, fill, poison) = three_blocks(&r, "queued", "q", 51).await;
    let from = THREE_FROM;
    let block_of = |pages: [u32; 2]| block_of(&fill, pages);
    let metric = "kvstrata_kv_region_answered_before_copies_total";
    let before = counter(&r.metrics().await, metric);

    // Answered once the copies are queued: on the CPU backend they are done
    // by then, so no event to wait on; the pages are exact.
    let got = r
        .client
        .get_page_ids_when_queued(&ns, &["q0", "absent", "q2"], a.id(), &[7, 8, 9, 10, 11, 12])
        .await
        .expect("get");
    let found: Vec<bool> = got.tiers.iter().map(Option::is_some).collect();
    assert_eq!(found, vec![true, false, true], "{got:?}");
    assert!(
        got.failed.is_empty() && got.ready_event.is_none(),
        "{got:?}"
    );
    let mut want = poison.clone();
    expect_scattered(
        &a,
        &mut want,
        &[([7, 8], block_of(from[0])), ([11, 12], block_of(from[2]))],
        "a get answered when queued",
    );
    let metrics = r.metrics().await;
    assert_eq!(counter(&metrics, metric), before + 1, "one early answer");
    assert_eq!(
        counter(&metrics, "kvstrata_kv_region_failed_after_answer_total"),
        0
    );

    // Every key missing: still an exact answer, no page touched.
    let got = r
        .client
        .get_page_ids_when_queued(&ns, &["x", "y"], a.id(), &[0, 1, 2, 3])
        .await
        .expect("get");
    assert_eq!(got.tiers, vec![None, None], "{got:?}");
    assert!(a.as_slice().expect("memfd") == &want[..]);

    // Per-key page lists may ask too; they are answered after their
    // copies (not one direct group of a page-id array), exactly.
    let raw_get = |req: pb::BatchGetRequest| {
        let mut raw = r.client.raw();
        async move { raw.batch_get(req).await }
    };
    let ns_bytes = Bytes::copy_from_slice(ns.as_bytes());
    let answer = raw_get(pb::BatchGetRequest {
        namespace_id: ns_bytes.clone(),
        keys: vec![key("q1")],
        pages: vec![a.pages(vec![5, 6])],
        compact_answer: true,
        answer_when_queued: true,
        ..Default::default()
    })
    .await
    .expect("get")
    .into_inner();
    assert_eq!(answer.tiers.len(), 1, "{answer:?}");
    assert!(answer.pages_ready_event.is_empty(), "{answer:?}");
    expect_scattered(
        &a,
        &mut want,
        &[([5, 6], block_of(from[1]))],
        "a per-key list",
    );
    assert_eq!(
        counter(&r.metrics().await, metric),
        before + 2,
        "the array gets only"
    );

    // Only gets into pages can be answered before their copies: an inline
    // get or a GetStream asking is refused naming the field, nothing moves.
    let inline = pb::BatchGetRequest {
        namespace_id: ns_bytes,
        keys: vec![key("q0")],
        answer_when_queued: true,
        ..Default::default()
    };
    refused_for_inline_gets(&r, inline, "answer_when_queued").await;
    assert!(a.as_slice().expect("memfd") == &want[..]);
}
