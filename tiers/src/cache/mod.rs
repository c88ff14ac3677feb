//! `BlockCache`: the cache as the server sees it — registered namespaces, the
//! tiers (fastest first), movement between them, leases and the event bus.
//! Every request-shaped method validates its whole input before changing
//! anything.
//!
//! # The tier list
//!
//! The cache holds its tiers in one list, fastest first: an HBM tier per
//! device, the host tier, the disk tier, the remote tier (those
//! configured). Reads ([`BlockCache::get_batch`]), lookups, pins, listings,
//! inspections and deletes walk that list through the [`Tier`] trait, one
//! batch per tier: what the first tiers miss, the next ones are asked for.
//! Writes, promotions and device copies need tier-specific steps (the
//! replacement order below, device slots, queues) and use the tiers' own
//! types.
//!
//! # Files
//!
//! - `get.rs`: lookups and reads through the tier list, promotion on get.
//! - `put.rs`: puts, deletes and `evict`: the replacement order.
//! - `device.rs`: the CUDA-IPC data path (device puts and gets, promotion
//!   into HBM).
//! - `lease.rs`: pins and leases.
//! - `stop.rs`: [`BlockCache::close`]: the ordered shutdown, the write
//!   queue's drain and the host tier persisted to disk.
//!
//! # Movement (with a disk tier)
//!
//! - Host-tier pressure evictions go to the demotion queue (`movement.rs`,
//!   bounded) and are written to disk in the background; a full queue drops
//!   them.
//! - A get that misses the host tier reads the disk tier (all misses of a
//!   batch in one submission) and, with `promote_on_get`, copies each hit
//!   into the host tier. The disk keeps its copy (the tiers are inclusive),
//!   so evicting a promoted block again costs no write.
//! - A block between the two (evicted from the host tier, still in the
//!   demotion queue) is served from the queue by gets and lookups (as the
//!   disk tier's, not promoted), so no read misses it while the writer is
//!   behind (`get.rs`, [`crate::movement`]).
//! - A put or delete of a key makes every older copy unreachable: it takes
//!   the key's stripe lock, writes the host tier, drops any queued demotion
//!   of the key and removes it from disk. The host tier hands its victims
//!   to the demotion queue with its lock released, and a put or delete of a
//!   victim's key waits until that hand-off is done (see [`crate::host`]),
//!   so the queued demotion is always there to be dropped. Promotion takes
//!   the same stripe lock and copies a block up only if the disk still
//!   holds the version it read, so a get never resurrects bytes older than
//!   a completed put.
//! - With a namespace's `write_through` policy every put is also queued for
//!   the disk; with `sync_write_through` it is written to disk before the
//!   put answers (a failed disk write: the put is not stored).
//! - A put the host tier refuses changes no tier (see `put.rs`).
//! - Namespace registrations are saved in the disk index, so a restarted
//!   daemon knows the namespaces of the blocks it serves.
//!
//! # The remote tier (with a cluster configured)
//!
//! - It sits below the local tiers: a lookup or get that misses the host and
//!   disk tiers asks the cluster, and a get promotes what it finds into the
//!   host tier (`promote_on_get`).
//! - Blocks leaving the host tier are queued for the cluster as well as for
//!   the disk (`demote`), so what the disk later evicts is still found there.
//!   A namespace's `remote_write_through` policy (or the tier's
//!   `write_through`) queues every put.
//! - A put without write-through, and a delete, queue a delete of the
//!   cluster's copy, so the cluster never serves a version older than a
//!   put or delete this node completed (see [`crate::remote`]). A put queues
//!   its write or delete after its host write, so it comes after any write
//!   of the old block that a host eviction queued; a delete queues one
//!   before its local removals (reads meanwhile miss the cluster's copy)
//!   and one after (the remote tier is the last of the list).
//!
//! # GPUs (with [`BlockCache::with_gpus`] or [`BlockCache::open`])
//!
//! - The host arena is pinned memory of the first CUDA device (page-locked,
//!   mapped), so copies between it and any device run at PCIe speed.
//! - With `CacheConfig::hbm`, each device gets an [`HbmTier`] (T0) in front of
//!   the host tier: lookups, gets, pins and deletes see T0 first; a device's
//!   T0 demotes its victims into the host tier (see [`crate::hbm`]); `evict`
//!   moves T0 blocks one tier down, into the host tier.
//! - T0 copies are never older than the host copy: a put of inline bytes
//!   (`put_batch`) removes every T0 copy of the key *before* it writes the
//!   host tier (a T0 demotion checks, under the T0 lock, that its block is
//!   still live before publishing it in T1, so it can never land after the
//!   put); [`BlockCache::put_from_device`] removes the key from every tier
//!   before it publishes the new block in T0. Promotions into T0 copy the
//!   host tier's bytes in batches without holding stripe locks; each stripe
//!   counts the puts and deletes under it (its *write epoch*), and a
//!   promoted block is published, under its stripe lock, only if the epoch
//!   it read with the bytes is unchanged, so a promotion never lands after,
//!   and shadows, a newer put.
//! - The CUDA-IPC data path: [`BlockCache::put_from_device`] reserves slots,
//!   lets the caller's gather kernel fill them, checksums and publishes them;
//!   [`BlockCache::get_to_device`] hands out device addresses of exact bytes
//!   (T0 slot, pinned host slot, or disk/remote bytes staged in pinned
//!   memory), held until the caller's scatter has finished, then promotes
//!   what it served from the host tier (`promote_on_device_get`).
//!
//! # Closing
//!
//! [`BlockCache::close`] shuts the cache down in order: it stops taking
//! writes (waiting for those in flight; later ones fail with
//! [`CacheError::Closed`]), finishes the HBM tiers' copies (top to bottom),
//! drains the demotion queue into the disk tier for at most
//! `movement.drain_on_stop` and joins its writer, writes the host tier's
//! blocks that the disk lacks to it (hottest first, for at most
//! `movement.persist_on_stop`), closes the disk tier (its I/O threads stop,
//! its access times are persisted, its index is flushed and closed), then
//! drains the remote tier's write queue and stops its tasks. It reports
//! (log and [`StopReport`]) what was written and what was left. Dropping the
//! cache closes it too, if `close` was not called.

