//! The GPU engine's forward pass, as its CPU reference runs it
//! (`kvstrata_engine::cuda::reference::forward`: the kernels' references in the
//! order the GPU runs them, 16-bit weights and matrix-product inputs), against
//! the CPU engine (candle) on the same synthetic weights. Needs no GPU: this is
//! how CI checks the GPU pass's composition (fused projections, rotary
//! convention, page layout, grouped heads); `kvstrata gpu-check` then compares
//! the GPU with the same reference.

use half::f16;
use kvstrata_engine::cuda::Storage;
use kvstrata_engine::cuda::reference::{self, HostKv, RopeTables};
use kvstrata_engine::kv::{KvGeometry, PagedKv};
use kvstrata_engine::model::{argmax, max_abs_diff};
use kvstrata_engine::synthetic::SyntheticModel;

const BLOCK: usize = 5;

fn geometry(m: &SyntheticModel) -> KvGeometry {
    KvGeometry {
        num_layers: m.config.num_layers,
        num_kv_heads: m.config.num_kv_heads,
        head_dim: m.config.head_dim,
        block_tokens: BLOCK,
    }
}

/// Prompt logits and `steps` greedy tokens of both, and the largest logit
/// difference seen; also checks that the pages hold the same K/V (to f16 and
/// activation rounding).
fn compare(storage: Storage, logit_tol: f32, kv_tol: f32) {
    let m = SyntheticModel::preset("tiny", 11).unwrap();
    let cpu = m.cpu_model(storage).unwrap();
    let weights = m.host_weights(storage).unwrap();
    let tables = RopeTables::new(m.config.head_dim, m.config.rope_theta, 64);
    let prompt = m.prompt(17, 1);

    let mut kv_cpu = PagedKv::new(geometry(&m)).unwrap();
    let mut kv_ref = HostKv::new(&m.config, BLOCK);
    let mut a = cpu.forward(&prompt, &mut kv_cpu).unwrap();
    let mut b = reference::forward(&m.config, &weights, &tables, &prompt, &mut kv_ref);
    let mut worst = max_abs_diff(&a, &b);
    let spread = a.iter().fold(0f32, |s, v| s.max(v.abs()));
    assert!(spread > 0.5, "logits too flat to compare: {spread}");
    let mut tokens = (Vec::new(), Vec::new());
    for _ in 0..6 {
        let (ta, tb) = (argmax(&a), argmax(&b));
        tokens.0.push(ta);
        tokens.1.push(tb);
        a = cpu.forward(&[ta], &mut kv_cpu).unwrap();
        b = reference::forward(&m.config, &weights, &tables, &[tb], &mut kv_ref);
        worst = worst.max(max_abs_diff(&a, &b));
    }
    eprintln!("{storage:?}: largest logit difference {worst} (logits span ±{spread})");
    assert_eq!(tokens.0, tokens.1, "greedy tokens differ");
    assert!(worst <= logit_tol, "logits differ by {worst}");

    // Same positions, layers and heads in the same places of every full page.
    assert_eq!(kv_cpu.len(), kv_ref.len);
    for p in 0..kv_cpu.full_pages() {
        let x: &[f16] = bytemuck::cast_slice(kv_cpu.page_bytes(p).unwrap());
        let y: &[f16] = bytemuck::cast_slice(kv_ref.page_bytes(p));
        assert_eq!(x.len(), y.len());
        for (i, (u, v)) in x.iter().zip(y).enumerate() {
            let (u, v) = (u.to_f32(), v.to_f32());
            assert!(
                (u - v).abs() <= kv_tol * (1.0 + u.abs()),
                "page {p} value {i}: {u} vs {v}"
            );
        }
    }
}

#[test]
fn reference_forward_matches_the_cpu_engine_bf16() {
    compare(Storage::Bf16, 0.1, 0.05);
}

#[test]
fn reference_forward_matches_the_cpu_engine_f16() {
    compare(Storage::F16, 0.02, 0.01);
}

/// A cached prefix (pages computed by an earlier pass) gives bit-identical
/// last-position logits to computing everything at once, in the reference.
#[test]
fn reference_cached_prefix_equals_recompute() {
    let m = SyntheticModel::preset("tiny", 12).unwrap();
    let w = m.host_weights(Storage::Bf16).unwrap();
    let tables = RopeTables::new(m.config.head_dim, m.config.rope_theta, 64);
    let prompt = m.prompt(23, 2);
    let mut full = HostKv::new(&m.config, BLOCK);
    let want = reference::forward(&m.config, &w, &tables, &prompt, &mut full);
    for split in [1, 5, 10, 22] {
        let mut kv = HostKv::new(&m.config, BLOCK);
        reference::forward(&m.config, &w, &tables, &prompt[..split], &mut kv);
        let got = reference::forward(&m.config, &w, &tables, &prompt[split..], &mut kv);
        assert_eq!(got, want, "split at {split}");
        for p in 0..prompt.len() / BLOCK {
            assert_eq!(
                kv.page_bytes(p),
                full.page_bytes(p),
                "page {p}, split {split}"
            );
        }
    }
}
