//! Property-based fuzzing of every `kvstrata-tiers` parser that reads bytes the
//! daemon did not just write itself: the disk slot header (`SlotHeader::decode`,
//! `verify`), the remote-tier record (`record::decode`), the disk index entry
//! (`IndexEntry::decode`), the namespace record and canonical encoding
//! (`Namespace::from_record`, `NamespaceSpec::from_canonical_encoding`), and
//! block keys / namespace ids as they arrive on the wire.
//!
//! Each target checks that (a) arbitrary bytes never panic and never make the
//! parser allocate more than the input holds, and (b) structured mutations of
//! valid encodings (bit flips, truncation, extension, length fields that lie,
//! swapped fields) are refused or decode to exactly the bytes given (a decoded
//! value re-encodes to the input byte for byte), never to something else. The
//! header and the remote record carry checksums: there, every mutation is
//! refused. Valid seeds are read from `tests/corpus/<target>/` and mutated too.
//!
//! Case counts: a few seconds per target by default (CI); set
//! `PROPTEST_CASES=100000` for a long run (docs/fuzzing.md). Every target
//! prints its execution count. Failures are persisted to
//! `proptest-regressions/prop_parsers.txt` and replayed first on every run.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use kvstrata_tiers::disk::header::{
    CorruptKind, Expected, HEADER_LEN, HEADER_REGION, SlotHeader, verify,
};
use kvstrata_tiers::disk::index::IndexEntry;
use kvstrata_tiers::remote::record;
use kvstrata_tiers::{
    BlockKey, Dtype, Layout, MAX_KEY_BYTES, Namespace, NamespaceId, NamespaceSpec,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, TestCaseResult, TestRunner};
use xxhash_rust::xxh3::xxh3_64;

// --- harness ------------------------------------------------------------------

/// `PROPTEST_CASES` if set, else the CI default for this target.
fn cases(ci_default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ci_default)
}

/// Runs one fuzz target: `cases` inputs from `strategy` (plus the persisted
/// regressions, plus shrinking on failure), printing the execution count.
fn fuzz<S: Strategy>(
    target: &str,
    ci_default: u32,
    strategy: S,
    test: impl Fn(S::Value) -> TestCaseResult,
) where
    S::Value: std::fmt::Debug,
{
    let mut config = ProptestConfig::with_cases(cases(ci_default));
    config.failure_persistence = Some(Box::new(FileFailurePersistence::Direct(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/proptest-regressions/prop_parsers.txt"
    ))));
    let executions = AtomicU64::new(0);
    let start = Instant::now();
    let mut runner = TestRunner::new(config);
    let result = runner.run(&strategy, |v| {
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

/// A structured mutation of an encoding.
#[derive(Debug, Clone)]
enum Mutation {
    /// Flip one bit (index taken modulo the length in bits).
    Flip(usize),
    /// Keep only the first `n` bytes (modulo the length).
    Truncate(usize),
    /// Append bytes.
    Extend(Vec<u8>),
    /// Overwrite one byte.
    Set(usize, u8),
    /// Overwrite a little-endian u32 (a length field that lies).
    SetU32(usize, u32),
    /// Swap two runs of `len` bytes (fields in the wrong order).
    Swap(usize, usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => any::<usize>().prop_map(Mutation::Flip),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => vec(any::<u8>(), 1..16).prop_map(Mutation::Extend),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        2 => (any::<usize>(), prop_oneof![Just(0u32), Just(1), Just(64), Just(65), Just(u32::MAX), any::<u32>()])
            .prop_map(|(i, v)| Mutation::SetU32(i, v)),
        1 => (any::<usize>(), any::<usize>(), 1usize..17).prop_map(|(a, b, n)| Mutation::Swap(a, b, n)),
    ]
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len();
    match m {
        Mutation::Flip(i) if len > 0 => bytes[(i / 8) % len] ^= 1 << (i % 8),
        Mutation::Truncate(n) if len > 0 => bytes.truncate(n % len),
        Mutation::Extend(more) => bytes.extend_from_slice(more),
        Mutation::Set(i, b) if len > 0 => bytes[i % len] = *b,
        Mutation::SetU32(i, v) if len >= 4 => {
            let at = i % (len - 3);
            bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        Mutation::Swap(a, b, n) if len >= 2 * n => {
            let (a, b) = (a % (len - n + 1), b % (len - n + 1));
            if a.abs_diff(b) >= *n {
                for k in 0..*n {
                    bytes.swap(a + k, b + k);
                }
            }
        }
        _ => {}
    }
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    vec(mutation(), 1..5)
}

// --- seed corpus ----------------------------------------------------------------

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(target)
}

/// The committed seeds of a target (valid encodings), sorted by file name.
/// `KVSTRATA_WRITE_CORPUS=1` rewrites them from [`make_seeds`] first.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    if std::env::var_os("KVSTRATA_WRITE_CORPUS").is_some() {
        std::fs::create_dir_all(&dir).expect("corpus dir");
        for (name, bytes) in make_seeds(target) {
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

fn key(bytes: &[u8]) -> BlockKey {
    BlockKey::new("key", bytes).expect("valid key")
}

fn seed_payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 + 7) as u8).collect()
}

