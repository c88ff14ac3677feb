//! Namespaces: one KV geometry each, identified by a hash of a canonical encoding.
//!
//! The canonical encoding is specified byte for byte in `docs/hashing.md`; the
//! id is `xxh3_128` of it, written as 16 little-endian bytes. Two specs that
//! differ in any field (model fingerprint included) get different ids, so a
//! changed checkpoint or geometry can never hit old KV.

use std::fmt;

use crate::error::InvalidField;

/// Magic prefix of the canonical namespace encoding (format version 1).
pub const NAMESPACE_ENCODING_MAGIC: &[u8] = b"kvstrata-namespace-v1";
/// Longest accepted `model_id`, in bytes.
pub const MAX_MODEL_ID_BYTES: usize = 256;
/// Longest accepted `model_fingerprint`, in bytes.
pub const MAX_FINGERPRINT_BYTES: usize = 64;
/// Largest block accepted by any namespace (1 GiB).
pub const MAX_BLOCK_BYTES: u64 = 1 << 30;

/// Element type of the KV tensors. Codes are the wire enum values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    F16 = 1,
    Bf16 = 2,
    F32 = 3,
    Fp8E4m3 = 4,
    Fp8E5m2 = 5,
    Int8 = 6,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::F32 => 4,
            Dtype::Fp8E4m3 | Dtype::Fp8E5m2 | Dtype::Int8 => 1,
        }
    }

    /// From the wire enum value; `None` for unspecified or unknown values.
    pub fn from_code(code: i32) -> Option<Self> {
        Some(match code {
            1 => Dtype::F16,
            2 => Dtype::Bf16,
            3 => Dtype::F32,
            4 => Dtype::Fp8E4m3,
            5 => Dtype::Fp8E5m2,
            6 => Dtype::Int8,
            _ => return None,
        })
    }

    /// Short lowercase name (`f16`, `bf16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
            Dtype::F32 => "f32",
            Dtype::Fp8E4m3 => "fp8_e4m3",
            Dtype::Fp8E5m2 => "fp8_e5m2",
            Dtype::Int8 => "int8",
        }
    }

    /// Parses a short name as printed by [`Dtype::name`].
    pub fn parse(name: &str) -> Option<Self> {
        [
            Dtype::F16,
            Dtype::Bf16,
            Dtype::F32,
            Dtype::Fp8E4m3,
            Dtype::Fp8E5m2,
            Dtype::Int8,
        ]
        .into_iter()
        .find(|d| d.name().eq_ignore_ascii_case(name))
    }
}

/// Byte layout of a block's payload. Codes are the wire enum values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// `[layer][K|V][token][kv_head][head_dim]`.
    LayerMajor = 1,
    /// Opaque bytes of a size given by the spec.
    Opaque = 2,
}

impl Layout {
    /// From the wire enum value; `None` for unspecified or unknown values.
    pub fn from_code(code: i32) -> Option<Self> {
        match code {
            1 => Some(Layout::LayerMajor),
            2 => Some(Layout::Opaque),
            _ => None,
        }
    }
}

/// A KV geometry. Build one, call [`NamespaceSpec::validate`] (done by
/// [`NamespaceSpec::id`] too), and use the id in every request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NamespaceSpec {
    pub model_id: String,
    pub model_fingerprint: Vec<u8>,
    pub num_layers: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    pub dtype: Dtype,
    pub block_tokens: u32,
    pub layout: Layout,
    pub tp_rank: u32,
    /// Tensor-parallel size; 0 is read as 1.
    pub tp_size: u32,
    /// Only for [`Layout::Opaque`]: the fixed payload size; 0 otherwise.
    pub opaque_block_bytes: u64,
}

impl NamespaceSpec {
    /// A layer-major spec with tensor parallelism 1 and no fingerprint.
    pub fn layer_major(
        model_id: impl Into<String>,
        num_layers: u32,
        num_kv_heads: u32,
        head_dim: u32,
        dtype: Dtype,
        block_tokens: u32,
    ) -> Self {
        NamespaceSpec {
            model_id: model_id.into(),
            model_fingerprint: Vec::new(),
            num_layers,
            num_kv_heads,
            head_dim,
            dtype,
            block_tokens,
            layout: Layout::LayerMajor,
            tp_rank: 0,
            tp_size: 1,
            opaque_block_bytes: 0,
        }
    }

    /// The spec with defaults filled in (`tp_size` 0 becomes 1).
    pub fn normalized(&self) -> Self {
        let mut s = self.clone();
        if s.tp_size == 0 {
            s.tp_size = 1;
        }
        s
    }

