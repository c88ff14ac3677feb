//! The GPU engine's view of kvstrata: its KV pool registered with the daemon
//! as a CUDA-IPC KV region, blocks stored and loaded by page ids.
//!
//! [`GpuKvStore::open`] registers the pool's one `cuMemAlloc` allocation on
//! the daemon's region socket (`cuIpcGetMemHandle`, through
//! `kvstrata_client::KvRegion::register_cuda_ipc`) with the pool's
//! [`region_geometry`]: cross-layer pages of `block_tokens` tokens, so a page
//! is exactly one layer-major block of the model's namespace. Then:
//!
//! - a store is a `BatchPut` naming page ids ([`plan_store`]): the daemon
//!   gathers the blocks straight from the engine's pages into its HBM tier (or
//!   its page-locked host tier);
//! - a load is a `BatchGet` naming fresh pages of the sequence
//!   ([`GpuSequence::reserve_blocks`]): the daemon scatters the blocks it has
//!   into them; the leading run found ([`found_prefix`]) becomes the
//!   sequence's prefix, the other pages go back to the pool.
//!
//! No KV byte travels through gRPC or the engine's host memory on this path.
//! When the region cannot be registered (no region socket given, a daemon
//! without a GPU, a refused or failed registration), the store falls back to
//! the CPU engine's path ([`BlockStore`]: a shared-memory pool when a mempool
//! socket is given, else inline bytes), copying pages through host memory, and
//! [`GpuKvStore::path_note`] says why in one line ([`choose_path`]).

use std::sync::Arc;
use std::time::Instant;

use kvstrata_client::{BlockHash, Client, KvRegion, PagesFound, PagesPutItem, proto};
use kvstrata_types::NamespaceSpec;

use super::device::PeerEvent;
use super::kv::{GpuKvPool, GpuSequence};
use crate::error::{EngineError, Result};
use crate::store::{BlockPages, BlockStore, LoadReport, StoreReport};

/// Blocks per `BatchPut` / `BatchGet` by page ids (no payload travels, so
/// requests are large: fewer round trips), or the daemon's `max_batch`
/// (`Client::max_batch`) when that is smaller.
pub const PAGES_PER_REQUEST: usize = 1024;

/// A load is split over several requests in flight only when each gets at
/// least this many blocks.
const MIN_PIPELINED_BLOCKS: usize = 32;

/// The most requests a load keeps in flight (`KVSTRATA_LOAD_PIPELINE`).
pub const MAX_LOAD_PIPELINE: usize = 8;

/// Requests in flight per load from the HBM tier: `KVSTRATA_LOAD_PIPELINE`
/// (1 to [`MAX_LOAD_PIPELINE`]), else [`DEFAULT_LOAD_PIPELINE`]
/// (docs/engine.md, "KV through the daemon's GPU path").
fn load_pipeline() -> usize {
    load_pipeline_from(std::env::var("KVSTRATA_LOAD_PIPELINE").ok().as_deref())
}

/// Requests in flight per load from the HBM tier unless
/// `KVSTRATA_LOAD_PIPELINE` says otherwise: one, since the daemon overlaps
/// a request's own HBM lookups with its scatters; several requests side by
/// side made each one's lookups slower than that saved (measured:
/// docs/benchmarks.md, "One request per HBM-tier load").
pub const DEFAULT_LOAD_PIPELINE: usize = 1;

/// Requests in flight from a setting: a whole number from 1, at most
/// [`MAX_LOAD_PIPELINE`]; anything else gives [`DEFAULT_LOAD_PIPELINE`].
fn load_pipeline_from(setting: Option<&str>) -> usize {
    setting
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .map_or(DEFAULT_LOAD_PIPELINE, |n| n.min(MAX_LOAD_PIPELINE))
}

/// Whether a lookup placed each of the first `blocks` blocks in the HBM tier.
fn all_in_hbm(tiers: &[proto::Tier], blocks: usize) -> bool {
    blocks > 0 && tiers.len() >= blocks && tiers[..blocks].iter().all(|t| *t == proto::Tier::Hbm)
}

/// Blocks per request of a load of `blocks` blocks with `in_flight`
/// requests at a time: the load cut into `in_flight` near-equal requests
/// (none under [`MIN_PIPELINED_BLOCKS`] blocks, none over
/// [`PAGES_PER_REQUEST`]).
fn load_request_blocks(blocks: usize, in_flight: usize) -> usize {
    let parts = in_flight.min(blocks / MIN_PIPELINED_BLOCKS).max(1);
    blocks.div_ceil(parts).clamp(1, PAGES_PER_REQUEST)
}

