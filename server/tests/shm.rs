//! The shared-memory data path against a real daemon: pools registered on the
//! mempool socket by the real client (`SharedPool`), puts and gets through pool
//! ranges checked byte for byte, ranges outside a pool, disk-resident blocks
//! read straight into a pool, a client process killed while holding a pool,
//! concurrent pools, and every malformed registration preamble.

mod common;

use std::io::{BufRead, BufReader, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytesize::ByteSize;
use common::{payload, small_spec};
use kvstrata_client::{Client, RangePutItem, SharedPool};
use kvstrata_proto::v1 as pb;
use kvstrata_server::{Config, Daemon};
use kvstrata_tiers::NamespaceId;
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use tonic::Code;

const BLOCK: usize = 8192;
const MAGIC: u64 = 0x8DF6_FBFD;
/// Set in the child process of `a_killed_client_leaks_no_pool`.
const HOLDER_ENV: &str = "KVSTRATA_TEST_POOL_HOLDER_SOCKET";

struct Running {
    daemon: Daemon,
    client: Client,
    mempool: PathBuf,
    _dir: tempfile::TempDir,
}

fn shm_config(dir: &Path) -> Config {
    let mut c = common::config(dir, 64 << 20, 4096);
    c.shm.mempool_socket = dir.join("mempool.sock").display().to_string();
    c
}

async fn start_config(dir: tempfile::TempDir, config: Config) -> Running {
    let daemon = Daemon::start(config).await.expect("daemon starts");
    let client = Client::connect(&daemon.addrs().uds_target().expect("uds"))
        .await
        .expect("connect");
    let mempool = daemon.addrs().mempool.clone().expect("mempool socket");
    Running {
        daemon,
        client,
        mempool,
        _dir: dir,
    }
}

async fn start() -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = shm_config(dir.path());
    start_config(dir, config).await
}

impl Running {
    /// Registers a pool (a blocking call: the daemon's tasks run on the
    /// other worker meanwhile).
    fn pool(&self, name: &str, bytes: usize) -> SharedPool {
        tokio::task::block_in_place(|| {
            SharedPool::create(self.mempool.to_str().expect("utf-8 path"), name, bytes)
        })
        .expect("pool registers")
    }

    async fn ns(&self, model: &str) -> NamespaceId {
        let r = self
            .client
            .register_namespace(&small_spec(model))
            .await
            .expect("register");
        assert_eq!(r.block_bytes as usize, BLOCK);
        r.id
    }

    async fn stats(&self) -> pb::StatsResponse {
        self.client.stats().await.expect("stats")
    }

    /// Waits until the daemon holds exactly `n` pools.
    async fn wait_pools(&self, n: u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.stats().await;
            if s.pools == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "daemon still holds {} pools, expected {n}",
                s.pools
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) {
        self.daemon.shutdown().await.expect("clean shutdown");
    }
}

/// How many mappings of memfds named `name` this process has.
fn memfd_mappings(name: &str) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
    let needle = format!("/memfd:{name} ");
    maps.lines()
        .filter(|l| l.contains(&needle) || l.ends_with(&format!("/memfd:{name}")))
        .count()
}

/// Fills a range with the block for (key, version) and returns the bytes.
fn fill(range: &mut kvstrata_client::PoolRange, key: &str, version: u32) -> Bytes {
    let p = payload(key, version, range.len());
    range.as_mut_slice().copy_from_slice(&p);
    p
}