fn smollm() -> NamespaceSpec {
    NamespaceSpec::layer_major("SmolLM2-135M-Instruct", 30, 3, 64, Dtype::F16, 16)
}

fn opaque_spec() -> NamespaceSpec {
    let mut s = NamespaceSpec::layer_major("sglang-pool-α", 1, 1, 1, Dtype::Bf16, 1);
    s.layout = Layout::Opaque;
    s.opaque_block_bytes = 4096;
    s.model_fingerprint = vec![0xAB; 32];
    s.tp_rank = 3;
    s.tp_size = 8;
    s
}

/// The seeds of each target, by name. Remote-record and slot-header seeds
/// use namespace [`SEED_NS`] and the key named in the seed.
fn make_seeds(target: &str) -> Vec<(&'static str, Vec<u8>)> {
    let header = |key_bytes: &[u8], parent: Option<&[u8]>, len: u64, seq: u64| {
        let mut region = vec![0u8; HEADER_REGION];
        SlotHeader {
            namespace: SEED_NS,
            key: key(key_bytes),
            parent: parent.map(key),
            payload_len: len,
            payload_xxh3: xxh3_64(&seed_payload(len as usize)),
            seq,
        }
        .encode(&mut region);
        region.truncate(HEADER_LEN);
        region
    };
    match target {
        "slot_header" => vec![
            ("short_key_no_parent", header(b"k", None, 64, 1)),
            (
                "hash_key_with_parent",
                header(&[0x5A; 16], Some(&[0xA5; 16]), 8192, 42),
            ),
            (
                "max_keys",
                header(&[0xFF; 64], Some(&[0x01; 64]), 0, u64::MAX),
            ),
        ],
        "remote_record" => vec![
            (
                "no_parent",
                record::encode(&SEED_NS, &key(b"k"), None, &seed_payload(64), 1),
            ),
            (
                "with_parent",
                record::encode(
                    &SEED_NS,
                    &key(&[0x5A; 16]),
                    Some(&key(&[0xA5; 16])),
                    &seed_payload(300),
                    7,
                ),
            ),
        ],
        "index_entry" => vec![
            (
                "no_parent",
                IndexEntry {
                    file: 0,
                    segment: 1,
                    slot: 2,
                    slot_bytes: 12288,
                    offset: 4096 + 12288 * 2,
                    payload_len: 8192,
                    checksum: 0x0123_4567_89AB_CDEF,
                    seq: 9,
                    last_access_ms: 1_700_000_000_000,
                    parent: None,
                }
                .encode(),
            ),
            (
                "with_parent",
                IndexEntry {
                    file: 3,
                    segment: u32::MAX,
                    slot: 7,
                    slot_bytes: 8192,
                    offset: u64::MAX,
                    payload_len: 4096,
                    checksum: 1,
                    seq: u64::MAX,
                    last_access_ms: 0,
                    parent: Some(key(&[0x11; 64])),
                }
                .encode(),
            ),
        ],
        "namespace_record" => {
            let mut wt = Namespace::new(opaque_spec()).expect("valid");
            wt.policy.write_through = true;
            wt.policy.remote_write_through = true;
            vec![
                ("smollm", Namespace::new(smollm()).expect("valid").record()),
                ("opaque_write_through", wt.record()),
            ]
        }
        "canonical_spec" => vec![
            ("smollm", smollm().canonical_encoding()),
            ("opaque", opaque_spec().canonical_encoding()),
        ],
        other => panic!("unknown target {other}"),
    }
}

