//! Blocks that move between the cache and engines' KV-region pages (the
//! `pages` of a BatchPut item or a BatchGet): each request's page list is
//! checked against its region's geometry and the namespace, then the blocks
//! either move directly between the region and a cache device that reaches
//! it (`region_io::put_direct` / `get_direct`), or are staged: gathered into
//! blocks before a put, scattered from found blocks after a get, one launch
//! per region (`region_io::gather` / `scatter`).
//!
//! No gather or scatter starts once the daemon has given the request up (its
//! cutoff, [`crate::limits::request_cutoff`]): the client has been answered
//! `DEADLINE_EXCEEDED` by then and may already let its engine reuse the pages,
//! so a late gather would store reused pages under the old keys and a late
//! scatter would overwrite recomputed KV. A request whose work reaches the
//! blocking pool after its cutoff (queued behind others, or the daemon stalled
//! by SIGSTOP or an overloaded host) moves no page: a put stores nothing and
//! answers `DEADLINE_EXCEEDED`; a get answers `DEADLINE_EXCEEDED`, or, when
//! the cutoff passes between two regions' scatters, a `region_error` for each
//! key whose pages were not written. A gather or scatter already running when
//! the cutoff passes runs to its end.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use kvstrata_proto::v1 as pb;
use kvstrata_tiers::{
    BlockCache, BlockKey, CacheError, Namespace, NamespaceId, PutBlock, TierKind,
};
use tonic::Status;

use super::KvCacheService;
use super::get::{hit_result, miss_result};
use super::put::{ParsedItem, Planned, PutPlan};
use crate::convert::{status, tier_to_pb};
use crate::limits::{request_cutoff, thread_cutoff};
use crate::region::io as region_io;
use crate::region::{KvRegion, RegionRegistry};

/// Checked KV pages of one block.
pub(super) struct PagesTarget {
    region: Arc<KvRegion>,
    pages_per_block: u32,
    page_ids: Vec<u32>,
    /// When the daemon gives the request up: no gather or scatter after it.
    cutoff: Option<Instant>,
}

/// The request's cutoff ([`request_cutoff`], or a region call's
/// [`thread_cutoff`]) as a std instant, for the blocking pool.
fn cutoff_now() -> Option<Instant> {
    request_cutoff()
        .map(|c| c.into_std())
        .or_else(thread_cutoff)
}

/// Whether the daemon has given the request up (its client was answered
/// `DEADLINE_EXCEEDED`), so no page may move for it any more.
fn given_up(cutoff: Option<Instant>) -> bool {
    cutoff.is_some_and(|c| Instant::now() >= c)
}

/// Why region `id` cannot be used by a daemon without a region socket.
fn no_region_socket(id: u64) -> String {
    format!(
        "KV region {id} is not registered (this daemon has no region socket: gpu.region_socket)"
    )
}

/// What a request told too late gets instead of a gather or scatter.
fn late(what: &str) -> String {
    format!(
        "deadline exceeded before the {what}: the daemon had already answered the request \
         DEADLINE_EXCEEDED, so no page was moved"
    )
}

/// Blocks of one region that move directly between its memory and device
/// `device` of the cache (`region_io::put_direct` / `get_direct`).
pub(super) struct DirectGroup {
    pub(super) device: usize,
    region: Arc<KvRegion>,
    pages_per_block: u32,
    /// Indices of the items (keys), in order.
    pub(super) items: Vec<usize>,
    /// Key and parent of each block (no parent on a get).
    pub(super) keys: Vec<(BlockKey, Option<BlockKey>)>,
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

