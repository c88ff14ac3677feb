//! Conversions between wire messages and `kvstrata_tiers` types, and the one
//! place where a `CacheError` becomes a gRPC status.

use kvstrata_proto::v1 as pb;
use kvstrata_tiers::RemoteStats;
use kvstrata_tiers::movement::MovementStats;
use kvstrata_tiers::{
    BlockKey, BlockMeta, CacheError, CacheEvent, DiskStats, EventKind, HeaderInspection,
    NamespaceId, NamespaceSpec, TierKind, VerifyReport,
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
        CacheError::BlockNotCached { .. } | CacheError::TierNotConfigured { .. } => {
            Code::FailedPrecondition
        }
        CacheError::Device { .. } => Code::Internal,
        CacheError::Closed => Code::Unavailable,
    };
    Status::new(code, e.to_string())
}

pub fn namespace_id(field: &str, bytes: &[u8]) -> Result<NamespaceId, Status> {
    NamespaceId::from_slice(field, bytes).map_err(|e| status(e.into()))
}

pub fn key(field: &str, bytes: &[u8]) -> Result<BlockKey, Status> {
    BlockKey::new(field, bytes).map_err(|e| status(e.into()))
}

/// A key whose field name (`field()`) is made only when the key is bad: a
/// batch's keys are checked without formatting a name per key.
pub fn key_named(field: impl FnOnce() -> String, bytes: &[u8]) -> Result<BlockKey, Status> {
    BlockKey::new("", bytes).or_else(|_| key(&field(), bytes))
}

