//! CPU references of every kernel, on byte slices. CI tests them against
//! naive element loops; the GPU checks compare each kernel with them on fresh
//! random data. The CPU backend ([`crate::Gpu::cpu`]) runs them on raw
//! addresses through [`copy_raw`].

use crate::layout::{GeometryError, PagedGeometry};

/// One run of a batched copy: `len` bytes from `src` to `dst` (offsets into
/// the slices of [`batched_copy`], addresses for the device paths).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct CopyOp {
    pub src: u64,
    pub dst: u64,
    pub len: u64,
}

/// Why a copy table was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyTableError {
    /// Entry `index` reads or writes past the end of its buffer.
    #[error("copy table entry {index} is out of bounds")]
    OutOfBounds { index: usize },
}

fn in_bounds(offset: u64, len: u64, size: usize) -> bool {
    offset
        .checked_add(len)
        .is_some_and(|end| end <= size as u64)
}

/// CPU reference of the batched block copy: checks every entry first, then
/// copies in table order; on error nothing is written.
pub fn batched_copy(src: &[u8], dst: &mut [u8], table: &[CopyOp]) -> Result<(), CopyTableError> {
    for (index, c) in table.iter().enumerate() {
        if !in_bounds(c.src, c.len, src.len()) || !in_bounds(c.dst, c.len, dst.len()) {
            return Err(CopyTableError::OutOfBounds { index });
        }
    }
    for c in table {
        let (s, d, n) = (c.src as usize, c.dst as usize, c.len as usize);
        dst[d..d + n].copy_from_slice(&src[s..s + n]);
    }
    Ok(())
}

/// `ops` with every run that continues the one before it on both sides
/// (its source and its destination start where the previous run's end)
/// merged into that run, in order. Copying the result copies the same bytes
/// to the same places; blocks that lie side by side in both memories then
/// move as one long run (a single DMA above the threshold).
pub fn coalesce(ops: &[CopyOp]) -> Vec<CopyOp> {
    let mut out: Vec<CopyOp> = Vec::with_capacity(ops.len());
    for op in ops.iter().filter(|op| op.len > 0) {
        match out.last_mut() {
            Some(last)
                if last.src.checked_add(last.len) == Some(op.src)
                    && last.dst.checked_add(last.len) == Some(op.dst) =>
            {
                last.len += op.len;
            }
            _ => out.push(*op),
        }
    }
    out
}

fn check_blocks(
    geometry: &PagedGeometry,
    pages_per_block: u32,
    page_ids: &[u32],
    region: usize,
    blocks: usize,
) -> Result<usize, GeometryError> {
    geometry.validate()?;
    let n = geometry.check_pages("page_ids", pages_per_block, page_ids)?;
    if (region as u64) < geometry.region_bytes() {
        return Err(GeometryError::new(
            "region",
            format!(
                "{region} bytes, but the geometry needs {}",
                geometry.region_bytes()
            ),
        ));
    }
    let want = n as u64 * geometry.block_bytes(pages_per_block);
    if blocks as u64 != want {
        return Err(GeometryError::new(
            "blocks",
            format!("{blocks} bytes, but {n} blocks need {want}"),
        ));
    }
    Ok(n)
}

/// CPU reference of the gather kernel: the blocks named by `page_ids`
/// (`pages_per_block` pages each) from the engine's `region` into `blocks`,
/// one layer-major block after the other.
pub fn gather(
    geometry: &PagedGeometry,
    pages_per_block: u32,
    page_ids: &[u32],
    region: &[u8],
    blocks: &mut [u8],
) -> Result<(), GeometryError> {
    check_blocks(
        geometry,
        pages_per_block,
        page_ids,
        region.len(),
        blocks.len(),
    )?;
    for (e, b) in chunk_ranges(geometry, pages_per_block, page_ids) {
        blocks[b].copy_from_slice(&region[e]);
    }
    Ok(())
}