const SEED_NS: NamespaceId = NamespaceId([0x3C; 16]);

/// The key a remote-record seed was written under (read back from its header).
fn seed_header(seed: &[u8]) -> SlotHeader {
    SlotHeader::decode(seed).expect("seed header decodes")
}

#[test]
fn prop_corpus_seeds_are_valid_encodings() {
    for target in [
        "slot_header",
        "remote_record",
        "index_entry",
        "namespace_record",
        "canonical_spec",
    ] {
        let want: Vec<Vec<u8>> = make_seeds(target).into_iter().map(|(_, b)| b).collect();
        let mut got = seeds(target);
        got.sort();
        let mut want_sorted = want.clone();
        want_sorted.sort();
        assert_eq!(
            got, want_sorted,
            "{target}: committed corpus differs from make_seeds (KVSTRATA_WRITE_CORPUS=1 rewrites it)"
        );
    }
}

// --- strategies -----------------------------------------------------------------

fn arb_key() -> impl Strategy<Value = BlockKey> {
    vec(any::<u8>(), 1..=MAX_KEY_BYTES).prop_map(|b| key(&b))
}

fn arb_ns() -> impl Strategy<Value = NamespaceId> {
    any::<[u8; 16]>().prop_map(NamespaceId)
}

fn arb_header() -> impl Strategy<Value = SlotHeader> {
    (
        arb_ns(),
        arb_key(),
        proptest::option::of(arb_key()),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(namespace, key, parent, payload_len, payload_xxh3, seq)| SlotHeader {
                namespace,
                key,
                parent,
                payload_len,
                payload_xxh3,
                seq,
            },
        )
}

/// Arbitrary bytes, biased to the interesting sizes of the format at hand.
fn arb_bytes(typical: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..typical * 2),
        vec(any::<u8>(), typical.saturating_sub(4)..typical + 4),
    ]
}

fn encode_header(h: &SlotHeader) -> Vec<u8> {
    let mut region = vec![0u8; HEADER_REGION];
    h.encode(&mut region);
    region
}

fn expected(h: &SlotHeader) -> Expected<'_> {
    Expected {
        namespace: &h.namespace,
        key: &h.key,
        parent: h.parent.as_ref(),
        payload_len: h.payload_len,
        checksum: h.payload_xxh3,
        seq: h.seq,
    }
}

/// A header region with the magic, version and header length of a real one and
/// the rest random, and the checksum fixed up, so that decoding gets past the
/// checksum and exercises the field checks.
fn forged_header() -> impl Strategy<Value = Vec<u8>> {
    (
        vec(any::<u8>(), 192),
        any::<u8>(),
        any::<u8>(),
        any::<bool>(),
    )
        .prop_map(|(mut b, klen, plen, zero_pad)| {
            b[0..8].copy_from_slice(b"KVSTSLOT");
            b[8..10].copy_from_slice(&1u16.to_le_bytes());
            b[10..12].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
            b[32] = klen % 70;
            b[97] = plen % 70;
            if zero_pad {
                b[12..16].fill(0);
                let k = (b[32] as usize).min(64);
                b[33 + k..97].fill(0);
                let p = (b[97] as usize).min(64);
                b[98 + p..168].fill(0);
            }
            let sum = xxh3_64(&b);
            b.extend_from_slice(&sum.to_le_bytes());
            b
        })
}

// --- slot header ---------------------------------------------------------------

#[test]
fn prop_slot_header_arbitrary_bytes() {
    fuzz(
        "slot_header/arbitrary",
        20000,
        prop_oneof![arb_bytes(HEADER_LEN), forged_header()],
        |bytes| {
            if let Ok(h) = SlotHeader::decode(&bytes) {
                // Whatever decodes is exactly what encode writes for it.
                prop_assert_eq!(&encode_header(&h)[..HEADER_LEN], &bytes[..HEADER_LEN]);
            }
            Ok(())
        },
    );
}

