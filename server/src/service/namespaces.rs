//! `RegisterNamespace` and `ListNamespaces`: a tenant's registration binds
//! the namespace to it, and a tenant lists only its own namespaces.

use std::sync::Arc;

use bytes::Bytes;
use kvstrata_proto::v1 as pb;
use kvstrata_tiers::{NamespacePolicy, NamespaceSpec};
use tonic::{Request, Status};

use super::KvCacheService;
use crate::auth::{Caller, FailureReason};
use crate::convert::{self, status};

impl KvCacheService {
    pub(super) async fn handle_register_namespace(
        &self,
        request: Request<pb::RegisterNamespaceRequest>,
    ) -> Result<pb::RegisterNamespaceResponse, Status> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        let spec = convert::spec_from_pb(req.spec)?;
        let policy = req.policy.map(|p| NamespacePolicy {
            write_through: p.write_through,
            remote_write_through: p.remote_write_through,
            sync_write_through: p.sync_write_through,
        });
        self.register_as(&caller, spec, policy).await
    }

    pub(super) fn handle_list_namespaces(
        &self,
        request: Request<pb::ListNamespacesRequest>,
    ) -> Result<pb::ListNamespacesResponse, Status> {
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
                    sync_write_through: ns.policy.sync_write_through,
                }),
            })
            .collect();
        Ok(pb::ListNamespacesResponse { namespaces })
    }

    /// A tenant's registration binds the namespace to it first (refused when
    /// another tenant holds it); a failed registration undoes a new binding.
    async fn register_as(
        &self,
        caller: &Caller,
        spec: NamespaceSpec,
        policy: Option<NamespacePolicy>,
    ) -> Result<pb::RegisterNamespaceResponse, Status> {
        let claimed = match (caller, &self.auth, spec.normalized().id()) {
            (Caller::Tenant(t), Some(auth), Ok(id)) => match auth.owners().claim(&id, t) {
                Ok(new) => Some((Arc::clone(auth), id, new)),
                Err(_) => {
                    auth.counters().failure(FailureReason::WrongTenant);
                    return Err(Status::permission_denied(format!(
                        "namespace_id: namespace {} belongs to another tenant (give the spec a distinct model_fingerprint)",
                        hex::encode(id.as_bytes())
                    )));
                }
            },
            _ => None,
        };
        let max_batch = u32::try_from(self.limits.max_batch).unwrap_or(u32::MAX);
        let r = self
            .blocking("register", move |cache| {
                let (ns, created) = cache
                    .register_namespace_with(spec, policy)
                    .map_err(status)?;
                Ok(pb::RegisterNamespaceResponse {
                    namespace_id: Bytes::copy_from_slice(ns.id.as_bytes()),
                    block_bytes: ns.block_bytes,
                    created,
                    max_batch,
                    page_id_arrays: true,
                    compact_answers: true,
                    region_calls: true,
                    page_id_array_puts: true,
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
}