    pub(super) fn pages(&self) -> region_io::RegionPages<'_> {
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

/// Put items bound for one region, gathered in one launch (staged path).
struct GatherGroup {
    region: Arc<KvRegion>,
    pages_per_block: u32,
    /// Indices of the items, in order.
    items: Vec<usize>,
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

/// How the keys of a BatchGet into pages are read.
struct GetPagesPlan<'a> {
    /// Keys bound for regions the cache's devices reach, per region (read
    /// and scattered directly).
    direct: Vec<DirectGroup>,
    /// The other keys: index and pages of each, read then scattered.
    staged: Vec<(usize, &'a PagesTarget)>,
    /// The keys of `staged`, in the same order.
    staged_keys: Vec<BlockKey>,
}

/// The pages a BatchGet names for its keys.
pub(super) enum PageLists<'a> {
    /// `pages`: one `KvPages` per key.
    PerKey(&'a [pb::KvPages]),
    /// `page_region_id` and `page_ids`: pages_per_block ids per key, one
    /// region.
    Array { region_id: u64, page_ids: &'a [u32] },
}

/// The checked pages of a BatchGet's keys.
enum GetTargets {
    /// One per key (`pages`; or page-id arrays into a region that no cache
    /// device reaches, read then scattered).
    PerKey(Vec<Result<PagesTarget, String>>),
    /// Every key's pages in one region that a cache device reaches (a
    /// page-id array): one direct group, built without a target per key.
    Direct(DirectGroup),
}

/// What became of one key of a BatchGet into pages: `Ok(Some(tier))` a hit,
/// `Ok(None)` a miss, `Err` a problem with its region.
pub(super) type PageOutcome = Result<Option<TierKind>, String>;

/// How a BatchGet into pages wants its answer.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct PagesAnswer {
    /// Each key's tier and the failed keys, not one `GetResult` per key
    /// (`compact_answer`).
    pub(super) compact: bool,
    /// As soon as the copies are queued, with the event to wait on
    /// (`answer_when_queued`): taken by a page-id array into a region a
    /// cache device reaches (one direct group); other gets are answered
    /// after their copies.
    pub(super) when_queued: bool,
}

/// What a get told its handler once its copies were queued (see
/// [`region_io::get_direct`]).
struct Queued {
    /// Each key's tier.
    found: Vec<Option<TierKind>>,
    /// The event the client waits on (`None`: nothing to wait for).
    event: Option<[u8; 64]>,
    /// When the work started on the blocking pool, and when it told.
    started: Instant,
    at: Instant,
}

/// What [`read_into_pages`] did.
struct PagesRead {
    outcome: Vec<PageOutcome>,
    /// The handler was told once the copies were queued (and may have
    /// answered then).
    told: bool,
}

/// After a get answered before its copies completed: counts it, and, if a
/// copy then failed, says so loudly (the client was told its pages would be
/// written; a failed copy on a device is a device fault).
fn check_after_answer(outcome: &[PageOutcome], registry: Option<&RegionRegistry>, region_id: u64) {
    let failed = outcome.iter().filter(|o| o.is_err()).count();
    if failed > 0 {
        tracing::error!(
            region_id,
            failed,
            "KV region: copies into pages failed after the get was answered (before they \
             completed); the client may read unwritten pages: the device is faulty"
        );
    }
    if let Some(r) = registry {
        r.count_answered_before_copies(failed > 0);
    }
}

impl KvCacheService {
    /// The region a request's `KvPages` names, after checking the page list
    /// against its geometry and the namespace (errors name `field`). An
    /// unknown or closed region is the item's own problem (`Ok(Err(..))`).
    pub(super) fn region_pages(
        &self,
        field: std::fmt::Arguments<'_>,
        pages: &pb::KvPages,
        namespace: &Namespace,
        last: &mut Option<(Arc<KvRegion>, u32)>,
    ) -> Result<Result<PagesTarget, String>, Status> {
        let Some(registry) = &self.regions else {
            return Ok(Err(no_region_socket(pages.region_id)));
        };
        // Items of one request nearly always name one region: its lookup
        // and geometry check are done once (`last`), the page ids per item.
        let (region, ppb) = match last {
            Some((r, ppb)) if r.id() == pages.region_id => (Arc::clone(r), *ppb),
            _ => {
                let region = match registry.get(pages.region_id) {
                    Ok(r) => r,
                    Err(e) => return Ok(Err(e.to_string())),
                };
                let ppb = check_region_fits(format_args!("{field}.region_id"), &region, namespace)?;
                *last = Some((Arc::clone(&region), ppb));
                (region, ppb)
            }
        };
        check_page_ids(field, &region, namespace, ppb, &pages.page_ids)?;
        Ok(Ok(PagesTarget {
            region,
            pages_per_block: ppb,
            page_ids: pages.page_ids.clone(),
            cutoff: cutoff_now(),
        }))
    }

