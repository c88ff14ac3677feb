//! Rendering for the CLI: tables (comfy-table), human sizes, and the JSON forms of
//! the wire messages.

use std::io::Write;
use std::time::{Duration, UNIX_EPOCH};

use bytesize::ByteSize;
use comfy_table::{CellAlignment, ContentArrangement, Table, presets};
use kvstrata_proto::v1 as proto;
use kvstrata_types::BlockKey;
use serde_json::{Value, json};

use super::CliError;

/// Writes one line to stdout.
pub fn line(s: impl std::fmt::Display) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{s}").map_err(stdout_error)
}

/// Writes one pretty JSON document to stdout.
pub fn json_doc(v: &Value) -> Result<(), CliError> {
    line(serde_json::to_string_pretty(v)?)
}

/// Writes one JSON object on one line (for streams of events).
pub fn json_line(v: &Value) -> Result<(), CliError> {
    line(serde_json::to_string(v)?)
}

/// Writes raw bytes to stdout.
pub fn raw(bytes: &[u8]) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(stdout_error)
}

fn stdout_error(source: std::io::Error) -> CliError {
    CliError::Io {
        path: "stdout".into(),
        source,
    }
}

/// A table with a header row; columns listed in `right` are right-aligned.
pub fn table(headers: &[&str], right: &[usize]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(headers.iter().copied());
    for &i in right {
        if let Some(col) = t.column_mut(i) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

/// A two-column field/value table.
pub fn fields(rows: Vec<(&str, String)>) -> Table {
    let mut t = table(&["field", "value"], &[]);
    for (k, v) in rows {
        t.add_row(vec![k.to_string(), v]);
    }
    t
}

/// Human size, IEC units (`360.0 KiB`).
pub fn size(bytes: u64) -> String {
    ByteSize(bytes).display().iec().to_string()
}

/// `num / den` as a percentage with one decimal, or `-` when `den` is 0.
pub fn percent(num: u64, den: u64) -> String {
    if den == 0 {
        "-".into()
    } else {
        format!("{:.1}%", num as f64 * 100.0 / den as f64)
    }
}

/// Short name of a wire tier (`hbm`, `host`, `disk`, `remote`).
pub fn tier_name(code: i32) -> String {
    match proto::Tier::try_from(code) {
        Ok(proto::Tier::Hbm) => "hbm".into(),
        Ok(proto::Tier::Host) => "host".into(),
        Ok(proto::Tier::Disk) => "disk".into(),
        Ok(proto::Tier::Remote) => "remote".into(),
        Ok(proto::Tier::Unspecified) => "-".into(),
        Err(_) => format!("tier({code})"),
    }
}

/// Short name of a watch event kind.
pub fn event_kind_name(code: i32) -> String {
    match proto::EventKind::try_from(code) {
        Ok(proto::EventKind::Stored) => "stored".into(),
        Ok(proto::EventKind::Evicted) => "evicted".into(),
        Ok(proto::EventKind::Deleted) => "deleted".into(),
        Ok(proto::EventKind::Lagged) => "lagged".into(),
        Ok(proto::EventKind::Unspecified) => "-".into(),
        Err(_) => format!("kind({code})"),
    }
}

/// Short name of a wire dtype.
pub fn dtype_name(code: i32) -> String {
    kvstrata_types::Dtype::from_code(code)
        .map(|d| d.name().to_string())
        .unwrap_or_else(|| format!("dtype({code})"))
}

/// Short name of a wire layout.
pub fn layout_name(code: i32) -> String {
    match proto::Layout::try_from(code) {
        Ok(proto::Layout::LayerMajor) => "layer_major".into(),
        Ok(proto::Layout::Opaque) => "opaque".into(),
        _ => format!("layout({code})"),
    }
}

/// A key for display (`BlockKey::display`); empty bytes show as `-`.
pub fn key(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        "-".into()
    } else {
        BlockKey::display(bytes)
    }
}

/// A key for JSON: the display form, `null` when empty.
pub fn key_json(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        Value::Null
    } else {
        Value::String(BlockKey::display(bytes))
    }
}

/// Milliseconds as a short duration (`250ms`, `1m 5s`).
pub fn millis(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else {
        humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
    }
}

/// Unix milliseconds as RFC 3339 UTC.
pub fn unix_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// xxh3-64 as 16 lowercase hex digits.
pub fn xxh3_hex(h: u64) -> String {
    format!("{h:016x}")
}