/// Blocks per `BatchPut` of a store: [`PAGES_PER_REQUEST`], or
/// `KVSTRATA_STORE_CHUNK_BLOCKS` (1 to [`PAGES_PER_REQUEST`]). Shorter
/// requests let a decode on the same GPU run between them (the daemon's
/// copies run in another CUDA context, which the GPU time-slices with the
/// engine's): docs/gpu.md, "Decode interference".
fn store_request_blocks() -> usize {
    request_blocks(std::env::var("KVSTRATA_STORE_CHUNK_BLOCKS").ok().as_deref())
}

/// Blocks per request from a setting: a whole number from 1, at most
/// [`PAGES_PER_REQUEST`]; anything else (none, 0, not a number) gives
/// [`PAGES_PER_REQUEST`].
fn request_blocks(setting: Option<&str>) -> usize {
    setting
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .map_or(PAGES_PER_REQUEST, |n| n.min(PAGES_PER_REQUEST))
}

/// The longest a load waits for the daemon's copies after it answered: a
/// request's copies take milliseconds; an event that does not complete means
/// a daemon that died with its copies queued (then the load fails).
const READY_WAIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether loads let the daemon answer once its copies are queued, then wait
/// on the region's event (`KVSTRATA_ANSWER_WHEN_QUEUED`: on unless `0`,
/// `off` or `false`; docs/engine.md).
fn answer_when_queued() -> bool {
    answer_when_queued_from(std::env::var("KVSTRATA_ANSWER_WHEN_QUEUED").ok().as_deref())
}

fn answer_when_queued_from(setting: Option<&str>) -> bool {
    !matches!(
        setting.map(|v| v.trim().to_ascii_lowercase()).as_deref(),
        Some("0" | "off" | "false")
    )
}

/// Blocks in the shared-memory pool of the fallback path.
const FALLBACK_POOL_BLOCKS: usize = crate::store::BLOCKS_PER_BATCH;

/// How blocks move between the engine's pages and the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KvPath {
    /// By page ids in the registered CUDA-IPC region: the daemon's GPU copies.
    GpuPages,
    /// Through a shared-memory pool and the engine's host memory.
    SharedMemory,
    /// Inline in the gRPC messages, through the engine's host memory.
    Inline,
}

impl KvPath {
    pub fn name(self) -> &'static str {
        match self {
            KvPath::GpuPages => "gpu-pages",
            KvPath::SharedMemory => "shared-memory",
            KvPath::Inline => "inline",
        }
    }
}

/// Where the GPU engine's blocks go.
#[derive(Debug, Clone, Default)]
pub struct GpuKvOptions {
    /// The daemon's KV-region socket (`--kv-region-socket`); `None`: no GPU path.
    pub region_socket: Option<String>,
    /// The daemon's mempool socket, for the fallback path.
    pub mempool_socket: Option<String>,
}

/// What registering the region gave ([`choose_path`]'s input).
#[derive(Debug)]
pub enum RegionAttempt<R> {
    /// No region socket was given.
    NotTried,
    Registered(R),
    /// Registration failed: why (one line).
    Failed(String),
}

/// The path chosen, the region to keep (if any), and the one line to say
/// when it is not the GPU path.
#[derive(Debug)]
pub struct PathChoice<R> {
    pub path: KvPath,
    pub region: Option<R>,
    pub note: Option<String>,
}

/// The fallback decision: the GPU path when the region is registered, else
/// shared memory (with a mempool socket) or inline bytes, with a note saying
/// why.
pub fn choose_path<R>(attempt: RegionAttempt<R>, mempool: bool) -> PathChoice<R> {
    let fallback = if mempool {
        KvPath::SharedMemory
    } else {
        KvPath::Inline
    };
    let how = match fallback {
        KvPath::SharedMemory => "through shared memory",
        _ => "inline in gRPC messages",
    };
    match attempt {
        RegionAttempt::Registered(r) => PathChoice {
            path: KvPath::GpuPages,
            region: Some(r),
            note: None,
        },
        RegionAttempt::NotTried => PathChoice {
            path: fallback,
            region: None,
            note: Some(format!(
                "KV moves {how} and host memory: no KV-region socket given (the daemon's --kv-region-socket)"
            )),
        },
        RegionAttempt::Failed(why) => PathChoice {
            path: fallback,
            region: None,
            note: Some(format!(
                "KV moves {how} and host memory: the GPU path is not available ({why})"
            )),
        },
    }
}

