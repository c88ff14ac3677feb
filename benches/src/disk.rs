//! `kvstrata bench-disk`: throughput of the disk tier (T2) in-process, for
//! comparison with fio on the same filesystem (`benches/disk.sh` runs both).
//!
//! The benchmark opens a real [`DiskTier`] in a fresh directory (its slot
//! file is created and `fallocate`d there, like a fresh fio file), then:
//!
//! 1. **write**: stores `--total` bytes of distinct blocks of `--block-size`,
//!    `--queue-depth` blocks per [`DiskTier::put_many`] call, from `--threads`
//!    callers (call `c` goes to caller `c % threads`);
//! 2. **read**: reads every block back once in a shuffled order (fixed seed),
//!    `--queue-depth` blocks per [`DiskTier::get_many`] call.
//!
//! With `--stream`, each caller instead makes one [`DiskTier::put_stream`]
//! and one [`DiskTier::get_stream`] call over its share of the blocks
//! (block `i` goes to caller `i % threads`), which keeps up to
//! `--queue-depth` transfers in flight the whole time, starting the next as
//! each completes (like fio's `iodepth`; never more). The tier uses
//!    `O_DIRECT`, so these are cold reads that hit the drive, not the page
//!    cache. Every block is checked byte for byte (on a separate verifier
//!    thread, so checking does not stall the callers); a miss or a wrong
//!    byte fails the run after the report is printed.
//!
//! Payloads: one pseudo-random buffer of the block size with a 16-byte stamp
//! (block index, page number) at the start of every 4 KiB page, so blocks are
//! distinct, a page read from the wrong place is caught, and writing a block
//! costs no copy beyond what the tier itself does.
//!
//! Reported per phase: wall time, payload GB/s (decimal) and blocks/s, the
//! bytes the tier moved on the drive (payload plus the 4 KiB slot header and
//! padding), p50/p99 latency per call (with `--stream`, one call per
//! caller: the whole phase), and the share of the wall time the
//! tier had transfers in flight ("I/O %": the rest is CPU work between
//! transfers, the callers' and the tier's own checksums and copies), and,
//! when `--dir` is on a block device, what its block layer saw (requests,
//! their mean size and time, mean requests in flight: [`DriveReport`]). Sizes on the command line follow
//! fio: `256K`, `1M`, `4G` are binary (KiB, MiB, GiB); `256KiB` and `256KB`
//! mean what they say.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytesize::ByteSize;
use kvstrata_tiers::disk::file::align_up;
use kvstrata_tiers::disk::header::HEADER_REGION;
use kvstrata_tiers::disk::{DiskPut, DiskTier, DiskTierConfig, EngineChoice, StreamPut};
use kvstrata_tiers::{BlockKey, EventBus, NamespaceId, PutOutcome};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::Serialize;

use crate::error::BenchError;
use crate::report::{OpAccum, OpReport, gb_per_s};

/// Stamp stride: every 4 KiB page of a payload starts with a stamp.
pub(crate) const PAGE: usize = 4096;
/// Bytes of a stamp: block index and page number, little-endian u64s.
pub(crate) const STAMP: usize = 16;
/// Target segment size of the tier's slot arena (its default).
const SEGMENT_TARGET: u64 = 64 << 20;
/// Largest block the benchmark accepts (the tier's segments stay below 4 GiB).
const MAX_BLOCK_BYTES: u64 = 1 << 30;
/// Namespace of the benchmark's blocks.
const NAMESPACE: NamespaceId = NamespaceId(*b"kvstrata-bench-d");
/// Seed of the payload and of the read order.
const SEED: u64 = 0x6b76_7374_7261_7461;

/// I/O engine of the disk tier.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskEngine {
    /// io_uring if the start-up probe passes, else pread/pwrite.
    #[default]
    Auto,
    /// io_uring, or fail.
    #[value(name = "io_uring")]
    IoUring,
    /// pread/pwrite worker threads.
    Pread,
}

impl From<DiskEngine> for EngineChoice {
    fn from(e: DiskEngine) -> Self {
        match e {
            DiskEngine::Auto => EngineChoice::Auto,
            DiskEngine::IoUring => EngineChoice::IoUring,
            DiskEngine::Pread => EngineChoice::Pread,
        }
    }
}

/// Flags of `kvstrata bench-disk`.
#[derive(clap::Args, Debug, Clone)]
pub struct DiskBenchArgs {
    /// Directory on the filesystem under test; the tier goes in a fresh
    /// subdirectory, removed afterwards [default: the current directory].
    /// Not tmpfs: the tier needs O_DIRECT.
    #[arg(long)]
    pub dir: Option<PathBuf>,

    /// Payload bytes per block (fio-style: 256K and 1M are KiB and MiB).
    #[arg(long, default_value = "256K", value_parser = parse_size)]
    pub block_size: ByteSize,

