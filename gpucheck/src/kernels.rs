//! Kernel checks: each device path of `kvstrata-kernels` (batched copy, the
//! DMA path, xxh3, gather and scatter in both paged layouts) against its CPU
//! reference on fresh random data. Outputs are poisoned with random bytes
//! (never zeros) first and compared whole, so an unwritten byte or a byte
//! written out of place fails. Entry point: [`kernel_checks`].

use kvstrata_kernels::reference;
use kvstrata_kernels::xxh3::{CHUNK_BYTES, WINDOW_CHUNKS};
use kvstrata_kernels::{
    CopyOp, DeviceBuffer, Gpu, GpuStream, HashRun, PageLayout, PagedGeometry, PinnedBuffer,
};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::report::{CheckRow, check};

/// A buffer a kernel reads or writes: device memory or mapped pinned memory.
pub(crate) enum Buf {
    Device(DeviceBuffer),
    Pinned(PinnedBuffer),
}

impl Buf {
    pub(crate) fn alloc(gpu: &Gpu, pinned: bool, len: usize) -> Result<Buf, String> {
        Ok(if pinned {
            Buf::Pinned(gpu.alloc_pinned(len).map_err(|e| e.to_string())?)
        } else {
            Buf::Device(gpu.alloc_device(len).map_err(|e| e.to_string())?)
        })
    }

    pub(crate) fn addr(&self) -> u64 {
        match self {
            Buf::Device(d) => d.ptr(),
            Buf::Pinned(p) => p.device_ptr(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Buf::Device(d) => d.len(),
            Buf::Pinned(p) => p.len(),
        }
    }

    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Buf::Device(_) => "device",
            Buf::Pinned(_) => "pinned",
        }
    }

    /// Writes `bytes` at the start (synchronously).
    pub(crate) fn upload(&mut self, stream: &GpuStream, bytes: &[u8]) -> Result<(), String> {
        assert!(bytes.len() <= self.len());
        match self {
            Buf::Pinned(p) => {
                p.as_mut_slice()[..bytes.len()].copy_from_slice(bytes);
                Ok(())
            }
            Buf::Device(d) => {
                // SAFETY: `bytes` lives until the synchronize below; the
                // buffer is ours and large enough.
                unsafe { stream.copy(d.ptr(), bytes.as_ptr() as u64, bytes.len() as u64) }
                    .map_err(|e| e.to_string())?;
                stream.synchronize().map_err(|e| e.to_string())
            }
        }
    }

    /// Reads the whole buffer (after everything queued on `stream`).
    pub(crate) fn download(&self, stream: &GpuStream) -> Result<Vec<u8>, String> {
        stream.synchronize().map_err(|e| e.to_string())?;
        match self {
            Buf::Pinned(p) => Ok(p.as_slice().to_vec()),
            Buf::Device(d) => {
                let mut out = vec![0u8; d.len()];
                // SAFETY: `out` lives until the synchronize below.
                unsafe { stream.copy(out.as_mut_ptr() as u64, d.ptr(), d.len() as u64) }
                    .map_err(|e| e.to_string())?;
                stream.synchronize().map_err(|e| e.to_string())?;
                Ok(out)
            }
        }
    }
}

/// `n` random bytes.
pub fn random_bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}

fn fresh_rng() -> StdRng {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    StdRng::seed_from_u64(seed ^ 0x6b76_7374_7261_7461)
}

/// The first byte at which `a` and `b` differ, counting a length difference
/// as a difference at the shorter length.
pub(crate) fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or(if a.len() == b.len() {
            None
        } else {
            Some(a.len().min(b.len()))
        })
}

/// A random table of non-overlapping runs: lengths and offsets a mix of
/// 16-byte multiples, 4-byte multiples and odd values.
fn random_table(rng: &mut StdRng, src_len: usize, max_runs: usize) -> (Vec<CopyOp>, usize) {
    let runs = rng.random_range(1..=max_runs);
    let mut ops = Vec::with_capacity(runs);
    let mut dst_at = 0u64;
    for _ in 0..runs {
        let align = [16u64, 4, 1][rng.random_range(0..3)];
        let big = rng.random_bool(0.1);
        let max = if big { 1 << 20 } else { 96 << 10 };
        let len = (rng.random_range(1..max) / align).max(1) * align;
        let len = len.min(src_len as u64);
        let src = (rng.random_range(0..=(src_len as u64 - len)) / align) * align;
        dst_at = (dst_at + rng.random_range(0..64) * align).next_multiple_of(align);
        ops.push(CopyOp {
            src,
            dst: dst_at,
            len,
        });
        dst_at += len;
    }
    (ops, dst_at as usize + 64)
}

