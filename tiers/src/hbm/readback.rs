//! Device-side reads of blocks for their checksums: copies back through
//! pinned staging buffers ([`HbmTier::read_back`]) or the device's own
//! `kvs_xxh3` ([`HbmTier::hash_on_device`]).

use kvstrata_kernels::{CopyOp, GpuError, HashRun};

use super::HbmTier;

impl HbmTier {
    /// Reads device-reachable blocks of `len` bytes each (slots of this tier
    /// or any address the device reaches) back to the host through a pinned
    /// buffer lent by [`kvstrata_kernels::Gpu::staging`], `staging_bytes` at a time, and hands each batch to `f`: the
    /// position in `addrs` of its first block, and the blocks' bytes.
    pub fn read_back(
        &self,
        addrs: &[u64],
        len: usize,
        mut f: impl FnMut(usize, &[&[u8]]),
    ) -> Result<(), GpuError> {
        if addrs.is_empty() || len == 0 {
            return Ok(());
        }
        let inner = &self.inner;
        let per_batch = (inner.config.staging_bytes as usize / len)
            .max(1)
            .min(addrs.len());
        let buf = inner.gpu.staging(per_batch * len)?;
        let stream = &inner.read_stream;
        for (b, chunk) in addrs.chunks(per_batch).enumerate() {
            let ops: Vec<CopyOp> = chunk
                .iter()
                .enumerate()
                .map(|(i, &src)| CopyOp {
                    src,
                    dst: buf.device_ptr() + (i * len) as u64,
                    len: len as u64,
                })
                .collect();
            // SAFETY: the staging buffer is lent to this call alone, large
            // enough for the chunk; the sources are the caller's readable
            // blocks.
            let copied = unsafe { stream.copy_blocks(&ops, inner.config.dma_threshold) }
                .and_then(|()| stream.record())
                .and_then(|f| f.wait());
            if let Err(e) = copied {
                // Nothing may still write the buffer when it goes back.
                let _ = stream.synchronize();
                return Err(e);
            }
            let blocks: Vec<&[u8]> = buf.as_slice().chunks_exact(len).take(chunk.len()).collect();
            f(b * per_batch, &blocks);
        }
        Ok(())
    }

    /// xxh3-64 of device-reachable blocks of `len` bytes each, computed on
    /// the device (`kvs_xxh3` on the hash stream) without copying them out:
    /// the checksums of blocks an engine's kernel wrote into reserved slots.
    pub fn hash_on_device(&self, addrs: &[u64], len: usize) -> Result<Vec<u64>, GpuError> {
        if addrs.is_empty() {
            return Ok(Vec::new());
        }
        let inner = &*self.inner;
        let runs: Vec<HashRun> = addrs
            .iter()
            .map(|&addr| HashRun {
                addr,
                len: len as u64,
            })
            .collect();
        let buf = inner.gpu.staging(8 * runs.len())?;
        let hs = &inner.hash_stream;
        // SAFETY: the blocks are the caller's readable, unchanging memory
        // until this returns; the buffer is ours until the wait completes.
        let hashed = unsafe { hs.xxh3(&runs, buf.device_ptr()) }
            .and_then(|()| hs.record())
            .and_then(|f| f.wait());
        if let Err(e) = hashed {
            // Nothing may still write the buffer when it is reused.
            let _ = hs.synchronize();
            drop(buf);
            return Err(e);
        }
        let sums = buf
            .as_slice()
            .chunks_exact(8)
            .take(runs.len())
            .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect();
        Ok(sums)
    }
}