/// The `BatchPut`s of a store by page ids: blocks `from..end` of a sequence
/// whose pages are `page_ids` (position order), keyed by `keys` (its chain),
/// each naming the previous key as its parent, `per_request` blocks a request.
pub fn plan_store(
    keys: &[BlockHash],
    page_ids: &[u32],
    from: usize,
    end: usize,
    region_id: u64,
    per_request: usize,
) -> Vec<Vec<PagesPutItem>> {
    let end = end.min(keys.len()).min(page_ids.len());
    let items: Vec<PagesPutItem> = (from..end)
        .map(|i| {
            let pages = proto::KvPages {
                region_id,
                page_ids: vec![page_ids[i]],
            };
            let item = PagesPutItem::new(bytes::Bytes::copy_from_slice(&keys[i]), pages);
            match i {
                0 => item,
                _ => item.with_parent(bytes::Bytes::copy_from_slice(&keys[i - 1])),
            }
        })
        .collect();
    items
        .chunks(per_request.max(1))
        .map(<[PagesPutItem]>::to_vec)
        .collect()
}

/// The leading run of found blocks of a `BatchGet` into pages and their
/// tiers. A block the daemon could not write into its pages (a failed key)
/// is an error: its pages may be partly written.
pub fn found_prefix(found: &PagesFound) -> Result<(usize, Vec<proto::Tier>)> {
    if let Some((i, e)) = found.failed.first() {
        return Err(EngineError::Kv(format!(
            "the daemon could not write block {i} into the engine's pages: {e}"
        )));
    }
    let tiers: Vec<proto::Tier> = found.tiers.iter().map_while(|t| *t).collect();
    Ok((tiers.len(), tiers))
}

fn count_put(resp: &proto::BatchPutResponse, report: &mut StoreReport) -> Result<()> {
    for r in &resp.results {
        match proto::PutStatus::try_from(*r) {
            Ok(proto::PutStatus::Stored) => report.stored += 1,
            Ok(proto::PutStatus::NoSpace) => report.no_space += 1,
            other => {
                return Err(EngineError::Kv(format!(
                    "the daemon refused a block stored by page ids: {other:?}"
                )));
            }
        }
    }
    Ok(())
}

/// A GPU sequence's pages through host memory, for the fallback path.
impl BlockPages for GpuSequence {
    fn block_bytes(&self) -> usize {
        self.pool().geometry().block_bytes()
    }

    fn full_pages(&self) -> usize {
        GpuSequence::full_pages(self)
    }

    fn page_bytes(&self, index: usize) -> Result<std::borrow::Cow<'_, [u8]>> {
        Ok(std::borrow::Cow::Owned(GpuSequence::page_bytes(
            self, index,
        )?))
    }

    fn push_block(&mut self, payload: &[u8]) -> Result<()> {
        Ok(GpuSequence::push_block(self, payload)?)
    }
}

/// One model's namespace on one daemon, for a GPU engine's pool.
pub struct GpuKvStore {
    store: BlockStore,
    region: Option<KvRegion>,
    path: KvPath,
    note: Option<String>,
    pool: Arc<GpuKvPool>,
    /// The daemon's ready event of the region, opened on the first answer
    /// that names it.
    ready_event: std::sync::Mutex<Option<Box<PeerEvent>>>,
}

impl std::fmt::Debug for GpuKvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuKvStore")
            .field("store", &self.store)
            .field("region", &self.region.as_ref().map(KvRegion::id))
            .field("path", &self.path)
            .finish()
    }
}

