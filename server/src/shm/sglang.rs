//! SGLang HiCache L3 storage: `sglang.runtime.hicache.StorageServer` served
//! from kvstrata's tiers (docs/sglang.md).
//!
//! SGLang registers its host KV pool on the mempool socket, then names byte
//! ranges (iovecs) of it per transfer. A transfer's payload is its iovecs
//! concatenated in order; it is stored under the transfer's id in an opaque
//! namespace named after the pool (`sglang:<pool name>`, or the configured
//! `sglang.namespace`) whose block size is the payload's length, so a reader
//! must ask for the same length to hit. Results are per transfer ([`Code`]);
//! only a malformed request as a whole (none today) would be an RPC error.
//!
//! SGLang's `Transfer.pool_id` is an `int32`, so its pools (registered with
//! SGLang's preamble) get 31-bit ids from a random per-run base
//! ([`crate::shm::pool::IdSequence`]). On top of that, a transfer may name only a
//! pool that the calling process registered itself (peer pids from
//! `SO_PEERCRED`, where the kernel reports both), so a worker that kept its
//! pool id across a daemon restart cannot reach another worker's new pool
//! even when the 31-bit ids collide.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use kvstrata_proto::sglang as pb;
use kvstrata_proto::sglang::storage_server_server::StorageServer;
use kvstrata_tiers::{
    BlockCache, BlockKey, CacheError, Dtype, Layout, MAX_KEY_BYTES, NamespaceId, NamespaceSpec,
    PutBlock, PutOutcome,
};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use crate::metrics::Metrics;
use crate::shm::pool::{Pool, PoolRegistry};

/// Longest transfer id accepted, in bytes.
pub const MAX_ID_BYTES: usize = 4096;
/// Prefix of the model id of every SGLang namespace.
pub const MODEL_ID_PREFIX: &str = "sglang:";

/// Per-transfer result codes (0 is success). Documented in docs/sglang.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Code {
    Ok = 0,
    NotFound = 1,
    NoSpace = 2,
    BadPool = 3,
    BadIovec = 4,
    BadId = 5,
    Internal = 6,
}

impl Code {
    pub fn name(self) -> &'static str {
        match self {
            Code::Ok => "ok",
            Code::NotFound => "not_found",
            Code::NoSpace => "no_space",
            Code::BadPool => "bad_pool",
            Code::BadIovec => "bad_iovec",
            Code::BadId => "bad_id",
            Code::Internal => "internal",
        }
    }
}

/// The kvstrata key of an SGLang id: the id itself when it fits a key (1 to 64
/// bytes), else `0xFF` followed by its SHA-256 (SGLang ids are text, so a
/// stored id never starts with 0xFF).
pub fn block_key(id: &[u8]) -> Result<BlockKey, Code> {
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return Err(Code::BadId);
    }
    if id.len() <= MAX_KEY_BYTES {
        return BlockKey::new("id", id).map_err(|_| Code::BadId);
    }
    let mut key = [0u8; 33];
    key[0] = 0xFF;
    key[1..].copy_from_slice(&Sha256::digest(id));
    BlockKey::new("id", &key).map_err(|_| Code::BadId)
}

/// The namespace spec of SGLang blocks of `bytes` bytes stored under `name`.
pub fn namespace_spec(name: &str, bytes: u64) -> NamespaceSpec {
    NamespaceSpec {
        model_id: format!("{MODEL_ID_PREFIX}{name}"),
        model_fingerprint: Vec::new(),
        num_layers: 0,
        num_kv_heads: 0,
        head_dim: 0,
        dtype: Dtype::Int8,
        block_tokens: 0,
        layout: Layout::Opaque,
        tp_rank: 0,
        tp_size: 1,
        opaque_block_bytes: bytes,
    }
}

/// The pid of the process on the other end of a request's Unix socket, where
/// the kernel reports one (0, a pid outside the daemon's pid namespace, is
/// none).
fn caller_pid<T>(request: &Request<T>) -> Option<i32> {
    request
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .and_then(|c| c.pid())
        .filter(|&p| p > 0)
}

/// Whether a transfer from process `caller` may name a pool that process
/// `owner` registered: the same process, or either pid unknown (then only the
/// random 31-bit id base stands between a stale id and another pool).
pub fn same_process(owner: Option<i32>, caller: Option<i32>) -> bool {
    match (owner, caller) {
        (Some(o), Some(c)) => o == c,
        _ => true,
    }
}

/// The StorageServer service.
#[derive(Clone)]
pub struct SglangService {
    cache: Arc<BlockCache>,
    pools: Arc<PoolRegistry>,
    metrics: Arc<Metrics>,
    /// `sglang.namespace`, when set: the one name for every block.
    fixed_name: Option<String>,
    /// Namespaces already registered, by (name, block bytes).
    registered: Arc<Mutex<HashMap<(String, u64), NamespaceId>>>,
}

