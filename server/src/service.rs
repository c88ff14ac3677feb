//! The `kvstrata.v1.KvCache` gRPC service: validates each request into
//! `kvstrata_tiers` types and hands it to the [`BlockCache`]. Byte copies run on
//! tokio's blocking pool, never on the async executor.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kvstrata_proto::v1 as pb;
use kvstrata_proto::v1::kv_cache_server::KvCache;
use kvstrata_tiers::{
    BlockCache, BlockKey, DevicePutError, NamespaceId, NamespacePolicy, PutBlock, PutOutcome,
    TierKind,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Auth, Caller};
use crate::convert::{self, status};
use crate::limits::{BlockingPool, Deadline, InflightPermit};
use crate::metrics::Metrics;
use crate::pool::{Pool, PoolRegistry, RegionError};
use crate::region::{KvRegion, RegionRegistry};
use crate::region_io;

/// Request limits enforced by the service.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_batch: usize,
    /// Bounds the cache calls run on tokio's blocking pool.
    pub blocking: BlockingPool,
}

/// The service state shared by every connection.
#[derive(Clone)]
pub struct KvCacheService {
    cache: Arc<BlockCache>,
    pools: Arc<PoolRegistry>,
    limits: Limits,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    /// Tenancy checks (none: every caller is an admin).
    auth: Option<Arc<Auth>>,
    /// Registered KV regions and the GPUs (none: requests naming pages fail).
    regions: Option<Arc<RegionRegistry>>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Default and largest ListBlocks page.
const DEFAULT_PAGE: usize = 1000;
const MAX_PAGE: usize = 10_000;
/// GetStream accepts this many times `max_batch` keys.
const STREAM_BATCH_FACTOR: usize = 16;

impl KvCacheService {
    pub fn new(
        cache: Arc<BlockCache>,
        pools: Arc<PoolRegistry>,
        limits: Limits,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        KvCacheService {
            cache,
            pools,
            limits,
            metrics,
            shutdown,
            auth: None,
            regions: None,
        }
    }

    /// Serves `KvPages` from the KV regions of `registry` (and shows its
    /// regions and GPUs in `Stats`).
    pub fn with_regions(mut self, registry: Arc<RegionRegistry>) -> Self {
        self.regions = Some(registry);
        self
    }

