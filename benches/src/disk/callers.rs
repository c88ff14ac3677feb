//! The caller threads of a phase: runs `--threads` writers, or readers
//! beside one verifier thread that checks every block read, on scoped
//! threads, and adds up what they counted.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::args::DiskPlan;
use crate::error::BenchError;
use crate::pattern::Pattern;
use crate::report::OpAccum;

/// What the verifier found.
#[derive(Debug, Default)]
pub(super) struct Verified {
    pub(super) blocks: u64,
    pub(super) failures: u64,
    pub(super) first: Option<String>,
}

/// Blocks a reader hands the verifier: (block index, bytes read).
pub(super) type ReadBatch = Vec<(u64, Bytes)>;

/// Indices of call `c` (of `qd` blocks) in `order`.
pub(super) fn call_range(c: usize, qd: usize, len: usize) -> std::ops::Range<usize> {
    let start = c * qd;
    start..(start + qd).min(len)
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

/// Runs `plan.threads` writers (`writer(t)`: writer `t`) at once; returns
/// their merged counters and the wall time.
pub(super) fn with_writers<F>(plan: &DiskPlan, writer: F) -> Result<(OpAccum, Duration), BenchError>
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

/// Runs `plan.threads` readers (`reader(t, tx)`: reader `t`, sending the
/// blocks it read to `tx`) beside one verifier that checks every block
/// against `pattern`; returns the merged counters, the wall time and what
/// the verifier found. A few batches of slack per reader, so checking never
/// stalls a reader but buffers are not held for long.
pub(super) fn with_verifier<F>(
    plan: &DiskPlan,
    pattern: &Pattern,
    reader: F,
) -> Result<(OpAccum, Duration, Verified), BenchError>
where
    F: Fn(usize, mpsc::SyncSender<ReadBatch>) -> Result<OpAccum, BenchError> + Sync,
{
    let (tx, rx) = mpsc::sync_channel::<ReadBatch>(4 * plan.threads);
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
