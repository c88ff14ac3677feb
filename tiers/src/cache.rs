//! `BlockCache`: the cache as the server sees it — registered namespaces, the
//! tiers (fastest first), leases and the event bus. Every request-shaped method
//! validates its whole input before changing anything.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tokio::sync::broadcast;
use xxhash_rust::xxh3::xxh3_64;

use crate::error::CacheError;
use crate::events::{CacheEvent, EventBus};
use crate::host::{HostTier, HostTierConfig};
use crate::key::BlockKey;
use crate::namespace::{Namespace, NamespaceId, NamespaceSpec};
use crate::tier::{
    BlockMeta, PinToken, PutOutcome, RemoveOutcome, RemoveReason, Tier, TierKind, TierStats,
};

/// Configuration of the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    pub host: HostTierConfig,
    /// Longest lease a `Pin` may ask for. Default 10 minutes.
    pub max_lease: Duration,
    /// Events kept for slow watchers before they are told they lagged. Default 16384.
    pub event_buffer: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            host: HostTierConfig::default(),
            max_lease: Duration::from_secs(600),
            event_buffer: 16384,
        }
    }
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
}

/// `Inspect`'s answer: metadata plus a checksum computed now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    pub meta: BlockMeta,
    pub payload_xxh3: u64,
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

/// The cache: namespaces, tiers, leases, events.
pub struct BlockCache {
    namespaces: RwLock<HashMap<NamespaceId, Arc<Namespace>>>,
    host: HostTier,
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
    /// Builds the tiers. Fails only if the host arena cannot be reserved.
    pub fn new(config: CacheConfig) -> std::io::Result<Self> {
        let events = Arc::new(EventBus::new(config.event_buffer));
        let host = HostTier::new(&config.host, Arc::clone(&events))?;
        let tiers: Vec<Arc<dyn Tier>> = vec![Arc::new(host.clone())];
        Ok(BlockCache {
            namespaces: RwLock::new(HashMap::new()),
            host,
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

    /// Registers a namespace (idempotent). Returns it and whether it is new.
    pub fn register_namespace(
        &self,
        spec: NamespaceSpec,
    ) -> Result<(Arc<Namespace>, bool), CacheError> {
        let ns = Namespace::new(spec)?;
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
        let mut map = self.namespaces.write();
        if let Some(existing) = map.get(&ns.id) {
            return Ok((Arc::clone(existing), false));
        }
        let ns = Arc::new(ns);
        map.insert(ns.id, Arc::clone(&ns));
        tracing::info!(namespace = %ns.id, model = %ns.spec.model_id, block_bytes = ns.block_bytes, "namespace registered");
        Ok((ns, true))
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
                self.host
                    .put(ns, &item.key, item.parent.as_ref(), &item.payload)
            })
            .collect())
    }

    /// Reads a batch: for each key the exact bytes and the tier, or `None`.
    pub fn get_batch(
        &self,
        ns: &NamespaceId,
        keys: &[BlockKey],
    ) -> Result<Vec<Option<(Bytes, TierKind)>>, CacheError> {
        self.namespace("namespace_id", ns)?;
        Ok(keys.iter().map(|k| self.get_one(ns, k)).collect())
    }

    fn get_one(&self, ns: &NamespaceId, key: &BlockKey) -> Option<(Bytes, TierKind)> {
        self.tiers
            .iter()
            .find_map(|t| t.get(ns, key).map(|b| (b, t.kind())))
    }

    /// Deletes keys from every tier; returns how many blocks were removed.
    pub fn delete(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Result<u32, CacheError> {
        self.namespace("namespace_id", ns)?;
        let mut n = 0;
        for k in keys {
            for t in &self.tiers {
                if t.remove(ns, k, RemoveReason::Delete) == RemoveOutcome::Removed {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Demotes keys (or, with `all`, the whole namespace) out of their tier.
    /// With the host tier as the lowest tier, demotion drops the block.
    /// Returns (evicted, skipped because pinned).
    pub fn evict(
        &self,
        ns: &NamespaceId,
        keys: &[BlockKey],
        all: bool,
    ) -> Result<(u32, u32), CacheError> {
        self.namespace("namespace_id", ns)?;
        let (mut evicted, mut pinned) = (0, 0);
        for t in &self.tiers {
            let keys: Vec<BlockKey> = if all { t.keys_of(ns) } else { keys.to_vec() };
            for k in &keys {
                match t.remove(ns, k, RemoveReason::Evict) {
                    RemoveOutcome::Removed => evicted += 1,
                    RemoveOutcome::Pinned => pinned += 1,
                    RemoveOutcome::Missing => {}
                }
            }
        }
        Ok((evicted, pinned))
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
        let tokens = self
            .host
            .pin(ns, keys)
            .map_err(|i| CacheError::BlockNotCached {
                field: format!("keys[{i}]"),
                key: keys[i].to_string(),
            })?;
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
            self.host.unpin(t);
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
        CacheStats {
            tiers: self.tiers.iter().map(|t| (t.kind(), t.stats())).collect(),
            namespaces: self.namespaces.read().len() as u32,
            active_leases: self.leases.lock().len() as u32,
            uptime: self.started.elapsed(),
            event_seq: self.events.last_seq(),
            lookups: self.lookups.load(Ordering::Relaxed),
        }
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

    /// Metadata of a block plus a checksum of its bytes computed now.
    pub fn inspect(
        &self,
        ns: &NamespaceId,
        key: &BlockKey,
    ) -> Result<Option<Inspection>, CacheError> {
        self.namespace("namespace_id", ns)?;
        for t in &self.tiers {
            if let Some(meta) = t.meta(ns, key)
                && let Some(bytes) = t.get(ns, key)
            {
                return Ok(Some(Inspection {
                    meta,
                    payload_xxh3: xxh3_64(&bytes),
                }));
            }
        }
        Ok(None)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<CacheEvent> {
        self.events.subscribe()
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
