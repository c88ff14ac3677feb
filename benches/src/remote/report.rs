//! The report of a `bench-remote` run: per size, path and direction, the
//! kvstrata / raw ratios, the tier's own counters, and the human table,
//! markdown table and JSON.

use kvstrata_tiers::RemoteStats;
use serde::Serialize;

use crate::error::BenchError;
use crate::report::OpReport;

/// One direction (write or read) of one path.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RemotePhaseReport {
    /// Sum of the batches' wall times: the time the caller waited on the
    /// store. GB/s and blocks/s are over this time.
    pub seconds: f64,
    /// Wall time of the whole phase, the bench's payload generation and
    /// byte-for-byte checks between batches included.
    pub phase_seconds: f64,
    /// CPU time (user + system, all threads) this process used during the
    /// batches: the client side's cost (not the Redis servers').
    pub cpu_seconds: f64,
    /// `cpu_seconds` per decimal GB of payload.
    pub cpu_s_per_gb: f64,
    /// Batches (`rpcs`), blocks, payload bytes and rates, per-batch latency.
    #[serde(flatten)]
    pub op: OpReport,
}

/// Write then read of one path.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RemotePathReport {
    /// Bytes of one value on the cluster (the tier adds its 200-byte record header).
    pub value_bytes: u64,
    pub write: RemotePhaseReport,
    pub read: RemotePhaseReport,
    /// Blocks read back and checked byte for byte (all of them).
    pub verified_blocks: u64,
    /// Blocks read back wrong or missing (0: the run fails otherwise).
    pub verify_failures: u64,
}

/// kvstrata / raw.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RemoteRatios {
    /// Write GB/s ratio (higher is better for kvstrata).
    pub write_gb_per_s: f64,
    /// Read GB/s ratio.
    pub read_gb_per_s: f64,
    /// Write p99 ratio (lower is better for kvstrata).
    pub write_p99: f64,
    /// Read p99 ratio.
    pub read_p99: f64,
}

impl RemoteRatios {
    /// The ratios of path `kv` to path `raw`.
    pub(super) fn between(kv: &RemotePathReport, raw: &RemotePathReport) -> Self {
        RemoteRatios {
            write_gb_per_s: div(kv.write.op.gb_per_s, raw.write.op.gb_per_s),
            read_gb_per_s: div(kv.read.op.gb_per_s, raw.read.op.gb_per_s),
            write_p99: div(kv.write.op.p99_us, raw.write.op.p99_us),
            read_p99: div(kv.read.op.p99_us, raw.read.op.p99_us),
        }
    }
}

/// Both paths at one block size.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RemoteSizeReport {
    pub block_size: u64,
    /// Blocks written and read per round and path.
    pub blocks: u64,
    /// Through [`RemoteTier`](kvstrata_tiers::RemoteTier).
    pub kvstrata: RemotePathReport,
    /// The same cluster through the redis crate directly.
    pub raw: RemotePathReport,
    /// kvstrata / raw.
    pub ratio: RemoteRatios,
}

impl RemoteSizeReport {
    /// Write then read: (op, kvstrata phase, raw phase, GB/s ratio, p99 ratio).
    fn directions(
        &self,
    ) -> [(
        &'static str,
        &RemotePhaseReport,
        &RemotePhaseReport,
        f64,
        f64,
    ); 2] {
        [
            (
                "write",
                &self.kvstrata.write,
                &self.raw.write,
                self.ratio.write_gb_per_s,
                self.ratio.write_p99,
            ),
            (
                "read",
                &self.kvstrata.read,
                &self.raw.read,
                self.ratio.read_gb_per_s,
                self.ratio.read_p99,
            ),
        ]
    }
}

/// The tier's own counters after the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RemoteTierCounters {
    pub writes: u64,
    pub write_bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub read_bytes: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub corrupt_blocks: u64,
}

impl From<&RemoteStats> for RemoteTierCounters {
    fn from(s: &RemoteStats) -> Self {
        RemoteTierCounters {
            writes: s.writes,
            write_bytes: s.write_bytes,
            hits: s.hits,
            misses: s.misses,
            read_bytes: s.read_bytes,
            errors: s.errors,
            timeouts: s.timeouts,
            corrupt_blocks: s.corrupt_blocks,
        }
    }
}

/// Everything a run measured, with the settings it ran under.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RemoteBenchReport {
    /// Seed nodes.
    pub nodes: Vec<String>,
    /// Blocks per batch (commands in flight).
    pub concurrency: usize,
    /// Rounds per block size (alternating which path goes first); every
    /// figure sums all rounds.
    pub rounds: u32,
    /// Per-command deadline of both paths.
    pub deadline_ms: u64,
    /// Prefix of the tier's keys; the raw path uses `<prefix>-raw`.
    pub key_prefix: String,
    pub sizes: Vec<RemoteSizeReport>,
    pub tier: RemoteTierCounters,
}

/// `256 KiB`, `1 MiB`, or bytes when not a whole number of KiB.
pub(super) fn size_label(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} B")
    }
}

fn ms(us: f64) -> f64 {
    us / 1000.0
}

