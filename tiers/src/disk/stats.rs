//! The disk tier's own counters ([`DiskStats`]: corrupt blocks, I/O errors,
//! timeouts, transfers, bytes, busy time) and the bookkeeping every
//! transfer goes through: [`DiskTier::transfer`] runs a batch with its
//! deadline, [`DiskTier::count`] counts each finished transfer, and a
//! [`BusyClock`] measures the wall time with transfers in flight.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::DiskTier;
use super::io::{self, IoDone, IoFailure, IoOp, OpKind};
use crate::tier::{Tier, TierCounters, TierStats};

/// Disk-specific counters plus the tier's occupancy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskStats {
    pub tier: TierStats,
    /// "io_uring" or "pread".
    pub engine: &'static str,
    pub files: Vec<(PathBuf, u64)>,
    /// Slots that failed verification (dropped).
    pub corrupt_blocks: u64,
    /// Transfers that failed with an errno or were short; failed index writes.
    pub io_errors: u64,
    /// Transfers abandoned at their deadline.
    pub timeouts: u64,
    pub read_ops: u64,
    pub write_ops: u64,
    /// Bytes moved by successful transfers (headers and padding included).
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Wall time with at least one read (write) in flight.
    pub read_busy: Duration,
    pub write_busy: Duration,
}

impl DiskStats {
    /// Read throughput while busy, in bytes per second.
    pub fn read_bytes_per_sec(&self) -> f64 {
        rate(self.read_bytes, self.read_busy)
    }

    /// Write throughput while busy, in bytes per second.
    pub fn write_bytes_per_sec(&self) -> f64 {
        rate(self.write_bytes, self.write_busy)
    }
}

fn rate(bytes: u64, busy: Duration) -> f64 {
    if busy.is_zero() {
        0.0
    } else {
        bytes as f64 / busy.as_secs_f64()
    }
}

/// Wall time during which at least one transfer of a kind was in flight.
#[derive(Debug, Default)]
pub(super) struct BusyClock {
    state: Mutex<(u32, Option<Instant>)>,
    busy_ns: AtomicU64,
}

impl BusyClock {
    fn enter(&self) {
        let mut s = self.state.lock();
        if s.0 == 0 {
            s.1 = Some(Instant::now());
        }
        s.0 += 1;
    }

    fn exit(&self) {
        let mut s = self.state.lock();
        s.0 = s.0.saturating_sub(1);
        if s.0 == 0
            && let Some(t) = s.1.take()
        {
            self.busy_ns
                .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
    }

    pub(super) fn get(&self) -> Duration {
        Duration::from_nanos(self.busy_ns.load(Ordering::Relaxed))
    }

    /// Counts as busy until the guard drops (also when a caller's callback
    /// panics meanwhile).
    pub(super) fn busy(&self) -> Busy<'_> {
        self.enter();
        Busy(self)
    }
}

/// A transfer phase counted by a [`BusyClock`] ([`BusyClock::busy`]).
pub(super) struct Busy<'a>(&'a BusyClock);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.exit();
    }
}

/// The disk tier's counters (see [`DiskStats`]).
#[derive(Debug, Default)]
pub(super) struct DiskCounters {
    pub(super) corrupt_blocks: AtomicU64,
    pub(super) io_errors: AtomicU64,
    pub(super) timeouts: AtomicU64,
    pub(super) read_ops: AtomicU64,
    pub(super) write_ops: AtomicU64,
    pub(super) read_bytes: AtomicU64,
    pub(super) write_bytes: AtomicU64,
    pub(super) read_busy: BusyClock,
    pub(super) write_busy: BusyClock,
}

impl DiskTier {
    /// Occupancy, counters, engine and throughput.
    pub fn disk_stats(&self) -> DiskStats {
        let d = &self.inner.disk;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DiskStats {
            tier: self.stats(),
            engine: self.engine_name(),
            files: self
                .inner
                .files
                .iter()
                .map(|f| (f.path.clone(), f.size))
                .collect(),
            corrupt_blocks: get(&d.corrupt_blocks),
            io_errors: get(&d.io_errors),
            timeouts: get(&d.timeouts),
            read_ops: get(&d.read_ops),
            write_ops: get(&d.write_ops),
            read_bytes: get(&d.read_bytes),
            write_bytes: get(&d.write_bytes),
            read_busy: d.read_busy.get(),
            write_busy: d.write_busy.get(),
        }
    }

    /// Runs a batch of transfers with the right deadline and bookkeeping.
    pub(super) fn transfer(&self, kind: OpKind, ops: Vec<IoOp>) -> Vec<IoDone> {
        let inner = &*self.inner;
        let d = &inner.disk;
        let (timeout, clock, ops_c, bytes_c) = match kind {
            OpKind::Read => (
                inner.config.read_timeout,
                &d.read_busy,
                &d.read_ops,
                &d.read_bytes,
            ),
            OpKind::Write => (
                inner.config.write_timeout,
                &d.write_busy,
                &d.write_ops,
                &d.write_bytes,
            ),
        };
        let lens: Vec<usize> = ops.iter().map(|o| o.buf.len()).collect();
        let busy = clock.busy();
        let done = io::run(&*inner.engine, ops, Instant::now() + timeout);
        drop(busy);
        for (d_, len) in done.iter().zip(lens) {
            self.count(d_.result, ops_c, bytes_c, len);
        }
        done
    }

    /// Counts one finished transfer of `len` bytes.
    pub(super) fn count(
        &self,
        result: Result<(), IoFailure>,
        ops: &AtomicU64,
        bytes: &AtomicU64,
        len: usize,
    ) {
        let d = &self.inner.disk;
        match result {
            Ok(()) => {
                TierCounters::add(ops, 1);
                TierCounters::add(bytes, len as u64);
            }
            Err(IoFailure::Timeout) => TierCounters::add(&d.timeouts, 1),
            Err(_) => TierCounters::add(&d.io_errors, 1),
        }
    }
}