    /// The pages of each key of a BatchGet in the array form: every key's
    /// `pages_per_block` ids of region `region_id`, one key's after the
    /// other (`page_region_id`, `page_ids`). Checked as `pages` would be,
    /// the region once; an unknown or closed region is every key's own
    /// problem.
    fn region_page_ids(
        &self,
        region_id: u64,
        page_ids: &[u32],
        block_keys: &[BlockKey],
        namespace: &Namespace,
    ) -> Result<GetTargets, Status> {
        let keys = block_keys.len();
        let region = match self.array_region(region_id) {
            Ok(r) => r,
            Err(e) => return Ok(GetTargets::PerKey(every_key(keys, e))),
        };
        let ppb = check_page_id_array(&region, page_ids, keys, namespace)?;
        if let Some(device) = region_io::direct_device(&self.cache, &region) {
            return Ok(GetTargets::Direct(DirectGroup {
                device,
                region,
                pages_per_block: ppb,
                items: (0..keys).collect(),
                keys: block_keys.iter().map(|k| (*k, None)).collect(),
                page_ids: page_ids.to_vec(),
            }));
        }
        Ok(GetTargets::PerKey(array_targets(&region, ppb, page_ids)))
    }

    /// The pages of each key of a BatchPut in the array form: every key's
    /// `pages_per_block` ids of region `region_id`, one key's after the
    /// other (`page_region_id`, `page_ids`). Checked as items' `pages` would
    /// be, the region once; an unknown or closed region is every key's own
    /// problem (`BAD_REGION`).
    pub(super) fn region_page_ids_put(
        &self,
        region_id: u64,
        page_ids: &[u32],
        keys: usize,
        namespace: &Namespace,
    ) -> Result<Vec<Result<PagesTarget, String>>, Status> {
        let region = match self.array_region(region_id) {
            Ok(r) => r,
            Err(e) => return Ok(every_key(keys, e)),
        };
        let ppb = check_page_id_array(&region, page_ids, keys, namespace)?;
        Ok(array_targets(&region, ppb, page_ids))
    }

    /// The region a request's page-id array names, or why it cannot be
    /// used (every key's own problem).
    fn array_region(&self, region_id: u64) -> Result<Arc<KvRegion>, String> {
        match self.regions.as_ref().map(|r| r.get(region_id)) {
            Some(Ok(r)) => Ok(r),
            Some(Err(e)) => Err(e.to_string()),
            None => Err(no_region_socket(region_id)),
        }
    }

    /// Checks a BatchGet into KV-region pages: `pages` (one `KvPages` per
    /// key) or the array form (`page_region_id`, `page_ids`). Nothing moves
    /// yet ([`run_page_get`]).
    pub(super) fn prepare_page_get(
        &self,
        ns: NamespaceId,
        keys: Vec<BlockKey>,
        pages: PageLists<'_>,
    ) -> Result<PageGet, Status> {
        let namespace = self.cache.namespace("namespace_id", &ns).map_err(status)?;
        let targets = match pages {
            PageLists::PerKey(pages) => {
                if pages.len() != keys.len() {
                    return Err(Status::invalid_argument(format!(
                        "pages: {} given for {} keys; give one per key, or none",
                        pages.len(),
                        keys.len()
                    )));
                }
                let mut last = None;
                GetTargets::PerKey(
                    pages
                        .iter()
                        .enumerate()
                        .map(|(i, p)| {
                            self.region_pages(format_args!("pages[{i}]"), p, &namespace, &mut last)
                        })
                        .collect::<Result<Vec<_>, Status>>()?,
                )
            }
            PageLists::Array {
                region_id,
                page_ids,
            } => self.region_page_ids(region_id, page_ids, &keys, &namespace)?,
        };
        Ok(PageGet {
            ns,
            keys,
            targets,
            block_bytes: namespace.block_bytes,
            cutoff: cutoff_now(),
        })
    }

