//! CPU references of the flash-attention kernels (`kvs_attention_flash_*`,
//! `kvs_attention_combine_*`): attention in fixed key spans, each span's
//! online-softmax partial, and the fold that joins them in span order, with
//! the same float operations as the kernels.

use half::f16;

use super::{PageMap, Storage, to_storage};

/// Keys per tile of `kvs_attention_flash_*` (spans are a multiple of it).
pub const FLASH_TILE: usize = 64;

/// One span's online-softmax partial of one query row and head, as
/// `kvs_attention_flash_*` keeps it: `m` the largest score seen (log2 units),
/// `l` the sum of `2^(s - m)`, `o` the sum of `2^(s - m)` (rounded to f16) times V.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanPartial {
    pub m: f32,
    pub l: f32,
    pub o: Vec<f32>,
}

/// `fold_step` of attention.cu: the running `(M, L)` takes a span's `(m, l)`;
/// returns the factors `(a, b)` for the running and the span's `o`
/// (`O' = O a + o b`). Every operation rounded on its own, as the kernel's
/// `__fmul_rn`/`__fadd_rn`; `2^x` here is the CPU's (the kernel's `ex2.approx`
/// agrees to about 2 ulp).
pub fn fold_step(acc_m: &mut f32, acc_l: &mut f32, m: f32, l: f32) -> (f32, f32) {
    let mn = acc_m.max(m);
    let a = (*acc_m - mn).exp2();
    let b = (m - mn).exp2();
    *acc_l = *acc_l * a + l * b;
    *acc_m = mn;
    (a, b)
}

/// q of one head as the flash kernel feeds it to the tensor cores: times
/// `scale * log2(e)`, rounded to f16.
fn flash_q(q: &[f32], scale: f32) -> Vec<f32> {
    let s = scale * std::f32::consts::LOG2_E;
    q.iter().map(|v| f16::from_f32(v * s).to_f32()).collect()
}

/// The partial of span `z` (keys `z * span ..`) for a query at position `qpos`
/// (at least the span's first key), `qf` from [`flash_q`]: 64-key tiles at
/// absolute positions, an online softmax over the tiles (no rescale when the
/// maximum does not grow), probabilities rounded to f16 for the product with V.
#[allow(clippy::too_many_arguments)]
pub fn flash_span_partial(
    qf: &[f32],
    pool: &[u16],
    map: &PageMap<'_>,
    layer: usize,
    kv_head: usize,
    qpos: usize,
    span: usize,
    z: usize,
) -> SpanPartial {
    let hd = map.head_dim;
    let first = z * span;
    let end = (first + span).min(qpos + 1);
    let mut part = SpanPartial {
        m: f32::NEG_INFINITY,
        l: 0.0,
        o: vec![0.0; hd],
    };
    let mut scores = Vec::with_capacity(FLASH_TILE);
    for t0 in (first..end).step_by(FLASH_TILE) {
        let keys = t0..(t0 + FLASH_TILE).min(end);
        scores.clear();
        for p in keys.clone() {
            let k = &pool[map.at(layer, 0, p, kv_head)..][..hd];
            let dot: f32 = qf
                .iter()
                .zip(k)
                .map(|(a, b)| a * f16::from_bits(*b).to_f32())
                .sum();
            scores.push(dot);
        }
        let tmax = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let nm = part.m.max(tmax);
        if nm != part.m {
            let c = (part.m - nm).exp2();
            part.l *= c;
            part.o.iter_mut().for_each(|o| *o *= c);
            part.m = nm;
        }
        for (p, s) in keys.zip(&scores) {
            let w = (s - nm).exp2();
            part.l += w;
            let w16 = f16::from_f32(w).to_f32();
            let v = &pool[map.at(layer, 1, p, kv_head)..][..hd];
            for (o, b) in part.o.iter_mut().zip(v) {
                *o += w16 * f16::from_bits(*b).to_f32();
            }
        }
    }
    part
}

