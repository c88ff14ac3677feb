//! One function per verb: connect, call, render.

use std::path::Path;
use std::time::Duration;

use kvstrata_proto::v1 as proto;
use kvstrata_types::{NamespaceId, NamespacePolicy};
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio_stream::StreamExt;

use super::output::{self as out, line};
use super::parse::{NsArg, fill_payload, find_namespace, parse_key, parse_keys, resolve_model};
use super::{CliError, ClientCommand, GlobalArgs, NsCommand, PutArgs, TierArg};
use kvstrata_client::{Client, PutItem};

pub(super) async fn run(cmd: ClientCommand, g: &GlobalArgs) -> Result<(), CliError> {
    let client = Client::connect_with(&g.addr, g.client_options()?).await?;
    let c = &client;
    match cmd {
        ClientCommand::Ns(NsCommand::Register(a)) => ns_register(c, g, &a).await,
        ClientCommand::Ns(NsCommand::Ls) => ns_ls(c, g).await,
        ClientCommand::Stats => stats(c, g).await,
        ClientCommand::Ls { ns, tier, limit } => ls(c, g, ns.as_deref(), tier, limit).await,
        ClientCommand::Inspect { ns, key } => inspect(c, g, &ns, &key).await,
        ClientCommand::Put(a) => put(c, g, &a).await,
        ClientCommand::Get { ns, key, out } => get(c, g, &ns, &key, out.as_deref()).await,
        ClientCommand::Delete { ns, keys } => delete(c, g, &ns, &keys).await,
        ClientCommand::Evict { ns, keys, all } => evict(c, g, &ns, &keys, all).await,
        ClientCommand::Lookup { ns, keys } => lookup(c, g, &ns, &keys).await,
        ClientCommand::Pin { ns, lease, keys } => pin(c, g, &ns, lease, &keys).await,
        ClientCommand::Unpin { lease_id } => unpin(c, g, lease_id).await,
        ClientCommand::Watch { ns, count } => watch(c, g, ns.as_deref(), count).await,
        ClientCommand::Verify { drop } => verify(c, g, drop).await,
    }
}

/// Resolves a namespace argument; a model id costs one ListNamespaces call.
async fn namespace(c: &Client, arg: &str) -> Result<NamespaceId, CliError> {
    match NsArg::parse(arg) {
        NsArg::Id(id) => Ok(id),
        NsArg::Model(model) => resolve_model(&model, &c.list_namespaces().await?),
    }
}

async fn ns_register(c: &Client, g: &GlobalArgs, a: &super::RegisterArgs) -> Result<(), CliError> {
    let spec = super::spec_from_args(a)?;
    let given = [
        a.write_through,
        a.remote_write_through,
        a.sync_write_through,
    ];
    let policy = given.iter().any(Option::is_some).then(|| NamespacePolicy {
        write_through: a.write_through.unwrap_or(false),
        remote_write_through: a.remote_write_through.unwrap_or(false),
        sync_write_through: a.sync_write_through.unwrap_or(false),
    });
    let r = c.register_namespace_with(&spec, policy).await?;
    if g.json {
        return out::json_doc(&json!({
            "namespace_id": r.id.to_hex(),
            "block_bytes": r.block_bytes,
            "created": r.created,
            "write_through": a.write_through,
            "remote_write_through": a.remote_write_through,
            "sync_write_through": a.sync_write_through,
        }));
    }
    line(r.id)?;
    eprintln!(
        "{} namespace {} ({}, blocks of {} bytes = {})",
        if r.created {
            "registered"
        } else {
            "already registered:"
        },
        spec.model_id,
        r.id,
        r.block_bytes,
        out::size(r.block_bytes)
    );
    Ok(())
}

