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
//!
//! This module opens the tier and runs the two phases in order
//! ([`run_disk_bench`]); the parts live beside it:
//!
//! - `args`: the flags, fio-style sizes and the checked plan (slot and
//!   segment geometry);
//! - `write` / `read`: what one caller does in each phase;
//! - `callers`: the caller threads of a phase and the verifier thread;
//! - `drive`: the block device's counters around each phase;
//! - `report`: the report, its human table and JSON.

mod args;
mod callers;
mod drive;
mod read;
mod report;
mod write;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvstrata_tiers::disk::{DiskStats, DiskTier, DiskTierConfig};
use kvstrata_tiers::{BlockKey, EventBus, NamespaceId};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

pub use args::{DiskBenchArgs, DiskEngine, parse_size};
pub use drive::DriveReport;
pub use report::{DiskBenchReport, DiskPhaseReport};

use args::DiskPlan;
use callers::Verified;
use drive::DriveProbe;
use read::{read_phase, read_stream_phase};
use write::{write_phase, write_stream_phase};

use crate::error::BenchError;
use crate::pattern::{Pattern, SEED};

/// Namespace of the benchmark's blocks.
const NAMESPACE: NamespaceId = NamespaceId(*b"kvstrata-bench-d");

fn key_of(index: u64) -> Result<BlockKey, BenchError> {
    BlockKey::new("key", format!("bench-disk-{index}").as_bytes()).map_err(|e| {
        BenchError::Protocol {
            op: "bench-disk",
            reason: e.to_string(),
        }
    })
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

/// The tier's settings for `plan` in `dir`.
fn tier_config(args: &DiskBenchArgs, plan: &DiskPlan, dir: &Path) -> DiskTierConfig {
    DiskTierConfig {
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
        ..DiskTierConfig::in_dir(dir, plan.capacity)
    }
}

/// What the two phases measured.
struct Phases {
    write: DiskPhaseReport,
    read: DiskPhaseReport,
    /// Blocks the read phase did not find.
    read_misses: u64,
    verified: Verified,
    /// The tier's counters after the read phase.
    stats: DiskStats,
}

/// Runs the write phase, then the read phase in a shuffled order (fixed
/// seed), each with the drive's counters around it.
fn run_phases(
    tier: &DiskTier,
    plan: &DiskPlan,
    pattern: &Pattern,
    keys: &[BlockKey],
    drive: &DriveProbe,
) -> Result<Phases, BenchError> {
    let w_before = drive.sample(true);
    let (w, w_elapsed) = if plan.stream {
        write_stream_phase(tier, plan, pattern, keys)?
    } else {
        write_phase(tier, plan, pattern, keys)?
    };
    let w_drive = drive.phase(w_before, true, w_elapsed);
    let after_write = tier.disk_stats();

    let mut order: Vec<u64> = (0..plan.blocks).collect();
    order.shuffle(&mut StdRng::seed_from_u64(SEED));
    let r_before = drive.sample(false);
    let (r, r_elapsed, verified) = if plan.stream {
        read_stream_phase(tier, plan, pattern, keys, &order)?
    } else {
        read_phase(tier, plan, pattern, keys, &order)?
    };
    let r_drive = drive.phase(r_before, false, r_elapsed);
    let stats = tier.disk_stats();

    Ok(Phases {
        write: DiskPhaseReport::new(
            &w,
            w_elapsed,
            after_write.write_bytes,
            after_write.write_busy,
            w_drive,
        ),
        read: DiskPhaseReport::new(
            &r,
            r_elapsed,
            stats.read_bytes.saturating_sub(after_write.read_bytes),
            stats.read_busy.saturating_sub(after_write.read_busy),
            r_drive,
        ),
        read_misses: r.misses,
        verified,
        stats,
    })
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
    let tier = DiskTier::open(
        &tier_config(args, &plan, &dir),
        Arc::new(EventBus::new(1024)),
    )?;
    let pattern = Pattern::new(plan.block);
    let keys: Vec<BlockKey> = (0..plan.blocks).map(key_of).collect::<Result<_, _>>()?;

    let Phases {
        write,
        read,
        read_misses,
        verified,
        stats,
    } = run_phases(&tier, &plan, &pattern, &keys, &DriveProbe::new(&dir))?;
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
        write,
        read,
        verified_blocks: verified.blocks,
        verify_failures: verified.failures,
        first_failure: verified.first.clone(),
        io_errors: stats.io_errors,
        timeouts: stats.timeouts,
        corrupt_blocks: stats.corrupt_blocks,
    };
    drop(tier);
    if verified.failures > 0 || read_misses > 0 {
        let first = verified
            .first
            .unwrap_or_else(|| format!("{read_misses} blocks missed"));
        return Err(BenchError::DiskVerifyFailed {
            failures: verified.failures,
            misses: read_misses,
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
    use bytesize::ByteSize;

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
}
