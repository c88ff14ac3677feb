//! A KV-region request that the daemon has already given up (answered
//! `DEADLINE_EXCEEDED`) moves no page, even when its cache call still runs
//! afterwards: the real daemon, the real client and a memfd KV region.
//!
//! The late case is made deterministic by holding every thread of the
//! runtime's blocking pool (the daemon runs in this test's runtime): the
//! request's cache call is handed to the pool and waits in tokio's queue,
//! where it cannot be cancelled, until the daemon has answered the client
//! `DEADLINE_EXCEEDED` (its deadline counter moved); then the pool is
//! released and the call runs. Before the daemon checked the request's cutoff
//! right before each gather and scatter, that call scattered the block into
//! the client's pages (a get) or gathered and stored them (a put) after the
//! client had given up and could be reusing them.

mod common;
#[path = "common/regions.rs"]
mod regions_support;

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvstrata_client::{PagesPutItem, PutItem};
use kvstrata_gpucheck::nonzero_bytes;
use kvstrata_proto::v1 as pb;
use regions_support::*;
use tonic::Code;

/// Threads of the test runtime's blocking pool (all held by [`Plug`]).
const BLOCKING_THREADS: usize = 4;
/// The short deadline of the late requests: long enough for the request to
/// reach the blocking pool's queue even on a loaded 2-core machine (the test
/// fails, rather than passing vacuously, if it does not get there in time).
const SHORT: Duration = Duration::from_secs(5);
const DEADLINE_REJECTS: &str = "kvstrata_requests_rejected_total{reason=\"deadline\"}";
const BLOCKING_GAUGE: &str = "kvstrata_blocking_tasks";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .max_blocking_threads(BLOCKING_THREADS)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Holds every thread of the blocking pool until [`Plug::release`].
struct Plug {
    gate: Arc<(Mutex<bool>, Condvar)>,
    held: Vec<tokio::task::JoinHandle<()>>,
}

impl Plug {
    async fn hold() -> Plug {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (started, mut running) = tokio::sync::mpsc::unbounded_channel();
        let held = (0..BLOCKING_THREADS)
            .map(|_| {
                let gate = Arc::clone(&gate);
                let started = started.clone();
                tokio::task::spawn_blocking(move || {
                    let _ = started.send(());
                    let (open, cv) = &*gate;
                    let mut open = open.lock().expect("gate");
                    while !*open {
                        open = cv.wait(open).expect("gate");
                    }
                })
            })
            .collect();
        for _ in 0..BLOCKING_THREADS {
            tokio::time::timeout(Duration::from_secs(30), running.recv())
                .await
                .expect("every blocking thread is held")
                .expect("sender alive");
        }
        Plug { gate, held }
    }

    async fn release(self) {
        let (open, cv) = &*self.gate;
        *open.lock().expect("gate") = true;
        cv.notify_all();
        for h in self.held {
            h.await.expect("released");
        }
    }
}

async fn metric(r: &Running, series: &str) -> f64 {
    common::metric_value(&r.metrics().await, series)
}

/// Waits until the metric `series` reads `want`.
async fn wait_metric(r: &Running, series: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = metric(r, series).await;
        if v == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} stuck at {v}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `call` (a request with the deadline [`SHORT`]) while the blocking
/// pool is held: its cache call is queued, the daemon answers it
/// `DEADLINE_EXCEEDED`, then the pool is released and the queued call runs
/// to its end. Returns the client's error.
async fn late<T: std::fmt::Debug + Send + 'static>(
    r: &Running,
    call: impl Future<Output = Result<T, tonic::Status>> + Send + 'static,
) -> tonic::Status {
    let rejected = metric(r, DEADLINE_REJECTS).await;
    wait_metric(r, BLOCKING_GAUGE, 0.0).await;
    let plug = Plug::hold().await;
    let answer = tokio::spawn(call);
    // The request's cache call is handed to the pool (it holds a slot of
    // server.max_blocking_tasks) and waits for a thread.
    wait_metric(r, BLOCKING_GAUGE, 1.0).await;
    let e = answer
        .await
        .expect("task")
        .expect_err("the client gives up");
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    // The daemon has given the request up: its cutoff has passed.
    wait_metric(r, DEADLINE_REJECTS, rejected + 1.0).await;
    plug.release().await;
    // The queued cache call has run.
    wait_metric(r, BLOCKING_GAUGE, 0.0).await;
    e
}

