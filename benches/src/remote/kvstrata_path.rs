//! The kvstrata path: a real `RemoteTier` (no local tier in front of it)
//! writes every block with `put_many`, then reads them all back with
//! `get_many`, `--concurrency` blocks per call, each block checked.

use std::time::Instant;

use bytes::Bytes;
use kvstrata_tiers::{BlockKey, RemoteTier};

use super::NAMESPACE;
use super::batch::{Clock, PathAccum, SizeCtx, batches, failed};
use super::report::size_label;
use crate::error::BenchError;

/// The tier's key of block `index` at `size`.
pub(super) fn block_key(size: usize, index: u64) -> Result<BlockKey, BenchError> {
    BlockKey::new("key", format!("bench-remote-{size}-{index}").as_bytes()).map_err(|e| {
        BenchError::Protocol {
            op: "bench-remote",
            reason: e.to_string(),
        }
    })
}

/// The kvstrata path at one size (blocking: the tier's calls wait).
pub(super) fn run(tier: &RemoteTier, cx: &SizeCtx<'_>) -> Result<PathAccum, BenchError> {
    let (block, plan) = (cx.block, cx.plan);
    let why = |tier: &RemoteTier| {
        let s = tier.stats();
        format!(
            "tier counters: {} errors, {} timeouts, {} corrupt; last error: {:?}",
            s.errors, s.timeouts, s.corrupt_blocks, s.last_error
        )
    };
    let keys: Vec<BlockKey> = (0..plan.blocks)
        .map(|i| block_key(block, i))
        .collect::<Result<_, _>>()?;

    cx.bar
        .set_message(format!("kvstrata write {}", size_label(block)));
    let mut out = PathAccum::new()?;
    let started = Instant::now();
    let w = &mut out.write;
    for r in batches(plan.blocks, plan.concurrency) {
        let items: Vec<(BlockKey, Option<BlockKey>, Bytes)> = r
            .clone()
            .map(|i| (keys[i as usize], None, cx.pattern.payload(i)))
            .collect();
        let t0 = Clock::start();
        let stored = tier.put_many(&NAMESPACE, &items);
        w.batch(&t0, items.len(), block);
        if let Some(j) = stored.iter().position(|ok| !ok) {
            return Err(failed(
                "kvstrata",
                "write",
                block,
                format!(
                    "put_many did not store block {}; {}",
                    r.start + j as u64,
                    why(tier)
                ),
            ));
        }
        cx.bar.inc(items.len() as u64);
    }
    w.phase = started.elapsed();

    cx.bar
        .set_message(format!("kvstrata read {}", size_label(block)));
    let started = Instant::now();
    let rd = &mut out.read;
    for r in batches(plan.blocks, plan.concurrency) {
        let ks = &keys[r.start as usize..r.end as usize];
        let t0 = Clock::start();
        let got = tier.get_many(&NAMESPACE, ks, block as u64);
        rd.batch(&t0, ks.len(), block);
        for (i, g) in r.clone().zip(got) {
            let Some(b) = g else {
                return Err(failed(
                    "kvstrata",
                    "read",
                    block,
                    format!("get_many missed block {i}; {}", why(tier)),
                ));
            };
            if let Some(bad) = cx.pattern.check(i, &b.payload) {
                return Err(failed("kvstrata", "read", block, bad));
            }
            out.verified += 1;
        }
        cx.bar.inc(ks.len() as u64);
    }
    out.read.phase = started.elapsed();
    Ok(out)
}