    /// Payload bytes written (and then read) per phase.
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    pub total: ByteSize,

    /// Blocks per put_many / get_many call; with `--stream`, transfers
    /// in flight per caller.
    #[arg(long, default_value_t = 16)]
    pub queue_depth: usize,

    /// Each caller streams its blocks through one put_stream / get_stream
    /// call with `--queue-depth` transfers in flight, refilled as each
    /// completes, instead of put_many / get_many calls of `--queue-depth`
    /// blocks that each drain the queue.
    #[arg(long)]
    pub stream: bool,

    /// Concurrent callers.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,

    /// I/O engine of the disk tier.
    #[arg(long, value_enum, default_value_t = DiskEngine::Auto)]
    pub engine: DiskEngine,

    /// io_uring: register the tier's buffer region as fixed buffers
    /// (`--fixed-buffers false` for plain reads and writes, to compare).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub fixed_buffers: bool,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

impl Default for DiskBenchArgs {
    fn default() -> Self {
        DiskBenchArgs {
            dir: None,
            block_size: ByteSize::kib(256),
            total: ByteSize::gib(4),
            queue_depth: 16,
            stream: false,
            threads: 1,
            engine: DiskEngine::Auto,
            fixed_buffers: true,
            json: false,
        }
    }
}

/// Parses a size the way fio does: a bare `K`, `M`, `G` or `T` suffix is
/// binary (`256K` = 262144); anything else as [`ByteSize`] reads it
/// (`256KiB`, `256KB` = 256000, `4096`).
pub fn parse_size(s: &str) -> Result<ByteSize, String> {
    let t = s.trim();
    let shift = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => Some(10),
        Some('M') => Some(20),
        Some('G') => Some(30),
        Some('T') => Some(40),
        _ => None,
    };
    if let Some(shift) = shift {
        let digits = t[..t.len() - 1].trim_end();
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            let n: u64 = digits
                .parse()
                .map_err(|e| format!("{s:?} is not a size: {e}"))?;
            return n
                .checked_mul(1u64 << shift)
                .map(ByteSize::b)
                .ok_or_else(|| format!("{s:?} is too large"));
        }
    }
    ByteSize::from_str(t).map_err(|e| format!("{s:?} is not a size: {e}"))
}

/// Flags checked, with the tier's geometry.
#[derive(Debug, Clone)]
struct DiskPlan {
    block: usize,
    blocks: u64,
    queue_depth: usize,
    stream: bool,
    threads: usize,
    /// Bytes of one slot on the drive (header region + payload rounded up).
    slot_bytes: u64,
    segment_bytes: u64,
    capacity: u64,
}

impl DiskBenchArgs {
    fn plan(&self) -> Result<DiskPlan, BenchError> {
        let bad =
            |field: &'static str, reason: String| Err(BenchError::InvalidArg { field, reason });
        let bs = self.block_size.as_u64();
        if bs < STAMP as u64 {
            return bad(
                "--block-size",
                format!("{bs} bytes; at least {STAMP} (the verification stamp)"),
            );
        }
        if bs > MAX_BLOCK_BYTES {
            return bad(
                "--block-size",
                format!("{bs} bytes; at most {MAX_BLOCK_BYTES}"),
            );
        }
        if self.queue_depth == 0 {
            return bad("--queue-depth", "must be at least 1".into());
        }
        if self.threads == 0 {
            return bad("--threads", "must be at least 1".into());
        }
        let blocks = self.total.as_u64() / bs;
        if blocks == 0 {
            return bad(
                "--total",
                format!("{} bytes; at least one block ({bs})", self.total.as_u64()),
            );
        }
        let block = usize::try_from(bs).map_err(|_| BenchError::InvalidArg {
            field: "--block-size",
            reason: format!("{bs} bytes does not fit in memory"),
        })?;
        let slot_bytes = (HEADER_REGION + align_up(block)) as u64;
        // Whole slots per segment, so no space is lost at segment ends.
        let per_segment = (SEGMENT_TARGET / slot_bytes).max(1);
        let segment_bytes = per_segment * slot_bytes;
        // One spare segment: the arena's segment count is capacity / segment.
        let segments = blocks.div_ceil(per_segment) + 1;
        let capacity =
            segments
                .checked_mul(segment_bytes)
                .ok_or_else(|| BenchError::InvalidArg {
                    field: "--total",
                    reason: "too large".into(),
                })?;
        Ok(DiskPlan {
            block,
            blocks,
            queue_depth: self.queue_depth,
            stream: self.stream,
            threads: self.threads,
            slot_bytes,
            segment_bytes,
            capacity,
        })
    }
}

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

