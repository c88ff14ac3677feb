//! What both paths share: the batch schedule, the clock around each batch
//! (wall and process CPU time) and the counters it feeds, and the context
//! a path runs in at one block size.

use std::time::{Duration, Instant};

use indicatif::ProgressBar;

use super::args::RemotePlan;
use super::report::{RemotePathReport, RemotePhaseReport, div};
use crate::error::BenchError;
use crate::pattern::Pattern;
use crate::report::{OpAccum, OpReport, process_cpu};

/// Start of a batch: wall clock and process CPU time.
pub(super) struct Clock {
    wall: Instant,
    cpu: Duration,
}

impl Clock {
    pub(super) fn start() -> Clock {
        Clock {
            cpu: process_cpu(),
            wall: Instant::now(),
        }
    }
}

/// Counters of one direction of one path, over every round.
pub(super) struct PhaseAccum {
    acc: OpAccum,
    /// Sum of the batches' wall times.
    busy: Duration,
    /// Sum of the phases' wall times.
    pub(super) phase: Duration,
    /// Process CPU time used during the batches.
    cpu: Duration,
}

impl PhaseAccum {
    fn new() -> Result<Self, BenchError> {
        Ok(PhaseAccum {
            acc: OpAccum::new()?,
            busy: Duration::ZERO,
            phase: Duration::ZERO,
            cpu: Duration::ZERO,
        })
    }

    fn merge(&mut self, other: &PhaseAccum) -> Result<(), BenchError> {
        self.acc.merge(&other.acc)?;
        self.busy += other.busy;
        self.phase += other.phase;
        self.cpu += other.cpu;
        Ok(())
    }

    /// One batch of `blocks` blocks of `block` bytes, all stored or found,
    /// that started at `clock`.
    pub(super) fn batch(&mut self, clock: &Clock, blocks: usize, block: usize) {
        let took = clock.wall.elapsed();
        self.cpu += process_cpu().saturating_sub(clock.cpu);
        self.acc.record_latency(took);
        self.busy += took;
        self.acc.blocks += blocks as u64;
        self.acc.hits += blocks as u64;
        self.acc.bytes += (blocks * block) as u64;
    }

    fn report(&self) -> RemotePhaseReport {
        let secs = self.busy.as_secs_f64();
        let cpu = self.cpu.as_secs_f64();
        RemotePhaseReport {
            seconds: secs,
            phase_seconds: self.phase.as_secs_f64(),
            cpu_seconds: cpu,
            cpu_s_per_gb: div(cpu, self.acc.bytes as f64 / 1e9),
            op: OpReport::from_accum(&self.acc, secs),
        }
    }
}

/// Write and read of one path, over every round.
pub(super) struct PathAccum {
    pub(super) write: PhaseAccum,
    pub(super) read: PhaseAccum,
    pub(super) verified: u64,
}

impl PathAccum {
    pub(super) fn new() -> Result<Self, BenchError> {
        Ok(PathAccum {
            write: PhaseAccum::new()?,
            read: PhaseAccum::new()?,
            verified: 0,
        })
    }

    pub(super) fn merge(&mut self, other: &PathAccum) -> Result<(), BenchError> {
        self.write.merge(&other.write)?;
        self.read.merge(&other.read)?;
        self.verified += other.verified;
        Ok(())
    }

    pub(super) fn report(&self, value_bytes: u64) -> RemotePathReport {
        RemotePathReport {
            value_bytes,
            write: self.write.report(),
            read: self.read.report(),
            verified_blocks: self.verified,
            verify_failures: 0,
        }
    }
}

/// Batches of `c` consecutive block indices out of `n`.
pub(super) fn batches(n: u64, c: usize) -> impl Iterator<Item = std::ops::Range<u64>> {
    let c = c as u64;
    (0..n.div_ceil(c)).map(move |b| b * c..((b + 1) * c).min(n))
}

pub(super) fn failed(
    path: &'static str,
    op: &'static str,
    block: usize,
    reason: String,
) -> BenchError {
    BenchError::RemoteFailed {
        path,
        op,
        block_size: block as u64,
        reason,
    }
}

/// What a path needs for one block size.
pub(super) struct SizeCtx<'a> {
    pub(super) plan: &'a RemotePlan,
    pub(super) block: usize,
    pub(super) pattern: &'a Pattern,
    pub(super) bar: &'a ProgressBar,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_every_block_once() {
        let b: Vec<_> = batches(10, 4).collect();
        assert_eq!(b, [0..4, 4..8, 8..10]);
        assert_eq!(batches(4, 4).count(), 1);
        let one: Vec<_> = batches(1, 16).collect();
        assert_eq!((one.len(), one[0].clone()), (1, 0..1));
    }
}
