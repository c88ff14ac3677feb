//! `Watch`: a stream of the cache's events (puts, evictions, demotions, ...)
//! for one namespace or all, until the client leaves, its deadline passes or
//! the daemon shuts down. A tenant sees only its own namespaces' events.

use std::sync::Arc;

use kvstrata_proto::v1 as pb;
use kvstrata_tiers::{CacheEvent, NamespaceId};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status};

use super::{BoxStream, KvCacheService};
use crate::auth::{Caller, Owners};
use crate::convert::{self, status};
use crate::limits::Deadline;
use crate::metrics::Metrics;

/// Which events one subscriber receives.
struct EventFilter {
    /// Only this namespace's events (none: every namespace's).
    namespace: Option<NamespaceId>,
    /// A tenant's view: only the namespaces this tenant owns.
    tenant: Option<(Arc<Owners>, String)>,
}

impl EventFilter {
    fn passes(&self, ns: &NamespaceId) -> bool {
        self.namespace.is_none_or(|f| f == *ns)
            && self
                .tenant
                .as_ref()
                .is_none_or(|(o, t)| o.owner(ns).as_deref() == Some(t.as_str()))
    }
}

impl KvCacheService {
    pub(super) fn handle_watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<BoxStream<pb::WatchEvent>, Status> {
        let caller = Caller::of(&request);
        self.check_ns(&caller, &request.get_ref().namespace_id)?;
        // A client grpc-timeout ends the subscription (none: it lasts).
        let deadline = request.extensions().get::<Deadline>().copied();
        let req = request.into_inner();
        let namespace = if req.namespace_id.is_empty() {
            None
        } else {
            let ns = convert::namespace_id("namespace_id", &req.namespace_id)?;
            self.cache.namespace("namespace_id", &ns).map_err(status)?;
            Some(ns)
        };
        let events = self.cache.subscribe();
        let (tx, rx) = mpsc::channel(256);
        // A tenant's stream carries only its own namespaces' events.
        let tenant = match (caller.tenant(), &self.auth) {
            (Some(t), Some(auth)) => Some((Arc::clone(auth.owners()), t.to_string())),
            _ => None,
        };
        let filter = EventFilter { namespace, tenant };
        tokio::spawn(forward_events(
            events,
            filter,
            tx,
            deadline,
            self.shutdown.clone(),
            Arc::clone(&self.metrics),
        ));
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

/// Sends the events that pass `filter` to `tx` (a `Lagged` event when the
/// subscriber fell behind) until the client leaves, `deadline` passes or
/// `shutdown` is cancelled.
async fn forward_events(
    mut events: broadcast::Receiver<CacheEvent>,
    filter: EventFilter,
    tx: mpsc::Sender<Result<pb::WatchEvent, Status>>,
    deadline: Option<Deadline>,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
) {
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
            Ok(e) if filter.passes(&e.namespace) => convert::event_to_pb(&e),
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
}
