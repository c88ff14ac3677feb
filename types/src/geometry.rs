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
//!
//! Where a chunk lies in the engine's region is given by three strides:
//! the (layer, K|V, page) chunk starts at
//! `layer * layer_stride + page * page_stride + kv * kv_stride`. Their
//! defaults (a field of 0) are the packed layouts below; per-layer regions may
//! set all three, so that, for example, vLLM's per-layer
//! `(2, num_blocks, block_size, kv_heads, head_size)` tensors (K of every page,
//! then V of every page: `page_stride = chunk`, `kv_stride = num_blocks * chunk`)
//! register without a copy. [`PagedGeometry::validate`] refuses strides under
//! which two chunks would overlap.

use crate::error::InvalidField;

/// How an engine lays out its paged KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageLayout {
    /// One tensor per layer, by default `[num_pages, 2, page_tokens, kv_heads,
    /// head_dim]`, the layers `layer_stride` bytes apart in the registered
    /// region; `page_stride` and `kv_stride` describe other per-layer layouts
    /// (K and V of a page apart, as in `[2, num_pages, page_tokens, …]`).
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

/// Largest region a geometry may describe: 256 TiB.
pub const MAX_REGION_BYTES: u64 = 1 << 48;

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
    /// only); 0 means packed (the end of one layer's last chunk).
    pub layer_stride: u64,
    /// Bytes between the starts of two pages of one layer
    /// ([`PageLayout::PerLayer`] only); 0 means `2 * chunk` (K and V of a page
    /// side by side).
    pub page_stride: u64,
    /// Bytes from the start of a page's K chunk to its V chunk
    /// ([`PageLayout::PerLayer`] only); 0 means `chunk` (V right after K).
    pub kv_stride: u64,
}

impl PagedGeometry {
    /// A geometry with the default (packed) strides of its layout.
    pub fn packed(
        layout: PageLayout,
        layers: u32,
        page_tokens: u32,
        kv_heads: u32,
        head_dim: u32,
        dtype_bytes: u32,
        num_pages: u32,
    ) -> Self {
        PagedGeometry {
            layout,
            layers,
            page_tokens,
            kv_heads,
            head_dim,
            dtype_bytes,
            num_pages,
            layer_stride: 0,
            page_stride: 0,
            kv_stride: 0,
        }
    }

    /// Bytes of one token's K (or V) row: `kv_heads * head_dim * dtype_bytes`.
    pub fn row_bytes(&self) -> u64 {
        self.kv_heads as u64 * self.head_dim as u64 * self.dtype_bytes as u64
    }

    /// Bytes of one (layer, K|V, page) run.
    pub fn chunk_bytes(&self) -> u64 {
        self.page_tokens as u64 * self.row_bytes()
    }

    /// Bytes between two pages of one layer (the `page_stride` field, or its
    /// layout's default).
    pub fn page_stride(&self) -> u64 {
        match self.layout {
            PageLayout::PerLayer if self.page_stride != 0 => self.page_stride,
            PageLayout::PerLayer => 2 * self.chunk_bytes(),
            PageLayout::CrossLayer => self.layers as u64 * 2 * self.chunk_bytes(),
        }
    }

    /// Bytes from a page's K chunk to its V chunk (the `kv_stride` field, or
    /// `chunk`).
    pub fn effective_kv_stride(&self) -> u64 {
        match self.layout {
            PageLayout::PerLayer if self.kv_stride != 0 => self.kv_stride,
            _ => self.chunk_bytes(),
        }
    }

    /// Bytes one layer spans in a per-layer region: from its first chunk to
    /// the end of its last ([`PageLayout::PerLayer`]'s packed layer stride).
    /// Saturates rather than overflows (an unvalidated geometry's strides).
    fn layer_span(&self) -> u64 {
        (self.num_pages.max(1) as u64 - 1)
            .saturating_mul(self.page_stride())
            .saturating_add(self.effective_kv_stride())
            .saturating_add(self.chunk_bytes())
    }

    /// Bytes between two layers of one page.
    pub fn effective_layer_stride(&self) -> u64 {
        match self.layout {
            PageLayout::PerLayer if self.layer_stride == 0 => self.layer_span(),
            PageLayout::PerLayer => self.layer_stride,
            PageLayout::CrossLayer => 2 * self.chunk_bytes(),
        }
    }

