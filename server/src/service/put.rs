//! `BatchPut` and `PutStream`: each item's bytes come inline, from the
//! caller's shared-memory pool range (without a copy), or from KV-region
//! pages ([`super::kv_pages`]). An item whose pool or region is unknown or
//! closed is refused alone (`BAD_REGION`); any other invalid item fails the
//! whole request before anything is stored.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use kvstrata_proto::v1 as pb;
use kvstrata_tiers::{
    BlockCache, BlockKey, DevicePutError, Namespace, NamespaceId, PutBlock, PutOutcome,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status, Streaming};

use super::kv_pages::{DirectGroup, PagesTarget, gather_pages, gather_status};
use super::{BoxStream, KvCacheService, check_pools, check_range_length};
use crate::auth::Caller;
use crate::convert::{self, status};
use crate::limits::{Deadline, InflightPermit};
use crate::region::io as region_io;
use crate::region::{KvRegion, RegionRegistry};
use crate::shm::pool::RangeError;

/// One put item after parsing.
pub(super) enum ParsedItem {
    /// The block's bytes are at hand (inline or a pool range).
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

/// A put item after the staged gathers.
pub(super) enum Planned {
    /// Stored by `put_batch`.
    Block(PutBlock),
    /// Stored by the direct put, in order.
    Direct,
    /// Refused alone (unknown or closed pool or region): `BadRegion`.
    Bad(String),
}

/// A BatchPut ready to store.
pub(super) struct PutPlan {
    pub(super) items: Vec<Planned>,
    /// The blocks of the first direct-capable region named, if any.
    pub(super) direct: Option<DirectGroup>,
}

/// Whether a put names shared memory (pool ranges or KV pages).
fn uses_pools(req: &pb::BatchPutRequest) -> bool {
    names_page_array(req)
        || req
            .items
            .iter()
            .any(|i| i.range.is_some() || i.pages.is_some())
}

/// Whether a put is in the array form (`keys`, `page_region_id`, `page_ids`).
pub(super) fn names_page_array(req: &pb::BatchPutRequest) -> bool {
    !req.keys.is_empty() || req.page_region_id != 0 || !req.page_ids.is_empty()
}

impl KvCacheService {
    pub(super) async fn handle_batch_put(
        &self,
        request: Request<pb::BatchPutRequest>,
    ) -> Result<pb::BatchPutResponse, Status> {
        let caller = Caller::of(&request);
        let uses_pools = uses_pools(request.get_ref());
        self.check_ns(&caller, &request.get_ref().namespace_id)?;
        check_pools(&caller, "items[].range", uses_pools)?;
        let received = request
            .extensions()
            .get::<InflightPermit>()
            .map(InflightPermit::received);
        self.put(request.into_inner(), received).await
    }

