//! Benchmark results: per-op counters and latency histograms, and the report
//! derived from them (rates, decimal GB/s, percentiles in microseconds).

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::error::BenchError;

/// Highest latency the histograms track (one hour, in nanoseconds); larger
/// values are clamped.
const MAX_LATENCY_NS: u64 = 3_600 * 1_000_000_000;
/// Significant decimal digits of the histograms.
const SIGFIGS: u8 = 3;

/// Counters and latencies of one op kind, as gathered by the client tasks.
#[derive(Debug, Clone)]
pub struct OpAccum {
    /// Per-RPC latency in nanoseconds.
    pub hist: Histogram<u64>,
    /// RPCs completed.
    pub rpcs: u64,
    /// Blocks requested (get) or sent (put).
    pub blocks: u64,
    /// Get: blocks found. Put: blocks stored.
    pub hits: u64,
    /// Get: blocks not found.
    pub misses: u64,
    /// Put: blocks refused for lack of space.
    pub rejected: u64,
    /// Payload bytes moved (get: bytes of found blocks; put: bytes sent).
    pub bytes: u64,
}

impl OpAccum {
    /// Empty counters.
    pub fn new() -> Result<Self, BenchError> {
        let hist = Histogram::new_with_bounds(1, MAX_LATENCY_NS, SIGFIGS)
            .map_err(|e| BenchError::Histogram(e.to_string()))?;
        Ok(OpAccum {
            hist,
            rpcs: 0,
            blocks: 0,
            hits: 0,
            misses: 0,
            rejected: 0,
            bytes: 0,
        })
    }

    /// Records one RPC's latency.
    pub fn record_latency(&mut self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.hist.saturating_record(ns.clamp(1, MAX_LATENCY_NS));
        self.rpcs += 1;
    }

    /// Adds another task's counters.
    pub fn merge(&mut self, other: &OpAccum) -> Result<(), BenchError> {
        self.hist
            .add(&other.hist)
            .map_err(|e| BenchError::Histogram(format!("{e:?}")))?;
        self.rpcs += other.rpcs;
        self.blocks += other.blocks;
        self.hits += other.hits;
        self.misses += other.misses;
        self.rejected += other.rejected;
        self.bytes += other.bytes;
        Ok(())
    }
}

/// `count / secs`, or 0 when no time passed.
pub fn rate(count: u64, secs: f64) -> f64 {
    if secs > 0.0 { count as f64 / secs } else { 0.0 }
}

/// Decimal gigabytes per second.
pub fn gb_per_s(bytes: u64, secs: f64) -> f64 {
    rate(bytes, secs) / 1e9
}

fn quantile_us(hist: &Histogram<u64>, q: f64) -> f64 {
    if hist.is_empty() {
        0.0
    } else {
        hist.value_at_quantile(q) as f64 / 1_000.0
    }
}

/// Results of one op kind over the measured phase.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OpReport {
    pub rpcs: u64,
    /// Blocks requested (get) or sent (put).
    pub blocks: u64,
    /// Get: blocks found. Put: blocks stored.
    pub hits: u64,
    /// Get: blocks not found (evicted or never stored).
    pub misses: u64,
    /// Put: blocks refused for lack of space.
    pub rejected: u64,
    /// Payload bytes moved.
    pub bytes: u64,
    /// Blocks per second.
    pub ops_per_s: f64,
    /// Payload bytes per second, decimal GB.
    pub gb_per_s: f64,
    /// Per-RPC latency percentiles, microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

impl OpReport {
    /// Rates and percentiles of `acc` over `secs` seconds.
    pub fn from_accum(acc: &OpAccum, secs: f64) -> Self {
        let h = &acc.hist;
        OpReport {
            rpcs: acc.rpcs,
            blocks: acc.blocks,
            hits: acc.hits,
            misses: acc.misses,
            rejected: acc.rejected,
            bytes: acc.bytes,
            ops_per_s: rate(acc.blocks, secs),
            gb_per_s: gb_per_s(acc.bytes, secs),
            p50_us: quantile_us(h, 0.5),
            p99_us: quantile_us(h, 0.99),
            p999_us: quantile_us(h, 0.999),
            max_us: if h.is_empty() {
                0.0
            } else {
                h.max() as f64 / 1_000.0
            },
            mean_us: if h.is_empty() {
                0.0
            } else {
                h.mean() / 1_000.0
            },
        }
    }
}

/// The pre-population of the working set.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PopulateReport {
    /// Blocks sent.
    pub blocks: u64,
    /// Blocks refused for lack of space.
    pub rejected: u64,
    pub seconds: f64,
    pub gb_per_s: f64,
}

