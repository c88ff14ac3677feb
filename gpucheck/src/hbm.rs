//! The HBM tier's check of `kvstrata gpu-check`, through a real
//! `BlockCache`; it runs on any [`Gpu`] backend: CI runs it with
//! [`Gpu::cpu`], `kvstrata gpu-check` with a CUDA device.
//!
//! [`hbm_round_trips`]: an HBM tier much smaller than the working set, the
//! host tier between it and the working set, random payloads, every read
//! checked byte for byte, capacities checked throughout; blocks go in by
//! `put_batch` (host tier) and `put_from_device` (HBM tier), come out by
//! `get_batch` and `get_to_device`, so demotion (T0→T1) and promotion
//! (T1→T0) both run, and replacing, evicting and deleting keys are checked
//! for stale reads; then threads with their own streams and keys run device
//! and inline puts and reads at once, checked the same way, while the
//! capacities are watched; last, a block whose bytes are changed in T0 must
//! fail its check on the way out to T1 and never be served.

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt::Write as _;

use bytes::Bytes;
use kvstrata_kernels::{Gpu, GpuError, GpuStream, PinnedBuffer};
use kvstrata_tiers::{
    BlockCache, BlockKey, CacheConfig, CacheStats, Dtype, HbmTierConfig, HostTierConfig,
    NamespaceId, NamespaceSpec, PutBlock, PutOutcome, Tier, TierKind,
};

/// A splitmix64 generator: random payloads without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn key(i: usize) -> Result<BlockKey, String> {
    BlockKey::new("key", format!("selfcheck-{i}").as_bytes()).map_err(|e| e.to_string())
}

/// Geometry of the scenario, in blocks.
const HBM_BLOCKS: u64 = 8;
const HOST_BLOCKS: u64 = 80;
const DEVICE_PUT: usize = 32;
const INLINE_PUT: usize = 8;
const BATCH: usize = 8;
const READ_ROUNDS: usize = 150;
const THREADS: usize = 4;
const STEPS: usize = 200;

struct Check {
    cache: BlockCache,
    ns: NamespaceId,
    block: usize,
    stream: GpuStream,
    src: PinnedBuffer,
    dst: PinnedBuffer,
    expected: HashMap<usize, Vec<u8>>,
    rng: Rng,
    max_hbm_used: Cell<u64>,
    max_host_used: Cell<u64>,
    served: HashMap<TierKind, u64>,
}

fn gpu_err(what: &str) -> impl Fn(GpuError) -> String + '_ {
    move |e| format!("{what}: {e}")
}

impl Check {
    fn check_capacity(&self, when: &str) -> Result<CacheStats, String> {
        let stats = self.cache.stats();
        for (kind, t) in &stats.tiers {
            if t.used_bytes > t.capacity_bytes {
                return Err(format!(
                    "{when}: {} tier holds {} bytes, over its capacity of {}",
                    kind.name(),
                    t.used_bytes,
                    t.capacity_bytes
                ));
            }
            match kind {
                TierKind::Hbm => self
                    .max_hbm_used
                    .set(self.max_hbm_used.get().max(t.used_bytes)),
                TierKind::Host => self
                    .max_host_used
                    .set(self.max_host_used.get().max(t.used_bytes)),
                _ => {}
            }
        }
        Ok(stats)
    }

    /// Stores `ids` through `put_from_device`: random payloads in pinned
    /// memory, copied into the reserved slots by the device.
    fn device_put(&mut self, ids: &[usize]) -> Result<(), String> {
        let block = self.block;
        let mut items = Vec::with_capacity(ids.len());
        for (n, &i) in ids.iter().enumerate() {
            let mut payload = vec![0u8; block];
            self.rng.fill(&mut payload);
            self.src.as_mut_slice()[n * block..(n + 1) * block].copy_from_slice(&payload);
            self.expected.insert(i, payload);
            let parent = if i > 0 { Some(key(i - 1)?) } else { None };
            items.push((key(i)?, parent));
        }
        let (stream, src) = (&self.stream, &self.src);
        let out = self
            .cache
            .put_from_device(&self.ns, 0, &items, |addrs: &[u64]| {
                for (n, &addr) in addrs.iter().enumerate() {
                    // SAFETY: `addr` is a reserved slot of `block` bytes and
                    // the source lies in our pinned buffer; we wait below.
                    unsafe {
                        stream.copy(addr, src.device_ptr() + (n * block) as u64, block as u64)?
                    };
                }
                stream.record()?.wait()
            })
            .map_err(|e| format!("put_from_device: {e}"))?;
        if out.iter().any(|o| *o != PutOutcome::Stored) {
            return Err(format!("put_from_device: {out:?}"));
        }
        Ok(())
    }