async fn ns_ls(c: &Client, g: &GlobalArgs) -> Result<(), CliError> {
    let list = c.list_namespaces().await?;
    if g.json {
        let v: Vec<_> = list.iter().map(out::namespace_json).collect();
        return out::json_doc(&json!({ "namespaces": v }));
    }
    let mut t = out::table(
        &[
            "id",
            "model",
            "layers",
            "kv heads",
            "head dim",
            "dtype",
            "block tokens",
            "layout",
            "tp",
            "block size",
            "fingerprint",
        ],
        &[2, 3, 4, 6, 9],
    );
    for n in &list {
        let s = n.spec.clone().unwrap_or_default();
        t.add_row(vec![
            hex::encode(&n.namespace_id),
            s.model_id.clone(),
            s.num_layers.to_string(),
            s.num_kv_heads.to_string(),
            s.head_dim.to_string(),
            out::dtype_name(s.dtype),
            s.block_tokens.to_string(),
            out::layout_name(s.layout),
            format!("{}/{}", s.tp_rank, s.tp_size.max(1)),
            out::size(n.block_bytes),
            if s.model_fingerprint.is_empty() {
                "-".into()
            } else {
                hex::encode(&s.model_fingerprint)
            },
        ]);
    }
    line(t)?;
    line(format!("{} namespaces", list.len()))
}

async fn stats(c: &Client, g: &GlobalArgs) -> Result<(), CliError> {
    let s = c.stats().await?;
    if g.json {
        let tiers: Vec<_> = s.tiers.iter().map(out::tier_stats_json).collect();
        return out::json_doc(&json!({
            "tiers": tiers,
            "namespaces": s.namespaces,
            "active_leases": s.active_leases,
            "uptime_ms": s.uptime_ms,
            "version": s.version,
            "event_seq": s.event_seq,
            "movement": s.movement.as_ref().map(out::movement_json),
            "pools": s.pools,
            "pool_bytes": s.pool_bytes,
            "remote": s.remote.as_ref().map(out::remote_json),
            "gpus": s.gpus.iter().map(|d| json!({
                "ordinal": d.ordinal,
                "name": d.name,
                "compute_capability": format!("{}.{}", d.compute_major, d.compute_minor),
                "total_bytes": d.total_bytes,
                "multiprocessors": d.multiprocessors,
                "hbm_bytes": d.hbm_bytes,
            })).collect::<Vec<_>>(),
            "gpu_status": s.gpu_status,
            "kv_regions": s.kv_regions.iter().map(|r| json!({
                "region_id": r.region_id,
                "name": r.name,
                "kind": r.kind,
                "device": r.device,
                "bytes": r.bytes,
                "layout": r.layout,
                "num_pages": r.num_pages,
                "chunk_bytes": r.chunk_bytes,
                "bytes_gathered": r.bytes_gathered,
                "bytes_scattered": r.bytes_scattered,
            })).collect::<Vec<_>>(),
        }));
    }
    let mut t = out::table(
        &[
            "tier",
            "capacity",
            "used",
            "used %",
            "blocks",
            "hits",
            "misses",
            "hit rate",
            "evictions",
            "bytes in",
            "bytes out",
            "pinned",
        ],
        &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    );
    for ts in &s.tiers {
        // The cluster's capacity and occupancy are its own (maxmemory).
        let remote = ts.tier == proto::Tier::Remote as i32;
        let size = |v: u64| if remote { "-".into() } else { out::size(v) };
        t.add_row(vec![
            out::tier_name(ts.tier),
            size(ts.capacity_bytes),
            size(ts.used_bytes),
            out::percent(ts.used_bytes, ts.capacity_bytes),
            ts.blocks.to_string(),
            ts.hits.to_string(),
            ts.misses.to_string(),
            out::percent(ts.hits, ts.hits.saturating_add(ts.misses)),
            ts.evictions.to_string(),
            out::size(ts.bytes_in),
            out::size(ts.bytes_out),
            ts.pinned_blocks.to_string(),
        ]);
    }
    line(t)?;
    for d in s.tiers.iter().filter(|t| !t.io_engine.is_empty()) {
        line(format!(
            "disk: engine {}  read {}/s  write {}/s  corrupt blocks {}  I/O errors {}  timeouts {}",
            d.io_engine,
            out::size(d.read_bytes_per_sec as u64),
            out::size(d.write_bytes_per_sec as u64),
            d.corrupt_blocks,
            d.io_errors,
            d.io_timeouts
        ))?;
    }
    if let Some(m) = &s.movement {
        line(format!(
            "movement: demoted {}  dropped (queue full) {}  failed {}  skipped (already on disk) {}  queued {}  promoted {}  write-through {}  sync write-through failed {}",
            m.demoted,
            m.demote_dropped,
            m.demote_failed,
            m.demote_skipped,
            out::size(m.demote_queued_bytes),
            m.promoted,
            m.write_through,
            m.sync_write_failed
        ))?;
    }
    if let Some(r) = &s.remote {
        line(format!(
            "remote: {}  nodes {}  written {} ({})  deleted {}  corrupt {}  errors {}  timeouts {}  dropped (queue full) {}  queued {}  promoted {}{}",
            if r.connected {
                "connected"
            } else {
                "NOT connected"
            },
            r.nodes.join(","),
            r.writes,
            out::size(r.write_bytes),
            r.deletes,
            r.corrupt_blocks,
            r.errors,
            r.timeouts,
            r.queue_dropped,
            out::size(r.queued_bytes),
            r.promoted,
            if r.last_error.is_empty() {
                String::new()
            } else {
                format!("  last error: {}", r.last_error)
            }
        ))?;
    }
    if s.gpus.is_empty() {
        line(format!(
            "gpu: none{}",
            if s.gpu_status.is_empty() {
                String::new()
            } else {
                format!(" ({})", s.gpu_status)
            }
        ))?;
    }
    for d in &s.gpus {
        line(format!(
            "gpu {}: {}  compute {}.{}  memory {}  SMs {}  HBM tier {}",
            d.ordinal,
            d.name,
            d.compute_major,
            d.compute_minor,
            out::size(d.total_bytes),
            d.multiprocessors,
            out::size(d.hbm_bytes)
        ))?;
    }
    line(format!(
        "kv regions: {} ({})",
        s.kv_regions.len(),
        out::size(s.kv_regions.iter().map(|r| r.bytes).sum())
    ))?;
    for r in &s.kv_regions {
        line(format!(
            "  region {} {:?}: {}{}  {}  {} pages  {}  gathered {}  scattered {}",
            r.region_id,
            r.name,
            r.kind,
            if r.kind == "cuda-ipc" {
                format!(" (device {})", r.device)
            } else {
                String::new()
            },
            r.layout,
            r.num_pages,
            out::size(r.bytes),
            out::size(r.bytes_gathered),
            out::size(r.bytes_scattered)
        ))?;
    }
    line(format!(
        "namespaces: {}  leases: {}  pools: {} ({})  uptime: {}  version: {}  event seq: {}",
        s.namespaces,
        s.active_leases,
        s.pools,
        out::size(s.pool_bytes),
        humantime::format_duration(Duration::from_secs(s.uptime_ms / 1000)),
        if s.version.is_empty() {
            "-"
        } else {
            &s.version
        },
        s.event_seq
    ))
}

