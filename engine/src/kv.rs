//! The engine's paged KV cache: one page is exactly one kvstrata block.
//!
//! A page holds the keys and values of `block_tokens` consecutive positions for every
//! layer in kvstrata's layer-major layout, `[layer][K|V][token][kv_head][head_dim]`,
//! as little-endian f16 (the model computes in f32 and rounds K/V to f16 when it stores
//! them). So a full page *is* a block payload: storing it is one copy of its bytes and
//! loading a block is one copy into a page, with no reshuffling on either side.
//!
//! The last page may be partly filled; only full pages become blocks.
//!
//! Beside the pages, [`PagedKv`] keeps the same K and V widened to f32, per layer and
//! head-major (`[kv_head][position][head_dim]`, room for a growing number of
//! positions): what attention reads. Each position is widened once, when it is written
//! or loaded, so a decode step converts only its own new row instead of the whole
//! context, and hands attention one contiguous copy per layer. The widening is exact
//! (every f16 is an f32), so attention sees exactly the f16 values of the pages. It
//! costs twice the pages' memory.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::error::{EngineError, Result};

/// The shape of the KV of one model as kvstrata stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvGeometry {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_tokens: usize,
}

impl KvGeometry {
    /// f16 values of one position of one layer's K (or V): `kv_heads * head_dim`.
    pub fn row_elems(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// f16 values in one page.
    pub fn page_elems(&self) -> usize {
        self.num_layers * 2 * self.block_tokens * self.row_elems()
    }

    /// Bytes of one block payload: `layers * 2 * tokens * heads * dim * 2`.
    pub fn block_bytes(&self) -> usize {
        self.page_elems() * 2
    }

    /// Offset (in f16 values) of position `t` of a page's K (`kv` 0) or V (`kv` 1) of `layer`.
    fn row_offset(&self, layer: usize, kv: usize, t: usize) -> usize {
        ((layer * 2 + kv) * self.block_tokens + t) * self.row_elems()
    }
}

/// KV of one sequence, in pages of one block each.
#[derive(Debug, Clone)]
pub struct PagedKv {
    geometry: KvGeometry,
    pages: Vec<Vec<f16>>,
    /// Positions whose K and V are complete in every layer.
    len: usize,
    /// The pages' K and V widened to f32, per layer (module docs).
    wide: Vec<WideLayer>,
    /// Positions each [`WideLayer`] has room for.
    wide_cap: usize,
}

/// One layer's K and V as f32, `[kv_head][position][head_dim]` with room for
/// `PagedKv::wide_cap` positions per head.
#[derive(Debug, Clone, Default)]
struct WideLayer {
    k: Vec<f32>,
    v: Vec<f32>,
}

impl PagedKv {
    /// An empty cache of `geometry` (`block_tokens` must be at least 1).
    pub fn new(geometry: KvGeometry) -> Result<Self> {
        if geometry.block_tokens == 0 || geometry.row_elems() == 0 || geometry.num_layers == 0 {
            return Err(EngineError::Kv(format!(
                "geometry {geometry:?} holds nothing"
            )));
        }
        Ok(PagedKv {
            geometry,
            pages: Vec::new(),
            len: 0,
            wide: vec![WideLayer::default(); geometry.num_layers],
            wide_cap: 0,
        })
    }

    /// The geometry this cache was made for.
    pub fn geometry(&self) -> &KvGeometry {
        &self.geometry
    }

    /// Number of positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of full pages (each one a storable block).
    pub fn full_pages(&self) -> usize {
        self.len / self.geometry.block_tokens
    }

    /// The bytes of full page `index`: exactly one block payload.
    pub fn page_bytes(&self, index: usize) -> Result<&[u8]> {
        if index >= self.full_pages() {
            return Err(EngineError::Kv(format!(
                "page {index} is not full ({} full pages)",
                self.full_pages()
            )));
        }
        Ok(bytemuck::cast_slice(&self.pages[index]))
    }