/// What the block layer saw of one phase's direction (reads in the read
/// phase, writes in the write phase), from `/sys/dev/block/M:m/stat` of
/// the device holding the directory. Counts the whole device, so other
/// I/O on it during the run is included.
///
/// `in_flight` (device busy time summed over requests, per second of the
/// phase; Little's law) tells whether the tier kept the drive as full as
/// fio does (fio's equivalent: its IOPS times its mean completion
/// latency). The same queue depth at a lower rate means the drive served
/// the tier's requests more slowly (size, alignment), not that the tier
/// left it idle.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DriveReport {
    /// Block device (`MAJOR:MINOR`).
    pub device: String,
    /// Requests completed.
    pub requests: u64,
    /// Requests merged into others before they were issued.
    pub merged: u64,
    /// Mean request size, KiB.
    pub mean_kib: f64,
    /// Mean time per request in the block layer and the drive, ms.
    pub mean_ms: f64,
    /// Mean requests in flight over the phase.
    pub in_flight: f64,
}

/// One direction of a block device's `stat` counters.
#[derive(Debug, Clone, Copy, Default)]
struct DriveCounters {
    requests: u64,
    merged: u64,
    sectors: u64,
    ticks_ms: u64,
}

/// The `stat` file of the block device holding `dir`, if there is one.
fn drive_stat_path(dir: &Path) -> Option<(String, PathBuf)> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir).ok()?.dev();
    // Linux's dev_t encoding (glibc's gnu_dev_major / gnu_dev_minor).
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let name = format!("{major}:{minor}");
    let path = PathBuf::from(format!("/sys/dev/block/{name}/stat"));
    path.exists().then_some((name, path))
}

/// Reads (`write` false) or writes counters of a block device `stat` file.
fn drive_counters(path: &Path, write: bool) -> Option<DriveCounters> {
    let text = std::fs::read_to_string(path).ok()?;
    let f: Vec<u64> = text
        .split_whitespace()
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let at = if write { 4 } else { 0 };
    Some(DriveCounters {
        requests: *f.get(at)?,
        merged: *f.get(at + 1)?,
        sectors: *f.get(at + 2)?,
        ticks_ms: *f.get(at + 3)?,
    })
}

fn drive_report(
    device: &str,
    before: DriveCounters,
    after: DriveCounters,
    elapsed: Duration,
) -> DriveReport {
    let requests = after.requests.saturating_sub(before.requests);
    let sectors = after.sectors.saturating_sub(before.sectors);
    let ticks = after.ticks_ms.saturating_sub(before.ticks_ms) as f64;
    let per_request = |x: f64| {
        if requests > 0 {
            x / requests as f64
        } else {
            0.0
        }
    };
    let ms = elapsed.as_secs_f64() * 1e3;
    DriveReport {
        device: device.to_string(),
        requests,
        merged: after.merged.saturating_sub(before.merged),
        mean_kib: per_request(sectors as f64 * 512.0 / 1024.0),
        mean_ms: per_request(ticks),
        in_flight: if ms > 0.0 { ticks / ms } else { 0.0 },
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

    /// Prints [`DiskBenchReport::human`] to stdout.
    pub fn print_human(&self) {
        print!("{}", self.human());
    }
}

/// Payloads and their check (shared with the remote-tier benchmark).
pub(crate) struct Pattern {
    base: Vec<u8>,
}

impl Pattern {
    pub(crate) fn new(len: usize) -> Self {
        let mut x = SEED;
        let mut base = Vec::with_capacity(len + 8);
        while base.len() < len {
            // splitmix64
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            base.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        base.truncate(len);
        Pattern { base }
    }

    fn stamp(index: u64, page: usize) -> [u8; STAMP] {
        let mut s = [0u8; STAMP];
        s[..8].copy_from_slice(&index.to_le_bytes());
        s[8..].copy_from_slice(&(page as u64).to_le_bytes());
        s
    }

    /// Block `index`'s payload, in a new buffer.
    pub(crate) fn payload(&self, index: u64) -> bytes::Bytes {
        let mut buf = self.base.clone();
        self.fill(index, &mut buf);
        bytes::Bytes::from(buf)
    }

    /// Turns a copy of the base buffer into block `index`'s payload.
    fn fill(&self, index: u64, buf: &mut [u8]) {
        for (page, chunk) in buf.chunks_mut(PAGE).enumerate() {
            let s = Self::stamp(index, page);
            let n = chunk.len().min(STAMP);
            chunk[..n].copy_from_slice(&s[..n]);
        }
    }

    /// `None` when `got` is block `index`'s payload, else what differs.
    pub(crate) fn check(&self, index: u64, got: &[u8]) -> Option<String> {
        if got.len() != self.base.len() {
            return Some(format!(
                "block {index}: {} bytes, expected {}",
                got.len(),
                self.base.len()
            ));
        }
        for (page, (g, b)) in got.chunks(PAGE).zip(self.base.chunks(PAGE)).enumerate() {
            let s = Self::stamp(index, page);
            let n = g.len().min(STAMP);
            if g[..n] != s[..n] || g[n..] != b[n..] {
                let at = g
                    .iter()
                    .zip(s[..n].iter().chain(&b[n..]))
                    .position(|(x, y)| x != y)
                    .unwrap_or(0);
                return Some(format!(
                    "block {index}: byte {} differs (page {page})",
                    page * PAGE + at
                ));
            }
        }
        None
    }
}

fn key_of(index: u64) -> Result<BlockKey, BenchError> {
    BlockKey::new("key", format!("bench-disk-{index}").as_bytes()).map_err(|e| {
        BenchError::Protocol {
            op: "bench-disk",
            reason: e.to_string(),
        }
    })
}

/// Indices of call `c` (of `qd` blocks) in `order`.
fn call_range(c: usize, qd: usize, len: usize) -> std::ops::Range<usize> {
    let start = c * qd;
    start..(start + qd).min(len)
}

/// Removes the benchmark's directory however the run ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("warning: cannot remove {}: {e}", self.0.display());
        }
    }
}

