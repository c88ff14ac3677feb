//! The KV-region data path against a real daemon, on the CPU backend with
//! memfd regions (what CI runs; the GPU machine runs the same checks with a
//! CUDA IPC region): registration on the region socket by the real client,
//! puts by page ids and gets into pages checked byte for byte against the
//! kernels' CPU references, bad page lists and bad preambles, closed regions,
//! limits, and start-up with and without a GPU. Regions are staged through
//! pinned memory unless the cache runs on the region's own device; with
//! `gpu.enabled = "cpu"` it does, and the `direct_*` tests run the direct
//! path (gathers into HBM slots, scatters from them) that CUDA IPC regions
//! take on a GPU.

mod common;

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvstrata_client::region::{
    self, KIND_CUDA_IPC, KIND_MEMFD, KvRegionError, check_pages_round_trip, encode_preamble,
    register_raw,
};
use kvstrata_client::{Client, KvRegion, PagesPutItem, PutItem};
use kvstrata_kernels::{PageLayout, PagedGeometry};
use kvstrata_proto::v1 as pb;
use kvstrata_server::{Config, Daemon};
use kvstrata_tiers::{Dtype, NamespaceId, NamespaceSpec};
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_kvstrata");

struct Running {
    daemon: Daemon,
    client: Client,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

fn region_config(dir: &Path) -> Config {
    let mut c = common::config(dir, 64 << 20, 4096);
    c.gpu.region_socket = dir.join("regions.sock").display().to_string();
    c
}

async fn start_with(f: impl FnOnce(&mut Config)) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = region_config(dir.path());
    f(&mut config);
    let daemon = Daemon::start(config).await.expect("daemon starts");
    let client = Client::connect(&daemon.addrs().uds_target().expect("uds"))
        .await
        .expect("connect");
    let socket = daemon.addrs().kv_region.clone().expect("region socket");
    Running {
        daemon,
        client,
        socket,
        _dir: dir,
    }
}

async fn start() -> Running {
    start_with(|_| {}).await
}

impl Running {
    fn socket(&self) -> &str {
        self.socket.to_str().expect("utf-8 path")
    }

    /// Registers a memfd region (a blocking call: the daemon runs on the
    /// other workers meanwhile).
    fn region(&self, name: &str, g: PagedGeometry) -> KvRegion {
        self.try_region(name, g).expect("region registers")
    }

    fn try_region(&self, name: &str, g: PagedGeometry) -> Result<KvRegion, KvRegionError> {
        tokio::task::block_in_place(|| KvRegion::create_memfd(self.socket(), name, g))
    }

    /// Sends a hand-made preamble (with `fd` attached) and returns the answer.
    fn raw(&self, preamble: &[u8], fd: Option<&File>) -> (UnixStream, Result<u32, KvRegionError>) {
        tokio::task::block_in_place(|| {
            let conn = UnixStream::connect(&self.socket).expect("connect");
            let r = register_raw(&conn, preamble, fd, "raw", self.socket());
            (conn, r)
        })
    }

    async fn stats(&self) -> pb::StatsResponse {
        self.client.stats().await.expect("stats")
    }