#[test]
fn prop_slot_header_round_trip_and_any_flip_is_refused() {
    fuzz(
        "slot_header/round_trip_flip",
        10000,
        (arb_header(), 0..HEADER_LEN * 8),
        |(h, bit)| {
            let region = encode_header(&h);
            prop_assert_eq!(SlotHeader::decode(&region), Ok(h.clone()));
            prop_assert!(region[HEADER_LEN..].iter().all(|&b| b == 0));
            let mut bad = region.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(
                SlotHeader::decode(&bad).is_err(),
                "flip of bit {} accepted",
                bit
            );
            for n in [0, bit / 8, HEADER_LEN - 1] {
                prop_assert_eq!(
                    SlotHeader::decode(&region[..n]),
                    Err(CorruptKind::Malformed)
                );
            }
            Ok(())
        },
    );
}

#[test]
fn prop_slot_header_mutations() {
    let seeds = seeds("slot_header");
    let headers = prop_oneof![
        arb_header().prop_map(|h| encode_header(&h)[..HEADER_LEN].to_vec()),
        proptest::sample::select(seeds),
    ];
    fuzz(
        "slot_header/mutations",
        20000,
        (headers, mutations(), any::<bool>()),
        |(orig, muts, fix_checksum)| {
            let mut bytes = orig.clone();
            for m in &muts {
                mutate(&mut bytes, m);
            }
            if fix_checksum && bytes.len() >= HEADER_LEN {
                // A forger who recomputes the checksum: the field checks must still hold.
                let sum = xxh3_64(&bytes[..192]);
                bytes[192..200].copy_from_slice(&sum.to_le_bytes());
            }
            match SlotHeader::decode(&bytes) {
                Ok(h) => {
                    prop_assert_eq!(&encode_header(&h)[..HEADER_LEN], &bytes[..HEADER_LEN]);
                    if !fix_checksum {
                        prop_assert_eq!(
                            &bytes[..HEADER_LEN],
                            &orig[..HEADER_LEN],
                            "a mutated header decoded"
                        );
                    }
                }
                Err(_) => prop_assert!(
                    fix_checksum || bytes.len() < HEADER_LEN || bytes[..HEADER_LEN] != orig[..]
                ),
            }
            Ok(())
        },
    );
}

#[test]
fn prop_slot_verify_refuses_every_flip_and_every_wrong_expectation() {
    let strategy = (
        arb_header(),
        vec(any::<u8>(), 0..600),
        any::<usize>(),
        0u8..7,
        arb_key(),
        arb_ns(),
        any::<u64>(),
    );
    fuzz(
        "slot_header/verify",
        5000,
        strategy,
        |(mut h, payload, at, what, other_key, other_ns, other)| {
            h.payload_len = payload.len() as u64;
            h.payload_xxh3 = xxh3_64(&payload);
            let mut slot = encode_header(&h);
            slot.extend_from_slice(&payload);
            prop_assert_eq!(verify(&slot, &expected(&h)), Ok(h.clone()));

            // One flipped bit in the header or the payload.
            let covered: Vec<usize> = (0..HEADER_LEN).chain(HEADER_REGION..slot.len()).collect();
            let i = covered[at % covered.len()];
            let mut bad = slot.clone();
            bad[i] ^= 1 << (at % 8);
            prop_assert!(
                verify(&bad, &expected(&h)).is_err(),
                "flip at byte {} accepted",
                i
            );

            // A cut payload.
            if !payload.is_empty() {
                prop_assert_eq!(
                    verify(&slot[..slot.len() - 1], &expected(&h)),
                    Err(CorruptKind::Length)
                );
            }

            // The index expecting something else.
            let mut w = expected(&h);
            let kind = match what {
                0 if other_ns != h.namespace => {
                    w.namespace = &other_ns;
                    CorruptKind::Namespace
                }
                1 if other_key != h.key => {
                    w.key = &other_key;
                    CorruptKind::Key
                }
                2 if other != h.payload_len => {
                    w.payload_len = other;
                    CorruptKind::Length
                }
                3 if other != h.seq => {
                    w.seq = other;
                    CorruptKind::Sequence
                }
                4 if other != h.payload_xxh3 => {
                    w.checksum = other;
                    CorruptKind::IndexChecksum
                }
                5 if Some(&other_key) != h.parent.as_ref() => {
                    w.parent = Some(&other_key);
                    CorruptKind::Parent
                }
                6 if h.parent.is_some() => {
                    w.parent = None;
                    CorruptKind::Parent
                }
                _ => return Ok(()),
            };
            prop_assert_eq!(verify(&slot, &w), Err(kind));
            Ok(())
        },
    );
}