mod device;
mod get;
mod lease;
mod put;
mod stop;

pub use stop::{PersistReport, StopReport};

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard};
use tokio::sync::broadcast;

use crate::disk::{DiskError, DiskStats, DiskTier, DiskTierConfig};
use crate::disk::{HeaderInspection, VerifyReport};
use crate::error::CacheError;
use crate::events::{CacheEvent, EventBus};
use kvstrata_kernels::{Backend, Gpu, GpuError};

use crate::hbm::{HbmStats, HbmTier, HbmTierConfig};
use crate::host::{HostTier, HostTierConfig};
use crate::key::BlockKey;
use crate::movement::{Demoter, Demotions, MovementConfig, MovementStats};
use crate::namespace::{Namespace, NamespaceId, NamespacePolicy, NamespaceSpec};
use crate::remote::{RemoteError, RemoteStats, RemoteTier, RemoteTierConfig};
use crate::tier::{BlockMeta, Tier, TierKind, TierStats};

use lease::Lease;

/// Configuration of the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    pub host: HostTierConfig,
    /// The disk tier; `None` (default) runs with the host tier alone.
    pub disk: Option<DiskTierConfig>,
    /// The remote tier (a Redis/Valkey cluster); `None` (default): none.
    pub remote: Option<RemoteTierConfig>,
    /// The HBM tier of every GPU given to [`BlockCache::with_gpus`] (bytes
    /// per device); `None` (default): no HBM tier, even with GPUs.
    pub hbm: Option<HbmTierConfig>,
    pub movement: MovementConfig,
    /// How blocks move between a GPU and host memory on the device paths
    /// (`put_from_device_staged`, `get_to_device_staged`): DMA threshold
    /// and staging group size. `None` (default): the HBM tier's settings
    /// where it has one, else the defaults.
    pub device_moves: Option<DeviceMoves>,
    /// Longest lease a `Pin` may ask for. Default 10 minutes.
    pub max_lease: Duration,
    /// Events kept for slow watchers before they are told they lagged. Default 16384.
    pub event_buffer: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            host: HostTierConfig::default(),
            disk: None,
            remote: None,
            hbm: None,
            movement: MovementConfig::default(),
            device_moves: None,
            max_lease: Duration::from_secs(600),
            event_buffer: 16384,
        }
    }
}