/// CPU reference of the scatter kernel: the inverse of [`gather`]. A page
/// named twice receives the later block's bytes.
pub fn scatter(
    geometry: &PagedGeometry,
    pages_per_block: u32,
    page_ids: &[u32],
    blocks: &[u8],
    region: &mut [u8],
) -> Result<(), GeometryError> {
    check_blocks(
        geometry,
        pages_per_block,
        page_ids,
        region.len(),
        blocks.len(),
    )?;
    for (e, b) in chunk_ranges(geometry, pages_per_block, page_ids) {
        region[e].copy_from_slice(&blocks[b]);
    }
    Ok(())
}

/// The (region range, blocks range) of every chunk of a gather or scatter,
/// the blocks laid out one after the other.
fn chunk_ranges<'a>(
    geometry: &'a PagedGeometry,
    pages_per_block: u32,
    page_ids: &'a [u32],
) -> impl Iterator<Item = (std::ops::Range<usize>, std::ops::Range<usize>)> + 'a {
    let block_bytes = geometry.block_bytes(pages_per_block) as usize;
    geometry
        .chunk_plan(pages_per_block, page_ids)
        .map(move |c| {
            let e = c.engine_offset as usize;
            let b = c.block * block_bytes + c.block_offset as usize;
            let n = c.len as usize;
            (e..e + n, b..b + n)
        })
}

