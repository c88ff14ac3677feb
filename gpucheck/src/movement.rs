//! The tier-movement benchmark of `kvstrata gpu-check`: blocks moved between
//! the HBM tier (T0) and the pinned host tier (T1) through a real
//! `BlockCache` ([`tier_movement_bench`]), and the parts of such a move timed
//! alone (the batched copies as the tier issues them, the xxh3 of the host
//! copies on rayon's pool), each with its ratio to the pinned copy ceilings
//! measured in the same run ([`crate::ceilings`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use kvstrata_kernels::{CopyOp, DEFAULT_DMA_THRESHOLD, Gpu, GpuError, GpuStream};
use kvstrata_tiers::disk::checksum::xxh3_64;
use kvstrata_tiers::{
    BlockCache, BlockKey, CacheConfig, Dtype, HbmTierConfig, HostTierConfig, NamespaceSpec,
    PutOutcome,
};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rayon::prelude::*;

use crate::kernels::random_bytes;
use crate::report::{BenchRow, human};

/// T0↔T1 through the cache: fill a device's HBM tier with model-sized
/// blocks (gathered from a device buffer by `put_from_device`), time an
/// `evict` of all of them (demotion T0→T1: device→pinned copies, then each
/// block published in the host tier after its checksum is checked), then a
/// `get_to_device` of all of them from the host tier with promotion on
/// (T1→T0: pinned→device copies). GB/s of payload, ratio to the pinned
/// ceilings measured in the same run.
pub fn tier_movement_bench(
    gpu: &Gpu,
    bytes: u64,
    ceilings: (f64, f64),
) -> Result<Vec<BenchRow>, String> {
    let mut rows = Vec::new();
    let default_dma = DEFAULT_DMA_THRESHOLD;
    for (group, dma) in [
        (16u64 << 20, default_dma),
        (64 << 20, default_dma),
        (64 << 20, 4 << 20),
    ] {
        rows.extend(movement_through_cache(gpu, bytes, ceilings, group, dma)?);
    }
    rows.extend(movement_parts(gpu, bytes, ceilings)?);
    Ok(rows)
}

/// Model-sized blocks (30 layers × 2 × 32 tokens × 3 heads × 64 dims, f16).
const MOVE_BLOCK: u64 = 30 * 2 * 32 * 3 * 64 * 2;