async fn ls(
    c: &Client,
    g: &GlobalArgs,
    ns: Option<&str>,
    tier: Option<TierArg>,
    limit: Option<usize>,
) -> Result<(), CliError> {
    let ns = match ns {
        Some(a) => Some(namespace(c, a).await?),
        None => None,
    };
    let blocks = c
        .list_all_blocks(ns.as_ref(), tier.map(proto::Tier::from), limit)
        .await?;
    if g.json {
        let v: Vec<_> = blocks.iter().map(out::block_json).collect();
        return out::json_doc(&json!({ "blocks": v }));
    }
    let mut headers = vec!["key", "parent", "tier", "size", "children", "pins", "idle"];
    let mut right = vec![3, 4, 5, 6];
    if ns.is_none() {
        headers.insert(0, "namespace");
        right = right.iter().map(|i| i + 1).collect();
    }
    let mut t = out::table(&headers, &right);
    for b in &blocks {
        let mut row = vec![
            out::key(&b.key),
            out::key(&b.parent),
            out::tier_name(b.tier),
            out::size(b.payload_bytes),
            b.children.to_string(),
            b.pins.to_string(),
            out::millis(b.idle_ms),
        ];
        if ns.is_none() {
            row.insert(0, hex::encode(&b.namespace_id));
        }
        t.add_row(row);
    }
    line(t)?;
    line(format!("{} blocks", blocks.len()))
}