impl GpuKvStore {
    /// Registers `pool` as a CUDA-IPC KV region on `options.region_socket`
    /// (once; it stays registered while this store lives) and `spec` as the
    /// namespace; falls back to [`BlockStore`]'s path when the region cannot
    /// be registered ([`GpuKvStore::path_note`] says why).
    pub async fn open(
        client: Client,
        spec: NamespaceSpec,
        pool: Arc<GpuKvPool>,
        options: &GpuKvOptions,
    ) -> Result<Self> {
        let attempt = match &options.region_socket {
            None => RegionAttempt::NotTried,
            Some(socket) => match register(&pool, socket).await {
                Ok(r) => RegionAttempt::Registered(r),
                Err(e) => RegionAttempt::Failed(e.to_string()),
            },
        };
        let choice = choose_path(attempt, options.mempool_socket.is_some());
        let mempool = match choice.path {
            KvPath::SharedMemory => options.mempool_socket.as_deref(),
            _ => None,
        };
        let store = BlockStore::open(
            client,
            spec,
            *pool.geometry(),
            mempool,
            FALLBACK_POOL_BLOCKS,
        )
        .await?;
        Ok(GpuKvStore {
            store,
            region: choice.region,
            path: choice.path,
            note: choice.note,
            pool,
            ready_event: std::sync::Mutex::new(None),
        })
    }

    /// How blocks move.
    pub fn path(&self) -> KvPath {
        self.path
    }

    /// Why the GPU path is not used (one line), when it is not.
    pub fn path_note(&self) -> Option<&str> {
        self.note.as_deref()
    }

    /// The registered region's id (GPU path only).
    pub fn region_id(&self) -> Option<u64> {
        self.region.as_ref().map(KvRegion::id)
    }

    /// The namespace, keys and lookups ([`BlockStore`]).
    pub fn block_store(&self) -> &BlockStore {
        &self.store
    }

    /// The chained keys of every full block of `tokens`.
    pub fn keys(&self, tokens: &[u32]) -> Vec<BlockHash> {
        self.store.keys(tokens)
    }

    /// How many leading `keys` are cached, and in which tier.
    pub async fn lookup(&self, keys: &[BlockHash]) -> Result<(usize, Vec<proto::Tier>)> {
        self.store.lookup(keys).await
    }

    /// Appends the blocks of `keys` to `seq`, in order, stopping at the first
    /// one the daemon does not have (the caller recomputes from there).
    pub async fn load(&self, keys: &[BlockHash], seq: &mut GpuSequence) -> Result<LoadReport> {
        self.load_from(keys, &[], seq).await
    }

    /// [`GpuKvStore::load`] of blocks a lookup just placed in `tiers` (one
    /// per key; empty: not known). Blocks all in the daemon's HBM tier may be
    /// loaded with several requests in flight ([`load_pipeline`], one by
    /// default); from the other tiers the daemon's copies go through its
    /// staging buffers and PCIe, which concurrent requests only share, so
    /// always one request at a time.
    pub async fn load_from(
        &self,
        keys: &[BlockHash],
        tiers: &[proto::Tier],
        seq: &mut GpuSequence,
    ) -> Result<LoadReport> {
        let Some(region) = &self.region else {
            return self.store.load(keys, seq).await;
        };
        self.check_pool(seq)?;
        let started = Instant::now();
        let pages = seq.reserve_blocks(keys.len())?;
        let mut report = LoadReport::default();
        let in_flight = match all_in_hbm(tiers, keys.len()) {
            true => load_pipeline(),
            false => 1,
        };
        let loaded = self
            .load_pages(region, keys, &pages, in_flight, &mut report.tiers)
            .await;
        // Whatever happened, only the leading run found counts.
        seq.keep_loaded(report.tiers.len());
        loaded?;
        report.blocks = report.tiers.len();
        report.elapsed = started.elapsed();
        Ok(report)
    }

