//! `BlockCache`: the cache as the server sees it — registered namespaces, the
//! tiers (fastest first), movement between them, leases and the event bus.
//! Every request-shaped method validates its whole input before changing
//! anything.
//!
//! # Movement (with a disk tier)
//!
//! - Host-tier pressure evictions go to the [`Demoter`]'s bounded queue and
//!   are written to disk in the background; a full queue drops them.
//! - A get that misses the host tier reads the disk tier (all misses of a
//!   batch in one submission) and, with `promote_on_get`, copies each hit
//!   into the host tier. The disk keeps its copy (the tiers are inclusive),
//!   so evicting a promoted block again costs no write.
//! - A put or delete of a key makes every older copy unreachable: it takes
//!   the key's stripe lock, writes the host tier, drops any queued demotion
//!   of the key and removes it from disk. Promotion takes the same stripe
//!   lock and copies a block up only if the disk still holds the version it
//!   read, so a get never resurrects bytes older than a completed put.
//! - With a namespace's `write_through` policy every put is also queued for
//!   the disk.
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
//!   put or delete this node completed (see [`crate::remote`]).
//!
//! # GPUs (with [`BlockCache::with_gpus`])
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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::{Mutex, MutexGuard, RwLock};
use rayon::prelude::*;
use tokio::sync::broadcast;

use crate::disk::checksum::xxh3_64;
use crate::disk::{DiskError, DiskPut, DiskRead, DiskStats, DiskTier, DiskTierConfig};
use crate::disk::{HeaderInspection, VerifyReport};
use crate::error::CacheError;
use crate::events::{CacheEvent, EventBus};
use kvstrata_kernels::{Backend, Gpu, GpuError, StagingBuffer};

use crate::hbm::{HbmRead, HbmSlot, HbmStats, HbmTier, HbmTierConfig};
use crate::host::{EvictionSink, HostSlot, Victim};
use crate::host::{HostTier, HostTierConfig};
use crate::key::BlockKey;
use crate::movement::{Demoter, MovementConfig, MovementStats};
use crate::namespace::{Namespace, NamespaceId, NamespacePolicy, NamespaceSpec};
use crate::remote::{RemoteBlock, RemoteError, RemoteStats, RemoteTier, RemoteTierConfig};
use crate::tier::{
    BlockMeta, PinToken, PutOutcome, RemoveOutcome, RemoveReason, Tier, TierKind, TierStats,
};

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
            max_lease: Duration::from_secs(600),
            event_buffer: 16384,
        }
    }
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

struct Lease {
    tokens: Vec<PinToken>,
    deadline: Instant,
}

/// The disk tier and the queue that feeds it.
struct DiskSide {
    tier: DiskTier,
    demoter: Arc<Demoter>,
}

/// Where host-tier evictions go: the disk's demotion queue and the remote
/// tier's write queue. The victim's bytes are copied once, and only if one
/// of them takes it.
struct HostEvictions {
    demoter: Option<Arc<Demoter>>,
    remote: Option<RemoteTier>,
}

impl EvictionSink for HostEvictions {
    fn evicted(&self, v: Victim<'_>) {
        let to_disk = self.demoter.as_ref().filter(|d| d.wants(&v));
        let to_remote = self.remote.as_ref().filter(|r| {
            let room = r.has_room(v.payload.len() as u64);
            if !room {
                r.count_dropped();
            }
            room
        });
        if to_disk.is_none() && to_remote.is_none() {
            return;
        }
        let bytes = Bytes::copy_from_slice(v.payload);
        if let Some(r) = to_remote {
            r.enqueue_put(v.namespace, v.key, v.parent, bytes.clone(), false);
        }
        if let Some(d) = to_disk {
            d.enqueue(v.namespace, v.key, v.parent, bytes);
        }
    }
}

/// A host-tier block lent by `get_to_device`, kept for its promotion.
struct HostRead {
    key: BlockKey,
    bytes: Bytes,
    parent: Option<BlockKey>,
    checksum: u64,
    /// The key's stripe epoch, read before the bytes.
    epoch: u64,
}

/// A slot reserved by `put_from_device`.
enum DeviceSlot {
    Hbm(HbmSlot),
    Host(HostSlot),
}

impl DeviceSlot {
    fn addr(&self) -> u64 {
        match self {
            DeviceSlot::Hbm(s) => s.addr(),
            DeviceSlot::Host(s) => s.device_addr().unwrap_or(s.host_addr()),
        }
    }
}

/// Stripe locks ordering puts, deletes and promotions of one key.
const STRIPES: usize = 256;

/// The cache: namespaces, tiers, leases, events.
pub struct BlockCache {
    namespaces: RwLock<HashMap<NamespaceId, Arc<Namespace>>>,
    host: HostTier,
    /// One per GPU when `config.hbm` is set, indexed by device.
    hbm: Vec<HbmTier>,
    gpus: Vec<Gpu>,
    disk: Option<DiskSide>,
    remote: Option<RemoteTier>,
    /// Per stripe, its write epoch: puts and deletes under it so far.
    stripes: Box<[Mutex<u64>]>,
    tiers: Vec<Arc<dyn Tier>>,
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
    /// the namespaces saved with the disk tier.
    pub fn new(config: CacheConfig) -> Result<Self, OpenError> {
        Self::with_gpus(config, Vec::new())
    }