/// How blocks move between a GPU and host memory ([`CacheConfig::device_moves`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMoves {
    /// Runs of at least this many bytes move with DMA, shorter ones with the
    /// batched-copy kernel.
    pub dma_threshold: u64,
    /// Bytes of blocks per group: the size of a device staging buffer.
    pub group_bytes: u64,
}

/// Why the cache could not be built.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("host tier: cannot reserve the arena: {0}")]
    Host(#[source] std::io::Error),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("cannot start the demotion writer: {0}")]
    Movement(#[source] std::io::Error),
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("GPU: {0}")]
    Gpu(#[from] GpuError),
}

/// Why [`BlockCache::put_from_device`] failed; nothing was stored.
#[derive(Debug, thiserror::Error)]
pub enum DevicePutError<E> {
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The caller's `fill` failed.
    #[error("filling the reserved slots failed")]
    Fill(#[source] E),
}

/// One block of a put batch.
#[derive(Debug, Clone)]
pub struct PutBlock {
    pub key: BlockKey,
    pub parent: Option<BlockKey>,
    pub payload: Bytes,
}

/// A granted lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    pub lease_id: u64,
    pub deadline_unix_ms: u64,
}

/// Everything the cache reports in `Stats`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheStats {
    pub tiers: Vec<(TierKind, TierStats)>,
    pub namespaces: u32,
    pub active_leases: u32,
    pub uptime: Duration,
    pub event_seq: u64,
    pub lookups: u64,
    /// Disk-tier details (engine, throughput, fault counters), with a disk tier.
    pub disk: Option<DiskStats>,
    /// Movement counters, with a disk tier.
    pub movement: Option<MovementStats>,
    /// Remote-tier counters, with a remote tier.
    pub remote: Option<RemoteStats>,
    /// Each HBM tier's device and movement counters, in the order of its
    /// `TierKind::Hbm` row in `tiers` (device 0 first).
    pub hbm: Vec<HbmStats>,
    /// Whether the host tier is page-locked memory.
    pub host_pinned: bool,
}

/// `Inspect`'s answer: metadata plus a checksum computed now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    pub meta: BlockMeta,
    pub payload_xxh3: u64,
    /// The disk slot's header and checks, when the disk tier holds the block.
    pub disk: Option<HeaderInspection>,
}

impl Inspection {
    pub fn checksum_ok(&self) -> bool {
        self.payload_xxh3 == self.meta.checksum
    }
}

/// The disk tier and the queue that feeds it.
struct DiskSide {
    tier: DiskTier,
    demoter: Arc<Demoter>,
}

/// Stripe locks ordering puts, deletes and promotions of one key.
const STRIPES: usize = 256;

/// The cache: namespaces, tiers, leases, events.
pub struct BlockCache {
    namespaces: RwLock<HashMap<NamespaceId, Arc<Namespace>>>,
    /// Every tier, fastest first: HBM (by device), host, disk, remote.
    tiers: Vec<Arc<dyn Tier>>,
    host: HostTier,
    /// One per GPU when `config.hbm` is set, indexed by device.
    hbm: Vec<HbmTier>,
    gpus: Vec<Gpu>,
    disk: Option<DiskSide>,
    remote: Option<RemoteTier>,
    /// Per stripe, its write epoch: puts and deletes under it so far.
    stripes: Box<[Mutex<u64>]>,
    /// Whether the cache is closed; writes hold a read guard while they run.
    closed: RwLock<bool>,
    events: Arc<EventBus>,
    leases: Mutex<HashMap<u64, Lease>>,
    next_lease: AtomicU64,
    lookups: AtomicU64,
    config: CacheConfig,
    started: Instant,
}

