//! The engines on the real default model against a real daemon: a cached prefix must
//! change nothing but the time, in this process and when decode runs in another one.
//!
//! The model is fetched on first use (CI has the network); a failed fetch fails these
//! tests, it never skips them.

#[path = "../../server/tests/common/mod.rs"]
mod common;
#[path = "common/engine_daemon.rs"]
mod engine_daemon;

use std::process::Command;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use engine_daemon::{model_path, start_daemon};
use kvstrata_client::PutItem;
use kvstrata_engine::chat::{Conversation, Message};
use kvstrata_engine::engine::{Engine, EngineOptions, Handoff, LoadedModel};
use kvstrata_engine::load_policy::LoadPolicy;
use kvstrata_engine::model::{argmax, max_abs_diff};
use kvstrata_engine::sampling::SamplingParams;

/// Largest difference allowed between last-position logits computed with a cached
/// prefix and with a full recompute. The KV itself is identical (f16 either way); what
/// differs is the shape of the attention matmuls (a suffix of queries instead of all),
/// which changes f32 summation order. Logits of this model span about ±30.
const LOGIT_TOLERANCE: f32 = 0.05;

fn model() -> Arc<LoadedModel> {
    static MODEL: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    MODEL
        .get_or_init(|| Arc::new(LoadedModel::load(&model_path()).expect("model loads")))
        .clone()
}

/// Engines that load every cached block (`auto` decides by timings; these tests
/// check what is loaded).
fn options(mempool: Option<&str>) -> EngineOptions {
    EngineOptions {
        mempool_socket: mempool.map(str::to_string),
        load_policy: LoadPolicy::Always,
        ..EngineOptions::default()
    }
}

/// A chat prompt of a few blocks, with a partial last block.
fn prompt(m: &LoadedModel) -> Vec<u32> {
    let text = m
        .template
        .render(
            &[Message::user(
                "Name three colours of the rainbow, say which one has the longest wavelength, \
                 and explain in one sentence why the sky looks blue at noon but red at sunset.",
            )],
            true,
        )
        .expect("template renders");
    let tokens = m.tokenizer.encode(&text).expect("encodes");
    assert!(
        tokens.len() > 3 * 16 && !tokens.len().is_multiple_of(16),
        "{} tokens",
        tokens.len()
    );
    tokens
}

const NEW_TOKENS: usize = 10;

