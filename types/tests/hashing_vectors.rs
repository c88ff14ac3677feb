//! Checks every test vector of `docs/hashing.md` against the code, so the spec and
//! the implementation cannot drift apart.
//!
//! Vectors are fenced code blocks with the info string `vector`, one `field = value`
//! per line. Inputs: the namespace spec fields and `tokens` lists; outputs:
//! `encoding`, `namespace_id`, `block_bytes` and, after each `tokens` line, one
//! `key` line per full block. Every vector is also checked by the Python reference
//! implementation of the doc (python-xxhash); a failing assertion here shows the
//! value the Rust code computes.

use std::path::PathBuf;

use kvstrata_types::hash::{block_keys, next_block_key};
use kvstrata_types::{Dtype, Layout, NamespaceSpec};

#[derive(Debug, Default)]
struct Vector {
    name: String,
    fields: Vec<(String, String)>,
    /// Each token list with the keys the doc gives for it.
    cases: Vec<(String, Vec<u32>, Vec<String>)>,
}

impl Vector {
    fn get(&self, field: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == field)
            .map(|(_, v)| v.as_str())
    }

    fn req(&self, field: &str) -> &str {
        self.get(field)
            .unwrap_or_else(|| panic!("vector {}: missing field {field}", self.name))
    }

    fn num<T: std::str::FromStr>(&self, field: &str) -> T {
        self.req(field)
            .parse()
            .unwrap_or_else(|_| panic!("vector {}: {field} is not a number", self.name))
    }

    fn spec(&self) -> NamespaceSpec {
        NamespaceSpec {
            model_id: self.req("model_id").to_string(),
            model_fingerprint: hex::decode(self.get("model_fingerprint").unwrap_or(""))
                .expect("model_fingerprint is hex"),
            num_layers: self.num("num_layers"),
            num_kv_heads: self.num("num_kv_heads"),
            head_dim: self.num("head_dim"),
            dtype: Dtype::parse(self.req("dtype")).expect("known dtype"),
            block_tokens: self.num("block_tokens"),
            layout: match self.req("layout") {
                "layer_major" => Layout::LayerMajor,
                "opaque" => Layout::Opaque,
                other => panic!("vector {}: unknown layout {other}", self.name),
            },
            tp_rank: self.num("tp_rank"),
            tp_size: self.num("tp_size"),
            opaque_block_bytes: self.num("opaque_block_bytes"),
        }
    }
}

fn parse_tokens(s: &str) -> Vec<u32> {
    if let Some((a, b)) = s.split_once("..") {
        let (a, b): (u32, u32) = (a.trim().parse().unwrap(), b.trim().parse().unwrap());
        return (a..b).collect();
    }
    s.split(',').map(|t| t.trim().parse().unwrap()).collect()
}

fn doc() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/hashing.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn vectors(doc: &str) -> Vec<Vector> {
    let mut out = Vec::new();
    let mut cur: Option<Vector> = None;
    for (n, raw) in doc.lines().enumerate() {
        let line = raw.trim();
        match &mut cur {
            None if line == "```vector" => cur = Some(Vector::default()),
            None => {}
            Some(_) if line == "```" => out.extend(cur.take()),
            Some(v) => {
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let (k, val) = line.split_once('=').unwrap_or_else(|| {
                    panic!("docs/hashing.md:{}: expected `field = value`", n + 1)
                });
                let (k, val) = (k.trim().to_string(), val.trim().to_string());
                match k.as_str() {
                    "name" => v.name = val,
                    "tokens" => v.cases.push((val.clone(), parse_tokens(&val), Vec::new())),
                    "key" => v
                        .cases
                        .last_mut()
                        .unwrap_or_else(|| panic!("docs/hashing.md:{}: key before tokens", n + 1))
                        .2
                        .push(val),
                    _ => v.fields.push((k, val)),
                }
            }
        }
    }
    assert!(cur.is_none(), "unterminated vector block");
    out
}

#[test]
fn doc_vectors_match_the_code() {
    let doc = doc();
    let vs = vectors(&doc);
    assert!(vs.len() >= 2, "docs/hashing.md has {} vectors", vs.len());
    let mut keys_checked = 0;
    for v in &vs {
        assert!(!v.name.is_empty(), "a vector has no name");
        let spec = v.spec();
        assert_eq!(
            hex::encode(spec.canonical_encoding()),
            v.req("encoding"),
            "vector {}: canonical encoding",
            v.name
        );
        let id = spec.id().expect("valid spec");
        assert_eq!(
            id.to_hex(),
            v.req("namespace_id"),
            "vector {}: namespace id",
            v.name
        );
        assert_eq!(
            spec.block_bytes().unwrap(),
            v.num::<u64>("block_bytes"),
            "vector {}: block_bytes",
            v.name
        );
        assert!(!v.cases.is_empty(), "vector {} has no tokens", v.name);
        for (src, tokens, keys) in &v.cases {
            let got: Vec<String> = block_keys(&id, tokens, spec.block_tokens as usize)
                .iter()
                .map(hex::encode)
                .collect();
            assert_eq!(&got, keys, "vector {}: keys of tokens {src}", v.name);
            // The chain, step by step.
            let mut h = *id.as_bytes();
            for (i, block) in tokens.chunks_exact(spec.block_tokens as usize).enumerate() {
                h = next_block_key(&h, block);
                assert_eq!(hex::encode(h), keys[i]);
            }
            keys_checked += keys.len();
        }
    }
    assert!(keys_checked >= 6);
    // The default model's namespace is among the vectors.
    let smollm = NamespaceSpec::layer_major("SmolLM2-135M-Instruct", 30, 3, 64, Dtype::F16, 16);
    assert!(
        vs.iter().any(|v| v.spec() == smollm),
        "no vector for the SmolLM2 default namespace"
    );
}
