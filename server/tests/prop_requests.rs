//! Property-based fuzzing of what the daemon reads from clients:
//!
//! - `preamble/parse`: the pool-registration preamble parser
//!   ([`kvstrata_server::shm::mempool::parse_preamble`]) on arbitrary bytes and on
//!   mutated valid preambles (seeds in `tests/corpus/preamble/`);
//! - `preamble/socket`: the real mempool socket of a real daemon fed garbage
//!   preambles (random bytes, mutated valid ones, huge name lengths, wrong
//!   magic, no fd or two, sent in pieces and cut short): the daemon answers
//!   a pool id exactly when the parser accepts the bytes and one memfd came
//!   with them, closes the connection otherwise, registers nothing, and keeps
//!   serving;
//! - `grpc/requests`: random `RegisterNamespace`, `Lookup`, `BatchPut` and
//!   `BatchGet` messages (wrong, empty and oversized keys, wrong namespace ids,
//!   payloads of the wrong size, pool ranges that do not exist, batches over
//!   the limit, absurd geometry) sent to a real daemon over gRPC: every answer
//!   is OK or InvalidArgument / NotFound / OutOfRange / ResourceExhausted /
//!   FailedPrecondition with a message that starts with the field it blames,
//!   and a refused request leaves the cache as it was.
//!
//! Case counts: a few seconds per target by default (CI); `PROPTEST_CASES`
//! overrides (docs/fuzzing.md). Each target prints its execution count.

mod common;

use std::io::{IoSlice, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvstrata_proto::v1 as pb;
use kvstrata_server::shm::mempool::{MAGIC, MAGIC_WIDE, PreambleParse, parse_preamble};
use kvstrata_server::shm::pool::MAX_POOL_NAME_BYTES;
use kvstrata_server::{Config, Daemon};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, TestCaseResult, TestRunner};
use tonic::Code;

// --- harness ------------------------------------------------------------------

fn cases(ci_default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ci_default)
}

/// Runs one fuzz target (blocking: call from a plain thread or `spawn_blocking`).
fn fuzz<S: Strategy>(
    target: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> TestCaseResult,
) where
    S::Value: std::fmt::Debug,
{
    let mut config = ProptestConfig::with_cases(cases);
    config.failure_persistence = Some(Box::new(FileFailurePersistence::Direct(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/proptest-regressions/prop_requests.txt"
    ))));
    let executions = AtomicU64::new(0);
    let start = Instant::now();
    let result = TestRunner::new(config).run(&strategy, |v| {
        executions.fetch_add(1, Ordering::Relaxed);
        test(v)
    });
    eprintln!(
        "fuzz target {target}: {} executions in {:.2}s",
        executions.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64()
    );
    if let Err(e) = result {
        panic!("fuzz target {target} failed: {e}");
    }
}

// --- preamble: the pure parser ----------------------------------------------------

fn preamble(magic: u64, name_len: u32, name: &[u8]) -> Vec<u8> {
    let mut v = magic.to_le_bytes().to_vec();
    v.extend_from_slice(&name_len.to_le_bytes());
    v.extend_from_slice(name);
    v
}

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/preamble")
}

fn make_seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("short_name", preamble(MAGIC, 1, b"p")),
        (
            "sglang_name",
            preamble(MAGIC, 22, b"sglang-hicache-pool-00"),
        ),
        (
            "max_name",
            preamble(
                MAGIC,
                MAX_POOL_NAME_BYTES as u32,
                &[b'n'; MAX_POOL_NAME_BYTES],
            ),
        ),
        ("utf8_name", preamble(MAGIC, 6, "pööl".as_bytes())),
    ]
}

