//! `Lookup` (how long a prefix of keys is cached, and in which tiers) and
//! the leases of `Pin` / `Unpin`, which keep blocks from being evicted; a
//! tenant pins and unpins only on its own namespaces. They call the cache
//! directly, not through the blocking pool.

use std::time::Duration;

use kvstrata_proto::v1 as pb;
use tonic::{Request, Status};

use super::KvCacheService;
use crate::auth::Caller;
use crate::convert::{self, status};

impl KvCacheService {
    pub(super) fn handle_lookup(
        &self,
        request: Request<pb::LookupRequest>,
    ) -> Result<pb::LookupResponse, Status> {
        self.check_ns(&Caller::of(&request), &request.get_ref().namespace_id)?;
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
    }

    pub(super) fn handle_pin(
        &self,
        request: Request<pb::PinRequest>,
    ) -> Result<pb::PinResponse, Status> {
        self.check_ns(&Caller::of(&request), &request.get_ref().namespace_id)?;
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
    }

    /// A tenant may end only the leases on its own namespaces, as it may take
    /// leases only there (an unknown lease is the cache's `NOT_FOUND`).
    pub(super) fn handle_unpin(
        &self,
        request: Request<pb::UnpinRequest>,
    ) -> Result<pb::UnpinResponse, Status> {
        let caller = Caller::of(&request);
        let lease_id = request.into_inner().lease_id;
        if let (Caller::Tenant(t), Some(auth)) = (&caller, &self.auth)
            && let Some(ns) = self.cache.lease_namespace(lease_id)
        {
            auth.authorize(&caller, &ns, true).map_err(|_| {
                Status::permission_denied(format!(
                    "lease_id: lease {lease_id} pins blocks of a namespace that is not tenant {t:?}'s"
                ))
            })?;
        }
        self.cache
            .unpin(lease_id)
            .map(|_| pb::UnpinResponse {})
            .map_err(status)
    }
}