    /// Checks every field; the error names the first bad one (`spec.<field>`).
    pub fn validate(&self) -> Result<(), InvalidField> {
        let s = self.normalized();
        let bad = |field: &'static str, reason: String| Err(InvalidField::new(field, reason));
        if s.model_id.is_empty() {
            return bad("spec.model_id", "must not be empty".into());
        }
        if s.model_id.len() > MAX_MODEL_ID_BYTES {
            return bad(
                "spec.model_id",
                format!("{} bytes, at most {MAX_MODEL_ID_BYTES}", s.model_id.len()),
            );
        }
        if s.model_fingerprint.len() > MAX_FINGERPRINT_BYTES {
            return bad(
                "spec.model_fingerprint",
                format!(
                    "{} bytes, at most {MAX_FINGERPRINT_BYTES}",
                    s.model_fingerprint.len()
                ),
            );
        }
        if s.tp_rank >= s.tp_size {
            return bad(
                "spec.tp_rank",
                format!("{} must be below tp_size {}", s.tp_rank, s.tp_size),
            );
        }
        match s.layout {
            Layout::LayerMajor => {
                for (field, v) in [
                    ("spec.num_layers", s.num_layers),
                    ("spec.num_kv_heads", s.num_kv_heads),
                    ("spec.head_dim", s.head_dim),
                    ("spec.block_tokens", s.block_tokens),
                ] {
                    if v == 0 {
                        return bad(field, "must be at least 1".into());
                    }
                }
                if s.opaque_block_bytes != 0 {
                    return bad(
                        "spec.opaque_block_bytes",
                        "must be 0 for the layer-major layout".into(),
                    );
                }
            }
            Layout::Opaque => {
                if s.opaque_block_bytes == 0 {
                    return bad(
                        "spec.opaque_block_bytes",
                        "must be at least 1 for the opaque layout".into(),
                    );
                }
            }
        }
        match s.raw_block_bytes() {
            Some(b) if b <= MAX_BLOCK_BYTES => Ok(()),
            Some(b) => bad(
                "spec",
                format!("block of {b} bytes exceeds the limit of {MAX_BLOCK_BYTES} bytes"),
            ),
            None => bad("spec", "block size overflows".into()),
        }
    }

    fn raw_block_bytes(&self) -> Option<u64> {
        match self.layout {
            Layout::Opaque => Some(self.opaque_block_bytes),
            Layout::LayerMajor => (self.num_layers as u64)
                .checked_mul(2)?
                .checked_mul(self.block_tokens as u64)?
                .checked_mul(self.num_kv_heads as u64)?
                .checked_mul(self.head_dim as u64)?
                .checked_mul(self.dtype.size()),
        }
    }

    /// Payload bytes of one block: `layers*2*tokens*heads*dim*dtype_size` for
    /// the layer-major layout, `opaque_block_bytes` for the opaque one.
    pub fn block_bytes(&self) -> Result<u64, InvalidField> {
        self.validate()?;
        self.raw_block_bytes()
            .ok_or_else(|| InvalidField::new("spec", "block size overflows"))
    }

    /// The canonical encoding (docs/hashing.md). The spec is normalized first.
    pub fn canonical_encoding(&self) -> Vec<u8> {
        let s = self.normalized();
        let mut out = Vec::with_capacity(NAMESPACE_ENCODING_MAGIC.len() + 64 + s.model_id.len());
        out.extend_from_slice(NAMESPACE_ENCODING_MAGIC);
        out.extend_from_slice(&(s.model_id.len() as u32).to_le_bytes());
        out.extend_from_slice(s.model_id.as_bytes());
        out.extend_from_slice(&(s.model_fingerprint.len() as u32).to_le_bytes());
        out.extend_from_slice(&s.model_fingerprint);
        for v in [s.num_layers, s.num_kv_heads, s.head_dim] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.push(s.dtype as u8);
        out.extend_from_slice(&s.block_tokens.to_le_bytes());
        out.push(s.layout as u8);
        out.extend_from_slice(&s.tp_rank.to_le_bytes());
        out.extend_from_slice(&s.tp_size.to_le_bytes());
        out.extend_from_slice(&s.opaque_block_bytes.to_le_bytes());
        out
    }