/// A fresh directory inside `parent`.
fn fresh_dir(parent: &Path) -> Result<PathBuf, BenchError> {
    let io = |what: String| move |source| BenchError::Io { what, source };
    std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
    let pid = std::process::id();
    for n in 0..1000u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = parent.join(format!("kvstrata-bench-disk-{pid}-{nanos:08x}-{n}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io(format!("create {}", dir.display()))(e)),
        }
    }
    Err(BenchError::InvalidArg {
        field: "--dir",
        reason: format!("no fresh directory could be made in {}", parent.display()),
    })
}

/// A caller thread's result; a panic becomes `BenchError::Thread(what)`.
fn joined(
    h: std::thread::ScopedJoinHandle<'_, Result<OpAccum, BenchError>>,
    what: &str,
) -> Result<OpAccum, BenchError> {
    h.join()
        .unwrap_or_else(|_| Err(BenchError::Thread(what.into())))
}

/// The callers' results added up; the first error wins.
fn merged(results: Vec<Result<OpAccum, BenchError>>) -> Result<OpAccum, BenchError> {
    let mut total = OpAccum::new()?;
    for r in results {
        total.merge(&r?)?;
    }
    Ok(total)
}

/// Runs the write phase; returns the merged counters and the wall time.
fn write_phase(
    tier: &DiskTier,
    plan: &DiskPlan,
    pattern: &Pattern,
    keys: &[BlockKey],
) -> Result<(OpAccum, Duration), BenchError> {
    let calls = keys.len().div_ceil(plan.queue_depth);
    with_writers(plan, |t| {
        let mut acc = OpAccum::new()?;
        let mut bufs: Vec<Vec<u8>> = (0..plan.queue_depth)
            .map(|_| pattern.base.clone())
            .collect();
        for c in (t..calls).step_by(plan.threads) {
            let range = call_range(c, plan.queue_depth, keys.len());
            for (buf, i) in bufs.iter_mut().zip(range.clone()) {
                pattern.fill(i as u64, buf);
            }
            let items: Vec<DiskPut<'_>> = keys[range.clone()]
                .iter()
                .zip(&bufs)
                .map(|(k, b)| DiskPut {
                    key: *k,
                    parent: None,
                    payload: b,
                })
                .collect();
            let t0 = Instant::now();
            let outcomes = tier.put_many(&NAMESPACE, &items);
            acc.record_latency(t0.elapsed());
            acc.blocks += items.len() as u64;
            for (i, o) in range.zip(outcomes) {
                if o == PutOutcome::Stored {
                    acc.hits += 1;
                    acc.bytes += plan.block as u64;
                } else {
                    return Err(BenchError::DiskPut {
                        block: i as u64,
                        outcome: format!("{o:?}"),
                    });
                }
            }
        }
        Ok(acc)
    })
}

/// Runs `plan.threads` writers (`writer(t)`: writer `t`) at once; returns
/// their merged counters and the wall time.
fn with_writers<F>(plan: &DiskPlan, writer: F) -> Result<(OpAccum, Duration), BenchError>
where
    F: Fn(usize) -> Result<OpAccum, BenchError> + Sync,
{
    let started = Instant::now();
    let results: Vec<Result<OpAccum, BenchError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..plan.threads)
            .map(|t| {
                let writer = &writer;
                s.spawn(move || writer(t))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| joined(h, "a writer panicked"))
            .collect()
    });
    let elapsed = started.elapsed();
    let total = merged(results)?;
    Ok((total, elapsed))
}

/// A payload buffer of the write stream, handed back to its caller's
/// free list when the tier has copied it (so a stream of any length uses
/// about `--queue-depth` buffers, and filling one costs only its stamps).
struct Recycled<'a> {
    buf: Vec<u8>,
    free: &'a RefCell<Vec<Vec<u8>>>,
}