/// The output of one query row and head from its span partials (spans
/// `0..=qpos / span`, in order): [`fold_step`] over them, `O / L`, stored
/// 16-bit. `kvs_attention_combine_*`, and the fold of the unsplit flash kernel.
pub fn flash_fold(parts: &[SpanPartial], storage: Storage) -> Vec<u16> {
    let hd = parts.first().map_or(0, |p| p.o.len());
    let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
    let mut acc = vec![0f32; hd];
    for p in parts {
        let (a, b) = fold_step(&mut m, &mut l, p.m, p.l);
        for (x, o) in acc.iter_mut().zip(&p.o) {
            *x = *x * a + o * b;
        }
    }
    acc.iter().map(|x| to_storage(x / l, storage)).collect()
}

/// `kvs_attention_flash_*` with a split launch: the span partials of `rows`
/// query rows (position `start + r`) in the kernel's scratch layout,
/// `[rows][heads][spans][head_dim]` of o then `[rows][heads][spans][2]` of
/// (m, l), `spans = ceil((start + rows) / span)`; entries of spans past a row's
/// position stay 0.
#[allow(clippy::too_many_arguments)]
pub fn flash_partials(
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
    span: usize,
) -> Vec<f32> {
    let hd = map.head_dim;
    let spans = (start + rows).div_ceil(span);
    let ml_at = rows * heads * spans * hd;
    let mut part = vec![0f32; ml_at + rows * heads * spans * 2];
    for r in 0..rows {
        let qpos = start + r;
        for h in 0..heads {
            let qf = flash_q(&q[r * q_stride + h * hd..][..hd], scale);
            for z in 0..=qpos / span {
                let p = flash_span_partial(&qf, pool, map, layer, h / group, qpos, span, z);
                let at = (r * heads + h) * spans + z;
                part[at * hd..(at + 1) * hd].copy_from_slice(&p.o);
                part[ml_at + 2 * at] = p.m;
                part[ml_at + 2 * at + 1] = p.l;
            }
        }
    }
    part
}

/// `kvs_attention_combine_*`: the output `[rows][heads * head_dim]` from the
/// partials of [`flash_partials`].
#[allow(clippy::too_many_arguments)]
pub fn flash_combine(
    part: &[f32],
    rows: usize,
    heads: usize,
    head_dim: usize,
    start: usize,
    span: usize,
    storage: Storage,
) -> Vec<u16> {
    let spans = (start + rows).div_ceil(span);
    let ml_at = rows * heads * spans * head_dim;
    let mut out = vec![0u16; rows * heads * head_dim];
    for r in 0..rows {
        for h in 0..heads {
            let at = (r * heads + h) * spans;
            let parts: Vec<SpanPartial> = (0..=(start + r) / span)
                .map(|z| SpanPartial {
                    m: part[ml_at + 2 * (at + z)],
                    l: part[ml_at + 2 * (at + z) + 1],
                    o: part[(at + z) * head_dim..(at + z + 1) * head_dim].to_vec(),
                })
                .collect();
            out[(r * heads + h) * head_dim..][..head_dim]
                .copy_from_slice(&flash_fold(&parts, storage));
        }
    }
    out
}

/// `kvs_attention_flash_*` unsplit: each row's spans computed and folded one
/// after another. Output as [`attention`]; bit-identical to
/// [`flash_partials`] + [`flash_combine`] and independent of how the rows are
/// cut into launches.
#[allow(clippy::too_many_arguments)]
pub fn attention_spans(
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
    span: usize,
    storage: Storage,
) -> Vec<u16> {
    let hd = map.head_dim;
    let mut out = vec![0u16; rows * heads * hd];
    for r in 0..rows {
        let qpos = start + r;
        for h in 0..heads {
            let qf = flash_q(&q[r * q_stride + h * hd..][..hd], scale);
            let parts: Vec<SpanPartial> = (0..=qpos / span)
                .map(|z| flash_span_partial(&qf, pool, map, layer, h / group, qpos, span, z))
                .collect();
            out[(r * heads + h) * hd..][..hd].copy_from_slice(&flash_fold(&parts, storage));
        }
    }
    out
}