// --- remote record ---------------------------------------------------------------

#[test]
fn prop_remote_record_arbitrary_bytes() {
    let strategy = (
        prop_oneof![arb_bytes(HEADER_LEN + 64), forged_header()],
        arb_ns(),
        arb_key(),
        0u64..512,
    );
    fuzz(
        "remote_record/arbitrary",
        20000,
        strategy,
        |(bytes, ns, k, block_bytes)| {
            if let Ok(b) = record::decode(Bytes::from(bytes.clone()), &ns, &k, block_bytes) {
                let again = record::encode(&ns, &k, b.parent.as_ref(), &b.payload, b.seq);
                prop_assert_eq!(again, bytes);
            }
            Ok(())
        },
    );
}

#[test]
fn prop_remote_record_round_trip_and_mutations_are_refused() {
    let fresh = (
        arb_ns(),
        arb_key(),
        proptest::option::of(arb_key()),
        vec(any::<u8>(), 0..512),
        any::<u64>(),
    )
        .prop_map(|(ns, k, parent, payload, seq)| {
            let v = record::encode(&ns, &k, parent.as_ref(), &payload, seq);
            prop_assert_round_trip(&v, &ns, &k, parent.as_ref(), &payload, seq);
            (v, ns, k)
        });
    let from_corpus = proptest::sample::select(seeds("remote_record")).prop_map(|v| {
        let h = seed_header(&v);
        (v, h.namespace, h.key)
    });
    fuzz(
        "remote_record/mutations",
        10000,
        (prop_oneof![fresh, from_corpus], mutations()),
        |((orig, ns, k), muts)| {
            let block_bytes = (orig.len() - HEADER_LEN) as u64;
            let good = record::decode(Bytes::from(orig.clone()), &ns, &k, block_bytes);
            prop_assert!(good.is_ok(), "valid record refused: {:?}", good.err());
            let mut bytes = orig.clone();
            for m in &muts {
                mutate(&mut bytes, m);
            }
            let r = record::decode(Bytes::from(bytes.clone()), &ns, &k, block_bytes);
            if bytes == orig {
                prop_assert!(r.is_ok());
            } else {
                prop_assert!(r.is_err(), "mutated record accepted");
            }
            // Asked under another length, namespace or key: refused.
            let other_len = block_bytes ^ 1;
            prop_assert_eq!(
                record::decode(Bytes::from(orig.clone()), &ns, &k, other_len).err(),
                Some(CorruptKind::Length)
            );
            Ok(())
        },
    );
}

fn prop_assert_round_trip(
    v: &[u8],
    ns: &NamespaceId,
    k: &BlockKey,
    parent: Option<&BlockKey>,
    payload: &[u8],
    seq: u64,
) {
    let b =
        record::decode(Bytes::copy_from_slice(v), ns, k, payload.len() as u64).expect("round trip");
    assert_eq!(&b.payload[..], payload);
    assert_eq!(b.parent.as_ref(), parent);
    assert_eq!(b.seq, seq);
    let mut other = *ns;
    other.0[0] ^= 1;
    assert_eq!(
        record::decode(Bytes::copy_from_slice(v), &other, k, payload.len() as u64).err(),
        Some(CorruptKind::Namespace)
    );
}

// --- disk index entry ------------------------------------------------------------

fn arb_entry() -> impl Strategy<Value = IndexEntry> {
    (
        (any::<u16>(), any::<u32>(), any::<u32>(), any::<u32>()),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
        ),
        proptest::option::of(arb_key()),
    )
        .prop_map(
            |(
                (file, segment, slot, slot_bytes),
                (offset, payload_len, checksum, seq, last_access_ms),
                parent,
            )| {
                IndexEntry {
                    file,
                    segment,
                    slot,
                    slot_bytes,
                    offset,
                    payload_len,
                    checksum,
                    seq,
                    last_access_ms,
                    parent,
                }
            },
        )
}

