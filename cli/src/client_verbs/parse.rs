//! Pure helpers of the CLI: key and namespace arguments, tiers, dtypes, payload fill.

use bytes::Bytes;
use kvstrata_proto::v1 as proto;
use kvstrata_types::{BlockKey, Dtype, Layout, NamespaceId, NamespaceSpec};

use super::{CliError, RegisterArgs, TierArg};

/// Parses a KEY argument: `hex:<digits>` for binary keys, otherwise the UTF-8 text
/// itself. The result is 1 to 64 bytes.
pub fn parse_key(arg: &str) -> Result<Bytes, CliError> {
    let invalid = |reason: String| CliError::InvalidKey {
        arg: arg.to_string(),
        reason,
    };
    let bytes = match arg.strip_prefix("hex:") {
        Some(digits) => hex::decode(digits).map_err(|e| invalid(format!("bad hex: {e}")))?,
        None => arg.as_bytes().to_vec(),
    };
    BlockKey::new("key", &bytes).map_err(|e| invalid(e.to_string()))?;
    Ok(Bytes::from(bytes))
}

/// Parses every KEY argument.
pub fn parse_keys(args: &[String]) -> Result<Vec<Bytes>, CliError> {
    args.iter().map(|a| parse_key(a)).collect()
}

/// A namespace argument: an id (32 hex digits) or a model id to resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NsArg {
    Id(NamespaceId),
    Model(String),
}

impl NsArg {
    /// 32 hex digits are an id; anything else is a model id.
    pub fn parse(arg: &str) -> NsArg {
        let t = arg.trim();
        if t.len() == 32
            && t.bytes().all(|b| b.is_ascii_hexdigit())
            && let Some(id) = NamespaceId::from_hex(t)
        {
            return NsArg::Id(id);
        }
        NsArg::Model(arg.to_string())
    }
}

/// The id of the one namespace whose `model_id` is exactly `model`.
pub fn resolve_model(
    model: &str,
    namespaces: &[proto::NamespaceInfo],
) -> Result<NamespaceId, CliError> {
    let matches: Vec<&proto::NamespaceInfo> = namespaces
        .iter()
        .filter(|n| n.spec.as_ref().is_some_and(|s| s.model_id == model))
        .collect();
    match matches.as_slice() {
        [] => Err(CliError::Namespace(format!(
            "no registered namespace has model_id {model:?} (pass a model id or a 32-hex-digit namespace id; `ns ls` lists them)"
        ))),
        [one] => ns_id_of(one),
        many => {
            let ids: Vec<String> = many.iter().map(|n| hex::encode(&n.namespace_id)).collect();
            Err(CliError::Namespace(format!(
                "model_id {model:?} names {} namespaces ({}): pass the namespace id instead",
                many.len(),
                ids.join(", ")
            )))
        }
    }
}

/// The namespace with id `id` in a ListNamespaces answer.
pub fn find_namespace<'a>(
    id: &NamespaceId,
    namespaces: &'a [proto::NamespaceInfo],
) -> Option<&'a proto::NamespaceInfo> {
    namespaces
        .iter()
        .find(|n| n.namespace_id.as_ref() == id.as_bytes())
}

/// The id of a namespace of a ListNamespaces answer.
pub fn ns_id_of(info: &proto::NamespaceInfo) -> Result<NamespaceId, CliError> {
    NamespaceId::from_slice("namespace_id", &info.namespace_id)
        .map_err(|e| CliError::InvalidResponse(e.to_string()))
}

/// Parses a `--dtype` value (`f16`, `bf16`, `f32`, `fp8_e4m3`, `fp8_e5m2`, `int8`).
pub fn parse_dtype(s: &str) -> Result<Dtype, String> {
    Dtype::parse(s).ok_or_else(|| {
        format!("unknown dtype {s:?} (expected f16, bf16, f32, fp8_e4m3, fp8_e5m2 or int8)")
    })
}

/// The spec that `ns register` sends. `--opaque-bytes` switches to the opaque layout.
pub fn spec_from_args(a: &RegisterArgs) -> Result<NamespaceSpec, CliError> {
    let model_fingerprint = match &a.fingerprint {
        Some(h) => hex::decode(h.trim()).map_err(|e| {
            CliError::InvalidArgument(format!("--fingerprint {h:?}: not hex ({e})"))
        })?,
        None => Vec::new(),
    };
    let (layout, opaque_block_bytes) = match a.opaque_bytes {
        Some(n) => (Layout::Opaque, n),
        None => (Layout::LayerMajor, 0),
    };
    Ok(NamespaceSpec {
        model_id: a.model.clone(),
        model_fingerprint,
        num_layers: a.layers,
        num_kv_heads: a.kv_heads,
        head_dim: a.head_dim,
        dtype: a.dtype,
        block_tokens: a.block_tokens,
        layout,
        tp_rank: a.tp_rank,
        tp_size: a.tp_size,
        opaque_block_bytes,
    })
}

