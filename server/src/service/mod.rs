//! The `kvstrata.v1.KvCache` gRPC service: validates each request into
//! `kvstrata_tiers` types and hands it to the [`BlockCache`]. Byte copies run on
//! tokio's blocking pool, never on the async executor.
//!
//! This file holds the service state, the helpers every method shares
//! (tenancy checks, the blocking pool, the request metric) and the
//! [`KvCache`] trait impl, which names each RPC's metric label and hands the
//! request to its handler:
//!
//! - `put.rs`: `BatchPut` and `PutStream` (inline payloads and pool ranges);
//! - `get.rs`: `BatchGet` and `GetStream`;
//! - `codec.rs`: the HTTP/2-level path of `BatchGet` and `BatchPut` that
//!   moves inline payloads without copying them;
//! - `kv_pages.rs`: blocks gathered from and scattered into engine KV-region
//!   pages, for both directions;
//! - `lookup.rs`: `Lookup`, `Pin` and `Unpin` (leases);
//! - `namespaces.rs`: `RegisterNamespace` and `ListNamespaces`;
//! - `admin.rs`: `Delete`, `Evict`, `Stats`, `ListBlocks`, `Inspect`, `Verify`;
//! - `watch.rs`: the `Watch` event stream.

mod admin;
pub mod codec;
mod get;
mod kv_pages;
mod lookup;
mod namespaces;
mod put;
mod region_calls;
mod watch;

use std::pin::Pin;
use std::sync::Arc;

use kvstrata_proto::v1 as pb;
use kvstrata_proto::v1::kv_cache_server::KvCache;
use kvstrata_tiers::{BlockCache, NamespaceId};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Auth, Caller};
use crate::limits::BlockingPool;
use crate::metrics::Metrics;
use crate::region::RegionRegistry;
use crate::shm::pool::PoolRegistry;

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

    /// Counts a finished RPC by method and code, logs a refusal (not a plain
    /// miss) at debug level, and wraps the answer.
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

/// A pool range must be exactly one block long.
fn check_range_length(field: &str, range: &pb::PoolRange, block_bytes: u64) -> Result<(), Status> {
    if range.length != block_bytes {
        return Err(Status::invalid_argument(format!(
            "{field}: {} bytes, but the namespace stores blocks of exactly {block_bytes} bytes",
            range.length
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl KvCache for KvCacheService {
    async fn register_namespace(
        &self,
        request: Request<pb::RegisterNamespaceRequest>,
    ) -> Result<Response<pb::RegisterNamespaceResponse>, Status> {
        let r = self.handle_register_namespace(request).await;
        self.done("RegisterNamespace", r)
    }

    async fn list_namespaces(
        &self,
        request: Request<pb::ListNamespacesRequest>,
    ) -> Result<Response<pb::ListNamespacesResponse>, Status> {
        let r = self.handle_list_namespaces(request);
        self.done("ListNamespaces", r)
    }

    async fn lookup(
        &self,
        request: Request<pb::LookupRequest>,
    ) -> Result<Response<pb::LookupResponse>, Status> {
        let r = self.handle_lookup(request);
        self.done("Lookup", r)
    }

    async fn batch_put(
        &self,
        request: Request<pb::BatchPutRequest>,
    ) -> Result<Response<pb::BatchPutResponse>, Status> {
        let r = self.handle_batch_put(request).await;
        self.done("BatchPut", r)
    }

    async fn batch_get(
        &self,
        request: Request<pb::BatchGetRequest>,
    ) -> Result<Response<pb::BatchGetResponse>, Status> {
        let r = self.handle_batch_get(request).await;
        self.done("BatchGet", r)
    }

    type PutStreamStream = BoxStream<pb::BatchPutResponse>;

    async fn put_stream(
        &self,
        request: Request<Streaming<pb::BatchPutRequest>>,
    ) -> Result<Response<Self::PutStreamStream>, Status> {
        let r = self.handle_put_stream(request);
        self.done("PutStream", r)
    }

    type GetStreamStream = BoxStream<pb::GetResult>;

    async fn get_stream(
        &self,
        request: Request<pb::BatchGetRequest>,
    ) -> Result<Response<Self::GetStreamStream>, Status> {
        let r = self.handle_get_stream(request);
        self.done("GetStream", r)
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let r = self.handle_delete(request).await;
        self.done("Delete", r)
    }

    async fn evict(
        &self,
        request: Request<pb::EvictRequest>,
    ) -> Result<Response<pb::EvictResponse>, Status> {
        let r = self.handle_evict(request).await;
        self.done("Evict", r)
    }

    async fn pin(
        &self,
        request: Request<pb::PinRequest>,
    ) -> Result<Response<pb::PinResponse>, Status> {
        let r = self.handle_pin(request);
        self.done("Pin", r)
    }

    async fn unpin(
        &self,
        request: Request<pb::UnpinRequest>,
    ) -> Result<Response<pb::UnpinResponse>, Status> {
        let r = self.handle_unpin(request);
        self.done("Unpin", r)
    }

    async fn stats(
        &self,
        request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        let r = self.handle_stats(request);
        self.done("Stats", r)
    }

    async fn list_blocks(
        &self,
        request: Request<pb::ListBlocksRequest>,
    ) -> Result<Response<pb::ListBlocksResponse>, Status> {
        let r = self.handle_list_blocks(request);
        self.done("ListBlocks", r)
    }

    async fn inspect(
        &self,
        request: Request<pb::InspectRequest>,
    ) -> Result<Response<pb::InspectResponse>, Status> {
        let r = self.handle_inspect(request).await;
        self.done("Inspect", r)
    }

    async fn verify(
        &self,
        request: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let r = self.handle_verify(request).await;
        self.done("Verify", r)
    }

    type WatchStream = BoxStream<pb::WatchEvent>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let r = self.handle_watch(request);
        self.done("Watch", r)
    }
}
