//! GPU benchmarks: the copy ceilings and the kernels' paths in one run, timed with
//! device events (median of `repeat` after two warm-ups), buffers filled
//! with random bytes (never zeros).
//!
//! - Ceilings: one `cuMemcpyAsync` of a large pinned buffer host→device and
//!   device→host; one large device→device copy (counted as bytes read plus
//!   bytes written).
//! - Batched block copies (16 KiB .. 1 MiB blocks, scattered slots) each way
//!   between pinned host memory and device memory, by the batched kernel (one
//!   launch) and by one DMA per block; ratio to the pinned ceiling of that
//!   direction.
//! - Gather and scatter of the default model's blocks from/to a paged layout
//!   in device memory (read plus written bytes), ratio to the device copy.
//! - `kvs_xxh3` over 720 KiB blocks in device memory, in launches of 16 MiB
//!   (23 blocks; hashes to pinned memory), as the HBM tier verifies a
//!   group; bytes read, ratio to the device copy, and microseconds per
//!   launch.

use kvstrata_kernels::{CopyOp, Gpu, GpuStream, HashRun, PageLayout, PagedGeometry};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::kernels::{Buf, random_bytes};
use crate::report::{BenchRow, human};

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Median seconds of `f` on `stream`.
fn time(
    stream: &GpuStream,
    repeat: usize,
    mut f: impl FnMut() -> Result<(), String>,
) -> Result<f64, String> {
    for _ in 0..2 {
        f()?;
    }
    stream.synchronize().map_err(err)?;
    let mut samples = Vec::with_capacity(repeat);
    for _ in 0..repeat {
        let a = stream.record_timed().map_err(err)?;
        f()?;
        let b = stream.record_timed().map_err(err)?;
        let ms = a
            .elapsed_ms(&b)
            .map_err(err)?
            .ok_or_else(|| "no device timer on this backend".to_string())?;
        samples.push(ms as f64 / 1000.0);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    Ok(samples[samples.len() / 2])
}

fn gbps(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / seconds / 1e9
}

/// The copy ceilings of a device: GB/s of one large pinned copy each way and
/// of one device-to-device copy (counted as bytes read plus bytes written).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CopyCeilings {
    pub h2d: f64,
    pub d2h: f64,
    pub d2d: f64,
}

impl CopyCeilings {
    /// The device copy's rate in bytes copied (half of read plus written).
    pub fn d2d_copied(&self) -> f64 {
        self.d2d / 2.0
    }
}

/// Measures [`CopyCeilings`] with buffers of `bytes` (median of `repeat`
/// after two warm-ups, random bytes), on their own: `kvstrata bench ttft
/// --device cuda` puts its loads against them.
pub fn copy_ceilings(gpu: &Gpu, bytes: u64, repeat: usize) -> Result<CopyCeilings, String> {
    let stream = gpu.stream().map_err(err)?;
    let len = bytes as usize;
    let mut host = Buf::alloc(gpu, true, len)?;
    let mut dev = Buf::alloc(gpu, false, len)?;
    let mut dev2 = Buf::alloc(gpu, false, len)?;
    {
        let mut seed = rand::rngs::StdRng::seed_from_u64(rand::rng().random());
        let data = random_bytes(&mut seed, len);
        host.upload(&stream, &data)?;
        dev.upload(&stream, &data)?;
        dev2.upload(&stream, &data)?;
    }
    ceilings_of(
        &stream,
        bytes,
        repeat,
        (host.addr(), dev.addr(), dev2.addr()),
    )
}

/// [`copy_ceilings`] of CUDA device `ordinal`.
pub fn cuda_copy_ceilings(
    ordinal: usize,
    bytes: u64,
    repeat: usize,
) -> Result<CopyCeilings, String> {
    let gpu = Gpu::cuda(ordinal).map_err(err)?;
    copy_ceilings(&gpu, bytes, repeat)
}

