//! Ids that clients hold across requests — shared-memory pool ids (kvstrata's
//! 64-bit ones and SGLang's 31-bit ones) and KV-region ids — are unique to one
//! run of the daemon. A worker that registered before a daemon restart and
//! was not restarted with it keeps sending its old id; once another worker
//! has registered with the new daemon, that old id must be refused per block,
//! never map to the other worker's memory (which stays byte for byte as it
//! was). Each test restarts a real daemon on the same socket paths.

mod common;
#[path = "common/regions.rs"]
mod regions_support;

use std::fs::File;
use std::io::{IoSlice, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::payload;
use kvstrata_client::{Client, KvRegion, PagesPutItem, PutItem, RangePutItem, SharedPool};
use kvstrata_proto::v1 as pb;
use kvstrata_server::{Config, Daemon};
use kvstrata_tiers::NamespaceId;
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use regions_support::{cross_layer, key, memfd_file, ns_for, region_config};

/// SGLang HiCache's preamble magic (its pool ids are int32).
const SGLANG_MAGIC: u64 = 0x8DF6_FBFD;
const BLOCK: usize = 8192;
const POOL_BYTES: usize = 64 * 1024;

fn shm_config(dir: &Path) -> Config {
    let mut c = common::config(dir, 64 << 20, 4096);
    c.shm.mempool_socket = dir.join("mempool.sock").display().to_string();
    c
}

async fn connect(d: &Daemon) -> Client {
    Client::connect(&d.addrs().uds_target().expect("uds"))
        .await
        .expect("connect")
}

/// A pool registered the way an SGLang worker does it (SGLang's magic, a u32
/// id in the answer): the registration connection, the id and the memfd.
fn sglang_pool(mempool: &Path, name: &str, fill: u8) -> (UnixStream, u32, File) {
    tokio::task::block_in_place(|| {
        let file = memfd_file(name, POOL_BYTES as u64);
        file.write_all_at(&vec![fill; POOL_BYTES], 0).expect("fill");
        let mut conn = UnixStream::connect(mempool).expect("connect");
        let mut pre = SGLANG_MAGIC.to_le_bytes().to_vec();
        pre.extend_from_slice(&(name.len() as u32).to_le_bytes());
        pre.extend_from_slice(name.as_bytes());
        let fds = [file.as_raw_fd()];
        let sent = sendmsg::<()>(
            conn.as_raw_fd(),
            &[IoSlice::new(&pre)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        assert_eq!(sent, pre.len());
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut id = [0u8; 4];
        conn.read_exact(&mut id)
            .expect("the daemon answers a pool id");
        let id = u32::from_le_bytes(id);
        assert!(
            (1..=i32::MAX as u32).contains(&id),
            "{id} does not fit SGLang's int32 pool_id"
        );
        (conn, id, file)
    })
}

fn file_bytes(f: &File, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, 0).expect("read memfd");
    v
}

async fn ns(c: &Client, model: &str) -> NamespaceId {
    let r = c
        .register_namespace(&common::small_spec(model))
        .await
        .expect("register");
    assert_eq!(r.block_bytes as usize, BLOCK);
    r.id
}

async fn stored(c: &Client, ns: &NamespaceId, k: &str) -> bool {
    let got = c.batch_get(ns, &[k.as_bytes()]).await.expect("get");
    got[0].found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pool_ids_from_before_a_restart_reach_no_pool_of_the_new_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = shm_config(dir.path());

    // The stale worker registers a kvstrata pool and an SGLang-format pool.
    let first = Daemon::start(config.clone()).await.expect("daemon starts");
    let mempool: PathBuf = first.addrs().mempool.clone().expect("mempool");
    let target = mempool.display().to_string();
    let stale = tokio::task::block_in_place(|| SharedPool::create(&target, "worker", POOL_BYTES))
        .expect("pool registers");
    let stale_range = stale.alloc(BLOCK).expect("alloc").to_proto();
    let (stale_conn, stale_sglang_id, _stale_file) = sglang_pool(&mempool, "sglang-worker", 0);
    first.shutdown().await.expect("clean shutdown");

    // The daemon comes back on the same paths; the stale worker does not
    // register again, another worker does.
    let second = Daemon::start(config).await.expect("daemon restarts");
    assert_eq!(second.addrs().mempool.as_ref(), Some(&mempool));
    let client = connect(&second).await;
    let fresh = tokio::task::block_in_place(|| SharedPool::create(&target, "worker", POOL_BYTES))
        .expect("pool registers");
    let mut whole = fresh.alloc(POOL_BYTES).expect("alloc");
    let pattern: Vec<u8> = (0..POOL_BYTES).map(|i| (i * 7 + 3) as u8).collect();
    whole.as_mut_slice().copy_from_slice(&pattern);
    let (_fresh_conn, fresh_sglang_id, fresh_file) = sglang_pool(&mempool, "sglang-worker", 0x5A);
    let sglang_before = file_bytes(&fresh_file, POOL_BYTES);
    eprintln!(
        "kvstrata pool {} -> {}, sglang pool {stale_sglang_id} -> {fresh_sglang_id}",
        stale.id(),
        fresh.id()
    );

    let ns = ns(&client, "stale-pools").await;
    let block = payload("k", 1, BLOCK);
    client
        .batch_put(&ns, vec![PutItem::new(key("k"), block.clone())])
        .await
        .expect("inline put");
    let stale_sglang_range = pb::PoolRange {
        pool_id: u64::from(stale_sglang_id),
        offset: 0,
        length: BLOCK as u64,
    };

    // A get into the stale ranges: a found block, refused per key.
    let got = client
        .batch_get_into(&ns, &["k", "k"], &[stale_range, stale_sglang_range])
        .await
        .expect("get");
    for (g, id) in got.iter().zip([stale.id(), u64::from(stale_sglang_id)]) {
        assert!(!g.found, "a stale pool id was served: {g:?}");
        assert!(
            g.region_error
                .contains(&format!("pool {id} is not registered"))
                && g.region_error.contains("daemon restart"),
            "{}",
            g.region_error
        );
    }
    // A put from the stale ranges: refused per item, nothing stored.
    let put = client
        .batch_put_ranges(
            &ns,
            vec![
                RangePutItem::new(key("stale-a"), stale_range),
                RangePutItem::new(key("stale-b"), stale_sglang_range),
            ],
        )
        .await
        .expect("put");
    let bad = pb::PutStatus::BadRegion as i32;
    assert_eq!((put.results, put.stored), (vec![bad, bad], 0));
    assert!(!stored(&client, &ns, "stale-a").await && !stored(&client, &ns, "stale-b").await);

    // The other worker's memory is exactly as it was.
    assert!(whole.as_slice() == &pattern[..], "the fresh pool changed");
    assert!(
        file_bytes(&fresh_file, POOL_BYTES) == sglang_before,
        "the fresh SGLang pool changed"
    );
    assert_eq!(second.pools().stats().unknown_ids, 4);

    // The fresh worker's own ids work.
    let got = client
        .batch_get_into(
            &ns,
            &["k"],
            &[pb::PoolRange {
                pool_id: fresh.id(),
                offset: 0,
                length: BLOCK as u64,
            }],
        )
        .await
        .expect("get");
    assert!(got[0].found && got[0].region_error.is_empty(), "{got:?}");
    assert!(whole.as_slice()[..BLOCK] == block[..]);
    drop((stale, stale_conn));
    second.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kv_region_ids_from_before_a_restart_reach_no_region_of_the_new_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = region_config(dir.path());
    let g = cross_layer();
    let ppb = 1;

    let first = Daemon::start(config.clone()).await.expect("daemon starts");
    let socket = first.addrs().kv_region.clone().expect("region socket");
    let target = socket.display().to_string();
    let stale = tokio::task::block_in_place(|| KvRegion::create_memfd(&target, "engine", g))
        .expect("region registers");
    let stale_pages = stale.pages(vec![2]);
    first.shutdown().await.expect("clean shutdown");

    let second = Daemon::start(config).await.expect("daemon restarts");
    assert_eq!(second.addrs().kv_region.as_ref(), Some(&socket));
    let client = connect(&second).await;
    let mut fresh = tokio::task::block_in_place(|| KvRegion::create_memfd(&target, "engine", g))
        .expect("region registers");
    let before: Vec<u8> = (0..fresh.len() as usize)
        .map(|i| (i * 13 + 1) as u8)
        .collect();
    fresh
        .as_mut_slice()
        .expect("memfd")
        .copy_from_slice(&before);
    eprintln!("KV region {} -> {}", stale.id(), fresh.id());

    let (ns, block) = ns_for(&client, "stale-regions", &g, ppb).await;
    client
        .batch_put(&ns, vec![PutItem::new(key("k"), vec![0xC3u8; block])])
        .await
        .expect("inline put");
    let got = client
        .get_pages(&ns, &[&b"k"[..]], std::slice::from_ref(&stale_pages))
        .await
        .expect("get");
    assert!(!got[0].found, "a stale region id was served: {got:?}");
    assert!(
        got[0]
            .region_error
            .contains(&format!("KV region {} is not registered", stale.id()))
            && got[0].region_error.contains("daemon restart"),
        "{}",
        got[0].region_error
    );
    let put = client
        .put_pages(&ns, vec![PagesPutItem::new(key("stale"), stale_pages)])
        .await
        .expect("put");
    assert_eq!(
        (put.results, put.stored),
        (vec![pb::PutStatus::BadRegion as i32], 0)
    );
    let got = client.batch_get(&ns, &[b"stale"]).await.expect("get");
    assert!(!got[0].found, "a put from a stale region stored a block");

    assert!(
        fresh.as_slice().expect("memfd") == &before[..],
        "the fresh region changed"
    );
    assert_eq!(second.regions().stats().unknown_ids, 2);

    // The fresh engine's own id works.
    let got = client
        .get_pages(&ns, &[&b"k"[..]], &[fresh.pages(vec![2])])
        .await
        .expect("get");
    assert!(got[0].found && got[0].region_error.is_empty(), "{got:?}");
    assert!(fresh.as_slice().expect("memfd") != &before[..]);
    drop(stale);
    second.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_id_from_before_a_restart_ends_no_lease_of_the_new_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = common::config(dir.path(), 64 << 20, 4096);

    let first = Daemon::start(config.clone()).await.expect("daemon starts");
    let client = connect(&first).await;
    let ns1 = ns(&client, "stale-leases").await;
    common::put(&client, &ns1, "a", None, BLOCK).await;
    let stale = client
        .pin(&ns1, &["a"], Duration::from_secs(60))
        .await
        .expect("pin");
    drop(client);
    first.shutdown().await.expect("clean shutdown");

    let second = Daemon::start(config).await.expect("daemon restarts");
    let client = connect(&second).await;
    let ns2 = ns(&client, "stale-leases").await;
    common::put(&client, &ns2, "b", None, BLOCK).await;
    let fresh = client
        .pin(&ns2, &["b"], Duration::from_secs(60))
        .await
        .expect("pin");
    eprintln!("lease {} -> {}", stale.lease_id, fresh.lease_id);
    // The stale client's Unpin ends nothing; the other client's pin holds.
    let e = client
        .unpin(stale.lease_id)
        .await
        .expect_err("a stale lease id ended a lease");
    assert!(e.to_string().contains("lease_id"), "{e}");
    assert_eq!(common::host_stats(&client).await.pinned_blocks, 1);
    client.unpin(fresh.lease_id).await.expect("own unpin");
    assert_eq!(common::host_stats(&client).await.pinned_blocks, 0);
    second.shutdown().await.expect("clean shutdown");
}
