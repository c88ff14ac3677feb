//! Property-based fuzzing of the GGUF metadata readers we wrote: candle parses
//! the GGUF container (`gguf_file::Content::read`, not ours, not fuzzed here);
//! our code turns its metadata into a tokenizer (`Tokenizer::from_gguf`) and a
//! model configuration (`LlamaConfig::from_gguf`, reached through
//! `LlamaModel::from_gguf`). A GGUF is untrusted input (a user may point the engines
//! at any file), so random metadata — missing keys, wrong value types,
//! negative or huge numbers, ids outside the vocabulary, merges that are not
//! `a b`, mixed arrays, head counts that do not divide — must give an error,
//! never a panic. A tokenizer that builds must encode and decode without
//! panicking; `LlamaModel::from_gguf` over a file without tensors must fail.
//!
//! Case count: `PROPTEST_CASES` (default 1000 here); the execution count is
//! printed.

use std::collections::HashMap;
use std::io::BufReader;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use kvstrata_engine::model::LlamaModel;
use kvstrata_engine::tokenizer::Tokenizer;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, TestRunner};

fn cases(ci_default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ci_default)
}

fn arb_scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<u8>().prop_map(Value::U8),
        any::<i8>().prop_map(Value::I8),
        any::<u16>().prop_map(Value::U16),
        any::<i16>().prop_map(Value::I16),
        any::<u32>().prop_map(Value::U32),
        any::<i32>().prop_map(Value::I32),
        any::<u64>().prop_map(Value::U64),
        any::<i64>().prop_map(Value::I64),
        any::<f32>().prop_map(Value::F32),
        any::<f64>().prop_map(Value::F64),
        any::<bool>().prop_map(Value::Bool),
        ".{0,12}".prop_map(Value::String),
    ]
}

/// Any value, arrays (nested once) included.
fn arb_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => arb_scalar(),
        1 => vec(arb_scalar(), 0..6).prop_map(Value::Array),
        1 => vec(vec(arb_scalar(), 0..3).prop_map(Value::Array), 0..3).prop_map(Value::Array),
    ]
}

/// A small integer of any integer type (ids, counts), sometimes negative or huge.
fn arb_int(typical: u32) -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => (0..typical).prop_map(Value::U32),
        1 => (0..typical as u64).prop_map(Value::U64),
        1 => (-2i32..typical as i32).prop_map(Value::I32),
        1 => Just(Value::U64(u64::MAX)),
        1 => Just(Value::U32(u32::MAX)),
    ]
}

/// Byte-level token strings: single characters of the GPT-2 byte alphabet and
/// short concatenations, with a few special tokens.
fn arb_tokens() -> impl Strategy<Value = Vec<String>> {
    vec(
        prop_oneof![
            4 => "[a-zĠ]{1,3}",
            1 => Just("<|im_end|>".to_string()),
            1 => Just("<|endoftext|>".to_string()),
            1 => ".{0,4}",
        ],
        0..40,
    )
}

#[derive(Debug)]
struct Meta(HashMap<String, Value>);

fn arb_metadata() -> impl Strategy<Value = Meta> {
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let tok = (
        arb_tokens(),
        vec(("[a-zĠ]{1,2}", "[a-zĠ]{1,2}", any::<bool>()), 0..30),
        vec(0i32..7, 0..45),
        any::<bool>(),
    )
        .prop_map(move |(tokens, merges, types, types_match)| {
            let merges: Vec<String> = merges
                .into_iter()
                .map(|(a, b, spaced)| {
                    if spaced {
                        format!("{a} {b}")
                    } else {
                        format!("{a}{b}")
                    }
                })
                .collect();
            let n = tokens.len();
            let types: Vec<Value> = if types_match {
                (0..n)
                    .map(|i| Value::I32(types.get(i).copied().unwrap_or(1)))
                    .collect()
            } else {
                types.into_iter().map(Value::I32).collect()
            };
            (strings(tokens), strings(merges), Value::Array(types))
        });
    let keyed = |key: &'static str, specific: BoxedStrategy<Value>| {
        (
            Just(key),
            prop_oneof![6 => specific.prop_map(Some), 1 => arb_value().prop_map(Some), 1 => Just(None)],
        )
    };
    let s = |v: &'static [&'static str]| {
        proptest::sample::select(v.to_vec())
            .prop_map(|s| Value::String(s.to_string()))
            .boxed()
    };
    let fields = (
        (
            keyed("general.architecture", s(&["llama", "gpt2", "mistral"])),
            keyed("tokenizer.ggml.model", s(&["gpt2", "llama", ""])),
            keyed(
                "tokenizer.ggml.pre",
                s(&[
                    "smollm",
                    "gpt2",
                    "default",
                    "llama-bpe",
                    "llama3",
                    "qwen2",
                    "nope",
                ]),
            ),
            keyed("tokenizer.ggml.bos_token_id", arb_int(48).boxed()),
            keyed("tokenizer.ggml.eos_token_id", arb_int(48).boxed()),
            keyed("tokenizer.ggml.unknown_token_id", arb_int(48).boxed()),
            keyed(
                "tokenizer.ggml.add_bos_token",
                any::<bool>().prop_map(Value::Bool).boxed(),
            ),
        ),
        (
            keyed("llama.embedding_length", arb_int(600).boxed()),
            keyed("llama.attention.head_count", arb_int(12).boxed()),
            keyed("llama.attention.head_count_kv", arb_int(12).boxed()),
            keyed("llama.rope.dimension_count", arb_int(130).boxed()),
            keyed("llama.vocab_size", arb_int(50).boxed()),
            keyed("llama.feed_forward_length", arb_int(2000).boxed()),
            keyed("llama.block_count", arb_int(40).boxed()),
            keyed(
                "llama.rope.freq_base",
                any::<f32>().prop_map(Value::F32).boxed(),
            ),
            keyed(
                "llama.attention.layer_norm_rms_epsilon",
                any::<f32>().prop_map(Value::F32).boxed(),
            ),
            keyed("llama.context_length", arb_int(5000).boxed()),
        ),
        tok,
        (any::<bool>(), any::<bool>(), any::<bool>()),
        proptest::option::of(arb_buildable()),
    );
    fields.prop_map(
        |(a, b, (tokens, merges, types), (drop_tokens, drop_merges, drop_types), buildable)| {
            let mut m = HashMap::new();
            let (a0, a1, a2, a3, a4, a5, a6) = a;
            let (b0, b1, b2, b3, b4, b5, b6, b7, b8, b9) = b;
            for (k, v) in [
                a0, a1, a2, a3, a4, a5, a6, b0, b1, b2, b3, b4, b5, b6, b7, b8, b9,
            ] {
                if let Some(v) = v {
                    m.insert(k.to_string(), v);
                }
            }
            for (k, v, drop) in [
                ("tokenizer.ggml.tokens", tokens, drop_tokens),
                ("tokenizer.ggml.merges", merges, drop_merges),
                ("tokenizer.ggml.token_type", types, drop_types),
            ] {
                if !drop {
                    m.insert(k.to_string(), v);
                }
            }
            if let Some(good) = buildable {
                // A consistent tokenizer section, so that building succeeds
                // often and the built tokenizer gets exercised too.
                m.extend(good);
            }
            Meta(m)
        },
    )
}

