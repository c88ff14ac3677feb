//! The direct path of KV regions into and out of the host tier, against a
//! real daemon: with `gpu.enabled = "cpu"` and `gpu.hbm_bytes = 0` the cache
//! runs on the CPU backend with no HBM tier (as `--gpu-hbm-bytes 0` on a
//! GPU), so every block put by page ids lands in a pinned host slot and every
//! get into pages reads one: both pass through the device staging buffers
//! (gather, hash on the device and DMA out; DMA in and scatter), the path
//! `tests/python/gpu_kv_region.py` times on a GPU.

mod common;
#[path = "common/regions.rs"]
mod regions_support;

use kvstrata_gpucheck::check_pages_round_trip;
use kvstrata_proto::v1 as pb;
use regions_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn host_tier_round_trips_byte_for_byte_through_device_staging() {
    let r = start_with(|c| {
        c.gpu.enabled = kvstrata_server::config::GpuMode::Cpu;
        c.gpu.hbm_bytes = bytesize::ByteSize::b(0);
    })
    .await;
    let s = r.stats().await;
    assert!(
        !s.tiers.iter().any(|t| t.tier == pb::Tier::Hbm as i32),
        "no HBM tier: {s:?}"
    );
    for (i, (g, ppb, blocks)) in [
        (per_layer(), 2, 3),
        (cross_layer(), 1, 5),
        (cross_layer(), 3, 1),
        (k_then_v(), 1, 6),
    ]
    .into_iter()
    .enumerate()
    {
        let mut region = r.region(&format!("host-{i}"), g);
        let report =
            check_pages_round_trip(&r.client, &mut region, None, ppb, blocks, 7000 + i as u64)
                .await
                .unwrap_or_else(|e| panic!("{:?} ppb {ppb}: {e}", g.layout));
        assert_eq!(
            report.read_back_from_hbm, 0,
            "the blocks are in the host tier"
        );
        let s = r.stats().await;
        let info = s
            .kv_regions
            .iter()
            .find(|x| x.region_id == region.id())
            .expect("region listed");
        let moved = report.blocks as u64 * report.block_bytes;
        // One put by pages, two gets into pages (per-key lists, then an
        // array answered when queued).
        assert_eq!(
            (info.bytes_gathered, info.bytes_scattered),
            (moved, 2 * moved)
        );
    }
    r.stop().await;
}