/// The committed valid preambles (`KVSTRATA_WRITE_CORPUS=1` rewrites them).
fn seeds() -> Vec<Vec<u8>> {
    let dir = corpus_dir();
    if std::env::var_os("KVSTRATA_WRITE_CORPUS").is_some() {
        std::fs::create_dir_all(&dir).expect("corpus dir");
        for (name, bytes) in make_seeds() {
            std::fs::write(dir.join(format!("{name}.bin")), bytes).expect("write seed");
        }
    }
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files
        .iter()
        .map(|p| std::fs::read(p).expect("read seed"))
        .collect();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize),
    Truncate(usize),
    Extend(Vec<u8>),
    Set(usize, u8),
    /// The name length field lies.
    NameLength(u32),
    Swap(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => any::<usize>().prop_map(Mutation::Flip),
        2 => any::<usize>().prop_map(Mutation::Truncate),
        1 => vec(any::<u8>(), 1..16).prop_map(Mutation::Extend),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        3 => prop_oneof![
            Just(0u32),
            Just(MAX_POOL_NAME_BYTES as u32),
            Just(MAX_POOL_NAME_BYTES as u32 + 1),
            Just(u32::MAX),
            0u32..300,
            any::<u32>(),
        ]
        .prop_map(Mutation::NameLength),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
    ]
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len();
    match m {
        Mutation::Flip(i) if len > 0 => bytes[(i / 8) % len] ^= 1 << (i % 8),
        Mutation::Truncate(n) if len > 0 => bytes.truncate(n % len),
        Mutation::Extend(more) => bytes.extend_from_slice(more),
        Mutation::Set(i, b) if len > 0 => bytes[i % len] = *b,
        Mutation::NameLength(v) if len >= 12 => bytes[8..12].copy_from_slice(&v.to_le_bytes()),
        // Magic and name length in the wrong order, or two name bytes swapped.
        Mutation::Swap(a, b) if len >= 12 => {
            if a % 2 == 0 {
                bytes[..12].rotate_left(8);
            } else {
                bytes.swap(a % len, b % len);
            }
        }
        _ => {}
    }
}

/// Random bytes, valid preambles, mutated valid preambles, mutated seeds.
fn preamble_bytes(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let valid = ("[a-z0-9-]{1,40}", Just(()))
        .prop_map(|(name, ())| preamble(MAGIC, name.len() as u32, name.as_bytes()));
    let mutated = |base: BoxedStrategy<Vec<u8>>| {
        (base, vec(mutation(), 1..4)).prop_map(|(mut b, ms)| {
            ms.iter().for_each(|m| mutate(&mut b, m));
            b
        })
    };
    prop_oneof![
        2 => vec(any::<u8>(), 0..64),
        2 => (vec(any::<u8>(), 0..300), any::<u32>()).prop_map(|(mut b, len)| {
            // Magic right, the rest random: exercises the length checks.
            let mut v = MAGIC.to_le_bytes().to_vec();
            v.extend_from_slice(&(len % 400).to_le_bytes());
            v.append(&mut b);
            v
        }),
        1 => valid.clone(),
        3 => mutated(valid.boxed()),
        3 => mutated(proptest::sample::select(seeds).boxed()),
    ]
}

/// Checks one parse against an independent reading of the format.
fn check_parse(bytes: &[u8]) -> TestCaseResult {
    let r = parse_preamble(bytes);
    if bytes.len() < 12 {
        prop_assert!(matches!(r, Ok(PreambleParse::Need(12))), "{:?}", r);
        return Ok(());
    }
    let magic = u64::from_le_bytes(bytes[..8].try_into().unwrap_or_default());
    let len = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default()) as usize;
    // SGLang's magic and kvstrata's wide one (a mutation can make either).
    let known = magic == MAGIC || magic == MAGIC_WIDE;
    match r {
        Err(e) if e.field == "magic" => prop_assert!(
            !known && e.reason.starts_with(&format!("{magic:#018x} ")),
            "{}",
            e
        ),
        Err(e) if e.field == "name_length" => {
            prop_assert!(
                known && e.reason.starts_with(&format!("{len} bytes ")),
                "{}",
                e
            );
            prop_assert!(len == 0 || len > MAX_POOL_NAME_BYTES);
        }
        Err(e) if e.field == "name" => {
            prop_assert!(std::str::from_utf8(&bytes[12..12 + len]).is_err());
        }
        Err(e) => prop_assert!(false, "a pure parse cannot fail with {}", e),
        Ok(PreambleParse::Need(n)) => {
            prop_assert!(known && (1..=MAX_POOL_NAME_BYTES).contains(&len));
            prop_assert!(
                n == 12 + len && n > bytes.len(),
                "need {} of {} bytes",
                n,
                bytes.len()
            );
        }
        Ok(PreambleParse::Complete(p)) => {
            prop_assert!(known && (1..=MAX_POOL_NAME_BYTES).contains(&len));
            prop_assert_eq!(p.name.as_bytes(), &bytes[12..12 + len]);
        }
    }
    Ok(())
}

