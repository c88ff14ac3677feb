//! The cache's metrics, read from [`BlockCache::stats`] at scrape time: one
//! family per tier counter (labelled by tier), then the disk, movement, HBM
//! and remote details of the tiers configured, then the cache-wide totals.

use std::sync::Arc;

use kvstrata_tiers::movement::MovementStats;
use kvstrata_tiers::{
    BlockCache, CacheStats, DiskStats, HbmStats, RemoteStats, TierKind, TierStats,
};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use super::family::{Kind, family, single, single_f64_gauge};

type EncodeResult = Result<(), std::fmt::Error>;

#[derive(Debug)]
pub(super) struct CacheCollector {
    pub(super) cache: Arc<BlockCache>,
}

impl Collector for CacheCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> EncodeResult {
        let s = self.cache.stats();
        encode_tiers(&mut encoder, &s)?;
        if let Some(d) = &s.disk {
            encode_disk(&mut encoder, d)?;
        }
        if let Some(m) = &s.movement {
            encode_movement(&mut encoder, m)?;
        }
        if !s.hbm.is_empty() {
            encode_hbm(&mut encoder, &s.hbm)?;
        }
        if let Some(r) = &s.remote {
            encode_remote(&mut encoder, r)?;
        }
        encode_totals(&mut encoder, &s)
    }
}

/// The `tier` label of each row of `s.tiers`: the tier's name, or with
/// several GPUs, one `hbm<ordinal>` per device.
fn tier_labels(s: &CacheStats) -> Vec<String> {
    let mut hbm_seen = 0;
    s.tiers
        .iter()
        .map(|(k, _)| match k {
            TierKind::Hbm if s.hbm.len() > 1 => {
                let ordinal = s.hbm.get(hbm_seen).map(|h| h.ordinal).unwrap_or(hbm_seen);
                hbm_seen += 1;
                format!("hbm{ordinal}")
            }
            k => k.name().to_string(),
        })
        .collect()
}

/// Every tier's occupancy and traffic, one family per counter.
fn encode_tiers(encoder: &mut DescriptorEncoder, s: &CacheStats) -> EncodeResult {
    let labels = tier_labels(s);
    let per = |f: fn(&TierStats) -> u64| -> Vec<(&str, u64)> {
        s.tiers
            .iter()
            .zip(&labels)
            .map(|((_, t), l)| (l.as_str(), f(t)))
            .collect()
    };
    type TierMetric = (Kind, &'static str, &'static str, fn(&TierStats) -> u64);
    let tier_metrics: [TierMetric; 10] = [
        (
            Kind::Gauge,
            "kvstrata_tier_capacity_bytes",
            "Configured capacity",
            |t| t.capacity_bytes,
        ),
        (
            Kind::Gauge,
            "kvstrata_tier_used_bytes",
            "Bytes in use (never above capacity)",
            |t| t.used_bytes,
        ),
        (Kind::Gauge, "kvstrata_tier_blocks", "Blocks held", |t| {
            t.blocks
        }),
        (
            Kind::Gauge,
            "kvstrata_tier_pinned_blocks",
            "Blocks pinned by leases",
            |t| t.pinned_blocks,
        ),
        (Kind::Counter, "kvstrata_tier_hits", "Reads served", |t| {
            t.hits
        }),
        (
            Kind::Counter,
            "kvstrata_tier_misses",
            "Reads that found nothing",
            |t| t.misses,
        ),
        (
            Kind::Counter,
            "kvstrata_tier_evictions",
            "Blocks evicted",
            |t| t.evictions,
        ),
        (
            Kind::Counter,
            "kvstrata_tier_bytes_in",
            "Payload bytes written",
            |t| t.bytes_in,
        ),
        (
            Kind::Counter,
            "kvstrata_tier_bytes_out",
            "Payload bytes read",
            |t| t.bytes_out,
        ),
        (
            Kind::Counter,
            "kvstrata_tier_rejected_puts",
            "Puts refused because everything evictable was pinned or being read",
            |t| t.rejected_puts,
        ),
    ];
    for (kind, name, help, f) in tier_metrics {
        family(encoder, kind, name, help, "tier", &per(f))?;
    }
    Ok(())
}