    fn inline_put(&mut self, ids: &[usize]) -> Result<(), String> {
        let mut items = Vec::with_capacity(ids.len());
        for &i in ids {
            let mut payload = vec![0u8; self.block];
            self.rng.fill(&mut payload);
            items.push(PutBlock {
                key: key(i)?,
                parent: if i > 0 { Some(key(i - 1)?) } else { None },
                payload: Bytes::from(payload.clone()),
            });
            self.expected.insert(i, payload);
        }
        let out = self
            .cache
            .put_batch(&self.ns, &items)
            .map_err(|e| format!("put_batch: {e}"))?;
        if out.iter().any(|o| *o != PutOutcome::Stored) {
            return Err(format!("put_batch: {out:?}"));
        }
        Ok(())
    }

    /// Reads `ids` through `get_to_device`: the device copies every block
    /// into pinned memory, which is compared with what was stored.
    fn device_get(&mut self, ids: &[usize]) -> Result<(), String> {
        let block = self.block;
        let keys = ids.iter().map(|&i| key(i)).collect::<Result<Vec<_>, _>>()?;
        let (stream, dst) = (&self.stream, &self.dst);
        let copied = self
            .cache
            .get_to_device(&self.ns, 0, &keys, |addrs| {
                let mut tiers = Vec::with_capacity(addrs.len());
                for (n, a) in addrs.iter().enumerate() {
                    let Some((addr, tier)) = a else {
                        tiers.push(None);
                        continue;
                    };
                    // SAFETY: `addr` holds the block until we return; the
                    // destination is our pinned buffer; we wait below.
                    unsafe {
                        stream.copy(dst.device_ptr() + (n * block) as u64, *addr, block as u64)?
                    };
                    tiers.push(Some(*tier));
                }
                stream.record()?.wait()?;
                Ok::<_, GpuError>(tiers)
            })
            .map_err(|e| format!("get_to_device: {e}"))?
            .map_err(gpu_err("get_to_device copy"))?;
        for (n, (&i, tier)) in ids.iter().zip(copied).enumerate() {
            let Some(tier) = tier else {
                return Err(format!("get_to_device: block {i} missing"));
            };
            *self.served.entry(tier).or_default() += 1;
            let got = &self.dst.as_slice()[n * block..(n + 1) * block];
            if self.expected.get(&i).map(Vec::as_slice) != Some(got) {
                return Err(format!(
                    "get_to_device: block {i} (from the {} tier) has wrong bytes",
                    tier.name()
                ));
            }
        }
        Ok(())
    }

    fn inline_get(&mut self, ids: &[usize]) -> Result<(), String> {
        let keys = ids.iter().map(|&i| key(i)).collect::<Result<Vec<_>, _>>()?;
        let got = self
            .cache
            .get_batch(&self.ns, &keys)
            .map_err(|e| format!("get_batch: {e}"))?;
        for (&i, g) in ids.iter().zip(got) {
            let Some((bytes, tier)) = g else {
                return Err(format!("get_batch: block {i} missing"));
            };
            if self.expected.get(&i).map(Vec::as_slice) != Some(&bytes[..]) {
                return Err(format!(
                    "get_batch: block {i} (from the {} tier) has wrong bytes",
                    tier.name()
                ));
            }
        }
        Ok(())
    }

