//! Timing of a KV-region get's handling around its copies: the Rust client
//! against an in-process daemon on its CPU backend (memfd region on the
//! direct path, one-page blocks of a few hundred bytes, so the copies are
//! negligible), one `KvPages` per key answered with a `GetResult` per key,
//! against one page-id array answered compactly, alternated.
//! Ignored: it prints numbers for docs/benchmarks.md and asserts only that
//! every block was found; both request forms' behaviour is tested in
//! regions_direct.rs. Run:
//! `cargo test --release -p kvstrata-server --test page_get_timing -- --ignored --nocapture`
//! (`KVSTRATA_TIMING_KEYS`, default 512).

mod common;
#[path = "common/regions.rs"]
mod regions_support;

use std::time::{Duration, Instant};

use kvstrata_client::PagesPutItem;
use regions_support::*;

/// CPU time of the whole process so far (every thread: client and daemon).
fn cpu_time() -> Duration {
    // SAFETY: getrusage writes the struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut ru), 0);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "prints timings for docs/benchmarks.md; both forms are tested in regions_direct.rs"]
async fn page_get_handling_per_key_lists_against_page_id_arrays() {
    let r = start_with(|c| {
        c.gpu.enabled = kvstrata_server::config::GpuMode::Cpu;
        c.gpu.hbm_bytes = bytesize::ByteSize::mib(32);
    })
    .await;
    let n: usize = std::env::var("KVSTRATA_TIMING_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let mut g = cross_layer();
    g.num_pages = (2 * n) as u32;
    let region = r.region("timing", g);
    let (ns, _) = ns_for(&r.client, "timing", &g, 1).await;
    let keys: Vec<Vec<u8>> = (0..n).map(|i| format!("key-{i:08}").into_bytes()).collect();
    let items = keys
        .iter()
        .enumerate()
        .map(|(i, k)| PagesPutItem::new(k.clone(), region.pages(vec![i as u32])))
        .collect();
    assert_eq!(
        r.client.put_pages(&ns, items).await.expect("put").stored as usize,
        n
    );
    let ids: Vec<u32> = (n as u32..2 * n as u32).collect();
    let lists: Vec<_> = ids.iter().map(|&p| region.pages(vec![p])).collect();
    const REQUESTS: usize = 1000;
    for round in 0..3 {
        for arrays in [false, true] {
            let (mut t, cpu0) = (Vec::with_capacity(REQUESTS), cpu_time());
            for _ in 0..REQUESTS {
                let began = Instant::now();
                let hits = match arrays {
                    true => r
                        .client
                        .get_page_ids(&ns, &keys, region.id(), &ids)
                        .await
                        .map(|f| f.hits()),
                    false => r
                        .client
                        .get_pages(&ns, &keys, &lists)
                        .await
                        .map(|got| got.iter().filter(|x| x.found).count()),
                }
                .expect("get");
                t.push(began.elapsed());
                assert_eq!(hits, n);
            }
            let cpu = (cpu_time() - cpu0) / REQUESTS as u32;
            t.sort();
            println!(
                "round {round} {n} keys, {}: median {:?}, p10 {:?}, CPU per request {cpu:?}",
                if arrays {
                    "page-id array, compact answer"
                } else {
                    "KvPages per key"
                },
                t[REQUESTS / 2],
                t[REQUESTS / 10]
            );
        }
    }
}