impl AsRef<[u8]> for Recycled<'_> {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Recycled<'_> {
    fn drop(&mut self) {
        self.free.borrow_mut().push(std::mem::take(&mut self.buf));
    }
}

/// The write phase with `--stream`: caller `t` streams blocks `t`,
/// `t + threads`, ... through one put_stream call.
fn write_stream_phase(
    tier: &DiskTier,
    plan: &DiskPlan,
    pattern: &Pattern,
    keys: &[BlockKey],
) -> Result<(OpAccum, Duration), BenchError> {
    with_writers(plan, |t| {
        let mut acc = OpAccum::new()?;
        let free: RefCell<Vec<Vec<u8>>> = RefCell::new(Vec::new());
        let mine: Vec<usize> = (t..keys.len()).step_by(plan.threads).collect();
        let items = mine.iter().map(|&i| {
            let mut buf = free
                .borrow_mut()
                .pop()
                .unwrap_or_else(|| pattern.base.clone());
            pattern.fill(i as u64, &mut buf);
            StreamPut {
                key: keys[i],
                parent: None,
                payload: Recycled { buf, free: &free },
            }
        });
        let mut failed: Option<(u64, PutOutcome)> = None;
        let t0 = Instant::now();
        tier.put_stream(&NAMESPACE, items, plan.queue_depth, |k, o| {
            if o == PutOutcome::Stored {
                acc.hits += 1;
                acc.bytes += plan.block as u64;
            } else {
                failed.get_or_insert((mine[k] as u64, o));
            }
        });
        acc.record_latency(t0.elapsed());
        acc.blocks += mine.len() as u64;
        if let Some((block, o)) = failed {
            return Err(BenchError::DiskPut {
                block,
                outcome: format!("{o:?}"),
            });
        }
        Ok(acc)
    })
}

/// The read phase with `--stream`: caller `t` streams `order[t]`,
/// `order[t + threads]`, ... through one get_stream call, handing the
/// blocks to the verifier `--queue-depth` at a time.
fn read_stream_phase(
    tier: &DiskTier,
    plan: &DiskPlan,
    pattern: &Pattern,
    keys: &[BlockKey],
    order: &[u64],
) -> Result<(OpAccum, Duration, Verified), BenchError> {
    with_verifier(plan, pattern, |t, tx| {
        let mut acc = OpAccum::new()?;
        let mine: Vec<u64> = order
            .iter()
            .skip(t)
            .step_by(plan.threads)
            .copied()
            .collect();
        let stream_keys: Vec<BlockKey> = mine.iter().map(|&i| keys[i as usize]).collect();
        let mut batch = Vec::with_capacity(plan.queue_depth);
        let mut verifier_gone = false;
        let t0 = Instant::now();
        tier.get_stream(&NAMESPACE, &stream_keys, plan.queue_depth, |k, g| {
            match g {
                Some(b) => {
                    acc.hits += 1;
                    acc.bytes += b.len() as u64;
                    batch.push((mine[k], b));
                }
                None => acc.misses += 1,
            }
            if batch.len() >= plan.queue_depth && !verifier_gone {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(plan.queue_depth));
                verifier_gone = tx.send(full).is_err();
            }
        });
        acc.record_latency(t0.elapsed());
        acc.blocks += mine.len() as u64;
        if verifier_gone || (!batch.is_empty() && tx.send(batch).is_err()) {
            return Err(BenchError::Thread("the verifier stopped".into()));
        }
        Ok(acc)
    })
}

/// What the verifier found.
#[derive(Debug, Default)]
struct Verified {
    blocks: u64,
    failures: u64,
    first: Option<String>,
}

/// Runs the read phase in `order`; returns the merged counters, the wall
/// time and what the verifier found.
fn read_phase(
    tier: &DiskTier,
    plan: &DiskPlan,
    pattern: &Pattern,
    keys: &[BlockKey],
    order: &[u64],
) -> Result<(OpAccum, Duration, Verified), BenchError> {
    let calls = order.len().div_ceil(plan.queue_depth);
    with_verifier(plan, pattern, |t, tx| {
        let mut acc = OpAccum::new()?;
        let mut batch_keys = Vec::with_capacity(plan.queue_depth);
        for c in (t..calls).step_by(plan.threads) {
            let idx = &order[call_range(c, plan.queue_depth, order.len())];
            batch_keys.clear();
            for &i in idx {
                batch_keys.push(keys[i as usize]);
            }
            let t0 = Instant::now();
            let got = tier.get_many(&NAMESPACE, &batch_keys);
            acc.record_latency(t0.elapsed());
            acc.blocks += idx.len() as u64;
            let mut batch = Vec::with_capacity(idx.len());
            for (&i, g) in idx.iter().zip(got) {
                match g {
                    Some(b) => {
                        acc.hits += 1;
                        acc.bytes += b.len() as u64;
                        batch.push((i, b));
                    }
                    None => acc.misses += 1,
                }
            }
            if tx.send(batch).is_err() {
                return Err(BenchError::Thread("the verifier stopped".into()));
            }
        }
        Ok(acc)
    })
}

