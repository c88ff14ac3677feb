//! `BatchGet` and `GetStream`: blocks read from the cache and returned
//! inline, written into the caller's shared-memory pool ranges, or (through
//! [`super::kv_pages`]) scattered into KV-region pages.

use std::sync::Arc;

use bytes::Bytes;
use kvstrata_proto::v1 as pb;
use kvstrata_tiers::{BlockCache, BlockKey, NamespaceId, TierKind};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status};

use super::kv_pages::{PageLists, PagesAnswer};
use super::{BoxStream, KvCacheService, check_pools, check_range_length};
use crate::auth::Caller;
use crate::convert::{self, status};
use crate::limits::{Deadline, InflightPermit};
use crate::shm::pool::{Pool, RangeError};

/// GetStream accepts this many times `max_batch` keys.
const STREAM_BATCH_FACTOR: usize = 16;

/// Where one key of a get goes: the pool and offset, or why its range
/// cannot be used.
type GetTarget = Result<(Arc<Pool>, u64), RangeError>;

/// Whether a BatchGet names its pages as one page-id array
/// (`page_region_id`, `page_ids`).
fn names_page_ids(req: &pb::BatchGetRequest) -> bool {
    !req.page_ids.is_empty() || req.page_region_id != 0
}

impl KvCacheService {
    pub(super) async fn handle_batch_get(
        &self,
        request: Request<pb::BatchGetRequest>,
    ) -> Result<pb::BatchGetResponse, Status> {
        let caller = Caller::of(&request);
        let r = request.get_ref();
        let uses_pools = !r.ranges.is_empty() || !r.pages.is_empty() || names_page_ids(r);
        self.check_ns(&caller, &r.namespace_id)?;
        check_pools(&caller, "ranges", uses_pools)?;
        let received = request
            .extensions()
            .get::<InflightPermit>()
            .map(InflightPermit::received);
        self.get(request.into_inner(), self.limits.max_batch, received)
            .await
    }