/// Copies between raw addresses, as the CPU backend does for every device
/// operation.
///
/// # Safety
/// `src..src+len` must be readable and `dst..dst+len` writable for the whole
/// call, and the two ranges must not overlap.
pub unsafe fn copy_raw(src: u64, dst: u64, len: u64) {
    // SAFETY: the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len as usize) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::PageLayout;
    use rand::{Rng, SeedableRng};

    fn random_bytes(rng: &mut impl Rng, n: usize) -> Vec<u8> {
        (0..n).map(|_| rng.random()).collect()
    }

    #[test]
    fn batched_copy_matches_a_naive_loop_on_random_tables() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..50 {
            let src = random_bytes(&mut rng, 4099);
            let mut dst = vec![0xA5u8; 5003];
            let mut want = dst.clone();
            let table: Vec<CopyOp> = (0..rng.random_range(1..9))
                .map(|_| {
                    let len = rng.random_range(1..700);
                    CopyOp {
                        src: rng.random_range(0..src.len() - len) as u64,
                        dst: rng.random_range(0..dst.len() - len) as u64,
                        len: len as u64,
                    }
                })
                .collect();
            for c in &table {
                for i in 0..c.len as usize {
                    want[c.dst as usize + i] = src[c.src as usize + i];
                }
            }
            batched_copy(&src, &mut dst, &table).unwrap();
            assert_eq!(dst, want);
        }
    }

    #[test]
    fn coalesce_merges_runs_adjacent_on_both_sides_only() {
        let op = |src, dst, len| CopyOp { src, dst, len };
        let ops = [
            op(0, 1000, 10),
            op(10, 1010, 5),  // continues both sides: merged
            op(15, 2000, 5),  // source continues, destination does not
            op(20, 2005, 0),  // empty: dropped
            op(20, 2005, 7),  // continues the previous
            op(100, 2012, 3), // destination continues, source does not
            op(50, 500, 4),
        ];
        assert_eq!(
            coalesce(&ops),
            vec![
                op(0, 1000, 15),
                op(15, 2000, 12),
                op(100, 2012, 3),
                op(50, 500, 4)
            ]
        );
        // Same bytes to the same places as the runs one by one.
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let src = random_bytes(&mut rng, 4096);
        let mut table = Vec::new();
        let (mut s, mut d) = (0u64, 0u64);
        while s < 4000 {
            let len = rng.random_range(0..64u64);
            table.push(op(s, d, len));
            s += len + u64::from(rng.random_bool(0.3));
            d += len + u64::from(rng.random_bool(0.3));
        }
        let (mut a, mut b) = (vec![9u8; 8192], vec![9u8; 8192]);
        batched_copy(&src, &mut a, &table).unwrap();
        let merged = coalesce(&table);
        assert!(merged.len() < table.len());
        batched_copy(&src, &mut b, &merged).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn batched_copy_out_of_bounds_writes_nothing() {
        let src = vec![1u8; 16];
        let mut dst = vec![0u8; 16];
        let table = [
            CopyOp {
                src: 0,
                dst: 0,
                len: 8,
            },
            CopyOp {
                src: 10,
                dst: 0,
                len: 8,
            },
        ];
        assert_eq!(
            batched_copy(&src, &mut dst, &table),
            Err(CopyTableError::OutOfBounds { index: 1 })
        );
        assert_eq!(dst, vec![0u8; 16]);
        let table = [CopyOp {
            src: u64::MAX,
            dst: 0,
            len: 2,
        }];
        assert!(batched_copy(&src, &mut dst, &table).is_err());
    }

    /// Element (layer, kv, token, head, dim-byte) of the engine region, by
    /// the layout's definition, written out loop by loop.
    fn naive_engine_index(
        g: &PagedGeometry,
        l: usize,
        kv: usize,
        page: usize,
        t: usize,
        e: usize,
    ) -> usize {
        let row = g.row_bytes() as usize;
        let (pt, layers, np) = (
            g.page_tokens as usize,
            g.layers as usize,
            g.num_pages as usize,
        );
        let chunk = pt * row;
        match g.layout {
            // [layer] -> [num_pages, 2, page_tokens, heads*dim*dtype] by
            // default; with strides, chunk (kv, page) of layer l at
            // l * layer_stride + page * page_stride + kv * kv_stride.
            PageLayout::PerLayer => {
                let page_stride = match g.page_stride {
                    0 => 2 * chunk,
                    s => s as usize,
                };
                let kv_stride = match g.kv_stride {
                    0 => chunk,
                    s => s as usize,
                };
                let layer_stride = match g.layer_stride {
                    0 => (np - 1) * page_stride + kv_stride + chunk,
                    s => s as usize,
                };
                l * layer_stride + page * page_stride + kv * kv_stride + t * row + e
            }
            // [num_pages, layers, 2, page_tokens, heads*dim*dtype]
            PageLayout::CrossLayer => (((page * layers + l) * 2 + kv) * pt + t) * row + e,
        }
    }

    /// Element (layer, kv, token-of-block, byte-of-row) of block b.
    fn naive_block_index(
        g: &PagedGeometry,
        ppb: usize,
        b: usize,
        l: usize,
        kv: usize,
        tok: usize,
        e: usize,
    ) -> usize {
        let row = g.row_bytes() as usize;
        let block_tokens = ppb * g.page_tokens as usize;
        let block_bytes = g.layers as usize * 2 * block_tokens * row;
        b * block_bytes + ((l * 2 + kv) * block_tokens + tok) * row + e
    }

    /// A random geometry of `layout`; per-layer ones in one of four stride
    /// variants: packed, padded layers, K of every page then V of every page
    /// (vLLM's `(2, num_pages, …)` tensors, padded or not), padded pages.
    fn random_geometry(rng: &mut impl Rng, layout: PageLayout) -> PagedGeometry {
        let mut g = PagedGeometry::packed(
            layout,
            rng.random_range(1..5),
            rng.random_range(1..6),
            rng.random_range(1..4),
            rng.random_range(1..9),
            [1, 2, 4][rng.random_range(0..3)],
            rng.random_range(1..13),
        );
        if layout == PageLayout::CrossLayer {
            return g;
        }
        let chunk = g.chunk_bytes();
        fn pad(rng: &mut impl Rng) -> u64 {
            rng.random_range(0..40u64)
        }
        match rng.random_range(0..4) {
            0 => {}
            1 => g.layer_stride = g.num_pages as u64 * g.page_stride() + 1 + pad(rng),
            2 => {
                g.page_stride = chunk + pad(rng);
                g.kv_stride = g.num_pages as u64 * g.page_stride + pad(rng);
                if rng.random_bool(0.5) {
                    g.layer_stride = g.kv_stride * 2 + pad(rng);
                }
            }
            _ => {
                g.kv_stride = chunk + pad(rng);
                g.page_stride = g.kv_stride + chunk + pad(rng);
            }
        }
        g
    }

    #[test]
    fn gather_and_scatter_match_naive_loops_on_odd_sizes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for round in 0..400 {
            let layout = if round % 2 == 0 {
                PageLayout::PerLayer
            } else {
                PageLayout::CrossLayer
            };
            let g = random_geometry(&mut rng, layout);
            g.validate().unwrap();
            let ppb = rng.random_range(1..4u32);
            let n_blocks = rng.random_range(1..4usize);
            // Distinct pages for the scatter check (a page named twice keeps the later block).
            let mut pool: Vec<u32> = (0..g.num_pages).collect();
            let want_pages = n_blocks * ppb as usize;
            if want_pages > pool.len() {
                continue;
            }
            let page_ids: Vec<u32> = (0..want_pages)
                .map(|_| pool.swap_remove(rng.random_range(0..pool.len())))
                .collect();
            let region = random_bytes(&mut rng, g.region_bytes() as usize);
            let block_bytes = g.block_bytes(ppb) as usize;
            let mut blocks = vec![0x5Au8; n_blocks * block_bytes];
            gather(&g, ppb, &page_ids, &region, &mut blocks).unwrap();

            let row = g.row_bytes() as usize;
            let pt = g.page_tokens as usize;
            let mut want = vec![0x5Au8; blocks.len()];
            for b in 0..n_blocks {
                for l in 0..g.layers as usize {
                    for kv in 0..2 {
                        for tok in 0..ppb as usize * pt {
                            let page = page_ids[b * ppb as usize + tok / pt] as usize;
                            for e in 0..row {
                                want[naive_block_index(&g, ppb as usize, b, l, kv, tok, e)] =
                                    region[naive_engine_index(&g, l, kv, page, tok % pt, e)];
                            }
                        }
                    }
                }
            }
            assert_eq!(blocks, want, "gather, round {round}, {g:?}, ppb {ppb}");

            // Scatter fresh random blocks into a copy of the region: the named
            // pages take the blocks' bytes, every other byte stays.
            let new_blocks = random_bytes(&mut rng, blocks.len());
            let mut out = region.clone();
            scatter(&g, ppb, &page_ids, &new_blocks, &mut out).unwrap();
            let mut want = region.clone();
            for b in 0..n_blocks {
                for l in 0..g.layers as usize {
                    for kv in 0..2 {
                        for tok in 0..ppb as usize * pt {
                            let page = page_ids[b * ppb as usize + tok / pt] as usize;
                            for e in 0..row {
                                want[naive_engine_index(&g, l, kv, page, tok % pt, e)] = new_blocks
                                    [naive_block_index(&g, ppb as usize, b, l, kv, tok, e)];
                            }
                        }
                    }
                }
            }
            assert_eq!(out, want, "scatter, round {round}, {g:?}, ppb {ppb}");
        }
    }

    #[test]
    fn gather_refuses_bad_requests_and_writes_nothing() {
        let g = PagedGeometry::packed(PageLayout::PerLayer, 2, 2, 1, 4, 2, 4);
        let region = vec![7u8; g.region_bytes() as usize];
        let mut blocks = vec![0u8; g.block_bytes(1) as usize];
        assert_eq!(
            gather(&g, 1, &[4], &region, &mut blocks).unwrap_err().field,
            "page_ids[0]"
        );
        assert_eq!(
            gather(&g, 1, &[0, 1], &region, &mut blocks)
                .unwrap_err()
                .field,
            "blocks"
        );
        assert_eq!(
            gather(&g, 1, &[0], &region[..10], &mut blocks)
                .unwrap_err()
                .field,
            "region"
        );
        assert!(blocks.iter().all(|b| *b == 0));
    }
}
