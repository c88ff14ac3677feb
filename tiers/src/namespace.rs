//! Namespaces: one KV geometry each, identified by a hash of a canonical encoding.
//!
//! The canonical encoding is specified byte for byte in `docs/hashing.md`; the
//! id is `xxh3_128` of it, written as 16 little-endian bytes. Two specs that
//! differ in any field (model fingerprint included) get different ids, so a
//! changed checkpoint or geometry can never hit old KV.

use std::fmt;

use crate::error::CacheError;

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
    pub fn validate(&self) -> Result<(), CacheError> {
        let s = self.normalized();
        let bad = |field: &'static str, reason: String| Err(CacheError::invalid(field, reason));
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
    pub fn block_bytes(&self) -> Result<u64, CacheError> {
        self.validate()?;
        self.raw_block_bytes()
            .ok_or_else(|| CacheError::invalid("spec", "block size overflows"))
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

    /// The namespace id: `xxh3_128(canonical_encoding)` as 16 little-endian bytes.
    pub fn id(&self) -> Result<NamespaceId, CacheError> {
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
    pub fn from_slice(field: &str, bytes: &[u8]) -> Result<Self, CacheError> {
        let arr: [u8; 16] = bytes.try_into().map_err(|_| {
            CacheError::invalid(
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

/// A registered namespace: its spec, id and block size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub id: NamespaceId,
    pub spec: NamespaceSpec,
    pub block_bytes: u64,
}

impl Namespace {
    /// Validates the spec and derives id and block size.
    pub fn new(spec: NamespaceSpec) -> Result<Self, CacheError> {
        let spec = spec.normalized();
        let id = spec.id()?;
        let block_bytes = spec.block_bytes()?;
        Ok(Namespace {
            id,
            spec,
            block_bytes,
        })
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