    /// Stores block `id` in T0 only, flips one of its bytes in device
    /// memory, evicts it: its check on the way out must fail, and the block
    /// must be gone from every tier, never served.
    fn corrupt_then_evict(&mut self, id: usize) -> Result<String, String> {
        let before = self
            .cache
            .stats()
            .hbm
            .first()
            .map_or(0, |h| h.checksum_failures);
        self.device_put(&[id])?;
        let k = key(id)?;
        let first = self.expected.get(&id).and_then(|p| p.first()).copied();
        let first = first.ok_or("no payload recorded")?;
        self.src.as_mut_slice()[0] = !first;
        let (stream, src) = (&self.stream, &self.src);
        self.cache
            .get_to_device(&self.ns, 0, &[k], |addrs| -> Result<(), String> {
                let Some(Some((addr, TierKind::Hbm))) = addrs.first().copied() else {
                    return Err(format!("the fresh block is not in T0: {addrs:?}"));
                };
                // SAFETY: the block's first byte, while we hold its reader
                // count; the source is our pinned buffer; we wait below.
                unsafe { stream.copy(addr, src.device_ptr(), 1) }.map_err(gpu_err("corrupt"))?;
                stream.synchronize().map_err(gpu_err("corrupt"))
            })
            .map_err(|e| format!("get_to_device: {e}"))??;
        self.expected.remove(&id);
        self.cache
            .evict(&self.ns, &[k], false)
            .map_err(|e| format!("evict: {e}"))?;
        let after = self
            .cache
            .stats()
            .hbm
            .first()
            .map_or(0, |h| h.checksum_failures);
        if after != before + 1 {
            return Err(format!(
                "a block corrupted in T0 was evicted with {} checksum failures counted",
                after - before
            ));
        }
        let tiers = self
            .cache
            .lookup(&self.ns, &[k])
            .map_err(|e| format!("lookup: {e}"))?;
        let got = self
            .cache
            .get_batch(&self.ns, &[k])
            .map_err(|e| format!("get_batch: {e}"))?;
        if !tiers.is_empty() || got.iter().any(Option::is_some) {
            return Err(format!(
                "a block corrupted in T0 is still served (lookup {tiers:?})"
            ));
        }
        Ok("a block corrupted in T0 was caught by the check on its way out and dropped".into())
    }

    fn in_hbm(&self) -> Result<Vec<usize>, String> {
        let hbm = self.cache.hbm().first().ok_or("no HBM tier")?;
        let mut v = Vec::new();
        for &i in self.expected.keys() {
            if Tier::contains(hbm, &self.ns, &key(i)?) {
                v.push(i);
            }
        }
        v.sort_unstable();
        Ok(v)
    }
}

/// One thread of the concurrent phase: its own stream, buffers and keys
/// (`base..base + 6`), device and inline puts and reads, every read checked.
fn worker(
    cache: &BlockCache,
    ns: &NamespaceId,
    gpu: &Gpu,
    base: usize,
    block: usize,
    steps: usize,
) -> Result<u64, String> {
    let stream = gpu.stream().map_err(gpu_err("stream"))?;
    let mut src = gpu.alloc_pinned(block).map_err(gpu_err("pinned buffer"))?;
    let dst = gpu.alloc_pinned(block).map_err(gpu_err("pinned buffer"))?;
    let mut rng = Rng(0x5eed_0000 + base as u64);
    let mut expected: HashMap<usize, Vec<u8>> = HashMap::new();
    let mut checked = 0;
    for step in 0..steps {
        let i = base + rng.below(6);
        let k = key(i)?;
        match step % 4 {
            0 => {
                rng.fill(src.as_mut_slice());
                let from = src.device_ptr();
                let out = cache
                    .put_from_device(ns, 0, &[(k, None)], |addrs: &[u64]| {
                        // SAFETY: a reserved slot of `block` bytes; our pinned
                        // source; we wait below.
                        unsafe { stream.copy(addrs[0], from, block as u64)? };
                        stream.record()?.wait()
                    })
                    .map_err(|e| format!("put_from_device: {e}"))?;
                if out != [PutOutcome::Stored] {
                    return Err(format!("put_from_device: {out:?}"));
                }
                expected.insert(i, src.as_slice().to_vec());
            }
            1 => {
                let mut payload = vec![0u8; block];
                rng.fill(&mut payload);
                let item = PutBlock {
                    key: k,
                    parent: None,
                    payload: Bytes::from(payload.clone()),
                };
                let out = cache
                    .put_batch(ns, &[item])
                    .map_err(|e| format!("put_batch: {e}"))?;
                if out != [PutOutcome::Stored] {
                    return Err(format!("put_batch: {out:?}"));
                }
                expected.insert(i, payload);
            }
            2 => {
                let tier = cache
                    .get_to_device(ns, 0, &[k], |addrs| -> Result<_, GpuError> {
                        let Some((addr, tier)) = addrs[0] else {
                            return Ok(None);
                        };
                        // SAFETY: `addr` holds the block until we return; our
                        // pinned destination; we wait below.
                        unsafe { stream.copy(dst.device_ptr(), addr, block as u64)? };
                        stream.record()?.wait()?;
                        Ok(Some(tier))
                    })
                    .map_err(|e| format!("get_to_device: {e}"))?
                    .map_err(gpu_err("get_to_device copy"))?;
                if let Some(want) = expected.get(&i) {
                    let Some(tier) = tier else {
                        return Err(format!("get_to_device: block {i} missing"));
                    };
                    if want.as_slice() != dst.as_slice() {
                        return Err(format!(
                            "concurrent get_to_device: block {i} (from the {} tier) has wrong bytes",
                            tier.name()
                        ));
                    }
                    checked += 1;
                }
            }
            _ => {
                let got = cache
                    .get_batch(ns, &[k])
                    .map_err(|e| format!("get_batch: {e}"))?;
                if let Some(want) = expected.get(&i) {
                    match &got[0] {
                        Some((bytes, _)) if bytes[..] == want[..] => checked += 1,
                        Some((_, tier)) => {
                            return Err(format!(
                                "concurrent get_batch: block {i} (from the {} tier) has wrong bytes",
                                tier.name()
                            ));
                        }
                        None => return Err(format!("get_batch: block {i} missing")),
                    }
                }
            }
        }
    }
    Ok(checked)
}