    /// Decodes [`NamespaceSpec::canonical_encoding`]; `None` if the bytes are
    /// not one (wrong magic, truncated, trailing bytes, unknown codes, a
    /// `tp_size` of 0, which the encoding writes as 1).
    pub fn from_canonical_encoding(bytes: &[u8]) -> Option<Self> {
        let mut r = bytes.strip_prefix(NAMESPACE_ENCODING_MAGIC)?;
        fn take<'a>(r: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            let (head, tail) = r.split_at_checked(n)?;
            *r = tail;
            Some(head)
        }
        fn u32_of(r: &mut &[u8]) -> Option<u32> {
            Some(u32::from_le_bytes(take(r, 4)?.try_into().ok()?))
        }
        let n = u32_of(&mut r)? as usize;
        let model_id = String::from_utf8(take(&mut r, n)?.to_vec()).ok()?;
        let n = u32_of(&mut r)? as usize;
        let model_fingerprint = take(&mut r, n)?.to_vec();
        let num_layers = u32_of(&mut r)?;
        let num_kv_heads = u32_of(&mut r)?;
        let head_dim = u32_of(&mut r)?;
        let dtype = Dtype::from_code(i32::from(*take(&mut r, 1)?.first()?))?;
        let block_tokens = u32_of(&mut r)?;
        let layout = Layout::from_code(i32::from(*take(&mut r, 1)?.first()?))?;
        let tp_rank = u32_of(&mut r)?;
        let tp_size = u32_of(&mut r)?;
        let opaque_block_bytes = u64::from_le_bytes(take(&mut r, 8)?.try_into().ok()?);
        (r.is_empty() && tp_size != 0).then_some(NamespaceSpec {
            model_id,
            model_fingerprint,
            num_layers,
            num_kv_heads,
            head_dim,
            dtype,
            block_tokens,
            layout,
            tp_rank,
            tp_size,
            opaque_block_bytes,
        })
    }

    /// The namespace id: `xxh3_128(canonical_encoding)` as 16 little-endian bytes.
    pub fn id(&self) -> Result<NamespaceId, InvalidField> {
        self.validate()?;
        Ok(NamespaceId(
            xxhash_rust::xxh3::xxh3_128(&self.canonical_encoding()).to_le_bytes(),
        ))
    }
}

/// 16-byte namespace id. Shown as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct NamespaceId(pub [u8; 16]);

impl NamespaceId {
    /// From wire bytes; the error names `field`.
    pub fn from_slice(field: &str, bytes: &[u8]) -> Result<Self, InvalidField> {
        let arr: [u8; 16] = bytes.try_into().map_err(|_| {
            InvalidField::new(
                field,
                format!("namespace id must be 16 bytes, got {}", bytes.len()),
            )
        })?;
        Ok(NamespaceId(arr))
    }

    /// Parses 32 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let v = hex::decode(s.trim()).ok()?;
        Some(NamespaceId(v.try_into().ok()?))
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for NamespaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for NamespaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NamespaceId({})", self.to_hex())
    }
}

/// How the cache treats a namespace's blocks. Not part of the identity: a
/// namespace registered again with another policy keeps its id and blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NamespacePolicy {
    /// Every put is also written to the disk tier in the background.
    pub write_through: bool,
    /// Every put is also written to the remote tier in the background.
    pub remote_write_through: bool,
    /// Every put is written to the disk tier before it is acknowledged (a
    /// synchronous write-through, whatever `write_through` says): an
    /// acknowledged block survives a crash of the daemon at once. A put
    /// whose disk write fails is not stored.
    pub sync_write_through: bool,
}

impl NamespacePolicy {
    /// Whether puts are written to the disk tier (in the background or
    /// before the acknowledgement).
    pub fn writes_to_disk(&self) -> bool {
        self.write_through || self.sync_write_through
    }
}

/// A registered namespace: its spec, id, block size and policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub id: NamespaceId,
    pub spec: NamespaceSpec,
    pub block_bytes: u64,
    pub policy: NamespacePolicy,
}

/// Magic of a persisted namespace record ([`Namespace::record`]).
const RECORD_MAGIC: &[u8] = b"kvsns1";

impl Namespace {
    /// Validates the spec and derives id and block size.
    pub fn new(spec: NamespaceSpec) -> Result<Self, InvalidField> {
        let spec = spec.normalized();
        let id = spec.id()?;
        let block_bytes = spec.block_bytes()?;
        Ok(Namespace {
            id,
            spec,
            block_bytes,
            policy: NamespacePolicy::default(),
        })
    }

    /// The persisted form: magic, a flags byte (bit 0: write-through, bit
    /// 1: remote write-through, bit 2: sync write-through), then the spec's
    /// canonical encoding.
    pub fn record(&self) -> Vec<u8> {
        let mut out = RECORD_MAGIC.to_vec();
        let p = &self.policy;
        out.push(
            u8::from(p.write_through)
                | (u8::from(p.remote_write_through) << 1)
                | (u8::from(p.sync_write_through) << 2),
        );
        out.extend_from_slice(&self.spec.canonical_encoding());
        out
    }