fn batched_round(
    gpu: &Gpu,
    stream: &GpuStream,
    rng: &mut StdRng,
    src_pinned: bool,
    dst_pinned: bool,
    dma_threshold: Option<u64>,
) -> Result<usize, String> {
    let src_len = rng.random_range(1 << 16..4 << 20);
    let (ops, dst_len) = random_table(rng, src_len, 300);
    let src_bytes = random_bytes(rng, src_len);
    let poison = random_bytes(rng, dst_len);
    let mut src = Buf::alloc(gpu, src_pinned, src_len)?;
    let mut dst = Buf::alloc(gpu, dst_pinned, dst_len)?;
    src.upload(stream, &src_bytes)?;
    dst.upload(stream, &poison)?;
    let mut want = poison.clone();
    reference::batched_copy(&src_bytes, &mut want, &ops).map_err(|e| e.to_string())?;
    let abs: Vec<CopyOp> = ops
        .iter()
        .map(|o| CopyOp {
            src: src.addr() + o.src,
            dst: dst.addr() + o.dst,
            len: o.len,
        })
        .collect();
    // SAFETY: every run lies inside its buffer, destinations do not overlap,
    // and the buffers live past the download's synchronize.
    unsafe {
        match dma_threshold {
            Some(t) => stream.copy_blocks(&abs, t),
            None => stream.batched_copy(&abs),
        }
    }
    .map_err(|e| e.to_string())?;
    let got = dst.download(stream)?;
    if let Some(i) = first_difference(&got, &want) {
        return Err(format!(
            "{} -> {}: byte {i} of {} differs from the CPU reference ({} runs)",
            src.kind(),
            dst.kind(),
            want.len(),
            ops.len()
        ));
    }
    Ok(ops.len())
}

fn random_geometry(rng: &mut StdRng, layout: PageLayout, aligned: bool) -> PagedGeometry {
    let mut g = if aligned {
        // The default model's shape: 30 layers, 3 KV heads of 64, f16.
        PagedGeometry {
            layout,
            layers: 30,
            page_tokens: [1, 16][rng.random_range(0..2)],
            kv_heads: 3,
            head_dim: 64,
            dtype_bytes: 2,
            num_pages: rng.random_range(64..256),
            layer_stride: 0,
            page_stride: 0,
            kv_stride: 0,
        }
    } else {
        PagedGeometry {
            layout,
            layers: rng.random_range(1..9),
            page_tokens: rng.random_range(1..9),
            kv_heads: rng.random_range(1..5),
            head_dim: rng.random_range(1..70),
            dtype_bytes: [1, 2, 4][rng.random_range(0..3)],
            num_pages: rng.random_range(8..64),
            layer_stride: 0,
            page_stride: 0,
            kv_stride: 0,
        }
    };
    if layout == PageLayout::PerLayer && rng.random_bool(0.3) {
        g.layer_stride = g.num_pages as u64 * g.page_stride() + rng.random_range(1..5) * 16;
    } else if layout == PageLayout::PerLayer && rng.random_bool(0.4) {
        // vLLM's (2, num_pages, page_tokens, heads, dim) tensors: K of every
        // page, then V of every page.
        g.page_stride = g.chunk_bytes();
        g.kv_stride = g.num_pages as u64 * g.chunk_bytes();
    }
    g
}

