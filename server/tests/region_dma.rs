//! The direct path's copy-engine option (`KVSTRATA_REGION_COPY=dma`): blocks
//! of a region whose every block is one run of its memory (one page per
//! block, laid out as a layer-major block, the GPU engine's pool) are copied
//! as whole runs instead of by the gather/scatter kernel. On the CPU backend
//! the runs are plain copies, so this checks the runs' addresses byte for
//! byte through the real daemon: puts gathered straight into HBM slots, gets
//! scattered straight from them, in a daemon whose cache runs on its CPU
//! backend (`gpu.enabled = "cpu"`), as in regions_direct.rs. Regions of other
//! layouts keep the kernel in the same process.
//!
//! Its own test binary: the choice is read from the environment once per
//! process, set here before anything else runs.

mod common;
#[path = "common/regions.rs"]
mod regions_support;

use kvstrata_gpucheck::check_pages_round_trip;
use kvstrata_kernels::{PageLayout, PagedGeometry};
use kvstrata_server::region::io::{RegionCopy, region_copy};
use regions_support::*;

#[test]
fn whole_block_runs_round_trip_byte_for_byte_with_dma_copies() {
    // SAFETY: set before any other thread of this process exists (the
    // runtime is built below), and read once.
    unsafe { std::env::set_var("KVSTRATA_REGION_COPY", "dma") };
    assert_eq!(region_copy(), RegionCopy::Dma);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let r = start_with(|c| {
            c.gpu.enabled = kvstrata_server::config::GpuMode::Cpu;
            c.gpu.hbm_bytes = bytesize::ByteSize::mib(1);
        })
        .await;
        // The GPU engine's pool: [page][layer][K|V][token][head][dim],
        // one page per block (copied as runs).
        let pool = PagedGeometry::packed(PageLayout::CrossLayer, 3, 4, 2, 8, 2, 9);
        // Pages of two blocks, and a per-layer region (the kernel's).
        for (i, (g, ppb)) in [(pool, 1), (cross_layer(), 2), (per_layer(), 2)]
            .into_iter()
            .enumerate()
        {
            let mut region = r.region(&format!("dma-{i}"), g);
            check_pages_round_trip(&r.client, &mut region, None, ppb, 4, 7000 + i as u64)
                .await
                .unwrap_or_else(|e| panic!("{:?} ppb {ppb}: {e}", g.layout));
        }
        r.stop().await;
    });
}