pub(super) fn div(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

impl RemoteBenchReport {
    /// Pretty-printed JSON.
    pub fn to_json(&self) -> Result<String, BenchError> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    fn title(&self) -> String {
        format!(
            "kvstrata bench-remote: {} seed node{} ({}), {} blocks x {} round{} per size and path \
             (alternating which path goes first), batches of {} in flight, deadline {} ms",
            self.nodes.len(),
            if self.nodes.len() == 1 { "" } else { "s" },
            self.nodes.join(", "),
            self.sizes.first().map_or(0, |s| s.blocks),
            self.rounds,
            if self.rounds == 1 { "" } else { "s" },
            self.concurrency,
            self.deadline_ms
        )
    }

    /// The report as a human-readable table.
    pub fn human(&self) -> String {
        let mut out = self.title();
        out.push('\n');
        out.push_str(
            "kvstrata: RemoteTier put_many / get_many (value = 200-byte record header + payload, verified); \
             raw: redis cluster-async SET / GET of the payload\n\n",
        );
        out.push_str(&format!(
            "{:<8} {:<6} {:<9} {:>7} {:>8} {:>7} {:>8} {:>8} {:>8} {:>9} {:>11} {:>9}\n",
            "block",
            "op",
            "path",
            "blocks",
            "seconds",
            "GB/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "CPU s/GB",
            "GB/s ratio",
            "p99 ratio"
        ));
        for s in &self.sizes {
            let size = size_label(s.block_size as usize);
            for (op, kv, raw, gr, pr) in s.directions() {
                for (path, p, ratios) in [("kvstrata", kv, Some((gr, pr))), ("raw", raw, None)] {
                    let (g, q) = match ratios {
                        Some((g, q)) => (format!("{g:.2}"), format!("{q:.2}")),
                        None => ("-".into(), "-".into()),
                    };
                    out.push_str(&format!(
                        "{:<8} {:<6} {:<9} {:>7} {:>8.3} {:>7.3} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>11} {:>9}\n",
                        size,
                        op,
                        path,
                        p.op.blocks,
                        p.seconds,
                        p.op.gb_per_s,
                        ms(p.op.p50_us),
                        ms(p.op.p99_us),
                        ms(p.op.max_us),
                        p.cpu_s_per_gb,
                        g,
                        q
                    ));
                }
            }
        }
        let verified: u64 = self
            .sizes
            .iter()
            .map(|s| s.kvstrata.verified_blocks + s.raw.verified_blocks)
            .sum();
        out.push_str(&format!(
            "\nverification: {verified} blocks read back, all correct; tier counters: {} errors, {} timeouts, {} corrupt\n",
            self.tier.errors, self.tier.timeouts, self.tier.corrupt_blocks
        ));
        out
    }

    /// The report as a markdown table (one row per block size and direction).
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!("{}\n\n", self.title()));
        out.push_str(
            "| block size | op | blocks | kvstrata GB/s | raw cluster GB/s | GB/s kvstrata/raw | \
             kvstrata p50 / p99 (ms) | raw p50 / p99 (ms) | p99 kvstrata/raw | \
             client CPU s/GB, kvstrata / raw |\n",
        );
        out.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for s in &self.sizes {
            let size = size_label(s.block_size as usize);
            for (op, kv, raw, gr, pr) in s.directions() {
                out.push_str(&format!(
                    "| {} | {} | {} | {:.3} | {:.3} | **{:.2}** | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} | {:.2} / {:.2} |\n",
                    size,
                    op,
                    kv.op.blocks,
                    kv.op.gb_per_s,
                    raw.op.gb_per_s,
                    gr,
                    ms(kv.op.p50_us),
                    ms(kv.op.p99_us),
                    ms(raw.op.p50_us),
                    ms(raw.op.p99_us),
                    pr,
                    kv.cpu_s_per_gb,
                    raw.cpu_s_per_gb
                ));
            }
        }
        let verified: u64 = self
            .sizes
            .iter()
            .map(|s| s.kvstrata.verified_blocks + s.raw.verified_blocks)
            .sum();
        out.push_str(&format!(
            "\nLatency is per batch of {} blocks. Client CPU: user + system seconds of this process (all threads) \
             during the batches, per GB of payload. {verified} blocks read back and checked byte for byte, \
             all correct; tier counters: {} errors, {} timeouts, {} corrupt.\n",
            self.concurrency, self.tier.errors, self.tier.timeouts, self.tier.corrupt_blocks
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_show_both_paths_and_ratios() {
        let phase = |gb: f64, p99: f64| RemotePhaseReport {
            seconds: 1.0,
            phase_seconds: 1.1,
            cpu_seconds: 0.5,
            cpu_s_per_gb: 0.25,
            op: OpReport {
                blocks: 16,
                gb_per_s: gb,
                p50_us: p99 / 2.0,
                p99_us: p99,
                ..OpReport::default()
            },
        };
        let path = |gb: f64| RemotePathReport {
            value_bytes: 1,
            write: phase(gb, 2000.0),
            read: phase(gb * 2.0, 1000.0),
            verified_blocks: 16,
            verify_failures: 0,
        };
        let r = RemoteBenchReport {
            nodes: vec!["redis://x:1".into()],
            concurrency: 16,
            rounds: 1,
            deadline_ms: 5000,
            key_prefix: "p".into(),
            sizes: vec![RemoteSizeReport {
                block_size: 1 << 20,
                blocks: 16,
                kvstrata: path(0.5),
                raw: path(1.0),
                ratio: RemoteRatios {
                    write_gb_per_s: 0.5,
                    read_gb_per_s: 0.5,
                    write_p99: 1.0,
                    read_p99: 1.0,
                },
            }],
            tier: RemoteTierCounters::default(),
        };
        let md = r.markdown();
        assert!(md.contains("| 1 MiB | write | 16 | 0.500 | 1.000 | **0.50** | 1.00 / 2.00 | 1.00 / 2.00 | 1.00 | 0.25 / 0.25 |"), "{md}");
        let h = r.human();
        assert!(
            h.contains("kvstrata") && h.contains("raw") && h.contains("all correct"),
            "{h}"
        );
        let json: serde_json::Value = serde_json::from_str(&r.to_json().unwrap()).unwrap();
        assert_eq!(json["sizes"][0]["raw"]["read"]["gb_per_s"], 2.0);
        assert_eq!(json["sizes"][0]["ratio"]["read_gb_per_s"], 0.5);
    }
}
