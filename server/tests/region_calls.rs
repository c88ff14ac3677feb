//! Region calls against a real daemon: page puts and gets sent on a memfd
//! region's registration connection (24-byte header, the gRPC request's
//! protobuf bytes), checked byte for byte against the kernels' CPU
//! references; refusals naming the field and storing nothing; answers in
//! order with their sequence numbers; an unreadable header closing the
//! connection (and so the region). Run with the staged path (host tier) and
//! the direct path (`gpu.enabled = "cpu"`).

mod common;
#[path = "common/regions.rs"]
mod regions_support;

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use kvstrata_client::region::{KIND_MEMFD, encode_preamble};
use kvstrata_gpucheck::nonzero_bytes;
use kvstrata_kernels::PagedGeometry;
use kvstrata_proto::v1 as pb;
use kvstrata_types::wire::region_calls::{
    AnswerHeader, CALL_HEADER_BYTES, CallHeader, CallKind, encode_call_header, parse_answer_header,
};
use prost::Message;
use regions_support::*;
use tonic::Code;

/// A registered memfd region driven by hand: its connection and its memory.
struct RawRegion {
    conn: UnixStream,
    file: std::fs::File,
    id: u64,
    g: PagedGeometry,
    seq: u32,
}

impl RawRegion {
    fn register(r: &Running, name: &str, g: PagedGeometry, seed: u64) -> RawRegion {
        let bytes = g.region_bytes();
        let file = memfd_file(name, bytes);
        file.write_all_at(&nonzero_bytes(seed, bytes as usize), 0)
            .expect("fill");
        let pre = encode_preamble(KIND_MEMFD, 0, bytes, &[0u8; 64], &g, name);
        let (conn, id) = r.raw(&pre, Some(&file));
        let id = id.expect("registered");
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        RawRegion {
            conn,
            file,
            id,
            g,
            seq: 0,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.g.region_bytes() as usize];
        self.file.read_exact_at(&mut b, 0).expect("read region");
        b
    }

    /// Sends one call and reads its answer (blocking: off the runtime).
    fn call(&mut self, kind: CallKind, body: &[u8]) -> (AnswerHeader, Vec<u8>) {
        self.seq += 1;
        let header = encode_call_header(&CallHeader {
            kind,
            seq: self.seq,
            timeout_ms: 10_000,
            body_len: body.len() as u32,
        });
        self.send(&[&header[..], body].concat());
        let (h, b) = self.answer();
        assert_eq!(h.seq, self.seq);
        (h, b)
    }

    fn send(&mut self, bytes: &[u8]) {
        tokio::task::block_in_place(|| self.conn.write_all(bytes)).expect("send");
    }

    fn answer(&mut self) -> (AnswerHeader, Vec<u8>) {
        tokio::task::block_in_place(|| {
            let mut h = [0u8; CALL_HEADER_BYTES];
            self.conn.read_exact(&mut h).expect("answer header");
            let h = parse_answer_header(&h).expect("an answer");
            let mut b = vec![0u8; h.body_len as usize];
            self.conn.read_exact(&mut b).expect("answer body");
            (h, b)
        })
    }

