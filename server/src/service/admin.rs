//! The operator's methods: `Delete` and `Evict` (blocks leave the cache),
//! `Stats`, `ListBlocks` and `Inspect` (what the cache holds), and `Verify`
//! (a check of every disk slot, admins only). A tenant's `Stats` shows the
//! daemon's shape only, not what other tenants do ([`tenant_view`]).

use std::sync::Arc;

use bytes::Bytes;
use kvstrata_proto::v1 as pb;
use kvstrata_tiers::{BlockKey, NamespaceId, TierKind};
use tonic::{Request, Status};

use super::KvCacheService;
use crate::auth::Caller;
use crate::convert::{self, status};

/// Default and largest ListBlocks page.
const DEFAULT_PAGE: usize = 1000;
const MAX_PAGE: usize = 10_000;

impl KvCacheService {
    pub(super) async fn handle_delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<pb::DeleteResponse, Status> {
        self.check_ns(&Caller::of(&request), &request.get_ref().namespace_id)?;
        let req = request.into_inner();
        let ns = convert::namespace_id("namespace_id", &req.namespace_id)?;
        let keys = convert::keys("keys", &req.keys, self.limits.max_batch)?;
        self.blocking("delete", move |cache| {
            let deleted = cache.delete(&ns, &keys).map_err(status)?;
            Ok(pb::DeleteResponse { deleted })
        })
        .await
    }

    pub(super) async fn handle_evict(
        &self,
        request: Request<pb::EvictRequest>,
    ) -> Result<pb::EvictResponse, Status> {
        self.check_ns(&Caller::of(&request), &request.get_ref().namespace_id)?;
        let req = request.into_inner();
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
        let all = req.all;
        self.blocking("evict", move |cache| {
            let (evicted, skipped_pinned) = cache.evict(&ns, &keys, all).map_err(status)?;
            Ok(pb::EvictResponse {
                evicted,
                skipped_pinned,
            })
        })
        .await
    }

