//! Paged KV geometry: where one (layer, K|V, page) run of an engine's paged
//! KV cache lives, and where it goes in a kvstrata block.
//!
//! kvstrata's block layout is layer-major, `[layer][K|V][token][kv_head][head_dim]`.
//! Engines keep their KV in pages of `page_tokens` tokens, in one of two
//! layouts ([`PageLayout`]). A block is `pages_per_block` consecutive pages of
//! one sequence; the pages themselves can be anywhere in the engine's pool.
//! In both layouts the `page_tokens * kv_heads * head_dim * dtype` bytes of
//! one (layer, K|V, page) — a *chunk* — are contiguous on both sides, so a
//! gather or scatter is a list of chunk copies (see [`PagedGeometry::chunk_plan`]).

use crate::error::InvalidField;

/// How an engine lays out its paged KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageLayout {
    /// One tensor per layer, `[num_pages, 2, page_tokens, kv_heads, head_dim]`,
    /// the layers `layer_stride` bytes apart in the registered region.
    PerLayer,
    /// One page holds every layer: `[num_pages, layers, 2, page_tokens, kv_heads, head_dim]`.
    CrossLayer,
}

impl PageLayout {
    pub fn name(self) -> &'static str {
        match self {
            PageLayout::PerLayer => "per-layer",
            PageLayout::CrossLayer => "cross-layer",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "per-layer" | "per_layer" | "layer" => Some(PageLayout::PerLayer),
            "cross-layer" | "cross_layer" | "cross" => Some(PageLayout::CrossLayer),
            _ => None,
        }
    }
}

/// Why a geometry or a page list was refused: the crate's [`InvalidField`],
/// whose `field` names the offending field as the wire request spells it.
pub type GeometryError = InvalidField;

/// The shape of an engine's paged KV region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PagedGeometry {
    pub layout: PageLayout,
    pub layers: u32,
    pub page_tokens: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    /// Bytes per element (2 for f16/bf16).
    pub dtype_bytes: u32,
    pub num_pages: u32,
    /// Bytes between the starts of two layers' tensors ([`PageLayout::PerLayer`]
    /// only); 0 means packed (`num_pages * 2 * chunk`).
    pub layer_stride: u64,
}

impl PagedGeometry {
    /// Bytes of one token's K (or V) row: `kv_heads * head_dim * dtype_bytes`.
    pub fn row_bytes(&self) -> u64 {
        self.kv_heads as u64 * self.head_dim as u64 * self.dtype_bytes as u64
    }

    /// Bytes of one (layer, K|V, page) run.
    pub fn chunk_bytes(&self) -> u64 {
        self.page_tokens as u64 * self.row_bytes()
    }

    /// Bytes between two pages of one layer.
    pub fn page_stride(&self) -> u64 {
        match self.layout {
            PageLayout::PerLayer => 2 * self.chunk_bytes(),
            PageLayout::CrossLayer => self.layers as u64 * 2 * self.chunk_bytes(),
        }
    }

    /// Bytes between two layers of one page.
    pub fn effective_layer_stride(&self) -> u64 {
        match self.layout {
            PageLayout::PerLayer if self.layer_stride == 0 => {
                self.num_pages as u64 * self.page_stride()
            }
            PageLayout::PerLayer => self.layer_stride,
            PageLayout::CrossLayer => 2 * self.chunk_bytes(),
        }
    }

    /// Bytes the region must have: the end of the last layer's last page.
    pub fn region_bytes(&self) -> u64 {
        if self.num_pages == 0 || self.layers == 0 {
            return 0;
        }
        (self.layers as u64 - 1) * self.effective_layer_stride()
            + (self.num_pages as u64 - 1) * self.page_stride()
            + 2 * self.chunk_bytes()
    }

    /// Bytes of one kvstrata block of `pages_per_block` pages.
    pub fn block_bytes(&self, pages_per_block: u32) -> u64 {
        self.layers as u64 * 2 * pages_per_block as u64 * self.chunk_bytes()
    }

    /// Offset in the region of the (layer, K|V, page) chunk.
    pub fn engine_offset(&self, layer: u32, kv: u32, page: u32) -> u64 {
        layer as u64 * self.effective_layer_stride()
            + page as u64 * self.page_stride()
            + kv as u64 * self.chunk_bytes()
    }

    /// Offset in a block of the (layer, K|V, page-of-the-block) chunk.
    pub fn block_offset(
        &self,
        pages_per_block: u32,
        layer: u32,
        kv: u32,
        page_in_block: u32,
    ) -> u64 {
        ((layer as u64 * 2 + kv as u64) * pages_per_block as u64 + page_in_block as u64)
            * self.chunk_bytes()
    }