/// The disk tier's fault counters, traffic and I/O engine.
fn encode_disk(encoder: &mut DescriptorEncoder, d: &DiskStats) -> EncodeResult {
    let disk: [(&str, &str, u64); 6] = [
        (
            "kvstrata_disk_corrupt_blocks",
            "Disk slots that failed verification (dropped; each read answered a miss)",
            d.corrupt_blocks,
        ),
        (
            "kvstrata_disk_io_errors",
            "Disk transfers that failed or were short, and failed index writes",
            d.io_errors,
        ),
        (
            "kvstrata_disk_timeouts",
            "Disk transfers abandoned at their deadline",
            d.timeouts,
        ),
        (
            "kvstrata_disk_read_bytes",
            "Bytes read from slot files (headers included)",
            d.read_bytes,
        ),
        (
            "kvstrata_disk_write_bytes",
            "Bytes written to slot files (headers included)",
            d.write_bytes,
        ),
        (
            "kvstrata_disk_busy_read_ms",
            "Milliseconds with at least one disk read in flight",
            d.read_busy.as_millis() as u64,
        ),
    ];
    for (name, help, v) in disk {
        single(encoder, Kind::Counter, name, help, v)?;
    }
    family(
        encoder,
        Kind::Gauge,
        "kvstrata_disk_engine",
        "The disk I/O engine in use (1 for the engine's label)",
        "engine",
        &[(d.engine, 1)],
    )
}

/// Blocks moving between the host and disk tiers.
fn encode_movement(encoder: &mut DescriptorEncoder, m: &MovementStats) -> EncodeResult {
    let movement: [(Kind, &str, &str, u64); 8] = [
        (
            Kind::Counter,
            "kvstrata_demoted_blocks",
            "Blocks written to disk by the demotion writer",
            m.demoted,
        ),
        (
            Kind::Counter,
            "kvstrata_demote_dropped_blocks",
            "Evictions dropped because the demotion queue was full",
            m.demote_dropped,
        ),
        (
            Kind::Counter,
            "kvstrata_demote_failed_blocks",
            "Demotions the disk refused or a newer put made stale",
            m.demote_failed,
        ),
        (
            Kind::Counter,
            "kvstrata_demote_skipped_blocks",
            "Evictions not written because the disk held the same bytes",
            m.demote_skipped,
        ),
        (
            Kind::Gauge,
            "kvstrata_demote_queued_bytes",
            "Payload bytes waiting in the demotion queue",
            m.queued_bytes,
        ),
        (
            Kind::Counter,
            "kvstrata_promoted_blocks",
            "Blocks copied from disk into host memory by reads",
            m.promoted,
        ),
        (
            Kind::Counter,
            "kvstrata_write_through_blocks",
            "Write-through copies queued",
            m.write_through,
        ),
        (
            Kind::Counter,
            "kvstrata_sync_write_failed_blocks",
            "Puts of sync_write_through namespaces not stored: the disk write failed",
            m.sync_write_failed,
        ),
    ];
    for (kind, name, help, v) in movement {
        single(encoder, kind, name, help, v)?;
    }
    Ok(())
}

/// Blocks moving in and out of each device's HBM tier, one sample per
/// device, labelled by its ordinal.
fn encode_hbm(encoder: &mut DescriptorEncoder, hbm: &[HbmStats]) -> EncodeResult {
    let devices: Vec<String> = hbm.iter().map(|h| h.ordinal.to_string()).collect();
    type Get = fn(&HbmStats) -> u64;
    let metrics: [(Kind, &str, &str, Get); 9] = [
        (
            Kind::Counter,
            "kvstrata_hbm_demoted_blocks",
            "Blocks copied from the HBM tier to the host tier",
            |h| h.demoted,
        ),
        (
            Kind::Counter,
            "kvstrata_hbm_demote_skipped_blocks",
            "Blocks that left the HBM tier without a copy (the host tier held the same bytes)",
            |h| h.demote_skipped,
        ),
        (
            Kind::Counter,
            "kvstrata_hbm_demote_dropped_blocks",
            "Blocks dropped on the way out of the HBM tier (no host room, failed copy or check)",
            |h| h.demote_dropped,
        ),
        (
            Kind::Counter,
            "kvstrata_hbm_promoted_blocks",
            "Blocks copied from the host tier into the HBM tier",
            |h| h.promoted,
        ),
        (
            Kind::Counter,
            "kvstrata_hbm_checksum_failures",
            "Blocks whose bytes did not match their checksum on the way out of the HBM tier (dropped)",
            |h| h.checksum_failures,
        ),
        (
            Kind::Gauge,
            "kvstrata_hbm_draining_blocks",
            "Blocks whose copy out of the HBM tier is in flight",
            |h| h.draining,
        ),
        (
            Kind::Gauge,
            "kvstrata_gpu_staging_cached_bytes",
            "Pinned staging buffers a device keeps for reuse",
            |h| h.staging_cached_bytes,
        ),
        (
            Kind::Counter,
            "kvstrata_gpu_device_staging_waits",
            "Requests that found every device staging set lent and waited for one",
            |h| h.device_staging_waits,
        ),
        (
            Kind::Counter,
            "kvstrata_gpu_device_staging_bypasses",
            "Requests that moved host-tier blocks without device staging (slower: every set still lent after the wait, or no device memory)",
            |h| h.device_staging_bypasses,
        ),
    ];
    for (kind, name, help, get) in metrics {
        let values: Vec<(&str, u64)> = hbm
            .iter()
            .zip(&devices)
            .map(|(h, d)| (d.as_str(), get(h)))
            .collect();
        family(encoder, kind, name, help, "device", &values)?;
    }
    Ok(())
}