/// Runs `plan.threads` readers (`reader(t, tx)`: reader `t`, sending the
/// blocks it read to `tx`) beside one verifier that checks every block
/// against `pattern`; returns the merged counters, the wall time and what
/// the verifier found. A few batches of slack per reader, so checking never
/// stalls a reader but buffers are not held for long.
fn with_verifier<F>(
    plan: &DiskPlan,
    pattern: &Pattern,
    reader: F,
) -> Result<(OpAccum, Duration, Verified), BenchError>
where
    F: Fn(usize, mpsc::SyncSender<Vec<(u64, Bytes)>>) -> Result<OpAccum, BenchError> + Sync,
{
    let (tx, rx) = mpsc::sync_channel::<Vec<(u64, Bytes)>>(4 * plan.threads);
    let started = Instant::now();
    let (results, elapsed, verified) = std::thread::scope(|s| {
        let verifier = s.spawn(move || {
            let mut v = Verified::default();
            for batch in rx {
                for (i, bytes) in batch {
                    v.blocks += 1;
                    if let Some(why) = pattern.check(i, &bytes) {
                        v.failures += 1;
                        v.first.get_or_insert(why);
                    }
                }
            }
            v
        });
        let handles: Vec<_> = (0..plan.threads)
            .map(|t| {
                let tx = tx.clone();
                let reader = &reader;
                s.spawn(move || reader(t, tx))
            })
            .collect();
        drop(tx);
        let results: Vec<Result<OpAccum, BenchError>> = handles
            .into_iter()
            .map(|h| joined(h, "a reader panicked"))
            .collect();
        let elapsed = started.elapsed();
        let verified = verifier
            .join()
            .map_err(|_| BenchError::Thread("the verifier panicked".into()));
        (results, elapsed, verified)
    });
    let total = merged(results)?;
    Ok((total, elapsed, verified?))
}

fn phase_report(
    acc: &OpAccum,
    elapsed: Duration,
    device_bytes: u64,
    busy: Duration,
    drive: Option<DriveReport>,
) -> DiskPhaseReport {
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

/// Runs the benchmark (blocking; minutes for the default 4 GiB). A run
/// whose reads missed or returned wrong bytes ends in
/// [`BenchError::DiskVerifyFailed`], which carries the report.
pub fn run_disk_bench(args: &DiskBenchArgs) -> Result<DiskBenchReport, BenchError> {
    let plan = args.plan()?;
    let parent = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::current_dir().map_err(|source| BenchError::Io {
            what: "find the current directory".into(),
            source,
        })?,
    };
    let dir = fresh_dir(&parent)?;
    let _cleanup = RemoveOnDrop(dir.clone());
    let config = DiskTierConfig {
        engine: args.engine.into(),
        fixed_buffers: args.fixed_buffers,
        segment_bytes: plan.segment_bytes,
        // Room for every caller's buffers in flight and for the blocks read
        // and still queued for the verifier (up to 4 calls per caller, plus
        // the one being checked): all of them come from the tier's buffer
        // region (registered with io_uring), none from the heap.
        buffer_pool_bytes: (64usize << 20).max(
            plan.threads
                .saturating_mul(plan.queue_depth)
                .saturating_mul(plan.slot_bytes as usize)
                .saturating_mul(8),
        ),
        ..DiskTierConfig::in_dir(&dir, plan.capacity)
    };
    let tier = DiskTier::open(&config, Arc::new(EventBus::new(1024)))?;
    let pattern = Pattern::new(plan.block);
    let keys: Vec<BlockKey> = (0..plan.blocks).map(key_of).collect::<Result<_, _>>()?;

    let drive = drive_stat_path(&dir);
    let sample = |write: bool| {
        drive
            .as_ref()
            .and_then(|(_, path)| drive_counters(path, write))
    };
    let phase_drive = |before: Option<DriveCounters>, write: bool, elapsed: Duration| {
        let (name, _) = drive.as_ref()?;
        Some(drive_report(name, before?, sample(write)?, elapsed))
    };

    let w_before = sample(true);
    let (w, w_elapsed) = if plan.stream {
        write_stream_phase(&tier, &plan, &pattern, &keys)?
    } else {
        write_phase(&tier, &plan, &pattern, &keys)?
    };
    let w_drive = phase_drive(w_before, true, w_elapsed);
    let after_write = tier.disk_stats();

    let mut order: Vec<u64> = (0..plan.blocks).collect();
    order.shuffle(&mut StdRng::seed_from_u64(SEED));
    let r_before = sample(false);
    let (r, r_elapsed, verified) = if plan.stream {
        read_stream_phase(&tier, &plan, &pattern, &keys, &order)?
    } else {
        read_phase(&tier, &plan, &pattern, &keys, &order)?
    };
    let r_drive = phase_drive(r_before, false, r_elapsed);
    let stats = tier.disk_stats();

    let report = DiskBenchReport {
        dir: dir.display().to_string(),
        engine: tier.engine_name().to_string(),
        fixed_buffers: tier.fixed_buffers(),
        checksum: kvstrata_tiers::disk::checksum::simd_path().to_string(),
        block_size: plan.block as u64,
        slot_bytes: plan.slot_bytes,
        blocks: plan.blocks,
        total_bytes: plan.blocks * plan.block as u64,
        queue_depth: plan.queue_depth,
        stream: plan.stream,
        threads: plan.threads,
        capacity_bytes: plan.capacity,
        write: phase_report(
            &w,
            w_elapsed,
            after_write.write_bytes,
            after_write.write_busy,
            w_drive,
        ),
        read: phase_report(
            &r,
            r_elapsed,
            stats.read_bytes.saturating_sub(after_write.read_bytes),
            stats.read_busy.saturating_sub(after_write.read_busy),
            r_drive,
        ),
        verified_blocks: verified.blocks,
        verify_failures: verified.failures,
        first_failure: verified.first.clone(),
        io_errors: stats.io_errors,
        timeouts: stats.timeouts,
        corrupt_blocks: stats.corrupt_blocks,
    };
    drop(tier);
    if verified.failures > 0 || r.misses > 0 {
        let first = verified
            .first
            .unwrap_or_else(|| format!("{} blocks missed", r.misses));
        return Err(BenchError::DiskVerifyFailed {
            failures: verified.failures,
            misses: r.misses,
            first,
            report: Box::new(report),
        });
    }
    Ok(report)
}