impl std::fmt::Debug for BlockCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCache")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl BlockCache {
    /// Builds the tiers: reserves the host arena and, if configured, opens
    /// the disk tier (rebuilding its state from the index, which takes about
    /// a second per million blocks), starts the demotion writer and restores
    /// the namespaces saved with the disk tier. A remote tier needs a
    /// runtime: see [`BlockCache::open`].
    pub fn new(config: CacheConfig) -> Result<Self, OpenError> {
        Self::open(config, Vec::new(), None)
    }

    /// As [`BlockCache::new`], with GPUs: see [`BlockCache::open`].
    pub fn with_gpus(config: CacheConfig, gpus: Vec<Gpu>) -> Result<Self, OpenError> {
        Self::open(config, gpus, None)
    }

    /// Builds the tiers as [`BlockCache::new`] does, with GPUs and the
    /// runtime the remote tier runs on.
    ///
    /// GPUs: the host arena comes from [`Gpu::alloc_pinned`] of the first
    /// CUDA device (page-locked; of the first device on the CPU backend,
    /// ordinary memory), and with `config.hbm` every GPU gets an HBM tier of
    /// that many bytes. Device `i` of the device-side calls is `gpus[i]`.
    ///
    /// `runtime`: the tokio runtime whose handle the remote tier's tasks and
    /// commands run on (the daemon passes its own); required with
    /// `config.remote` ([`RemoteError::NoRuntime`] without).
    pub fn open(
        config: CacheConfig,
        gpus: Vec<Gpu>,
        runtime: Option<tokio::runtime::Handle>,
    ) -> Result<Self, OpenError> {
        let events = Arc::new(EventBus::new(config.event_buffer));
        let host = open_host(&config.host, &gpus, &events)?;
        let mut hbm = Vec::new();
        if let Some(hc) = &config.hbm {
            for (device, gpu) in gpus.iter().enumerate() {
                let h = HbmTier::new(
                    hc,
                    gpu.clone(),
                    device,
                    Some(host.clone()),
                    Arc::clone(&events),
                )?;
                hbm.push(h);
            }
        }
        let (disk, namespaces) = match &config.disk {
            Some(dc) => {
                let (side, namespaces) = open_disk(dc, config.movement, &events)?;
                (Some(side), namespaces)
            }
            None => (None, HashMap::new()),
        };
        let remote = match (&config.remote, runtime) {
            (Some(rc), Some(rt)) => Some(RemoteTier::open(rc.clone(), Arc::clone(&events), rt)?),
            (Some(_), None) => return Err(RemoteError::NoRuntime.into()),
            (None, _) => None,
        };
        let demotions = Demotions {
            demoter: disk.as_ref().map(|d| Arc::clone(&d.demoter)),
            remote: remote.clone().filter(|r| r.config().demote),
        };
        if !demotions.is_empty() {
            host.set_eviction_sink(Arc::new(demotions));
        }
        let mut tiers: Vec<Arc<dyn Tier>> = hbm
            .iter()
            .map(|h| Arc::new(h.clone()) as Arc<dyn Tier>)
            .collect();
        tiers.push(Arc::new(host.clone()));
        if let Some(d) = &disk {
            tiers.push(Arc::new(d.tier.clone()));
        }
        if let Some(r) = &remote {
            tiers.push(Arc::new(r.clone()));
        }
        Ok(BlockCache {
            namespaces: RwLock::new(namespaces),
            tiers,
            host,
            hbm,
            gpus,
            disk,
            remote,
            stripes: (0..STRIPES).map(|_| Mutex::new(0)).collect(),
            closed: RwLock::new(false),
            events,
            leases: Mutex::new(HashMap::new()),
            next_lease: AtomicU64::new(lease::first_lease_id()),
            lookups: AtomicU64::new(0),
            config,
            started: Instant::now(),
        })
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// The host tier (T1).
    pub fn host(&self) -> &HostTier {
        &self.host
    }

    /// The HBM tiers (T0), one per GPU when configured, by device.
    pub fn hbm(&self) -> &[HbmTier] {
        &self.hbm
    }

    /// The GPUs the cache was given, by device.
    pub fn gpus(&self) -> &[Gpu] {
        &self.gpus
    }

    /// Whether the host tier is page-locked memory.
    pub fn host_pinned(&self) -> bool {
        self.host.is_pinned()
    }

    /// The disk tier (T2), if configured.
    pub fn disk(&self) -> Option<&DiskTier> {
        self.disk.as_ref().map(|d| &d.tier)
    }

    /// The remote tier, if configured.
    pub fn remote(&self) -> Option<&RemoteTier> {
        self.remote.as_ref()
    }

    /// Waits until every queued demotion has been written or dropped; `false`
    /// on timeout. Without a disk tier, at once. A test hook.
    #[cfg(feature = "testing")]
    pub fn flush_demotions(&self, timeout: Duration) -> bool {
        self.disk.as_ref().is_none_or(|d| d.demoter.flush(timeout))
    }

    /// Waits until the remote tier's write queue is empty; `false` on
    /// timeout. Without a remote tier, at once. A test hook.
    #[cfg(feature = "testing")]
    pub fn flush_remote(&self, timeout: Duration) -> bool {
        self.remote.as_ref().is_none_or(|r| r.flush(timeout))
    }

    /// Periodic upkeep: persists changed disk access times (so a restart keeps
    /// the LRU order). Cheap when nothing changed; nothing once closed (the
    /// close persisted them).
    pub fn maintain(&self) {
        if let Some(d) = &self.disk
            && !d.tier.is_closed()
            && let Err(e) = d.tier.persist_access()
        {
            tracing::warn!(error = %e, "disk tier: access times not persisted");
        }
    }

    fn stripe(&self, ns: &NamespaceId, key: &BlockKey) -> &Mutex<u64> {
        &self.stripes[self.stripe_index(ns, key)]
    }

    fn stripe_index(&self, ns: &NamespaceId, key: &BlockKey) -> usize {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(ns.as_bytes());
        h.update(key.as_bytes());
        (h.digest() as usize) % self.stripes.len()
    }

    /// The stripe locks of every key, each once, taken as writers do
    /// ([`BlockCache::write_stripe`]) in stripe order. The only holder of
    /// several stripes at once: every other writer holds one at a time and
    /// never waits for another while holding it, and two holders of several
    /// take theirs in the same order, so no wait can close a cycle.
    fn write_stripes<'k>(
        &self,
        ns: &NamespaceId,
        keys: impl Iterator<Item = &'k BlockKey>,
    ) -> Vec<MutexGuard<'_, u64>> {
        let mut idx: Vec<usize> = keys.map(|k| self.stripe_index(ns, k)).collect();
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter()
            .map(|i| {
                let mut guard = self.stripes[i].lock();
                *guard += 1;
                guard
            })
            .collect()
    }

    /// The key's stripe lock, taken by a writer (put or delete): its write
    /// epoch moves on, so a promotion that read older bytes does not publish them.
    fn write_stripe(&self, ns: &NamespaceId, key: &BlockKey) -> MutexGuard<'_, u64> {
        let mut guard = self.stripe(ns, key).lock();
        *guard += 1;
        guard
    }

    /// Admits a write (put, delete, evict): held while it runs, so that
    /// [`BlockCache::close`] waits for it; [`CacheError::Closed`] once closed.
    fn admit_write(&self) -> Result<RwLockReadGuard<'_, bool>, CacheError> {
        // Recursive: a write's caller code (a device fill) may start another.
        let open = self.closed.read_recursive();
        if *open {
            return Err(CacheError::Closed);
        }
        Ok(open)
    }
    /// Registers a namespace (idempotent) with the default policy, or keeps
    /// the policy it has. Returns it and whether it is new.
    pub fn register_namespace(
        &self,
        spec: NamespaceSpec,
    ) -> Result<(Arc<Namespace>, bool), CacheError> {
        self.register_namespace_with(spec, None)
    }

    /// Registers a namespace; a given `policy` replaces the one it has. With a
    /// disk tier the registration is saved in the disk index.
    pub fn register_namespace_with(
        &self,
        spec: NamespaceSpec,
        policy: Option<NamespacePolicy>,
    ) -> Result<(Arc<Namespace>, bool), CacheError> {
        let mut ns = Namespace::new(spec)?;
        let max = self
            .tiers
            .iter()
            .map(|t| t.max_block_bytes())
            .min()
            .unwrap_or(0);
        if ns.block_bytes > max {
            return Err(CacheError::BlockTooLarge {
                field: "spec".into(),
                block_bytes: ns.block_bytes,
                max,
            });
        }
        if policy.is_some_and(|p| p.write_through) && self.disk.is_none() {
            return Err(CacheError::TierNotConfigured {
                field: "policy.write_through".into(),
                tier: "disk",
            });
        }
        if policy.is_some_and(|p| p.sync_write_through) && self.disk.is_none() {
            return Err(CacheError::TierNotConfigured {
                field: "policy.sync_write_through".into(),
                tier: "disk",
            });
        }
        if policy.is_some_and(|p| p.remote_write_through) && self.remote.is_none() {
            return Err(CacheError::TierNotConfigured {
                field: "policy.remote_write_through".into(),
                tier: "remote",
            });
        }
        let mut map = self.namespaces.write();
        let existing = map.get(&ns.id).cloned();
        if let Some(existing) = &existing
            && policy.is_none_or(|p| p == existing.policy)
        {
            return Ok((Arc::clone(existing), false));
        }
        ns.policy = policy.unwrap_or_default();
        if let Some(d) = &self.disk
            && let Err(e) = d.tier.save_namespace(&ns.id, &ns.record())
        {
            // The namespace still works; only a restart would forget it.
            tracing::error!(namespace = %ns.id, error = %e, "disk index: namespace not saved");
        }
        let ns = Arc::new(ns);
        map.insert(ns.id, Arc::clone(&ns));
        tracing::info!(namespace = %ns.id, model = %ns.spec.model_id, block_bytes = ns.block_bytes, write_through = ns.policy.write_through, sync_write_through = ns.policy.sync_write_through, "namespace registered");
        Ok((ns, existing.is_none()))
    }

    pub fn namespaces(&self) -> Vec<Arc<Namespace>> {
        let mut v: Vec<_> = self.namespaces.read().values().cloned().collect();
        v.sort_by(|a, b| a.spec.model_id.cmp(&b.spec.model_id).then(a.id.cmp(&b.id)));
        v
    }

    /// The registered namespace, or `UnknownNamespace` naming `field`.
    pub fn namespace(&self, field: &str, id: &NamespaceId) -> Result<Arc<Namespace>, CacheError> {
        self.namespaces
            .read()
            .get(id)
            .cloned()
            .ok_or_else(|| CacheError::UnknownNamespace {
                field: field.to_string(),
                namespace: id.to_hex(),
            })
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            // The remote tier's row: its traffic (the cluster's capacity and
            // occupancy are its own, `maxmemory`).
            tiers: self.tiers.iter().map(|t| (t.kind(), t.stats())).collect(),
            namespaces: self.namespaces.read().len() as u32,
            active_leases: self.leases.lock().len() as u32,
            uptime: self.started.elapsed(),
            event_seq: self.events.last_seq(),
            lookups: self.lookups.load(Ordering::Relaxed),
            disk: self.disk.as_ref().map(|d| d.tier.disk_stats()),
            movement: self.disk.as_ref().map(|d| d.demoter.stats()),
            remote: self.remote.as_ref().map(|r| r.stats()),
            hbm: self.hbm.iter().map(|h| h.hbm_stats()).collect(),
            host_pinned: self.host.is_pinned(),
        }
    }

    /// Reads and checks every disk slot (see [`DiskTier::verify`]); blocks for
    /// the whole scan. Fails without a disk tier.
    pub fn verify_disk(&self, drop_corrupt: bool) -> Result<VerifyReport, CacheError> {
        let d = self
            .disk
            .as_ref()
            .ok_or_else(|| CacheError::TierNotConfigured {
                field: "verify".into(),
                tier: "disk",
            })?;
        Ok(d.tier.verify(drop_corrupt))
    }

    /// One page of blocks. The cursor encodes (tier position, position in tier).
    pub fn list_blocks(
        &self,
        ns: Option<&NamespaceId>,
        tier: Option<TierKind>,
        cursor: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<BlockMeta>, Option<u64>), CacheError> {
        if let Some(n) = ns {
            self.namespace("namespace_id", n)?;
        }
        let limit = limit.max(1);
        let cursor = cursor.unwrap_or(0);
        let (mut tier_pos, mut pos) = ((cursor >> 56) as usize, cursor & ((1 << 56) - 1));
        let mut out = Vec::new();
        while tier_pos < self.tiers.len() {
            let t = &self.tiers[tier_pos];
            if tier.is_some_and(|k| k != t.kind()) {
                tier_pos += 1;
                pos = 0;
                continue;
            }
            let (mut page, next) = t.list(ns, pos, limit - out.len());
            out.append(&mut page);
            match next {
                Some(p) => return Ok((out, Some(((tier_pos as u64) << 56) | p))),
                None => {
                    tier_pos += 1;
                    pos = 0;
                }
            }
            if out.len() >= limit {
                return Ok((
                    out,
                    (tier_pos < self.tiers.len()).then_some((tier_pos as u64) << 56),
                ));
            }
        }
        Ok((out, None))
    }

    /// Metadata of a block plus a checksum of its bytes computed now (from
    /// the fastest tier holding it, [`Tier::inspect`]), and its disk slot's
    /// header when the disk tier holds it. Reports only: a corrupt disk slot
    /// is shown, not dropped.
    pub fn inspect(
        &self,
        ns: &NamespaceId,
        key: &BlockKey,
    ) -> Result<Option<Inspection>, CacheError> {
        self.namespace("namespace_id", ns)?;
        let disk = self
            .disk
            .as_ref()
            .and_then(|d| d.tier.inspect_header(ns, key).ok());
        for tier in &self.tiers {
            if let Some(found) = tier.inspect(ns, key)? {
                return Ok(Some(Inspection {
                    meta: found.meta,
                    payload_xxh3: found.payload_xxh3,
                    disk,
                }));
            }
        }
        Ok(None)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<CacheEvent> {
        self.events.subscribe()
    }
}