/// Everything a run measured, with the settings it ran under.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BenchReport {
    /// Data path (`grpc`, `shm` or `redis`).
    pub mode: String,
    /// `tcp` or `uds` (of the gRPC connection; of the Redis one in redis mode).
    pub transport: String,
    /// The daemon's address (the Redis URL in redis mode).
    pub addr: String,
    /// The daemon's mempool socket (shm mode only).
    pub mempool_socket: Option<String>,
    /// Namespace id, 32 hex digits (empty in redis mode).
    pub namespace_id: String,
    pub block_size: u64,
    pub batch: usize,
    pub concurrency: usize,
    /// Connections opened (1 with --shared-connection).
    pub connections: usize,
    pub read_ratio: f64,
    /// Working-set size in blocks.
    pub keys: u64,
    pub warmup_s: f64,
    /// Length of the measured phase as it actually ran (until the last RPC ended).
    pub measured_s: f64,
    pub verify: bool,
    pub populate: PopulateReport,
    pub get: OpReport,
    pub put: OpReport,
    /// Payload bytes of gets and puts per second, decimal GB.
    pub total_gb_per_s: f64,
    /// Blocks read during the measured phase and warm-up whose bytes were checked.
    pub verified_blocks: u64,
    /// Reads that returned wrong bytes (must be 0).
    pub verify_failures: u64,
    /// Description of the first verification failure.
    pub first_failure: Option<String>,
    /// Single-core memcpy ceiling measured before the run (absent with
    /// `--memcpy-duration 0s`).
    pub memcpy: Option<crate::memcpy::MemcpyReport>,
    /// `get.gb_per_s` / `memcpy.gb_per_s`.
    pub get_vs_memcpy: Option<f64>,
}

impl BenchReport {
    /// Fills in the rates and percentiles from the merged counters.
    pub(crate) fn set_ops(&mut self, get: &OpAccum, put: &OpAccum, secs: f64) {
        self.measured_s = secs;
        self.get = OpReport::from_accum(get, secs);
        self.put = OpReport::from_accum(put, secs);
        self.total_gb_per_s = gb_per_s(get.bytes + put.bytes, secs);
        self.get_vs_memcpy = self
            .memcpy
            .as_ref()
            .filter(|m| m.gb_per_s > 0.0)
            .map(|m| self.get.gb_per_s / m.gb_per_s);
    }

    /// Pretty-printed JSON.
    pub fn to_json(&self) -> Result<String, BenchError> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    /// The report as human-readable lines.
    pub fn human(&self) -> String {
        let mut out = String::new();
        let bs = bytesize::ByteSize::b(self.block_size);
        out.push_str(&format!(
            "kvstrata bench: {} over {} ({}){}{}\n",
            self.mode,
            self.transport,
            self.addr,
            match &self.mempool_socket {
                Some(s) => format!(", pools on {s}"),
                None => String::new(),
            },
            if self.namespace_id.is_empty() {
                String::new()
            } else {
                format!(", namespace {}", self.namespace_id)
            }
        ));
        out.push_str(&format!(
            "block {} ({} B), batch {}, concurrency {} on {} connection{}, read ratio {:.2}\n",
            bs.display().iec(),
            self.block_size,
            self.batch,
            self.concurrency,
            self.connections,
            if self.connections == 1 { "" } else { "s" },
            self.read_ratio
        ));
        out.push_str(&format!(
            "working set {} blocks ({}), populated in {:.2} s ({:.2} GB/s{}); warm-up {:.1} s; measured {:.2} s\n\n",
            self.keys,
            bytesize::ByteSize::b(self.keys.saturating_mul(self.block_size))
                .display()
                .iec(),
            self.populate.seconds,
            self.populate.gb_per_s,
            if self.populate.rejected > 0 {
                format!(", {} rejected", self.populate.rejected)
            } else {
                String::new()
            },
            self.warmup_s,
            self.measured_s
        ));
        out.push_str(&format!(
            "{:<4} {:>9} {:>10} {:>11} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
            "op",
            "rpcs",
            "blocks",
            "blocks/s",
            "GB/s",
            "p50 us",
            "p99 us",
            "p999 us",
            "misses",
            "rejected"
        ));
        for (name, op) in [("get", &self.get), ("put", &self.put)] {
            out.push_str(&format!(
                "{:<4} {:>9} {:>10} {:>11.0} {:>7.2} {:>9.1} {:>9.1} {:>9.1} {:>9} {:>9}\n",
                name,
                op.rpcs,
                op.blocks,
                op.ops_per_s,
                op.gb_per_s,
                op.p50_us,
                op.p99_us,
                op.p999_us,
                op.misses,
                op.rejected
            ));
        }
        out.push_str(&format!("total {:.2} GB/s\n", self.total_gb_per_s));
        if let Some(m) = &self.memcpy {
            out.push_str(&format!(
                "memcpy ceiling (1 core, {} copies, 2 x {} working sets): {:.2} GB/s; get = {:.2} of it\n",
                bytesize::ByteSize::b(m.block_size).display().iec(),
                bytesize::ByteSize::b(m.working_set_bytes).display().iec(),
                m.gb_per_s,
                self.get_vs_memcpy.unwrap_or(0.0)
            ));
        }
        if !self.verify {
            out.push_str("verification: off (--no-verify)\n");
        } else if self.verify_failures == 0 {
            out.push_str(&format!(
                "verification: {} blocks read, all correct\n",
                self.verified_blocks
            ));
        } else {
            out.push_str(&format!(
                "!!! VERIFY FAILED: {} of {} blocks read back WRONG BYTES; first: {}\n",
                self.verify_failures,
                self.verified_blocks,
                self.first_failure.as_deref().unwrap_or("?")
            ));
        }
        out
    }