    /// A BatchGet whose found blocks are scattered into KV-region pages
    /// ([`Self::prepare_page_get`], then [`run_page_get`] on the blocking
    /// pool).
    pub(super) async fn get_pages(
        &self,
        ns: NamespaceId,
        keys: Vec<BlockKey>,
        wire_keys: Vec<Bytes>,
        pages: PageLists<'_>,
        answer: PagesAnswer,
        received: Option<Instant>,
    ) -> Result<pb::BatchGetResponse, Status> {
        let entered = Instant::now();
        let get = self.prepare_page_get(ns, keys, pages)?;
        let cache = Arc::clone(&self.cache);
        let registry = self.regions.clone();
        let checked = Instant::now();
        let key_count = get.keys.len();
        // Told once the copies are queued (a direct group whose client asked).
        let early = answer.when_queued && get.answers_when_queued();
        let (tx, mut rx) = tokio::sync::oneshot::channel::<Queued>();
        let work = self.limits.blocking.run("get", move || {
            let started = Instant::now();
            let mut tx = early.then_some(tx);
            let mut tell = |found: &[Option<TierKind>], event: Option<[u8; 64]>| {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(Queued {
                        found: found.to_vec(),
                        event,
                        started,
                        at: Instant::now(),
                    });
                }
            };
            let outcome = run_page_get(
                &cache,
                registry.as_deref(),
                &get,
                early.then_some(&mut tell as region_io::TellQueued<'_>),
            )?;
            Ok::<_, Status>((outcome, started, Instant::now()))
        });
        tokio::pin!(work);
        // The copies' completion, or the word that they are queued, whichever
        // comes first (the completion wins a tie: its answer needs no wait).
        let (outcome, event, started, read) = tokio::select! {
            biased;
            done = &mut work => {
                let (outcome, started, at) = done??;
                (outcome, None, started, at)
            }
            Ok(q) = &mut rx => {
                let outcome = q.found.into_iter().map(Ok).collect();
                (outcome, Some(q.event), q.started, q.at)
            }
        };
        let returned = Instant::now();
        let mut response = page_answer(wire_keys, outcome, answer.compact);
        if let Some(event) = event.flatten() {
            response.pages_ready_event = Bytes::copy_from_slice(&event);
        }
        let us = |a: Instant, b: Instant| b.saturating_duration_since(a).as_micros() as u64;
        tracing::debug!(
            keys = key_count,
            compact = answer.compact,
            before_copies = event.is_some(),
            decode_us = received.map_or(0, |r| us(r, entered)),
            check_us = us(entered, checked),
            hop_us = us(checked, started),
            read_us = us(started, read),
            return_us = us(read, returned),
            answer_us = us(returned, Instant::now()),
            "page get (decode: from the call's arrival to its handler; check: page lists; hop: to \
             the blocking pool; read: lookups and copies, or, answered before the copies \
             complete (before_copies), until they were queued; return: back to the call's task; \
             answer: the results)"
        );
        Ok(response)
    }
}

/// A BatchGet into pages, checked ([`KvCacheService::prepare_page_get`]).
pub(super) struct PageGet {
    ns: NamespaceId,
    pub(super) keys: Vec<BlockKey>,
    targets: GetTargets,
    block_bytes: u64,
    /// When the daemon gives the request up: no scatter starts after it.
    cutoff: Option<Instant>,
}

impl PageGet {
    /// Whether the get can be answered once its copies are queued (one
    /// direct group: a page-id array into a region a cache device reaches).
    pub(super) fn answers_when_queued(&self) -> bool {
        matches!(self.targets, GetTargets::Direct(_))
    }
}

/// Reads a checked get's blocks and scatters them into its pages, on this
/// thread; each key's outcome, in order. `tell` (honoured by a get that
/// [`PageGet::answers_when_queued`]) is told once the copies are queued, and
/// this then waits for them before it returns. Moves nothing and answers
/// `DEADLINE_EXCEEDED` once the get's cutoff has passed.
pub(super) fn run_page_get(
    cache: &BlockCache,
    registry: Option<&RegionRegistry>,
    get: &PageGet,
    tell: Option<region_io::TellQueued<'_>>,
) -> Result<Vec<PageOutcome>, Status> {
    if given_up(get.cutoff) {
        return Err(Status::deadline_exceeded(late("scatter into pages[]")));
    }
    let read = read_into_pages(
        cache,
        &get.ns,
        &get.keys,
        &get.targets,
        get.block_bytes,
        registry,
        get.cutoff,
        tell,
    )
    .map_err(status)?;
    // Only a direct group of a page-id array is told.
    if let (true, GetTargets::Direct(g)) = (read.told, &get.targets) {
        check_after_answer(&read.outcome, registry, g.region.id());
    }
    Ok(read.outcome)
}

/// The answer to a BatchGet into pages: one `GetResult` per key, or, when
/// `compact`, each key's tier and the keys that failed.
pub(super) fn page_answer(
    wire_keys: Vec<Bytes>,
    outcome: Vec<PageOutcome>,
    compact: bool,
) -> pb::BatchGetResponse {
    if !compact {
        let results = wire_keys
            .into_iter()
            .zip(outcome)
            .map(|(key, o)| match o {
                Ok(Some(tier)) => hit_result(key, Bytes::new(), tier),
                Ok(None) => miss_result(key, String::new()),
                Err(e) => miss_result(key, e),
            })
            .collect();
        return pb::BatchGetResponse {
            results,
            ..Default::default()
        };
    }
    let mut failed = Vec::new();
    let tiers = outcome
        .into_iter()
        .enumerate()
        .map(|(i, o)| match o {
            Ok(Some(tier)) => tier_to_pb(tier) as i32,
            Ok(None) => pb::Tier::Unspecified as i32,
            Err(message) => {
                failed.push(pb::FailedKey {
                    index: i as u32,
                    message,
                });
                pb::Tier::Unspecified as i32
            }
        })
        .collect();
    pb::BatchGetResponse {
        results: Vec::new(),
        tiers,
        failed,
        ..Default::default()
    }
}

/// Reads `keys` and scatters the found blocks into their pages (`targets`,
/// one per key): first the staged keys, then each direct group. Returns what
/// became of each key, in order, and counts the bytes scattered. No scatter
/// starts after `cutoff`: its keys get a [`late`] error instead. `tell` (a
/// single direct group only) is told once its copies are queued.
#[allow(clippy::too_many_arguments)]
fn read_into_pages(
    cache: &BlockCache,
    ns: &NamespaceId,
    keys: &[BlockKey],
    targets: &GetTargets,
    block_bytes: u64,
    registry: Option<&RegionRegistry>,
    cutoff: Option<Instant>,
    tell: Option<region_io::TellQueued<'_>>,
) -> Result<PagesRead, CacheError> {
    let targets = match targets {
        GetTargets::PerKey(t) => t,
        GetTargets::Direct(g) => {
            let mut outcome: Vec<PageOutcome> = vec![Ok(None); keys.len()];
            if given_up(cutoff) {
                outcome.fill(Err(late("scatter")));
                return Ok(PagesRead {
                    outcome,
                    told: false,
                });
            }
            let (scattered, told) = get_direct_group(cache, ns, g, &mut outcome, tell)?;
            if let Some(r) = registry {
                r.count_moved(0, scattered);
            }
            return Ok(PagesRead { outcome, told });
        }
    };
    let mut outcome: Vec<PageOutcome> = targets
        .iter()
        .map(|t| match t {
            Ok(_) => Ok(None),
            Err(e) => Err(e.clone()),
        })
        .collect();
    let plan = plan_get_pages(cache, keys, targets);
    let mut scattered = scatter_staged(cache, ns, &plan, block_bytes, &mut outcome, cutoff)?;
    for g in &plan.direct {
        if given_up(cutoff) {
            for &i in &g.items {
                outcome[i] = Err(late("scatter"));
            }
            continue;
        }
        scattered += get_direct_group(cache, ns, g, &mut outcome, None)?.0;
    }
    if let Some(r) = registry {
        r.count_moved(0, scattered);
    }
    Ok(PagesRead {
        outcome,
        told: false,
    })
}

/// Sorts the keys with usable pages into direct groups (one per region a
/// cache device reaches) and staged keys.
fn plan_get_pages<'a>(
    cache: &BlockCache,
    keys: &[BlockKey],
    targets: &'a [Result<PagesTarget, String>],
) -> GetPagesPlan<'a> {
    let mut plan = GetPagesPlan {
        direct: Vec::new(),
        staged: Vec::new(),
        staged_keys: Vec::new(),
    };
    for (i, (t, key)) in targets.iter().zip(keys).enumerate() {
        let Ok(t) = t else { continue };
        if let Some(g) = plan
            .direct
            .iter_mut()
            .find(|g| Arc::ptr_eq(&g.region, &t.region))
        {
            g.push(i, *key, None, &t.page_ids);
            continue;
        }
        match region_io::direct_device(cache, &t.region) {
            Some(device) => {
                let mut g = DirectGroup::new(device, t);
                g.push(i, *key, None, &t.page_ids);
                plan.direct.push(g);
            }
            None => {
                plan.staged.push((i, t));
                plan.staged_keys.push(*key);
            }
        }
    }
    plan
}

