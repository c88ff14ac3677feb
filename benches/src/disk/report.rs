//! The report of a `bench-disk` run: per-phase figures, the settings the
//! run used, and its human table and JSON.

use std::time::Duration;

use bytesize::ByteSize;
use serde::Serialize;

use super::drive::DriveReport;
use crate::error::BenchError;
use crate::report::{OpAccum, OpReport, gb_per_s};

/// One phase (write or read) of the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DiskPhaseReport {
    /// Wall time of the phase, from the first call to the end of the last.
    pub seconds: f64,
    /// Bytes the tier transferred on the drive (headers and padding included).
    pub device_bytes: u64,
    /// `device_bytes` per second, decimal GB.
    pub device_gb_per_s: f64,
    /// Wall time during which the tier had at least one transfer in flight
    /// (its own `read_busy` / `write_busy`); the rest went to the callers'
    /// and the tier's CPU work between transfers.
    pub io_busy_seconds: f64,
    /// The drive's own counters over the phase (Linux block layer), when
    /// the directory is on a block device.
    pub drive: Option<DriveReport>,
    /// Calls (`rpcs`), blocks, payload rates and per-call latency.
    #[serde(flatten)]
    pub op: OpReport,
}

impl DiskPhaseReport {
    /// The report of a phase of `elapsed` whose callers counted `acc`, in
    /// which the tier moved `device_bytes` and had transfers in flight for
    /// `busy`.
    pub(super) fn new(
        acc: &OpAccum,
        elapsed: Duration,
        device_bytes: u64,
        busy: Duration,
        drive: Option<DriveReport>,
    ) -> Self {
        let secs = elapsed.as_secs_f64();
        DiskPhaseReport {
            seconds: secs,
            device_bytes,
            device_gb_per_s: gb_per_s(device_bytes, secs),
            io_busy_seconds: busy.as_secs_f64(),
            drive,
            op: OpReport::from_accum(acc, secs),
        }
    }
}

/// Everything a run measured, with the settings it ran under.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DiskBenchReport {
    /// Directory the tier was created in (removed after the run).
    pub dir: String,
    /// Engine the tier ran on: "io_uring" or "pread".
    pub engine: String,
    /// Whether io_uring transferred through registered (fixed) buffers.
    pub fixed_buffers: bool,
    /// The tier's xxh3 path: "avx2" or "xxhash-rust".
    pub checksum: String,
    pub block_size: u64,
    /// Bytes of one slot on the drive: 4 KiB header region + payload rounded up to 4 KiB.
    pub slot_bytes: u64,
    pub blocks: u64,
    /// Payload bytes per phase.
    pub total_bytes: u64,
    /// Blocks per call, or with `stream` transfers in flight per caller.
    pub queue_depth: usize,
    /// Whether each caller streamed its blocks (put_stream / get_stream,
    /// `queue_depth` in flight) instead of calls of `queue_depth` blocks.
    pub stream: bool,
    pub threads: usize,
    /// Size of the slot file.
    pub capacity_bytes: u64,
    pub write: DiskPhaseReport,
    pub read: DiskPhaseReport,
    /// Blocks read back and checked byte for byte.
    pub verified_blocks: u64,
    /// Blocks read back with wrong bytes (must be 0).
    pub verify_failures: u64,
    /// Description of the first wrong block.
    pub first_failure: Option<String>,
    /// The tier's own counters (must be 0).
    pub io_errors: u64,
    pub timeouts: u64,
    pub corrupt_blocks: u64,
}

impl DiskBenchReport {
    /// Pretty-printed JSON.
    pub fn to_json(&self) -> Result<String, BenchError> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    /// The report as human-readable lines.
    pub fn human(&self) -> String {
        let mut out = self.settings_lines();
        out.push_str(&self.phase_table());
        out.push_str(&self.outcome_lines());
        out
    }

    /// Prints [`DiskBenchReport::human`] to stdout.
    pub fn print_human(&self) {
        print!("{}", self.human());
    }

    /// The two lines naming the engine, directory and workload, and a blank.
    fn settings_lines(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "kvstrata bench-disk: engine {}{}, checksum {}, dir {}\n",
            self.engine,
            if self.fixed_buffers {
                " (fixed buffers)"
            } else {
                ""
            },
            self.checksum,
            self.dir
        ));
        let shape = if self.stream {
            format!("streamed, {} in flight per caller", self.queue_depth)
        } else {
            format!("{} per call", self.queue_depth)
        };
        out.push_str(&format!(
            "block {} ({} B, slot {} B), {} blocks ({} per phase), {shape}, {} caller{}\n\n",
            ByteSize::b(self.block_size).display().iec(),
            self.block_size,
            self.slot_bytes,
            self.blocks,
            ByteSize::b(self.total_bytes).display().iec(),
            self.threads,
            if self.threads == 1 { "" } else { "s" }
        ));
        out
    }

    /// The table of the two phases: a heading and one row each.
    fn phase_table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "{:<5} {:>8} {:>7} {:>8} {:>10} {:>7} {:>11} {:>9} {:>9} {:>9} {:>8}\n",
            "phase",
            "seconds",
            "I/O %",
            "calls",
            "blocks/s",
            "GB/s",
            "device GB/s",
            "p50 us",
            "p99 us",
            "max us",
            "misses"
        ));
        for (name, p) in [("write", &self.write), ("read", &self.read)] {
            let misses = if name == "write" {
                p.op.rejected
            } else {
                p.op.misses
            };
            out.push_str(&format!(
                "{:<5} {:>8.2} {:>7.1} {:>8} {:>10.0} {:>7.2} {:>11.2} {:>9.1} {:>9.1} {:>9.1} {:>8}\n",
                name,
                p.seconds,
                if p.seconds > 0.0 {
                    100.0 * p.io_busy_seconds / p.seconds
                } else {
                    0.0
                },
                p.op.rpcs,
                p.op.ops_per_s,
                p.op.gb_per_s,
                p.device_gb_per_s,
                p.op.p50_us,
                p.op.p99_us,
                p.op.max_us,
                misses
            ));
        }
        out
    }

    /// What the drive saw, the tier's error counters (when not all zero)
    /// and the verification verdict.
    fn outcome_lines(&self) -> String {
        let mut out = String::new();
        for (name, p) in [("write", &self.write), ("read", &self.read)] {
            if let Some(d) = &p.drive {
                out.push_str(&format!(
                    "drive {} ({name}s, block layer): {} requests ({} merged), {:.1} KiB, \
                     {:.2} ms each, {:.1} in flight on average\n",
                    d.device, d.requests, d.merged, d.mean_kib, d.mean_ms, d.in_flight
                ));
            }
        }
        if self.io_errors + self.timeouts + self.corrupt_blocks > 0 {
            out.push_str(&format!(
                "tier counters: {} I/O errors, {} timeouts, {} corrupt blocks\n",
                self.io_errors, self.timeouts, self.corrupt_blocks
            ));
        }
        if self.verify_failures == 0 && self.read.op.misses == 0 {
            out.push_str(&format!(
                "verification: {} blocks read, all correct\n",
                self.verified_blocks
            ));
        } else {
            out.push_str(&format!(
                "!!! VERIFY FAILED: {} wrong, {} missing of {} blocks; first: {}\n",
                self.verify_failures,
                self.read.op.misses,
                self.blocks,
                self.first_failure.as_deref().unwrap_or("-")
            ));
        }
        out
    }
}
