//! The CPU reference of the flash attention kernel (`kvs_attention_flash_*`,
//! `kvs_attention_combine_*` in engine/cuda/attention.cu): keys in fixed spans
//! at absolute positions, one online-softmax partial per span, folded in span
//! order. It agrees with the plain two-pass reference to rounding, and a row's
//! result is bit-identical whether the spans are folded in one pass or written
//! as partials and combined, and however the rows are cut into launches: the
//! property that keeps a cached prefix's logits bit-identical to a recompute's.

use half::f16;
use kvstrata_engine::cuda::Storage;
use kvstrata_engine::cuda::reference::{
    PageMap, attention, attention_spans, flash_combine, flash_partials, from_storage,
};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// A pool of shuffled pages holding K/V of `total` positions of layer 1, and
/// random q rows (`stride` apart, one column past the heads).
struct Case {
    pool: Vec<u16>,
    pages: Vec<u32>,
    q: Vec<f32>,
    stride: usize,
    heads: usize,
    group: usize,
    kv_heads: usize,
    head_dim: usize,
    block_tokens: usize,
    page_elems: usize,
}

impl Case {
    fn new(seed: u64, kv_heads: usize, group: usize, head_dim: usize, total: usize) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let (layers, block_tokens) = (2usize, 5usize);
        let page_elems = layers * 2 * block_tokens * kv_heads * head_dim;
        let n_pages = total.div_ceil(block_tokens);
        let mut pages: Vec<u32> = (0..n_pages as u32 + 2).collect();
        for i in (1..pages.len()).rev() {
            let j = rng.random_range(0..=i);
            pages.swap(i, j);
        }
        pages.truncate(n_pages);
        let pool = (0..(n_pages + 2) * page_elems)
            .map(|_| f16::from_f32(rng.random_range(-1.0..1.0)).to_bits())
            .collect();
        let heads = kv_heads * group;
        let stride = heads * head_dim + 1;
        let q = (0..total * stride)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        Case {
            pool,
            pages,
            q,
            stride,
            heads,
            group,
            kv_heads,
            head_dim,
            block_tokens,
            page_elems,
        }
    }

    fn map(&self) -> PageMap<'_> {
        PageMap {
            pages: &self.pages,
            block_tokens: self.block_tokens,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            page_elems: self.page_elems,
        }
    }

    /// q rows of positions `start..start + rows` (row i of `q` is position i).
    fn q_at(&self, start: usize) -> &[f32] {
        &self.q[start * self.stride..]
    }

    fn spans(&self, rows: usize, start: usize, span: usize, s: Storage) -> Vec<u16> {
        let map = self.map();
        attention_spans(
            self.q_at(start),
            self.stride,
            &self.pool,
            &map,
            1,
            self.heads,
            self.group,
            rows,
            start,
            0.3,
            span,
            s,
        )
    }

    fn split(&self, rows: usize, start: usize, span: usize, s: Storage) -> Vec<u16> {
        let map = self.map();
        let part = flash_partials(
            self.q_at(start),
            self.stride,
            &self.pool,
            &map,
            1,
            self.heads,
            self.group,
            rows,
            start,
            0.3,
            span,
        );
        flash_combine(&part, rows, self.heads, self.head_dim, start, span, s)
    }
}

#[test]
fn spans_agree_with_the_two_pass_reference() {
    for (seed, kv_heads, group, hd) in [(1u64, 3usize, 2usize, 32usize), (2, 2, 4, 64)] {
        let case = Case::new(seed, kv_heads, group, hd, 300);
        let map = case.map();
        for s in [Storage::Bf16, Storage::F16] {
            for span in [64usize, 128, 256] {
                let (rows, start) = (40usize, 260usize);
                let got = case.spans(rows, start, span, s);
                let want = attention(
                    case.q_at(start),
                    case.stride,
                    &case.pool,
                    &map,
                    1,
                    case.heads,
                    case.group,
                    rows,
                    start,
                    0.3,
                    s,
                );
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| {
                        let (a, b) = (from_storage(*a, s), from_storage(*b, s));
                        (a - b).abs() / (1.0 + b.abs())
                    })
                    .fold(0f32, f32::max);
                // q and the probabilities go through f16 on the tensor cores.
                assert!(
                    worst < 1e-2,
                    "{s:?} hd {hd} span {span}: differs by {worst}"
                );
                // And the reference is not trivially close: other scales differ.
                let other = attention(
                    case.q_at(start),
                    case.stride,
                    &case.pool,
                    &map,
                    1,
                    case.heads,
                    case.group,
                    rows,
                    start,
                    0.6,
                    s,
                );
                assert_ne!(got, other);
            }
        }
    }
}

#[test]
fn split_and_combine_equal_the_one_pass_fold_bit_for_bit() {
    let case = Case::new(3, 3, 2, 32, 330);
    for s in [Storage::Bf16, Storage::F16] {
        for span in [64usize, 192] {
            for (rows, start) in [(1usize, 329usize), (7, 200), (60, 0), (130, 190)] {
                assert_eq!(
                    case.split(rows, start, span, s),
                    case.spans(rows, start, span, s),
                    "{s:?} span {span}: {rows} rows at {start}"
                );
            }
        }
    }
}

#[test]
fn a_rows_result_does_not_depend_on_the_launch_it_is_in() {
    let case = Case::new(4, 2, 4, 64, 320);
    let span = 64;
    let s = Storage::Bf16;
    let (hd, heads) = (case.head_dim, case.heads);
    let row_len = heads * hd;
    // All 320 rows at once (one pass), vs chunks of various sizes, some split.
    let whole = case.spans(320, 0, span, s);
    let mut at = 0;
    for (i, n) in [1usize, 63, 64, 5, 100, 87].into_iter().enumerate() {
        let got = if i % 2 == 0 {
            case.split(n, at, span, s)
        } else {
            case.spans(n, at, span, s)
        };
        assert_eq!(
            got,
            whole[at * row_len..(at + n) * row_len],
            "{n} rows at {at}"
        );
        at += n;
    }
    assert_eq!(at, 320);
    // The last row alone (a decode step over a cached prefix).
    assert_eq!(
        case.split(1, 319, span, s),
        whole[319 * row_len..],
        "the last row alone"
    );
}