    fn put(
        &mut self,
        ns: &[u8],
        blocks: &[(&str, Vec<u32>)],
    ) -> Result<pb::BatchPutResponse, (Code, String)> {
        let req = pb::BatchPutRequest {
            namespace_id: ns.to_vec().into(),
            items: blocks
                .iter()
                .map(|(k, pages)| pb::PutItem {
                    key: key(k),
                    pages: Some(pb::KvPages {
                        region_id: self.id,
                        page_ids: pages.clone(),
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let (h, b) = self.call(CallKind::BatchPut, &req.encode_to_vec());
        assert_eq!(h.kind, Some(CallKind::BatchPut));
        decoded(h, &b)
    }

    fn get(
        &mut self,
        ns: &[u8],
        keys: &[&str],
        page_ids: Vec<u32>,
    ) -> Result<pb::BatchGetResponse, (Code, String)> {
        let req = pb::BatchGetRequest {
            namespace_id: ns.to_vec().into(),
            keys: keys.iter().map(|k| key(k)).collect(),
            page_region_id: self.id,
            page_ids,
            compact_answer: true,
            answer_when_queued: true,
            ..Default::default()
        };
        let (h, b) = self.call(CallKind::BatchGet, &req.encode_to_vec());
        assert_eq!(h.kind, Some(CallKind::BatchGet));
        decoded(h, &b)
    }
}

fn decoded<M: Message + Default>(h: AnswerHeader, body: &[u8]) -> Result<M, (Code, String)> {
    if h.status != 0 {
        return Err((
            Code::from_i32(i32::from(h.status)),
            String::from_utf8_lossy(body).into_owned(),
        ));
    }
    Ok(M::decode(body).expect("a response"))
}

/// The daemon's metrics count both kinds of region call, answered OK.
fn assert_calls_counted(metrics: &str) {
    for method in ["RegionCall.BatchPut", "RegionCall.BatchGet"] {
        assert!(
            metrics.lines().any(|l| l.starts_with("kvstrata_requests")
                && l.contains(&format!("method=\"{method}\""))
                && l.contains("code=\"Ok\"")),
            "{method} not counted: {metrics}"
        );
    }
}

/// A refusal with `code` whose message starts with `field`.
fn refused<M: std::fmt::Debug>(res: Result<M, (Code, String)>, code: Code, field: &str) {
    match res {
        Err((c, m)) => {
            assert_eq!(c, code, "{m}");
            assert!(m.starts_with(field), "{m:?} does not name {field}");
        }
        Ok(ok) => panic!("accepted: {ok:?}"),
    }
}

async fn round_trip(r: Running) {
    let g = per_layer();
    let mut region = RawRegion::register(&r, "calls", g, 11);
    let (nsid, block) = ns_for(&r.client, "calls", &g, 2).await;
    let ns = nsid.as_bytes().to_vec();
    let fill = region.bytes();
    let blocks = [("a", vec![12u32, 0]), ("b", vec![5, 5]), ("c", vec![3, 9])];
    let put = region.put(&ns, &blocks).expect("put by call");
    assert_eq!(put.stored, 3, "{put:?}");
    // What the call stored is the reference gather of those pages.
    let keys: Vec<&[u8]> = blocks.iter().map(|(k, _)| k.as_bytes()).collect();
    let got = r.client.batch_get(&nsid, &keys).await.expect("get");
    for (res, (_, pages)) in got.iter().zip(&blocks) {
        let mut want = vec![0u8; block];
        kvstrata_kernels::reference::gather(&g, 2, pages, &fill, &mut want).expect("reference");
        assert!(
            res.found && res.payload == want,
            "block of pages {pages:?} differs"
        );
    }
    // Get two of them and a miss into other pages: exactly those change.
    let ans = region
        .get(&ns, &["c", "missing", "a"], vec![1, 2, 7, 8, 10, 11])
        .expect("get by call");
    assert_eq!(ans.tiers.len(), 3, "{ans:?}");
    assert!(ans.failed.is_empty(), "{ans:?}");
    assert_ne!(ans.tiers[0], pb::Tier::Unspecified as i32);
    assert_eq!(ans.tiers[1], pb::Tier::Unspecified as i32, "a miss");
    let mut want = fill.clone();
    for (i, (_, pages)) in [(0usize, &blocks[2]), (2, &blocks[0])] {
        let mut b = vec![0u8; block];
        kvstrata_kernels::reference::gather(&g, 2, pages, &fill, &mut b).expect("gather");
        let dst = [[1u32, 2], [7, 8], [10, 11]][i];
        kvstrata_kernels::reference::scatter(&g, 2, &dst, &b, &mut want).expect("scatter");
    }
    assert!(
        region.bytes() == want,
        "region differs from the reference scatters"
    );
    assert_calls_counted(&r.metrics().await);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_move_pages_byte_for_byte_through_the_host_tier() {
    round_trip(start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_move_pages_byte_for_byte_on_the_direct_path() {
    round_trip(start_with(|c| c.gpu.enabled = kvstrata_server::config::GpuMode::Cpu).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_calls_are_refused_naming_the_field_and_a_bad_header_closes_the_region() {
    let r = start().await;
    let g = per_layer();
    let mut region = RawRegion::register(&r, "calls-bad", g, 12);
    let (nsid, _) = ns_for(&r.client, "calls-bad", &g, 2).await;
    let ns = nsid.as_bytes().to_vec();
    // A page id past the region, a block of the wrong page count.
    refused(
        region.put(&ns, &[("x", vec![0, 1]), ("y", vec![2, g.num_pages])]),
        Code::InvalidArgument,
        "items[1].pages.page_ids[1]",
    );
    refused(
        region.put(&ns, &[("x", vec![0])]),
        Code::InvalidArgument,
        "items[0].pages",
    );
    refused(
        region.get(&ns, &["x"], vec![0, g.num_pages]),
        Code::InvalidArgument,
        "page_ids",
    );
    // An inline item; an inline get; a body that is no request.
    let inline = pb::BatchPutRequest {
        namespace_id: ns.clone().into(),
        items: vec![pb::PutItem {
            key: key("x"),
            payload: vec![1u8; 8].into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let (h, b) = region.call(CallKind::BatchPut, &inline.encode_to_vec());
    refused(
        decoded::<pb::BatchPutResponse>(h, &b),
        Code::InvalidArgument,
        "items[0].pages",
    );
    let inline_get = pb::BatchGetRequest {
        namespace_id: ns.clone().into(),
        keys: vec![key("x")],
        ..Default::default()
    };
    let (h, b) = region.call(CallKind::BatchGet, &inline_get.encode_to_vec());
    refused(
        decoded::<pb::BatchGetResponse>(h, &b),
        Code::InvalidArgument,
        "pages",
    );
    let (h, b) = region.call(CallKind::BatchPut, &[0xff, 0xff, 0xff]);
    refused(
        decoded::<pb::BatchPutResponse>(h, &b),
        Code::InvalidArgument,
        "BatchPutRequest",
    );
    let unknown = [7u8; 16];
    refused(
        region.put(&unknown, &[("x", vec![0, 1])]),
        Code::NotFound,
        "namespace_id",
    );
    // Nothing was stored, and the connection still serves calls.
    let got = r.client.batch_get(&nsid, &[b"x", b"y"]).await.expect("get");
    assert!(
        got.iter().all(|g| !g.found),
        "a refused call stored something"
    );
    assert_eq!(
        region.put(&ns, &[("z", vec![4, 6])]).expect("put").stored,
        1
    );
    // Two calls sent back to back are answered in order.
    let mut two = Vec::new();
    for (seq, k) in [(100u32, "p"), (101, "q")] {
        let req = pb::BatchPutRequest {
            namespace_id: ns.clone().into(),
            items: vec![pb::PutItem {
                key: key(k),
                pages: Some(pb::KvPages {
                    region_id: region.id,
                    page_ids: vec![seq - 100, seq - 95],
                }),
                ..Default::default()
            }],
            ..Default::default()
        }
        .encode_to_vec();
        two.extend_from_slice(&encode_call_header(&CallHeader {
            kind: CallKind::BatchPut,
            seq,
            timeout_ms: 0,
            body_len: req.len() as u32,
        }));
        two.extend_from_slice(&req);
    }
    region.send(&two);
    for seq in [100, 101] {
        let (h, b) = region.answer();
        assert_eq!((h.seq, h.status), (seq, 0));
        assert_eq!(
            decoded::<pb::BatchPutResponse>(h, &b).expect("put").stored,
            1
        );
    }
    // A header that is not a call: refused naming the field, then the
    // connection is closed and the region with it.
    let mut bad = encode_call_header(&CallHeader {
        kind: CallKind::BatchGet,
        seq: 7,
        timeout_ms: 0,
        body_len: 0,
    });
    bad[4] = 9;
    region.send(&bad);
    let (h, b) = region.answer();
    assert_eq!(
        (h.kind, h.seq, h.status),
        (None, 7, Code::InvalidArgument as u16)
    );
    assert!(String::from_utf8_lossy(&b).starts_with("call"), "{b:?}");
    let mut rest = Vec::new();
    let n = tokio::task::block_in_place(|| region.conn.read_to_end(&mut rest)).expect("eof");
    assert_eq!(n, 0, "the daemon kept the connection open");
    r.wait_regions(0).await;
    r.stop().await;
}

/// The Rust client's `put_pages_on` / `get_page_ids_on` go as region calls
/// (counted as such by the daemon), byte for byte; a region whose connection
/// another call holds is served over gRPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rust_client_sends_page_requests_of_a_region_as_calls() {
    let r = start_with(|c| c.gpu.enabled = kvstrata_server::config::GpuMode::Cpu).await;
    let g = cross_layer();
    let mut region = r.region("client-calls", g);
    let fill = nonzero_bytes(21, region.len() as usize);
    region.as_mut_slice().expect("memfd").copy_from_slice(&fill);
    let (ns, block) = ns_for(&r.client, "client-calls", &g, 1).await;
    let items = (0..4u32)
        .map(|i| kvstrata_client::PagesPutItem::new(key(&format!("k{i}")), region.pages(vec![i])))
        .collect();
    let put = r
        .client
        .put_pages_on(&region, &ns, items)
        .await
        .expect("put");
    assert_eq!(put.stored, 4, "{put:?}");
    let keys: Vec<String> = (0..5).map(|i| format!("k{i}")).collect();
    let found = r
        .client
        .get_page_ids_on(&region, &ns, &keys, &[5, 6, 7, 8, 9], true)
        .await
        .expect("get");
    assert_eq!(found.tiers.len(), 5);
    assert!(found.failed.is_empty(), "{found:?}");
    assert!(
        found.tiers[..4].iter().all(Option::is_some) && found.tiers[4].is_none(),
        "{found:?}"
    );
    let mut want = fill.clone();
    for i in 0..4usize {
        let mut b = vec![0u8; block];
        kvstrata_kernels::reference::gather(&g, 1, &[i as u32], &fill, &mut b).expect("gather");
        kvstrata_kernels::reference::scatter(&g, 1, &[i as u32 + 5], &b, &mut want)
            .expect("scatter");
    }
    assert!(
        region.as_slice().expect("memfd") == &want[..],
        "pages differ from the reference"
    );
    assert_calls_counted(&r.metrics().await);
    // A refusal comes back as the daemon's status, as over gRPC.
    let err = r
        .client
        .get_page_ids_on(&region, &ns, &keys[..1], &[g.num_pages], false)
        .await
        .expect_err("a page past the region");
    assert!(err.to_string().contains("page_ids"), "{err}");
    r.stop().await;
}

/// A put in the array form (`keys`, `page_region_id`, `page_ids`, parents
/// chained or listed) stores what the same put as items stores, parents
/// included; its bad fields are refused by name and store nothing; an
/// unknown region is each key's own `BAD_REGION`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn array_puts_store_what_item_puts_store() {
    let r = start_with(|c| c.gpu.enabled = kvstrata_server::config::GpuMode::Cpu).await;
    let g = per_layer();
    let mut region = RawRegion::register(&r, "calls-array", g, 31);
    let (nsid, block) = ns_for(&r.client, "calls-array", &g, 2).await;
    let ns = nsid.as_bytes().to_vec();
    let fill = region.bytes();
    let region_id = region.id;
    let array = |keys: &[&str], page_ids: Vec<u32>| pb::BatchPutRequest {
        namespace_id: ns.clone().into(),
        keys: keys.iter().map(|k| key(k)).collect(),
        page_region_id: region_id,
        page_ids,
        ..Default::default()
    };
    let call = |region: &mut RawRegion, req: pb::BatchPutRequest| {
        let (h, b) = region.call(CallKind::BatchPut, &req.encode_to_vec());
        decoded::<pb::BatchPutResponse>(h, &b)
    };
    let chained = pb::BatchPutRequest {
        chain_parents: true,
        first_parent: key("root"),
        ..array(&["d", "e", "f"], vec![1, 2, 3, 4, 5, 6])
    };
    assert_eq!(call(&mut region, chained).expect("chained").stored, 3);
    let listed = pb::BatchPutRequest {
        parents: vec![key("x"), Default::default()],
        ..array(&["g", "h"], vec![7, 8, 9, 10])
    };
    assert_eq!(call(&mut region, listed).expect("listed").stored, 2);
    // Over gRPC too.
    let mut raw = r.client.raw();
    let over_grpc = raw
        .batch_put(array(&["i"], vec![11, 12]))
        .await
        .expect("grpc")
        .into_inner();
    assert_eq!(over_grpc.stored, 1);
    let pages = [[1u32, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12]];
    let names = ["d", "e", "f", "g", "h", "i"];
    let got = r.client.batch_get(&nsid, &names).await.expect("get");
    for (res, p) in got.iter().zip(pages) {
        let mut want = vec![0u8; block];
        kvstrata_kernels::reference::gather(&g, 2, &p, &fill, &mut want).expect("gather");
        assert!(
            res.found && res.payload == want,
            "block of pages {p:?} differs"
        );
    }
    let listed = r
        .client
        .list_blocks(Some(&nsid), None, 100, Default::default())
        .await
        .expect("list");
    let parent = |k: &str| {
        listed
            .blocks
            .iter()
            .find(|b| b.key == k.as_bytes())
            .map(|b| String::from_utf8_lossy(&b.parent).into_owned())
            .expect("listed")
    };
    let parents: Vec<String> = names.iter().map(|k| parent(k)).collect();
    assert_eq!(parents, ["root", "d", "e", "x", "", ""]);
    // Refusals naming the field; nothing stored.
    let bad = [
        (array(&["z"], vec![1]), "page_ids"),
        (array(&["z"], vec![1, g.num_pages]), "page_ids[1]"),
        (
            pb::BatchPutRequest {
                items: vec![pb::PutItem {
                    key: key("y"),
                    ..Default::default()
                }],
                ..array(&["z"], vec![1, 2])
            },
            "items",
        ),
        (
            pb::BatchPutRequest {
                parents: vec![key("p"), key("q")],
                ..array(&["z"], vec![1, 2])
            },
            "parents",
        ),
        (
            pb::BatchPutRequest {
                parents: vec![key("p")],
                chain_parents: true,
                ..array(&["z"], vec![1, 2])
            },
            "parents",
        ),
        (
            pb::BatchPutRequest {
                first_parent: key("p"),
                ..array(&["z"], vec![1, 2])
            },
            "first_parent",
        ),
        (array(&["z", ""], vec![1, 2, 3, 4]), "keys[1]"),
    ];
    for (req, field) in bad {
        refused(call(&mut region, req), Code::InvalidArgument, field);
    }
    let z = r.client.batch_get(&nsid, &[b"z"]).await.expect("get");
    assert!(!z[0].found, "a refused put stored something");
    // An unknown region: each key refused alone.
    let gone = pb::BatchPutRequest {
        page_region_id: 12345,
        ..array(&["z", "w"], vec![1, 2, 3, 4])
    };
    let ans = call(&mut region, gone).expect("answered");
    assert_eq!(ans.stored, 0);
    assert_eq!(ans.results, vec![pb::PutStatus::BadRegion as i32; 2]);
    r.stop().await;
}
