//! Conversions between wire messages and `kvstrata_tiers` types, and the one
//! place where a `CacheError` becomes a gRPC status.

use kvstrata_proto::v1 as pb;
use kvstrata_tiers::{
    BlockKey, BlockMeta, CacheError, CacheEvent, Dtype, EventKind, Layout, NamespaceId,
    NamespaceSpec, TierKind,
};
use tonic::{Code, Status};

/// The gRPC status of a cache error (code table in docs/protocol.md).
pub fn status(e: CacheError) -> Status {
    let code = match &e {
        CacheError::InvalidArgument { .. } | CacheError::BlockTooLarge { .. } => {
            Code::InvalidArgument
        }
        CacheError::UnknownNamespace { .. } | CacheError::LeaseNotFound(_) => Code::NotFound,
        CacheError::BatchTooLarge { .. } => Code::ResourceExhausted,
        CacheError::BlockNotCached { .. } => Code::FailedPrecondition,
    };
    Status::new(code, e.to_string())
}

pub fn namespace_id(field: &str, bytes: &[u8]) -> Result<NamespaceId, Status> {
    NamespaceId::from_slice(field, bytes).map_err(status)
}

pub fn key(field: &str, bytes: &[u8]) -> Result<BlockKey, Status> {
    BlockKey::new(field, bytes).map_err(status)
}

/// Keys of a batch, with the batch limit applied first.
pub fn keys(field: &str, keys: &[bytes::Bytes], max: usize) -> Result<Vec<BlockKey>, Status> {
    check_batch(field, keys.len(), max)?;
    keys.iter()
        .enumerate()
        .map(|(i, k)| key(&format!("{field}[{i}]"), k))
        .collect()
}

pub fn check_batch(field: &str, len: usize, max: usize) -> Result<(), Status> {
    if len > max {
        return Err(status(CacheError::BatchTooLarge {
            field: field.to_string(),
            len,
            max,
        }));
    }
    Ok(())
}

/// An optional key: empty bytes mean none.
pub fn optional_key(field: &str, bytes: &[u8]) -> Result<Option<BlockKey>, Status> {
    if bytes.is_empty() {
        Ok(None)
    } else {
        key(field, bytes).map(Some)
    }
}

pub fn spec_from_pb(spec: Option<pb::NamespaceSpec>) -> Result<NamespaceSpec, Status> {
    let s = spec.ok_or_else(|| Status::invalid_argument("spec: missing"))?;
    let dtype = Dtype::from_code(s.dtype).ok_or_else(|| {
        Status::invalid_argument(format!(
            "spec.dtype: {} is not a known dtype (1 = f16 ... 6 = int8)",
            s.dtype
        ))
    })?;
    let layout = match s.layout {
        0 | 1 => Layout::LayerMajor,
        2 => Layout::Opaque,
        other => {
            return Err(Status::invalid_argument(format!(
                "spec.layout: {other} is not a known layout"
            )));
        }
    };
    Ok(NamespaceSpec {
        model_id: s.model_id,
        model_fingerprint: s.model_fingerprint.to_vec(),
        num_layers: s.num_layers,
        num_kv_heads: s.num_kv_heads,
        head_dim: s.head_dim,
        dtype,
        block_tokens: s.block_tokens,
        layout,
        tp_rank: s.tp_rank,
        tp_size: s.tp_size,
        opaque_block_bytes: s.opaque_block_bytes,
    })
}

pub fn spec_to_pb(s: &NamespaceSpec) -> pb::NamespaceSpec {
    pb::NamespaceSpec {
        model_id: s.model_id.clone(),
        model_fingerprint: s.model_fingerprint.clone().into(),
        num_layers: s.num_layers,
        num_kv_heads: s.num_kv_heads,
        head_dim: s.head_dim,
        dtype: s.dtype as i32,
        block_tokens: s.block_tokens,
        layout: s.layout as i32,
        tp_rank: s.tp_rank,
        tp_size: s.tp_size,
        opaque_block_bytes: s.opaque_block_bytes,
    }
}

pub fn tier_to_pb(t: TierKind) -> pb::Tier {
    match t {
        TierKind::Hbm => pb::Tier::Hbm,
        TierKind::Host => pb::Tier::Host,
        TierKind::Disk => pb::Tier::Disk,
    }
}

/// `TIER_UNSPECIFIED` means "any tier".
pub fn tier_from_pb(field: &str, v: i32) -> Result<Option<TierKind>, Status> {
    match pb::Tier::try_from(v) {
        Ok(pb::Tier::Unspecified) => Ok(None),
        Ok(pb::Tier::Hbm) => Ok(Some(TierKind::Hbm)),
        Ok(pb::Tier::Host) => Ok(Some(TierKind::Host)),
        Ok(pb::Tier::Disk) => Ok(Some(TierKind::Disk)),
        Err(_) => Err(Status::invalid_argument(format!(
            "{field}: {v} is not a known tier"
        ))),
    }
}

fn key_bytes(k: &BlockKey) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(k.as_bytes())
}

pub fn block_to_pb(m: &BlockMeta) -> pb::BlockInfo {
    pb::BlockInfo {
        namespace_id: bytes::Bytes::copy_from_slice(m.namespace.as_bytes()),
        key: key_bytes(&m.key),
        parent: m.parent.as_ref().map(key_bytes).unwrap_or_default(),
        tier: tier_to_pb(m.tier) as i32,
        payload_bytes: m.payload_bytes,
        children: m.children,
        pins: m.pins,
        idle_ms: m.idle_ms,
    }
}

pub fn event_to_pb(e: &CacheEvent) -> pb::WatchEvent {
    let kind = match e.kind {
        EventKind::Stored => pb::EventKind::Stored,
        EventKind::Evicted => pb::EventKind::Evicted,
        EventKind::Deleted => pb::EventKind::Deleted,
    };
    pb::WatchEvent {
        seq: e.seq,
        kind: kind as i32,
        namespace_id: bytes::Bytes::copy_from_slice(e.namespace.as_bytes()),
        key: key_bytes(&e.key),
        tier: tier_to_pb(e.tier) as i32,
        missed: 0,
        unix_ms: e.unix_ms,
        parent: e.parent.as_ref().map(key_bytes).unwrap_or_default(),
    }
}