    /// Prints [`BenchReport::human`] to stdout.
    pub fn print_human(&self) {
        print!("{}", self.human());
    }
}

/// CPU time (user + system, all threads) this process has used so far.
pub(crate) fn process_cpu() -> Duration {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given a pointer to; it was
    // zeroed, so it is initialised even if the call failed.
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
        ru.assume_init()
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_per_second_and_decimal() {
        assert_eq!(rate(100, 2.0), 50.0);
        assert_eq!(rate(100, 0.0), 0.0);
        assert_eq!(gb_per_s(3_000_000_000, 1.5), 2.0);
    }

    #[test]
    fn op_report_maths() {
        let mut acc = OpAccum::new().unwrap();
        for us in 1..=1000u64 {
            acc.record_latency(Duration::from_micros(us));
        }
        acc.blocks = 4000;
        acc.hits = 3990;
        acc.misses = 10;
        acc.bytes = 3990 * 262_144;
        let r = OpReport::from_accum(&acc, 2.0);
        assert_eq!(r.rpcs, 1000);
        assert_eq!(r.ops_per_s, 2000.0);
        assert!((r.gb_per_s - 3990.0 * 262_144.0 / 2.0 / 1e9).abs() < 1e-12);
        // 3 significant digits: within 0.1 %.
        assert!((r.p50_us - 500.0).abs() <= 1.0, "{}", r.p50_us);
        assert!((r.p99_us - 990.0).abs() <= 1.0, "{}", r.p99_us);
        assert!((r.p999_us - 999.0).abs() <= 1.0, "{}", r.p999_us);
        assert!((r.max_us - 1000.0).abs() <= 1.0, "{}", r.max_us);
        assert!((r.mean_us - 500.5).abs() <= 1.0, "{}", r.mean_us);
    }

    #[test]
    fn empty_ops_report_zeros() {
        let r = OpReport::from_accum(&OpAccum::new().unwrap(), 10.0);
        assert_eq!(r, OpReport::default());
    }

    #[test]
    fn merging_adds_counts_and_latencies() {
        let mut a = OpAccum::new().unwrap();
        let mut b = OpAccum::new().unwrap();
        a.record_latency(Duration::from_micros(10));
        a.blocks = 4;
        a.bytes = 40;
        b.record_latency(Duration::from_micros(30));
        b.record_latency(Duration::ZERO);
        b.blocks = 8;
        b.bytes = 80;
        b.misses = 1;
        a.merge(&b).unwrap();
        assert_eq!(a.rpcs, 3);
        assert_eq!(a.hist.len(), 3);
        assert_eq!((a.blocks, a.bytes, a.misses), (12, 120, 1));
    }

    #[test]
    fn totals_and_human_text() {
        let mut get = OpAccum::new().unwrap();
        let mut put = OpAccum::new().unwrap();
        get.record_latency(Duration::from_micros(100));
        get.bytes = 6_000_000_000;
        get.blocks = 10;
        put.record_latency(Duration::from_micros(200));
        put.bytes = 2_000_000_000;
        let mut r = BenchReport {
            mode: "grpc".into(),
            transport: "uds".into(),
            verify: true,
            connections: 4,
            ..BenchReport::default()
        };
        r.set_ops(&get, &put, 4.0);
        assert_eq!(r.total_gb_per_s, 2.0);
        assert_eq!(r.get.gb_per_s, 1.5);
        assert_eq!(r.put.gb_per_s, 0.5);
        let text = r.human();
        assert!(text.contains("total 2.00 GB/s"), "{text}");
        assert!(!text.contains("memcpy"), "{text}");
        r.memcpy = Some(crate::memcpy::MemcpyReport {
            gb_per_s: 6.0,
            block_size: 1 << 20,
            working_set_bytes: 600 << 20,
            ..Default::default()
        });
        r.set_ops(&get, &put, 4.0);
        assert_eq!(r.get_vs_memcpy, Some(0.25));
        let text = r.human();
        assert!(text.contains("6.00 GB/s; get = 0.25 of it"), "{text}");
        assert!(text.contains("all correct"), "{text}");
        r.verify_failures = 2;
        r.first_failure = Some("boom".into());
        assert!(r.human().contains("VERIFY FAILED: 2"));
        let json: serde_json::Value = serde_json::from_str(&r.to_json().unwrap()).unwrap();
        assert_eq!(json["verify_failures"], 2);
        assert_eq!(json["get"]["gb_per_s"], 1.5);
        assert_eq!(json["mode"], "grpc");
    }
}