async fn inspect(c: &Client, g: &GlobalArgs, ns: &str, key: &str) -> Result<(), CliError> {
    let ns = namespace(c, ns).await?;
    let key = parse_key(key)?;
    let r = c.inspect(&ns, &key).await?;
    let b = r
        .block
        .as_ref()
        .ok_or_else(|| CliError::InvalidResponse("Inspect answered no block".into()))?;
    if g.json {
        return out::json_doc(&json!({
            "block": out::block_json(b),
            "payload_xxh3": out::xxh3_hex(r.payload_xxh3),
            "stored_xxh3": out::xxh3_hex(r.stored_xxh3),
            "checksum_ok": r.checksum_ok,
            "disk_slot": r.disk_slot.as_ref().map(out::disk_slot_json),
        }));
    }
    let mut rows = vec![
        ("namespace", hex::encode(&b.namespace_id)),
        ("key", out::key(&b.key)),
        ("parent", out::key(&b.parent)),
        ("tier", out::tier_name(b.tier)),
        (
            "payload",
            format!("{} bytes ({})", b.payload_bytes, out::size(b.payload_bytes)),
        ),
        ("children", b.children.to_string()),
        ("pins", b.pins.to_string()),
        ("idle", out::millis(b.idle_ms)),
        ("xxh3-64 now", out::xxh3_hex(r.payload_xxh3)),
        ("xxh3-64 stored", out::xxh3_hex(r.stored_xxh3)),
        (
            "checksum",
            if r.checksum_ok { "ok" } else { "MISMATCH" }.to_string(),
        ),
    ];
    if let Some(d) = &r.disk_slot {
        rows.extend(out::disk_slot_rows(d));
    }
    line(out::fields(rows))
}

async fn verify(c: &Client, g: &GlobalArgs, drop: bool) -> Result<(), CliError> {
    let r = c.verify(drop).await?;
    let corrupt = r.corrupt.len() as u64;
    if g.json {
        let slots: Vec<_> = r
            .corrupt
            .iter()
            .map(|s| {
                json!({
                    "namespace_id": hex::encode(&s.namespace_id),
                    "key": out::key_json(&s.key),
                    "file": s.file,
                    "offset": s.offset,
                    "problem": s.problem,
                })
            })
            .collect();
        out::json_doc(&json!({
            "scanned": r.scanned,
            "corrupt": slots,
            "unreadable": r.unreadable,
            "dropped": drop,
        }))?;
    } else {
        if corrupt > 0 {
            let mut t = out::table(&["namespace", "key", "file", "offset", "problem"], &[3]);
            for s in &r.corrupt {
                t.add_row(vec![
                    hex::encode(&s.namespace_id),
                    out::key(&s.key),
                    s.file.clone(),
                    s.offset.to_string(),
                    s.problem.clone(),
                ]);
            }
            line(t)?;
        }
        line(format!(
            "{} slots scanned, {} corrupt{}, {} unreadable",
            r.scanned,
            corrupt,
            if drop && corrupt > 0 {
                " (dropped)"
            } else {
                ""
            },
            r.unreadable
        ))?;
    }
    if corrupt > 0 {
        return Err(CliError::Corrupt(corrupt));
    }
    Ok(())
}

async fn read_file(path: &Path) -> Result<Vec<u8>, CliError> {
    tokio::fs::read(path).await.map_err(|source| CliError::Io {
        path: path.display().to_string(),
        source,
    })
}

