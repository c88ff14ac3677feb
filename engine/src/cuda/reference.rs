//! CPU references of the GPU engine's kernels (`engine/cuda/*.cu`), and a
//! reference forward pass built from them.
//!
//! Each function computes what its kernel computes, in the same storage types:
//! 16-bit weights and matrix-product inputs (bf16 or f16, [`Storage`]), f16 KV
//! pages, f32 for everything else. Where a kernel rounds each step on its own
//! (rotary embeddings, the synthetic weights, the conversions) the reference
//! is bit-exact; where it sums in another order (RMSNorm's block reduction,
//! attention's online softmax) the GPU check allows a stated tolerance. CI
//! tests every reference against naive loops on odd sizes (the tests below);
//! `kvstrata gpu-check` compares every kernel with its reference on random data.
//!
//! [`forward`] runs a whole model through these references in the order the
//! GPU forward pass runs its kernels and matrix products, so CI can check the
//! composition (fused projections, rotary convention, page layout, grouped
//! heads) against the candle model without a GPU.

use half::f16;

use crate::model::{LlamaConfig, RopeStyle};

mod flash;

/// The 16-bit type of weights and of the activations fed to matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Storage {
    Bf16,
    F16,
}

impl Storage {
    /// The kernel name suffix of this type (`kvs_embed_bf16`, ...).
    pub fn suffix(self) -> &'static str {
        match self {
            Storage::Bf16 => "bf16",
            Storage::F16 => "f16",
        }
    }
}

/// f32 → bf16, round to nearest, ties to even; every NaN becomes 0x7fc0.
pub fn f32_to_bf16(f: f32) -> u16 {
    let u = f.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return 0x7fc0;
    }
    let bias = 0x7fff + ((u >> 16) & 1);
    (u.wrapping_add(bias) >> 16) as u16
}

/// bf16 → f32 (exact).
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 → `storage`, round to nearest, ties to even.
pub fn to_storage(f: f32, storage: Storage) -> u16 {
    match storage {
        Storage::Bf16 => f32_to_bf16(f),
        Storage::F16 => f16::from_f32(f).to_bits(),
    }
}

/// `storage` → f32 (exact).
pub fn from_storage(v: u16, storage: Storage) -> f32 {
    match storage {
        Storage::Bf16 => bf16_to_f32(v),
        Storage::F16 => f16::from_bits(v).to_f32(),
    }
}

/// `kvs_embed_*`: rows of `table` (`[vocab][hidden]`) picked by `ids`, as f32.
pub fn embed(table: &[u16], ids: &[u32], hidden: usize, storage: Storage) -> Vec<f32> {
    let mut out = Vec::with_capacity(ids.len() * hidden);
    for &id in ids {
        let row = &table[id as usize * hidden..(id as usize + 1) * hidden];
        out.extend(row.iter().map(|&v| from_storage(v, storage)));
    }
    out
}

/// `kvs_rms_norm_*`: each row of `x` (`hidden` wide) divided by
/// `sqrt(mean(x²) + eps)`, times `w`, stored 16-bit. Sums left to right (the
/// kernel sums as a tree: results agree to rounding).
pub fn rms_norm(x: &[f32], w: &[f32], hidden: usize, eps: f32, storage: Storage) -> Vec<u16> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(hidden) {
        let sum: f32 = row.iter().map(|v| v * v).sum();
        let m = (sum / hidden as f32 + eps).sqrt();
        out.extend(
            row.iter()
                .zip(w)
                .map(|(v, w)| to_storage(v / m * w, storage)),
        );
    }
    out
}

/// `kvs_swiglu_*`: rows of `[gate | up]` (`2 * inter` wide) → `silu(gate) * up`.
pub fn swiglu(gate_up: &[f32], inter: usize, storage: Storage) -> Vec<u16> {
    let mut out = Vec::with_capacity(gate_up.len() / 2);
    for row in gate_up.chunks_exact(2 * inter) {
        let (g, u) = row.split_at(inter);
        out.extend(
            g.iter()
                .zip(u)
                .map(|(&g, &u)| to_storage(g / (1.0 + (-g).exp()) * u, storage)),
        );
    }
    out
}