/// Reads the staged keys and scatters the found blocks, one launch per
/// region; returns the bytes scattered. A failed scatter, or one that would
/// start after `cutoff`, turns its keys' outcomes into that error.
fn scatter_staged(
    cache: &BlockCache,
    ns: &NamespaceId,
    plan: &GetPagesPlan<'_>,
    block_bytes: u64,
    outcome: &mut [PageOutcome],
    cutoff: Option<Instant>,
) -> Result<u64, CacheError> {
    let found = if plan.staged_keys.is_empty() {
        Vec::new()
    } else {
        cache.get_batch(ns, &plan.staged_keys)?
    };
    // Found blocks grouped by region, scattered one launch per region.
    let mut groups: Vec<ScatterGroup> = Vec::new();
    for (&(i, t), hit) in plan.staged.iter().zip(found) {
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
        if given_up(cutoff) {
            for &i in &g.keys {
                outcome[i] = Err(late("scatter"));
            }
            continue;
        }
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
    Ok(scattered)
}

/// Reads one direct group's keys straight into its region's pages; returns
/// the bytes scattered and whether `tell` was told. A failed scatter turns
/// its found keys' outcomes into that error.
fn get_direct_group(
    cache: &BlockCache,
    ns: &NamespaceId,
    g: &DirectGroup,
    outcome: &mut [PageOutcome],
    tell: Option<region_io::TellQueued<'_>>,
) -> Result<(u64, bool), CacheError> {
    let done = region_io::get_direct(cache, ns, g.device, g.pages(), &g.block_keys(), tell)?;
    for (&i, tier) in g.items.iter().zip(&done.found) {
        outcome[i] = Ok(*tier);
    }
    match done.scatter {
        Ok(bytes) => Ok((bytes, done.told)),
        Err(e) => {
            tracing::warn!(region_id = g.region.id(), error = %e, "scatter into a KV region failed");
            for (&i, tier) in g.items.iter().zip(&done.found) {
                if tier.is_some() {
                    outcome[i] = Err(e.to_string());
                }
            }
            Ok((0, done.told))
        }
    }
}

/// The status of a failed gather of item `first`'s region.
pub(super) fn gather_status(first: usize, e: region_io::RegionIoError) -> Status {
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
/// reason it alone is refused. Once the request's cutoff has passed, nothing
/// is gathered (nor, by the caller, put directly: it runs right after) and the
/// put fails `DEADLINE_EXCEEDED`, storing nothing.
pub(super) fn gather_pages(
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
    let cutoff = parsed.iter().find_map(|p| match p {
        ParsedItem::Pages { target, .. } => target.cutoff,
        _ => None,
    });
    let (groups, direct) = group_put_pages(cache, &parsed);
    let too_late = |first: Option<&usize>| {
        Status::deadline_exceeded(format!(
            "items[{}].pages: {}; nothing stored",
            first.copied().unwrap_or(0),
            late("gather")
        ))
    };
    if given_up(cutoff) {
        let first = groups.first().and_then(|g| g.items.first());
        return Err(too_late(
            first.or(direct.as_ref().and_then(|d| d.items.first())),
        ));
    }
    let mut gathered: Vec<Option<Bytes>> = vec![None; parsed.len()];
    let mut total = 0u64;
    for g in &groups {
        if given_up(cutoff) {
            if let Some(r) = registry {
                r.count_moved(total, 0);
            }
            return Err(too_late(g.items.first()));
        }
        let blocks = region_io::gather(&g.region, g.pages_per_block, &g.page_ids, block_bytes)
            .map_err(|e| gather_status(g.items.first().copied().unwrap_or(0), e))?;
        total += blocks.len() as u64 * block_bytes;
        for (&i, b) in g.items.iter().zip(blocks) {
            gathered[i] = Some(b);
        }
    }
    if let Some(r) = registry {
        r.count_moved(total, 0);
    }
    if direct.is_some() && given_up(cutoff) {
        return Err(too_late(direct.as_ref().and_then(|d| d.items.first())));
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

/// The `Pages` items per region, in order, to be gathered; those of the
/// first region the cache's devices reach go direct instead.
fn group_put_pages(
    cache: &BlockCache,
    parsed: &[ParsedItem],
) -> (Vec<GatherGroup>, Option<DirectGroup>) {
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
    (groups, direct)
}

/// The same refusal for each of `keys` keys.
fn every_key(keys: usize, why: String) -> Vec<Result<PagesTarget, String>> {
    (0..keys).map(|_| Err(why.clone())).collect()
}

/// Each key's target of a checked page-id array (`ppb` ids per key).
fn array_targets(
    region: &Arc<KvRegion>,
    ppb: u32,
    page_ids: &[u32],
) -> Vec<Result<PagesTarget, String>> {
    let cutoff = cutoff_now();
    page_ids
        .chunks(ppb as usize)
        .map(|ids| {
            Ok(PagesTarget {
                region: Arc::clone(region),
                pages_per_block: ppb,
                page_ids: ids.to_vec(),
                cutoff,
            })
        })
        .collect()
}

/// Checks the page ids of a request's array form (`page_ids`, for `keys`
/// keys of `region`) against the region and the namespace; returns the
/// pages per block.
fn check_page_id_array(
    region: &KvRegion,
    page_ids: &[u32],
    keys: usize,
    namespace: &Namespace,
) -> Result<u32, Status> {
    let ppb = check_region_fits(format_args!("page_region_id"), region, namespace)?;
    let g = region.geometry();
    if page_ids.len() != keys * ppb as usize {
        return Err(Status::invalid_argument(format!(
            "page_ids: {} page ids for {keys} keys; give {ppb} per key, one key's after the other (a block is {ppb} pages of region {}: {} tokens / {} per page)",
            page_ids.len(),
            region.id(),
            namespace.spec.block_tokens,
            g.page_tokens
        )));
    }
    if page_ids.iter().any(|&p| p >= g.num_pages) {
        g.check_pages("page_ids", ppb, page_ids)
            .map_err(|e| Status::invalid_argument(format!("{}: {}", e.field, e.reason)))?;
    }
    Ok(ppb)
}

/// Checks a region's geometry against the namespace (once per region of a
/// request); returns pages_per_block. Errors name `field`, the region id's
/// field (`items[3].pages.region_id`, `page_region_id`).
fn check_region_fits(
    field: std::fmt::Arguments<'_>,
    region: &KvRegion,
    namespace: &Namespace,
) -> Result<u32, Status> {
    let g = region.geometry();
    let spec = &namespace.spec;
    let id = region.id();
    let bad = |what: String| Err(Status::invalid_argument(format!("{field}: {what}")));
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
    Ok(ppb)
}

/// Checks one block's page ids (`ppb` of them, each inside the region).
/// Errors name `field` (`items[3].pages.page_ids[1]`).
fn check_page_ids(
    field: std::fmt::Arguments<'_>,
    region: &KvRegion,
    namespace: &Namespace,
    ppb: u32,
    page_ids: &[u32],
) -> Result<(), Status> {
    let g = region.geometry();
    if page_ids.len() != ppb as usize {
        return Err(Status::invalid_argument(format!(
            "{field}.page_ids: {} page ids, but one block is {ppb} pages of region {} ({} tokens / {} per page)",
            page_ids.len(),
            region.id(),
            namespace.spec.block_tokens,
            g.page_tokens
        )));
    }
    if page_ids.iter().all(|&p| p < g.num_pages) {
        return Ok(());
    }
    // Only a bad list pays for naming the field.
    g.check_pages(&format!("{field}.page_ids"), ppb, page_ids)
        .map(|_| ())
        .map_err(|e| Status::invalid_argument(format!("{}: {}", e.field, e.reason)))
}
