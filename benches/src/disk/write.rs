//! The write phase: every block stored once, in `put_many` calls of
//! `--queue-depth` blocks or (`--stream`) one `put_stream` per caller.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use kvstrata_tiers::disk::{DiskPut, DiskTier, StreamPut};
use kvstrata_tiers::{BlockKey, PutOutcome};

use super::NAMESPACE;
use super::args::DiskPlan;
use super::callers::{call_range, with_writers};
use crate::error::BenchError;
use crate::pattern::Pattern;
use crate::report::OpAccum;

/// Runs the write phase; returns the merged counters and the wall time.
pub(super) fn write_phase(
    tier: &DiskTier,
    plan: &DiskPlan,
    pattern: &Pattern,
    keys: &[BlockKey],
) -> Result<(OpAccum, Duration), BenchError> {
    let calls = keys.len().div_ceil(plan.queue_depth);
    with_writers(plan, |t| {
        let mut acc = OpAccum::new()?;
        let mut bufs: Vec<Vec<u8>> = (0..plan.queue_depth).map(|_| pattern.unstamped()).collect();
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
pub(super) fn write_stream_phase(
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
                .unwrap_or_else(|| pattern.unstamped());
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
