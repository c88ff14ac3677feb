//! The engine's paged KV cache: one page is exactly one kvstrata block.
//!
//! A page holds the keys and values of `block_tokens` consecutive positions for every
//! layer in kvstrata's layer-major layout, `[layer][K|V][token][kv_head][head_dim]`,
//! as little-endian f16 (the model computes in f32 and rounds K/V to f16 when it stores
//! them). So a full page *is* a block payload: storing it is one copy of its bytes and
//! loading a block is one copy into a page, with no reshuffling on either side.
//!
//! The last page may be partly filled; only full pages become blocks.

use half::f16;

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
        Ok(())
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
        Ok(())
    }

    /// K and V rows of `layer` for positions `0..total` (`[total][kv_heads][head_dim]` each).
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