fn bad_range(pool_id: u64, offset: u64) -> pb::PoolRange {
    pb::PoolRange {
        pool_id,
        offset,
        length: BLOCK as u64,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_and_gets_through_a_pool_are_exact() {
    let d = start().await;
    let ns = d.ns("shm-exact").await;
    let pool = d.pool("exact", 1 << 20);
    assert!(pool.id() >= 1);
    let s = d.stats().await;
    assert_eq!((s.pools, s.pool_bytes), (1, 1 << 20));

    let keys: Vec<String> = (0..6).map(|i| format!("k{i}")).collect();
    let mut src = Vec::new();
    let mut want = Vec::new();
    for k in &keys {
        let mut r = pool.alloc(BLOCK).expect("alloc");
        want.push(fill(&mut r, k, 1));
        src.push(r);
    }
    let items = keys
        .iter()
        .zip(&src)
        .enumerate()
        .map(|(i, (k, r))| {
            let it = RangePutItem::new(Bytes::from(k.clone()), r.to_proto());
            if i > 0 {
                it.with_parent(Bytes::from(keys[i - 1].clone()))
            } else {
                it
            }
        })
        .collect();
    let put = d.client.batch_put_ranges(&ns, items).await.expect("put");
    assert_eq!(put.stored, keys.len() as u32);
    // The client may reuse its buffers at once: the daemon copied them.
    for r in &mut src {
        r.as_mut_slice().fill(0x55);
    }

    let mut dst: Vec<_> = (0..keys.len() + 1)
        .map(|_| {
            let mut r = pool.alloc(BLOCK).expect("alloc");
            r.as_mut_slice().fill(0xAA);
            r
        })
        .collect();
    let mut ask: Vec<&str> = keys.iter().map(String::as_str).collect();
    ask.push("missing");
    let ranges: Vec<pb::PoolRange> = dst.iter().map(|r| r.to_proto()).collect();
    let got = d
        .client
        .batch_get_into(&ns, &ask, &ranges)
        .await
        .expect("get");
    for (i, g) in got.iter().enumerate().take(keys.len()) {
        assert!(g.found, "{} not found", keys[i]);
        assert!(g.payload.is_empty(), "payload must not travel inline");
        assert_eq!(g.tier, pb::Tier::Host as i32);
        assert_eq!(
            dst[i].as_slice(),
            &want[i][..],
            "wrong bytes for {}",
            keys[i]
        );
    }
    let miss = &got[keys.len()];
    assert!(!miss.found && miss.region_error.is_empty());
    assert!(
        dst[keys.len()].as_mut_slice().iter().all(|&b| b == 0xAA),
        "a miss must leave its range untouched"
    );
    // Inline reads see the same bytes.
    let inline = d.client.batch_get(&ns, &["k3"]).await.expect("inline get");
    assert_eq!(inline[0].payload, want[3]);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_outside_a_pool_are_refused_per_block() {
    let d = start().await;
    let ns = d.ns("shm-bounds").await;
    let pool = d.pool("bounds", 64 * 1024);
    let mut good = pool.alloc(BLOCK).expect("alloc");
    let want = fill(&mut good, "good", 1);
    let len = pool.len() as u64;
    let items = vec![
        RangePutItem::new(Bytes::from_static(b"good"), good.to_proto()),
        // Straddles the end of the pool.
        RangePutItem::new(Bytes::from_static(b"tail"), bad_range(pool.id(), len - 100)),
        // Offset + length overflows u64.
        RangePutItem::new(
            Bytes::from_static(b"wrap"),
            bad_range(pool.id(), u64::MAX - 10),
        ),
        // A pool id nobody registered.
        RangePutItem::new(
            Bytes::from_static(b"nopool"),
            bad_range(pool.id().wrapping_add(100), 0),
        ),
    ];
    let r = d.client.batch_put_ranges(&ns, items).await.expect("put");
    let bad = pb::PutStatus::BadRegion as i32;
    assert_eq!(r.results, vec![pb::PutStatus::Stored as i32, bad, bad, bad]);
    assert_eq!(r.stored, 1);
    let listed = d
        .client
        .list_all_blocks(Some(&ns), None, None)
        .await
        .expect("ls");
    assert_eq!(listed.len(), 1, "only the good block is stored");

    let mut out = pool.alloc(BLOCK).expect("alloc");
    out.as_mut_slice().fill(0xAA);
    let ranges = vec![
        out.to_proto(),
        bad_range(pool.id(), len - 1),
        bad_range(999, 0),
    ];
    let got = d
        .client
        .batch_get_into(&ns, &["good", "good", "good"], &ranges)
        .await
        .expect("get");
    assert!(got[0].found);
    assert_eq!(out.as_slice(), &want[..]);
    for g in &got[1..] {
        assert!(!g.found);
        assert!(!g.region_error.is_empty(), "region_error must say why");
    }
    assert!(
        got[1].region_error.contains("outside"),
        "{}",
        got[1].region_error
    );
    assert!(
        got[2].region_error.contains("999"),
        "{}",
        got[2].region_error
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_range_requests_are_invalid_and_change_nothing() {
    let d = start().await;
    let ns = d.ns("shm-invalid").await;
    let pool = d.pool("invalid", 64 * 1024);
    let r = pool.alloc(BLOCK).expect("alloc");
    let mut raw = d.client.raw();
    let ns_bytes = Bytes::copy_from_slice(ns.as_bytes());

    let wrong_len = pb::PoolRange {
        length: BLOCK as u64 - 1,
        ..r.to_proto()
    };
    let put = |item: pb::PutItem| pb::BatchPutRequest {
        namespace_id: ns_bytes.clone(),
        items: vec![item],
        ..Default::default()
    };
    let e = raw
        .batch_put(put(pb::PutItem {
            key: Bytes::from_static(b"a"),
            parent: Bytes::new(),
            payload: Bytes::new(),
            range: Some(wrong_len),
            pages: None,
        }))
        .await
        .expect_err("wrong length");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("items[0].range.length"),
        "{}",
        e.message()
    );
    let e = raw
        .batch_put(put(pb::PutItem {
            key: Bytes::from_static(b"a"),
            parent: Bytes::new(),
            payload: Bytes::from_static(b"x"),
            range: Some(r.to_proto()),
            pages: None,
        }))
        .await
        .expect_err("payload and range");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("items[0].payload"), "{}", e.message());

    let get = |keys: Vec<Bytes>, ranges: Vec<pb::PoolRange>| pb::BatchGetRequest {
        namespace_id: ns_bytes.clone(),
        keys,
        ranges,
        pages: Vec::new(),
        ..Default::default()
    };
    let e = raw
        .batch_get(get(
            vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")],
            vec![r.to_proto()],
        ))
        .await
        .expect_err("one range for two keys");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("ranges"), "{}", e.message());
    let e = raw
        .batch_get(get(vec![Bytes::from_static(b"a")], vec![wrong_len]))
        .await
        .expect_err("wrong length");
    assert!(e.message().contains("ranges[0].length"), "{}", e.message());
    let e = raw
        .get_stream(get(vec![Bytes::from_static(b"a")], vec![r.to_proto()]))
        .await
        .expect_err("GetStream takes no ranges");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("ranges"), "{}", e.message());

    let s = d.stats().await;
    let host = s
        .tiers
        .iter()
        .find(|t| t.tier == pb::Tier::Host as i32)
        .expect("host");
    assert_eq!(host.blocks, 0, "refused requests store nothing");
    d.stop().await;
}

/// A directory on a real filesystem (O_DIRECT is refused by tmpfs).
fn disk_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kvs-shm-disk-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("tempdir")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_resident_blocks_are_read_into_the_pool() {
    let dir = disk_dir();
    let mut config = shm_config(dir.path());
    config.host.capacity = ByteSize::b(4 * BLOCK as u64);
    config.host.segment_bytes = ByteSize::b(4 * BLOCK as u64);
    config.disk.paths = vec![format!(
        "{}={}",
        dir.path().join("slots.kvs").display(),
        1 << 20
    )];
    config.disk.segment_bytes = ByteSize::kib(64);
    config.disk.promote_on_get = false;
    let d = start_config(dir, config).await;
    let ns = d.ns("shm-disk").await;
    let keys: Vec<String> = (0..8).map(|i| format!("d{i}")).collect();
    let items = keys
        .iter()
        .map(|k| kvstrata_client::PutItem::new(Bytes::from(k.clone()), payload(k, 2, BLOCK)))
        .collect();
    let r = d.client.batch_put(&ns, items).await.expect("put");
    assert_eq!(r.stored, keys.len() as u32);
    // The host tier (4 blocks) evicted d0..d3 to disk while d4..d7 came in;
    // move those four down too. (`Evict` of a disk-resident block would drop
    // it, so name only the host-resident ones.)
    assert!(d.daemon.cache().flush_demotions(Duration::from_secs(10)));
    let e = d.client.evict(&ns, &keys[4..], false).await.expect("evict");
    assert_eq!(e.evicted, 4);
    assert!(d.daemon.cache().flush_demotions(Duration::from_secs(10)));

    let pool = d.pool("disk", 1 << 20);
    let mut dst: Vec<_> = keys
        .iter()
        .map(|_| {
            let mut r = pool.alloc(BLOCK).expect("alloc");
            r.as_mut_slice().fill(0xAA);
            r
        })
        .collect();
    let ranges: Vec<_> = dst.iter().map(|r| r.to_proto()).collect();
    let got = d
        .client
        .batch_get_into(&ns, &keys, &ranges)
        .await
        .expect("get");
    let mut from_disk = 0;
    for (i, g) in got.iter().enumerate() {
        assert!(
            g.found,
            "{} lost: {g:?}; stats {:?}",
            keys[i],
            d.stats().await
        );
        if g.tier == pb::Tier::Disk as i32 {
            from_disk += 1;
        }
        assert_eq!(dst[i].as_mut_slice(), &payload(&keys[i], 2, BLOCK)[..]);
    }
    assert_eq!(from_disk, keys.len(), "every block comes from disk");
    d.stop().await;
}

/// Not a test on its own: the child process of `a_killed_client_leaks_no_pool`
/// registers a pool, says so on stdout and waits to be killed.
#[test]
fn pool_holder_child() {
    let Ok(socket) = std::env::var(HOLDER_ENV) else {
        return;
    };
    let pool = SharedPool::create(&socket, "held-by-child", 1 << 20).expect("register");
    println!("registered {}", pool.id());
    std::io::stdout().flush().expect("flush");
    std::thread::sleep(Duration::from_secs(120));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_client_leaks_no_pool() {
    let d = start().await;
    let ns = d.ns("shm-kill").await;
    let before = memfd_mappings("held-by-child");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "pool_holder_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HOLDER_ENV, &d.mempool)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let id = tokio::task::spawn_blocking(move || {
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("child stdout");
            // libtest prints "test pool_holder_child ... " before it.
            if let Some(at) = line.find("registered ") {
                return line[at + "registered ".len()..]
                    .trim()
                    .parse::<u64>()
                    .expect("pool id");
            }
        }
        panic!("child exited without registering");
    })
    .await
    .expect("reader");
    d.wait_pools(1).await;
    assert_eq!(
        memfd_mappings("held-by-child"),
        before + 1,
        "the daemon maps the child's pool"
    );
    // A put from the child's pool works while it lives (zeros: it never wrote).
    let r = d
        .client
        .batch_put_ranges(
            &ns,
            vec![RangePutItem::new(
                Bytes::from_static(b"z"),
                bad_range(id, 0),
            )],
        )
        .await
        .expect("put");
    assert_eq!(r.results, vec![pb::PutStatus::Stored as i32]);

    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    d.wait_pools(0).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while memfd_mappings("held-by-child") != before {
        assert!(
            Instant::now() < deadline,
            "pool still mapped after its client died"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = d
        .client
        .batch_put_ranges(
            &ns,
            vec![RangePutItem::new(
                Bytes::from_static(b"y"),
                bad_range(id, 0),
            )],
        )
        .await
        .expect("put");
    assert_eq!(r.results, vec![pb::PutStatus::BadRegion as i32]);
    let s = d.stats().await;
    assert_eq!((s.pools, s.pool_bytes, s.active_leases), (0, 0, 0));
    assert!(s.tiers.iter().all(|t| t.pinned_blocks == 0));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pools_stay_apart() {
    let d = start().await;
    let ns = d.ns("shm-concurrent").await;
    let mut tasks = Vec::new();
    for t in 0..4 {
        let pool = d.pool(&format!("conc-{t}"), 256 * 1024);
        let client = d.client.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..20u32 {
                let key = format!("t{t}-r{round}");
                let mut src = pool.alloc(BLOCK).expect("alloc");
                let want = fill(&mut src, &key, round);
                let r = client
                    .batch_put_ranges(
                        &ns,
                        vec![RangePutItem::new(Bytes::from(key.clone()), src.to_proto())],
                    )
                    .await
                    .expect("put");
                assert_eq!(r.stored, 1);
                let mut dst = pool.alloc(BLOCK).expect("alloc");
                dst.as_mut_slice().fill(0xAA);
                let got = client
                    .batch_get_into(&ns, &[key.as_str()], &[dst.to_proto()])
                    .await
                    .expect("get");
                assert!(got[0].found, "{key}");
                assert_eq!(dst.as_slice(), &want[..], "{key}: wrong bytes");
            }
            pool.id()
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.expect("task"));
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4, "each pool has its own id");
    // The pools were dropped with their tasks: all unregistered and unmapped.
    d.wait_pools(0).await;
    for t in 0..4 {
        let name = format!("conc-{t}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while memfd_mappings(&name) != 0 {
            assert!(Instant::now() < deadline, "{name} still mapped");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    d.stop().await;
}

// --- registration preambles -------------------------------------------------

/// A memfd of `bytes` bytes.
fn memfd(bytes: u64) -> OwnedFd {
    let fd = nix::sys::memfd::memfd_create("kvs-preamble", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .expect("memfd");
    nix::unistd::ftruncate(&fd, bytes as i64).expect("ftruncate");
    fd
}

fn preamble(magic: u64, name_len: u32, name: &[u8]) -> Vec<u8> {
    let mut v = magic.to_le_bytes().to_vec();
    v.extend_from_slice(&name_len.to_le_bytes());
    v.extend_from_slice(name);
    v
}

/// Sends `bytes` with `fds` attached in one message.
fn send(sock: &UnixStream, bytes: &[u8], fds: &[i32]) {
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(bytes)],
        cmsgs,
        MsgFlags::empty(),
        None,
    )
    .expect("sendmsg");
}

/// What the daemon answers: `Some(pool id)`, or `None` when it closes the
/// connection without one.
fn answer(sock: &mut UnixStream) -> Option<u32> {
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = [0u8; 4];
    match sock.read_exact(&mut buf) {
        Ok(()) => Some(u32::from_le_bytes(buf)),
        // A close with unread bytes in the daemon's buffer reads as a reset.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            None
        }
        Err(e) => panic!("no answer and no close: {e}"),
    }
}

/// What one malformed-registration case sends.
type SendCase = dyn Fn(&UnixStream) + Send;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_preambles_are_refused_and_the_daemon_keeps_serving() {
    let d = start().await;
    let path = d.mempool.clone();
    let refused_before = d.daemon.pools().stats().refused;
    let cases: Vec<(&str, Box<SendCase>)> = vec![
        (
            "wrong magic",
            Box::new(|s| {
                send(
                    s,
                    &preamble(0xDEAD_BEEF, 1, b"p"),
                    &[memfd(4096).as_raw_fd()],
                )
            }),
        ),
        (
            "no fd",
            Box::new(|s| send(s, &preamble(MAGIC, 1, b"p"), &[])),
        ),
        (
            "two fds",
            Box::new(|s| {
                let (a, b) = (memfd(4096), memfd(4096));
                send(
                    s,
                    &preamble(MAGIC, 1, b"p"),
                    &[a.as_raw_fd(), b.as_raw_fd()],
                )
            }),
        ),
        (
            "name over the limit",
            Box::new(|s| {
                send(
                    s,
                    &preamble(MAGIC, 100_000, &[b'n'; 4096]),
                    &[memfd(4096).as_raw_fd()],
                )
            }),
        ),
        (
            "empty name",
            Box::new(|s| send(s, &preamble(MAGIC, 0, b""), &[memfd(4096).as_raw_fd()])),
        ),
        (
            "truncated preamble",
            Box::new(|s| {
                send(s, &preamble(MAGIC, 10, b"abc"), &[memfd(4096).as_raw_fd()]);
                s.shutdown(std::net::Shutdown::Write).expect("shutdown");
            }),
        ),
        (
            "truncated magic",
            Box::new(|s| {
                send(s, &MAGIC.to_le_bytes()[..5], &[]);
                s.shutdown(std::net::Shutdown::Write).expect("shutdown");
            }),
        ),
        (
            "a pipe",
            Box::new(|s| {
                let (r, _w) = std::io::pipe().expect("pipe");
                send(s, &preamble(MAGIC, 1, b"p"), &[r.as_raw_fd()])
            }),
        ),
        (
            "an empty memfd",
            Box::new(|s| send(s, &preamble(MAGIC, 1, b"p"), &[memfd(0).as_raw_fd()])),
        ),
        (
            "a read-only file",
            Box::new(|s| {
                let f = tempfile::NamedTempFile::new().expect("file");
                f.as_file().set_len(4096).expect("len");
                let ro = std::fs::File::open(f.path()).expect("open read-only");
                send(s, &preamble(MAGIC, 1, b"p"), &[ro.as_raw_fd()])
            }),
        ),
        (
            "a name that is not UTF-8",
            Box::new(|s| {
                send(
                    s,
                    &preamble(MAGIC, 2, &[0xC3, 0x28]),
                    &[memfd(4096).as_raw_fd()],
                )
            }),
        ),
    ];
    let n = cases.len() as u64;
    for (what, case) in cases {
        let path = path.clone();
        let id = tokio::task::spawn_blocking(move || {
            let mut s = UnixStream::connect(&path).expect("connect");
            case(&s);
            answer(&mut s)
        })
        .await
        .expect("case");
        assert_eq!(id, None, "{what}: the daemon must refuse and close");
        assert_eq!(d.stats().await.pools, 0, "{what}: nothing registered");
    }
    assert_eq!(d.daemon.pools().stats().refused - refused_before, n);

    // A correct registration still works, with its own fresh id.
    let good = tokio::task::spawn_blocking(move || {
        let mut s = UnixStream::connect(&path).expect("connect");
        send(&s, &preamble(MAGIC, 4, b"good"), &[memfd(8192).as_raw_fd()]);
        let id = answer(&mut s);
        (s, id)
    })
    .await
    .expect("good");
    assert!(
        good.1.is_some_and(|id| (1..=i32::MAX as u32).contains(&id)),
        "valid registration refused, or an id SGLang's int32 cannot carry: {:?}",
        good.1
    );
    d.wait_pools(1).await;
    let metrics = common::metrics_text(&d.daemon).await;
    for want in [
        format!("kvstrata_pool_registrations_total{{result=\"refused\"}} {n}"),
        "kvstrata_pool_registrations_total{result=\"ok\"} 1".to_string(),
        "kvstrata_pools 1".to_string(),
        "kvstrata_pool_bytes 8192".to_string(),
    ] {
        assert!(metrics.contains(&want), "{want} missing from:\n{metrics}");
    }
    drop(good);
    d.wait_pools(0).await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preamble_that_never_completes_is_dropped_after_its_deadline() {
    let d = start().await;
    let path = d.mempool.clone();
    let t0 = Instant::now();
    let id = tokio::task::spawn_blocking(move || {
        let mut s = UnixStream::connect(&path).expect("connect");
        // Half a magic, then silence with the connection open.
        send(&s, &MAGIC.to_le_bytes()[..4], &[]);
        answer(&mut s)
    })
    .await
    .expect("slow client");
    assert_eq!(id, None);
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(9),
        "closed after {waited:?}, expected the 5 s preamble deadline"
    );
    assert_eq!(d.daemon.pools().stats().refused, 1);
    d.stop().await;
}