/// The HBM round-trip-under-pressure scenario on `gpu` (see the module
/// docs). Returns a one-paragraph summary, or what went wrong.
pub fn hbm_round_trips(gpu: Gpu) -> Result<String, String> {
    let spec = NamespaceSpec::layer_major("selfcheck", 4, 2, 64, Dtype::F16, 32);
    let block: usize = 4 * 2 * 32 * 2 * 64 * 2;
    let config = CacheConfig {
        host: HostTierConfig {
            capacity_bytes: HOST_BLOCKS * block as u64,
            segment_bytes: 16 * block as u64,
        },
        hbm: Some(HbmTierConfig {
            capacity_bytes: HBM_BLOCKS * block as u64,
            segment_bytes: 4 * block as u64,
            promote_on_device_get: true,
            staging_bytes: 4 * block as u64,
            // Several groups per demotion and promotion, so their fences
            // and the pipelined hashing run here too.
            move_group_bytes: 3 * block as u64,
            ..HbmTierConfig::default()
        }),
        ..CacheConfig::default()
    };
    let backend = gpu.backend().name();
    let name = gpu.info().name.clone();
    let cache = BlockCache::with_gpus(config, vec![gpu.clone()])
        .map_err(|e| format!("opening the cache: {e}"))?;
    let (ns, _) = cache
        .register_namespace(spec)
        .map_err(|e| format!("registering the namespace: {e}"))?;
    if ns.block_bytes as usize != block {
        return Err(format!(
            "block of {} bytes, expected {block}",
            ns.block_bytes
        ));
    }
    let mut c = Check {
        ns: ns.id,
        block,
        stream: gpu.stream().map_err(gpu_err("stream"))?,
        src: gpu
            .alloc_pinned(BATCH * block)
            .map_err(gpu_err("pinned buffer"))?,
        dst: gpu
            .alloc_pinned(BATCH * block)
            .map_err(gpu_err("pinned buffer"))?,
        cache,
        expected: HashMap::new(),
        rng: Rng(0x6b76_7374_7261_7461),
        max_hbm_used: Cell::new(0),
        max_host_used: Cell::new(0),
        served: HashMap::new(),
    };
    let total = DEVICE_PUT + INLINE_PUT;

    // Fill: device puts land in T0 and push older blocks down to T1.
    for start in (0..DEVICE_PUT).step_by(BATCH) {
        let ids: Vec<usize> = (start..start + BATCH).collect();
        c.device_put(&ids)?;
        c.check_capacity("after a device put")?;
    }
    let ids: Vec<usize> = (DEVICE_PUT..total).collect();
    c.inline_put(&ids)?;
    c.check_capacity("after an inline put")?;

    // Random device reads (promotions) and inline reads.
    for round in 0..READ_ROUNDS {
        let n = 1 + c.rng.below(4);
        let ids: Vec<usize> = (0..n).map(|_| c.rng.below(total)).collect();
        if round % 5 == 4 {
            c.inline_get(&ids)?;
        } else {
            c.device_get(&ids)?;
        }
        c.check_capacity("during reads")?;
    }

    // Replacing blocks held in T0: inline puts, then device puts; no read may
    // return an older version.
    let hot = c.in_hbm()?;
    if hot.is_empty() {
        return Err("no block in the HBM tier after the reads".into());
    }
    c.inline_put(&hot)?;
    if !c.in_hbm()?.is_empty() {
        return Err("an inline put left a copy in the HBM tier".into());
    }
    c.device_get(&hot)?;
    let cold: Vec<usize> = (0..total)
        .filter(|i| !hot.contains(i))
        .take(BATCH)
        .collect();
    c.device_put(&cold)?;
    c.device_get(&cold)?;
    c.inline_get(&(0..total).collect::<Vec<_>>())?;
    c.check_capacity("after replacing")?;

    // Evict moves a T0 block to T1; delete removes it everywhere.
    let hot = c.in_hbm()?;
    let Some(&first) = hot.first() else {
        return Err("no block in the HBM tier after the device puts".into());
    };
    let k = key(first)?;
    c.cache
        .evict(&c.ns, &[k], false)
        .map_err(|e| format!("evict: {e}"))?;
    let tiers = c
        .cache
        .lookup(&c.ns, &[k])
        .map_err(|e| format!("lookup: {e}"))?;
    if tiers != [TierKind::Host] {
        return Err(format!("after evicting a T0 block, lookup says {tiers:?}"));
    }
    c.device_get(&[first])?;
    c.cache
        .delete(&c.ns, &[k])
        .map_err(|e| format!("delete: {e}"))?;
    c.expected.remove(&first);
    let got = c
        .cache
        .get_batch(&c.ns, &[k])
        .map_err(|e| format!("get_batch: {e}"))?;
    if got.iter().any(Option::is_some) {
        return Err("a deleted block was served".into());
    }

    // Concurrent phase: threads with their own streams and keys; fences of
    // one thread's demotions are still pending while others read and write.
    let mut concurrent_reads = 0;
    std::thread::scope(|scope| -> Result<(), String> {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (cache, ns, gpu) = (&c.cache, &c.ns, &gpu);
                scope.spawn(move || worker(cache, ns, gpu, 1000 + t * 10, block, STEPS))
            })
            .collect();
        while handles.iter().any(|h| !h.is_finished()) {
            c.check_capacity("during the concurrent phase")?;
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        for h in handles {
            concurrent_reads += h
                .join()
                .map_err(|_| "a concurrent worker panicked".to_string())??;
        }
        Ok(())
    })?;

    let stats = c.check_capacity("at the end")?;
    let h = stats.hbm.first().ok_or("no HBM stats")?;
    if h.demoted == 0 {
        return Err("no demotion T0→T1 happened".into());
    }
    if h.promoted == 0 {
        return Err("no promotion T1→T0 happened".into());
    }
    if h.checksum_failures > 0 {
        return Err(format!("{} checksum failures", h.checksum_failures));
    }
    let (demoted, promoted, skipped) = (h.demoted, h.promoted, h.demote_skipped);
    let corrupt = c.corrupt_then_evict(total + 1)?;
    let mut summary = String::new();
    let _ = write!(
        summary,
        "{backend} device {name}: {total} blocks of {} KiB through an HBM tier of {HBM_BLOCKS} blocks \
         and a host tier of {HOST_BLOCKS} (pinned: {}); {} demoted, {} promoted, {} skipped; \
         device reads served from hbm {} / host {} times; {} reads checked by {THREADS} concurrent \
         threads; max used hbm {} of {} bytes, host {} of {}",
        block / 1024,
        stats.host_pinned,
        demoted,
        promoted,
        skipped,
        c.served.get(&TierKind::Hbm).copied().unwrap_or(0),
        c.served.get(&TierKind::Host).copied().unwrap_or(0),
        concurrent_reads,
        c.max_hbm_used.get(),
        HBM_BLOCKS * block as u64,
        c.max_host_used.get(),
        HOST_BLOCKS * block as u64,
    );
    summary.push_str("; ");
    summary.push_str(&corrupt);
    Ok(summary)
}