    /// Decodes [`Namespace::record`]; `None` if it is not one (unknown flag
    /// bits included) or its spec is invalid.
    pub fn from_record(bytes: &[u8]) -> Option<Self> {
        let rest = bytes.strip_prefix(RECORD_MAGIC)?;
        let (&flags, enc) = rest.split_first()?;
        if flags & !7 != 0 {
            return None;
        }
        let spec = NamespaceSpec::from_canonical_encoding(enc)?;
        let mut ns = Namespace::new(spec).ok()?;
        ns.policy.write_through = flags & 1 != 0;
        ns.policy.remote_write_through = flags & 2 != 0;
        ns.policy.sync_write_through = flags & 4 != 0;
        Some(ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm() -> NamespaceSpec {
        NamespaceSpec::layer_major("SmolLM2-135M-Instruct", 30, 3, 64, Dtype::F16, 16)
    }

    #[test]
    fn block_bytes_follow_geometry() {
        // 30 layers * 2 * 16 tokens * 3 heads * 64 dims * 2 bytes = 23,040 bytes per token * 16.
        assert_eq!(smollm().block_bytes().unwrap(), 23_040 * 16);
    }

    #[test]
    fn canonical_encoding_decodes_back() {
        let mut opaque = NamespaceSpec::layer_major("m", 1, 1, 8, Dtype::Bf16, 4);
        opaque.layout = Layout::Opaque;
        opaque.opaque_block_bytes = 4096;
        opaque.model_fingerprint = vec![7; 32];
        for spec in [smollm().normalized(), opaque.normalized()] {
            let enc = spec.canonical_encoding();
            assert_eq!(NamespaceSpec::from_canonical_encoding(&enc), Some(spec));
            assert_eq!(
                NamespaceSpec::from_canonical_encoding(&enc[..enc.len() - 1]),
                None
            );
            let mut longer = enc.clone();
            longer.push(0);
            assert_eq!(NamespaceSpec::from_canonical_encoding(&longer), None);
        }
    }

    #[test]
    fn namespace_record_round_trips() {
        let mut ns = Namespace::new(smollm()).unwrap();
        ns.policy.write_through = true;
        assert_eq!(Namespace::from_record(&ns.record()), Some(ns.clone()));
        ns.policy.remote_write_through = true;
        assert_eq!(Namespace::from_record(&ns.record()), Some(ns.clone()));
        ns.policy.write_through = false;
        assert_eq!(Namespace::from_record(&ns.record()), Some(ns.clone()));
        ns.policy.sync_write_through = true;
        assert_eq!(Namespace::from_record(&ns.record()), Some(ns.clone()));
        let mut unknown = ns.record();
        unknown[RECORD_MAGIC.len()] |= 8;
        assert_eq!(Namespace::from_record(&unknown), None);
        assert_eq!(Namespace::from_record(&ns.record()[1..]), None);
    }

    #[test]
    fn every_field_changes_the_id() {
        let base = smollm().id().unwrap();
        let mut variants = Vec::new();
        let mut s = smollm();
        s.model_id.push('x');
        variants.push(s);
        let mut s = smollm();
        s.model_fingerprint = vec![1];
        variants.push(s);
        let mut s = smollm();
        s.num_layers += 1;
        variants.push(s);
        let mut s = smollm();
        s.num_kv_heads += 1;
        variants.push(s);
        let mut s = smollm();
        s.head_dim += 1;
        variants.push(s);
        let mut s = smollm();
        s.dtype = Dtype::Bf16;
        variants.push(s);
        let mut s = smollm();
        s.block_tokens += 1;
        variants.push(s);
        let mut s = smollm();
        s.tp_size = 2;
        variants.push(s.clone());
        s.tp_rank = 1;
        variants.push(s);
        let mut ids: Vec<_> = variants.iter().map(|v| v.id().unwrap()).collect();
        ids.push(base);
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n, "two specs share an id");
    }

    #[test]
    fn tp_size_zero_means_one() {
        let mut s = smollm();
        s.tp_size = 0;
        assert_eq!(s.id().unwrap(), smollm().id().unwrap());
    }

    #[test]
    fn bad_specs_name_the_field() {
        let mut s = smollm();
        s.model_id.clear();
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("spec.model_id")
        );
        let mut s = smollm();
        s.head_dim = 0;
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("spec.head_dim")
        );
        let mut s = smollm();
        s.tp_rank = 1;
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("spec.tp_rank")
        );
        let mut s = smollm();
        s.num_layers = u32::MAX;
        s.num_kv_heads = u32::MAX;
        assert!(s.validate().is_err());
    }
}