/// The bytes the daemon gathered from and scattered into region `id`.
async fn region_bytes(r: &Running, id: u64) -> (u64, u64) {
    let s = r.stats().await;
    let info = s
        .kv_regions
        .iter()
        .find(|x| x.region_id == id)
        .expect("region listed");
    (info.bytes_gathered, info.bytes_scattered)
}

#[test]
fn a_get_whose_deadline_passed_before_its_scatter_writes_no_page() {
    runtime().block_on(async {
        let r = start().await;
        let g = per_layer();
        let mut region = r.region("late-get", g);
        let fill = nonzero_bytes(3, region.len() as usize);
        region.as_mut_slice().expect("memfd").copy_from_slice(&fill);
        let (ns, block) = ns_for(&r.client, "late-get", &g, 2).await;
        let payload = nonzero_bytes(4, block);
        r.client
            .batch_put(&ns, vec![PutItem::new(key("k"), payload.clone())])
            .await
            .expect("put");
        let request = pb::BatchGetRequest {
            namespace_id: Bytes::copy_from_slice(ns.as_bytes()),
            keys: vec![key("k")],
            ranges: Vec::new(),
            pages: vec![region.pages(vec![3, 7])],
            ..Default::default()
        };
        let mut raw = r.client.raw();
        let req = request.clone();
        late(&r, async move {
            let mut req = tonic::Request::new(req);
            req.set_timeout(SHORT);
            raw.batch_get(req).await
        })
        .await;
        assert!(
            region.as_slice().expect("memfd") == &fill[..],
            "a request the daemon had given up scattered into the client's pages"
        );
        assert_eq!(region_bytes(&r, region.id()).await, (0, 0));

        // The same request in time scatters the block into exactly its pages.
        let got = r
            .client
            .get_pages(&ns, &[b"k"], &[region.pages(vec![3, 7])])
            .await
            .expect("get in time");
        assert!(got[0].found && got[0].region_error.is_empty(), "{got:?}");
        let mut want = fill.clone();
        kvstrata_kernels::reference::scatter(&g, 2, &[3, 7], &payload, &mut want)
            .expect("reference");
        assert!(region.as_slice().expect("memfd") == &want[..]);
        assert_eq!(region_bytes(&r, region.id()).await, (0, block as u64));
        r.stop().await;
    });
}

#[test]
fn a_put_whose_deadline_passed_before_its_gather_stores_nothing() {
    runtime().block_on(async {
        let r = start().await;
        let g = per_layer();
        let mut region = r.region("late-put", g);
        let fill = nonzero_bytes(5, region.len() as usize);
        region.as_mut_slice().expect("memfd").copy_from_slice(&fill);
        let (ns, block) = ns_for(&r.client, "late-put", &g, 2).await;
        let item: pb::PutItem = PagesPutItem::new(key("p"), region.pages(vec![1, 2])).into();
        let mut raw = r.client.raw();
        let ns_bytes = Bytes::copy_from_slice(ns.as_bytes());
        let items = vec![item.clone()];
        late(&r, async move {
            let mut req = tonic::Request::new(pb::BatchPutRequest {
                namespace_id: ns_bytes,
                items,
                ..Default::default()
            });
            req.set_timeout(SHORT);
            raw.batch_put(req).await
        })
        .await;
        let got = r.client.batch_get(&ns, &[b"p"]).await.expect("get");
        assert!(
            !got[0].found,
            "a request the daemon had given up gathered and stored the client's pages"
        );
        assert_eq!(region_bytes(&r, region.id()).await, (0, 0));

        // The same put in time stores exactly the pages' bytes.
        let put = r
            .client
            .put_pages(
                &ns,
                vec![PagesPutItem::new(key("p"), region.pages(vec![1, 2]))],
            )
            .await
            .expect("put in time");
        assert_eq!(put.stored, 1, "{put:?}");
        let got = r.client.batch_get(&ns, &[b"p"]).await.expect("get");
        let mut want = vec![0u8; block];
        kvstrata_kernels::reference::gather(&g, 2, &[1, 2], &fill, &mut want).expect("reference");
        assert!(got[0].found && got[0].payload == want);
        assert_eq!(region_bytes(&r, region.id()).await, (block as u64, 0));
        r.stop().await;
    });
}