/// The parts of a T0↔T1 move timed alone, to say where the cache's time
/// goes: the batched copies of 720 KiB blocks as the tier issues them
/// (16 MiB launches, a fence each, 4 queued), and xxh3 of the host copies on
/// rayon's pool (what demotion verifies).
fn movement_parts(gpu: &Gpu, bytes: u64, ceilings: (f64, f64)) -> Result<Vec<BenchRow>, String> {
    let err = |e: GpuError| e.to_string();
    let n = (bytes / MOVE_BLOCK).max(1) as usize;
    let total = n * MOVE_BLOCK as usize;
    let device = gpu.alloc_device(total).map_err(err)?;
    let mut host = gpu.alloc_pinned(total).map_err(err)?;
    host.as_mut_slice()
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i * 31 + i / 4099) as u8);
    let stream = gpu.stream().map_err(err)?;
    let per_group = ((16u64 << 20) / MOVE_BLOCK).max(1) as usize;
    let mut rows = Vec::new();
    for (name, to_host, ceiling_name, ceiling) in [
        (
            "T0->T1 copies alone (16 MiB launches, 4 queued)",
            true,
            "pinned D2H",
            ceilings.1,
        ),
        (
            "T1->T0 copies alone (16 MiB launches, 4 queued)",
            false,
            "pinned H2D",
            ceilings.0,
        ),
    ] {
        let ops: Vec<CopyOp> = (0..n)
            .map(|i| {
                let (d, h) = (
                    device.ptr() + (i as u64) * MOVE_BLOCK,
                    host.device_ptr() + (i as u64) * MOVE_BLOCK,
                );
                let (src, dst) = if to_host { (d, h) } else { (h, d) };
                CopyOp {
                    src,
                    dst,
                    len: MOVE_BLOCK,
                }
            })
            .collect();
        // SAFETY: every op lies inside the two buffers allocated above.
        let best = unsafe { best_group_copies(&stream, &ops, per_group) }.map_err(err)?;
        let gbs = total as f64 / best / 1e9;
        rows.push(BenchRow {
            path: name.to_string(),
            block: human(MOVE_BLOCK),
            gb_per_s: gbs,
            ceiling: ceiling_name.to_string(),
            ceiling_gb_per_s: ceiling,
            ratio: gbs / ceiling,
            counted: "payload, best of 3".to_string(),
        });
    }
    // The D2H copies again while rayon's pool hashes another 1 GiB (as a
    // demotion does): does the hashing's memory traffic slow the DMA?
    {
        let other: Vec<u8> = (0..total).map(|i| (i * 7) as u8).collect();
        let stop = AtomicBool::new(false);
        let ops: Vec<CopyOp> = (0..n)
            .map(|i| CopyOp {
                src: device.ptr() + (i as u64) * MOVE_BLOCK,
                dst: host.device_ptr() + (i as u64) * MOVE_BLOCK,
                len: MOVE_BLOCK,
            })
            .collect();
        let best = std::thread::scope(|scope| {
            scope.spawn(|| {
                let chunks: Vec<&[u8]> = other.chunks(MOVE_BLOCK as usize).collect();
                while !stop.load(Ordering::Relaxed) {
                    let x = chunks
                        .par_iter()
                        .map(|b| xxh3_64(b))
                        .reduce(|| 0, |a, b| a ^ b);
                    std::hint::black_box(x);
                }
            });
            // SAFETY: every op lies inside the two buffers above.
            let best = unsafe { best_group_copies(&stream, &ops, per_group) };
            stop.store(true, Ordering::Relaxed);
            best
        })
        .map_err(err)?;
        let gbs = total as f64 / best / 1e9;
        rows.push(BenchRow {
            path: "T0->T1 copies alone while 16 threads hash".to_string(),
            block: human(MOVE_BLOCK),
            gb_per_s: gbs,
            ceiling: "pinned D2H".to_string(),
            ceiling_gb_per_s: ceilings.1,
            ratio: gbs / ceilings.1,
            counted: "payload, best of 3".to_string(),
        });
    }
    let blocks: Vec<&[u8]> = host.as_slice().chunks(MOVE_BLOCK as usize).collect();
    let mut best = f64::MAX;
    let mut sink = 0u64;
    for _ in 0..3 {
        let t = Instant::now();
        sink ^= blocks
            .par_iter()
            .map(|b| xxh3_64(b))
            .reduce(|| 0, |a, b| a ^ b);
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    let gbs = total as f64 / best / 1e9;
    rows.push(BenchRow {
        path: format!(
            "xxh3 of host copies, {} rayon threads",
            rayon::current_num_threads()
        ),
        block: human(MOVE_BLOCK),
        gb_per_s: gbs,
        ceiling: "pinned D2H".to_string(),
        ceiling_gb_per_s: ceilings.1,
        ratio: gbs / ceilings.1,
        counted: "payload, best of 3".to_string(),
    });
    Ok(rows)
}