#[test]
fn prop_preamble_parser() {
    let seeds = seeds();
    let mut want: Vec<Vec<u8>> = make_seeds().into_iter().map(|(_, b)| b).collect();
    want.sort();
    let mut got = seeds.clone();
    got.sort();
    assert_eq!(
        got, want,
        "committed preamble corpus differs from make_seeds"
    );
    for s in &seeds {
        assert!(matches!(parse_preamble(s), Ok(PreambleParse::Complete(_))));
    }
    fuzz(
        "preamble/parse",
        cases(20000),
        preamble_bytes(seeds),
        |bytes| {
            check_parse(&bytes)?;
            // Read the way the socket reads: every prefix says "need more" with a
            // consistent total, or fails exactly as the whole does.
            let whole = parse_preamble(&bytes).map_err(|e| e.to_string());
            for cut in [
                0,
                5,
                11,
                12,
                13,
                bytes.len() / 2,
                bytes.len().saturating_sub(1),
            ] {
                if cut >= bytes.len() {
                    continue;
                }
                check_parse(&bytes[..cut])?;
                match parse_preamble(&bytes[..cut]) {
                    Ok(PreambleParse::Need(_)) => {}
                    other => {
                        let other = other.map_err(|e| e.to_string());
                        prop_assert_eq!(other, whole.clone(), "prefix of {} bytes", cut);
                    }
                }
            }
            Ok(())
        },
    );
}

// --- preamble: the real socket ------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Fds {
    None,
    OneMemfd,
    EmptyMemfd,
    TwoMemfds,
}