pub fn namespace_json(n: &proto::NamespaceInfo) -> Value {
    let spec = n.spec.clone().unwrap_or_default();
    json!({
        "namespace_id": hex::encode(&n.namespace_id),
        "model_id": spec.model_id,
        "model_fingerprint": hex::encode(&spec.model_fingerprint),
        "num_layers": spec.num_layers,
        "num_kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "dtype": dtype_name(spec.dtype),
        "block_tokens": spec.block_tokens,
        "layout": layout_name(spec.layout),
        "tp_rank": spec.tp_rank,
        "tp_size": spec.tp_size,
        "opaque_block_bytes": spec.opaque_block_bytes,
        "block_bytes": n.block_bytes,
        "write_through": n.policy.as_ref().is_some_and(|p| p.write_through),
        "remote_write_through": n.policy.as_ref().is_some_and(|p| p.remote_write_through),
        "sync_write_through": n.policy.as_ref().is_some_and(|p| p.sync_write_through),
    })
}

pub fn block_json(b: &proto::BlockInfo) -> Value {
    json!({
        "namespace_id": hex::encode(&b.namespace_id),
        "key": key_json(&b.key),
        "parent": key_json(&b.parent),
        "tier": tier_name(b.tier),
        "payload_bytes": b.payload_bytes,
        "children": b.children,
        "pins": b.pins,
        "idle_ms": b.idle_ms,
    })
}

pub fn tier_stats_json(t: &proto::TierStats) -> Value {
    json!({
        "tier": tier_name(t.tier),
        "capacity_bytes": t.capacity_bytes,
        "used_bytes": t.used_bytes,
        "blocks": t.blocks,
        "hits": t.hits,
        "misses": t.misses,
        "evictions": t.evictions,
        "bytes_in": t.bytes_in,
        "bytes_out": t.bytes_out,
        "pinned_blocks": t.pinned_blocks,
        "rejected_puts": t.rejected_puts,
        "io_engine": (!t.io_engine.is_empty()).then_some(&t.io_engine),
        "corrupt_blocks": t.corrupt_blocks,
        "io_errors": t.io_errors,
        "io_timeouts": t.io_timeouts,
        "read_bytes": t.read_bytes,
        "write_bytes": t.write_bytes,
        "read_bytes_per_sec": t.read_bytes_per_sec,
        "write_bytes_per_sec": t.write_bytes_per_sec,
    })
}

pub fn remote_json(r: &proto::RemoteStats) -> Value {
    json!({
        "nodes": r.nodes,
        "connected": r.connected,
        "hits": r.hits,
        "misses": r.misses,
        "errors": r.errors,
        "timeouts": r.timeouts,
        "corrupt_blocks": r.corrupt_blocks,
        "writes": r.writes,
        "write_bytes": r.write_bytes,
        "read_bytes": r.read_bytes,
        "deletes": r.deletes,
        "queue_dropped": r.queue_dropped,
        "queued_bytes": r.queued_bytes,
        "promoted": r.promoted,
        "demoted": r.demoted,
        "write_through": r.write_through,
        "connect_failures": r.connect_failures,
        "last_error": r.last_error,
        "deadline_ms": r.deadline_ms,
    })
}

pub fn movement_json(m: &proto::MovementStats) -> Value {
    json!({
        "demoted": m.demoted,
        "demote_dropped": m.demote_dropped,
        "demote_failed": m.demote_failed,
        "demote_skipped": m.demote_skipped,
        "demote_queued_bytes": m.demote_queued_bytes,
        "promoted": m.promoted,
        "write_through": m.write_through,
        "sync_write_failed": m.sync_write_failed,
    })
}

pub fn disk_slot_json(d: &proto::DiskSlot) -> Value {
    json!({
        "file": d.file,
        "offset": d.offset,
        "slot_bytes": d.slot_bytes,
        "index_payload_len": d.index_payload_len,
        "index_xxh3": xxh3_hex(d.index_xxh3),
        "index_seq": d.index_seq,
        "header": d.header.as_ref().map(|h| json!({
            "format_version": h.format_version,
            "namespace_id": hex::encode(&h.namespace_id),
            "key": key_json(&h.key),
            "parent": key_json(&h.parent),
            "payload_len": h.payload_len,
            "payload_xxh3": xxh3_hex(h.payload_xxh3),
            "seq": h.seq,
        })),
        "problem": (!d.problem.is_empty()).then_some(&d.problem),
        "payload_checksum_ok": d.payload_checksum_ok,
        "verifies": d.problem.is_empty(),
    })
}