fn paged_round(
    gpu: &Gpu,
    stream: &GpuStream,
    rng: &mut StdRng,
    layout: PageLayout,
) -> Result<String, String> {
    let aligned = rng.random_bool(0.5);
    let g = random_geometry(rng, layout, aligned);
    g.validate().map_err(|e| e.to_string())?;
    let ppb = rng.random_range(1..4u32);
    let max_blocks = (g.num_pages / ppb) as usize;
    let n_blocks = rng.random_range(1..=max_blocks.clamp(1, 24));
    let mut pool: Vec<u32> = (0..g.num_pages).collect();
    let page_ids: Vec<u32> = (0..n_blocks * ppb as usize)
        .map(|_| pool.swap_remove(rng.random_range(0..pool.len())))
        .collect();
    let region_len = g.region_bytes() as usize;
    let block_len = g.block_bytes(ppb) as usize;
    let region_bytes = random_bytes(rng, region_len);
    let mut region = Buf::alloc(gpu, false, region_len)?;
    region.upload(stream, &region_bytes)?;
    // Blocks: one buffer each, device or pinned at random (HBM slots and
    // pinned host slots are both gather targets).
    let mut blocks = Vec::with_capacity(n_blocks);
    let mut poisons = Vec::with_capacity(n_blocks);
    for _ in 0..n_blocks {
        let mut b = Buf::alloc(gpu, rng.random_bool(0.5), block_len)?;
        let poison = random_bytes(rng, block_len);
        b.upload(stream, &poison)?;
        poisons.push(poison);
        blocks.push(b);
    }
    let addrs: Vec<u64> = blocks.iter().map(|b| b.addr()).collect();
    // SAFETY: region and blocks are sized by the geometry and live past the
    // synchronize in download.
    unsafe { stream.gather(&g, ppb, region.addr(), &page_ids, &addrs) }
        .map_err(|e| e.to_string())?;
    let mut want = vec![0u8; n_blocks * block_len];
    reference::gather(&g, ppb, &page_ids, &region_bytes, &mut want).map_err(|e| e.to_string())?;
    for (i, b) in blocks.iter().enumerate() {
        let got = b.download(stream)?;
        if let Some(at) = first_difference(&got, &want[i * block_len..(i + 1) * block_len]) {
            return Err(format!(
                "gather {}: block {i} ({}) byte {at} differs; {g:?}, {ppb} pages per block",
                layout.name(),
                b.kind()
            ));
        }
    }
    // Scatter fresh blocks back into the (random) region.
    let new_blocks = random_bytes(rng, n_blocks * block_len);
    for (i, b) in blocks.iter_mut().enumerate() {
        b.upload(stream, &new_blocks[i * block_len..(i + 1) * block_len])?;
    }
    // SAFETY: as above.
    unsafe { stream.scatter(&g, ppb, region.addr(), &page_ids, &addrs) }
        .map_err(|e| e.to_string())?;
    let mut want = region_bytes.clone();
    reference::scatter(&g, ppb, &page_ids, &new_blocks, &mut want).map_err(|e| e.to_string())?;
    let got = region.download(stream)?;
    if let Some(at) = first_difference(&got, &want) {
        return Err(format!(
            "scatter {}: region byte {at} of {} differs; {g:?}, {ppb} pages per block",
            layout.name(),
            want.len()
        ));
    }
    drop(poisons);
    Ok(format!("{n_blocks} blocks of {block_len} B"))
}

/// Lengths of every xxh3 length class and boundary, plus blocks of the
/// sizes the HBM tier hashes and odd lengths.
fn xxh3_lengths(rng: &mut StdRng) -> Vec<usize> {
    let mut lens: Vec<usize> = (0..=300).collect();
    lens.extend([
        1023,
        1024,
        1025,
        2047,
        2048,
        2049,
        4095,
        4096,
        4097,
        16 << 10,
        64 << 10,
    ]);
    for k in [5, 16, 17, 63, 100, 877] {
        lens.extend([64 * k - 1, 64 * k + 1]);
    }
    // Window boundaries of the kernel (56 chunks of 1 KiB).
    for w in [1usize, 2] {
        let c = WINDOW_CHUNKS * CHUNK_BYTES * w;
        lens.extend([c - 1, c, c + 1, c + 1025]);
    }
    lens.extend([720 << 10, 720 << 10, 720 << 10, (720 << 10) + 1, 2 << 20]);
    for _ in 0..40 {
        lens.push(rng.random_range(241..(1 << 20)) | 1);
    }
    lens
}