/// Runs the benchmark and prints its report: JSON on stdout with `--json`,
/// the human table otherwise (also when reads failed verification, before
/// the error is returned).
pub fn run_disk_and_print(args: &DiskBenchArgs) -> Result<DiskBenchReport, BenchError> {
    let print = |report: &DiskBenchReport| -> Result<(), BenchError> {
        if args.json {
            println!("{}", report.to_json()?);
        } else {
            report.print_human();
        }
        Ok(())
    };
    match run_disk_bench(args) {
        Ok(report) => {
            print(&report)?;
            Ok(report)
        }
        Err(err) => {
            if let Some(report) = err.disk_report() {
                print(report)?;
            }
            Err(err)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: DiskBenchArgs,
    }

    fn parse(args: &[&str]) -> Result<DiskBenchArgs, clap::Error> {
        let mut v = vec!["bench-disk"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).map(|c| c.bench)
    }

    #[test]
    fn sizes_follow_fio() {
        assert_eq!(parse_size("256K").unwrap().as_u64(), 256 << 10);
        assert_eq!(parse_size("1M").unwrap().as_u64(), 1 << 20);
        assert_eq!(parse_size("4g").unwrap().as_u64(), 4 << 30);
        assert_eq!(parse_size("256KiB").unwrap().as_u64(), 256 << 10);
        assert_eq!(parse_size("256KB").unwrap().as_u64(), 256_000);
        assert_eq!(parse_size("4096").unwrap().as_u64(), 4096);
        assert!(parse_size("K").is_err());
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn defaults_and_flags() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.block_size.as_u64(), 256 << 10);
        assert_eq!(a.total.as_u64(), 4 << 30);
        assert_eq!((a.queue_depth, a.threads, a.stream), (16, 1, false));
        assert!(parse(&["--stream"]).unwrap().stream);
        assert_eq!(a.engine, DiskEngine::Auto);
        let a = parse(&[
            "--block-size",
            "1M",
            "--total",
            "64M",
            "--queue-depth",
            "4",
            "--threads",
            "2",
            "--engine",
            "io_uring",
            "--json",
            "--dir",
            "x",
        ])
        .unwrap();
        assert_eq!(a.block_size.as_u64(), 1 << 20);
        assert_eq!(a.engine, DiskEngine::IoUring);
        assert!(a.json);
        let p = a.plan().unwrap();
        assert_eq!(p.blocks, 64);
        assert_eq!(p.slot_bytes, (1 << 20) + 4096);
        assert_eq!(p.segment_bytes % p.slot_bytes, 0);
        // Every block fits, with a spare segment.
        let per = p.segment_bytes / p.slot_bytes;
        assert!(p.capacity / p.segment_bytes * per >= p.blocks + per);
        assert!(parse(&["--engine", "spdk"]).is_err());
    }

    #[test]
    fn rejects_bad_flags() {
        for (args, field) in [
            (
                DiskBenchArgs {
                    queue_depth: 0,
                    ..DiskBenchArgs::default()
                },
                "--queue-depth",
            ),
            (
                DiskBenchArgs {
                    threads: 0,
                    ..DiskBenchArgs::default()
                },
                "--threads",
            ),
            (
                DiskBenchArgs {
                    total: ByteSize::kib(4),
                    ..DiskBenchArgs::default()
                },
                "--total",
            ),
            (
                DiskBenchArgs {
                    block_size: ByteSize::b(8),
                    ..DiskBenchArgs::default()
                },
                "--block-size",
            ),
        ] {
            match args.plan() {
                Err(BenchError::InvalidArg { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn pattern_catches_wrong_blocks_and_pages() {
        let p = Pattern::new(3 * PAGE + 100);
        let mut a = p.base.clone();
        p.fill(7, &mut a);
        assert_eq!(p.check(7, &a), None);
        assert!(p.check(8, &a).is_some());
        let mut b = a.clone();
        b[PAGE + 20] ^= 1;
        let why = p.check(7, &b).unwrap();
        assert!(why.contains(&format!("byte {}", PAGE + 20)), "{why}");
        // A page of another block in the right place.
        let mut c = p.base.clone();
        p.fill(9, &mut c);
        a[2 * PAGE..3 * PAGE].copy_from_slice(&c[2 * PAGE..3 * PAGE]);
        assert!(p.check(7, &a).is_some());
        assert!(p.check(7, &a[..10]).is_some());
    }

    /// A small real run on the target directory (a real filesystem; the
    /// tier needs O_DIRECT), both engines, every block verified.
    #[test]
    fn small_run_reads_back_every_block() {
        // CARGO_TARGET_TMPDIR is set for integration tests only.
        let parent = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tmp");
        for (engine, fixed_buffers, stream) in [
            (DiskEngine::Auto, true, false),
            (DiskEngine::Auto, false, false),
            (DiskEngine::Pread, true, false),
            (DiskEngine::Auto, true, true),
            (DiskEngine::Pread, true, true),
        ] {
            let args = DiskBenchArgs {
                dir: Some(parent.clone()),
                block_size: ByteSize::kib(20),
                total: ByteSize::kib(20 * 50),
                queue_depth: 8,
                stream,
                threads: 2,
                engine,
                fixed_buffers,
                json: false,
            };
            let r = run_disk_bench(&args).unwrap();
            assert_eq!(r.blocks, 50);
            assert_eq!(r.write.op.hits, 50);
            assert_eq!(r.read.op.hits, 50);
            assert_eq!(r.verified_blocks, 50);
            assert_eq!(r.verify_failures, 0);
            // Calls of 8 blocks, or one stream per caller.
            assert_eq!(r.write.op.rpcs, if stream { 2 } else { 7 });
            assert_eq!(r.read.op.rpcs, if stream { 2 } else { 7 });
            assert_eq!(r.stream, stream);
            assert_eq!(r.write.device_bytes, 50 * (4096 + 20480));
            assert_eq!(r.read.device_bytes, 50 * (4096 + 20480));
            assert!(!Path::new(&r.dir).exists(), "{} left behind", r.dir);
            assert!(r.human().contains("all correct"));
            let json: serde_json::Value = serde_json::from_str(&r.to_json().unwrap()).unwrap();
            assert_eq!(json["read"]["blocks"], 50);
            assert!(json["write"]["gb_per_s"].as_f64().unwrap() > 0.0);
            if r.engine == "pread" || !fixed_buffers {
                assert!(!r.fixed_buffers);
            }
            // On a block device the drive saw at least the tier's reads
            // (adjacent ones may be merged into one request).
            if let Some(d) = &r.read.drive {
                assert!(d.requests + d.merged >= 50, "{d:?}");
                assert!(r.human().contains("block layer"));
            }
        }
    }

    #[test]
    fn drive_counters_per_phase() {
        let c = |requests, sectors, ticks_ms| DriveCounters {
            requests,
            merged: 0,
            sectors,
            ticks_ms,
        };
        // 100 reads of 260 KiB, 300 ms of busy time summed, over 20 ms: 15 in flight.
        let d = drive_report(
            "254:0",
            c(1000, 7, 50),
            c(1100, 7 + 100 * 520, 350),
            Duration::from_millis(20),
        );
        assert_eq!(d.requests, 100);
        assert!((d.mean_kib - 260.0).abs() < 1e-9);
        assert!((d.mean_ms - 3.0).abs() < 1e-9);
        assert!((d.in_flight - 15.0).abs() < 1e-9);
        // Nothing happened: no division by zero.
        let idle = drive_report("254:0", c(5, 5, 5), c(5, 5, 5), Duration::ZERO);
        assert_eq!(
            (idle.mean_kib, idle.mean_ms, idle.in_flight),
            (0.0, 0.0, 0.0)
        );
        // This machine's root, when it is a block device, parses.
        if let Some((_, path)) = drive_stat_path(Path::new("/")) {
            assert!(drive_counters(&path, false).is_some());
            assert!(drive_counters(&path, true).is_some());
        }
    }
}