/// Greedy tokens and last-position logits of a full recompute, no cache.
async fn reference(m: &Arc<LoadedModel>, tokens: &[u32]) -> (Vec<u32>, Vec<f32>) {
    let local = Engine::local(m.clone(), &options(None)).expect("engine");
    let mut p = local
        .prefill(tokens, &mut |_, _| {})
        .await
        .expect("prefill");
    assert_eq!(p.reused_tokens, 0);
    assert_eq!(p.computed_tokens, tokens.len());
    let logits = p.logits.clone();
    (
        local.continue_local(&mut p, NEW_TOKENS).expect("generate"),
        logits,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_prefix_at_every_split_matches_full_recompute() {
    let m = model();
    let tokens = prompt(&m);
    let (want_tokens, want_logits) = reference(&m, &tokens).await;
    let running = start_daemon().await;
    // Inline gRPC and shared-memory transport must both be exact.
    for mempool in [None, Some(running.mempool.as_str())] {
        let engine = Engine::connect(m.clone(), running.client.clone(), &options(mempool))
            .await
            .expect("engine connects");
        let store = engine.store().expect("store");
        let keys = store.keys(&tokens);
        let full = (tokens.len() - 1) / 16;
        for split in [1, 2, full] {
            // Start from an empty namespace, then cache exactly `split` blocks.
            running
                .client
                .delete(store.namespace_id(), &keys)
                .await
                .expect("delete");
            let warm = engine
                .prefill(&tokens[..split * 16], &mut |_, _| {})
                .await
                .expect("warm prefill");
            assert_eq!(warm.stored_blocks, split);
            let p = engine
                .prefill(&tokens, &mut |_, _| {})
                .await
                .expect("prefill");
            assert_eq!(p.reused_tokens, split * 16, "split {split}");
            assert_eq!(p.computed_tokens, tokens.len() - split * 16);
            assert_eq!(p.stored_blocks, full - split);
            let diff = max_abs_diff(&p.logits, &want_logits);
            eprintln!(
                "split {split}, pool {}: logits differ by at most {diff}",
                mempool.is_some()
            );
            assert!(
                diff <= LOGIT_TOLERANCE,
                "split {split}: logits differ by {diff} (tolerance {LOGIT_TOLERANCE})"
            );
            assert_eq!(argmax(&p.logits), want_tokens[0]);
            // Decode through kvstrata: it loads every full block again.
            let d = engine
                .decode(
                    &p.handoff,
                    SamplingParams::default(),
                    NEW_TOKENS,
                    &mut |_| true,
                )
                .await
                .expect("decode");
            assert_eq!(d.loaded_tokens, full * 16);
            assert_eq!(d.recomputed_tokens, tokens.len() - full * 16);
            assert_eq!(d.tokens, want_tokens, "split {split}, pool {mempool:?}");
            assert!(max_abs_diff(&d.prompt_logits, &want_logits) <= LOGIT_TOLERANCE);
        }
    }
    running.daemon.shutdown().await.expect("shutdown");
}

/// The load policy changes how much of a cached prefix is loaded, never the
/// first token: `never` recomputes it, `always` loads it, `auto` (once it has a
/// compute estimate) loads what it chose, whatever that is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_policy_changes_what_is_loaded_never_the_first_token() {
    let m = model();
    let tokens = prompt(&m);
    let (want_tokens, want_logits) = reference(&m, &tokens).await;
    let running = start_daemon().await;
    let full = (tokens.len() - 1) / 16;
    let with = |policy| EngineOptions {
        load_policy: policy,
        ..options(Some(running.mempool.as_str()))
    };
    let warm = Engine::connect(m.clone(), running.client.clone(), &with(LoadPolicy::Always))
        .await
        .expect("engine connects");
    let w = warm.prefill(&tokens, &mut |_, _| {}).await.expect("warm");
    assert_eq!(w.stored_blocks, full);
    for policy in [LoadPolicy::Never, LoadPolicy::Always, LoadPolicy::Auto] {
        let engine = Engine::connect(m.clone(), running.client.clone(), &with(policy))
            .await
            .expect("engine connects");
        // Auto's first prefill has no compute estimate (it loads everything);
        // the second decides with one.
        let rounds = if policy == LoadPolicy::Auto { 2 } else { 1 };
        for round in 0..rounds {
            let p = engine
                .prefill(&tokens, &mut |_, _| {})
                .await
                .expect("prefill");
            let c = p
                .load_choice
                .clone()
                .expect("a cached prefix gives a choice");
            eprintln!("{policy}, round {round}: {}", c.describe());
            assert_eq!(c.policy, policy);
            assert_eq!(c.matched_blocks, full);
            assert_eq!(p.reused_tokens, c.load_blocks * 16);
            assert_eq!(p.computed_tokens, tokens.len() - p.reused_tokens);
            match policy {
                LoadPolicy::Never => assert_eq!(c.load_blocks, 0),
                LoadPolicy::Always => assert_eq!(c.load_blocks, full),
                LoadPolicy::Auto if round == 0 => {
                    assert_eq!(c.load_blocks, full);
                    assert_eq!(c.recompute_ms, None);
                }
                LoadPolicy::Auto => {
                    assert_eq!(c.load_blocks, c.auto_blocks);
                    assert!(c.recompute_ms.is_some() && c.load_all_ms.is_some());
                }
            }
            // Recomputed cached blocks are stored again.
            assert_eq!(p.stored_blocks, full - c.load_blocks);
            assert_eq!(argmax(&p.logits), want_tokens[0], "{policy}");
            assert!(max_abs_diff(&p.logits, &want_logits) <= LOGIT_TOLERANCE);
        }
    }
    running.daemon.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_in_another_process_loads_every_block() {
    let m = model();
    let tokens = prompt(&m);
    let (want_tokens, _) = reference(&m, &tokens).await;
    let running = start_daemon().await;
    let engine = Engine::connect(m.clone(), running.client.clone(), &options(None))
        .await
        .expect("engine");
    let p = engine
        .prefill(&tokens, &mut |_, _| {})
        .await
        .expect("prefill");
    let full = (tokens.len() - 1) / 16;
    assert_eq!(p.stored_blocks, full);
    let dir = tempfile::tempdir().expect("tempdir");
    let handoff_path = dir.path().join("handoff.json");
    std::fs::write(&handoff_path, serde_json::to_vec(&p.handoff).expect("json")).expect("write");
    let path = model_path();
    let out = tokio::task::spawn_blocking({
        let target = running.target.clone();
        let mempool = running.mempool.clone();
        let handoff_path = handoff_path.clone();
        move || {
            Command::new(env!("CARGO_BIN_EXE_kvstrata"))
                .args([
                    "--addr",
                    &target,
                    "--json",
                    "decode",
                    "--quiet",
                    "--handoff",
                ])
                .arg(&handoff_path)
                .arg("--model")
                .arg(&path)
                .args(["--mempool-socket", &mempool])
                .args(["--max-tokens", &NEW_TOKENS.to_string()])
                .output()
                .expect("run kvstrata decode")
        }
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "decode failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("decode prints JSON");
    let got: Vec<u32> = serde_json::from_value(v["tokens"].clone()).expect("tokens");
    assert_eq!(got, want_tokens);
    assert_eq!(v["loaded_tokens"], serde_json::json!(full * 16));

    // A hand-off whose keys are not its tokens' chain is refused, not served.
    let mut bad = p.handoff.clone();
    bad.tokens[5] = bad.tokens[5].wrapping_add(1) % 1000;
    let err = engine
        .decode(&bad, SamplingParams::default(), 2, &mut |_| true)
        .await
        .expect_err("mismatched hand-off");
    assert!(err.to_string().contains("block keys"), "{err}");
    running.daemon.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_of_another_namespace_are_never_loaded() {
    let m = model();
    let tokens = prompt(&m);
    let (want_tokens, want_logits) = reference(&m, &tokens).await;
    let running = start_daemon().await;
    let engine = Engine::connect(m.clone(), running.client.clone(), &options(None))
        .await
        .expect("engine");
    let store = engine.store().expect("store");
    // Another checkpoint of the same geometry: same everything but the fingerprint.
    let mut other = m.namespace_spec(16);
    other.model_fingerprint = vec![0xAB; 16];
    let other_ns = running
        .client
        .register_namespace(&other)
        .await
        .expect("register");
    assert_ne!(&other_ns.id, store.namespace_id());
    // Poison it under this engine's own key bytes: a namespace mix-up would load them.
    let keys = store.keys(&tokens);
    let garbage = Bytes::from(vec![0x7Fu8; m.geometry(16).block_bytes()]);
    let items = keys
        .iter()
        .map(|k| PutItem::new(Bytes::copy_from_slice(k), garbage.clone()))
        .collect();
    let resp = running
        .client
        .batch_put(&other_ns.id, items)
        .await
        .expect("put");
    assert_eq!(resp.stored as usize, keys.len());
    let p = engine
        .prefill(&tokens, &mut |_, _| {})
        .await
        .expect("prefill");
    assert_eq!(
        p.reused_tokens, 0,
        "blocks of another namespace were loaded"
    );
    assert!(max_abs_diff(&p.logits, &want_logits) <= LOGIT_TOLERANCE);
    let d = engine
        .decode(
            &p.handoff,
            SamplingParams::default(),
            NEW_TOKENS,
            &mut |_| true,
        )
        .await
        .expect("decode");
    assert_eq!(d.tokens, want_tokens);
    // Another block size is another namespace too.
    let engine8 = Engine::connect(
        m.clone(),
        running.client.clone(),
        &EngineOptions {
            block_tokens: 8,
            ..EngineOptions::default()
        },
    )
    .await
    .expect("engine");
    let p8 = engine8
        .prefill(&tokens, &mut |_, _| {})
        .await
        .expect("prefill");
    assert_eq!(p8.reused_tokens, 0);
    // And a hand-off from one namespace is refused by an engine of another.
    let err = engine8
        .decode(&p.handoff, SamplingParams::default(), 2, &mut |_| true)
        .await
        .expect_err("foreign hand-off");
    assert!(err.to_string().contains("namespace"), "{err}");
    running.daemon.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_turn_extends_the_previous_turns_keys() {
    let m = model();
    let running = start_daemon().await;
    let engine = Engine::connect(m.clone(), running.client.clone(), &options(None))
        .await
        .expect("engine");
    let store = engine.store().expect("store");
    let mut convo = Conversation::with_system("You are brief. Answer in one sentence.");
    let mut previous: Option<Vec<u32>> = None;
    for (turn, question) in [
        "What is a cache?",
        "Why does a cache help a web server?",
        "Give one risk of caching.",
    ]
    .iter()
    .enumerate()
    {
        let tokens = convo
            .next_prompt_tokens(&m.tokenizer, &m.template, question)
            .expect("prompt");
        if let Some(prev) = &previous {
            // Turn N's prompt plus its answer is a prefix of turn N+1's prompt...
            assert!(tokens.starts_with(prev), "turn {turn}: tokens diverge");
            // ...so its block keys are a prefix of the new keys.
            let prev_keys = store.keys(prev);
            let keys = store.keys(&tokens);
            assert_eq!(&keys[..prev_keys.len()], &prev_keys[..]);
        }
        let p = engine
            .prefill(&tokens, &mut |_, _| {})
            .await
            .expect("prefill");
        if let Some(prev) = &previous {
            // Everything the previous turn stored is reused: the prompt and every answer
            // token but the last, whose KV was never computed.
            let expect = ((prev.len() - 1) / 16).min((tokens.len() - 1) / 16) * 16;
            assert_eq!(p.reused_tokens, expect, "turn {turn}");
        }
        let d = engine
            .decode(&p.handoff, SamplingParams::default(), 12, &mut |_| true)
            .await
            .expect("decode");
        let answer = m.tokenizer.decode(&d.tokens, true).expect("decode text");
        convo.record_answer(&d.tokens, &answer);
        let mut full = tokens.clone();
        full.extend_from_slice(&d.tokens);
        previous = Some(full);
    }
    running.daemon.shutdown().await.expect("shutdown");
}

/// A handoff survives JSON unchanged (the format between prefill and decode processes).
#[test]
fn handoff_json_round_trip() {
    let h = Handoff {
        namespace_id: "00ff".into(),
        tokens: vec![1, 2, 3],
        block_keys: vec!["aa".repeat(16)],
        first_token: 9,
    };
    let back: Handoff = serde_json::from_str(&serde_json::to_string(&h).unwrap()).unwrap();
    assert_eq!(back, h);
    assert_eq!(back.keys().unwrap(), vec![[0xAA; 16]]);
}

/// A store of one-token blocks of 16 bytes (1 layer, 1 KV head of 4 f16)
/// under `model`, opened through `client` (which registers its namespace).
async fn tiny_store(
    client: &kvstrata_client::Client,
    model: &str,
) -> (kvstrata_engine::store::BlockStore, usize) {
    use kvstrata_engine::kv::KvGeometry;
    use kvstrata_engine::store::BlockStore;
    use kvstrata_types::{Dtype, NamespaceSpec};

    let spec = NamespaceSpec::layer_major(model, 1, 1, 4, Dtype::F16, 1);
    let geometry = KvGeometry {
        num_layers: 1,
        num_kv_heads: 1,
        head_dim: 4,
        block_tokens: 1,
    };
    let store = BlockStore::open(client.clone(), spec, geometry, None, 1)
        .await
        .expect("store opens");
    (store, geometry.block_bytes())
}

/// A prompt of more blocks than the daemon takes in one request (a 128k-token
/// prompt is 8,190 blocks of 16 tokens; the daemon's `max_batch` is 4,096):
/// the lookup is split over requests (by the client), counts across them,
/// and still stops at the first block the daemon does not have; evicts and
/// deletes of that many keys are split too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_of_more_keys_than_one_request_takes_is_split() {
    use kvstrata_client::MAX_BATCH as KEYS_PER_REQUEST;

    let r = start_daemon().await;
    let (store, block_bytes) = tiny_store(&r.client, "lookup-split").await;
    let ns = *store.namespace_id();
    let tokens: Vec<u32> = (0..(2 * KEYS_PER_REQUEST + 100) as u32).collect();
    let keys = store.keys(&tokens);
    assert_eq!(keys.len(), tokens.len());
    // Every block but one a little past the first request's keys.
    let gap = KEYS_PER_REQUEST + 37;
    for (at, chunk) in keys.chunks(1000).enumerate() {
        let items = chunk
            .iter()
            .enumerate()
            .filter(|(i, _)| at * 1000 + i != gap)
            .map(|(_, k)| PutItem {
                key: Bytes::copy_from_slice(k),
                parent: None,
                payload: Bytes::from(vec![7u8; block_bytes]),
            })
            .collect();
        r.client.batch_put(&ns, items).await.expect("put");
    }
    let (matched, tiers) = store.lookup(&keys).await.expect("lookup");
    assert_eq!(matched, gap);
    assert_eq!(tiers.len(), gap);
    // Up to the first request's end only, and exactly all of a prefix that
    // ends on a request's boundary.
    assert_eq!(
        store.lookup(&keys[..KEYS_PER_REQUEST]).await.unwrap().0,
        KEYS_PER_REQUEST
    );
    assert_eq!(store.lookup(&keys[..gap]).await.unwrap().0, gap);
    let (m, t) = store.lookup(&keys[gap + 1..]).await.expect("lookup");
    assert_eq!((m, t.len()), (keys.len() - gap - 1, keys.len() - gap - 1));
    assert_eq!(store.lookup(&[]).await.unwrap().0, 0);
    // Deletes and evicts of as many keys go through too (the client splits
    // them): every stored block deleted, counted across the requests.
    let deleted = r.client.delete(&ns, &keys).await.expect("delete").deleted;
    assert_eq!(deleted as usize, keys.len() - 1);
    assert_eq!(store.lookup(&keys).await.unwrap().0, 0);
    let evicted = r.client.evict(&ns, &keys, false).await.expect("evict");
    assert_eq!((evicted.evicted, evicted.skipped_pinned), (0, 0));
}

/// A daemon with a smaller `server.max_batch` says so when a namespace is
/// registered, and the client's lookups, deletes and evicts then go in
/// requests of that many keys (a longer request would be refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_splits_at_the_max_batch_the_daemon_gives() {
    const SMALL: usize = 100;
    let r = engine_daemon::start_daemon_with_max_batch(SMALL).await;
    assert_eq!(r.client.max_batch(), kvstrata_client::MAX_BATCH);
    let (store, block_bytes) = tiny_store(&r.client, "small-batch").await;
    assert_eq!(r.client.max_batch(), SMALL, "learnt from the registration");
    let ns = *store.namespace_id();
    let tokens: Vec<u32> = (0..(2 * SMALL + 50) as u32).collect();
    let keys = store.keys(&tokens);
    for chunk in keys.chunks(SMALL) {
        let items = chunk
            .iter()
            .map(|k| PutItem {
                key: Bytes::copy_from_slice(k),
                parent: None,
                payload: Bytes::from(vec![3u8; block_bytes]),
            })
            .collect();
        r.client.batch_put(&ns, items).await.expect("put");
    }
    assert_eq!(store.lookup(&keys).await.expect("lookup").0, keys.len());
    let deleted = r.client.delete(&ns, &keys).await.expect("delete").deleted;
    assert_eq!(deleted as usize, keys.len());
    let evicted = r.client.evict(&ns, &keys, false).await.expect("evict");
    assert_eq!((evicted.evicted, evicted.skipped_pinned), (0, 0));
    // Without the split, the daemon refuses a request this long: a fresh
    // client (no registration answer yet) sends 101 keys in one.
    let fresh = kvstrata_client::Client::connect(&r.target)
        .await
        .expect("connect");
    let err = fresh
        .lookup(&ns, &keys[..SMALL + 1])
        .await
        .expect_err("101 keys in one request");
    assert!(err.to_string().contains("keys"), "{err}");
}
