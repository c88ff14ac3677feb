//! The metrics of what clients registered, read at scrape time: the
//! shared-memory pools ([`PoolRegistry`]) and the engines' KV regions and the
//! GPUs ([`RegionRegistry`]).

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use super::family::{Kind, family, single};
use crate::region::RegionRegistry;
use crate::shm::pool::PoolRegistry;

/// Shared-memory pools, read from the [`PoolRegistry`] at scrape time.
#[derive(Debug)]
pub(super) struct PoolCollector {
    pub(super) pools: Arc<PoolRegistry>,
}

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.pools.stats();
        single(
            &mut encoder,
            Kind::Gauge,
            "kvstrata_pools",
            "Shared-memory pools registered now",
            s.pools as u64,
        )?;
        single(
            &mut encoder,
            Kind::Gauge,
            "kvstrata_pool_bytes",
            "Bytes of the shared-memory pools mapped now",
            s.bytes,
        )?;
        family(
            &mut encoder,
            Kind::Counter,
            "kvstrata_pool_registrations",
            "Pool registrations on the mempool socket, by result",
            "result",
            &[("ok", s.registered), ("refused", s.refused)],
        )?;
        single(
            &mut encoder,
            Kind::Counter,
            "kvstrata_pools_unsealed",
            "Pools registered without a shrink seal (a client truncating one would fault the daemon)",
            s.unsealed,
        )?;
        single(
            &mut encoder,
            Kind::Counter,
            "kvstrata_pool_unknown_ids",
            "Requests naming a pool id not registered in this daemon run (closed, or kept across a restart)",
            s.unknown_ids,
        )
    }
}

/// KV regions and GPUs, read from the [`RegionRegistry`] at scrape time.
#[derive(Debug)]
pub struct RegionCollector {
    regions: Arc<RegionRegistry>,
}

impl RegionCollector {
    pub fn new(regions: Arc<RegionRegistry>) -> Self {
        RegionCollector { regions }
    }
}

impl Collector for RegionCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.regions.stats();
        single(
            &mut encoder,
            Kind::Gauge,
            "kvstrata_gpus",
            "GPUs the daemon uses (0: none found, or gpu.enabled = off)",
            self.regions.gpus().devices.len() as u64,
        )?;
        single(
            &mut encoder,
            Kind::Gauge,
            "kvstrata_kv_regions",
            "KV regions (engines' paged KV memory) registered now",
            s.regions as u64,
        )?;
        single(
            &mut encoder,
            Kind::Gauge,
            "kvstrata_kv_region_bytes",
            "Bytes of the KV regions registered now",
            s.bytes,
        )?;
        single(
            &mut encoder,
            Kind::Counter,
            "kvstrata_kv_region_registrations",
            "KV regions registered on the region socket",
            s.registered,
        )?;
        family(
            &mut encoder,
            Kind::Counter,
            "kvstrata_kv_regions_refused",
            "KV region registrations refused, by reason",
            "reason",
            &s.refused,
        )?;
        single(
            &mut encoder,
            Kind::Counter,
            "kvstrata_kv_region_gathered_bytes",
            "Block bytes gathered out of KV-region pages (puts)",
            s.gathered,
        )?;
        single(
            &mut encoder,
            Kind::Counter,
            "kvstrata_kv_region_scattered_bytes",
            "Block bytes scattered into KV-region pages (gets)",
            s.scattered,
        )?;
        single(
            &mut encoder,
            Kind::Counter,
            "kvstrata_kv_region_unknown_ids",
            "Requests naming a KV region id not registered in this daemon run (closed, or kept across a restart)",
            s.unknown_ids,
        )?;
        single(
            &mut encoder,
            Kind::Counter,
            "kvstrata_kv_region_answered_before_copies",
            "Gets into KV pages answered once their copies were queued, before they completed (answer_when_queued)",
            s.answered_before_copies,
        )?;
        single(
            &mut encoder,
            Kind::Counter,
            "kvstrata_kv_region_failed_after_answer",
            "Gets into KV pages whose copies failed after an answer before their completion (a device fault; logged as an error)",
            s.failed_after_answer,
        )
    }
}