#[test]
fn prop_index_entry() {
    let inputs = prop_oneof![
        (arb_bytes(56), any::<bool>()).prop_map(|(mut b, version_1)| {
            if version_1 && !b.is_empty() {
                b[0] = 1;
            }
            b
        }),
        arb_entry().prop_map(|e| {
            assert_eq!(IndexEntry::decode(&e.encode()), Some(e));
            e.encode()
        }),
        (arb_entry().prop_map(|e| e.encode()), mutations()).prop_map(|(mut b, m)| {
            m.iter().for_each(|m| mutate(&mut b, m));
            b
        }),
        (proptest::sample::select(seeds("index_entry")), mutations()).prop_map(|(mut b, m)| {
            m.iter().for_each(|m| mutate(&mut b, m));
            b
        }),
    ];
    fuzz("index_entry", 10000, inputs, |bytes| {
        if let Some(e) = IndexEntry::decode(&bytes) {
            prop_assert_eq!(e.encode(), bytes);
        }
        Ok(())
    });
}

// --- namespace record and canonical encoding -------------------------------------

fn arb_spec() -> impl Strategy<Value = NamespaceSpec> {
    let small = prop_oneof![Just(0u32), 1u32..200, Just(u32::MAX), any::<u32>()];
    (
        prop_oneof![".{0,40}", Just(String::new()), "a{250,260}"],
        vec(any::<u8>(), 0..70),
        (small.clone(), small.clone(), small.clone(), small.clone()),
        (1i32..=6, 1i32..=2),
        (0u32..4, 0u32..4),
        prop_oneof![Just(0u64), 1u64..100_000, any::<u64>()],
    )
        .prop_map(
            |(model_id, model_fingerprint, (l, h, d, t), (dt, lay), (tp_rank, tp_size), opaque)| {
                NamespaceSpec {
                    model_id,
                    model_fingerprint,
                    num_layers: l,
                    num_kv_heads: h,
                    head_dim: d,
                    dtype: Dtype::from_code(dt).expect("dtype code"),
                    block_tokens: t,
                    layout: Layout::from_code(lay).expect("layout code"),
                    tp_rank,
                    tp_size,
                    opaque_block_bytes: opaque,
                }
            },
        )
}

#[test]
fn prop_canonical_spec_encoding() {
    let mutated = |seed: BoxedStrategy<Vec<u8>>| {
        (seed, mutations()).prop_map(|(mut b, m)| {
            m.iter().for_each(|m| mutate(&mut b, m));
            b
        })
    };
    let inputs = prop_oneof![
        arb_bytes(80),
        arb_spec().prop_map(|s| {
            let enc = s.canonical_encoding();
            assert_eq!(
                NamespaceSpec::from_canonical_encoding(&enc),
                Some(s.normalized())
            );
            enc
        }),
        mutated(arb_spec().prop_map(|s| s.canonical_encoding()).boxed()),
        mutated(proptest::sample::select(seeds("canonical_spec")).boxed()),
    ];
    fuzz("namespace/canonical_encoding", 10000, inputs, |bytes| {
        if let Some(s) = NamespaceSpec::from_canonical_encoding(&bytes) {
            // Nothing past the input was allocated, and it re-encodes exactly.
            prop_assert!(s.model_id.len() + s.model_fingerprint.len() <= bytes.len());
            prop_assert_eq!(s.canonical_encoding(), bytes);
        }
        Ok(())
    });
}

/// Specs that validate (small geometry, either layout, any tensor-parallel rank).
fn arb_valid_spec() -> impl Strategy<Value = NamespaceSpec> {
    (
        "[a-zA-Z0-9./-]{1,40}",
        vec(any::<u8>(), 0..=64),
        (1u32..64, 1u32..16, 1u32..256, 1u32..64),
        (1i32..=6, any::<bool>(), 1u64..1_000_000),
        (1u32..8, any::<u32>()),
    )
        .prop_map(
            |(model_id, model_fingerprint, (l, h, d, t), (dt, opaque, bytes), (tp_size, rank))| {
                let mut s = NamespaceSpec::layer_major(
                    model_id,
                    l,
                    h,
                    d,
                    Dtype::from_code(dt).expect("dtype"),
                    t,
                );
                s.model_fingerprint = model_fingerprint;
                s.tp_size = tp_size;
                s.tp_rank = rank % tp_size;
                if opaque {
                    s.layout = Layout::Opaque;
                    s.opaque_block_bytes = bytes;
                }
                s
            },
        )
}

