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
    BlockCache, BlockKey, NamespaceId, NamespacePolicy, PutBlock, PutOutcome, TierKind,
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
        }
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
    ) -> Result<(NamespaceId, Vec<Result<PutBlock, RegionError>>), Status> {
        let ns = convert::namespace_id("namespace_id", &req.namespace_id)?;
        convert::check_batch("items", req.items.len(), self.limits.max_batch)?;
        let uses_pools = req.items.iter().any(|it| it.region.is_some());
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
                Ok(payload.map(|payload| PutBlock {
                    key,
                    parent,
                    payload,
                }))
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
        let results = self
            .limits
            .blocking
            .run("put", move || {
                let blocks: Vec<PutBlock> = parsed
                    .iter()
                    .filter_map(|p| p.as_ref().ok().cloned())
                    .collect();
                let mut outcomes = cache.put_batch(&ns, &blocks)?.into_iter();
                Ok::<_, kvstrata_tiers::CacheError>(
                    parsed
                        .iter()
                        .map(|p| match p {
                            Ok(_) => match outcomes.next() {
                                Some(PutOutcome::Stored) => pb::PutStatus::Stored,
                                Some(PutOutcome::NoSpace) | None => pb::PutStatus::NoSpace,
                            },
                            Err(_) => pb::PutStatus::BadRegion,
                        } as i32)
                        .collect::<Vec<i32>>(),
                )
            })
            .await?
            .map_err(status)?;
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

/// Shared-memory pools belong to same-host (Unix-socket) clients: a tenant
/// may not name them.
fn check_pools(caller: &Caller, field: &str, uses_pools: bool) -> Result<(), Status> {
    match caller.tenant() {
        Some(t) if uses_pools => Err(Status::permission_denied(format!(
            "{field}: shared-memory pools belong to Unix-socket clients; tenant {t:?} must send payloads inline"
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
        let uses_pools = request.get_ref().items.iter().any(|i| i.region.is_some());
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
        let uses_pools = !request.get_ref().regions.is_empty();
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
                let uses_pools = batch.items.iter().any(|i| i.region.is_some());
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
        let parsed = if req.regions.is_empty() {
            Ok(())
        } else {
            Err(Status::invalid_argument(
                "regions: GetStream returns payloads inline; use BatchGet to read into pools",
            ))
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
        };
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
