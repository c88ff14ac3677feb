//! Flags of `kvstrata bench-disk`, fio-style sizes, and the checked plan
//! (flags plus the tier's slot and segment geometry) a run follows.

use std::path::PathBuf;
use std::str::FromStr;

use bytesize::ByteSize;
use kvstrata_tiers::disk::EngineChoice;
use kvstrata_tiers::disk::file::align_up;
use kvstrata_tiers::disk::header::HEADER_REGION;
use serde::Serialize;

use crate::error::BenchError;
use crate::pattern::STAMP;
use crate::plan_checks;

/// Target segment size of the tier's slot arena (its default).
const SEGMENT_TARGET: u64 = 64 << 20;
/// Largest block the benchmark accepts (the tier's segments stay below 4 GiB).
const MAX_BLOCK_BYTES: u64 = 1 << 30;

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
pub(super) struct DiskPlan {
    pub(super) block: usize,
    pub(super) blocks: u64,
    pub(super) queue_depth: usize,
    pub(super) stream: bool,
    pub(super) threads: usize,
    /// Bytes of one slot on the drive (header region + payload rounded up).
    pub(super) slot_bytes: u64,
    pub(super) segment_bytes: u64,
    pub(super) capacity: u64,
}

impl DiskBenchArgs {
    pub(super) fn plan(&self) -> Result<DiskPlan, BenchError> {
        let bs = self.block_size.as_u64();
        let block = plan_checks::block_size(
            "--block-size",
            bs,
            STAMP as u64,
            "the verification stamp",
            MAX_BLOCK_BYTES,
        )?;
        plan_checks::at_least_one("--queue-depth", self.queue_depth as u64)?;
        plan_checks::at_least_one("--threads", self.threads as u64)?;
        let blocks = self.total.as_u64() / bs;
        if blocks == 0 {
            return Err(BenchError::InvalidArg {
                field: "--total",
                reason: format!("{} bytes; at least one block ({bs})", self.total.as_u64()),
            });
        }
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
}
