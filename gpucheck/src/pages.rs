//! The KV-region round trip: put blocks by page ids, get blocks into pages,
//! every byte compared with the kernels' CPU references
//! ([`check_pages_round_trip`]). The two-process CUDA IPC check ([`crate::ipc`])
//! runs it from an engine process holding a real CUDA buffer
//! ([`DeviceBytes`]); the daemon's region tests run it on memfd regions
//! (the region's own mapping, [`RegionBytes`] of a [`KvRegion`]).

use std::time::{Duration, Instant};

use bytes::Bytes;
use kvstrata_client::{Client, KvRegion, PagesPutItem, PutItem};
use kvstrata_kernels::{DeviceBuffer, Gpu, reference};
use kvstrata_proto::v1 as proto;
use kvstrata_types::{Dtype, NamespaceSpec};

use crate::error::GpuCheckError;
use crate::kernels::first_difference;

/// Reads and writes a whole region's bytes, for [`check_pages_round_trip`]:
/// a memfd [`KvRegion`] does it through its mapping; an engine holding a
/// CUDA buffer implements it with device copies.
pub trait RegionBytes {
    fn read_all(&mut self) -> Result<Vec<u8>, String>;
    fn write_all(&mut self, bytes: &[u8]) -> Result<(), String>;
    /// Waits for the daemon's copies before the latest record of its CUDA
    /// IPC event `handle` (a get answered when queued). Memory without a
    /// device has no such event.
    fn wait_ready(&mut self, _handle: &[u8; 64]) -> Result<(), String> {
        Err("the daemon named a CUDA IPC event for memory that is not on a CUDA device".into())
    }
}

impl RegionBytes for KvRegion {
    fn read_all(&mut self) -> Result<Vec<u8>, String> {
        self.as_slice()
            .map(<[u8]>::to_vec)
            .ok_or_else(|| "a CUDA IPC region's bytes live on the device".to_string())
    }

    fn write_all(&mut self, bytes: &[u8]) -> Result<(), String> {
        let dst = self
            .as_mut_slice()
            .ok_or_else(|| "a CUDA IPC region's bytes live on the device".to_string())?;
        if dst.len() != bytes.len() {
            return Err(format!(
                "{} bytes for a region of {}",
                bytes.len(),
                dst.len()
            ));
        }
        dst.copy_from_slice(bytes);
        Ok(())
    }
}

/// [`RegionBytes`] of device memory (an engine's `cuMemAlloc` buffer), copied
/// through pinned host memory on the buffer's device. On the CPU backend the
/// "device" memory is host memory and the same code runs.
pub struct DeviceBytes<'a> {
    gpu: &'a Gpu,
    buffer: &'a DeviceBuffer,
}

impl<'a> DeviceBytes<'a> {
    pub fn new(gpu: &'a Gpu, buffer: &'a DeviceBuffer) -> Self {
        DeviceBytes { gpu, buffer }
    }
}

impl RegionBytes for DeviceBytes<'_> {
    fn read_all(&mut self) -> Result<Vec<u8>, String> {
        let len = self.buffer.len();
        let pinned = self.gpu.alloc_pinned(len).map_err(|e| e.to_string())?;
        let stream = self.gpu.stream().map_err(|e| e.to_string())?;
        // SAFETY: both ranges are `len` bytes of live allocations that nothing
        // else writes until the stream is synchronised below (the daemon only
        // touches the buffer during requests, and none is in flight).
        unsafe { stream.copy(pinned.device_ptr(), self.buffer.ptr(), len as u64) }
            .map_err(|e| e.to_string())?;
        stream.synchronize().map_err(|e| e.to_string())?;
        Ok(pinned.as_slice().to_vec())
    }

    fn write_all(&mut self, bytes: &[u8]) -> Result<(), String> {
        let len = self.buffer.len();
        if bytes.len() != len {
            return Err(format!("{} bytes for a buffer of {len}", bytes.len()));
        }
        let mut pinned = self.gpu.alloc_pinned(len).map_err(|e| e.to_string())?;
        pinned.as_mut_slice().copy_from_slice(bytes);
        let stream = self.gpu.stream().map_err(|e| e.to_string())?;
        // SAFETY: as in `read_all`, the other way round.
        unsafe { stream.copy(self.buffer.ptr(), pinned.device_ptr(), len as u64) }
            .map_err(|e| e.to_string())?;
        stream.synchronize().map_err(|e| e.to_string())
    }

    fn wait_ready(&mut self, handle: &[u8; 64]) -> Result<(), String> {
        let event = self
            .gpu
            .open_ipc_event(handle)
            .map_err(|e| format!("opening the daemon's event: {e}"))?;
        event
            .wait()
            .map_err(|e| format!("waiting on the daemon's event: {e}"))
    }
}

/// What [`check_pages_round_trip`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct PagesCheckReport {
    pub region_id: u64,
    pub pages_per_block: u32,
    pub block_bytes: u64,
    /// Blocks put by pages (and as many got into other pages).
    pub blocks: usize,
    /// Wall time of the BatchPut by pages and of the BatchGet into pages.
    pub put: Duration,
    pub get: Duration,
    /// Of the blocks put by pages, how many the inline read-back found in
    /// the HBM tier (the direct path gathers into HBM when the daemon has one).
    pub read_back_from_hbm: usize,
    /// Whether the get answered when queued named an event to wait on (the
    /// daemon answered before its copies completed, on a GPU).
    pub waited_on_event: bool,
}