    /// Answers each batch of the client's stream in order, from a task that
    /// stops at the first failed batch. The stream holds its in-flight slot
    /// until it ends, and stops at the client's deadline.
    pub(super) fn handle_put_stream(
        &self,
        request: Request<Streaming<pb::BatchPutRequest>>,
    ) -> Result<BoxStream<pb::BatchPutResponse>, Status> {
        let permit = request.extensions().get::<InflightPermit>().cloned();
        let deadline = request.extensions().get::<Deadline>().copied();
        let caller = Caller::of(&request);
        let incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let svc = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            svc.put_batches(incoming, &caller, deadline, tx).await;
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    /// Stores each batch of `incoming` and sends its answer to `tx`, until
    /// the stream ends, a batch fails, the client leaves, `deadline` passes
    /// or the daemon shuts down. Each batch is counted as `PutStream.batch`.
    async fn put_batches(
        &self,
        mut incoming: Streaming<pb::BatchPutRequest>,
        caller: &Caller,
        deadline: Option<Deadline>,
        tx: mpsc::Sender<Result<pb::BatchPutResponse, Status>>,
    ) {
        let expired = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.0).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expired);
        loop {
            let msg = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = &mut expired => {
                    self.metrics.record_rejected("deadline");
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
            if let Err(e) = self
                .check_ns(caller, &batch.namespace_id)
                .and_then(|()| check_pools(caller, "items[].range", uses_pools(&batch)))
            {
                self.metrics.record_request("PutStream.batch", e.code());
                let _ = tx.send(Err(e)).await;
                break;
            }
            let r = tokio::select! {
                r = self.put(batch, None) => r,
                _ = &mut expired => {
                    self.metrics.record_rejected("deadline");
                    Err(Status::deadline_exceeded(
                        "deadline exceeded: the client's grpc-timeout has passed",
                    ))
                }
            };
            let failed = r.is_err();
            self.metrics.record_request(
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
    }

    /// Validates and stores one BatchPut (on the blocking pool).
    /// `received`: when the call came in (for the page puts' debug line).
    async fn put(
        &self,
        req: pb::BatchPutRequest,
        received: Option<Instant>,
    ) -> Result<pb::BatchPutResponse, Status> {
        let entered = Instant::now();
        let (ns, parsed) = self.parse_put(req)?;
        let items = parsed.len();
        let pages = parsed
            .iter()
            .filter(|p| matches!(p, ParsedItem::Pages { .. }))
            .count();
        let checked = Instant::now();
        let cache = Arc::clone(&self.cache);
        let registry = self.regions.clone();
        let (results, started, stored_at) = self
            .limits
            .blocking
            .run("put", move || {
                let started = Instant::now();
                let results = store_put(&cache, &ns, parsed, registry.as_deref());
                (results, started, Instant::now())
            })
            .await?;
        let results = results?;
        let returned = Instant::now();
        let stored = results
            .iter()
            .filter(|&&r| r == pb::PutStatus::Stored as i32)
            .count() as u32;
        if pages > 0 {
            let us = |a: Instant, b: Instant| b.saturating_duration_since(a).as_micros() as u64;
            tracing::debug!(
                items,
                pages,
                decode_us = received.map_or(0, |r| us(r, entered)),
                parse_us = us(entered, checked),
                hop_us = us(checked, started),
                store_us = us(started, stored_at),
                return_us = us(stored_at, returned),
                "page put (decode: from the call's arrival to its handler; parse: items and page \
                 lists checked; hop: to the blocking pool; store: gathers, copies, checksums and \
                 publishing; return: back to the call's task)"
            );
        }
        Ok(pb::BatchPutResponse { results, stored })
    }

    /// Validates a put request. Each item becomes its block, or — for an item
    /// whose pool range names no registered pool or lies outside it — the
    /// reason, so that item alone is refused.
    pub(super) fn parse_put(
        &self,
        req: pb::BatchPutRequest,
    ) -> Result<(NamespaceId, Vec<ParsedItem>), Status> {
        let ns = convert::namespace_id("namespace_id", &req.namespace_id)?;
        if names_page_array(&req) {
            let items = self.parse_put_array(&ns, req)?;
            return Ok((ns, items));
        }
        convert::check_batch("items", req.items.len(), self.limits.max_batch)?;
        let namespace = if uses_pools(&req) {
            Some(self.cache.namespace("namespace_id", &ns).map_err(status)?)
        } else {
            None
        };
        let mut last = None;
        let items = req
            .items
            .into_iter()
            .enumerate()
            .map(|(i, it)| self.parse_put_item(i, it, namespace.as_deref(), &mut last))
            .collect::<Result<Vec<_>, Status>>()?;
        Ok((ns, items))
    }

    /// Validates a put in the array form: each key becomes a block
    /// gathered from its pages, or (an unknown or closed region) is refused
    /// alone.
    fn parse_put_array(
        &self,
        ns: &NamespaceId,
        req: pb::BatchPutRequest,
    ) -> Result<Vec<ParsedItem>, Status> {
        if !req.items.is_empty() {
            return Err(Status::invalid_argument(
                "items: give `items` or the array form (`keys`, `page_region_id`, `page_ids`), not both",
            ));
        }
        let keys = convert::keys("keys", &req.keys, self.limits.max_batch)?;
        let n = keys.len();
        let parents: Vec<Option<BlockKey>> = if req.chain_parents {
            if !req.parents.is_empty() {
                return Err(Status::invalid_argument(
                    "parents: give `parents` or `chain_parents`, not both",
                ));
            }
            let first = convert::optional_key(|| "first_parent".into(), &req.first_parent)?;
            std::iter::once(first)
                .chain(keys.iter().take(n.saturating_sub(1)).map(|k| Some(*k)))
                .collect()
        } else {
            if !req.first_parent.is_empty() {
                return Err(Status::invalid_argument(
                    "first_parent: only with chain_parents (the first key's parent of a chain)",
                ));
            }
            match req.parents.len() {
                0 => vec![None; n],
                m if m == n => req
                    .parents
                    .iter()
                    .enumerate()
                    .map(|(i, p)| convert::optional_key(|| format!("parents[{i}]"), p))
                    .collect::<Result<_, Status>>()?,
                m => {
                    return Err(Status::invalid_argument(format!(
                        "parents: {m} for {n} keys; give one per key (empty: none), none at all, or chain_parents"
                    )));
                }
            }
        };
        let namespace = self.cache.namespace("namespace_id", ns).map_err(status)?;
        let targets = self.region_page_ids_put(req.page_region_id, &req.page_ids, n, &namespace)?;
        Ok(keys
            .into_iter()
            .zip(parents)
            .zip(targets)
            .map(|((key, parent), target)| match target {
                Ok(target) => ParsedItem::Pages {
                    key,
                    parent,
                    target,
                },
                Err(e) => ParsedItem::Bad(e),
            })
            .collect())
    }

    /// Validates item `i` of a put (`namespace`: given when the request
    /// names shared memory).
    fn parse_put_item(
        &self,
        i: usize,
        it: pb::PutItem,
        namespace: Option<&Namespace>,
        last: &mut Option<(Arc<KvRegion>, u32)>,
    ) -> Result<ParsedItem, Status> {
        let key = convert::key_named(|| format!("items[{i}].key"), &it.key)?;
        let parent = convert::optional_key(|| format!("items[{i}].parent"), &it.parent)?;
        if let (Some(pages), Some(namespace)) = (&it.pages, namespace) {
            if !it.payload.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "items[{i}].payload: must be empty when items[{i}].pages is set"
                )));
            }
            if it.range.is_some() {
                return Err(Status::invalid_argument(format!(
                    "items[{i}].range: name a pool range or KV pages, not both"
                )));
            }
            return Ok(
                match self.region_pages(format_args!("items[{i}].pages"), pages, namespace, last)? {
                    Ok(target) => ParsedItem::Pages {
                        key,
                        parent,
                        target,
                    },
                    Err(e) => ParsedItem::Bad(e),
                },
            );
        }
        let payload = match (it.range, namespace) {
            (Some(range), Some(namespace)) => {
                if !it.payload.is_empty() {
                    return Err(Status::invalid_argument(format!(
                        "items[{i}].payload: must be empty when items[{i}].range is set"
                    )));
                }
                check_range_length(
                    &format!("items[{i}].range.length"),
                    &range,
                    namespace.block_bytes,
                )?;
                self.range_payload(&range)
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
    }

    /// A put item's bytes from its pool range, without a copy: the host tier
    /// copies them into its slot (and write-through takes its own copy).
    fn range_payload(&self, range: &pb::PoolRange) -> Result<Bytes, RangeError> {
        self.pools
            .get(range.pool_id)?
            .range_bytes(range.offset, range.length)
    }
}

/// Stores the parsed items of one put; returns each item's `PutStatus`.
///
/// Every gather runs before anything is stored: the staged ones first
/// ([`gather_pages`]), then the direct put (whose failed gather stores
/// nothing), then the rest (see `region_io`).
pub(super) fn store_put(
    cache: &BlockCache,
    ns: &NamespaceId,
    parsed: Vec<ParsedItem>,
    registry: Option<&RegionRegistry>,
) -> Result<Vec<i32>, Status> {
    let plan = gather_pages(cache, ns, parsed, registry)?;
    let mut direct = Vec::new().into_iter();
    if let Some(d) = &plan.direct {
        let first = d.items.first().copied().unwrap_or(0);
        let done =
            region_io::put_direct(cache, ns, d.device, d.pages(), &d.keys).map_err(
                |e| match e {
                    DevicePutError::Cache(e) => status(e),
                    DevicePutError::Fill(e) => gather_status(first, e),
                },
            )?;
        if let Some(r) = registry {
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
    let mut outcomes = cache.put_batch(ns, &blocks).map_err(status)?.into_iter();
    let code = |o: Option<PutOutcome>| match o {
        Some(PutOutcome::Stored) => pb::PutStatus::Stored,
        Some(PutOutcome::DiskFailed) => pb::PutStatus::DiskFailed,
        Some(PutOutcome::NoSpace) | None => pb::PutStatus::NoSpace,
    };
    Ok(plan
        .items
        .iter()
        .map(|p| match p {
            Planned::Block(_) => code(outcomes.next()),
            Planned::Direct => code(direct.next()),
            Planned::Bad(why) => {
                tracing::debug!(reason = %why, "put item refused: BAD_REGION");
                pb::PutStatus::BadRegion
            }
        } as i32)
        .collect())
}