    async fn wait_regions(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.stats().await;
            if s.kv_regions.len() == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "daemon still holds {} regions, expected {n}",
                s.kv_regions.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn metrics(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.daemon.addrs().metrics.expect("metrics");
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    async fn stop(self) {
        self.daemon.shutdown().await.expect("clean shutdown");
    }
}

/// Per-layer, odd sizes, padded layer stride: blocks of 2 pages of 3 tokens.
fn per_layer() -> PagedGeometry {
    let mut g = PagedGeometry {
        layout: PageLayout::PerLayer,
        layers: 3,
        page_tokens: 3,
        kv_heads: 2,
        head_dim: 5,
        dtype_bytes: 2,
        num_pages: 13,
        layer_stride: 0,
    };
    g.layer_stride = g.num_pages as u64 * g.page_stride() + 37;
    g
}

/// Cross-layer, odd sizes, 1-byte elements: blocks of 1 page of 5 tokens.
fn cross_layer() -> PagedGeometry {
    PagedGeometry {
        layout: PageLayout::CrossLayer,
        layers: 2,
        page_tokens: 5,
        kv_heads: 3,
        head_dim: 7,
        dtype_bytes: 1,
        num_pages: 11,
        layer_stride: 0,
    }
}

/// A namespace whose blocks are `ppb` pages of `g`.
fn spec_for(model: &str, g: &PagedGeometry, ppb: u32) -> NamespaceSpec {
    let dtype = match g.dtype_bytes {
        1 => Dtype::Int8,
        2 => Dtype::F16,
        _ => Dtype::F32,
    };
    NamespaceSpec::layer_major(
        model,
        g.layers,
        g.kv_heads,
        g.head_dim,
        dtype,
        ppb * g.page_tokens,
    )
}

async fn ns_for(c: &Client, model: &str, g: &PagedGeometry, ppb: u32) -> (NamespaceId, usize) {
    let r = c
        .register_namespace(&spec_for(model, g, ppb))
        .await
        .expect("register namespace");
    assert_eq!(r.block_bytes, g.block_bytes(ppb));
    (r.id, r.block_bytes as usize)
}

fn key(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// How many fds of this process point at memfds named `name`.
fn memfd_fds(name: &str) -> usize {
    let needle = format!("/memfd:{name} ");
    std::fs::read_dir("/proc/self/fd")
        .expect("fd dir")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|p| {
            let s = p.display().to_string();
            s.starts_with(&needle) || s == format!("/memfd:{name}")
        })
        .count()
}

fn memfd_file(name: &str, len: u64) -> File {
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC).expect("memfd");
    let f = File::from(fd);
    f.set_len(len).expect("size");
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pages_round_trip_byte_for_byte_in_both_layouts() {
    let r = start().await;
    for (i, (g, ppb)) in [(per_layer(), 2), (cross_layer(), 1), (cross_layer(), 3)]
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
        assert_eq!(
            info.bytes_scattered,
            report.blocks as u64 * report.block_bytes
        );
    }
    let m = r.metrics().await;
    assert!(m.contains("kvstrata_kv_region_gathered_bytes_total"), "{m}");
    assert!(
        m.contains("kvstrata_kv_region_registrations_total 3"),
        "{m}"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn put_by_pages_matches_the_reference_gather_and_get_leaves_other_pages() {
    let r = start().await;
    let g = per_layer();
    let mut region = r.region("direct", g);
    let fill = region::nonzero_bytes(7, region.len() as usize);
    region.as_mut_slice().expect("memfd").copy_from_slice(&fill);
    let (ns, block) = ns_for(&r.client, "direct", &g, 2).await;
    // A page named twice in one block, pages out of order, and an inline item
    // in the same request.
    let inline = region::nonzero_bytes(8, block);
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

    // Gets: a bad page id, a count mismatch, pages with pool regions, GetStream.
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
            regions: Vec::new(),
            pages: vec![region.pages(vec![0, 1])],
        })
        .await
        .expect_err("count");
    assert!(e.message().starts_with("pages:"), "{}", e.message());
    let e = raw2
        .batch_get(pb::BatchGetRequest {
            namespace_id: Bytes::copy_from_slice(ns.as_bytes()),
            keys: vec![key("stored")],
            regions: vec![pb::PoolRegion {
                pool_id: 1,
                offset: 0,
                length: 1,
            }],
            pages: vec![region.pages(vec![0, 1])],
        })
        .await
        .expect_err("both");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = raw2
        .get_stream(pb::BatchGetRequest {
            namespace_id: Bytes::copy_from_slice(ns.as_bytes()),
            keys: vec![key("stored")],
            regions: Vec::new(),
            pages: vec![region.pages(vec![0, 1])],
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
    let refused = |res: Result<u32, KvRegionError>, status: u32, field: &str| match res {
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
    b[8] = 2;
    refused(r.raw(&b, Some(&file)).1, 1, "version");
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
    drop(a);
    r.wait_regions(1).await;
    let c = r.region("limit-c", g);
    assert!(c.id() > b.id());
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
    let r = start_with(|c| c.gpu.enabled = "auto".into()).await;
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

    let off = start_with(|c| c.gpu.enabled = "off".into()).await;
    assert_eq!(off.stats().await.gpu_status, "disabled: gpu.enabled = off");
    off.stop().await;

    if has_gpu {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = region_config(dir.path());
    c.gpu.enabled = "on".into();
    let e = Daemon::start(c).await.err().expect("refuses to start");
    let msg = e.to_string();
    assert!(msg.contains("gpu.enabled") && !msg.contains('\n'), "{msg}");
    // The binary: a one-line error and a failing exit code.
    let out = std::process::Command::new(BIN)
        .args([
            "serve",
            "--gpu",
            "on",
            "--tcp-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "",
        ])
        .arg("--uds-path")
        .arg(dir.path().join("bin.sock"))
        .output()
        .expect("run kvstrata");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let err_lines: Vec<&str> = err.lines().filter(|l| l.contains("gpu.enabled")).collect();
    assert_eq!(err_lines.len(), 1, "{err}");
    // --print-config shows the section.
    let out = std::process::Command::new(BIN)
        .args([
            "serve",
            "--print-config",
            "--kv-region-socket",
            "/tmp/x/r.sock",
        ])
        .output()
        .expect("run kvstrata");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("[gpu]") && text.contains("region_socket = \"/tmp/x/r.sock\""),
        "{text}"
    );
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
    let fill = region::nonzero_bytes(42, region.len() as usize);
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
    let id: u32 = tokio::task::block_in_place(|| {
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
    let fill = region::nonzero_bytes(42, g.region_bytes() as usize);
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

/// A daemon whose cache runs on the CPU backend (`gpu.enabled = "cpu"`, an
/// HBM tier in host memory): memfd regions are then on the cache's own
/// device, so their blocks take the direct path (gathered straight into HBM
/// slots, scattered straight from them) — the path a CUDA IPC region takes
/// on a GPU.
async fn start_direct() -> Running {
    start_with(|c| {
        c.gpu.enabled = "cpu".into();
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
    for (i, (g, ppb)) in [(per_layer(), 2), (cross_layer(), 1), (cross_layer(), 3)]
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
        assert_eq!(
            (info.bytes_gathered, info.bytes_scattered),
            (
                report.blocks as u64 * report.block_bytes,
                report.blocks as u64 * report.block_bytes
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
    let fill_a = region::nonzero_bytes(31, a.len() as usize);
    let fill_b = region::nonzero_bytes(32, b.len() as usize);
    a.as_mut_slice().expect("memfd").copy_from_slice(&fill_a);
    b.as_mut_slice().expect("memfd").copy_from_slice(&fill_b);
    let (ns, block) = ns_for(&r.client, "mixed", &g, 2).await;
    assert_eq!(block, bb);
    let inline = region::nonzero_bytes(33, bb);
    let item =
        |k: &str, pages: pb::KvPages| -> pb::PutItem { PagesPutItem::new(key(k), pages).into() };
    let put = |items: Vec<pb::PutItem>| {
        let mut raw = r.client.raw();
        let ns = Bytes::copy_from_slice(ns.as_bytes());
        async move {
            raw.batch_put(pb::BatchPutRequest {
                namespace_id: ns,
                items,
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
    let info = |id: u32| {
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
    let poison_a = region::nonzero_bytes(34, a.len() as usize);
    let poison_b = region::nonzero_bytes(35, b.len() as usize);
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
    let info = |id: u32| {
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
    let fill = region::nonzero_bytes(41, staged.len() as usize);
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
            payload: Bytes::from(region::nonzero_bytes(42, bb)),
            ..Default::default()
        },
    ];
    let e = r
        .client
        .raw()
        .batch_put(pb::BatchPutRequest {
            namespace_id: Bytes::copy_from_slice(ns.as_bytes()),
            items,
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