    /// Checks the geometry: every dimension non-zero, layer tensors that do
    /// not overlap, sizes that fit in 64 bits.
    pub fn validate(&self) -> Result<(), InvalidField> {
        for (field, v) in [
            ("layers", self.layers),
            ("page_tokens", self.page_tokens),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("dtype_bytes", self.dtype_bytes),
            ("num_pages", self.num_pages),
        ] {
            if v == 0 {
                return Err(InvalidField::new(field, "must be at least 1"));
            }
        }
        let chunk = (self.page_tokens as u128)
            * self.kv_heads as u128
            * self.head_dim as u128
            * self.dtype_bytes as u128;
        let total = chunk * 2 * self.layers as u128 * self.num_pages as u128;
        if total > (1u128 << 48) {
            return Err(InvalidField::new(
                "num_pages",
                format!("the region would be {total} bytes, more than 256 TiB"),
            ));
        }
        if self.layout == PageLayout::PerLayer
            && self.layer_stride != 0
            && self.layer_stride < self.num_pages as u64 * self.page_stride()
        {
            return Err(InvalidField::new(
                "layer_stride",
                format!(
                    "{} bytes is less than one layer's {} pages of {} bytes: layers would overlap",
                    self.layer_stride,
                    self.num_pages,
                    self.page_stride()
                ),
            ));
        }
        if self.layout == PageLayout::CrossLayer && self.layer_stride != 0 {
            return Err(InvalidField::new(
                "layer_stride",
                "only per-layer layouts have a layer stride (cross-layer pages hold every layer)",
            ));
        }
        Ok(())
    }

    /// Checks a request's page list: a whole number of blocks, every page id
    /// inside the region. `field` names the list in errors.
    pub fn check_pages(
        &self,
        field: &str,
        pages_per_block: u32,
        page_ids: &[u32],
    ) -> Result<usize, InvalidField> {
        if pages_per_block == 0 {
            return Err(InvalidField::new("pages_per_block", "must be at least 1"));
        }
        if !page_ids.len().is_multiple_of(pages_per_block as usize) {
            return Err(InvalidField::new(
                field,
                format!(
                    "{} page ids is not a whole number of blocks of {} pages",
                    page_ids.len(),
                    pages_per_block
                ),
            ));
        }
        if let Some((i, p)) = page_ids
            .iter()
            .enumerate()
            .find(|(_, p)| **p >= self.num_pages)
        {
            return Err(InvalidField::new(
                format!("{field}[{i}]"),
                format!("page {p} is outside the region's {} pages", self.num_pages),
            ));
        }
        Ok(page_ids.len() / pages_per_block as usize)
    }

    /// Every chunk copy of a gather (or, reversed, a scatter) of the blocks
    /// named by `page_ids`: (block number, engine offset, offset in the block,
    /// length). The GPU kernels compute the same list, one work item each.
    pub fn chunk_plan<'a>(
        &'a self,
        pages_per_block: u32,
        page_ids: &'a [u32],
    ) -> impl Iterator<Item = ChunkCopy> + 'a {
        let ppb = pages_per_block.max(1) as usize;
        let n_blocks = page_ids.len() / ppb;
        let chunk = self.chunk_bytes();
        (0..n_blocks).flat_map(move |b| {
            (0..self.layers).flat_map(move |l| {
                (0..2u32).flat_map(move |kv| {
                    (0..ppb as u32).map(move |j| ChunkCopy {
                        block: b,
                        engine_offset: self.engine_offset(l, kv, page_ids[b * ppb + j as usize]),
                        block_offset: self.block_offset(ppb as u32, l, kv, j),
                        len: chunk,
                    })
                })
            })
        })
    }
}

/// One contiguous run of a gather or scatter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkCopy {
    pub block: usize,
    pub engine_offset: u64,
    pub block_offset: u64,
    pub len: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(layout: PageLayout) -> PagedGeometry {
        PagedGeometry {
            layout,
            layers: 3,
            page_tokens: 4,
            kv_heads: 2,
            head_dim: 8,
            dtype_bytes: 2,
            num_pages: 10,
            layer_stride: 0,
        }
    }

    #[test]
    fn strides_of_both_layouts() {
        let g = geometry(PageLayout::PerLayer);
        assert_eq!(g.row_bytes(), 32);
        assert_eq!(g.chunk_bytes(), 128);
        assert_eq!(g.page_stride(), 256);
        assert_eq!(g.effective_layer_stride(), 2560);
        assert_eq!(g.region_bytes(), 3 * 2560);
        let c = geometry(PageLayout::CrossLayer);
        assert_eq!(c.page_stride(), 3 * 256);
        assert_eq!(c.effective_layer_stride(), 256);
        assert_eq!(c.region_bytes(), 10 * 3 * 256);
        assert_eq!(g.block_bytes(2), 3 * 2 * 2 * 128);
    }

    #[test]
    fn bad_geometry_and_pages_name_the_field() {
        let mut g = geometry(PageLayout::PerLayer);
        g.head_dim = 0;
        assert_eq!(g.validate().unwrap_err().field, "head_dim");
        let mut g = geometry(PageLayout::PerLayer);
        g.layer_stride = 100;
        assert_eq!(g.validate().unwrap_err().field, "layer_stride");
        let g = geometry(PageLayout::PerLayer);
        assert_eq!(
            g.check_pages("page_ids", 2, &[0, 1, 2]).unwrap_err().field,
            "page_ids"
        );
        assert_eq!(
            g.check_pages("page_ids", 2, &[0, 1, 2, 10])
                .unwrap_err()
                .field,
            "page_ids[3]"
        );
        assert_eq!(g.check_pages("page_ids", 2, &[0, 1, 9, 3]), Ok(2));
    }
}