async fn put(c: &Client, g: &GlobalArgs, a: &PutArgs) -> Result<(), CliError> {
    let key = parse_key(&a.key)?;
    let parent = a.parent.as_deref().map(parse_key).transpose()?;
    let ns = namespace(c, &a.ns).await?;
    let payload = if let Some(seed) = a.fill_seed {
        let list = c.list_namespaces().await?;
        let info = find_namespace(&ns, &list)
            .ok_or_else(|| CliError::Namespace(format!("namespace {ns} is not registered")))?;
        let len = usize::try_from(info.block_bytes).map_err(|_| {
            CliError::InvalidResponse(format!("block_bytes {} too large", info.block_bytes))
        })?;
        fill_payload(seed, len)
    } else if let Some(path) = &a.file {
        read_file(path).await?
    } else {
        if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            return Err(CliError::InvalidArgument(
                "no payload: pass --file PATH or --fill-seed N, or pipe the bytes to stdin".into(),
            ));
        }
        let mut buf = Vec::new();
        tokio::io::stdin()
            .read_to_end(&mut buf)
            .await
            .map_err(|source| CliError::Io {
                path: "stdin".into(),
                source,
            })?;
        buf
    };
    let len = payload.len();
    let mut item = PutItem::new(key.clone(), payload);
    if let Some(p) = parent {
        item = item.with_parent(p);
    }
    let r = c.batch_put(&ns, vec![item]).await?;
    let status = r
        .results
        .first()
        .copied()
        .ok_or_else(|| CliError::InvalidResponse("BatchPut answered no result".into()))?;
    let stored = status == proto::PutStatus::Stored as i32;
    if g.json {
        out::json_doc(&json!({
            "key": out::key_json(&key),
            "payload_bytes": len,
            "stored": stored,
            "status": proto::PutStatus::try_from(status)
                .map(|s| s.as_str_name().to_string())
                .unwrap_or_else(|_| status.to_string()),
        }))?;
    } else if stored {
        line(format!("stored {} ({len} bytes)", out::key(&key)))?;
    }
    if stored {
        Ok(())
    } else if status == proto::PutStatus::NoSpace as i32 {
        Err(CliError::NotStored(format!(
            "{} not stored: no space (every block that could make room is pinned or being read)",
            out::key(&key)
        )))
    } else if status == proto::PutStatus::DiskFailed as i32 {
        Err(CliError::NotStored(format!(
            "{} not stored: the namespace writes through to disk synchronously and the disk write failed (see the daemon's log)",
            out::key(&key)
        )))
    } else {
        Err(CliError::NotStored(format!(
            "{} not stored: status {status}",
            out::key(&key)
        )))
    }
}

async fn get(
    c: &Client,
    g: &GlobalArgs,
    ns: &str,
    key: &str,
    path: Option<&Path>,
) -> Result<(), CliError> {
    let ns = namespace(c, ns).await?;
    let key = parse_key(key)?;
    let r = c
        .batch_get(&ns, &[&key])
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| CliError::InvalidResponse("BatchGet answered no result".into()))?;
    if !r.found {
        return Err(CliError::NotFound(format!(
            "{} is not cached in namespace {ns}",
            out::key(&key)
        )));
    }
    let hash = out::xxh3_hex(xxhash_rust::xxh3::xxh3_64(&r.payload));
    match path {
        Some(p) if p == Path::new("-") => return out::raw(&r.payload),
        Some(p) => {
            tokio::fs::write(p, &r.payload)
                .await
                .map_err(|source| CliError::Io {
                    path: p.display().to_string(),
                    source,
                })?;
        }
        None => {}
    }
    if g.json {
        return out::json_doc(&json!({
            "key": out::key_json(&r.key),
            "tier": out::tier_name(r.tier),
            "payload_bytes": r.payload.len(),
            "payload_xxh3": hash,
            "written_to": path.map(|p| p.display().to_string()),
        }));
    }
    match path {
        Some(p) => line(format!(
            "wrote {} bytes of {} to {}",
            r.payload.len(),
            out::key(&r.key),
            p.display()
        )),
        None => line(out::fields(vec![
            ("key", out::key(&r.key)),
            ("tier", out::tier_name(r.tier)),
            (
                "payload",
                format!(
                    "{} bytes ({})",
                    r.payload.len(),
                    out::size(r.payload.len() as u64)
                ),
            ),
            ("xxh3-64", hash),
        ])),
    }
}