    /// Appends one loaded block as the next page. Only allowed on a page boundary.
    pub fn push_block(&mut self, payload: &[u8]) -> Result<()> {
        let g = self.geometry;
        if !self.len.is_multiple_of(g.block_tokens) || self.pages.len() != self.full_pages() {
            return Err(EngineError::Kv(format!(
                "a block can only be appended on a page boundary (holding {} positions)",
                self.len
            )));
        }
        if payload.len() != g.block_bytes() {
            return Err(EngineError::Kv(format!(
                "block is {} bytes, a page is {}",
                payload.len(),
                g.block_bytes()
            )));
        }
        let mut page = vec![f16::ZERO; g.page_elems()];
        bytemuck::cast_slice_mut::<f16, u8>(&mut page).copy_from_slice(payload);
        let first = self.len;
        self.grow_wide(first + g.block_tokens);
        let rows = g.block_tokens * g.row_elems();
        for layer in 0..g.num_layers {
            let k_at = g.row_offset(layer, 0, 0);
            let v_at = g.row_offset(layer, 1, 0);
            self.widen(
                layer,
                first,
                &page[k_at..k_at + rows],
                &page[v_at..v_at + rows],
            );
        }
        self.pages.push(page);
        self.len += g.block_tokens;
        Ok(())
    }