/// [`copy_ceilings`] over buffers of `bytes` at `(host, dev, dev2)` (pinned
/// host memory and two device buffers), which must outlive the call.
fn ceilings_of(
    stream: &GpuStream,
    bytes: u64,
    repeat: usize,
    (h, d, d2): (u64, u64, u64),
) -> Result<CopyCeilings, String> {
    // SAFETY (all closures below): every address range lies inside one of the
    // three buffers, which the caller keeps alive; `time` synchronizes.
    let h2d = gbps(
        bytes,
        time(stream, repeat, || {
            unsafe { stream.copy(d, h, bytes) }.map_err(err)
        })?,
    );
    let d2h = gbps(
        bytes,
        time(stream, repeat, || {
            unsafe { stream.copy(h, d, bytes) }.map_err(err)
        })?,
    );
    let d2d = gbps(
        2 * bytes,
        time(stream, repeat, || {
            unsafe { stream.copy(d2, d, bytes) }.map_err(err)
        })?,
    );
    stream.synchronize().map_err(err)?;
    Ok(CopyCeilings { h2d, d2h, d2d })
}

/// Runs every benchmark; returns the rows and the suggested DMA threshold.
pub fn run(gpu: &Gpu, bytes: u64, repeat: usize) -> Result<(Vec<BenchRow>, Option<u64>), String> {
    let stream = gpu.stream().map_err(err)?;
    let mut rng = rand::rng();
    let len = bytes as usize;
    let mut host = Buf::alloc(gpu, true, len)?;
    let mut dev = Buf::alloc(gpu, false, len)?;
    let mut dev2 = Buf::alloc(gpu, false, len)?;
    {
        let mut seed = rand::rngs::StdRng::seed_from_u64(rng.random());
        let data = random_bytes(&mut seed, len);
        host.upload(&stream, &data)?;
        dev.upload(&stream, &data)?;
        dev2.upload(&stream, &data)?;
    }
    let (h, d, d2) = (host.addr(), dev.addr(), dev2.addr());
    let mut rows = Vec::new();

    // Ceilings.
    // SAFETY (all closures below): every address range lies inside one of the
    // three buffers, which live until this function returns after a synchronize.
    let CopyCeilings { h2d, d2h, d2d } = ceilings_of(&stream, bytes, repeat, (h, d, d2))?;
    for (path, v, counted) in [
        ("ceiling: pinned H2D cuMemcpyAsync", h2d, "bytes copied"),
        ("ceiling: pinned D2H cuMemcpyAsync", d2h, "bytes copied"),
        ("ceiling: device D2D cuMemcpyAsync", d2d, "read + written"),
    ] {
        rows.push(BenchRow {
            path: path.to_string(),
            block: human(bytes),
            gb_per_s: v,
            ceiling: "-".to_string(),
            ceiling_gb_per_s: v,
            ratio: 1.0,
            counted: counted.to_string(),
        });
    }

    // Batched block copies between pinned host slots and device slots.
    let mut threshold: Option<u64> = None;
    for block in [16u64 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20] {
        let n = (bytes / block) as usize;
        let mut slots: Vec<u64> = (0..n as u64).collect();
        slots.shuffle(&mut rng);
        let mut dma_wins = true;
        for (dir, ceiling, ceiling_gb) in [("H2D", "pinned H2D", h2d), ("D2H", "pinned D2H", d2h)] {
            let ops: Vec<CopyOp> = (0..n as u64)
                .map(|i| {
                    let (hs, ds) = (h + i * block, d + slots[i as usize] * block);
                    if dir == "H2D" {
                        CopyOp {
                            src: hs,
                            dst: ds,
                            len: block,
                        }
                    } else {
                        CopyOp {
                            src: ds,
                            dst: hs,
                            len: block,
                        }
                    }
                })
                .collect();
            let moved = n as u64 * block;
            let kernel = gbps(
                moved,
                time(&stream, repeat, || {
                    unsafe { stream.batched_copy(&ops) }.map_err(err)
                })?,
            );
            let dma = gbps(
                moved,
                time(&stream, repeat, || {
                    for op in &ops {
                        unsafe { stream.copy(op.dst, op.src, op.len) }.map_err(err)?;
                    }
                    Ok(())
                })?,
            );
            let batch_dma = gbps(
                moved,
                time(&stream, repeat, || {
                    unsafe { stream.dma_copies(&ops) }.map_err(err)
                })?,
            );
            if dma.max(batch_dma) < kernel {
                dma_wins = false;
            }
            let batch_how = if stream.has_batch_dma() {
                "DMA, one cuMemcpyBatchAsync"
            } else {
                "DMA, batch call missing (per block)"
            };
            for (how, v) in [
                ("batched kernel", kernel),
                ("DMA per block", dma),
                (batch_how, batch_dma),
            ] {
                rows.push(BenchRow {
                    path: format!("block copy {dir}, {how}"),
                    block: human(block),
                    gb_per_s: v,
                    ceiling: ceiling.to_string(),
                    ceiling_gb_per_s: ceiling_gb,
                    ratio: v / ceiling_gb,
                    counted: "bytes copied".to_string(),
                });
            }
        }
        if dma_wins && threshold.is_none() {
            threshold = Some(block);
        }
    }

    // Gather / scatter of the default model's blocks, device to device.
    for (layout, page_tokens) in [
        (PageLayout::PerLayer, 16u32),
        (PageLayout::CrossLayer, 16),
        (PageLayout::PerLayer, 1),
    ] {
        let block_tokens = 32u32;
        let ppb = block_tokens / page_tokens;
        let mut g = PagedGeometry {
            layout,
            layers: 30,
            page_tokens,
            kv_heads: 3,
            head_dim: 64,
            dtype_bytes: 2,
            num_pages: 1,
            layer_stride: 0,
            page_stride: 0,
            kv_stride: 0,
        };
        let per_page = g.layers as u64 * 2 * g.chunk_bytes();
        g.num_pages = ((bytes / 2) / per_page) as u32;
        let block_bytes = g.block_bytes(ppb);
        let n_blocks = (g.num_pages / ppb) as usize;
        if n_blocks == 0 || g.region_bytes() + n_blocks as u64 * block_bytes > bytes * 2 {
            continue;
        }
        let mut pages: Vec<u32> = (0..g.num_pages).collect();
        pages.shuffle(&mut rng);
        pages.truncate(n_blocks * ppb as usize);
        // Region in `dev`, blocks in `dev2` (both random bytes).
        let blocks: Vec<u64> = (0..n_blocks as u64).map(|i| d2 + i * block_bytes).collect();
        let moved = n_blocks as u64 * block_bytes;
        let gather = gbps(
            2 * moved,
            time(&stream, repeat, || {
                unsafe { stream.gather(&g, ppb, d, &pages, &blocks) }.map_err(err)
            })?,
        );
        let scatter = gbps(
            2 * moved,
            time(&stream, repeat, || {
                unsafe { stream.scatter(&g, ppb, d, &pages, &blocks) }.map_err(err)
            })?,
        );
        for (how, v) in [("gather", gather), ("scatter", scatter)] {
            rows.push(BenchRow {
                path: format!("{how} {} page {page_tokens} tok, D2D", layout.name()),
                block: human(block_bytes),
                gb_per_s: v,
                ceiling: "device D2D".to_string(),
                ceiling_gb_per_s: d2d,
                ratio: v / d2d,
                counted: "read + written".to_string(),
            });
        }
    }

    // xxh3 of 720 KiB blocks in device memory, 16 MiB per launch.
    {
        let block = 720u64 << 10;
        let per_launch = (16u64 << 20).div_ceil(block) as usize;
        let n = (bytes / block) as usize;
        if n > 0 {
            let runs: Vec<HashRun> = (0..n as u64)
                .map(|i| HashRun {
                    addr: d + i * block,
                    len: block,
                })
                .collect();
            let out = Buf::alloc(gpu, true, 8 * n)?;
            let o = out.addr();
            let launches = n.div_ceil(per_launch);
            let seconds = time(&stream, repeat, || {
                for (k, group) in runs.chunks(per_launch).enumerate() {
                    let at = o + 8 * (k * per_launch) as u64;
                    // SAFETY: the runs lie in `dev`, the hashes in `out`,
                    // both live past the synchronize below.
                    unsafe { stream.xxh3(group, at) }.map_err(err)?;
                }
                Ok(())
            })?;
            let hashed = n as u64 * block;
            let v = gbps(hashed, seconds);
            rows.push(BenchRow {
                path: format!("xxh3 kernel, device blocks, {per_launch} per launch"),
                block: human(block),
                gb_per_s: v,
                ceiling: "device D2D".to_string(),
                ceiling_gb_per_s: d2d,
                ratio: v / d2d,
                counted: format!(
                    "bytes read; {:.1} us per launch of {} ({} launches)",
                    seconds * 1e6 / launches as f64,
                    human(per_launch as u64 * block),
                    launches
                ),
            });
            stream.synchronize().map_err(err)?;
            drop(out);
        }
    }
    stream.synchronize().map_err(err)?;
    Ok((rows, threshold))
}