async fn delete(c: &Client, g: &GlobalArgs, ns: &str, keys: &[String]) -> Result<(), CliError> {
    let keys = parse_keys(keys)?;
    let ns = namespace(c, ns).await?;
    let r = c.delete(&ns, &keys).await?;
    if g.json {
        return out::json_doc(&json!({ "requested": keys.len(), "deleted": r.deleted }));
    }
    line(format!("deleted {} of {} blocks", r.deleted, keys.len()))
}

async fn evict(
    c: &Client,
    g: &GlobalArgs,
    ns: &str,
    keys: &[String],
    all: bool,
) -> Result<(), CliError> {
    let keys = parse_keys(keys)?;
    let ns = namespace(c, ns).await?;
    let r = c.evict(&ns, &keys, all).await?;
    if g.json {
        return out::json_doc(&json!({
            "evicted": r.evicted,
            "skipped_pinned": r.skipped_pinned,
        }));
    }
    line(format!(
        "evicted {} blocks, {} skipped (pinned)",
        r.evicted, r.skipped_pinned
    ))
}

async fn lookup(c: &Client, g: &GlobalArgs, ns: &str, keys: &[String]) -> Result<(), CliError> {
    let keys = parse_keys(keys)?;
    let ns = namespace(c, ns).await?;
    let r = c.lookup(&ns, &keys).await?;
    let matched = r.matched as usize;
    if g.json {
        let tiers: Vec<_> = r.tiers.iter().map(|t| out::tier_name(*t)).collect();
        return out::json_doc(&json!({
            "requested": keys.len(),
            "matched": r.matched,
            "tiers": tiers,
        }));
    }
    let mut t = out::table(&["#", "key", "tier"], &[0]);
    for (i, k) in keys.iter().enumerate() {
        let tier = if i < matched {
            r.tiers
                .get(i)
                .map_or_else(|| "hit".into(), |t| out::tier_name(*t))
        } else {
            "miss".into()
        };
        t.add_row(vec![i.to_string(), out::key(k), tier]);
    }
    line(t)?;
    line(format!("matched {matched} of {} keys", keys.len()))
}

async fn pin(
    c: &Client,
    g: &GlobalArgs,
    ns: &str,
    lease: Duration,
    keys: &[String],
) -> Result<(), CliError> {
    let keys = parse_keys(keys)?;
    let ns = namespace(c, ns).await?;
    let r = c.pin(&ns, &keys, lease).await?;
    if g.json {
        return out::json_doc(&json!({
            "lease_id": r.lease_id,
            "deadline_unix_ms": r.deadline_unix_ms,
            "keys": keys.len(),
        }));
    }
    line(format!(
        "lease {} pins {} blocks until {}",
        r.lease_id,
        keys.len(),
        out::unix_ms(r.deadline_unix_ms)
    ))
}

async fn unpin(c: &Client, g: &GlobalArgs, lease_id: u64) -> Result<(), CliError> {
    c.unpin(lease_id).await?;
    if g.json {
        return out::json_doc(&json!({ "lease_id": lease_id, "unpinned": true }));
    }
    line(format!("lease {lease_id} ended"))
}

async fn watch(
    c: &Client,
    g: &GlobalArgs,
    ns: Option<&str>,
    count: Option<u64>,
) -> Result<(), CliError> {
    if count == Some(0) {
        return Ok(());
    }
    let ns = match ns {
        Some(a) => Some(namespace(c, a).await?),
        None => None,
    };
    let mut events = c.watch(ns.as_ref()).await?;
    let mut seen = 0u64;
    while let Some(e) = events.next().await {
        let e = e?;
        if g.json {
            out::json_line(&out::event_json(&e))?;
        } else {
            line(out::event_line(&e))?;
        }
        seen += 1;
        if count.is_some_and(|n| seen >= n) {
            break;
        }
    }
    Ok(())
}