    /// Drops every position from `len` on (keeps whole pages' memory only while needed).
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            self.len = len;
            self.pages
                .truncate(len.div_ceil(self.geometry.block_tokens));
        }
    }

    /// Makes room for `n` more positions (a forward pass calls this first).
    pub(crate) fn reserve_tokens(&mut self, n: usize) -> Result<()> {
        let need = (self.len + n).div_ceil(self.geometry.block_tokens);
        while self.pages.len() < need {
            self.pages.push(vec![f16::ZERO; self.geometry.page_elems()]);
        }
        self.grow_wide(self.len + n);
        Ok(())
    }

    /// Gives every [`WideLayer`] room for `positions` (at least doubling, so a
    /// decode's one position per step moves the rows only now and then).
    fn grow_wide(&mut self, positions: usize) {
        if positions <= self.wide_cap {
            return;
        }
        let g = self.geometry;
        let (heads, dim) = (g.num_kv_heads, g.head_dim);
        let cap = positions.max(2 * self.wide_cap).max(g.block_tokens);
        let old = self.wide_cap;
        for layer in &mut self.wide {
            for rows in [&mut layer.k, &mut layer.v] {
                let mut grown = vec![0f32; heads * cap * dim];
                for h in 0..heads {
                    grown[h * cap * dim..(h * cap + old) * dim]
                        .copy_from_slice(&rows[h * old * dim..(h + 1) * old * dim]);
                }
                *rows = grown;
            }
        }
        self.wide_cap = cap;
    }

    /// Widens K and V rows (`[n][kv_heads][head_dim]` each) of `layer` into the
    /// positions `start..start + n` of its [`WideLayer`] (which has room for them).
    fn widen(&mut self, layer: usize, start: usize, k_rows: &[f16], v_rows: &[f16]) {
        let g = self.geometry;
        let (heads, dim, cap) = (g.num_kv_heads, g.head_dim, self.wide_cap);
        let wide = &mut self.wide[layer];
        for (src, dst) in [(k_rows, &mut wide.k), (v_rows, &mut wide.v)] {
            for (i, row) in src.chunks_exact(heads * dim).enumerate() {
                for (h, head) in row.chunks_exact(dim).enumerate() {
                    let at = (h * cap + start + i) * dim;
                    head.convert_to_f32_slice(&mut dst[at..at + dim]);
                }
            }
        }
    }

    /// Marks `n` more positions complete (after every layer wrote them).
    pub(crate) fn commit_tokens(&mut self, n: usize) -> Result<()> {
        let new_len = self.len + n;
        if new_len.div_ceil(self.geometry.block_tokens) > self.pages.len() {
            return Err(EngineError::Kv(format!(
                "committing {n} positions past the reserved pages"
            )));
        }
        self.len = new_len;
        Ok(())
    }

    /// Writes K and V rows (`[n][kv_heads][head_dim]` each) of `layer` for the positions
    /// `start..start + n`. The pages must have been reserved.
    pub(crate) fn write_layer(
        &mut self,
        layer: usize,
        start: usize,
        k_rows: &[f16],
        v_rows: &[f16],
    ) -> Result<()> {
        let g = self.geometry;
        let row = g.row_elems();
        if layer >= g.num_layers
            || k_rows.len() != v_rows.len()
            || !k_rows.len().is_multiple_of(row)
        {
            return Err(EngineError::Kv(format!(
                "layer {layer}: {} K and {} V values do not make whole rows of {row}",
                k_rows.len(),
                v_rows.len()
            )));
        }
        let n = k_rows.len() / row;
        if (start + n).div_ceil(g.block_tokens) > self.pages.len() {
            return Err(EngineError::Kv("write past the reserved pages".into()));
        }
        for i in 0..n {
            let pos = start + i;
            let page = &mut self.pages[pos / g.block_tokens];
            let t = pos % g.block_tokens;
            let k_at = g.row_offset(layer, 0, t);
            page[k_at..k_at + row].copy_from_slice(&k_rows[i * row..(i + 1) * row]);
            let v_at = g.row_offset(layer, 1, t);
            page[v_at..v_at + row].copy_from_slice(&v_rows[i * row..(i + 1) * row]);
        }
        self.widen(layer, start, k_rows, v_rows);
        Ok(())
    }

    /// K and V of `layer` for positions `0..total` as f32, head-major and contiguous
    /// (`[kv_heads][total][head_dim]` each): exactly the pages' f16 values, widened
    /// when they were written or loaded. One copy; no conversion.
    pub(crate) fn layer_f32(&self, layer: usize, total: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let g = self.geometry;
        if layer >= g.num_layers || total > self.wide_cap {
            return Err(EngineError::Kv(format!(
                "read of layer {layer} for {total} positions past the reserved ones"
            )));
        }
        let (heads, dim, cap) = (g.num_kv_heads, g.head_dim, self.wide_cap);
        let wide = &self.wide[layer];
        let gather = |rows: &[f32]| -> Vec<f32> {
            let mut out = Vec::with_capacity(heads * total * dim);
            for h in 0..heads {
                out.extend_from_slice(&rows[h * cap * dim..(h * cap + total) * dim]);
            }
            out
        };
        Ok((gather(&wide.k), gather(&wide.v)))
    }

    /// K and V rows of `layer` for positions `0..total` (`[total][kv_heads][head_dim]` each),
    /// from the pages (tests compare the wide copy with it).
    #[cfg(test)]
    pub(crate) fn read_layer(&self, layer: usize, total: usize) -> Result<(Vec<f16>, Vec<f16>)> {
        let g = self.geometry;
        let row = g.row_elems();
        if layer >= g.num_layers || total.div_ceil(g.block_tokens) > self.pages.len() {
            return Err(EngineError::Kv(format!(
                "read of layer {layer} for {total} positions past the pages"
            )));
        }
        let mut k = Vec::with_capacity(total * row);
        let mut v = Vec::with_capacity(total * row);
        for (p, page) in self.pages.iter().enumerate() {
            let first = p * g.block_tokens;
            if first >= total {
                break;
            }
            let count = (total - first).min(g.block_tokens);
            let k_at = g.row_offset(layer, 0, 0);
            k.extend_from_slice(&page[k_at..k_at + count * row]);
            let v_at = g.row_offset(layer, 1, 0);
            v.extend_from_slice(&page[v_at..v_at + count * row]);
        }
        Ok((k, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo() -> KvGeometry {
        KvGeometry {
            num_layers: 3,
            num_kv_heads: 2,
            head_dim: 4,
            block_tokens: 5,
        }
    }

    /// A value that names (layer, kv, position, element) so misplacements show.
    fn val(layer: usize, kv: usize, pos: usize, e: usize) -> f16 {
        f16::from_f32((layer * 1000 + kv * 500 + pos * 10 + e) as f32 / 8.0)
    }

    fn rows(layer: usize, kv: usize, start: usize, n: usize, row: usize) -> Vec<f16> {
        (start..start + n)
            .flat_map(|p| (0..row).map(move |e| val(layer, kv, p, e)))
            .collect()
    }

    fn fill(kv: &mut PagedKv, start: usize, n: usize) {
        let g = *kv.geometry();
        kv.reserve_tokens(n).unwrap();
        for l in 0..g.num_layers {
            let k = rows(l, 0, start, n, g.row_elems());
            let v = rows(l, 1, start, n, g.row_elems());
            kv.write_layer(l, start, &k, &v).unwrap();
        }
        kv.commit_tokens(n).unwrap();
    }

    #[test]
    fn pages_are_layer_major_blocks() {
        let g = geo();
        let mut kv = PagedKv::new(g).unwrap();
        fill(&mut kv, 0, 7);
        fill(&mut kv, 7, 6);
        assert_eq!(kv.len(), 13);
        assert_eq!(kv.full_pages(), 2);
        assert!(kv.page_bytes(2).is_err());
        // Naive layout loop: [layer][K|V][token][kv_head][head_dim].
        for p in 0..2 {
            let bytes = kv.page_bytes(p).unwrap();
            assert_eq!(bytes.len(), g.block_bytes());
            let vals: &[f16] = bytemuck::cast_slice(bytes);
            let mut i = 0;
            for l in 0..g.num_layers {
                for c in 0..2 {
                    for t in 0..g.block_tokens {
                        for e in 0..g.row_elems() {
                            assert_eq!(vals[i], val(l, c, p * g.block_tokens + t, e));
                            i += 1;
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn read_layer_spans_pages_and_partial_tail() {
        let g = geo();
        let mut kv = PagedKv::new(g).unwrap();
        fill(&mut kv, 0, 12);
        let (k, v) = kv.read_layer(1, 12).unwrap();
        assert_eq!(k, rows(1, 0, 0, 12, g.row_elems()));
        assert_eq!(v, rows(1, 1, 0, 12, g.row_elems()));
        assert!(kv.read_layer(3, 12).is_err());
        assert!(kv.read_layer(0, 16).is_err());
    }

    #[test]
    fn loaded_blocks_equal_computed_pages() {
        let g = geo();
        let mut computed = PagedKv::new(g).unwrap();
        fill(&mut computed, 0, 11);
        let mut loaded = PagedKv::new(g).unwrap();
        loaded.push_block(computed.page_bytes(0).unwrap()).unwrap();
        loaded.push_block(computed.page_bytes(1).unwrap()).unwrap();
        assert_eq!(loaded.len(), 10);
        fill(&mut loaded, 10, 1);
        for l in 0..g.num_layers {
            assert_eq!(
                loaded.read_layer(l, 11).unwrap(),
                computed.read_layer(l, 11).unwrap()
            );
        }
        // Wrong size, or not on a page boundary: refused, nothing changes.
        let mut short = PagedKv::new(g).unwrap();
        assert!(short.push_block(&[0u8; 10]).is_err());
        assert_eq!(short.len(), 0);
        assert!(loaded.push_block(computed.page_bytes(0).unwrap()).is_err());
        assert_eq!(loaded.len(), 11);
    }

    /// `read_layer`'s rows widened and made head-major: what attention read before the
    /// wide copy existed.
    fn widened(kv: &PagedKv, layer: usize, total: usize) -> (Vec<f32>, Vec<f32>) {
        let g = *kv.geometry();
        let (k, v) = kv.read_layer(layer, total).unwrap();
        let head_major = |rows: Vec<f16>| -> Vec<f32> {
            let mut out = Vec::new();
            for h in 0..g.num_kv_heads {
                for p in 0..total {
                    let at = (p * g.num_kv_heads + h) * g.head_dim;
                    out.extend(rows[at..at + g.head_dim].iter().map(|x| x.to_f32()));
                }
            }
            out
        };
        (head_major(k), head_major(v))
    }

    #[test]
    fn wide_copy_equals_the_pages() {
        let g = geo();
        let mut computed = PagedKv::new(g).unwrap();
        // One position at a time (decode), across pages and capacity growth.
        fill(&mut computed, 0, 3);
        for p in 3..23 {
            fill(&mut computed, p, 1);
            for l in 0..g.num_layers {
                assert_eq!(
                    computed.layer_f32(l, p + 1).unwrap(),
                    widened(&computed, l, p + 1)
                );
            }
        }
        // Loaded blocks, then computed positions after them.
        let mut loaded = PagedKv::new(g).unwrap();
        for p in 0..3 {
            loaded.push_block(computed.page_bytes(p).unwrap()).unwrap();
        }
        fill(&mut loaded, 15, 8);
        for l in 0..g.num_layers {
            assert_eq!(
                loaded.layer_f32(l, 23).unwrap(),
                computed.layer_f32(l, 23).unwrap()
            );
        }
        // Truncated and written again: the new values.
        loaded.truncate(7);
        loaded.reserve_tokens(2).unwrap();
        let row = g.row_elems();
        let k: Vec<f16> = (0..2 * row).map(|i| f16::from_f32(-(i as f32))).collect();
        for l in 0..g.num_layers {
            loaded.write_layer(l, 7, &k, &k).unwrap();
        }
        loaded.commit_tokens(2).unwrap();
        for l in 0..g.num_layers {
            assert_eq!(loaded.layer_f32(l, 9).unwrap(), widened(&loaded, l, 9));
        }
        assert!(loaded.layer_f32(3, 9).is_err());
        assert!(loaded.layer_f32(0, 10_000).is_err());
    }

    #[test]
    fn truncate_drops_positions() {
        let mut kv = PagedKv::new(geo()).unwrap();
        fill(&mut kv, 0, 12);
        kv.truncate(5);
        assert_eq!(kv.len(), 5);
        assert_eq!(kv.full_pages(), 1);
        fill(&mut kv, 5, 3);
        assert_eq!(kv.len(), 8);
        assert!(
            PagedKv::new(KvGeometry {
                block_tokens: 0,
                ..geo()
            })
            .is_err()
        );
    }
}