/// The synthetic models' generator (splitmix64).
pub fn splitmix64(x: u64) -> u64 {
    let mut x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// `kvs_synthetic_*`: element `i` is `offset + scale * (2u - 1)`, `u` the top 24 bits
/// of `splitmix64(key + i)` over 2^24, each step rounded once, then rounded to
/// `storage`. Bit-exact with the kernel.
pub fn synthetic(key: u64, n: usize, scale: f32, offset: f32, storage: Storage) -> Vec<u16> {
    (0..n as u64)
        .map(|i| {
            let u = (splitmix64(key.wrapping_add(i)) >> 40) as f32 * (1.0 / 16_777_216.0);
            to_storage(offset + scale * (u * 2.0 - 1.0), storage)
        })
        .collect()
}

/// Rotary tables for positions `0..positions`: `cos`/`sin` of `pos * inv_freq[i]`,
/// `[position][head_dim / 2]`, computed as the candle model computes them.
#[derive(Debug, Clone)]
pub struct RopeTables {
    pub half: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl RopeTables {
    pub fn new(head_dim: usize, theta: f32, positions: usize) -> Self {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf(2.0 * i as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        RopeTables { half, cos, sin }
    }

    /// Positions covered.
    pub fn positions(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }
}

/// `kvs_rope`: rotates the first `heads` heads (q heads then k heads) of `rows`
/// rows of `qkv` (`stride` apart) in place, row `r` at position `start + r`.
#[allow(clippy::too_many_arguments)]
pub fn rope(
    qkv: &mut [f32],
    stride: usize,
    rows: usize,
    start: usize,
    heads: usize,
    head_dim: usize,
    tables: &RopeTables,
    style: RopeStyle,
) {
    let half = head_dim / 2;
    for r in 0..rows {
        for h in 0..heads {
            let v = &mut qkv[r * stride + h * head_dim..r * stride + (h + 1) * head_dim];
            for i in 0..half {
                let t = (start + r) * half + i;
                let (c, s) = (tables.cos[t], tables.sin[t]);
                let (a, b) = match style {
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    RopeStyle::HalfSplit => (i, i + half),
                };
                let (x0, x1) = (v[a], v[b]);
                v[a] = x0 * c - x1 * s;
                v[b] = x0 * s + x1 * c;
            }
        }
    }
}

/// Where the KV of a sequence lives: a pool of pages (f16 bits), each one
/// kvstrata block `[layer][K|V][token][kv_head][head_dim]`, and the sequence's
/// page of each `block_tokens` positions.
#[derive(Debug, Clone, Copy)]
pub struct PageMap<'a> {
    pub pages: &'a [u32],
    pub block_tokens: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// f16 values per page: `layers * 2 * block_tokens * kv_heads * head_dim`.
    pub page_elems: usize,
}

impl PageMap<'_> {
    /// Index in the pool of (layer, K=0|V=1, position, kv head, dim 0).
    pub fn at(&self, layer: usize, kv: usize, pos: usize, kv_head: usize) -> usize {
        let row = self.kv_heads * self.head_dim;
        self.pages[pos / self.block_tokens] as usize * self.page_elems
            + ((layer * 2 + kv) * self.block_tokens + pos % self.block_tokens) * row
            + kv_head * self.head_dim
    }
}

/// `kvs_kv_store`: K (columns `k_col..`) and V (`v_col..`) of `rows` rows of `qkv`
/// into the pages of positions `start..`, rounded to f16.
#[allow(clippy::too_many_arguments)]
pub fn kv_store(
    qkv: &[f32],
    stride: usize,
    k_col: usize,
    v_col: usize,
    pool: &mut [u16],
    map: &PageMap<'_>,
    layer: usize,
    rows: usize,
    start: usize,
) {
    let row = map.kv_heads * map.head_dim;
    for r in 0..rows {
        let k_at = map.at(layer, 0, start + r, 0);
        let v_at = map.at(layer, 1, start + r, 0);
        for j in 0..row {
            pool[k_at + j] = f16::from_f32(qkv[r * stride + k_col + j]).to_bits();
            pool[v_at + j] = f16::from_f32(qkv[r * stride + v_col + j]).to_bits();
        }
    }
}

/// `kvs_attention_*`: for each of `rows` query rows (position `start + r`) and
/// each of `heads` heads (head `h` reads kv head `h / group`), softmax of the
/// scaled scores over keys `0..=start + r` read from the pages, times V.
/// Output `[rows][heads * head_dim]`, 16-bit. Two-pass softmax here, online in
/// the kernel: they agree to rounding.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    q_stride: usize,
    pool: &[u16],
    map: &PageMap<'_>,
    layer: usize,
    heads: usize,
    group: usize,
    rows: usize,
    start: usize,
    scale: f32,
    storage: Storage,
) -> Vec<u16> {
    let hd = map.head_dim;
    let mut out = vec![0u16; rows * heads * hd];
    let mut scores = Vec::new();
    let mut acc = vec![0f32; hd];
    for r in 0..rows {
        let seen = start + r + 1;
        for h in 0..heads {
            let kh = h / group;
            let qv = &q[r * q_stride + h * hd..r * q_stride + (h + 1) * hd];
            scores.clear();
            for p in 0..seen {
                let k = &pool[map.at(layer, 0, p, kh)..][..hd];
                let dot: f32 = qv
                    .iter()
                    .zip(k)
                    .map(|(a, b)| a * f16::from_bits(*b).to_f32())
                    .sum();
                scores.push(dot * scale);
            }
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut total = 0f32;
            acc.iter_mut().for_each(|a| *a = 0.0);
            for (p, s) in scores.iter().enumerate() {
                let w = (s - max).exp();
                total += w;
                let v = &pool[map.at(layer, 1, p, kh)..][..hd];
                for (a, b) in acc.iter_mut().zip(v) {
                    *a += w * f16::from_bits(*b).to_f32();
                }
            }
            for (d, a) in acc.iter().enumerate() {
                out[r * heads * hd + h * hd + d] = to_storage(a / total, storage);
            }
        }
    }
    out
}