/// Best of 3 wall-clock seconds for `ops` issued as the HBM tier issues a
/// move: one batched-copy launch and fence per `per_group` ops, 4 queued.
///
/// # Safety
/// Every op must lie inside live buffers of the stream's device.
unsafe fn best_group_copies(
    stream: &GpuStream,
    ops: &[CopyOp],
    per_group: usize,
) -> Result<f64, GpuError> {
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let mut queued = VecDeque::new();
        for group in ops.chunks(per_group) {
            // SAFETY: the caller's contract.
            unsafe { stream.batched_copy(group) }?;
            queued.push_back(stream.record()?);
            if queued.len() >= 4
                && let Some(f) = queued.pop_front()
            {
                f.wait()?;
            }
        }
        for f in queued {
            f.wait()?;
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// `evict` and `get_to_device` of `bytes` of blocks through a cache whose
/// HBM tier moves `group` bytes per launch.
fn movement_through_cache(
    gpu: &Gpu,
    bytes: u64,
    ceilings: (f64, f64),
    group: u64,
    dma_threshold: u64,
) -> Result<Vec<BenchRow>, String> {
    let block_tokens = 32u32;
    let spec =
        NamespaceSpec::layer_major("gpu-check-movement", 30, 3, 64, Dtype::F16, block_tokens);
    let block = 30u64 * 2 * block_tokens as u64 * 3 * 64 * 2;
    let n = (bytes / block).max(1) as usize;
    let config = CacheConfig {
        host: HostTierConfig {
            capacity_bytes: 2 * n as u64 * block,
            ..HostTierConfig::default()
        },
        hbm: Some(HbmTierConfig {
            capacity_bytes: n as u64 * block + (64 << 20),
            move_group_bytes: group,
            dma_threshold,
            ..HbmTierConfig::default()
        }),
        ..CacheConfig::default()
    };
    let cache = BlockCache::with_gpus(config, vec![gpu.clone()]).map_err(|e| e.to_string())?;
    let (ns, _) = cache.register_namespace(spec).map_err(|e| e.to_string())?;
    let ns = ns.id;
    let source = gpu
        .alloc_device(block as usize)
        .map_err(|e| e.to_string())?;
    let stream = gpu.stream().map_err(|e| e.to_string())?;
    {
        let mut seed = StdRng::seed_from_u64(rand::random());
        let data = random_bytes(&mut seed, block as usize);
        // SAFETY: `data` lives until the synchronize.
        unsafe { stream.copy(source.ptr(), data.as_ptr() as u64, block) }
            .map_err(|e| e.to_string())?;
        stream.synchronize().map_err(|e| e.to_string())?;
    }
    let keys: Vec<BlockKey> = (0..n)
        .map(|i| BlockKey::new("key", &(i as u64).to_le_bytes()).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    for chunk in keys.chunks(64) {
        let items: Vec<_> = chunk.iter().map(|k| (*k, None)).collect();
        let out = cache
            .put_from_device(&ns, 0, &items, |addrs| {
                let ops: Vec<CopyOp> = addrs
                    .iter()
                    .map(|&dst| CopyOp {
                        src: source.ptr(),
                        dst,
                        len: block,
                    })
                    .collect();
                // SAFETY: every slot address holds `block` bytes, reserved for this fill.
                unsafe { stream.batched_copy(&ops) }?;
                stream.record()?.wait()
            })
            .map_err(|e| format!("{e:?}"))?;
        if out.iter().any(|o| *o != PutOutcome::Stored) {
            return Err("the HBM tier refused a block".to_string());
        }
    }
    let t = Instant::now();
    let (evicted, _) = cache.evict(&ns, &[], true).map_err(|e| e.to_string())?;
    let demote = t.elapsed().as_secs_f64();
    // `get_to_device` of `keys`: blocks found, seconds.
    let promote_all = |keys: &[BlockKey]| -> Result<(usize, f64), String> {
        let t = Instant::now();
        let found = cache
            .get_to_device(&ns, 0, keys, |blocks| {
                blocks.iter().filter(|b| b.is_some()).count()
            })
            .map_err(|e| e.to_string())?;
        Ok((found, t.elapsed().as_secs_f64()))
    };
    let (found, promote) = promote_all(&keys)?;
    if evicted as usize != n || found != n {
        return Err(format!("{evicted} demoted and {found} found of {n} blocks"));
    }
    // Again with the keys asked in random order: the blocks no longer lie
    // side by side in the order they are copied, so no two runs coalesce
    // (the batched kernel, not DMA). The host tier still holds every block,
    // so this evict drops the T0 copies without copying.
    cache.evict(&ns, &[], true).map_err(|e| e.to_string())?;
    let mut shuffled = keys.clone();
    shuffled.shuffle(&mut rand::rng());
    let (found, promote_scattered) = promote_all(&shuffled)?;
    if found != n {
        return Err(format!("{found} found of {n} blocks in random order"));
    }
    let moved = (n as u64 * block) as f64;
    let dma_label = if dma_threshold == DEFAULT_DMA_THRESHOLD {
        String::new()
    } else {
        format!(", DMA from {}", human(dma_threshold))
    };
    let row = |what: &str, seconds: f64, ceiling: &str, ceiling_gb: f64| BenchRow {
        path: format!("hbm tier {what}, {} groups{dma_label}", human(group)),
        block: human(block),
        gb_per_s: moved / seconds / 1e9,
        ceiling: ceiling.to_string(),
        ceiling_gb_per_s: ceiling_gb,
        ratio: moved / seconds / 1e9 / ceiling_gb,
        counted: "payload, wall clock".to_string(),
    };
    Ok(vec![
        row(
            "demotion T0->T1 (evict all)",
            demote,
            "pinned D2H",
            ceilings.1,
        ),
        row(
            "promotion T1->T0 (get_to_device)",
            promote,
            "pinned H2D",
            ceilings.0,
        ),
        row(
            "promotion T1->T0, keys in random order (no runs coalesce)",
            promote_scattered,
            "pinned H2D",
            ceilings.0,
        ),
    ])
}