/// The remote tier's connection, traffic and queue.
fn encode_remote(encoder: &mut DescriptorEncoder, r: &RemoteStats) -> EncodeResult {
    let remote: [(Kind, &str, &str, u64); 15] = [
        (
            Kind::Gauge,
            "kvstrata_remote_connected",
            "1 while a cluster connection is held",
            u64::from(r.connected),
        ),
        (
            Kind::Counter,
            "kvstrata_remote_hits",
            "Reads answered from the cluster",
            r.hits,
        ),
        (
            Kind::Counter,
            "kvstrata_remote_misses",
            "Reads the cluster could not answer (absent, error, deadline, corrupt)",
            r.misses,
        ),
        (
            Kind::Counter,
            "kvstrata_remote_errors",
            "Cluster commands that failed",
            r.errors,
        ),
        (
            Kind::Counter,
            "kvstrata_remote_timeouts",
            "Cluster commands abandoned at their deadline",
            r.timeouts,
        ),
        (
            Kind::Counter,
            "kvstrata_remote_corrupt_blocks",
            "Values that failed verification (read as misses, then deleted)",
            r.corrupt_blocks,
        ),
        (
            Kind::Counter,
            "kvstrata_remote_writes",
            "Blocks written to the cluster",
            r.writes,
        ),
        (
            Kind::Counter,
            "kvstrata_remote_write_bytes",
            "Payload bytes written to the cluster",
            r.write_bytes,
        ),
        (
            Kind::Counter,
            "kvstrata_remote_read_bytes",
            "Payload bytes read from the cluster",
            r.read_bytes,
        ),
        (
            Kind::Counter,
            "kvstrata_remote_deletes",
            "Keys deleted on the cluster",
            r.deletes,
        ),
        (
            Kind::Counter,
            "kvstrata_remote_queue_dropped",
            "Writes dropped because the queue was full",
            r.queue_dropped,
        ),
        (
            Kind::Gauge,
            "kvstrata_remote_queued_bytes",
            "Payload bytes waiting for the cluster",
            r.queued_bytes,
        ),
        (
            Kind::Counter,
            "kvstrata_remote_promoted_blocks",
            "Blocks copied from the cluster into host memory by reads",
            r.promoted,
        ),
        (
            Kind::Counter,
            "kvstrata_remote_demoted_blocks",
            "Host-tier evictions queued for the cluster",
            r.demoted,
        ),
        (
            Kind::Counter,
            "kvstrata_remote_connect_failures",
            "Failed attempts to connect to the cluster",
            r.connect_failures,
        ),
    ];
    for (kind, name, help, v) in remote {
        single(encoder, kind, name, help, v)?;
    }
    Ok(())
}

/// Namespaces, leases, lookups, events and uptime.
fn encode_totals(encoder: &mut DescriptorEncoder, s: &CacheStats) -> EncodeResult {
    single(
        encoder,
        Kind::Gauge,
        "kvstrata_namespaces",
        "Registered namespaces",
        u64::from(s.namespaces),
    )?;
    single(
        encoder,
        Kind::Gauge,
        "kvstrata_leases_active",
        "Leases not yet ended",
        u64::from(s.active_leases),
    )?;
    single(
        encoder,
        Kind::Counter,
        "kvstrata_lookups",
        "Lookup requests",
        s.lookups,
    )?;
    single(
        encoder,
        Kind::Counter,
        "kvstrata_events",
        "Watch events published",
        s.event_seq,
    )?;
    single_f64_gauge(
        encoder,
        "kvstrata_uptime_seconds",
        "Seconds since start",
        s.uptime.as_secs_f64(),
    )
}