pub use flash::*;

/// Index `kvs_top_k` writes into slots past the last candidate.
pub const TOP_K_NONE: u32 = u32::MAX;

/// `kvs_top_k`: the `k` largest values, largest first, ties to the lower index;
/// NaN never chosen; missing slots are `(TOP_K_NONE, -inf)`.
pub fn top_k(x: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..x.len() as u32)
        .filter(|&i| !x[i as usize].is_nan())
        .collect();
    idx.sort_by(|&a, &b| {
        x[b as usize]
            .partial_cmp(&x[a as usize])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    let mut out: Vec<(u32, f32)> = idx.iter().take(k).map(|&i| (i, x[i as usize])).collect();
    out.resize(k, (TOP_K_NONE, f32::NEG_INFINITY));
    out
}

/// `y[r][o] = Σ_i x[r][i] · w[o][i]` over 16-bit `x` (`[rows][inp]`) and `w`
/// (`[out][inp]`), f32 sums: the matrix product cuBLAS computes (to rounding).
pub fn matmul(x: &[u16], w: &[u16], inp: usize, out: usize, storage: Storage) -> Vec<f32> {
    let xf: Vec<f32> = x.iter().map(|&v| from_storage(v, storage)).collect();
    let wf: Vec<f32> = w.iter().map(|&v| from_storage(v, storage)).collect();
    let rows = xf.len() / inp;
    let mut y = vec![0f32; rows * out];
    for r in 0..rows {
        let xr = &xf[r * inp..(r + 1) * inp];
        for o in 0..out {
            let wr = &wf[o * inp..(o + 1) * inp];
            y[r * out + o] = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
        }
    }
    y
}

/// One layer's weights as the GPU holds them: the q, k, v projections fused into
/// one `[q rows | k rows | v rows]` matrix, gate and up into one `[gate | up]`.
#[derive(Debug, Clone)]
pub struct HostLayer {
    pub attn_norm: Vec<f32>,
    pub wqkv: Vec<u16>,
    pub wo: Vec<u16>,
    pub ffn_norm: Vec<f32>,
    pub w_gate_up: Vec<u16>,
    pub w_down: Vec<u16>,
}

/// A whole model's weights in host memory, in the GPU's layout and storage type.
#[derive(Debug, Clone)]
pub struct HostWeights {
    pub storage: Storage,
    pub embed: Vec<u16>,
    /// `None`: the output projection is the embedding (tied).
    pub lm_head: Option<Vec<u16>>,
    pub final_norm: Vec<f32>,
    pub layers: Vec<HostLayer>,
}

impl HostWeights {
    /// The output projection (`[vocab][hidden]`).
    pub fn output(&self) -> &[u16] {
        self.lm_head.as_deref().unwrap_or(&self.embed)
    }
}

/// A reference KV cache: a pool of pages and the sequence's pages in order.
#[derive(Debug, Clone)]
pub struct HostKv {
    pub pool: Vec<u16>,
    pub pages: Vec<u32>,
    pub page_elems: usize,
    pub block_tokens: usize,
    pub len: usize,
}

impl HostKv {
    /// An empty cache for `config` with `block_tokens` positions per page.
    pub fn new(config: &LlamaConfig, block_tokens: usize) -> Self {
        HostKv {
            pool: Vec::new(),
            pages: Vec::new(),
            page_elems: config.num_layers
                * 2
                * block_tokens
                * config.num_kv_heads
                * config.head_dim,
            block_tokens,
            len: 0,
        }
    }

    /// The bytes of page `i` of the sequence (one kvstrata block when full).
    pub fn page_bytes(&self, i: usize) -> &[u8] {
        let at = self.pages[i] as usize * self.page_elems;
        bytemuck::cast_slice(&self.pool[at..at + self.page_elems])
    }

    fn reserve(&mut self, tokens: usize) {
        // Pages are taken from the end of the pool in reverse order, so the
        // sequence's pages are not the identity map (the page table matters).
        while self.pages.len() < tokens.div_ceil(self.block_tokens) {
            let id = (self.pool.len() / self.page_elems) as u32;
            self.pool.extend(std::iter::repeat_n(0u16, self.page_elems));
            self.pages.push(id);
        }
        if self.pages.len() > 1 {
            let n = self.pages.len() as u32;
            let used = self.len.div_ceil(self.block_tokens);
            for (i, p) in self.pages.iter_mut().enumerate().skip(used) {
                *p = n - 1 - i as u32 + used as u32;
            }
        }
    }
}

/// The GPU forward pass on the CPU: `tokens` at positions `kv.len..`, appending
/// their K/V to `kv`; returns the last position's logits. Same steps, same
/// storage types and the same fused weights as `GpuModel::forward`.
pub fn forward(
    config: &LlamaConfig,
    weights: &HostWeights,
    tables: &RopeTables,
    tokens: &[u32],
    kv: &mut HostKv,
) -> Vec<f32> {
    let c = config;
    let s = weights.storage;
    let (h, nh, nkv, hd) = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim);
    let (qd, kvd) = (nh * hd, nkv * hd);
    let qkv_dim = qd + 2 * kvd;
    let n = tokens.len();
    let start = kv.len;
    let eps = c.rms_eps as f32;
    let scale = (1.0 / (hd as f64).sqrt()) as f32;
    kv.reserve(start + n);
    let mut x = embed(&weights.embed, tokens, h, s);
    for (li, layer) in weights.layers.iter().enumerate() {
        let hn = rms_norm(&x, &layer.attn_norm, h, eps, s);
        let mut qkv = matmul(&hn, &layer.wqkv, h, qkv_dim, s);
        rope(
            &mut qkv,
            qkv_dim,
            n,
            start,
            nh + nkv,
            hd,
            tables,
            c.rope_style,
        );
        let pages = kv.pages.clone();
        let map = PageMap {
            pages: &pages,
            block_tokens: kv.block_tokens,
            kv_heads: nkv,
            head_dim: hd,
            page_elems: kv.page_elems,
        };
        kv_store(
            &qkv,
            qkv_dim,
            qd,
            qd + kvd,
            &mut kv.pool,
            &map,
            li,
            n,
            start,
        );
        let a = attention(
            &qkv,
            qkv_dim,
            &kv.pool,
            &map,
            li,
            nh,
            nh / nkv,
            n,
            start,
            scale,
            s,
        );
        let o = matmul(&a, &layer.wo, qd, h, s);
        x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
        let hn = rms_norm(&x, &layer.ffn_norm, h, eps, s);
        let gu = matmul(&hn, &layer.w_gate_up, h, 2 * c.intermediate_size, s);
        let m = swiglu(&gu, c.intermediate_size, s);
        let d = matmul(&m, &layer.w_down, c.intermediate_size, h, s);
        x.iter_mut().zip(&d).for_each(|(x, d)| *x += d);
    }
    kv.len = start + n;
    let last = rms_norm(&x[(n - 1) * h..], &weights.final_norm, h, eps, s);
    matmul(&last, weights.output(), h, c.vocab_size, s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn rand_f32(rng: &mut StdRng, n: usize, range: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-range..range)).collect()
    }

    fn close(a: f32, b: f32, tol: f32) -> bool {
        (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
    }

    #[test]
    fn conversions_round_to_nearest_even() {
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..100_000 {
            let f = f32::from_bits(rng.random::<u32>());
            if f.is_nan() {
                assert_eq!(f32_to_bf16(f), 0x7fc0);
                continue;
            }
            assert_eq!(f32_to_bf16(f), half::bf16::from_f32(f).to_bits(), "{f:e}");
            assert_eq!(
                bf16_to_f32(f32_to_bf16(f)),
                half::bf16::from_f32(f).to_f32()
            );
        }
        // Ties: 1 + 2^-8 lies halfway between two bf16 values; even wins.
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), f32_to_bf16(1.0));
        assert_eq!(
            f32_to_bf16(1.0 + 3.0 / 256.0),
            f32_to_bf16(1.0 + 4.0 / 256.0)
        );
        for s in [Storage::Bf16, Storage::F16] {
            for v in [0.0f32, -1.5, 3.140625, 2048.0, -0.0078125] {
                assert_eq!(from_storage(to_storage(v, s), s), v);
            }
        }
    }

    #[test]
    fn embed_picks_rows() {
        let (vocab, hidden) = (13, 7);
        let table: Vec<u16> = (0..vocab * hidden)
            .map(|i| to_storage(i as f32, Storage::Bf16))
            .collect();
        let ids = [3u32, 12, 0, 3];
        let out = embed(&table, &ids, hidden, Storage::Bf16);
        for (r, &id) in ids.iter().enumerate() {
            for d in 0..hidden {
                assert_eq!(out[r * hidden + d], (id as usize * hidden + d) as f32);
            }
        }
    }

    #[test]
    fn rms_norm_matches_naive() {
        let mut rng = StdRng::seed_from_u64(2);
        let (rows, hidden) = (5, 37);
        let x = rand_f32(&mut rng, rows * hidden, 3.0);
        let w = rand_f32(&mut rng, hidden, 2.0);
        for s in [Storage::Bf16, Storage::F16] {
            let out = rms_norm(&x, &w, hidden, 1e-5, s);
            for r in 0..rows {
                let mut ms = 0f64;
                for d in 0..hidden {
                    ms += (x[r * hidden + d] as f64).powi(2);
                }
                let inv = 1.0 / (ms / hidden as f64 + 1e-5).sqrt();
                for d in 0..hidden {
                    let want = x[r * hidden + d] as f64 * inv * w[d] as f64;
                    let got = from_storage(out[r * hidden + d], s) as f64;
                    assert!(
                        (got - want).abs() <= 1e-2 * (1.0 + want.abs()),
                        "{got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn swiglu_matches_naive() {
        let mut rng = StdRng::seed_from_u64(3);
        let (rows, inter) = (3, 29);
        let gu = rand_f32(&mut rng, rows * 2 * inter, 6.0);
        let out = swiglu(&gu, inter, Storage::F16);
        for r in 0..rows {
            for j in 0..inter {
                let g = gu[r * 2 * inter + j] as f64;
                let u = gu[r * 2 * inter + inter + j] as f64;
                let want = g / (1.0 + (-g).exp()) * u;
                let got = from_storage(out[r * inter + j], Storage::F16) as f64;
                assert!(
                    (got - want).abs() <= 2e-3 * (1.0 + want.abs()),
                    "{got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn synthetic_values_are_seeded_and_bounded() {
        let a = synthetic(42, 1001, 0.25, 1.0, Storage::Bf16);
        assert_eq!(a, synthetic(42, 1001, 0.25, 1.0, Storage::Bf16));
        assert_ne!(a, synthetic(43, 1001, 0.25, 1.0, Storage::Bf16));
        // Element i depends on key + i only: a shifted key shifts the stream.
        assert_eq!(&a[1..], &synthetic(43, 1000, 0.25, 1.0, Storage::Bf16)[..]);
        let vals: Vec<f32> = a.iter().map(|&v| bf16_to_f32(v)).collect();
        assert!(vals.iter().all(|v| (0.75..=1.25).contains(v)));
        let mean = vals.iter().sum::<f32>() / vals.len() as f32;
        assert!((mean - 1.0).abs() < 0.02, "mean {mean}");
        // Known value, so the kernel and this reference cannot drift together.
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn rope_matches_naive_rotation() {
        let mut rng = StdRng::seed_from_u64(4);
        let (rows, heads, hd, start) = (3, 5, 10, 7);
        let stride = heads * hd + 3;
        let tables = RopeTables::new(hd, 10_000.0, start + rows);
        let x = rand_f32(&mut rng, rows * stride, 2.0);
        for style in [RopeStyle::Interleaved, RopeStyle::HalfSplit] {
            let mut y = x.clone();
            rope(&mut y, stride, rows, start, heads, hd, &tables, style);
            for r in 0..rows {
                let pos = (start + r) as f64;
                for h in 0..heads {
                    for i in 0..hd / 2 {
                        let angle = pos / 10_000f64.powf(2.0 * i as f64 / hd as f64);
                        let (a, b) = match style {
                            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                            RopeStyle::HalfSplit => (i, i + hd / 2),
                        };
                        let base = r * stride + h * hd;
                        let (x0, x1) = (x[base + a] as f64, x[base + b] as f64);
                        let want0 = x0 * angle.cos() - x1 * angle.sin();
                        let want1 = x0 * angle.sin() + x1 * angle.cos();
                        assert!(close(y[base + a], want0 as f32, 1e-4));
                        assert!(close(y[base + b], want1 as f32, 1e-4));
                    }
                }
                // Columns past the rotated heads are untouched.
                for c in heads * hd..stride {
                    assert_eq!(y[r * stride + c], x[r * stride + c]);
                }
            }
        }
    }

    /// Odd geometry: 3 layers, 3 kv heads, head dim 6, 5-token pages, 6 query
    /// heads (group 2), 4 new rows after 9 cached positions, pages shuffled.
    #[test]
    fn kv_store_and_attention_match_naive_loops() {
        let mut rng = StdRng::seed_from_u64(5);
        let (layers, nkv, hd, bt, group) = (3usize, 3usize, 6usize, 5usize, 2usize);
        let heads = nkv * group;
        let (start, rows) = (9usize, 4usize);
        let total = start + rows;
        let page_elems = layers * 2 * bt * nkv * hd;
        let pages = [4u32, 0, 2];
        let map = PageMap {
            pages: &pages,
            block_tokens: bt,
            kv_heads: nkv,
            head_dim: hd,
            page_elems,
        };
        let mut pool: Vec<u16> = (0..5 * page_elems).map(|_| rng.random()).collect();
        // Logical K/V: [layer][pos][kv_head][dim], written row by row.
        let kv_logical: Vec<f32> = rand_f32(&mut rng, layers * 2 * total * nkv * hd, 1.5);
        let lk = |l: usize, c: usize, p: usize, kh: usize, d: usize| {
            kv_logical[(((l * 2 + c) * total + p) * nkv + kh) * hd + d]
        };
        let stride = heads * hd + 2 * nkv * hd + 1;
        let (k_col, v_col) = (heads * hd, heads * hd + nkv * hd);
        for l in 0..layers {
            // Positions in two calls: the prefix, then the new rows.
            for (from, n) in [(0, start), (start, rows)] {
                let mut qkv = vec![0f32; n * stride];
                for r in 0..n {
                    for kh in 0..nkv {
                        for d in 0..hd {
                            qkv[r * stride + k_col + kh * hd + d] = lk(l, 0, from + r, kh, d);
                            qkv[r * stride + v_col + kh * hd + d] = lk(l, 1, from + r, kh, d);
                        }
                    }
                }
                kv_store(&qkv, stride, k_col, v_col, &mut pool, &map, l, n, from);
            }
        }
        // The pool holds the f16 of each logical value at the block layout's offset.
        for l in 0..layers {
            for c in 0..2 {
                for p in 0..total {
                    for kh in 0..nkv {
                        for d in 0..hd {
                            let page = pages[p / bt] as usize;
                            let at = page * page_elems
                                + (((l * 2 + c) * bt + p % bt) * nkv + kh) * hd
                                + d;
                            assert_eq!(pool[at], f16::from_f32(lk(l, c, p, kh, d)).to_bits());
                        }
                    }
                }
            }
        }
        let q = rand_f32(&mut rng, rows * stride, 1.5);
        let scale = 0.37;
        for l in [0, 2] {
            let out = attention(
                &q,
                stride,
                &pool,
                &map,
                l,
                heads,
                group,
                rows,
                start,
                scale,
                Storage::F16,
            );
            // Naive: a full score matrix with a -inf causal mask.
            for r in 0..rows {
                for h in 0..heads {
                    let kh = h / group;
                    let mut sc = vec![f64::NEG_INFINITY; total];
                    for (p, slot) in sc.iter_mut().enumerate() {
                        if p <= start + r {
                            let mut dot = 0f64;
                            for d in 0..hd {
                                let k = f16::from_f32(lk(l, 0, p, kh, d)).to_f64();
                                dot += q[r * stride + h * hd + d] as f64 * k;
                            }
                            *slot = dot * scale as f64;
                        }
                    }
                    let max = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = sc.iter().map(|s| (s - max).exp()).sum();
                    for d in 0..hd {
                        let mut want = 0f64;
                        for (p, s) in sc.iter().enumerate() {
                            want +=
                                (s - max).exp() / sum * f16::from_f32(lk(l, 1, p, kh, d)).to_f64();
                        }
                        let got = from_storage(out[r * heads * hd + h * hd + d], Storage::F16);
                        assert!(
                            (got as f64 - want).abs() <= 2e-3 * (1.0 + want.abs()),
                            "layer {l} row {r} head {h} dim {d}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn top_k_orders_by_value_then_index() {
        let x = [1.0, f32::NAN, 3.0, 3.0, -1.0, f32::NEG_INFINITY, 2.0];
        assert_eq!(top_k(&x, 1), vec![(2, 3.0)]);
        assert_eq!(top_k(&x, 4), vec![(2, 3.0), (3, 3.0), (6, 2.0), (0, 1.0)]);
        let all = top_k(&x, 8);
        assert_eq!(all[5], (5, f32::NEG_INFINITY));
        assert_eq!(all[6], (TOP_K_NONE, f32::NEG_INFINITY));
        assert_eq!(all[7], (TOP_K_NONE, f32::NEG_INFINITY));
        // Greedy decoding: the CPU engine's argmax.
        let mut rng = StdRng::seed_from_u64(6);
        for _ in 0..50 {
            let v: Vec<f32> = (0..101).map(|_| rng.random_range(0..20) as f32).collect();
            assert_eq!(top_k(&v, 1)[0].0, crate::model::argmax(&v));
        }
    }

    #[test]
    fn matmul_matches_naive() {
        let mut rng = StdRng::seed_from_u64(7);
        let (rows, inp, out) = (3, 11, 5);
        let s = Storage::Bf16;
        let x: Vec<u16> = rand_f32(&mut rng, rows * inp, 1.0)
            .iter()
            .map(|&v| to_storage(v, s))
            .collect();
        let w: Vec<u16> = rand_f32(&mut rng, out * inp, 1.0)
            .iter()
            .map(|&v| to_storage(v, s))
            .collect();
        let y = matmul(&x, &w, inp, out, s);
        for r in 0..rows {
            for o in 0..out {
                let want: f64 = (0..inp)
                    .map(|i| {
                        from_storage(x[r * inp + i], s) as f64
                            * from_storage(w[o * inp + i], s) as f64
                    })
                    .sum();
                assert!(close(y[r * out + o], want as f32, 1e-5));
            }
        }
    }
}