impl Drop for BlockCache {
    /// The backstop of [`BlockCache::close`]: the same ordered shutdown if
    /// it was not called, so the disk tier's paths can be opened again as
    /// soon as the cache is gone.
    fn drop(&mut self) {
        self.close();
    }
}

/// The host tier: in pinned memory of the first CUDA device (else of the
/// first device) when there are GPUs, else anonymous memory.
fn open_host(
    config: &HostTierConfig,
    gpus: &[Gpu],
    events: &Arc<EventBus>,
) -> Result<HostTier, OpenError> {
    let pin_with = gpus
        .iter()
        .find(|g| g.backend() == Backend::Cuda)
        .or(gpus.first());
    Ok(match pin_with {
        Some(gpu) => HostTier::new_pinned(config, Arc::clone(events), gpu)?,
        None => HostTier::new(config, Arc::clone(events)).map_err(OpenError::Host)?,
    })
}

/// The disk tier with its demotion writer, and the namespaces saved with it.
fn open_disk(
    config: &DiskTierConfig,
    movement: MovementConfig,
    events: &Arc<EventBus>,
) -> Result<(DiskSide, HashMap<NamespaceId, Arc<Namespace>>), OpenError> {
    let tier = DiskTier::open(config, Arc::clone(events))?;
    let demoter = Demoter::start(tier.clone(), movement).map_err(OpenError::Movement)?;
    let mut namespaces = HashMap::new();
    for (id, record) in tier.load_namespaces()? {
        match Namespace::from_record(&record) {
            Some(ns) if ns.id == id => {
                namespaces.insert(id, Arc::new(ns));
            }
            _ => {
                tracing::warn!(namespace = %id, "disk index: unreadable namespace record ignored")
            }
        }
    }
    Ok((DiskSide { tier, demoter }, namespaces))
}

#[cfg(test)]
mod tests;