    /// As [`BlockCache::new`], with GPUs: the host arena comes from
    /// [`Gpu::alloc_pinned`] of the first CUDA device (page-locked; of the
    /// first device on the CPU backend, ordinary memory), and with
    /// `config.hbm` every GPU gets an HBM tier of that many bytes. Device
    /// `i` of the device-side calls is `gpus[i]`. No GPUs: `new`.
    pub fn with_gpus(config: CacheConfig, gpus: Vec<Gpu>) -> Result<Self, OpenError> {
        let events = Arc::new(EventBus::new(config.event_buffer));
        let pin_with = gpus
            .iter()
            .find(|g| g.backend() == Backend::Cuda)
            .or(gpus.first());
        let host = match pin_with {
            Some(gpu) => HostTier::new_pinned(&config.host, Arc::clone(&events), gpu)?,
            None => HostTier::new(&config.host, Arc::clone(&events)).map_err(OpenError::Host)?,
        };
        let mut hbm = Vec::new();
        if let Some(hc) = &config.hbm {
            for (device, gpu) in gpus.iter().enumerate() {
                hbm.push(HbmTier::new(
                    hc,
                    gpu.clone(),
                    device,
                    Some(host.clone()),
                    Arc::clone(&events),
                )?);
            }
        }
        let mut tiers: Vec<Arc<dyn Tier>> = hbm
            .iter()
            .map(|h| Arc::new(h.clone()) as Arc<dyn Tier>)
            .collect();
        tiers.push(Arc::new(host.clone()));
        let mut namespaces = HashMap::new();
        let disk = match &config.disk {
            Some(dc) => {
                let tier = DiskTier::open(dc, Arc::clone(&events))?;
                let demoter =
                    Demoter::start(tier.clone(), config.movement).map_err(OpenError::Movement)?;
                tiers.push(Arc::new(tier.clone()));
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
                Some(DiskSide { tier, demoter })
            }
            None => None,
        };
        let remote = match &config.remote {
            Some(rc) => Some(RemoteTier::open(rc.clone(), Arc::clone(&events))?),
            None => None,
        };
        let sink = HostEvictions {
            demoter: disk.as_ref().map(|d| Arc::clone(&d.demoter)),
            remote: remote.clone().filter(|r| r.config().demote),
        };
        if sink.demoter.is_some() || sink.remote.is_some() {
            host.set_eviction_sink(Arc::new(sink));
        }
        Ok(BlockCache {
            namespaces: RwLock::new(namespaces),
            host,
            hbm,
            gpus,
            disk,
            remote,
            stripes: (0..STRIPES).map(|_| Mutex::new(0)).collect(),
            tiers,
            events,
            leases: Mutex::new(HashMap::new()),
            next_lease: AtomicU64::new(1),
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
    /// on timeout. Without a disk tier, at once.
    pub fn flush_demotions(&self, timeout: Duration) -> bool {
        self.disk.as_ref().is_none_or(|d| d.demoter.flush(timeout))
    }

    /// Waits until the remote tier's write queue is empty; `false` on
    /// timeout. Without a remote tier, at once.
    pub fn flush_remote(&self, timeout: Duration) -> bool {
        self.remote.as_ref().is_none_or(|r| r.flush(timeout))
    }

    /// Periodic upkeep: persists changed disk access times (so a restart keeps
    /// the LRU order). Cheap when nothing changed.
    pub fn maintain(&self) {
        if let Some(d) = &self.disk
            && let Err(e) = d.tier.persist_access()
        {
            tracing::warn!(error = %e, "disk tier: access times not persisted");
        }
    }

    fn stripe(&self, ns: &NamespaceId, key: &BlockKey) -> &Mutex<u64> {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(ns.as_bytes());
        h.update(key.as_bytes());
        &self.stripes[(h.digest() as usize) % self.stripes.len()]
    }

    /// The key's stripe lock, taken by a writer (put or delete): its write
    /// epoch moves on, so a promotion that read older bytes does not publish them.
    fn write_stripe(&self, ns: &NamespaceId, key: &BlockKey) -> MutexGuard<'_, u64> {
        let mut guard = self.stripe(ns, key).lock();
        *guard += 1;
        guard
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
        tracing::info!(namespace = %ns.id, model = %ns.spec.model_id, block_bytes = ns.block_bytes, write_through = ns.policy.write_through, "namespace registered");
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

    /// Longest cached prefix of `keys`: the tier of each leading hit.
    pub fn lookup(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Result<Vec<TierKind>, CacheError> {
        self.namespace("namespace_id", ns)?;
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let mut tiers = Vec::new();
        for k in keys {
            match self.tiers.iter().find(|t| t.contains(ns, k)) {
                Some(t) => tiers.push(t.kind()),
                None => break,
            }
        }
        let Some(r) = self.remote.as_ref().filter(|_| tiers.len() < keys.len()) else {
            return Ok(tiers);
        };
        // Past the local prefix: each key from a local tier if one has it,
        // else from the cluster (asked once for all of them).
        let rest = &keys[tiers.len()..];
        let local: Vec<Option<TierKind>> = rest
            .iter()
            .map(|k| {
                self.tiers
                    .iter()
                    .find(|t| t.contains(ns, k))
                    .map(|t| t.kind())
            })
            .collect();
        let ask: Vec<BlockKey> = rest
            .iter()
            .zip(&local)
            .filter(|(_, l)| l.is_none())
            .map(|(k, _)| *k)
            .collect();
        let mut remote = r.exists_many(ns, &ask).into_iter();
        for l in local {
            match l {
                Some(t) => tiers.push(t),
                None if remote.next() == Some(true) => tiers.push(TierKind::Remote),
                None => break,
            }
        }
        Ok(tiers)
    }

    /// Stores a batch. Validates every item first (payload size, a parent
    /// other than the block itself); on error nothing is stored. Parents are
    /// keys of the same namespace. A put under a cached key replaces the old
    /// block, pinned or not; pins held on the old block then cover nothing.
    pub fn put_batch(
        &self,
        ns: &NamespaceId,
        items: &[PutBlock],
    ) -> Result<Vec<PutOutcome>, CacheError> {
        let namespace = self.namespace("namespace_id", ns)?;
        for (i, item) in items.iter().enumerate() {
            if item.payload.len() as u64 != namespace.block_bytes {
                return Err(CacheError::invalid(
                    format!("items[{i}].payload"),
                    format!(
                        "{} bytes, but namespace {} stores blocks of exactly {} bytes",
                        item.payload.len(),
                        ns,
                        namespace.block_bytes
                    ),
                ));
            }
            if item.parent.as_ref() == Some(&item.key) {
                return Err(CacheError::invalid(
                    format!("items[{i}].parent"),
                    "a block cannot be its own parent",
                ));
            }
        }
        Ok(items
            .iter()
            .map(|item| {
                let _stripe = self.write_stripe(ns, &item.key);
                // Before the host put: an eviction of the new block that races
                // with this put then queues its write after this one.
                if let Some(r) = &self.remote {
                    if namespace.policy.remote_write_through || r.config().write_through {
                        r.enqueue_put(
                            ns,
                            &item.key,
                            item.parent.as_ref(),
                            Bytes::copy_from_slice(&item.payload),
                            true,
                        );
                    } else {
                        r.enqueue_delete(ns, &item.key);
                    }
                }
                // T0 copies go first: a T0 demotion of the old block can
                // then no longer publish it in the host tier after this put.
                self.drop_hbm_copies(ns, &item.key, None);
                let out = self
                    .host
                    .put(ns, &item.key, item.parent.as_ref(), &item.payload);
                if let Some(d) = &self.disk {
                    d.demoter.forget(ns, &item.key);
                    if d.tier.contains(ns, &item.key) {
                        d.tier.remove(ns, &item.key, RemoveReason::Delete);
                    }
                    if namespace.policy.write_through {
                        // The disk write runs after this call returns: it gets
                        // its own copy, never the caller's buffer (which may be
                        // a client's shared-memory pool, reused at once).
                        d.demoter.write_through(
                            ns,
                            &item.key,
                            item.parent.as_ref(),
                            Bytes::copy_from_slice(&item.payload),
                        );
                    }
                }
                out
            })
            .collect())
    }

    /// Reads a batch: for each key the exact bytes and the tier, or `None`.
    pub fn get_batch(
        &self,
        ns: &NamespaceId,
        keys: &[BlockKey],
    ) -> Result<Vec<Option<(Bytes, TierKind)>>, CacheError> {
        let namespace = self.namespace("namespace_id", ns)?;
        let mut out: Vec<Option<(Bytes, TierKind)>> = keys
            .iter()
            .map(|k| {
                self.hbm
                    .iter()
                    .find_map(|h| h.get(ns, k).map(|b| (b, TierKind::Hbm)))
                    .or_else(|| self.host.get(ns, k).map(|b| (b, TierKind::Host)))
            })
            .collect();
        if let Some(d) = &self.disk {
            let missed: Vec<usize> = (0..keys.len()).filter(|&i| out[i].is_none()).collect();
            if !missed.is_empty() {
                let miss_keys: Vec<BlockKey> = missed.iter().map(|&i| keys[i]).collect();
                let reads = d.tier.read_many(ns, &miss_keys);
                for (i, read) in missed.into_iter().zip(reads) {
                    if let Some(read) = read {
                        if d.demoter.config().promote_on_get {
                            self.promote(d, ns, &keys[i], &read);
                        }
                        out[i] = Some((read.payload, TierKind::Disk));
                    }
                }
            }
        }
        if let Some(r) = &self.remote {
            let missed: Vec<usize> = (0..keys.len()).filter(|&i| out[i].is_none()).collect();
            if !missed.is_empty() {
                let miss_keys: Vec<BlockKey> = missed.iter().map(|&i| keys[i]).collect();
                let reads = r.get_many(ns, &miss_keys, namespace.block_bytes);
                for (i, read) in missed.into_iter().zip(reads) {
                    if let Some(read) = read {
                        if r.config().promote_on_get {
                            self.promote_remote(r, ns, &keys[i], &read);
                        }
                        out[i] = Some((read.payload, TierKind::Remote));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Copies a block read from the cluster into the host tier, unless a
    /// local tier already has the key (a put since the read, or a promotion
    /// by a concurrent get).
    fn promote_remote(&self, r: &RemoteTier, ns: &NamespaceId, key: &BlockKey, read: &RemoteBlock) {
        let _stripe = self.stripe(ns, key).lock();
        if self.tiers.iter().any(|t| t.contains(ns, key)) {
            return;
        }
        if self.host.put(ns, key, read.parent.as_ref(), &read.payload) == PutOutcome::Stored {
            r.count_promotion();
        }
    }

    /// Copies a block read from disk into the host tier, unless the host
    /// already has the key or a put has replaced the version read.
    fn promote(&self, d: &DiskSide, ns: &NamespaceId, key: &BlockKey, read: &DiskRead) {
        let _stripe = self.stripe(ns, key).lock();
        if self.host.contains(ns, key) || !d.tier.is_current(ns, key, read.seq) {
            return;
        }
        if self.host.put(ns, key, read.parent.as_ref(), &read.payload) == PutOutcome::Stored {
            d.demoter.count_promotion();
        }
    }

    /// Removes the key from every HBM tier but `except` (a put's
    /// replacement rule: no T0 copy may outlive a newer put).
    fn drop_hbm_copies(&self, ns: &NamespaceId, key: &BlockKey, except: Option<usize>) {
        for h in &self.hbm {
            if Some(h.device()) != except {
                h.remove(ns, key, RemoveReason::Delete);
            }
        }
    }

    fn check_device(&self, device: usize) -> Result<&Gpu, CacheError> {
        self.gpus.get(device).ok_or_else(|| {
            CacheError::invalid(
                "device",
                format!(
                    "device {device} does not exist (the daemon has {} GPU{})",
                    self.gpus.len(),
                    if self.gpus.len() == 1 { "" } else { "s" }
                ),
            )
        })
    }

    /// Stores blocks whose bytes a device writes (the CUDA-IPC data path).
    ///
    /// Reserves a slot per item — in device `device`'s HBM tier, or in the
    /// (pinned) host tier when there is no HBM tier or it has no room —
    /// then calls `fill` once with the device-reachable address of every
    /// slot, in item order (`block_bytes` of the namespace each). `fill` must
    /// have written them all, and waited for its copies to complete, when it
    /// returns. The slots are then read back for their xxh3-64 checksums
    /// and published; any older version of each key leaves every tier, as
    /// with [`BlockCache::put_batch`] (and the namespace's write-through
    /// policies apply).
    ///
    /// All or nothing: when some slot cannot be reserved (everything
    /// evictable is pinned or being read) `fill` is not called and every item
    /// answers `NoSpace`; when `fill` fails every slot is freed and its error
    /// returned. Items are validated first (a block cannot be its own
    /// parent; `device` must exist); an empty batch does not call `fill`.
    pub fn put_from_device<E>(
        &self,
        ns: &NamespaceId,
        device: usize,
        items: &[(BlockKey, Option<BlockKey>)],
        fill: impl FnOnce(&[u64]) -> Result<(), E>,
    ) -> Result<Vec<PutOutcome>, DevicePutError<E>> {
        let namespace = self.namespace("namespace_id", ns)?;
        self.check_device(device)?;
        for (i, (key, parent)) in items.iter().enumerate() {
            if parent.as_ref() == Some(key) {
                return Err(CacheError::invalid(
                    format!("items[{i}].parent"),
                    "a block cannot be its own parent",
                )
                .into());
            }
        }
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let len = namespace.block_bytes as usize;
        let hbm = self.hbm.get(device);
        let mut slots: Vec<DeviceSlot> = Vec::with_capacity(items.len());
        for _ in items {
            let slot = match hbm.and_then(|h| h.reserve(len)) {
                Some(s) => Some(DeviceSlot::Hbm(s)),
                None => self
                    .host
                    .reserve(len)
                    .and_then(|s| s.device_addr().is_some().then_some(DeviceSlot::Host(s))),
            };
            match slot {
                Some(s) => slots.push(s),
                None => return Ok(vec![PutOutcome::NoSpace; items.len()]),
            }
        }
        let addrs: Vec<u64> = slots.iter().map(DeviceSlot::addr).collect();
        fill(&addrs).map_err(DevicePutError::Fill)?;

        // Checksums of the T0 slots: hashed on the device, or read back
        // through pinned memory when a write-through policy needs their
        // bytes (kept) or the device cannot hash.
        let remote_wt = self
            .remote
            .as_ref()
            .is_some_and(|r| namespace.policy.remote_write_through || r.config().write_through);
        let disk_wt = self.disk.is_some() && namespace.policy.write_through;
        let keep = remote_wt || disk_wt;
        let mut checksums: Vec<Option<u64>> = vec![None; items.len()];
        let mut copies: Vec<Option<Bytes>> = vec![None; items.len()];
        if let Some(h) = hbm {
            let at: Vec<usize> = (0..slots.len())
                .filter(|&i| matches!(slots[i], DeviceSlot::Hbm(_)))
                .collect();
            let hbm_addrs: Vec<u64> = at.iter().map(|&i| addrs[i]).collect();
            // Without a write-through the bytes stay on the device: hashed
            // there, nothing is read back.
            let on_device = match keep {
                true => None,
                false => match h.hash_on_device(&hbm_addrs, len) {
                    Ok(sums) => Some(sums),
                    Err(e) => {
                        tracing::warn!(error = %e, "hbm tier: device hashing failed; reading the blocks back to hash them");
                        None
                    }
                },
            };
            match on_device {
                Some(sums) => {
                    for (&i, sum) in at.iter().zip(sums) {
                        checksums[i] = Some(sum);
                    }
                }
                None => h
                    .read_back(&hbm_addrs, len, |first, blocks| {
                        // Hashed in parallel: a staging buffer holds many blocks.
                        let sums: Vec<u64> = blocks.par_iter().map(|b| xxh3_64(b)).collect();
                        for (j, (bytes, sum)) in blocks.iter().zip(sums).enumerate() {
                            checksums[at[first + j]] = Some(sum);
                            if keep {
                                copies[at[first + j]] = Some(Bytes::copy_from_slice(bytes));
                            }
                        }
                    })
                    .map_err(|e| CacheError::device("items", &e))?,
            }
        }

        let mut out = Vec::with_capacity(items.len());
        for (i, ((key, parent), slot)) in items.iter().zip(slots).enumerate() {
            let _stripe = self.write_stripe(ns, key);
            // The older version leaves every tier first (T0 first, so no T0
            // demotion of it can reach the host tier afterwards); then the
            // new block is published.
            self.drop_hbm_copies(ns, key, None);
            self.host.remove(ns, key, RemoveReason::Delete);
            if let Some(d) = &self.disk {
                d.demoter.forget(ns, key);
                if d.tier.contains(ns, key) {
                    d.tier.remove(ns, key, RemoveReason::Delete);
                }
            }
            if let DeviceSlot::Host(s) = &slot
                && keep
            {
                copies[i] = Some(Bytes::copy_from_slice(s.as_slice()));
            }
            // Before the publish, as in `put_batch`: a demotion of the new
            // block that races with this put then queues its write after this.
            if let Some(r) = &self.remote {
                match copies[i].clone().filter(|_| remote_wt) {
                    Some(bytes) => {
                        r.enqueue_put(ns, key, parent.as_ref(), bytes, true);
                    }
                    None => r.enqueue_delete(ns, key),
                }
            }
            let outcome = match slot {
                DeviceSlot::Hbm(s) => match (hbm, checksums[i]) {
                    (Some(h), Some(c)) => h.publish(s, ns, key, parent.as_ref(), c),
                    _ => PutOutcome::NoSpace,
                },
                DeviceSlot::Host(s) => match self.host.publish(s, ns, key, parent.as_ref(), None) {
                    Ok(_) => PutOutcome::Stored,
                    Err(_) => PutOutcome::NoSpace,
                },
            };
            if let (Some(d), Some(bytes)) = (&self.disk, copies[i].take().filter(|_| disk_wt)) {
                d.demoter.write_through(ns, key, parent.as_ref(), bytes);
            }
            out.push(outcome);
        }
        Ok(out)
    }

    /// Lends device-reachable addresses of the exact bytes of `keys` to
    /// `use_blocks` (the CUDA-IPC data path: the caller scatters from them
    /// into an engine's pages and waits for its copies before returning).
    ///
    /// For each key, `Some((address, tier))` of `block_bytes` bytes, or
    /// `None` for a miss: device `device`'s HBM slot (held by a reader
    /// count), else the pinned host slot (held likewise), else the bytes of
    /// another device's HBM tier, the disk or the remote tier staged in one
    /// pinned buffer from [`Gpu::alloc_pinned`]. Every address stays valid
    /// and unchanged until `use_blocks` returns. Afterwards, with the HBM
    /// tier's `promote_on_device_get`, the blocks now in the host tier are
    /// copied into device `device`'s HBM tier.
    ///
    /// Checksums: staged bytes were verified by their tier's read path (the
    /// disk and remote tiers check theirs, an HBM tier's `get` checks its
    /// copy); a slot lent in place is the one published with its checksum
    /// and never written while lent, and is not re-hashed (that would cost
    /// a read-back of every block).
    pub fn get_to_device<R>(
        &self,
        ns: &NamespaceId,
        device: usize,
        keys: &[BlockKey],
        use_blocks: impl FnOnce(&[Option<(u64, TierKind)>]) -> R,
    ) -> Result<R, CacheError> {
        let began = Instant::now();
        self.namespace("namespace_id", ns)?;
        let gpu = self.check_device(device)?;
        let hbm = self.hbm.get(device);
        let promote_to = hbm.filter(|h| h.config().promote_on_device_get);
        let mut addrs: Vec<Option<(u64, TierKind)>> = vec![None; keys.len()];
        let mut hbm_reads: Vec<HbmRead> = Vec::new();
        // Host-tier blocks lent in place; with promotion on, with their
        // metadata and stripe epoch (read first), so the promotion below
        // reuses these reads.
        let mut host_reads: Vec<HostRead> = Vec::new();
        let mut missed: Vec<usize> = Vec::new();
        // One lock per tier for the whole batch: HBM first, then the host
        // tier for the rest (each stripe's epoch read before its block).
        let mut in_host: Vec<usize> = Vec::new();
        match hbm {
            Some(h) => {
                for (i, read) in h.acquire_many(ns, keys).into_iter().enumerate() {
                    match read {
                        Some(read) => {
                            addrs[i] = Some((read.addr(), TierKind::Hbm));
                            hbm_reads.push(read);
                        }
                        None => in_host.push(i),
                    }
                }
            }
            None => in_host.extend(0..keys.len()),
        }
        let epochs: Vec<u64> = match promote_to {
            Some(_) => in_host
                .iter()
                .map(|&i| *self.stripe(ns, &keys[i]).lock())
                .collect(),
            None => vec![0; in_host.len()],
        };
        let host_keys: Vec<BlockKey> = in_host.iter().map(|&i| keys[i]).collect();
        let found = self.host.get_many_with_meta(ns, &host_keys);
        for ((&i, epoch), hit) in in_host.iter().zip(epochs).zip(found) {
            if let Some((bytes, meta)) = hit
                && let Some(addr) = self.host.device_addr(&bytes)
            {
                addrs[i] = Some((addr, TierKind::Host));
                host_reads.push(HostRead {
                    key: keys[i],
                    bytes,
                    parent: meta.parent,
                    checksum: meta.checksum,
                    epoch,
                });
                continue;
            }
            missed.push(i);
        }
        // The rest through the ordinary read path, staged in pinned memory
        // (lent from the device's staging cache).
        let mut staging: Option<StagingBuffer> = None;
        if !missed.is_empty() {
            let miss_keys: Vec<BlockKey> = missed.iter().map(|&i| keys[i]).collect();
            let found = self.get_batch(ns, &miss_keys)?;
            let total: usize = found.iter().flatten().map(|(b, _)| b.len()).sum();
            if total > 0 {
                let mut buf = gpu
                    .staging(total)
                    .map_err(|e| CacheError::device("keys", &e))?;
                let base = buf.device_ptr();
                let bytes = buf.as_mut_slice();
                let mut at = 0;
                for (&i, hit) in missed.iter().zip(&found) {
                    if let Some((b, tier)) = hit {
                        bytes[at..at + b.len()].copy_from_slice(b);
                        addrs[i] = Some((base + at as u64, *tier));
                        at += b.len();
                    }
                }
                staging = Some(buf);
            }
        }
        let looked_up = began.elapsed();
        let result = use_blocks(&addrs);
        drop(hbm_reads);
        drop(staging);
        let used = began.elapsed();
        if let Some(h) = promote_to {
            // Served from the disk or remote tier: in the host tier now
            // (their promotion on get), read again below.
            let staged: Vec<BlockKey> = missed
                .iter()
                .filter(|&&i| addrs[i].is_some())
                .map(|&i| keys[i])
                .collect();
            self.promote_to_hbm(h, ns, host_reads, &staged);
        }
        tracing::debug!(
            keys = keys.len(),
            lookups_us = looked_up.as_micros() as u64,
            total_us = began.elapsed().as_micros() as u64,
            promotion_us = (began.elapsed() - used).as_micros() as u64,
            "get_to_device"
        );
        Ok(result)
    }

    /// Copies host-resident blocks into an HBM tier (those it lacks), in
    /// batches ([`HbmTier::copy_in`]): the blocks `held` (read by the
    /// caller, each with its stripe's write epoch read first), then the
    /// `others`, read here lazily while earlier groups copy. A block is
    /// published, under its stripe lock, only if no put or delete under that
    /// stripe ran since its epoch was read, so the bytes promoted are the
    /// host tier's current ones.
    fn promote_to_hbm(
        &self,
        h: &HbmTier,
        ns: &NamespaceId,
        held: Vec<HostRead>,
        others: &[BlockKey],
    ) {
        let reread = others.iter().filter_map(|k| {
            let epoch = *self.stripe(ns, k).lock();
            let (bytes, meta) = self.host.get_with_meta(ns, k)?;
            Some(HostRead {
                key: *k,
                bytes,
                parent: meta.parent,
                checksum: meta.checksum,
                epoch,
            })
        });
        let mut seen = std::collections::HashSet::new();
        let srcs = held
            .into_iter()
            .chain(reread)
            .filter(|r| seen.insert(r.key) && !h.contains(ns, &r.key))
            .map(|r| {
                let device = self.host.device_addr(&r.bytes);
                let HostRead {
                    key,
                    bytes,
                    parent,
                    checksum,
                    epoch,
                } = r;
                ((key, parent, checksum, epoch), bytes, device)
            });
        // Each group is published while the next ones copy.
        h.copy_in(srcs, |group| {
            for ((key, parent, checksum, epoch), slot) in group {
                let Some(slot) = slot else {
                    continue;
                };
                let stripe = self.stripe(ns, &key).lock();
                // A put or delete ran meanwhile (or another promotion won):
                // the slot is freed unpublished.
                if *stripe == epoch && !h.contains(ns, &key) {
                    h.publish_promotion(slot, ns, &key, parent.as_ref(), checksum);
                }
            }
        });
    }

    /// Deletes keys from every tier; returns how many blocks were removed.
    pub fn delete(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Result<u32, CacheError> {
        self.namespace("namespace_id", ns)?;
        let mut n = 0;
        for k in keys {
            let _stripe = self.write_stripe(ns, k);
            if let Some(r) = &self.remote {
                r.enqueue_delete(ns, k);
            }
            // The host copy goes first (`tiers` is fastest first). Until it is
            // gone, a put of another key may evict it and queue it for the
            // disk; forgetting queued demotions before that would let such a
            // write publish the deleted block on disk after this returns (a
            // stale read the 32-client stress test caught). So: host, then
            // forget, then disk.
            for t in &self.tiers {
                if t.kind() == TierKind::Disk
                    && let Some(d) = &self.disk
                {
                    d.demoter.forget(ns, k);
                }
                if t.remove(ns, k, RemoveReason::Delete) == RemoveOutcome::Removed {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Demotes keys (or, with `all`, the whole namespace) one tier down: a
    /// host-tier block is written to disk (now, not through the queue) and
    /// leaves the host tier; a block only on disk (or with no disk tier, only
    /// in the host tier) is dropped. Returns (evicted, skipped because pinned).
    pub fn evict(
        &self,
        ns: &NamespaceId,
        keys: &[BlockKey],
        all: bool,
    ) -> Result<(u32, u32), CacheError> {
        let began = Instant::now();
        self.namespace("namespace_id", ns)?;
        let keys: Vec<BlockKey> = if all {
            let mut v = Vec::new();
            let mut seen = std::collections::HashSet::new();
            let mut sources: Vec<&dyn Tier> = self.hbm.iter().map(|h| h as &dyn Tier).collect();
            sources.push(&self.host);
            if let Some(d) = &self.disk {
                sources.push(&d.tier);
            }
            for t in sources {
                v.extend(t.keys_of(ns).into_iter().filter(|k| seen.insert(*k)));
            }
            v
        } else {
            // Each key once: a repeated key is not evicted two tiers down.
            let mut seen = std::collections::HashSet::new();
            keys.iter().filter(|k| seen.insert(**k)).copied().collect()
        };
        let (mut evicted, mut pinned) = (0, 0);
        // T0 blocks go one tier down in batches (one launch and fence per
        // group, checksums in parallel; see `HbmTier::demote_many`). No
        // stripe lock is needed: a put removes T0 copies under the T0 lock
        // before it writes the host tier, and a drain publishes only a block
        // still live.
        tracing::debug!(
            keys = keys.len(),
            listing_us = began.elapsed().as_micros() as u64,
            "evict"
        );
        let mut in_t0: Vec<Option<RemoveOutcome>> = vec![None; keys.len()];
        for h in &self.hbm {
            for (i, outcome) in h.demote_many(ns, &keys).into_iter().enumerate() {
                // Pinned in any T0 wins; then removed from one.
                in_t0[i] = match (in_t0[i], outcome) {
                    (Some(RemoveOutcome::Pinned), _) | (_, RemoveOutcome::Pinned) => {
                        Some(RemoveOutcome::Pinned)
                    }
                    (Some(RemoveOutcome::Removed), _) | (_, RemoveOutcome::Removed) => {
                        Some(RemoveOutcome::Removed)
                    }
                    _ => None,
                };
            }
        }
        for (i, k) in keys.iter().enumerate() {
            let outcome = match in_t0[i] {
                Some(done) => done,
                None => self.evict_one(ns, k),
            };
            match outcome {
                RemoveOutcome::Removed => evicted += 1,
                RemoveOutcome::Pinned => pinned += 1,
                RemoveOutcome::Missing => {}
            }
        }
        Ok((evicted, pinned))
    }

    fn evict_one(&self, ns: &NamespaceId, key: &BlockKey) -> RemoveOutcome {
        let _stripe = self.stripe(ns, key).lock();
        // In T0: one tier down is the host tier.
        let in_hbm: Vec<&HbmTier> = self.hbm.iter().filter(|h| h.contains(ns, key)).collect();
        if !in_hbm.is_empty() {
            let mut out = RemoveOutcome::Missing;
            for h in in_hbm {
                match h.demote(ns, key) {
                    RemoveOutcome::Pinned => return RemoveOutcome::Pinned,
                    RemoveOutcome::Removed => out = RemoveOutcome::Removed,
                    RemoveOutcome::Missing => {}
                }
            }
            return out;
        }
        let Some(meta) = self.host.meta(ns, key) else {
            return match &self.disk {
                Some(d) => d.tier.remove(ns, key, RemoveReason::Evict),
                None => RemoveOutcome::Missing,
            };
        };
        if meta.pins > 0 {
            return RemoveOutcome::Pinned;
        }
        if let Some(d) = &self.disk
            && !d.tier.holds(ns, key, meta.checksum)
            && let Some(bytes) = self.host.get(ns, key)
        {
            d.demoter.forget(ns, key);
            let item = DiskPut {
                key: *key,
                parent: meta.parent,
                payload: &bytes,
            };
            d.tier.put_many(ns, &[item]);
        }
        if let Some(r) = self.remote.as_ref().filter(|r| r.config().demote)
            && let Some(bytes) = self.host.get(ns, key)
        {
            let copy = Bytes::copy_from_slice(&bytes);
            r.enqueue_put(ns, key, meta.parent.as_ref(), copy, false);
        }
        self.host.remove(ns, key, RemoveReason::Evict)
    }

    /// Pins every key (all or none) until `lease` has passed or `unpin`.
    pub fn pin(
        &self,
        ns: &NamespaceId,
        keys: &[BlockKey],
        lease: Duration,
    ) -> Result<LeaseInfo, CacheError> {
        self.namespace("namespace_id", ns)?;
        if lease.is_zero() {
            return Err(CacheError::invalid("lease_ms", "must be at least 1"));
        }
        if lease > self.config.max_lease {
            return Err(CacheError::invalid(
                "lease_ms",
                format!(
                    "{} ms exceeds the limit of {} ms",
                    lease.as_millis(),
                    self.config.max_lease.as_millis()
                ),
            ));
        }
        if keys.is_empty() {
            return Err(CacheError::invalid("keys", "must name at least one block"));
        }
        let tokens = self.pin_all(ns, keys)?;
        let lease_id = self.next_lease.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + lease;
        self.leases
            .lock()
            .insert(lease_id, Lease { tokens, deadline });
        Ok(LeaseInfo {
            lease_id,
            deadline_unix_ms: unix_ms(SystemTime::now() + lease),
        })
    }

    /// Pins each key in the fastest tier holding it; all or none.
    fn pin_all(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Result<Vec<PinToken>, CacheError> {
        let not_cached = |i: usize| CacheError::BlockNotCached {
            field: format!("keys[{i}]"),
            key: keys[i].to_string(),
        };
        let mut tokens = Vec::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            let pinned = self
                .tiers
                .iter()
                .find_map(|t| t.pin(ns, std::slice::from_ref(k)).ok());
            match pinned {
                Some(mut t) => tokens.append(&mut t),
                None => {
                    for t in &tokens {
                        self.unpin_token(t);
                    }
                    return Err(not_cached(i));
                }
            }
        }
        Ok(tokens)
    }

    fn unpin_token(&self, token: &PinToken) {
        // Several HBM tiers share a kind; incarnations are disjoint between
        // tiers, so only the one that issued the token matches it.
        for t in self.tiers.iter().filter(|t| t.kind() == token.tier) {
            t.unpin(token);
        }
    }

    /// Ends a lease.
    pub fn unpin(&self, lease_id: u64) -> Result<(), CacheError> {
        let lease = self
            .leases
            .lock()
            .remove(&lease_id)
            .ok_or(CacheError::LeaseNotFound(lease_id))?;
        self.release(&lease);
        Ok(())
    }

    fn release(&self, lease: &Lease) {
        for t in &lease.tokens {
            self.unpin_token(t);
        }
    }

    /// Ends every lease past its deadline; returns how many ended.
    pub fn expire_leases(&self) -> usize {
        let now = Instant::now();
        let expired: Vec<Lease> = {
            let mut leases = self.leases.lock();
            let ids: Vec<u64> = leases
                .iter()
                .filter(|(_, l)| l.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter()
                .filter_map(|id| leases.remove(&id))
                .collect()
        };
        for l in &expired {
            self.release(l);
        }
        expired.len()
    }

    pub fn stats(&self) -> CacheStats {
        let mut tiers: Vec<(TierKind, TierStats)> =
            self.tiers.iter().map(|t| (t.kind(), t.stats())).collect();
        let remote = self.remote.as_ref().map(|r| r.stats());
        if let Some(r) = &remote {
            // The cluster's capacity and occupancy are its own (maxmemory).
            tiers.push((
                TierKind::Remote,
                TierStats {
                    hits: r.hits,
                    misses: r.misses,
                    bytes_in: r.write_bytes,
                    bytes_out: r.read_bytes,
                    rejected_puts: r.queue_dropped,
                    ..TierStats::default()
                },
            ));
        }
        CacheStats {
            tiers,
            namespaces: self.namespaces.read().len() as u32,
            active_leases: self.leases.lock().len() as u32,
            uptime: self.started.elapsed(),
            event_seq: self.events.last_seq(),
            lookups: self.lookups.load(Ordering::Relaxed),
            disk: self.disk.as_ref().map(|d| d.tier.disk_stats()),
            movement: self.disk.as_ref().map(|d| d.demoter.stats()),
            remote,
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

    /// Metadata of a block plus a checksum of its bytes computed now, and its
    /// disk slot's header when the disk tier holds it. Reports only: a corrupt
    /// disk slot is shown, not dropped.
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
        for h in &self.hbm {
            if let Some(meta) = h.meta(ns, key)
                && let Some(read) = h.acquire(ns, key)
            {
                let mut payload_xxh3 = None;
                h.read_back(&[read.addr()], read.len(), |_, blocks| {
                    payload_xxh3 = blocks.first().map(|b| xxh3_64(b))
                })
                .map_err(|e| CacheError::device("key", &e))?;
                if let Some(payload_xxh3) = payload_xxh3 {
                    return Ok(Some(Inspection {
                        meta,
                        payload_xxh3,
                        disk,
                    }));
                }
            }
        }
        if let Some(meta) = self.host.meta(ns, key)
            && let Some(bytes) = self.host.get(ns, key)
        {
            return Ok(Some(Inspection {
                meta,
                payload_xxh3: xxh3_64(&bytes),
                disk,
            }));
        }
        // Only on disk: report what the slot holds now, without the read
        // path's verification (which would drop a corrupt slot).
        Ok(self.disk.as_ref().and_then(|d| {
            let meta = d.tier.meta(ns, key)?;
            let payload_xxh3 = disk.as_ref()?.payload_xxh3;
            Some(Inspection {
                meta,
                payload_xxh3,
                disk,
            })
        }))
    }

    pub fn subscribe(&self) -> broadcast::Receiver<CacheEvent> {
        self.events.subscribe()
    }
}

impl Drop for BlockCache {
    fn drop(&mut self) {
        // Let the writer finish the queue and release the disk tier, so the
        // same paths can be opened again as soon as the cache is gone.
        if let Some(d) = &self.disk {
            d.demoter.close();
        }
        if let Some(r) = &self.remote {
            r.close(Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::namespace::Dtype;

    fn cache(capacity: u64) -> (BlockCache, NamespaceId, u64) {
        let cfg = CacheConfig {
            host: HostTierConfig {
                capacity_bytes: capacity,
                segment_bytes: 64 << 20,
            },
            ..CacheConfig::default()
        };
        let c = BlockCache::new(cfg).unwrap();
        let (ns, created) = c
            .register_namespace(NamespaceSpec::layer_major("m", 2, 1, 64, Dtype::F16, 16))
            .unwrap();
        assert!(created);
        (c, ns.id, ns.block_bytes)
    }

    fn k(s: &str) -> BlockKey {
        BlockKey::new("k", s.as_bytes()).unwrap()
    }

    #[test]
    fn bad_batch_changes_nothing() {
        let (c, ns, bb) = cache(1 << 20);
        let good = PutBlock {
            key: k("a"),
            parent: None,
            payload: Bytes::from(vec![1; bb as usize]),
        };
        let bad = PutBlock {
            key: k("b"),
            parent: None,
            payload: Bytes::from(vec![1; 3]),
        };
        let e = c.put_batch(&ns, &[good, bad]).unwrap_err();
        assert!(e.to_string().contains("items[1].payload"), "{e}");
        assert_eq!(c.stats().tiers[0].1.blocks, 0);
    }

    #[test]
    fn lease_expiry_unpins() {
        let (c, ns, bb) = cache(1 << 20);
        let item = PutBlock {
            key: k("a"),
            parent: None,
            payload: Bytes::from(vec![1; bb as usize]),
        };
        c.put_batch(&ns, &[item]).unwrap();
        let l = c.pin(&ns, &[k("a")], Duration::from_millis(1)).unwrap();
        assert_eq!(c.stats().tiers[0].1.pinned_blocks, 1);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(c.expire_leases(), 1);
        assert_eq!(c.stats().tiers[0].1.pinned_blocks, 0);
        assert_eq!(
            c.unpin(l.lease_id),
            Err(CacheError::LeaseNotFound(l.lease_id))
        );
    }

    #[test]
    fn listing_pages_cover_everything_once() {
        let (c, ns, bb) = cache(1 << 22);
        let items: Vec<_> = (0..25)
            .map(|i| PutBlock {
                key: k(&format!("b{i}")),
                parent: None,
                payload: Bytes::from(vec![i as u8; bb as usize]),
            })
            .collect();
        c.put_batch(&ns, &items).unwrap();
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let (page, next) = c.list_blocks(Some(&ns), None, cursor, 7).unwrap();
            assert!(page.len() <= 7);
            seen.extend(page.into_iter().map(|m| m.key));
            match next {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 25);
    }
}