/// Random bytes, never zero (xorshift; deterministic per seed).
pub fn nonzero_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        v.extend(state.to_le_bytes().map(|b| if b == 0 { 0xA5 } else { b }));
    }
    v.truncate(len);
    v
}

fn dtype_of(bytes: u32) -> Option<Dtype> {
    match bytes {
        1 => Some(Dtype::Int8),
        2 => Some(Dtype::F16),
        4 => Some(Dtype::F32),
        _ => None,
    }
}

/// Round trip through a registered region, checked byte for byte against the
/// CPU references (`kvstrata_kernels::reference::{gather, scatter}`):
///
/// 1. fills the region with fresh random bytes (never zeros) through `memory`;
/// 2. registers a fresh layer-major namespace matching the region's geometry
///    (`pages_per_block` pages per block);
/// 3. stores `blocks` blocks by page ids (distinct random pages), reads them
///    back inline and compares them with `reference::gather`;
/// 4. stores `blocks` random blocks inline, gets them into other pages, reads
///    the whole region and compares it with `reference::scatter` applied to
///    the bytes before (so untouched pages must be unchanged);
/// 5. gets the same blocks into the put's pages as one page-id array that
///    the daemon may answer once its copies are queued
///    (`Client::get_page_ids_when_queued`), waits on the event the answer
///    names, if any, and compares the whole region again;
/// 6. deletes the blocks.
///
/// `memory` reads and writes the region's bytes; `None` uses the region's own
/// mapping (memfd regions). An engine process holding a CUDA buffer passes its
/// own [`RegionBytes`] (device-to-host and host-to-device copies).
pub async fn check_pages_round_trip(
    client: &Client,
    region: &mut KvRegion,
    memory: Option<&mut dyn RegionBytes>,
    pages_per_block: u32,
    blocks: usize,
    seed: u64,
) -> Result<PagesCheckReport, GpuCheckError> {
    let g = *region.geometry();
    let region_id = region.id();
    let region_name = region.name().to_string();
    let region_len = region.len();
    let invalid = |reason: String| GpuCheckError::InvalidRegion {
        name: region_name.clone(),
        reason,
    };
    let pages_of = |ids: &[u32]| proto::KvPages {
        region_id,
        page_ids: ids.to_vec(),
    };
    let memory: &mut dyn RegionBytes = match memory {
        Some(m) => m,
        None => region,
    };
    let check = GpuCheckError::RoundTrip;
    let dtype = dtype_of(g.dtype_bytes)
        .ok_or_else(|| invalid(format!("dtype_bytes {} has no dtype", g.dtype_bytes)))?;
    let ppb = pages_per_block.max(1);
    let blocks = blocks.min(g.num_pages as usize / (2 * ppb as usize));
    if blocks == 0 {
        return Err(invalid(format!(
            "{} pages are too few for two blocks of {ppb} pages",
            g.num_pages
        )));
    }
    let region_len = usize::try_from(region_len).map_err(|_| invalid("too large".into()))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut spec = NamespaceSpec::layer_major(
        format!("kvstrata-region-check-{region_id}"),
        g.layers,
        g.kv_heads,
        g.head_dim,
        dtype,
        ppb * g.page_tokens,
    );
    spec.model_fingerprint = [seed.to_le_bytes(), nanos.to_le_bytes()].concat();
    let ns = client.register_namespace(&spec).await?;
    let block_bytes = g.block_bytes(ppb);
    if ns.block_bytes != block_bytes {
        return Err(check(format!(
            "the namespace's blocks are {} bytes, the region's {ppb} pages {block_bytes}",
            ns.block_bytes
        )));
    }
    // Distinct random pages: the first half for the put, the second for the get.
    let mut order: Vec<u32> = (0..g.num_pages).collect();
    let mut rng = nonzero_bytes(seed ^ 0x5EED, order.len() * 8);
    for i in (1..order.len()).rev() {
        let r = u64::from_le_bytes(rng[i * 8..i * 8 + 8].try_into().unwrap_or([1; 8]));
        order.swap(i, (r % (i as u64 + 1)) as usize);
    }
    rng.clear();
    let n_pages = blocks * ppb as usize;
    let put_pages = &order[..n_pages];
    let get_pages = &order[n_pages..2 * n_pages];

    // 1. Fresh random region.
    let before = nonzero_bytes(seed, region_len);
    memory.write_all(&before).map_err(check)?;

    // 3. Put by pages, read back inline, compare with the reference gather.
    let key = |what: &str, i: usize| Bytes::from(format!("region-check-{what}-{i}"));
    let items: Vec<PagesPutItem> = (0..blocks)
        .map(|i| {
            PagesPutItem::new(
                key("put", i),
                pages_of(&put_pages[i * ppb as usize..(i + 1) * ppb as usize]),
            )
        })
        .collect();
    let t0 = Instant::now();
    let put = client.put_pages(&ns.id, items).await?;
    let put_time = t0.elapsed();
    if put.stored as usize != blocks {
        return Err(check(format!(
            "put by pages stored {} of {blocks} blocks: {:?}",
            put.stored, put.results
        )));
    }
    let mut want = vec![0u8; blocks * block_bytes as usize];
    reference::gather(&g, ppb, put_pages, &before, &mut want)
        .map_err(|e| check(format!("reference gather: {e}")))?;
    let put_keys: Vec<Bytes> = (0..blocks).map(|i| key("put", i)).collect();
    let got = client.batch_get(&ns.id, &put_keys).await?;
    let read_back_from_hbm = got
        .iter()
        .filter(|r| r.found && r.tier == proto::Tier::Hbm as i32)
        .count();
    for (i, r) in got.iter().enumerate() {
        let w = &want[i * block_bytes as usize..(i + 1) * block_bytes as usize];
        if !r.found {
            return Err(check(format!("block {i} put by pages is not found")));
        }
        if let Some(at) = first_difference(&r.payload, w) {
            return Err(check(format!(
                "block {i} gathered from pages {:?} differs from the reference at byte {at}",
                &put_pages[i * ppb as usize..(i + 1) * ppb as usize]
            )));
        }
    }

    // 4. Random blocks inline, get into other pages, compare with the reference scatter.
    let new_blocks = nonzero_bytes(seed.wrapping_add(1), blocks * block_bytes as usize);
    let get_keys: Vec<Bytes> = (0..blocks).map(|i| key("get", i)).collect();
    let inline: Vec<PutItem> = (0..blocks)
        .map(|i| {
            PutItem::new(
                get_keys[i].clone(),
                Bytes::copy_from_slice(
                    &new_blocks[i * block_bytes as usize..(i + 1) * block_bytes as usize],
                ),
            )
        })
        .collect();
    let stored = client.batch_put(&ns.id, inline).await?;
    if stored.stored as usize != blocks {
        return Err(check(format!(
            "inline put stored {} of {blocks}",
            stored.stored
        )));
    }
    let pages: Vec<proto::KvPages> = (0..blocks)
        .map(|i| pages_of(&get_pages[i * ppb as usize..(i + 1) * ppb as usize]))
        .collect();
    let t0 = Instant::now();
    let got = client.get_pages(&ns.id, &get_keys, &pages).await?;
    let get_time = t0.elapsed();
    if let Some((i, r)) = got
        .iter()
        .enumerate()
        .find(|(_, r)| !r.found || !r.region_error.is_empty())
    {
        return Err(check(format!(
            "get into pages: block {i} found={} region_error={:?}",
            r.found, r.region_error
        )));
    }
    let mut want = before;
    reference::scatter(&g, ppb, get_pages, &new_blocks, &mut want)
        .map_err(|e| check(format!("reference scatter: {e}")))?;
    let after = memory.read_all().map_err(check)?;
    if let Some(at) = first_difference(&after, &want) {
        return Err(check(format!(
            "the region after the get differs from the reference scatter at byte {at} \
             (page stride {}, so around page {})",
            g.page_stride(),
            at as u64 % g.effective_layer_stride().max(1) / g.page_stride().max(1)
        )));
    }

    // 5. Answered once the copies are queued: the event first, then the bytes.
    let queued = client
        .get_page_ids_when_queued(&ns.id, &get_keys, region_id, put_pages)
        .await?;
    if queued.hits() != blocks || !queued.failed.is_empty() {
        return Err(check(format!(
            "get answered when queued: {} of {blocks} blocks written, failed {:?}",
            queued.hits(),
            queued.failed
        )));
    }
    if let Some(handle) = &queued.ready_event {
        memory.wait_ready(handle).map_err(check)?;
    }
    reference::scatter(&g, ppb, put_pages, &new_blocks, &mut want)
        .map_err(|e| check(format!("reference scatter: {e}")))?;
    let after = memory.read_all().map_err(check)?;
    if let Some(at) = first_difference(&after, &want) {
        return Err(check(format!(
            "the region after the get answered when queued (event: {}) differs from the \
             reference scatter at byte {at}",
            queued.ready_event.is_some()
        )));
    }

    let mut all = put_keys;
    all.extend(get_keys);
    client.delete(&ns.id, &all).await?;
    Ok(PagesCheckReport {
        region_id,
        pages_per_block: ppb,
        block_bytes,
        blocks,
        put: put_time,
        get: get_time,
        read_back_from_hbm,
        waited_on_event: queued.ready_event.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_bytes_round_trip_on_the_cpu_backend() {
        let gpu = Gpu::cpu();
        let buffer = gpu.alloc_device(1000).unwrap();
        let mut bytes = DeviceBytes::new(&gpu, &buffer);
        let data = nonzero_bytes(3, 1000);
        assert!(data.iter().all(|b| *b != 0));
        bytes.write_all(&data).unwrap();
        assert_eq!(bytes.read_all().unwrap(), data);
        assert!(bytes.write_all(&data[..10]).is_err());
    }
}
