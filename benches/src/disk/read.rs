//! The read phase: every block read back once in a shuffled order, in
//! `get_many` calls of `--queue-depth` blocks or (`--stream`) one
//! `get_stream` per caller, each block handed to the verifier.

use std::time::{Duration, Instant};

use kvstrata_tiers::BlockKey;
use kvstrata_tiers::disk::DiskTier;

use super::NAMESPACE;
use super::args::DiskPlan;
use super::callers::{Verified, call_range, with_verifier};
use crate::error::BenchError;
use crate::pattern::Pattern;
use crate::report::OpAccum;

/// Runs the read phase in `order`; returns the merged counters, the wall
/// time and what the verifier found.
pub(super) fn read_phase(
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

/// The read phase with `--stream`: caller `t` streams `order[t]`,
/// `order[t + threads]`, ... through one get_stream call, handing the
/// blocks to the verifier `--queue-depth` at a time.
pub(super) fn read_stream_phase(
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