impl SglangService {
    pub fn new(
        cache: Arc<BlockCache>,
        pools: Arc<PoolRegistry>,
        metrics: Arc<Metrics>,
        fixed_name: Option<String>,
    ) -> Self {
        SglangService {
            cache,
            pools,
            metrics,
            fixed_name: fixed_name.filter(|n| !n.is_empty()),
            registered: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn store_name<'a>(&'a self, pool: &'a Pool) -> &'a str {
        self.fixed_name.as_deref().unwrap_or(pool.name())
    }

    /// The namespace for `bytes`-byte blocks of `name`, registered on first use.
    fn namespace_for_put(&self, name: &str, bytes: u64) -> Result<NamespaceId, CacheError> {
        if let Some(id) = self.registered.lock().get(&(name.to_string(), bytes)) {
            return Ok(*id);
        }
        let (ns, _) = self.cache.register_namespace(namespace_spec(name, bytes))?;
        self.registered
            .lock()
            .insert((name.to_string(), bytes), ns.id);
        Ok(ns.id)
    }

    /// The transfer's pool and total length, with every iovec bounds-checked.
    /// A pool registered by another process than `caller` is refused
    /// ([`same_process`]).
    fn check_transfer(
        &self,
        t: &pb::Transfer,
        caller: Option<i32>,
    ) -> Result<(Arc<Pool>, u64), Code> {
        let pool_id = u64::try_from(t.pool_id).map_err(|_| Code::BadPool)?;
        let pool = self.pools.get(pool_id).map_err(|_| Code::BadPool)?;
        if !same_process(pool.peer_pid(), caller) {
            tracing::debug!(
                pool_id,
                pool_pid = pool.peer_pid(),
                caller_pid = caller,
                "sglang: a transfer names a pool another process registered: bad pool"
            );
            return Err(Code::BadPool);
        }
        let mut total = 0u64;
        for v in &t.iovec {
            pool.range(v.offset, v.length as u64)
                .map_err(|_| Code::BadIovec)?;
            total += v.length as u64;
        }
        if total == 0 || total > kvstrata_tiers::namespace::MAX_BLOCK_BYTES {
            return Err(Code::BadIovec);
        }
        Ok((pool, total))
    }

    fn put_one(&self, t: &pb::Transfer, caller: Option<i32>) -> Code {
        let key = match block_key(&t.id) {
            Ok(k) => k,
            Err(c) => return c,
        };
        let (pool, total) = match self.check_transfer(t, caller) {
            Ok(v) => v,
            Err(c) => return c,
        };
        let ns = match self.namespace_for_put(self.store_name(&pool), total) {
            Ok(ns) => ns,
            // A page larger than every tier's slots.
            Err(CacheError::BlockTooLarge { .. } | CacheError::InvalidArgument { .. }) => {
                return Code::BadIovec;
            }
            Err(e) => {
                tracing::warn!(error = %e, "sglang: cannot register a namespace");
                return Code::Internal;
            }
        };
        // One iovec: the host tier copies straight from the pool (and
        // write-through takes its own copy). Several: gathered into one buffer.
        let payload = if let [v] = t.iovec.as_slice() {
            match pool.range_bytes(v.offset, v.length as u64) {
                Ok(b) => b,
                Err(_) => return Code::BadIovec,
            }
        } else {
            let mut buf = Vec::with_capacity(total as usize);
            for v in &t.iovec {
                if pool.read_into(v.offset, v.length as u64, &mut buf).is_err() {
                    return Code::BadIovec;
                }
            }
            Bytes::from(buf)
        };
        let block = PutBlock {
            key,
            parent: None,
            payload,
        };
        match self.cache.put_batch(&ns, std::slice::from_ref(&block)) {
            Ok(out) => match out.first() {
                Some(PutOutcome::Stored) => Code::Ok,
                _ => Code::NoSpace,
            },
            Err(e) => {
                tracing::warn!(error = %e, "sglang: put failed");
                Code::Internal
            }
        }
    }

    fn get_one(&self, t: &pb::Transfer, caller: Option<i32>) -> Code {
        let key = match block_key(&t.id) {
            Ok(k) => k,
            Err(c) => return c,
        };
        let (pool, total) = match self.check_transfer(t, caller) {
            Ok(v) => v,
            Err(c) => return c,
        };
        let Ok(ns) = namespace_spec(self.store_name(&pool), total).id() else {
            return Code::BadIovec;
        };
        let hit = match self.cache.get_batch(&ns, std::slice::from_ref(&key)) {
            Ok(mut v) => v.pop().flatten(),
            // A namespace never written is a miss.
            Err(CacheError::UnknownNamespace { .. }) => None,
            Err(e) => {
                tracing::warn!(error = %e, "sglang: get failed");
                return Code::Internal;
            }
        };
        let Some((payload, _tier)) = hit else {
            return Code::NotFound;
        };
        let mut at = 0usize;
        for v in &t.iovec {
            let end = at + v.length as usize;
            let Some(part) = payload.get(at..end) else {
                return Code::Internal;
            };
            if pool.write(v.offset, part).is_err() {
                return Code::BadIovec;
            }
            at = end;
        }
        Code::Ok
    }

    fn exist_one(&self, id: &[u8], namespaces: &[NamespaceId]) -> bool {
        let Ok(key) = block_key(id) else {
            return false;
        };
        namespaces.iter().any(|ns| {
            self.cache
                .lookup(ns, std::slice::from_ref(&key))
                .is_ok_and(|t| !t.is_empty())
        })
    }

    /// The namespaces an `Exist` looks in: those of the configured name, else
    /// those of the pools registered now.
    fn exist_scope(&self) -> Vec<NamespaceId> {
        let names: Vec<String> = match &self.fixed_name {
            Some(n) => vec![n.clone()],
            None => self.pools.names(),
        };
        let model_ids: Vec<String> = names
            .iter()
            .map(|n| format!("{MODEL_ID_PREFIX}{n}"))
            .collect();
        self.cache
            .namespaces()
            .iter()
            .filter(|ns| model_ids.contains(&ns.spec.model_id))
            .map(|ns| ns.id)
            .collect()
    }

    /// Runs per-transfer work on the blocking pool (copies and disk reads).
    async fn transfers(
        &self,
        method: &'static str,
        transfers: Vec<pb::Transfer>,
        caller: Option<i32>,
        one: fn(&SglangService, &pb::Transfer, Option<i32>) -> Code,
    ) -> Result<Vec<i32>, Status> {
        let svc = self.clone();
        let codes = tokio::task::spawn_blocking(move || {
            transfers
                .iter()
                .map(|t| one(&svc, t, caller))
                .collect::<Vec<Code>>()
        })
        .await
        .map_err(|e| Status::internal(format!("{method} task failed: {e}")))?;
        for c in &codes {
            self.metrics.record_sglang_transfer(method, c.name());
        }
        Ok(codes.into_iter().map(|c| c as i32).collect())
    }

    fn done<T>(&self, method: &'static str, r: Result<T, Status>) -> Result<Response<T>, Status> {
        let code = r.as_ref().map_or_else(|s| s.code(), |_| tonic::Code::Ok);
        self.metrics.record_request(method, code);
        r.map(Response::new)
    }
}

#[tonic::async_trait]
impl StorageServer for SglangService {
    async fn exist(
        &self,
        request: Request<pb::ExistRequest>,
    ) -> Result<Response<pb::ExistResponse>, Status> {
        let ids = request.into_inner().id;
        let svc = self.clone();
        let r = tokio::task::spawn_blocking(move || {
            let scope = svc.exist_scope();
            ids.iter()
                .map(|id| svc.exist_one(id, &scope))
                .collect::<Vec<bool>>()
        })
        .await
        .map(|results| pb::ExistResponse { results })
        .map_err(|e| Status::internal(format!("exist task failed: {e}")));
        self.done("sglang.Exist", r)
    }

    async fn batch_put(
        &self,
        request: Request<pb::BatchPutRequest>,
    ) -> Result<Response<pb::BatchPutResponse>, Status> {
        let caller = caller_pid(&request);
        let r = self
            .transfers(
                "sglang.BatchPut",
                request.into_inner().puts,
                caller,
                SglangService::put_one,
            )
            .await
            .map(|results| pb::BatchPutResponse { results });
        self.done("sglang.BatchPut", r)
    }

    async fn batch_get(
        &self,
        request: Request<pb::BatchGetRequest>,
    ) -> Result<Response<pb::BatchGetResponse>, Status> {
        let caller = caller_pid(&request);
        let r = self
            .transfers(
                "sglang.BatchGet",
                request.into_inner().gets,
                caller,
                SglangService::get_one,
            )
            .await
            .map(|results| pb::BatchGetResponse { results });
        self.done("sglang.BatchGet", r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_map_to_keys() {
        assert_eq!(block_key(b"").unwrap_err(), Code::BadId);
        assert_eq!(
            block_key(&[b'a'; MAX_ID_BYTES + 1]).unwrap_err(),
            Code::BadId
        );
        assert_eq!(block_key(b"abc").unwrap().as_bytes(), b"abc");
        let long_a = block_key(&[b'a'; 65]).unwrap();
        let long_b = block_key(&[b'b'; 65]).unwrap();
        assert_eq!(long_a.as_bytes().len(), 33);
        assert_eq!(long_a.as_bytes()[0], 0xFF);
        assert_ne!(long_a, long_b);
        assert_eq!(block_key(&[b'a'; 65]).unwrap(), long_a);
    }

    #[test]
    fn only_the_registering_process_may_name_a_pool() {
        assert!(same_process(Some(10), Some(10)));
        assert!(!same_process(Some(10), Some(11)));
        assert!(same_process(None, Some(11)));
        assert!(same_process(Some(10), None));
    }

    #[test]
    fn namespaces_differ_by_name_and_size() {
        let a = namespace_spec("pool", 4096).id().unwrap();
        assert_eq!(a, namespace_spec("pool", 4096).id().unwrap());
        assert_ne!(a, namespace_spec("pool", 8192).id().unwrap());
        assert_ne!(a, namespace_spec("other", 4096).id().unwrap());
    }
}