impl From<TierArg> for proto::Tier {
    fn from(t: TierArg) -> Self {
        match t {
            TierArg::Hbm => proto::Tier::Hbm,
            TierArg::Host => proto::Tier::Host,
            TierArg::Disk => proto::Tier::Disk,
        }
    }
}

/// `len` deterministic pseudo-random bytes for `put --fill-seed`: the SplitMix64
/// sequence started at `seed`, each output written as 8 little-endian bytes (the
/// last word cut short when `len` is not a multiple of 8).
pub fn fill_payload(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(model: &str, id: u8) -> proto::NamespaceInfo {
        proto::NamespaceInfo {
            namespace_id: Bytes::from(vec![id; 16]),
            spec: Some(proto::NamespaceSpec {
                model_id: model.to_string(),
                ..Default::default()
            }),
            block_bytes: 1024,
            policy: None,
        }
    }

    #[test]
    fn keys_text_and_hex() {
        assert_eq!(&parse_key("block-1").unwrap()[..], b"block-1");
        assert_eq!(&parse_key("hex:00ff10").unwrap()[..], &[0, 0xff, 0x10]);
        assert_eq!(&parse_key("hex:ABCD").unwrap()[..], &[0xab, 0xcd]);
        assert_eq!(
            &parse_key("HEX:00").unwrap()[..],
            b"HEX:00",
            "the prefix is lowercase"
        );
        for bad in [
            "",
            "hex:",
            "hex:0",
            "hex:zz",
            &"x".repeat(65),
            &format!("hex:{}", "00".repeat(65)),
        ] {
            let e = parse_key(bad).unwrap_err();
            assert!(matches!(e, CliError::InvalidKey { .. }), "{bad:?}: {e:?}");
        }
        assert_eq!(parse_key(&"x".repeat(64)).unwrap().len(), 64);
    }

    #[test]
    fn keys_round_trip_through_display() {
        for bytes in [
            &b"plain"[..],
            &[0u8, 1, 2][..],
            b"hex:looks-like-hex",
            b"with space",
        ] {
            let shown = BlockKey::display(bytes);
            assert_eq!(&parse_key(&shown).unwrap()[..], bytes, "{shown}");
        }
    }

    #[test]
    fn ns_arg_forms() {
        let hex = "00112233445566778899aabbccddeeff";
        assert_eq!(
            NsArg::parse(hex),
            NsArg::Id(NamespaceId::from_hex(hex).unwrap())
        );
        assert_eq!(
            NsArg::parse(&hex.to_uppercase()),
            NsArg::Id(NamespaceId::from_hex(hex).unwrap())
        );
        assert_eq!(
            NsArg::parse("SmolLM2-135M-Instruct"),
            NsArg::Model("SmolLM2-135M-Instruct".into())
        );
        assert_eq!(NsArg::parse(&hex[..31]), NsArg::Model(hex[..31].into()));
    }

    #[test]
    fn model_resolution() {
        let list = vec![info("a", 1), info("b", 2), info("b", 3)];
        assert_eq!(resolve_model("a", &list).unwrap(), NamespaceId([1; 16]));
        let e = resolve_model("b", &list).unwrap_err().to_string();
        assert!(
            e.contains("2 namespaces") && e.contains(&hex::encode([2u8; 16])),
            "{e}"
        );
        let e = resolve_model("c", &list).unwrap_err().to_string();
        assert!(e.contains("no registered namespace"), "{e}");
        assert!(
            resolve_model("A", &list).is_err(),
            "model ids match exactly"
        );
        assert_eq!(
            find_namespace(&NamespaceId([3; 16]), &list)
                .unwrap()
                .namespace_id[0],
            3
        );
        assert!(find_namespace(&NamespaceId([9; 16]), &list).is_none());
    }

    #[test]
    fn fill_is_deterministic_splitmix64() {
        let a = fill_payload(7, 1000);
        assert_eq!(a.len(), 1000);
        assert_eq!(a, fill_payload(7, 1000));
        assert_ne!(a, fill_payload(8, 1000));
        assert_eq!(&fill_payload(7, 13)[..], &a[..13]);
        // First SplitMix64 output for seed 0 (reference value of the algorithm).
        assert_eq!(fill_payload(0, 8), 0xE220_A839_7B1D_CDAFu64.to_le_bytes());
    }

    #[test]
    fn dtypes() {
        assert_eq!(parse_dtype("bf16").unwrap(), Dtype::Bf16);
        assert_eq!(parse_dtype("FP8_E4M3").unwrap(), Dtype::Fp8E4m3);
        assert!(parse_dtype("f64").unwrap_err().contains("f16"));
    }
}