/// The `tokenizer.ggml.*` keys of a small tokenizer that builds: an alphabet,
/// merges of alphabet pairs whose results are in the vocabulary, matching
/// token types, and ids inside the vocabulary.
fn arb_buildable() -> impl Strategy<Value = Vec<(String, Value)>> {
    const ALPHABET: [&str; 5] = ["a", "b", "c", "Ġ", "1"];
    (
        vec((0usize..5, 0usize..5), 0..12),
        proptest::sample::select(vec!["smollm", "gpt2", "default", "llama-bpe", "qwen2"]),
        (any::<u16>(), any::<u16>(), any::<u16>(), any::<bool>()),
    )
        .prop_map(|(pairs, pre, (bos, eos, unk, add_bos))| {
            let mut tokens: Vec<String> = ALPHABET.iter().map(|s| s.to_string()).collect();
            tokens.push("<|im_end|>".into());
            let mut merges = Vec::new();
            for (x, y) in pairs {
                let merged = format!("{}{}", ALPHABET[x], ALPHABET[y]);
                if !tokens.contains(&merged) {
                    tokens.push(merged);
                    merges.push(format!("{} {}", ALPHABET[x], ALPHABET[y]));
                }
            }
            let n = tokens.len() as u32;
            let types: Vec<Value> = tokens
                .iter()
                .map(|t| Value::I32(if t.starts_with("<|") { 3 } else { 1 }))
                .collect();
            let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
            vec![
                ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
                ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
                ("tokenizer.ggml.tokens".into(), strings(tokens)),
                ("tokenizer.ggml.merges".into(), strings(merges)),
                ("tokenizer.ggml.token_type".into(), Value::Array(types)),
                (
                    "tokenizer.ggml.bos_token_id".into(),
                    Value::U32(u32::from(bos) % n),
                ),
                (
                    "tokenizer.ggml.eos_token_id".into(),
                    Value::U32(u32::from(eos) % n),
                ),
                (
                    "tokenizer.ggml.unknown_token_id".into(),
                    Value::U32(u32::from(unk) % n),
                ),
                ("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)),
            ]
        })
}

#[test]
fn prop_gguf_metadata_readers_never_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("no-tensors.gguf");
    std::fs::write(&path, b"").expect("write");
    let mut config = ProptestConfig::with_cases(cases(1000));
    config.failure_persistence = Some(Box::new(FileFailurePersistence::Direct(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/proptest-regressions/prop_gguf_metadata.txt"
    ))));
    let executions = AtomicU64::new(0);
    let built = AtomicU64::new(0);
    let start = Instant::now();
    let result = TestRunner::new(config).run(&arb_metadata(), |Meta(metadata)| {
        executions.fetch_add(1, Ordering::Relaxed);
        let ct = Content {
            magic: VersionedMagic::GgufV3,
            metadata,
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        };
        if let Ok(t) = Tokenizer::from_gguf(&ct) {
            built.fetch_add(1, Ordering::Relaxed);
            let vocab = match ct.metadata.get("tokenizer.ggml.tokens") {
                Some(Value::Array(a)) => a.len() as u32,
                _ => 0,
            };
            if let Some(b) = t.bos_id() {
                prop_assert!(b < vocab);
            }
            for &e in t.eos_ids() {
                prop_assert!(e < vocab);
            }
            let _ = t.encode("hello <|im_end|> world ü 123");
            let ids: Vec<u32> = (0..vocab.min(50)).collect();
            let _ = t.decode(&ids, false);
            let _ = t.decode(&ids, true);
        }
        let file = std::fs::File::open(&path).expect("open");
        let r = LlamaModel::from_gguf(&ct, &mut BufReader::new(file), &path);
        prop_assert!(r.is_err(), "a model without tensors loaded");
        Ok(())
    });
    eprintln!(
        "fuzz target gguf/metadata: {} executions in {:.2}s ({} tokenizers built)",
        executions.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64(),
        built.load(Ordering::Relaxed)
    );
    if let Err(e) = result {
        panic!("fuzz target gguf/metadata failed: {e}");
    }
}