/// `inspect` rows for a block's disk slot.
pub fn disk_slot_rows(d: &proto::DiskSlot) -> Vec<(&'static str, String)> {
    let mut rows = vec![
        (
            "disk slot",
            format!("{} @ {} ({} bytes)", d.file, d.offset, d.slot_bytes),
        ),
        (
            "disk index",
            format!(
                "payload {} bytes, xxh3-64 {}, seq {}",
                d.index_payload_len,
                xxh3_hex(d.index_xxh3),
                d.index_seq
            ),
        ),
    ];
    match &d.header {
        Some(h) => rows.push((
            "disk header",
            format!(
                "v{} key {} parent {} payload {} bytes, xxh3-64 {}, seq {}",
                h.format_version,
                key(&h.key),
                key(&h.parent),
                h.payload_len,
                xxh3_hex(h.payload_xxh3),
                h.seq
            ),
        )),
        None => rows.push(("disk header", "unreadable".into())),
    }
    rows.push((
        "disk check",
        if d.problem.is_empty() {
            "ok (header matches the index, payload checksum verifies)".into()
        } else {
            format!("FAILED: {}", d.problem)
        },
    ));
    rows
}

pub fn event_json(e: &proto::WatchEvent) -> Value {
    let mut v = json!({
        "seq": e.seq,
        "kind": event_kind_name(e.kind),
        "namespace_id": hex::encode(&e.namespace_id),
        "key": key_json(&e.key),
        "parent": key_json(&e.parent),
        "tier": tier_name(e.tier),
        "unix_ms": e.unix_ms,
    });
    if e.kind == proto::EventKind::Lagged as i32
        && let Some(o) = v.as_object_mut()
    {
        o.insert("missed".into(), json!(e.missed));
    }
    v
}

/// One line per watch event.
pub fn event_line(e: &proto::WatchEvent) -> String {
    let mut s = format!(
        "{} #{} {}",
        unix_ms(e.unix_ms),
        e.seq,
        event_kind_name(e.kind)
    );
    if e.kind == proto::EventKind::Lagged as i32 {
        s.push_str(&format!(" missed={} (resynchronise with `ls`)", e.missed));
        return s;
    }
    s.push_str(&format!(
        " ns={} key={} tier={}",
        hex::encode(&e.namespace_id),
        key(&e.key),
        tier_name(e.tier)
    ));
    if !e.parent.is_empty() {
        s.push_str(&format!(" parent={}", key(&e.parent)));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(percent(1, 4), "25.0%");
        assert_eq!(percent(1, 0), "-");
        assert_eq!(tier_name(2), "host");
        assert_eq!(tier_name(0), "-");
        assert_eq!(tier_name(42), "tier(42)");
        assert_eq!(millis(250), "250ms");
        assert_eq!(millis(65_500), "1m 5s");
        assert_eq!(unix_ms(1_000), "1970-01-01T00:00:01.000Z");
        assert_eq!(xxh3_hex(0xab), "00000000000000ab");
        assert_eq!(key(b""), "-");
        assert_eq!(key(&[0, 1]), "hex:0001");
        assert_eq!(size(368_640), "360.0 KiB");
        assert_eq!(dtype_name(1), "f16");
        assert_eq!(layout_name(2), "opaque");
    }

    #[test]
    fn event_lines_and_json() {
        let e = proto::WatchEvent {
            seq: 5,
            kind: proto::EventKind::Stored as i32,
            namespace_id: vec![0xab; 16].into(),
            key: b"k1".to_vec().into(),
            tier: proto::Tier::Host as i32,
            missed: 0,
            unix_ms: 0,
            parent: b"k0".to_vec().into(),
        };
        let l = event_line(&e);
        assert!(
            l.contains("#5 stored") && l.contains("key=k1") && l.contains("parent=k0"),
            "{l}"
        );
        let j = event_json(&e);
        assert_eq!(j["kind"], "stored");
        assert_eq!(j["key"], "k1");
        assert!(j.get("missed").is_none());
        let lagged = proto::WatchEvent {
            kind: proto::EventKind::Lagged as i32,
            missed: 9,
            ..e
        };
        assert!(event_line(&lagged).contains("missed=9"));
        assert_eq!(event_json(&lagged)["missed"], 9);
    }
}