    /// Bytes the region must have: the end of the last layer's last chunk
    /// (saturating: an unvalidated geometry never overflows).
    pub fn region_bytes(&self) -> u64 {
        if self.num_pages == 0 || self.layers == 0 {
            return 0;
        }
        (self.layers as u64 - 1)
            .saturating_mul(self.effective_layer_stride())
            .saturating_add((self.num_pages as u64 - 1).saturating_mul(self.page_stride()))
            .saturating_add(self.effective_kv_stride())
            .saturating_add(self.chunk_bytes())
    }

    /// Bytes of one kvstrata block of `pages_per_block` pages.
    pub fn block_bytes(&self, pages_per_block: u32) -> u64 {
        self.layers as u64 * 2 * pages_per_block as u64 * self.chunk_bytes()
    }

    /// Offset in the region of the (layer, K|V, page) chunk.
    pub fn engine_offset(&self, layer: u32, kv: u32, page: u32) -> u64 {
        layer as u64 * self.effective_layer_stride()
            + page as u64 * self.page_stride()
            + kv as u64 * self.effective_kv_stride()
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

    /// Checks the geometry: every dimension non-zero, sizes that fit in 64
    /// bits (a region of at most [`MAX_REGION_BYTES`]), strides only where the
    /// layout has them, and strides under which no two chunks overlap.
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
        if total > MAX_REGION_BYTES as u128 {
            return Err(InvalidField::new(
                "num_pages",
                format!("the region would be {total} bytes, more than 256 TiB"),
            ));
        }
        if self.layout == PageLayout::CrossLayer {
            for (field, v) in [
                ("layer_stride", self.layer_stride),
                ("page_stride", self.page_stride),
                ("kv_stride", self.kv_stride),
            ] {
                if v != 0 {
                    return Err(InvalidField::new(
                        field,
                        "only per-layer layouts set strides (cross-layer pages are packed)",
                    ));
                }
            }
            return Ok(());
        }
        for (field, v) in [
            ("layer_stride", self.layer_stride),
            ("page_stride", self.page_stride),
            ("kv_stride", self.kv_stride),
        ] {
            if v > MAX_REGION_BYTES {
                return Err(InvalidField::new(
                    field,
                    format!("{v} bytes is more than 256 TiB"),
                ));
            }
        }
        // Every stride is now at most 2^48 and every count at most 2^32, so
        // none of the sums below overflows 128 bits.
        let page_stride = self.page_stride() as u128;
        let kv_stride = self.effective_kv_stride() as u128;
        let pages = self.num_pages as u128;
        let layer_stride = match self.layer_stride {
            0 => (pages - 1) * page_stride + kv_stride + chunk,
            s => s as u128,
        };
        let mut dims = [
            ("kv_stride", kv_stride, 2u128),
            ("page_stride", page_stride, pages),
            ("layer_stride", layer_stride, self.layers as u128),
        ];
        // The non-overlap rule of any strided array, which admits every
        // nesting order of the three dimensions (K|V inside pages, pages
        // inside K|V halves, layers inside pages, …): taken from the smallest
        // stride up, each stride (of a dimension longer than 1) is at least
        // the span of everything below it.
        dims.sort_by_key(|(_, stride, _)| *stride);
        let mut span = chunk;
        for (field, stride, count) in dims {
            if count < 2 {
                continue;
            }
            if stride < span {
                return Err(InvalidField::new(
                    field,
                    format!(
                        "{stride} bytes is less than the {span} bytes its inner dimensions span \
                         (chunks of {chunk} bytes): chunks would overlap"
                    ),
                ));
            }
            span += (count - 1) * stride;
        }
        let end = span;
        if end > MAX_REGION_BYTES as u128 {
            // Blame the dimension that spans the most.
            let (field, ..) = dims
                .iter()
                .max_by_key(|(_, stride, count)| stride * (count - 1))
                .unwrap_or(&dims[2]);
            return Err(InvalidField::new(
                *field,
                format!("the region would be {end} bytes, more than 256 TiB"),
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
        PagedGeometry::packed(layout, 3, 4, 2, 8, 2, 10)
    }

    /// vLLM's per-layer `(2, num_pages, page_tokens, heads, dim)` tensors, one
    /// after the other.
    fn k_then_v(layers: u32, num_pages: u32) -> PagedGeometry {
        let mut g = PagedGeometry::packed(PageLayout::PerLayer, layers, 4, 2, 8, 2, num_pages);
        g.page_stride = g.chunk_bytes();
        g.kv_stride = num_pages as u64 * g.chunk_bytes();
        g
    }

    #[test]
    fn strides_of_both_layouts() {
        let g = geometry(PageLayout::PerLayer);
        assert_eq!(g.row_bytes(), 32);
        assert_eq!(g.chunk_bytes(), 128);
        assert_eq!(g.page_stride(), 256);
        assert_eq!(g.effective_kv_stride(), 128);
        assert_eq!(g.effective_layer_stride(), 2560);
        assert_eq!(g.region_bytes(), 3 * 2560);
        let c = geometry(PageLayout::CrossLayer);
        assert_eq!(c.page_stride(), 3 * 256);
        assert_eq!(c.effective_layer_stride(), 256);
        assert_eq!(c.region_bytes(), 10 * 3 * 256);
        assert_eq!(g.block_bytes(2), 3 * 2 * 2 * 128);
    }

    #[test]
    fn k_then_v_layers_pack_and_address_like_the_tensor() {
        let g = k_then_v(3, 10);
        g.validate().unwrap();
        // A layer is 2 * 10 chunks, packed.
        assert_eq!(g.effective_layer_stride(), 20 * 128);
        assert_eq!(g.region_bytes(), 3 * 20 * 128);
        // Element [kv][page] of layer l of the tensor.
        assert_eq!(g.engine_offset(0, 0, 7), 7 * 128);
        assert_eq!(g.engine_offset(0, 1, 7), (10 + 7) * 128);
        assert_eq!(g.engine_offset(2, 1, 9), (40 + 10 + 9) * 128);
        // The block side does not change.
        assert_eq!(
            g.block_bytes(1),
            geometry(PageLayout::PerLayer).block_bytes(1)
        );
        // Padded layers: a layer stride of at least the span.
        let mut padded = g;
        padded.layer_stride = 20 * 128 + 64;
        padded.validate().unwrap();
        assert_eq!(padded.region_bytes(), 2 * (20 * 128 + 64) + 20 * 128);
        // Every chunk of the plan lies inside the region, and no two overlap.
        let ids: Vec<u32> = (0..10).collect();
        let mut runs: Vec<(u64, u64)> = padded
            .chunk_plan(1, &ids)
            .map(|c| (c.engine_offset, c.len))
            .collect();
        runs.sort();
        assert_eq!(runs.len(), 3 * 2 * 10);
        for w in runs.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{w:?}");
        }
        let last = runs.last().unwrap();
        assert_eq!(last.0 + last.1, padded.region_bytes());
    }

    #[test]
    fn overlapping_strides_are_refused_by_name() {
        let field = |f: &dyn Fn(&mut PagedGeometry)| {
            let mut g = k_then_v(3, 10);
            f(&mut g);
            g.validate().map_err(|e| e.field)
        };
        // V of page 0 on top of K of page 9.
        assert_eq!(
            field(&|g| g.kv_stride = 9 * 128),
            Err("kv_stride".to_string())
        );
        // K and V of one page overlapping.
        assert_eq!(
            field(&|g| {
                g.page_stride = 0;
                g.kv_stride = 100
            }),
            Err("kv_stride".to_string())
        );
        // Pages overlapping.
        assert_eq!(
            field(&|g| g.page_stride = 127),
            Err("page_stride".to_string())
        );
        // Layers overlapping the previous layer's V half.
        assert_eq!(
            field(&|g| g.layer_stride = 20 * 128 - 1),
            Err("layer_stride".to_string())
        );
        // Equal strides of two dimensions always overlap (the second one
        // sorted, here the pages, is blamed).
        assert_eq!(
            field(&|g| g.kv_stride = 128),
            Err("page_stride".to_string())
        );
        // A dimension of one needs no room: a single page, any page stride.
        let mut one = k_then_v(2, 1);
        one.page_stride = 1;
        one.validate().unwrap();
        // Layers nested inside pages (a block-outermost layout) are fine.
        let mut nested = geometry(PageLayout::PerLayer);
        nested.layer_stride = 2 * 128;
        nested.page_stride = 3 * 2 * 128;
        nested.validate().unwrap();
        assert_eq!(
            nested.region_bytes(),
            geometry(PageLayout::CrossLayer).region_bytes()
        );
        // Cross-layer pages take no strides.
        for f in [
            |g: &mut PagedGeometry| g.page_stride = 512,
            |g: &mut PagedGeometry| g.kv_stride = 512,
            |g: &mut PagedGeometry| g.layer_stride = 512,
        ] {
            let mut g = geometry(PageLayout::CrossLayer);
            f(&mut g);
            assert!(g.validate().is_err());
        }
        let mut huge = k_then_v(3, 10);
        huge.layer_stride = 1 << 47;
        assert_eq!(huge.validate().unwrap_err().field, "layer_stride");
        huge.layer_stride = u64::MAX;
        assert_eq!(huge.validate().unwrap_err().field, "layer_stride");
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