    async fn load_pages(
        &self,
        region: &KvRegion,
        keys: &[BlockHash],
        pages: &[u32],
        in_flight: usize,
        tiers: &mut Vec<proto::Tier>,
    ) -> Result<()> {
        // With several requests in flight the daemon parses and looks up
        // one while the copies of another run (a request's own work is a
        // fixed cost that would otherwise add to every load); the region's
        // copies run in order on its stream.
        let in_flight = in_flight.max(1);
        // Never more than the daemon takes in one request (a daemon
        // configured below PAGES_PER_REQUEST).
        let per_request =
            load_request_blocks(keys.len(), in_flight).min(self.store.client().max_batch());
        let requests: Vec<(&[BlockHash], &[u32])> = keys
            .chunks(per_request)
            .zip(pages.chunks(per_request))
            .collect();
        let when_queued = answer_when_queued();
        // One request at a time: each goes as a region call on the region's
        // own connection (the daemon's thread for it reads the next call
        // only once a call's copies complete, so requests in flight go over
        // gRPC, where one's lookups overlap another's copies).
        let by_call = in_flight == 1 || requests.len() == 1;
        for wave in requests.chunks(in_flight) {
            let results = futures_util::future::join_all(
                wave.iter()
                    .map(|(k, p)| self.load_request(region, k, p, when_queued, by_call)),
            )
            .await;
            // Answered before the daemon's copies completed: wait for them
            // (the event's latest record follows every copy of the wave).
            let mut event = None;
            for found in results.iter().flatten() {
                event = found.ready_event.or(event);
            }
            if let Some(handle) = event {
                self.wait_ready(&handle)?;
            }
            // Only the leading run found counts: a request's blocks only
            // when every request before it found all of its own.
            for (results, wanted) in results.into_iter().zip(wave) {
                let (found, t) = found_prefix(&results?)?;
                tiers.extend(t);
                if found < wanted.0.len() {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Waits for the copies before the latest record of the daemon's event
    /// `handle` (opened once, and again if the daemon names another).
    fn wait_ready(&self, handle: &[u8; 64]) -> Result<()> {
        let began = Instant::now();
        let mut cached = self
            .ready_event
            .lock()
            .map_err(|_| EngineError::Kv("the region's ready event lock was poisoned".into()))?;
        if cached.as_ref().is_none_or(|e| e.handle() != handle) {
            *cached = Some(Box::new(self.pool.device().open_ipc_event(handle)?));
        }
        if let Some(event) = cached.as_ref() {
            event.wait_within(READY_WAIT_LIMIT)?;
        }
        tracing::debug!(
            wait_us = began.elapsed().as_micros() as u64,
            "KV region load: waited for the daemon's copies (answered when queued)"
        );
        Ok(())
    }

    /// One `BatchGet` of `keys` into `pages` (one page per block); `by_call`:
    /// as a region call when the daemon serves them.
    async fn load_request(
        &self,
        region: &KvRegion,
        keys: &[BlockHash],
        pages: &[u32],
        when_queued: bool,
        by_call: bool,
    ) -> Result<PagesFound> {
        let began = Instant::now();
        let ns = self.store.namespace_id();
        let client = self.store.client();
        // One page per block: the page ids as one array (no message per key).
        let results = match (by_call, when_queued) {
            (true, _) => {
                client
                    .get_page_ids_on(region, ns, keys, pages, when_queued)
                    .await?
            }
            (false, true) => {
                client
                    .get_page_ids_when_queued(ns, keys, region.id(), pages)
                    .await?
            }
            (false, false) => client.get_page_ids(ns, keys, region.id(), pages).await?,
        };
        tracing::debug!(
            blocks = keys.len(),
            request_us = began.elapsed().as_micros() as u64,
            "KV region load: one BatchGet by page ids"
        );
        Ok(results)
    }

    /// Stores full pages `from..` of `seq` under `keys` (the chain of the
    /// sequence `seq` holds), each naming the previous key as its parent.
    pub async fn store(
        &self,
        seq: &GpuSequence,
        keys: &[BlockHash],
        from: usize,
    ) -> Result<StoreReport> {
        let Some(region) = &self.region else {
            return self.store.store(seq, keys, from).await;
        };
        self.check_pool(seq)?;
        let started = Instant::now();
        // The daemon's gather reads the pages: the engine's writes must be done.
        seq.pool().device().synchronize()?;
        let mut report = StoreReport::default();
        let ns = self.store.namespace_id();
        for items in plan_store(
            keys,
            seq.page_ids(),
            from,
            seq.full_pages(),
            region.id(),
            store_request_blocks().min(self.store.client().max_batch()),
        ) {
            let began = Instant::now();
            let blocks = items.len();
            let resp = self.store.client().put_pages_on(region, ns, items).await?;
            tracing::debug!(
                blocks,
                request_us = began.elapsed().as_micros() as u64,
                "KV region store: one BatchPut by page ids"
            );
            count_put(&resp, &mut report)?;
        }
        report.elapsed = started.elapsed();
        Ok(report)
    }

    fn check_pool(&self, seq: &GpuSequence) -> Result<()> {
        if Arc::ptr_eq(seq.pool(), &self.pool) {
            Ok(())
        } else {
            Err(EngineError::Kv(
                "the sequence's pages are not in the pool registered with the daemon".into(),
            ))
        }
    }
}

/// Registers `pool` on the region socket (a short blocking exchange, run off
/// the async workers).
async fn register(pool: &Arc<GpuKvPool>, socket: &str) -> Result<KvRegion> {
    let handle = pool.ipc_handle()?;
    let geometry = pool.paged_geometry();
    let bytes = pool.memory().bytes() as u64;
    let device = pool.device().info().ordinal as u32;
    let socket = socket.to_string();
    // One region per pool: several engines of one process register several.
    static REGIONS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = REGIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("kvstrata-gpu-engine-{}-{n}", std::process::id());
    tokio::task::spawn_blocking(move || {
        KvRegion::register_cuda_ipc(&socket, &name, handle, device, bytes, geometry)
    })
    .await
    .map_err(|e| EngineError::Kv(format!("region registration task: {e}")))?
    .map_err(EngineError::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::kv::region_geometry;
    use crate::kv::KvGeometry;

    fn keys(n: usize) -> Vec<BlockHash> {
        (0..n).map(|i| [i as u8 + 1; 16]).collect()
    }

    #[test]
    fn answers_when_queued_unless_turned_off() {
        assert!(answer_when_queued_from(None));
        assert!(answer_when_queued_from(Some("1")));
        for off in ["0", "off", "OFF", " false "] {
            assert!(!answer_when_queued_from(Some(off)), "{off}");
        }
    }

    #[test]
    fn store_request_sizes_come_from_the_setting_within_bounds() {
        assert_eq!(request_blocks(None), PAGES_PER_REQUEST);
        assert_eq!(request_blocks(Some("32")), 32);
        assert_eq!(request_blocks(Some(" 8 ")), 8);
        assert_eq!(request_blocks(Some("0")), PAGES_PER_REQUEST);
        assert_eq!(request_blocks(Some("many")), PAGES_PER_REQUEST);
        assert_eq!(request_blocks(Some("100000")), PAGES_PER_REQUEST);
    }

    #[test]
    fn loads_keep_the_requests_in_flight_the_setting_asks_for() {
        assert_eq!(load_pipeline_from(None), DEFAULT_LOAD_PIPELINE);
        assert_eq!(load_pipeline_from(Some("4")), 4);
        assert_eq!(load_pipeline_from(Some("0")), DEFAULT_LOAD_PIPELINE);
        assert_eq!(load_pipeline_from(Some("two")), DEFAULT_LOAD_PIPELINE);
        assert_eq!(load_pipeline_from(Some("64")), MAX_LOAD_PIPELINE);
        // 511 blocks (an 8k prompt): near-equal parts, one per request in flight.
        assert_eq!(load_request_blocks(511, 1), 511);
        assert_eq!(load_request_blocks(511, 2), 256);
        assert_eq!(load_request_blocks(511, 4), 128);
        assert_eq!(load_request_blocks(511, 8), 64);
        // No part under MIN_PIPELINED_BLOCKS, none over PAGES_PER_REQUEST.
        assert_eq!(load_request_blocks(40, 4), 40);
        assert_eq!(load_request_blocks(100, 8), 34);
        assert_eq!(load_request_blocks(8190, 1), PAGES_PER_REQUEST);
        assert_eq!(load_request_blocks(8190, 4), PAGES_PER_REQUEST);
        assert_eq!(load_request_blocks(1, 8), 1);
        // Several requests only for blocks a lookup found in the HBM tier.
        use proto::Tier::{Hbm, Host};
        assert!(all_in_hbm(&[Hbm, Hbm, Host], 2));
        assert!(!all_in_hbm(&[Hbm, Host, Hbm], 3));
        assert!(!all_in_hbm(&[Hbm], 2));
        assert!(!all_in_hbm(&[], 0));
        assert_eq!(load_request_blocks(0, 1), 1);
        for blocks in 1..3000 {
            for in_flight in 1..=MAX_LOAD_PIPELINE {
                let per = load_request_blocks(blocks, in_flight);
                let requests = blocks.div_ceil(per);
                assert!(per <= PAGES_PER_REQUEST, "{blocks} {in_flight}");
                assert!(
                    requests == 1 || per >= MIN_PIPELINED_BLOCKS,
                    "{blocks} {in_flight}"
                );
                assert!(
                    requests <= in_flight || per == PAGES_PER_REQUEST,
                    "{blocks} {in_flight}"
                );
            }
        }
    }

    #[test]
    fn stores_name_each_block_page_and_its_parent() {
        let k = keys(5);
        let pages = [7u32, 3, 9, 0, 4];
        let plan = plan_store(&k, &pages, 1, 5, 42, 3);
        assert_eq!(plan.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 1]);
        let all: Vec<&PagesPutItem> = plan.iter().flatten().collect();
        for (j, item) in all.iter().enumerate() {
            let i = j + 1;
            assert_eq!(item.key.as_ref(), &k[i]);
            assert_eq!(item.parent.as_deref(), Some(&k[i - 1][..]));
            assert_eq!(item.pages.region_id, 42);
            assert_eq!(item.pages.page_ids, vec![pages[i]]);
        }
        // The first block has no parent; the end is capped by keys and pages.
        let plan = plan_store(&k, &pages[..2], 0, 9, 1, 100);
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].len(), 2);
        assert_eq!(plan[0][0].parent, None);
        assert!(plan_store(&k, &pages, 5, 5, 1, 8).is_empty());
    }

    fn result(found: bool, tier: proto::Tier, error: &str) -> proto::GetResult {
        proto::GetResult {
            found,
            tier: tier as i32,
            region_error: error.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_load_keeps_the_leading_run_found() {
        let r = [
            result(true, proto::Tier::Hbm, ""),
            result(true, proto::Tier::Host, ""),
            result(false, proto::Tier::Unspecified, ""),
            result(true, proto::Tier::Hbm, ""),
        ];
        let (n, tiers) = found_prefix(&PagesFound::from_results(&r)).unwrap();
        assert_eq!(n, 2);
        assert_eq!(tiers, vec![proto::Tier::Hbm, proto::Tier::Host]);
        assert_eq!(found_prefix(&PagesFound::default()).unwrap().0, 0);
        let e = found_prefix(&PagesFound::from_results(&[
            r[0].clone(),
            result(false, proto::Tier::Hbm, "scatter failed"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("block 1"), "{e}");
        assert!(e.to_string().contains("scatter failed"), "{e}");
    }

    #[test]
    fn the_path_falls_back_and_says_why() {
        let c = choose_path(RegionAttempt::Registered(7u64), true);
        assert_eq!(
            (c.path, c.region, c.note),
            (KvPath::GpuPages, Some(7), None)
        );
        let c = choose_path::<u64>(
            RegionAttempt::Failed("the daemon refused the registration (no_gpu)".into()),
            true,
        );
        assert_eq!(c.path, KvPath::SharedMemory);
        assert!(c.region.is_none());
        let note = c.note.unwrap();
        assert!(
            note.contains("shared memory") && note.contains("no_gpu"),
            "{note}"
        );
        assert!(!note.contains('\n'));
        let c = choose_path::<u64>(RegionAttempt::NotTried, false);
        assert_eq!(c.path, KvPath::Inline);
        assert!(c.note.unwrap().contains("--kv-region-socket"));
        assert_eq!(KvPath::GpuPages.name(), "gpu-pages");
    }

    /// The region geometry the daemon checks: one page is one block of the
    /// namespace's layer-major layout, the whole pool is the region.
    #[test]
    fn the_region_geometry_is_one_block_per_page() {
        let g = KvGeometry {
            num_layers: 32,
            num_kv_heads: 8,
            head_dim: 128,
            block_tokens: 16,
        };
        let r = region_geometry(&g, 100);
        r.validate().unwrap();
        assert_eq!(r.block_bytes(1), g.block_bytes() as u64);
        assert_eq!(r.page_stride(), g.block_bytes() as u64);
        assert_eq!(r.region_bytes(), 100 * g.block_bytes() as u64);
        // Page p's (layer, K|V) chunk is where the CPU layout puts it.
        assert_eq!(
            r.engine_offset(3, 1, 5),
            (5 * g.page_elems() + (3 * 2 + 1) * 16 * g.row_elems()) as u64 * 2
        );
        let spec = kvstrata_types::NamespaceSpec::layer_major(
            "m",
            32,
            8,
            128,
            kvstrata_types::Dtype::F16,
            16,
        );
        assert_eq!(spec.block_bytes().unwrap(), r.block_bytes(1));
    }
}