/// Keys of a batch, with the batch limit applied first.
pub fn keys(field: &str, keys: &[bytes::Bytes], max: usize) -> Result<Vec<BlockKey>, Status> {
    check_batch(field, keys.len(), max)?;
    keys.iter()
        .enumerate()
        .map(|(i, k)| key_named(|| format!("{field}[{i}]"), k))
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
pub fn optional_key(
    field: impl FnOnce() -> String,
    bytes: &[u8],
) -> Result<Option<BlockKey>, Status> {
    if bytes.is_empty() {
        Ok(None)
    } else {
        key_named(field, bytes).map(Some)
    }
}

/// A request's spec (`kvstrata_types::spec_from_proto`; the error names the field).
pub fn spec_from_pb(spec: Option<pb::NamespaceSpec>) -> Result<NamespaceSpec, Status> {
    let s = spec.ok_or_else(|| Status::invalid_argument("spec: missing"))?;
    kvstrata_types::spec_from_proto(&s).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// The wire form of a spec (shared with the client).
pub fn spec_to_pb(s: &NamespaceSpec) -> pb::NamespaceSpec {
    kvstrata_types::spec_to_proto(s)
}

pub fn tier_to_pb(t: TierKind) -> pb::Tier {
    match t {
        TierKind::Hbm => pb::Tier::Hbm,
        TierKind::Host => pb::Tier::Host,
        TierKind::Disk => pb::Tier::Disk,
        TierKind::Remote => pb::Tier::Remote,
    }
}

/// `TIER_UNSPECIFIED` means "any tier".
pub fn tier_from_pb(field: &str, v: i32) -> Result<Option<TierKind>, Status> {
    match pb::Tier::try_from(v) {
        Ok(pb::Tier::Unspecified) => Ok(None),
        Ok(pb::Tier::Hbm) => Ok(Some(TierKind::Hbm)),
        Ok(pb::Tier::Host) => Ok(Some(TierKind::Host)),
        Ok(pb::Tier::Disk) => Ok(Some(TierKind::Disk)),
        Ok(pb::Tier::Remote) => Ok(Some(TierKind::Remote)),
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

/// Adds the disk tier's own counters to its `TierStats`.
pub fn fill_disk_stats(t: &mut pb::TierStats, d: &DiskStats) {
    t.io_engine = d.engine.to_string();
    t.corrupt_blocks = d.corrupt_blocks;
    t.io_errors = d.io_errors;
    t.io_timeouts = d.timeouts;
    t.read_bytes = d.read_bytes;
    t.write_bytes = d.write_bytes;
    t.read_bytes_per_sec = d.read_bytes_per_sec();
    t.write_bytes_per_sec = d.write_bytes_per_sec();
}

pub fn remote_to_pb(r: &RemoteStats) -> pb::RemoteStats {
    pb::RemoteStats {
        nodes: r.nodes.clone(),
        connected: r.connected,
        hits: r.hits,
        misses: r.misses,
        errors: r.errors,
        timeouts: r.timeouts,
        corrupt_blocks: r.corrupt_blocks,
        writes: r.writes,
        write_bytes: r.write_bytes,
        read_bytes: r.read_bytes,
        deletes: r.deletes,
        queue_dropped: r.queue_dropped,
        queued_bytes: r.queued_bytes,
        promoted: r.promoted,
        demoted: r.demoted,
        write_through: r.write_through,
        connect_failures: r.connect_failures,
        last_error: r.last_error.clone(),
        deadline_ms: r.deadline_ms,
    }
}

/// The remote tier's counters in the per-tier table's columns.
pub fn fill_remote_tier_stats(t: &mut pb::TierStats, r: &RemoteStats) {
    t.corrupt_blocks = r.corrupt_blocks;
    t.io_errors = r.errors;
    t.io_timeouts = r.timeouts;
    t.read_bytes = r.read_bytes;
    t.write_bytes = r.write_bytes;
}

pub fn movement_to_pb(m: &MovementStats) -> pb::MovementStats {
    pb::MovementStats {
        demoted: m.demoted,
        demote_dropped: m.demote_dropped,
        demote_failed: m.demote_failed,
        demote_skipped: m.demote_skipped,
        demote_queued_bytes: m.queued_bytes,
        promoted: m.promoted,
        write_through: m.write_through,
        sync_write_failed: m.sync_write_failed,
    }
}

pub fn disk_slot_to_pb(h: &HeaderInspection) -> pb::DiskSlot {
    pb::DiskSlot {
        file: h.file.display().to_string(),
        offset: h.offset,
        slot_bytes: h.slot_bytes,
        index_payload_len: h.index_payload_len,
        index_xxh3: h.index_checksum,
        index_seq: h.index_seq,
        header: h.header.as_ref().ok().map(|hd| pb::SlotHeader {
            format_version: u32::from(kvstrata_tiers::disk::header::FORMAT_VERSION),
            namespace_id: bytes::Bytes::copy_from_slice(hd.namespace.as_bytes()),
            key: key_bytes(&hd.key),
            parent: hd.parent.as_ref().map(key_bytes).unwrap_or_default(),
            payload_len: hd.payload_len,
            payload_xxh3: hd.payload_xxh3,
            seq: hd.seq,
        }),
        problem: h.problem.map(|p| p.name().to_string()).unwrap_or_default(),
        payload_checksum_ok: h.payload_checksum_ok,
    }
}

pub fn verify_to_pb(r: &VerifyReport) -> pb::VerifyResponse {
    pb::VerifyResponse {
        scanned: r.scanned,
        corrupt: r
            .corrupt
            .iter()
            .map(|c| pb::CorruptSlot {
                namespace_id: bytes::Bytes::copy_from_slice(c.namespace.as_bytes()),
                key: key_bytes(&c.key),
                file: c.file.display().to_string(),
                offset: c.offset,
                problem: c.reason.name().to_string(),
            })
            .collect(),
        unreadable: r.unreadable.len() as u64,
    }
}

/// The GPUs of `gpus` (or why there are none) into a Stats answer.
pub fn fill_gpu_stats(resp: &mut pb::StatsResponse, gpus: &crate::region::GpuSet) {
    resp.gpus = gpus
        .devices
        .iter()
        .map(|g| {
            let i = g.info();
            pb::GpuDevice {
                ordinal: i.ordinal as u32,
                name: i.name.clone(),
                compute_major: i.compute_capability.0.max(0) as u32,
                compute_minor: i.compute_capability.1.max(0) as u32,
                total_bytes: i.total_bytes,
                multiprocessors: i.multiprocessors,
                hbm_bytes: gpus.hbm_bytes,
            }
        })
        .collect();
    resp.gpu_status = if gpus.devices.is_empty() {
        gpus.status.clone()
    } else {
        String::new()
    };
}

/// A registered KV region as Stats shows it.
pub fn region_to_pb(r: &crate::region::RegionInfo) -> pb::KvRegionInfo {
    pb::KvRegionInfo {
        region_id: r.id,
        name: r.name.clone(),
        kind: r.kind.to_string(),
        device: r.device,
        bytes: r.bytes,
        layout: r.geometry.layout.name().to_string(),
        num_pages: r.geometry.num_pages,
        chunk_bytes: r.geometry.chunk_bytes(),
        bytes_gathered: r.gathered,
        bytes_scattered: r.scattered,
    }
}