    /// Answers one result per key, in order, from a task that reads the keys
    /// one at a time (a long list need not fit one response). The stream
    /// holds its in-flight slot until it ends, and stops at the client's
    /// deadline.
    pub(super) fn handle_get_stream(
        &self,
        request: Request<pb::BatchGetRequest>,
    ) -> Result<BoxStream<pb::GetResult>, Status> {
        let caller = Caller::of(&request);
        self.check_ns(&caller, &request.get_ref().namespace_id)?;
        let permit = request.extensions().get::<InflightPermit>().cloned();
        let deadline = request.extensions().get::<Deadline>().copied();
        let req = request.into_inner();
        let max = self.limits.max_batch.saturating_mul(STREAM_BATCH_FACTOR);
        if !req.ranges.is_empty() {
            return Err(Status::invalid_argument(
                "ranges: GetStream returns payloads inline; use BatchGet to read into pools",
            ));
        }
        if !req.pages.is_empty() {
            return Err(Status::invalid_argument(
                "pages: GetStream returns payloads inline; use BatchGet to read into KV pages",
            ));
        }
        if names_page_ids(&req) {
            return Err(Status::invalid_argument(
                "page_ids: GetStream returns payloads inline; use BatchGet to read into KV pages",
            ));
        }
        if req.compact_answer {
            return Err(Status::invalid_argument(
                "compact_answer: GetStream answers one GetResult per key; use BatchGet into KV pages",
            ));
        }
        if req.answer_when_queued {
            return Err(Status::invalid_argument(
                "answer_when_queued: GetStream returns payloads inline; use BatchGet into KV pages",
            ));
        }
        let ns = convert::namespace_id("namespace_id", &req.namespace_id)?;
        let keys = convert::keys("keys", &req.keys, max)?;
        self.cache.namespace("namespace_id", &ns).map_err(status)?;
        let (tx, rx) = mpsc::channel::<Result<pb::GetResult, Status>>(4);
        let svc = self.clone();
        tokio::spawn(async move {
            // Held until the stream ends (or the client leaves).
            let _permit = permit;
            svc.stream_gets(ns, keys, req.keys, deadline, tx).await;
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    /// Reads `keys` one at a time and sends each result to `tx`, until the
    /// last key, the client leaving, `deadline` or shutdown.
    async fn stream_gets(
        &self,
        ns: NamespaceId,
        keys: Vec<BlockKey>,
        wire_keys: Vec<Bytes>,
        deadline: Option<Deadline>,
        tx: mpsc::Sender<Result<pb::GetResult, Status>>,
    ) {
        for (key, wire_key) in keys.into_iter().zip(wire_keys) {
            if self.shutdown.is_cancelled() {
                break;
            }
            if let Some(d) = deadline.filter(|d| d.passed()) {
                self.metrics.record_rejected("deadline");
                let _ = tx.send(Err(d.status())).await;
                break;
            }
            let c = Arc::clone(&self.cache);
            let hit = self
                .limits
                .blocking
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
    }

    /// A BatchGet of at most `max` keys: inline payloads, pool ranges or KV
    /// pages, one result per key in order (or, into KV pages, the compact
    /// answer when the request asks for it).
    /// `received`: when the call came in (for the page gets' debug line).
    async fn get(
        &self,
        req: pb::BatchGetRequest,
        max: usize,
        received: Option<std::time::Instant>,
    ) -> Result<pb::BatchGetResponse, Status> {
        let (ns, keys, answer, names) = check_get(&req, max)?;
        match names {
            PagesNamed::Array => {
                let pages = PageLists::Array {
                    region_id: req.page_region_id,
                    page_ids: &req.page_ids,
                };
                return self
                    .get_pages(ns, keys, req.keys, pages, answer, received)
                    .await;
            }
            PagesNamed::PerKey => {
                let pages = PageLists::PerKey(&req.pages);
                return self
                    .get_pages(ns, keys, req.keys, pages, answer, received)
                    .await;
            }
            PagesNamed::No => {}
        }
        let targets = if req.ranges.is_empty() {
            None
        } else {
            Some(self.get_targets(&ns, keys.len(), &req.ranges)?)
        };
        let cache = Arc::clone(&self.cache);
        let wire_keys = req.keys;
        let results = self
            .limits
            .blocking
            .run("get", move || match targets {
                None => get_inline(&cache, &ns, &keys, wire_keys),
                Some(targets) => get_into_pools(&cache, &ns, &keys, wire_keys, targets),
            })
            .await?
            .map_err(status)?;
        Ok(pb::BatchGetResponse {
            results,
            ..Default::default()
        })
    }

    /// Where each key's block goes when the request names pool ranges: the
    /// pool and offset, or why that range cannot be used.
    fn get_targets(
        &self,
        ns: &NamespaceId,
        key_count: usize,
        ranges: &[pb::PoolRange],
    ) -> Result<Vec<GetTarget>, Status> {
        if ranges.len() != key_count {
            return Err(Status::invalid_argument(format!(
                "ranges: {} given for {key_count} keys; give one per key, or none for inline payloads",
                ranges.len()
            )));
        }
        let namespace = self.cache.namespace("namespace_id", ns).map_err(status)?;
        ranges
            .iter()
            .enumerate()
            .map(|(i, r)| {
                check_range_length(&format!("ranges[{i}].length"), r, namespace.block_bytes)?;
                Ok(self.pools.get(r.pool_id).and_then(|pool| {
                    pool.range(r.offset, r.length)?;
                    Ok((pool, r.offset))
                }))
            })
            .collect()
    }
}

/// Whether (and how) a BatchGet names KV pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PagesNamed {
    /// No: inline payloads or pool ranges.
    No,
    /// `pages`, one `KvPages` per key.
    PerKey,
    /// The array form (`page_region_id`, `page_ids`).
    Array,
}

/// Checks a BatchGet's fields (at most `max` keys): its namespace id, keys,
/// how a get into pages wants its answer, and whether it names pages.
pub(super) fn check_get(
    req: &pb::BatchGetRequest,
    max: usize,
) -> Result<(NamespaceId, Vec<BlockKey>, PagesAnswer, PagesNamed), Status> {
    let ns = convert::namespace_id("namespace_id", &req.namespace_id)?;
    let keys = convert::keys("keys", &req.keys, max)?;
    let array = names_page_ids(req);
    if array && !req.pages.is_empty() {
        return Err(Status::invalid_argument(
            "page_ids: give `pages` or `page_region_id` and `page_ids`, not both",
        ));
    }
    if (array || !req.pages.is_empty()) && !req.ranges.is_empty() {
        return Err(Status::invalid_argument(
            "ranges: give pool ranges or KV pages, not both",
        ));
    }
    let compact = req.compact_answer;
    if compact && !array && req.pages.is_empty() {
        return Err(Status::invalid_argument(
            "compact_answer: only a get into KV pages (`pages` or `page_ids`) answers \
             compactly; inline and pool-range gets answer one GetResult per key",
        ));
    }
    if req.answer_when_queued && !array && req.pages.is_empty() {
        return Err(Status::invalid_argument(
            "answer_when_queued: only a get into KV pages (`pages` or `page_ids`) can be \
             answered before its copies complete; inline and pool-range gets carry or \
             write their bytes before the answer",
        ));
    }
    let answer = PagesAnswer {
        compact,
        when_queued: req.answer_when_queued,
    };
    let named = if array {
        PagesNamed::Array
    } else if !req.pages.is_empty() {
        PagesNamed::PerKey
    } else {
        PagesNamed::No
    };
    Ok((ns, keys, answer, named))
}

/// Reads `keys` and answers their payloads inline.
fn get_inline(
    cache: &BlockCache,
    ns: &NamespaceId,
    keys: &[BlockKey],
    wire_keys: Vec<Bytes>,
) -> Result<Vec<pb::GetResult>, kvstrata_tiers::CacheError> {
    let found = cache.get_batch(ns, keys)?;
    Ok(wire_keys
        .into_iter()
        .zip(found)
        .map(|(key, hit)| match hit {
            Some((payload, tier)) => hit_result(key, payload, tier),
            None => miss_result(key, String::new()),
        })
        .collect())
}

/// Reads the keys whose pool range is usable and writes each found block
/// into its range; a key whose range is not usable is a miss naming why.
fn get_into_pools(
    cache: &BlockCache,
    ns: &NamespaceId,
    keys: &[BlockKey],
    wire_keys: Vec<Bytes>,
    targets: Vec<GetTarget>,
) -> Result<Vec<pb::GetResult>, kvstrata_tiers::CacheError> {
    // Only keys with a usable range are read.
    let wanted: Vec<BlockKey> = keys
        .iter()
        .zip(&targets)
        .filter(|(_, t)| t.is_ok())
        .map(|(k, _)| *k)
        .collect();
    let mut found = cache.get_batch(ns, &wanted)?.into_iter();
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
}

pub(super) fn hit_result(key: Bytes, payload: Bytes, tier: TierKind) -> pb::GetResult {
    pb::GetResult {
        key,
        found: true,
        payload,
        tier: convert::tier_to_pb(tier) as i32,
        region_error: String::new(),
    }
}

pub(super) fn miss_result(key: Bytes, region_error: String) -> pb::GetResult {
    pb::GetResult {
        key,
        found: false,
        payload: Bytes::new(),
        tier: pb::Tier::Unspecified as i32,
        region_error,
    }
}