fn memfd(bytes: u64) -> OwnedFd {
    let fd =
        nix::sys::memfd::memfd_create("kvs-prop-preamble", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .expect("memfd");
    nix::unistd::ftruncate(&fd, bytes as i64).expect("ftruncate");
    fd
}

/// Sends `bytes` in pieces (cut at `cuts`), `fds` with the first piece, then
/// closes the write side. Errors (the daemon may have hung up already) are
/// ignored.
fn send_pieces(sock: &UnixStream, bytes: &[u8], cuts: &[usize], fds: &[i32]) {
    let mut points: Vec<usize> = cuts
        .iter()
        .filter(|_| bytes.len() > 1)
        .map(|c| 1 + c % (bytes.len() - 1))
        .collect();
    points.push(bytes.len());
    points.sort_unstable();
    points.dedup();
    let mut at = 0;
    for end in points {
        if end == 0 {
            break;
        }
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if at == 0 && !fds.is_empty() {
            &cmsg
        } else {
            &[]
        };
        let sent = sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(&bytes[at..end])],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        );
        if sent.is_err() {
            break;
        }
        at = end;
        if at < bytes.len() {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let _ = sock.shutdown(std::net::Shutdown::Write);
}

/// `Some(pool id)` if the daemon answered one, `None` if it closed.
fn answer(sock: &mut UnixStream) -> Option<u32> {
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = [0u8; 4];
    match sock.read_exact(&mut buf) {
        Ok(()) => Some(u32::from_le_bytes(buf)),
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

async fn wait_pools(d: &Daemon, want: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.pools().stats().pools != want {
        assert!(Instant::now() < deadline, "pools never reached {want}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prop_mempool_socket_refuses_garbage_and_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config: Config = common::config(dir.path(), 64 << 20, 4096);
    config.shm.mempool_socket = dir.path().join("mempool.sock").display().to_string();
    let daemon = Daemon::start(config).await.expect("daemon starts");
    let path = daemon.addrs().mempool.clone().expect("mempool socket");
    let pools = std::sync::Arc::clone(daemon.pools());

    let p = path.clone();
    let registered = tokio::task::spawn_blocking(move || {
        let strategy = (
            preamble_bytes(seeds()),
            prop_oneof![
                Just(Fds::None),
                Just(Fds::OneMemfd),
                Just(Fds::OneMemfd),
                Just(Fds::EmptyMemfd),
                Just(Fds::TwoMemfds),
            ],
            vec(any::<usize>(), 0..3),
        );
        let registered = AtomicU64::new(0);
        fuzz(
            "preamble/socket",
            cases(500).min(5000),
            strategy,
            |(bytes, fds, cuts)| {
                let held: Vec<OwnedFd> = match fds {
                    Fds::None => vec![],
                    Fds::OneMemfd => vec![memfd(4096)],
                    Fds::EmptyMemfd => vec![memfd(0)],
                    Fds::TwoMemfds => vec![memfd(4096), memfd(4096)],
                };
                let raw: Vec<i32> = if bytes.is_empty() {
                    vec![]
                } else {
                    held.iter().map(|f| f.as_raw_fd()).collect()
                };
                let accepted = matches!(parse_preamble(&bytes), Ok(PreambleParse::Complete(_)))
                    && matches!(fds, Fds::OneMemfd)
                    && !raw.is_empty();
                let mut s = UnixStream::connect(&p).expect("connect");
                send_pieces(&s, &bytes, &cuts, &raw);
                let id = answer(&mut s);
                drop(s);
                if accepted {
                    prop_assert!(
                        id.is_some_and(|id| id >= 1),
                        "valid registration refused: {:?}",
                        bytes
                    );
                    registered.fetch_add(1, Ordering::Relaxed);
                    wait_pools_of(&pools, 0);
                } else {
                    prop_assert_eq!(id, None, "garbage registered");
                    prop_assert_eq!(pools.stats().pools, 0);
                }
                Ok(())
            },
        );
        registered.load(Ordering::Relaxed)
    })
    .await
    .expect("fuzz thread");
    eprintln!("preamble/socket: {registered} valid registrations among the cases");

    // Still serving: a correct registration works and gRPC answers.
    let p = path.clone();
    let (sock, id) = tokio::task::spawn_blocking(move || {
        let mut s = UnixStream::connect(&p).expect("connect");
        let fd = memfd(8192);
        send_pieces_open(&s, &preamble(MAGIC, 4, b"good"), fd.as_raw_fd());
        let id = answer(&mut s);
        (s, id)
    })
    .await
    .expect("good");
    assert!(
        id.is_some_and(|id| id >= 1),
        "valid registration refused after fuzzing"
    );
    wait_pools(&daemon, 1).await;
    let client = kvstrata_client::Client::connect(&daemon.addrs().uds_target().expect("uds"))
        .await
        .expect("connect");
    assert_eq!(client.stats().await.expect("stats").pools, 1);
    drop(sock);
    wait_pools(&daemon, 0).await;
    assert_eq!(client.stats().await.expect("stats").pools, 0);
    daemon.shutdown().await.expect("clean shutdown");
}

fn wait_pools_of(pools: &kvstrata_server::shm::pool::PoolRegistry, want: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pools.stats().pools != want {
        assert!(Instant::now() < deadline, "pools never reached {want}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One message with the fd, connection left open.
fn send_pieces_open(sock: &UnixStream, bytes: &[u8], fd: i32) {
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(bytes)],
        &cmsg,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .expect("sendmsg");
}

// --- gRPC requests -------------------------------------------------------------------

const MAX_BATCH: usize = 16;

#[derive(Debug, Clone)]
enum Ns {
    Registered,
    Unknown([u8; 16]),
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone)]
enum Key {
    Known(u8),
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone)]
enum Payload {
    Exact,
    Len(usize),
}

#[derive(Debug, Clone)]
struct Item {
    key: Key,
    parent: Option<Key>,
    payload: Payload,
    range: Option<(u32, u64, u64)>,
}

#[derive(Debug, Clone)]
enum Req {
    Register(Option<pb::NamespaceSpec>),
    Lookup(Ns, Vec<Key>),
    Put(Ns, Vec<Item>),
    Get(Ns, Vec<Key>, Vec<(u32, u64, u64)>),
}

fn arb_ns() -> impl Strategy<Value = Ns> {
    prop_oneof![
        3 => Just(Ns::Registered),
        1 => any::<[u8; 16]>().prop_map(Ns::Unknown),
        1 => vec(any::<u8>(), 0..40).prop_map(Ns::Bytes),
    ]
}

fn arb_key() -> impl Strategy<Value = Key> {
    prop_oneof![
        4 => (0u8..8).prop_map(Key::Known),
        1 => Just(Key::Bytes(vec![])),
        2 => vec(any::<u8>(), 1..=64).prop_map(Key::Bytes),
        1 => vec(any::<u8>(), 65..200).prop_map(Key::Bytes),
    ]
}

fn arb_range() -> impl Strategy<Value = (u32, u64, u64)> {
    (
        prop_oneof![Just(0u32), Just(1), any::<u32>()],
        prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>()],
        prop_oneof![Just(BLOCK as u64), Just(0u64), Just(u64::MAX), any::<u64>()],
    )
}

fn batch<T: std::fmt::Debug + 'static>(s: BoxedStrategy<T>) -> impl Strategy<Value = Vec<T>> {
    prop_oneof![5 => vec(s.clone(), 0..=4), 1 => vec(s, MAX_BATCH - 1..MAX_BATCH + 4)]
}

fn arb_spec() -> impl Strategy<Value = Option<pb::NamespaceSpec>> {
    let n = prop_oneof![Just(0u32), 1u32..64, Just(u32::MAX), any::<u32>()];
    let spec = (
        prop_oneof![".{0,24}", "m{250,300}"],
        vec(any::<u8>(), 0..80),
        (n.clone(), n.clone(), n.clone(), n),
        (-1i32..8, -1i32..4),
        (0u32..4, 0u32..4),
        prop_oneof![Just(0u64), 1u64..100_000, any::<u64>()],
    )
        .prop_map(
            |(model_id, fp, (l, h, d, t), (dtype, layout), (tp_rank, tp_size), opaque)| {
                pb::NamespaceSpec {
                    model_id,
                    model_fingerprint: Bytes::from(fp),
                    num_layers: l,
                    num_kv_heads: h,
                    head_dim: d,
                    dtype,
                    block_tokens: t,
                    layout,
                    tp_rank,
                    tp_size,
                    opaque_block_bytes: opaque,
                }
            },
        );
    prop_oneof![1 => Just(None), 8 => spec.prop_map(Some)]
}

fn arb_req() -> impl Strategy<Value = Req> {
    let item = (
        arb_key(),
        proptest::option::of(arb_key()),
        prop_oneof![
            4 => Just(Payload::Exact),
            1 => prop_oneof![Just(0usize), Just(BLOCK - 1), Just(BLOCK + 1), 0usize..20_000].prop_map(Payload::Len),
        ],
        proptest::option::weighted(0.2, arb_range()),
    )
        .prop_map(|(key, parent, payload, range)| Item {
            key,
            parent,
            payload,
            range,
        });
    prop_oneof![
        1 => arb_spec().prop_map(Req::Register),
        2 => (arb_ns(), batch(arb_key().boxed())).prop_map(|(ns, k)| Req::Lookup(ns, k)),
        3 => (arb_ns(), batch(item.boxed())).prop_map(|(ns, items)| Req::Put(ns, items)),
        2 => (arb_ns(), batch(arb_key().boxed()), prop_oneof![3 => Just(vec![]), 1 => vec(arb_range(), 0..5)])
            .prop_map(|(ns, k, r)| Req::Get(ns, k, r)),
    ]
}

const BLOCK: usize = 8192;

fn key_bytes(k: &Key) -> Bytes {
    match k {
        Key::Known(i) => Bytes::from(format!("known-{i}")),
        Key::Bytes(b) => Bytes::from(b.clone()),
    }
}

fn ns_bytes(ns: &Ns, registered: &[u8; 16]) -> Bytes {
    match ns {
        Ns::Registered => Bytes::copy_from_slice(registered),
        Ns::Unknown(b) => Bytes::copy_from_slice(b),
        Ns::Bytes(b) => Bytes::from(b.clone()),
    }
}

fn range(r: &(u32, u64, u64)) -> pb::PoolRange {
    pb::PoolRange {
        pool_id: r.0.into(),
        offset: r.1,
        length: r.2,
    }
}

/// The message starts with the field it blames: `field: reason`, the field
/// being a path like `items[3].key`, `spec.dtype` or `namespace_id`.
fn names_a_field(message: &str) -> bool {
    message.split_once(": ").is_some_and(|(field, _)| {
        !field.is_empty()
            && field
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.[]".contains(c))
    })
}

/// What must not change when a request is refused.
#[derive(Debug, PartialEq, Eq)]
struct CacheState {
    namespaces: u32,
    blocks: u64,
    used_bytes: u64,
    bytes_in: u64,
}

async fn state(c: &kvstrata_client::Client) -> CacheState {
    let s = c.stats().await.expect("stats");
    let host = s
        .tiers
        .iter()
        .find(|t| t.tier == pb::Tier::Host as i32)
        .expect("host tier");
    CacheState {
        namespaces: s.namespaces,
        blocks: s.tiers.iter().map(|t| t.blocks).sum(),
        used_bytes: s.tiers.iter().map(|t| t.used_bytes).sum(),
        bytes_in: host.bytes_in,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prop_grpc_requests_are_answered_with_field_errors_and_change_nothing_when_refused() {
    let d = common::start_with(256 * BLOCK as u64, MAX_BATCH).await;
    let (ns, block) = common::register(&d.tcp, "prop-requests").await;
    assert_eq!(block, BLOCK);
    for i in 0..4u8 {
        common::put(&d.tcp, &ns, &format!("known-{i}"), None, BLOCK).await;
    }
    let client = d.tcp.clone();
    let registered = *ns.as_bytes();
    let handle = tokio::runtime::Handle::current();
    let tally = tokio::task::spawn_blocking(move || {
        let counts = parking_lot_free::Tally::default();
        fuzz("grpc/requests", cases(1000).min(20000), arb_req(), |req| {
            handle.block_on(async {
                let before = state(&client).await;
                let mut raw = client.raw();
                let r: Result<(), tonic::Status> = match &req {
                    Req::Register(spec) => raw
                        .register_namespace(pb::RegisterNamespaceRequest {
                            spec: spec.clone(),
                            policy: None,
                        })
                        .await
                        .map(|_| ()),
                    Req::Lookup(n, keys) => raw
                        .lookup(pb::LookupRequest {
                            namespace_id: ns_bytes(n, &registered),
                            keys: keys.iter().map(key_bytes).collect(),
                        })
                        .await
                        .map(|_| ()),
                    Req::Put(n, items) => raw
                        .batch_put(pb::BatchPutRequest {
                            namespace_id: ns_bytes(n, &registered),
                            items: items
                                .iter()
                                .map(|it| pb::PutItem {
                                    key: key_bytes(&it.key),
                                    parent: it.parent.as_ref().map(key_bytes).unwrap_or_default(),
                                    payload: match it.payload {
                                        Payload::Exact => common::payload("prop", 0, BLOCK),
                                        Payload::Len(n) => common::payload("prop", 1, n),
                                    },
                                    range: it.range.as_ref().map(range),
                                    pages: None,
                                })
                                .collect(),
                            ..Default::default()
                        })
                        .await
                        .map(|r| {
                            let r = r.into_inner();
                            assert_eq!(r.results.len(), items.len(), "one result per item");
                        }),
                    Req::Get(n, keys, ranges) => raw
                        .batch_get(pb::BatchGetRequest {
                            namespace_id: ns_bytes(n, &registered),
                            keys: keys.iter().map(key_bytes).collect(),
                            ranges: ranges.iter().map(range).collect(),
                            pages: Vec::new(),
                            ..Default::default()
                        })
                        .await
                        .map(|r| {
                            let r = r.into_inner();
                            assert_eq!(r.results.len(), keys.len(), "one result per key");
                            for g in r.results.iter().filter(|g| g.found && ranges.is_empty()) {
                                assert_eq!(g.payload.len(), BLOCK, "a hit of the wrong size");
                            }
                        }),
                };
                match r {
                    Ok(()) => counts.ok(),
                    Err(s) => {
                        counts.refused(s.code());
                        prop_assert!(
                            matches!(
                                s.code(),
                                Code::InvalidArgument
                                    | Code::NotFound
                                    | Code::OutOfRange
                                    | Code::ResourceExhausted
                                    | Code::FailedPrecondition
                            ),
                            "{:?} answered {:?}: {}",
                            req,
                            s.code(),
                            s.message()
                        );
                        prop_assert!(
                            names_a_field(s.message()),
                            "message names no field: {:?}",
                            s.message()
                        );
                        let after = state(&client).await;
                        prop_assert_eq!(&after, &before, "a refused request changed the cache");
                    }
                }
                Ok(())
            })
        });
        counts.summary()
    })
    .await
    .expect("fuzz thread");
    eprintln!("grpc/requests: {tally}");

    // Still serving, bytes intact.
    for i in 0..4u8 {
        let key = format!("known-{i}");
        let r = d.tcp.batch_get(&ns, &[key.as_bytes()]).await.expect("get");
        if r[0].found {
            assert_eq!(r[0].payload.len(), BLOCK);
        }
    }
    common::put(&d.tcp, &ns, "after-fuzz", None, BLOCK).await;
    assert!(common::present(&d.tcp, &ns, "after-fuzz", BLOCK).await);
    d.stop().await;
}

/// Counts of answers by code, without a lock crate.
mod parking_lot_free {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct Tally(Mutex<BTreeMap<String, u64>>);

    impl Tally {
        pub fn ok(&self) {
            self.add("OK".into());
        }
        pub fn refused(&self, code: tonic::Code) {
            self.add(format!("{code:?}"));
        }
        fn add(&self, k: String) {
            if let Ok(mut m) = self.0.lock() {
                *m.entry(k).or_default() += 1;
            }
        }
        pub fn summary(&self) -> String {
            self.0.lock().map(|m| format!("{m:?}")).unwrap_or_default()
        }
    }
}