/// One launch over runs of every length class, each in device or pinned
/// memory at random (aligned and misaligned starts), `out` in pinned memory
/// poisoned first; every hash against the CPU mirror and xxhash-rust.
fn xxh3_round(gpu: &Gpu, stream: &GpuStream, rng: &mut StdRng) -> Result<String, String> {
    let lens = xxh3_lengths(rng);
    // Place the runs in two source buffers (device, pinned), 16-byte
    // aligned starts for most, odd offsets for a quarter.
    let mut places = Vec::with_capacity(lens.len()); // (pinned, offset, len)
    let mut ends = [0usize; 2];
    for &len in &lens {
        let pinned = rng.random_bool(0.5);
        let at = &mut ends[usize::from(pinned)];
        let misalign = if rng.random_bool(0.25) {
            rng.random_range(1..16)
        } else {
            0
        };
        let off = at.next_multiple_of(16) + misalign;
        places.push((pinned, off, len));
        *at = off + len;
    }
    let mut bufs = Vec::with_capacity(2);
    let mut datas = Vec::with_capacity(2);
    for (i, end) in ends.iter().enumerate() {
        let len = end + 64;
        let data = random_bytes(rng, len);
        let mut b = Buf::alloc(gpu, i == 1, len)?;
        b.upload(stream, &data)?;
        bufs.push(b);
        datas.push(data);
    }
    let runs: Vec<HashRun> = places
        .iter()
        .map(|&(pinned, off, len)| HashRun {
            addr: bufs[usize::from(pinned)].addr() + off as u64,
            len: len as u64,
        })
        .collect();
    // Output: pinned, poisoned, with a poisoned guard before and after the
    // hashes, which start 8-byte aligned or (one round in four) at an odd
    // address.
    let skip = if rng.random_bool(0.25) { 3 } else { 0 };
    let out_len = skip + 8 * runs.len() + 64;
    let poison = random_bytes(rng, out_len);
    let mut out = Buf::alloc(gpu, true, out_len)?;
    out.upload(stream, &poison)?;
    // SAFETY: every run lies inside its buffer, `out` holds 8 bytes per run,
    // and all buffers live past the download's synchronize.
    unsafe { stream.xxh3(&runs, out.addr() + skip as u64) }.map_err(|e| e.to_string())?;
    let got = out.download(stream)?;
    for (i, &(pinned, off, len)) in places.iter().enumerate() {
        let data = &datas[usize::from(pinned)][off..off + len];
        let mirror = kvstrata_kernels::xxh3::xxh3_64(data);
        let upstream = xxhash_rust::xxh3::xxh3_64(data);
        let mut h = [0u8; 8];
        h.copy_from_slice(&got[skip + 8 * i..skip + 8 * i + 8]);
        let h = u64::from_le_bytes(h);
        if mirror != upstream {
            return Err(format!(
                "CPU mirror {mirror:#x} != xxhash-rust {upstream:#x} for {len} bytes"
            ));
        }
        if h != mirror {
            return Err(format!(
                "run {i}: {len} bytes at offset {off} of {} memory (address % 16 = {}): kernel \
                 {h:#018x}, CPU reference {mirror:#018x}",
                if pinned { "pinned" } else { "device" },
                runs[i].addr % 16
            ));
        }
    }
    let end = skip + 8 * runs.len();
    if got[..skip] != poison[..skip] || got[end..] != poison[end..] {
        return Err("the kernel wrote outside its outputs".to_string());
    }
    let bytes: usize = lens.iter().sum();
    Ok(format!("{} runs, {} bytes", runs.len(), bytes))
}

/// Every kernel and the DMA path against the CPU references.
pub fn kernel_checks(gpu: &Gpu, rounds: usize, rows: &mut Vec<CheckRow>) {
    let stream = match gpu.stream() {
        Ok(s) => s,
        Err(e) => {
            check(rows, "stream created", || Err(e.to_string()));
            return;
        }
    };
    for (src_pinned, dst_pinned) in [(true, false), (false, true), (false, false)] {
        let name = format!(
            "batched copy kernel {} -> {} (random runs, odd sizes)",
            if src_pinned { "pinned" } else { "device" },
            if dst_pinned { "pinned" } else { "device" }
        );
        check(rows, name, || {
            let mut rng = fresh_rng();
            let mut runs = 0;
            for _ in 0..rounds {
                runs += batched_round(gpu, &stream, &mut rng, src_pinned, dst_pinned, None)?;
            }
            Ok(format!("{rounds} rounds, {runs} runs, bytes equal"))
        });
    }
    check(
        rows,
        "copy_blocks: DMA for long runs, kernel for short",
        || {
            let mut rng = fresh_rng();
            let mut runs = 0;
            for r in 0..rounds {
                let (s, d) = [(true, false), (false, true)][r % 2];
                runs += batched_round(gpu, &stream, &mut rng, s, d, Some(64 << 10))?;
            }
            Ok(format!("{rounds} rounds, {runs} runs, bytes equal"))
        },
    );
    check(
        rows,
        "xxh3 kernel vs CPU reference (every length class, device and pinned sources)",
        || {
            let mut rng = fresh_rng();
            let mut last = String::new();
            for _ in 0..rounds.max(1) {
                last = xxh3_round(gpu, &stream, &mut rng)?;
            }
            Ok(format!(
                "{} rounds, every hash equal to the CPU reference and xxhash-rust; last: {last}",
                rounds.max(1)
            ))
        },
    );
    for layout in [PageLayout::PerLayer, PageLayout::CrossLayer] {
        check(
            rows,
            format!("gather + scatter kernels, {} pages", layout.name()),
            || {
                let mut rng = fresh_rng();
                let mut last = String::new();
                for _ in 0..rounds {
                    last = paged_round(gpu, &stream, &mut rng, layout)?;
                }
                Ok(format!(
                    "{rounds} random geometries (odd and model-sized), bytes equal; last: {last}"
                ))
            },
        );
    }
}