    /// The region a request's `KvPages` names, after checking the page list
    /// against its geometry and the namespace (errors name `field`). An
    /// unknown or closed region is the item's own problem (`Ok(Err(..))`).
    fn region_pages(
        &self,
        field: &str,
        pages: &pb::KvPages,
        namespace: &kvstrata_tiers::Namespace,
    ) -> Result<Result<PagesTarget, String>, Status> {
        let Some(registry) = &self.regions else {
            return Ok(Err(format!(
                "KV region {} is not registered (this daemon has no region socket: gpu.region_socket)",
                pages.region_id
            )));
        };
        let region = match registry.get(pages.region_id) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e.to_string())),
        };
        let ppb = check_pages_fit(field, &region, namespace, &pages.page_ids)?;
        Ok(Ok(PagesTarget {
            region,
            pages_per_block: ppb,
            page_ids: pages.page_ids.clone(),
        }))
    }

    /// Enforces namespace tenancy for the [`Caller`] the auth interceptor
    /// attaches to each request (docs/security.md).
    pub fn with_auth(mut self, auth: Arc<Auth>) -> Self {
        self.auth = Some(auth);
        self
    }

    /// Whether `caller` may use the namespace named by `ns_bytes`. Bytes that
    /// are not a namespace id pass: the method's own parsing refuses them.
    fn check_ns(&self, caller: &Caller, ns_bytes: &[u8]) -> Result<(), Status> {
        if *caller == Caller::Admin {
            return Ok(());
        }
        let (Some(auth), Ok(ns)) = (
            &self.auth,
            NamespaceId::from_slice("namespace_id", ns_bytes),
        ) else {
            return Ok(());
        };
        auth.authorize(
            caller,
            &ns,
            self.cache.namespace("namespace_id", &ns).is_ok(),
        )
    }

    /// Whether `caller` sees namespace `ns` in listings (admins see all).
    fn visible(&self, caller: &Caller, ns: &NamespaceId) -> bool {
        match (caller.tenant(), &self.auth) {
            (Some(t), Some(auth)) => auth.owners().owner(ns).as_deref() == Some(t),
            _ => true,
        }
    }

    /// A tenant's registration binds the namespace to it first (refused when
    /// another tenant holds it); a failed registration undoes a new binding.
    async fn register_as(
        &self,
        caller: &Caller,
        spec: kvstrata_tiers::NamespaceSpec,
        policy: Option<NamespacePolicy>,
    ) -> Result<pb::RegisterNamespaceResponse, Status> {
        let claimed = match (caller, &self.auth, spec.normalized().id()) {
            (Caller::Tenant(t), Some(auth), Ok(id)) => match auth.owners().claim(&id, t) {
                Ok(new) => Some((Arc::clone(auth), id, new)),
                Err(_) => {
                    auth.counters()
                        .failure(crate::auth::FailureReason::WrongTenant);
                    return Err(Status::permission_denied(format!(
                        "namespace_id: namespace {} belongs to another tenant (give the spec a distinct model_fingerprint)",
                        hex::encode(id.as_bytes())
                    )));
                }
            },
            _ => None,
        };
        let r = self
            .blocking("register", move |cache| {
                let (ns, created) = cache
                    .register_namespace_with(spec, policy)
                    .map_err(status)?;
                Ok(pb::RegisterNamespaceResponse {
                    namespace_id: Bytes::copy_from_slice(ns.id.as_bytes()),
                    block_bytes: ns.block_bytes,
                    created,
                })
            })
            .await;
        if r.is_err()
            && let Some((auth, id, true)) = claimed
        {
            auth.owners().release(&id);
        }
        r
    }

    fn done<T>(&self, method: &'static str, r: Result<T, Status>) -> Result<Response<T>, Status> {
        let code = match &r {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.metrics.record_request(method, code);
        if let Err(s) = &r
            && s.code() != tonic::Code::NotFound
        {
            tracing::debug!(method, code = ?s.code(), message = s.message(), "request refused");
        }
        r.map(Response::new)
    }

    /// Runs cache work that may touch the disk on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&BlockCache) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let cache = Arc::clone(&self.cache);
        self.limits.blocking.run(what, move || f(&cache)).await?
    }

    /// Validates a put request. Each item becomes its block, or — for an item
    /// whose pool region names no registered pool or lies outside it — the
    /// reason, so that item alone is refused.
    fn parse_put(
        &self,
        req: pb::BatchPutRequest,
    ) -> Result<(NamespaceId, Vec<ParsedItem>), Status> {
        let ns = convert::namespace_id("namespace_id", &req.namespace_id)?;
        convert::check_batch("items", req.items.len(), self.limits.max_batch)?;
        let uses_pools = req
            .items
            .iter()
            .any(|it| it.region.is_some() || it.pages.is_some());
        let namespace = if uses_pools {
            Some(self.cache.namespace("namespace_id", &ns).map_err(status)?)
        } else {
            None
        };
        let items = req
            .items
            .into_iter()
            .enumerate()
            .map(|(i, it)| {
                let key = convert::key(&format!("items[{i}].key"), &it.key)?;
                let parent = convert::optional_key(&format!("items[{i}].parent"), &it.parent)?;
                if let (Some(pages), Some(namespace)) = (&it.pages, &namespace) {
                    if !it.payload.is_empty() {
                        return Err(Status::invalid_argument(format!(
                            "items[{i}].payload: must be empty when items[{i}].pages is set"
                        )));
                    }
                    if it.region.is_some() {
                        return Err(Status::invalid_argument(format!(
                            "items[{i}].region: name a pool region or KV pages, not both"
                        )));
                    }
                    return Ok(
                        match self.region_pages(&format!("items[{i}].pages"), pages, namespace)? {
                            Ok(target) => ParsedItem::Pages {
                                key,
                                parent,
                                target,
                            },
                            Err(e) => ParsedItem::Bad(e),
                        },
                    );
                }
                let payload = match (it.region, &namespace) {
                    (Some(region), Some(namespace)) => {
                        if !it.payload.is_empty() {
                            return Err(Status::invalid_argument(format!(
                                "items[{i}].payload: must be empty when items[{i}].region is set"
                            )));
                        }
                        check_region_length(
                            &format!("items[{i}].region.length"),
                            &region,
                            namespace.block_bytes,
                        )?;
                        self.region_payload(&region)
                    }
                    _ => Ok(it.payload),
                };
                Ok(match payload {
                    Ok(payload) => ParsedItem::Ready(PutBlock {
                        key,
                        parent,
                        payload,
                    }),
                    Err(e) => ParsedItem::Bad(e.to_string()),
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        Ok((ns, items))
    }

    /// A put item's bytes from its pool region, without a copy: the host tier
    /// copies them into its slot (and write-through takes its own copy).
    fn region_payload(&self, region: &pb::PoolRegion) -> Result<Bytes, RegionError> {
        self.pools
            .get(region.pool_id)?
            .region_bytes(region.offset, region.length)
    }

    async fn put(&self, req: pb::BatchPutRequest) -> Result<pb::BatchPutResponse, Status> {
        let (ns, parsed) = self.parse_put(req)?;
        let cache = Arc::clone(&self.cache);
        let registry = self.regions.clone();
        let results = self
            .limits
            .blocking
            .run("put", move || {
                // Every gather runs before anything is stored: the staged ones
                // here, then the direct put (whose failed gather stores
                // nothing), then the rest (src/region_io.rs).
                let plan = gather_pages(&cache, &ns, parsed, registry.as_deref())?;
                let mut direct = Vec::new().into_iter();
                if let Some(d) = &plan.direct {
                    let first = d.items.first().copied().unwrap_or(0);
                    let done = region_io::put_direct(&cache, &ns, d.device, d.pages(), &d.keys)
                        .map_err(|e| match e {
                            DevicePutError::Cache(e) => status(e),
                            DevicePutError::Fill(e) => gather_status(first, e),
                        })?;
                    if let Some(r) = &registry {
                        r.count_moved(done.gathered, 0);
                    }
                    direct = done.outcomes.into_iter();
                }
                let blocks: Vec<PutBlock> = plan
                    .items
                    .iter()
                    .filter_map(|p| match p {
                        Planned::Block(b) => Some(b.clone()),
                        _ => None,
                    })
                    .collect();
                let mut outcomes = cache.put_batch(&ns, &blocks).map_err(status)?.into_iter();
                let code = |o: Option<PutOutcome>| match o {
                    Some(PutOutcome::Stored) => pb::PutStatus::Stored,
                    Some(PutOutcome::NoSpace) | None => pb::PutStatus::NoSpace,
                };
                Ok::<_, Status>(
                    plan.items
                        .iter()
                        .map(|p| match p {
                            Planned::Block(_) => code(outcomes.next()),
                            Planned::Direct => code(direct.next()),
                            Planned::Bad(why) => {
                                tracing::debug!(reason = %why, "put item refused: BAD_REGION");
                                pb::PutStatus::BadRegion
                            }
                        } as i32)
                        .collect::<Vec<i32>>(),
                )
            })
            .await??;
        let stored = results
            .iter()
            .filter(|&&r| r == pb::PutStatus::Stored as i32)
            .count() as u32;
        Ok(pb::BatchPutResponse { results, stored })
    }

    /// Where each key's block goes when the request names pool regions: the
    /// pool and offset, or why that region cannot be used.
    fn get_targets(
        &self,
        ns: &NamespaceId,
        key_count: usize,
        regions: &[pb::PoolRegion],
    ) -> Result<Vec<GetTarget>, Status> {
        if regions.len() != key_count {
            return Err(Status::invalid_argument(format!(
                "regions: {} given for {key_count} keys; give one per key, or none for inline payloads",
                regions.len()
            )));
        }
        let namespace = self.cache.namespace("namespace_id", ns).map_err(status)?;
        regions
            .iter()
            .enumerate()
            .map(|(i, r)| {
                check_region_length(&format!("regions[{i}].length"), r, namespace.block_bytes)?;
                Ok(self.pools.get(r.pool_id).and_then(|pool| {
                    pool.range(r.offset, r.length)?;
                    Ok((pool, r.offset))
                }))
            })
            .collect()
    }

    async fn get(
        &self,
        req: pb::BatchGetRequest,
        max: usize,
    ) -> Result<Vec<pb::GetResult>, Status> {
        let ns = convert::namespace_id("namespace_id", &req.namespace_id)?;
        let keys = convert::keys("keys", &req.keys, max)?;
        if !req.pages.is_empty() {
            if !req.regions.is_empty() {
                return Err(Status::invalid_argument(
                    "regions: give pool regions or KV pages, not both",
                ));
            }
            return self.get_pages(ns, keys, req.keys, &req.pages).await;
        }
        let targets = if req.regions.is_empty() {
            None
        } else {
            Some(self.get_targets(&ns, keys.len(), &req.regions)?)
        };
        let cache = Arc::clone(&self.cache);
        let wire_keys = req.keys;
        self.limits
            .blocking
            .run("get", move || {
                let Some(targets) = targets else {
                    let found = cache.get_batch(&ns, &keys)?;
                    return Ok(wire_keys
                        .into_iter()
                        .zip(found)
                        .map(|(key, hit)| match hit {
                            Some((payload, tier)) => hit_result(key, payload, tier),
                            None => miss_result(key, String::new()),
                        })
                        .collect());
                };
                // Only keys with a usable region are read.
                let wanted: Vec<BlockKey> = keys
                    .iter()
                    .zip(&targets)
                    .filter(|(_, t)| t.is_ok())
                    .map(|(k, _)| *k)
                    .collect();
                let mut found = cache.get_batch(&ns, &wanted)?.into_iter();
                Ok(wire_keys
                    .into_iter()
                    .zip(targets)
                    .map(|(key, target)| match target {
                        Err(e) => miss_result(key, e.to_string()),
                        Ok((pool, offset)) => match found.next().flatten() {
                            Some((payload, tier)) => match pool.write(offset, &payload) {
                                Ok(()) => hit_result(key, Bytes::new(), tier),
                                Err(e) => miss_result(key, e.to_string()),
                            },
                            None => miss_result(key, String::new()),
                        },
                    })
                    .collect())
            })
            .await?
            .map_err(status)
    }
}

impl KvCacheService {
    /// A BatchGet whose found blocks are scattered into KV-region pages.
    async fn get_pages(
        &self,
        ns: NamespaceId,
        keys: Vec<BlockKey>,
        wire_keys: Vec<Bytes>,
        pages: &[pb::KvPages],
    ) -> Result<Vec<pb::GetResult>, Status> {
        if pages.len() != keys.len() {
            return Err(Status::invalid_argument(format!(
                "pages: {} given for {} keys; give one per key, or none",
                pages.len(),
                keys.len()
            )));
        }
        let namespace = self.cache.namespace("namespace_id", &ns).map_err(status)?;
        let targets = pages
            .iter()
            .enumerate()
            .map(|(i, p)| self.region_pages(&format!("pages[{i}]"), p, &namespace))
            .collect::<Result<Vec<_>, Status>>()?;
        let cache = Arc::clone(&self.cache);
        let registry = self.regions.clone();
        let block_bytes = namespace.block_bytes;
        self.limits
            .blocking
            .run("get", move || {
                // Per key: Ok(Some(tier)) hit, Ok(None) miss, Err(region problem).
                let mut outcome: Vec<Result<Option<TierKind>, String>> = targets
                    .iter()
                    .map(|t| match t {
                        Ok(_) => Ok(None),
                        Err(e) => Err(e.clone()),
                    })
                    .collect();
                // Keys bound for regions the cache's devices reach, per
                // region (read and scattered directly); the others staged.
                let mut direct: Vec<DirectGroup> = Vec::new();
                let mut staged: Vec<(usize, &PagesTarget)> = Vec::new();
                let mut wanted: Vec<BlockKey> = Vec::new();
                for (i, (t, key)) in targets.iter().zip(&keys).enumerate() {
                    let Ok(t) = t else { continue };
                    if let Some(g) = direct
                        .iter_mut()
                        .find(|g| Arc::ptr_eq(&g.region, &t.region))
                    {
                        g.push(i, *key, None, &t.page_ids);
                        continue;
                    }
                    match region_io::direct_device(&cache, &t.region) {
                        Some(device) => {
                            let mut g = DirectGroup::new(device, t);
                            g.push(i, *key, None, &t.page_ids);
                            direct.push(g);
                        }
                        None => {
                            staged.push((i, t));
                            wanted.push(*key);
                        }
                    }
                }
                let found = if wanted.is_empty() {
                    Vec::new()
                } else {
                    cache.get_batch(&ns, &wanted)?
                };
                // Found blocks grouped by region, scattered one launch per region.
                let mut groups: Vec<ScatterGroup> = Vec::new();
                for (&(i, t), hit) in staged.iter().zip(found) {
                    let Some((payload, tier)) = hit else {
                        continue;
                    };
                    outcome[i] = Ok(Some(tier));
                    let at = match groups
                        .iter()
                        .position(|g| Arc::ptr_eq(&g.region, &t.region))
                    {
                        Some(at) => at,
                        None => {
                            groups.push(ScatterGroup {
                                region: Arc::clone(&t.region),
                                pages_per_block: t.pages_per_block,
                                keys: Vec::new(),
                                page_ids: Vec::new(),
                                blocks: Vec::new(),
                            });
                            groups.len() - 1
                        }
                    };
                    let g = &mut groups[at];
                    g.keys.push(i);
                    g.page_ids.extend_from_slice(&t.page_ids);
                    g.blocks.push(payload);
                }
                let mut scattered = 0u64;
                for g in &groups {
                    if let Err(e) = region_io::scatter(
                        &g.region,
                        g.pages_per_block,
                        &g.page_ids,
                        &g.blocks,
                        block_bytes,
                    ) {
                        tracing::warn!(region_id = g.region.id(), error = %e, "scatter into a KV region failed");
                        for &i in &g.keys {
                            outcome[i] = Err(e.to_string());
                        }
                    } else {
                        scattered += g.blocks.len() as u64 * block_bytes;
                    }
                }
                for g in &direct {
                    let done = region_io::get_direct(&cache, &ns, g.device, g.pages(), &g.block_keys())?;
                    for (&i, tier) in g.items.iter().zip(&done.found) {
                        outcome[i] = Ok(*tier);
                    }
                    match done.scatter {
                        Ok(bytes) => scattered += bytes,
                        Err(e) => {
                            tracing::warn!(region_id = g.region.id(), error = %e, "scatter into a KV region failed");
                            for (&i, tier) in g.items.iter().zip(&done.found) {
                                if tier.is_some() {
                                    outcome[i] = Err(e.to_string());
                                }
                            }
                        }
                    }
                }
                if let Some(r) = &registry {
                    r.count_moved(0, scattered);
                }
                Ok(wire_keys
                    .into_iter()
                    .zip(outcome)
                    .map(|(key, o)| match o {
                        Ok(Some(tier)) => hit_result(key, Bytes::new(), tier),
                        Ok(None) => miss_result(key, String::new()),
                        Err(e) => miss_result(key, e),
                    })
                    .collect())
            })
            .await?
            .map_err(status)
    }
}

/// One put item after parsing.
enum ParsedItem {
    /// The block's bytes are at hand (inline or a pool region).
    Ready(PutBlock),
    /// The block is to be gathered from KV-region pages.
    Pages {
        key: BlockKey,
        parent: Option<BlockKey>,
        target: PagesTarget,
    },
    /// Refused alone (unknown or closed pool or region): `BadRegion`.
    Bad(String),
}

/// Checked KV pages of one block.
struct PagesTarget {
    region: Arc<KvRegion>,
    pages_per_block: u32,
    page_ids: Vec<u32>,
}

/// Found blocks of one BatchGet bound for one region (the staged path).
struct ScatterGroup {
    region: Arc<KvRegion>,
    pages_per_block: u32,
    /// Indices of the keys, in order.
    keys: Vec<usize>,
    page_ids: Vec<u32>,
    blocks: Vec<Bytes>,
}

/// Put items bound for one region, gathered in one launch (staged path).
struct GatherGroup {
    region: Arc<KvRegion>,
    pages_per_block: u32,
    /// Indices of the items, in order.
    items: Vec<usize>,
    page_ids: Vec<u32>,
}

/// Blocks of one region that move directly between its memory and device
/// `device` of the cache (`region_io::put_direct` / `get_direct`).
struct DirectGroup {
    device: usize,
    region: Arc<KvRegion>,
    pages_per_block: u32,
    /// Indices of the items (keys), in order.
    items: Vec<usize>,
    /// Key and parent of each block (no parent on a get).
    keys: Vec<(BlockKey, Option<BlockKey>)>,
    page_ids: Vec<u32>,
}

impl DirectGroup {
    fn new(device: usize, target: &PagesTarget) -> Self {
        DirectGroup {
            device,
            region: Arc::clone(&target.region),
            pages_per_block: target.pages_per_block,
            items: Vec::new(),
            keys: Vec::new(),
            page_ids: Vec::new(),
        }
    }

    fn push(&mut self, item: usize, key: BlockKey, parent: Option<BlockKey>, page_ids: &[u32]) {
        self.items.push(item);
        self.keys.push((key, parent));
        self.page_ids.extend_from_slice(page_ids);
    }

    fn pages(&self) -> region_io::RegionPages<'_> {
        region_io::RegionPages {
            region: &self.region,
            pages_per_block: self.pages_per_block,
            page_ids: &self.page_ids,
        }
    }

    fn block_keys(&self) -> Vec<BlockKey> {
        self.keys.iter().map(|(k, _)| *k).collect()
    }
}

/// A put item after the staged gathers.
enum Planned {
    /// Stored by `put_batch`.
    Block(PutBlock),
    /// Stored by the direct put, in order.
    Direct,
    /// Refused alone (unknown or closed pool or region): `BadRegion`.
    Bad(String),
}

/// A BatchPut ready to store.
struct PutPlan {
    items: Vec<Planned>,
    /// The blocks of the first direct-capable region named, if any.
    direct: Option<DirectGroup>,
}

/// The status of a failed gather of item `first`'s region.
fn gather_status(first: usize, e: region_io::RegionIoError) -> Status {
    match e {
        region_io::RegionIoError::Region(e) => {
            Status::failed_precondition(format!("items[{first}].pages.region_id: {e}"))
        }
        e => Status::internal(format!("items[{first}].pages: {e}")),
    }
}

/// Checks what `put_batch` (and `put_from_device`) would refuse, naming the
/// request's own item indices, so that nothing is stored when the request
/// fails: the payload sizes and that no block is its own parent.
fn check_put_items(parsed: &[ParsedItem], block_bytes: u64) -> Result<(), Status> {
    for (i, p) in parsed.iter().enumerate() {
        let (key, parent) = match p {
            ParsedItem::Ready(b) => {
                if b.payload.len() as u64 != block_bytes {
                    return Err(Status::invalid_argument(format!(
                        "items[{i}].payload: {} bytes, but the namespace stores blocks of exactly {block_bytes} bytes",
                        b.payload.len()
                    )));
                }
                (&b.key, &b.parent)
            }
            ParsedItem::Pages { key, parent, .. } => (key, parent),
            ParsedItem::Bad(_) => continue,
        };
        if parent.as_ref() == Some(key) {
            return Err(Status::invalid_argument(format!(
                "items[{i}].parent: a block cannot be its own parent"
            )));
        }
    }
    Ok(())
}

/// Plans a put: the staged `Pages` items are gathered (one launch per
/// region) into blocks; the items of the first region the cache's devices
/// reach are left for the direct put; every other item is its block or the
/// reason it alone is refused.
fn gather_pages(
    cache: &BlockCache,
    ns: &NamespaceId,
    parsed: Vec<ParsedItem>,
    registry: Option<&RegionRegistry>,
) -> Result<PutPlan, Status> {
    if !parsed.iter().any(|p| matches!(p, ParsedItem::Pages { .. })) {
        return Ok(PutPlan {
            items: parsed
                .into_iter()
                .map(|p| match p {
                    ParsedItem::Ready(b) => Planned::Block(b),
                    ParsedItem::Bad(e) => Planned::Bad(e),
                    ParsedItem::Pages { .. } => Planned::Bad(String::new()),
                })
                .collect(),
            direct: None,
        });
    }
    let block_bytes = cache
        .namespace("namespace_id", ns)
        .map_err(status)?
        .block_bytes;
    check_put_items(&parsed, block_bytes)?;
    // Items per region, in order; the first region the cache's devices
    // reach goes direct.
    let mut groups: Vec<GatherGroup> = Vec::new();
    let mut direct: Option<DirectGroup> = None;
    for (i, p) in parsed.iter().enumerate() {
        let ParsedItem::Pages {
            key,
            parent,
            target,
        } = p
        else {
            continue;
        };
        match &mut direct {
            Some(d) if Arc::ptr_eq(&d.region, &target.region) => {
                d.push(i, *key, *parent, &target.page_ids);
                continue;
            }
            Some(_) => {}
            None => {
                if let Some(device) = region_io::direct_device(cache, &target.region) {
                    let mut d = DirectGroup::new(device, target);
                    d.push(i, *key, *parent, &target.page_ids);
                    direct = Some(d);
                    continue;
                }
            }
        }
        match groups
            .iter_mut()
            .find(|g| Arc::ptr_eq(&g.region, &target.region))
        {
            Some(g) => {
                g.items.push(i);
                g.page_ids.extend_from_slice(&target.page_ids);
            }
            None => groups.push(GatherGroup {
                region: Arc::clone(&target.region),
                pages_per_block: target.pages_per_block,
                items: vec![i],
                page_ids: target.page_ids.clone(),
            }),
        }
    }
    let mut gathered: Vec<Option<Bytes>> = vec![None; parsed.len()];
    let mut total = 0u64;
    for GatherGroup {
        region,
        pages_per_block,
        items,
        page_ids,
    } in &groups
    {
        let blocks = region_io::gather(region, *pages_per_block, page_ids, block_bytes)
            .map_err(|e| gather_status(items.first().copied().unwrap_or(0), e))?;
        total += blocks.len() as u64 * block_bytes;
        for (&i, b) in items.iter().zip(blocks) {
            gathered[i] = Some(b);
        }
    }
    if let Some(r) = registry {
        r.count_moved(total, 0);
    }
    let mut is_direct = vec![false; parsed.len()];
    for &i in direct.iter().flat_map(|d| &d.items) {
        is_direct[i] = true;
    }
    let items = parsed
        .into_iter()
        .zip(gathered)
        .enumerate()
        .map(|(i, (p, g))| match p {
            ParsedItem::Ready(b) => Planned::Block(b),
            ParsedItem::Bad(e) => Planned::Bad(e),
            ParsedItem::Pages { .. } if is_direct[i] => Planned::Direct,
            ParsedItem::Pages { key, parent, .. } => match g {
                Some(payload) => Planned::Block(PutBlock {
                    key,
                    parent,
                    payload,
                }),
                None => Planned::Bad("not gathered".to_string()),
            },
        })
        .collect();
    Ok(PutPlan { items, direct })
}

/// Checks a block's KV pages against the region's geometry and the
/// namespace; returns pages_per_block. Errors name `field`
/// (`items[3].pages.page_ids[1]`).
fn check_pages_fit(
    field: &str,
    region: &KvRegion,
    namespace: &kvstrata_tiers::Namespace,
    page_ids: &[u32],
) -> Result<u32, Status> {
    let g = region.geometry();
    let spec = &namespace.spec;
    let id = region.id();
    let bad = |what: String| {
        Err(Status::invalid_argument(format!(
            "{field}.region_id: {what}"
        )))
    };
    if spec.layout != kvstrata_tiers::Layout::LayerMajor {
        return bad(format!(
            "KV pages are gathered into layer-major blocks, but namespace {} is opaque",
            spec.model_id
        ));
    }
    for (what, region_v, ns_v) in [
        ("layers", g.layers as u64, spec.num_layers as u64),
        ("kv_heads", g.kv_heads as u64, spec.num_kv_heads as u64),
        ("head_dim", g.head_dim as u64, spec.head_dim as u64),
        ("dtype_bytes", g.dtype_bytes as u64, spec.dtype.size()),
    ] {
        if region_v != ns_v {
            return bad(format!(
                "KV region {id} has {what} {region_v}, but the namespace's blocks have {ns_v}"
            ));
        }
    }
    if !spec.block_tokens.is_multiple_of(g.page_tokens) {
        return bad(format!(
            "the namespace's blocks of {} tokens are not a whole number of region {id}'s pages of {} tokens",
            spec.block_tokens, g.page_tokens
        ));
    }
    let ppb = spec.block_tokens / g.page_tokens;
    if g.block_bytes(ppb) != namespace.block_bytes {
        return bad(format!(
            "{ppb} pages of region {id} make {} bytes, but the namespace stores blocks of exactly {} bytes",
            g.block_bytes(ppb),
            namespace.block_bytes
        ));
    }
    if page_ids.len() != ppb as usize {
        return Err(Status::invalid_argument(format!(
            "{field}.page_ids: {} page ids, but one block is {ppb} pages of region {id} ({} tokens / {} per page)",
            page_ids.len(),
            spec.block_tokens,
            g.page_tokens
        )));
    }
    g.check_pages(&format!("{field}.page_ids"), ppb, page_ids)
        .map_err(|e| Status::invalid_argument(format!("{}: {}", e.field, e.reason)))?;
    Ok(ppb)
}

/// Shared-memory pools belong to same-host (Unix-socket) clients: a tenant
/// may not name them.
fn check_pools(caller: &Caller, field: &str, uses_pools: bool) -> Result<(), Status> {
    match caller.tenant() {
        Some(t) if uses_pools => Err(Status::permission_denied(format!(
            "{field}: shared-memory pools and KV regions belong to Unix-socket clients; tenant {t:?} must send payloads inline"
        ))),
        _ => Ok(()),
    }
}

/// Where one key of a get goes: the pool and offset, or why its region
/// cannot be used.
type GetTarget = Result<(Arc<Pool>, u64), RegionError>;

/// A pool region must be exactly one block long.
fn check_region_length(
    field: &str,
    region: &pb::PoolRegion,
    block_bytes: u64,
) -> Result<(), Status> {
    if region.length != block_bytes {
        return Err(Status::invalid_argument(format!(
            "{field}: {} bytes, but the namespace stores blocks of exactly {block_bytes} bytes",
            region.length
        )));
    }
    Ok(())
}

fn hit_result(key: Bytes, payload: Bytes, tier: TierKind) -> pb::GetResult {
    pb::GetResult {
        key,
        found: true,
        payload,
        tier: convert::tier_to_pb(tier) as i32,
        region_error: String::new(),
    }
}

fn miss_result(key: Bytes, region_error: String) -> pb::GetResult {
    pb::GetResult {
        key,
        found: false,
        payload: Bytes::new(),
        tier: pb::Tier::Unspecified as i32,
        region_error,
    }
}

#[tonic::async_trait]
impl KvCache for KvCacheService {
    async fn register_namespace(
        &self,
        request: Request<pb::RegisterNamespaceRequest>,
    ) -> Result<Response<pb::RegisterNamespaceResponse>, Status> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        let r = match convert::spec_from_pb(req.spec) {
            Ok(spec) => {
                let policy = req.policy.map(|p| NamespacePolicy {
                    write_through: p.write_through,
                    remote_write_through: p.remote_write_through,
                });
                self.register_as(&caller, spec, policy).await
            }
            Err(s) => Err(s),
        };
        self.done("RegisterNamespace", r)
    }

    async fn list_namespaces(
        &self,
        request: Request<pb::ListNamespacesRequest>,
    ) -> Result<Response<pb::ListNamespacesResponse>, Status> {
        let caller = Caller::of(&request);
        let namespaces = self
            .cache
            .namespaces()
            .iter()
            .filter(|ns| self.visible(&caller, &ns.id))
            .map(|ns| pb::NamespaceInfo {
                namespace_id: Bytes::copy_from_slice(ns.id.as_bytes()),
                spec: Some(convert::spec_to_pb(&ns.spec)),
                block_bytes: ns.block_bytes,
                policy: Some(pb::NamespacePolicy {
                    write_through: ns.policy.write_through,
                    remote_write_through: ns.policy.remote_write_through,
                }),
            })
            .collect();
        self.done(
            "ListNamespaces",
            Ok(pb::ListNamespacesResponse { namespaces }),
        )
    }

    async fn lookup(
        &self,
        request: Request<pb::LookupRequest>,
    ) -> Result<Response<pb::LookupResponse>, Status> {
        let caller = Caller::of(&request);
        if let Err(e) = self.check_ns(&caller, &request.get_ref().namespace_id) {
            return self.done("Lookup", Err(e));
        }
        let r = (|| {
            let req = request.into_inner();
            let ns = convert::namespace_id("namespace_id", &req.namespace_id)?;
            let keys = convert::keys("keys", &req.keys, self.limits.max_batch)?;
            let tiers = self.cache.lookup(&ns, &keys).map_err(status)?;
            Ok(pb::LookupResponse {
                matched: tiers.len() as u32,
                tiers: tiers
                    .into_iter()
                    .map(|t| convert::tier_to_pb(t) as i32)
                    .collect(),
            })
        })();
        self.done("Lookup", r)
    }

    async fn batch_put(
        &self,
        request: Request<pb::BatchPutRequest>,
    ) -> Result<Response<pb::BatchPutResponse>, Status> {
        let caller = Caller::of(&request);
        let uses_pools = request
            .get_ref()
            .items
            .iter()
            .any(|i| i.region.is_some() || i.pages.is_some());
        if let Err(e) = self
            .check_ns(&caller, &request.get_ref().namespace_id)
            .and_then(|()| check_pools(&caller, "items[].region", uses_pools))
        {
            return self.done("BatchPut", Err(e));
        }
        let r = self.put(request.into_inner()).await;
        self.done("BatchPut", r)
    }

    async fn batch_get(
        &self,
        request: Request<pb::BatchGetRequest>,
    ) -> Result<Response<pb::BatchGetResponse>, Status> {
        let caller = Caller::of(&request);
        let uses_pools =
            !request.get_ref().regions.is_empty() || !request.get_ref().pages.is_empty();
        if let Err(e) = self
            .check_ns(&caller, &request.get_ref().namespace_id)
            .and_then(|()| check_pools(&caller, "regions", uses_pools))
        {
            return self.done("BatchGet", Err(e));
        }
        let r = self.get(request.into_inner(), self.limits.max_batch).await;
        self.done(
            "BatchGet",
            r.map(|results| pb::BatchGetResponse { results }),
        )
    }

    type PutStreamStream = BoxStream<pb::BatchPutResponse>;

    async fn put_stream(
        &self,
        request: Request<Streaming<pb::BatchPutRequest>>,
    ) -> Result<Response<Self::PutStreamStream>, Status> {
        // The stream holds its in-flight slot until it ends, and stops at
        // the client's deadline.
        let permit = request.extensions().get::<InflightPermit>().cloned();
        let deadline = request.extensions().get::<Deadline>().copied();
        let caller = Caller::of(&request);
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let svc = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let expired = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.0).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(expired);
            loop {
                let msg = tokio::select! {
                    _ = svc.shutdown.cancelled() => break,
                    _ = &mut expired => {
                        svc.metrics.record_rejected("deadline");
                        let _ = tx.send(Err(Status::deadline_exceeded(
                            "deadline exceeded: the client's grpc-timeout has passed",
                        ))).await;
                        break;
                    }
                    m = incoming.message() => m,
                };
                let batch = match msg {
                    Ok(Some(b)) => b,
                    Ok(None) => break,
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        break;
                    }
                };
                let uses_pools = batch
                    .items
                    .iter()
                    .any(|i| i.region.is_some() || i.pages.is_some());
                if let Err(e) = svc
                    .check_ns(&caller, &batch.namespace_id)
                    .and_then(|()| check_pools(&caller, "items[].region", uses_pools))
                {
                    svc.metrics.record_request("PutStream.batch", e.code());
                    let _ = tx.send(Err(e)).await;
                    break;
                }
                let r = tokio::select! {
                    r = svc.put(batch) => r,
                    _ = &mut expired => {
                        svc.metrics.record_rejected("deadline");
                        Err(Status::deadline_exceeded(
                            "deadline exceeded: the client's grpc-timeout has passed",
                        ))
                    }
                };
                let failed = r.is_err();
                svc.metrics.record_request(
                    "PutStream.batch",
                    r.as_ref()
                        .map(|_| ())
                        .err()
                        .map_or(tonic::Code::Ok, |s| s.code()),
                );
                if tx.send(r).await.is_err() || failed {
                    break;
                }
            }
        });
        self.done(
            "PutStream",
            Ok(Box::pin(ReceiverStream::new(rx)) as Self::PutStreamStream),
        )
    }

    type GetStreamStream = BoxStream<pb::GetResult>;

    async fn get_stream(
        &self,
        request: Request<pb::BatchGetRequest>,
    ) -> Result<Response<Self::GetStreamStream>, Status> {
        let caller = Caller::of(&request);
        if let Err(e) = self.check_ns(&caller, &request.get_ref().namespace_id) {
            return self.done("GetStream", Err(e));
        }
        let permit = request.extensions().get::<InflightPermit>().cloned();
        let deadline = request.extensions().get::<Deadline>().copied();
        let req = request.into_inner();
        let max = self.limits.max_batch.saturating_mul(STREAM_BATCH_FACTOR);
        let parsed = if !req.regions.is_empty() {
            Err(Status::invalid_argument(
                "regions: GetStream returns payloads inline; use BatchGet to read into pools",
            ))
        } else if !req.pages.is_empty() {
            Err(Status::invalid_argument(
                "pages: GetStream returns payloads inline; use BatchGet to read into KV pages",
            ))
        } else {
            Ok(())
        };
        let parsed = parsed
            .and_then(|()| convert::namespace_id("namespace_id", &req.namespace_id))
            .and_then(|ns| convert::keys("keys", &req.keys, max).map(|k| (ns, k)))
            .and_then(|(ns, k)| {
                self.cache
                    .namespace("namespace_id", &ns)
                    .map_err(status)
                    .map(|_| (ns, k))
            });
        let (ns, keys) = match parsed {
            Ok(v) => v,
            Err(s) => return self.done("GetStream", Err(s)),
        };
        let (tx, rx) = mpsc::channel::<Result<pb::GetResult, Status>>(4);
        let cache = Arc::clone(&self.cache);
        let shutdown = self.shutdown.clone();
        let blocking = self.limits.blocking.clone();
        let metrics = Arc::clone(&self.metrics);
        tokio::spawn(async move {
            // Held until the stream ends (or the client leaves).
            let _permit = permit;
            for (key, wire_key) in keys.into_iter().zip(req.keys) {
                if shutdown.is_cancelled() {
                    break;
                }
                if let Some(d) = deadline.filter(|d| d.passed()) {
                    metrics.record_rejected("deadline");
                    let _ = tx.send(Err(d.status())).await;
                    break;
                }
                let c = Arc::clone(&cache);
                let hit = blocking
                    .run("get", move || c.get_batch(&ns, std::slice::from_ref(&key)))
                    .await;
                let msg = match hit {
                    Ok(Ok(mut v)) => match v.pop().flatten() {
                        Some((payload, tier)) => Ok(hit_result(wire_key, payload, tier)),
                        None => Ok(miss_result(wire_key, String::new())),
                    },
                    Ok(Err(e)) => Err(status(e)),
                    Err(s) => Err(s),
                };
                if tx.send(msg).await.is_err() {
                    break; // client went away
                }
            }
        });
        self.done(
            "GetStream",
            Ok(Box::pin(ReceiverStream::new(rx)) as Self::GetStreamStream),
        )
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let caller = Caller::of(&request);
        if let Err(e) = self.check_ns(&caller, &request.get_ref().namespace_id) {
            return self.done("Delete", Err(e));
        }
        let req = request.into_inner();
        let parsed = convert::namespace_id("namespace_id", &req.namespace_id).and_then(|ns| {
            convert::keys("keys", &req.keys, self.limits.max_batch).map(|k| (ns, k))
        });
        let r = match parsed {
            Ok((ns, keys)) => {
                self.blocking("delete", move |cache| {
                    let deleted = cache.delete(&ns, &keys).map_err(status)?;
                    Ok(pb::DeleteResponse { deleted })
                })
                .await
            }
            Err(s) => Err(s),
        };
        self.done("Delete", r)
    }

    async fn evict(
        &self,
        request: Request<pb::EvictRequest>,
    ) -> Result<Response<pb::EvictResponse>, Status> {
        let caller = Caller::of(&request);
        if let Err(e) = self.check_ns(&caller, &request.get_ref().namespace_id) {
            return self.done("Evict", Err(e));
        }
        let req = request.into_inner();
        let parsed = (|| {
            let ns = convert::namespace_id("namespace_id", &req.namespace_id)?;
            let keys = convert::keys("keys", &req.keys, self.limits.max_batch)?;
            if req.all && !keys.is_empty() {
                return Err(Status::invalid_argument(
                    "keys: must be empty when `all` is set",
                ));
            }
            if !req.all && keys.is_empty() {
                return Err(Status::invalid_argument(
                    "keys: name at least one block, or set `all`",
                ));
            }
            Ok((ns, keys))
        })();
        let all = req.all;
        let r = match parsed {
            Ok((ns, keys)) => {
                self.blocking("evict", move |cache| {
                    let (evicted, skipped_pinned) = cache.evict(&ns, &keys, all).map_err(status)?;
                    Ok(pb::EvictResponse {
                        evicted,
                        skipped_pinned,
                    })
                })
                .await
            }
            Err(s) => Err(s),
        };
        self.done("Evict", r)
    }

    async fn pin(
        &self,
        request: Request<pb::PinRequest>,
    ) -> Result<Response<pb::PinResponse>, Status> {
        let caller = Caller::of(&request);
        if let Err(e) = self.check_ns(&caller, &request.get_ref().namespace_id) {
            return self.done("Pin", Err(e));
        }
        let r = (|| {
            let req = request.into_inner();
            let ns = convert::namespace_id("namespace_id", &req.namespace_id)?;
            let keys = convert::keys("keys", &req.keys, self.limits.max_batch)?;
            let lease = self
                .cache
                .pin(&ns, &keys, Duration::from_millis(req.lease_ms))
                .map_err(status)?;
            Ok(pb::PinResponse {
                lease_id: lease.lease_id,
                deadline_unix_ms: lease.deadline_unix_ms,
            })
        })();
        self.done("Pin", r)
    }

    async fn unpin(
        &self,
        request: Request<pb::UnpinRequest>,
    ) -> Result<Response<pb::UnpinResponse>, Status> {
        let r = self
            .cache
            .unpin(request.into_inner().lease_id)
            .map(|_| pb::UnpinResponse {})
            .map_err(status);
        self.done("Unpin", r)
    }

    async fn stats(
        &self,
        _request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        let s = self.cache.stats();
        let tiers = s
            .tiers
            .iter()
            .map(|(kind, t)| {
                let mut pb_tier = pb::TierStats {
                    tier: convert::tier_to_pb(*kind) as i32,
                    capacity_bytes: t.capacity_bytes,
                    used_bytes: t.used_bytes,
                    blocks: t.blocks,
                    hits: t.hits,
                    misses: t.misses,
                    evictions: t.evictions,
                    bytes_in: t.bytes_in,
                    bytes_out: t.bytes_out,
                    pinned_blocks: t.pinned_blocks,
                    rejected_puts: t.rejected_puts,
                    ..pb::TierStats::default()
                };
                if let (TierKind::Disk, Some(d)) = (kind, &s.disk) {
                    convert::fill_disk_stats(&mut pb_tier, d);
                }
                if let (TierKind::Remote, Some(r)) = (kind, &s.remote) {
                    convert::fill_remote_tier_stats(&mut pb_tier, r);
                }
                pb_tier
            })
            .collect();
        let pools = self.pools.stats();
        let resp = pb::StatsResponse {
            tiers,
            namespaces: s.namespaces,
            active_leases: s.active_leases,
            uptime_ms: s.uptime.as_millis() as u64,
            version: env!("CARGO_PKG_VERSION").to_string(),
            event_seq: s.event_seq,
            movement: s.movement.as_ref().map(convert::movement_to_pb),
            pools: pools.pools,
            pool_bytes: pools.bytes,
            remote: s.remote.as_ref().map(convert::remote_to_pb),
            ..pb::StatsResponse::default()
        };
        let mut resp = resp;
        match &self.regions {
            Some(r) => {
                convert::fill_gpu_stats(&mut resp, r.gpus());
                resp.kv_regions = r.list().iter().map(convert::region_to_pb).collect();
            }
            None => resp.gpu_status = "unknown (no GPU state given to the service)".into(),
        }
        self.done("Stats", Ok(resp))
    }

    async fn list_blocks(
        &self,
        request: Request<pb::ListBlocksRequest>,
    ) -> Result<Response<pb::ListBlocksResponse>, Status> {
        let caller = Caller::of(&request);
        if let Err(e) = self.check_ns(&caller, &request.get_ref().namespace_id) {
            return self.done("ListBlocks", Err(e));
        }
        let r = (|| {
            let req = request.into_inner();
            let ns = if req.namespace_id.is_empty() {
                None
            } else {
                Some(convert::namespace_id("namespace_id", &req.namespace_id)?)
            };
            let tier = convert::tier_from_pb("tier", req.tier)?;
            let page = match req.page_size as usize {
                0 => DEFAULT_PAGE,
                n if n > MAX_PAGE => {
                    return Err(Status::invalid_argument(format!(
                        "page_size: {n} exceeds the limit of {MAX_PAGE}"
                    )));
                }
                n => n,
            };
            let cursor = match req.page_token.len() {
                0 => None,
                8 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&req.page_token);
                    Some(u64::from_le_bytes(b))
                }
                _ => {
                    return Err(Status::invalid_argument(
                        "page_token: not a token from a previous response",
                    ));
                }
            };
            let (blocks, next) = self
                .cache
                .list_blocks(ns.as_ref(), tier, cursor, page)
                .map_err(status)?;
            Ok(pb::ListBlocksResponse {
                blocks: blocks.iter().map(convert::block_to_pb).collect(),
                next_page_token: next
                    .map(|n| Bytes::copy_from_slice(&n.to_le_bytes()))
                    .unwrap_or_default(),
            })
        })();
        let r = r.map(|mut resp| {
            // A tenant sees only its own namespaces' blocks (a page may come
            // back short; keep following next_page_token).
            resp.blocks.retain(|b| {
                NamespaceId::from_slice("namespace_id", &b.namespace_id)
                    .is_ok_and(|ns| self.visible(&caller, &ns))
            });
            resp
        });
        self.done("ListBlocks", r)
    }

    async fn inspect(
        &self,
        request: Request<pb::InspectRequest>,
    ) -> Result<Response<pb::InspectResponse>, Status> {
        let caller = Caller::of(&request);
        if let Err(e) = self.check_ns(&caller, &request.get_ref().namespace_id) {
            return self.done("Inspect", Err(e));
        }
        let req = request.into_inner();
        let parsed = convert::namespace_id("namespace_id", &req.namespace_id)
            .and_then(|ns| convert::key("key", &req.key).map(|k| (ns, k)));
        let r = match parsed {
            Ok((ns, key)) => {
                let cache = Arc::clone(&self.cache);
                match self
                    .limits
                    .blocking
                    .run("inspect", move || cache.inspect(&ns, &key))
                    .await
                {
                    Ok(Ok(Some(i))) => Ok(pb::InspectResponse {
                        block: Some(convert::block_to_pb(&i.meta)),
                        payload_xxh3: i.payload_xxh3,
                        stored_xxh3: i.meta.checksum,
                        checksum_ok: i.checksum_ok(),
                        disk_slot: i.disk.as_ref().map(convert::disk_slot_to_pb),
                    }),
                    Ok(Ok(None)) => Err(Status::not_found(format!(
                        "key: block {} is not cached",
                        BlockKey::display(&req.key)
                    ))),
                    Ok(Err(e)) => Err(status(e)),
                    Err(s) => Err(s),
                }
            }
            Err(s) => Err(s),
        };
        self.done("Inspect", r)
    }

    async fn verify(
        &self,
        request: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        if let Some(auth) = &self.auth
            && let Err(e) = auth.admin_only(&Caller::of(&request), "Verify")
        {
            return self.done("Verify", Err(e));
        }
        let drop_corrupt = request.into_inner().drop_corrupt;
        let r = self
            .blocking("verify", move |cache| {
                let report = cache.verify_disk(drop_corrupt).map_err(status)?;
                Ok(convert::verify_to_pb(&report))
            })
            .await;
        self.done("Verify", r)
    }

    type WatchStream = BoxStream<pb::WatchEvent>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = Caller::of(&request);
        if let Err(e) = self.check_ns(&caller, &request.get_ref().namespace_id) {
            return self.done("Watch", Err(e));
        }
        // A client grpc-timeout ends the subscription (none: it lasts).
        let deadline = request.extensions().get::<Deadline>().copied();
        let req = request.into_inner();
        let filter = if req.namespace_id.is_empty() {
            None
        } else {
            let ns = convert::namespace_id("namespace_id", &req.namespace_id).and_then(|ns| {
                self.cache
                    .namespace("namespace_id", &ns)
                    .map_err(status)
                    .map(|_| ns)
            });
            match ns {
                Ok(ns) => Some(ns),
                Err(s) => return self.done("Watch", Err(s)),
            }
        };
        let mut events = self.cache.subscribe();
        let (tx, rx) = mpsc::channel(256);
        let shutdown = self.shutdown.clone();
        // A tenant's stream carries only its own namespaces' events.
        let tenant_view = match (caller.tenant(), &self.auth) {
            (Some(t), Some(auth)) => Some((Arc::clone(auth.owners()), t.to_string())),
            _ => None,
        };
        let visible = move |ns: &NamespaceId| {
            tenant_view
                .as_ref()
                .is_none_or(|(o, t)| o.owner(ns).as_deref() == Some(t.as_str()))
        };
        let metrics = Arc::clone(&self.metrics);
        tokio::spawn(async move {
            let expired = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.0).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(expired);
            loop {
                let ev = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tx.closed() => break,
                    _ = &mut expired => {
                        if let Some(d) = deadline {
                            metrics.record_rejected("deadline");
                            let _ = tx.send(Err(d.status())).await;
                        }
                        break;
                    }
                    ev = events.recv() => ev,
                };
                let msg = match ev {
                    Ok(e) if filter.is_none_or(|f| f == e.namespace) && visible(&e.namespace) => {
                        convert::event_to_pb(&e)
                    }
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(missed)) => pb::WatchEvent {
                        kind: pb::EventKind::Lagged as i32,
                        missed,
                        ..Default::default()
                    },
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                if tx.send(Ok(msg)).await.is_err() {
                    break;
                }
            }
        });
        self.done(
            "Watch",
            Ok(Box::pin(ReceiverStream::new(rx)) as Self::WatchStream),
        )
    }
}