#[test]
fn prop_namespace_record() {
    let record_of = |s: NamespaceSpec, flags: u8| {
        let mut ns = Namespace::new(s).ok()?;
        ns.policy.write_through = flags & 1 != 0;
        ns.policy.remote_write_through = flags & 2 != 0;
        Some(ns.record())
    };
    let valid = (arb_valid_spec(), 0u8..4)
        .prop_map(move |(s, f)| record_of(s, f).expect("valid spec"))
        .boxed();
    let mutated = |seed: BoxedStrategy<Vec<u8>>| {
        (seed, mutations()).prop_map(|(mut b, m)| {
            m.iter().for_each(|m| mutate(&mut b, m));
            b
        })
    };
    let inputs = prop_oneof![
        arb_bytes(90).prop_map(|mut b| {
            if b.len() > 6 {
                b[..6].copy_from_slice(b"kvsns1");
            }
            b
        }),
        valid.clone().prop_map(|r| {
            let ns = Namespace::from_record(&r).expect("valid record decodes");
            assert_eq!(ns.record(), r);
            r
        }),
        mutated(valid),
        mutated(proptest::sample::select(seeds("namespace_record")).boxed()),
    ];
    fuzz("namespace/record", 10000, inputs, |bytes| {
        if let Some(ns) = Namespace::from_record(&bytes) {
            prop_assert_eq!(ns.record(), bytes);
            prop_assert_eq!(ns.spec.id().ok(), Some(ns.id));
            prop_assert_eq!(ns.spec.block_bytes().ok(), Some(ns.block_bytes));
        }
        Ok(())
    });
}

#[test]
fn prop_namespace_spec_validation() {
    fuzz("namespace/validate", 10000, arb_spec(), |s| {
        match Namespace::new(s.clone()) {
            Ok(ns) => {
                prop_assert!(
                    ns.block_bytes >= 1
                        && ns.block_bytes <= kvstrata_tiers::namespace::MAX_BLOCK_BYTES
                );
                prop_assert_eq!(ns.spec, s.normalized());
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.starts_with("spec"), "error names no field: {}", msg);
            }
        }
        Ok(())
    });
}

// --- keys and ids -----------------------------------------------------------------

#[test]
fn prop_block_keys_and_namespace_ids() {
    let strategy = (vec(any::<u8>(), 0..200), ".{0,40}", "[0-9a-fA-F ]{0,40}");
    fuzz("key_and_id", 10000, strategy, |(bytes, text, hexish)| {
        match BlockKey::new("items[7].key", &bytes) {
            Ok(k) => {
                prop_assert!((1..=MAX_KEY_BYTES).contains(&bytes.len()));
                prop_assert_eq!(k.as_bytes(), &bytes[..]);
                let shown = k.to_string();
                match shown.strip_prefix("hex:") {
                    Some(h) => prop_assert_eq!(hex::decode(h).ok(), Some(bytes.clone())),
                    None => prop_assert_eq!(shown.as_bytes(), &bytes[..]),
                }
            }
            Err(e) => {
                prop_assert!(bytes.is_empty() || bytes.len() > MAX_KEY_BYTES);
                prop_assert!(e.to_string().contains("items[7].key"), "{}", e);
            }
        }
        match NamespaceId::from_slice("namespace_id", &bytes) {
            Ok(id) => prop_assert_eq!(&id.as_bytes()[..], &bytes[..]),
            Err(e) => {
                prop_assert!(bytes.len() != 16);
                prop_assert!(e.to_string().contains("namespace_id"));
            }
        }
        for s in [&text, &hexish] {
            if let Some(id) = NamespaceId::from_hex(s) {
                prop_assert_eq!(id.to_hex(), s.trim().to_ascii_lowercase());
            }
            let _ = Dtype::parse(s);
        }
        Ok(())
    });
}