    pub(super) fn handle_stats(
        &self,
        request: Request<pb::StatsRequest>,
    ) -> Result<pb::StatsResponse, Status> {
        let caller = Caller::of(&request);
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
        let mut resp = pb::StatsResponse {
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
        match &self.regions {
            Some(r) => {
                convert::fill_gpu_stats(&mut resp, r.gpus());
                resp.kv_regions = r.list().iter().map(convert::region_to_pb).collect();
            }
            None => resp.gpu_status = "unknown (no GPU state given to the service)".into(),
        }
        // A node URL may carry the cluster's password (`redis://user:pass@host`).
        if let Some(r) = &mut resp.remote {
            for n in &mut r.nodes {
                *n = redact_password(n);
            }
        }
        if caller.tenant().is_some() {
            let own = self
                .cache
                .namespaces()
                .iter()
                .filter(|ns| self.visible(&caller, &ns.id))
                .count() as u32;
            return Ok(tenant_view(resp, own));
        }
        Ok(resp)
    }

    pub(super) fn handle_list_blocks(
        &self,
        request: Request<pb::ListBlocksRequest>,
    ) -> Result<pb::ListBlocksResponse, Status> {
        let caller = Caller::of(&request);
        self.check_ns(&caller, &request.get_ref().namespace_id)?;
        let req = request.into_inner();
        let ns = if req.namespace_id.is_empty() {
            None
        } else {
            Some(convert::namespace_id("namespace_id", &req.namespace_id)?)
        };
        let tier = convert::tier_from_pb("tier", req.tier)?;
        let page = page_size(req.page_size)?;
        let cursor = page_cursor(&req.page_token)?;
        let (blocks, next) = self
            .cache
            .list_blocks(ns.as_ref(), tier, cursor, page)
            .map_err(status)?;
        let mut resp = pb::ListBlocksResponse {
            blocks: blocks.iter().map(convert::block_to_pb).collect(),
            next_page_token: next
                .map(|n| Bytes::copy_from_slice(&n.to_le_bytes()))
                .unwrap_or_default(),
        };
        // A tenant sees only its own namespaces' blocks (a page may come
        // back short; keep following next_page_token).
        resp.blocks.retain(|b| {
            NamespaceId::from_slice("namespace_id", &b.namespace_id)
                .is_ok_and(|ns| self.visible(&caller, &ns))
        });
        Ok(resp)
    }

    pub(super) async fn handle_inspect(
        &self,
        request: Request<pb::InspectRequest>,
    ) -> Result<pb::InspectResponse, Status> {
        self.check_ns(&Caller::of(&request), &request.get_ref().namespace_id)?;
        let req = request.into_inner();
        let ns = convert::namespace_id("namespace_id", &req.namespace_id)?;
        let key = convert::key("key", &req.key)?;
        let cache = Arc::clone(&self.cache);
        let inspection = self
            .limits
            .blocking
            .run("inspect", move || cache.inspect(&ns, &key))
            .await?
            .map_err(status)?;
        match inspection {
            Some(i) => Ok(pb::InspectResponse {
                block: Some(convert::block_to_pb(&i.meta)),
                payload_xxh3: i.payload_xxh3,
                stored_xxh3: i.meta.checksum,
                checksum_ok: i.checksum_ok(),
                disk_slot: i.disk.as_ref().map(convert::disk_slot_to_pb),
            }),
            None => Err(Status::not_found(format!(
                "key: block {} is not cached",
                BlockKey::display(&req.key)
            ))),
        }
    }

    pub(super) async fn handle_verify(
        &self,
        request: Request<pb::VerifyRequest>,
    ) -> Result<pb::VerifyResponse, Status> {
        if let Some(auth) = &self.auth {
            auth.admin_only(&Caller::of(&request), "Verify")?;
        }
        let drop_corrupt = request.into_inner().drop_corrupt;
        self.blocking("verify", move |cache| {
            let report = cache.verify_disk(drop_corrupt).map_err(status)?;
            Ok(convert::verify_to_pb(&report))
        })
        .await
    }
}

/// What a tenant's `Stats` shows: the daemon's shape (tiers and their
/// capacities, GPUs, version, uptime) and the number of its own namespaces.
/// Daemon-wide counters, occupancy, leases, events, pools, KV regions and the
/// remote tier describe every tenant's traffic together, so they stay zero
/// (a tenant counts its own traffic on its side).
fn tenant_view(full: pb::StatsResponse, own_namespaces: u32) -> pb::StatsResponse {
    pb::StatsResponse {
        tiers: full
            .tiers
            .iter()
            .map(|t| pb::TierStats {
                tier: t.tier,
                capacity_bytes: t.capacity_bytes,
                ..pb::TierStats::default()
            })
            .collect(),
        namespaces: own_namespaces,
        uptime_ms: full.uptime_ms,
        version: full.version,
        gpus: full.gpus,
        gpu_status: full.gpu_status,
        ..pb::StatsResponse::default()
    }
}

/// A Redis URL with the password of its user info replaced by `***`.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    match rest[..at].split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***{}", &rest[at..]),
        None => url.to_string(),
    }
}

/// The ListBlocks page size asked for (0: the default).
fn page_size(requested: u32) -> Result<usize, Status> {
    match requested as usize {
        0 => Ok(DEFAULT_PAGE),
        n if n > MAX_PAGE => Err(Status::invalid_argument(format!(
            "page_size: {n} exceeds the limit of {MAX_PAGE}"
        ))),
        n => Ok(n),
    }
}

/// Where a ListBlocks page starts: none for the first page, else the cursor
/// a previous response's `next_page_token` carries.
fn page_cursor(token: &[u8]) -> Result<Option<u64>, Status> {
    match <[u8; 8]>::try_from(token) {
        Ok(b) => Ok(Some(u64::from_le_bytes(b))),
        Err(_) if token.is_empty() => Ok(None),
        Err(_) => Err(Status::invalid_argument(
            "page_token: not a token from a previous response",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_node_urls_are_redacted() {
        assert_eq!(
            redact_password("redis://kv:s3cret@10.0.0.1:6379"),
            "redis://kv:***@10.0.0.1:6379"
        );
        assert_eq!(redact_password("rediss://:pw@h:1/0"), "rediss://:***@h:1/0");
        assert_eq!(redact_password("redis://h:6379"), "redis://h:6379");
        assert_eq!(
            redact_password("redis://user@h:6379"),
            "redis://user@h:6379"
        );
        assert_eq!(redact_password("h:6379"), "h:6379");
    }
}
