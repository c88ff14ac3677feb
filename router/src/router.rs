//! The [`Router`]: starts one task per node, routes requests over the nodes'
//! indexes, counts requests in flight ([`InFlight`]) and reports its counters.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use kvstrata_types::NamespaceId;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{NodeSpec, RouteTier, RouterConfig};
use crate::decision::{Candidate, Decision, NodeStats, NodeStatus, RouterStats, TierCounts};
use crate::error::RouterError;
use crate::score::{RemoteSet, pick, round_score, score_chain};
use crate::sync::{NodeState, Shared, lock, read, run_node};

/// Counts one request in flight on a node until dropped ([`Router::begin`]).
#[must_use = "the request counts as in flight only while the guard lives"]
pub struct InFlight {
    node: Option<(Arc<Shared>, usize)>,
}

impl InFlight {
    /// Name of the node the request counts on (`None` for a decision without a node).
    pub fn node(&self) -> Option<&str> {
        self.node
            .as_ref()
            .and_then(|(s, i)| s.nodes.get(*i))
            .map(|n| n.spec.name.as_str())
    }
}

impl fmt::Debug for InFlight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlight")
            .field("node", &self.node())
            .finish()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some((shared, i)) = self.node.take()
            && let Some(n) = shared.nodes.get(i)
        {
            // Never below zero, even if counts were somehow unbalanced.
            let _ = n
                .in_flight
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                    Some(v.saturating_sub(1))
                });
        }
    }
}
struct Tasks {
    handles: Vec<JoinHandle<()>>,
    shutdown: watch::Sender<bool>,
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        for h in &self.handles {
            h.abort();
        }
    }
}

/// Follows several daemons and routes requests to the best of them (see the
/// module docs). Cheap to clone; the node tasks stop when the last clone is
/// dropped or on [`Router::shutdown`].
#[derive(Clone)]
pub struct Router {
    shared: Arc<Shared>,
    tasks: Arc<Tasks>,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field(
                "nodes",
                &self
                    .shared
                    .nodes
                    .iter()
                    .map(|n| (&n.spec.name, n.status()))
                    .collect::<Vec<_>>(),
            )
            .field("config", &self.shared.config)
            .finish()
    }
}

impl Router {
    /// Checks the nodes and config and starts one task per node (from within a
    /// tokio runtime). Returns at once: nodes become eligible as they sync
    /// ([`Router::wait_synced`]).
    pub fn start(nodes: Vec<NodeSpec>, config: RouterConfig) -> Result<Router, RouterError> {
        config.validate()?;
        if nodes.is_empty() {
            return Err(RouterError::NoNodes);
        }
        let mut names = HashSet::new();
        for n in &nodes {
            n.check()?;
            if !names.insert(n.name.clone()) {
                return Err(RouterError::DuplicateNode(n.name.clone()));
            }
        }
        let handle = tokio::runtime::Handle::try_current().map_err(|_| RouterError::NoRuntime)?;
        let (changes, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            config,
            nodes: nodes.into_iter().map(NodeState::new).collect(),
            remote: RwLock::new(RemoteSet::default()),
            decisions: AtomicU64::new(0),
            unrouted: AtomicU64::new(0),
            matched: Mutex::new(TierCounts::default()),
            changes,
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let handles = (0..shared.nodes.len())
            .map(|i| handle.spawn(run_node(Arc::clone(&shared), i, shutdown_rx.clone())))
            .collect();
        Ok(Router {
            shared,
            tasks: Arc::new(Tasks { handles, shutdown }),
        })
    }

    /// The config in use.
    pub fn config(&self) -> &RouterConfig {
        &self.shared.config
    }

    /// The nodes, in the order given.
    pub fn nodes(&self) -> Vec<NodeSpec> {
        self.shared.nodes.iter().map(|n| n.spec.clone()).collect()
    }

    /// Status of the node named `name`.
    pub fn status(&self, name: &str) -> Result<NodeStatus, RouterError> {
        self.node_position(name)
            .and_then(|i| self.shared.nodes.get(i))
            .map(NodeState::status)
            .ok_or_else(|| RouterError::UnknownNode(name.to_string()))
    }

    fn node_position(&self, name: &str) -> Option<usize> {
        self.shared.nodes.iter().position(|n| n.spec.name == name)
    }

    /// Waits until every node is synced; false when `timeout` passes first.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        self.wait_for(timeout, |n| n.status() == NodeStatus::Synced)
            .await
    }

    /// Waits until every node is either synced or has failed at least one attempt
    /// since the start (is unreachable for now); false when `timeout` passes first.
    pub async fn wait_settled(&self, timeout: Duration) -> bool {
        self.wait_for(timeout, |n| {
            n.status() == NodeStatus::Synced || n.ended_attempts.load(Ordering::Relaxed) > 0
        })
        .await
    }

    async fn wait_for(&self, timeout: Duration, done: impl Fn(&NodeState) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.shared.changes.subscribe();
        loop {
            rx.borrow_and_update();
            if self.shared.nodes.iter().all(&done) {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return self.shared.nodes.iter().all(&done),
            }
        }
    }

    /// Picks the node for a request whose chain of block keys (parent first) is
    /// `keys` in namespace `ns` (see the module docs for the score). Logs and
    /// counts the decision. Does not count the request as in flight: call
    /// [`Router::begin`] for that.
    pub fn route(&self, ns: &NamespaceId, keys: &[impl AsRef<[u8]>]) -> Decision {
        let shared = &self.shared;
        let cfg = &shared.config;
        let mut candidates = Vec::with_capacity(shared.nodes.len());
        {
            let remote = read(&shared.remote);
            for n in &shared.nodes {
                let synced = n.status() == NodeStatus::Synced;
                let in_flight = n.in_flight.load(Ordering::Acquire);
                let (blocks, matched, tiers) = if synced {
                    score_chain(&cfg.weights, &read(&n.index), &remote, ns, keys)
                } else {
                    (0.0, 0, TierCounts::default())
                };
                candidates.push(Candidate {
                    name: n.spec.name.clone(),
                    target: n.spec.target.clone(),
                    synced,
                    score: if synced {
                        round_score(blocks - cfg.load_penalty * in_flight as f64)
                    } else {
                        0.0
                    },
                    matched,
                    in_flight,
                    tiers,
                });
            }
        }
        let chosen = pick(&candidates);
        let summary = candidates
            .iter()
            .map(|c| {
                if c.synced {
                    format!(
                        "{}(score={:.2} matched={} in_flight={})",
                        c.name, c.score, c.matched, c.in_flight
                    )
                } else {
                    format!("{}(not synced)", c.name)
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
        shared.decisions.fetch_add(1, Ordering::Relaxed);
        match chosen.and_then(|i| candidates.get(i).map(|c| (i, c.clone()))) {
            Some((i, c)) => {
                if let Some(n) = shared.nodes.get(i) {
                    n.decisions.fetch_add(1, Ordering::Relaxed);
                    *lock(&n.last_score) = Some(c.score);
                }
                {
                    let mut m = lock(&shared.matched);
                    for t in RouteTier::ALL {
                        m.add(t, c.tiers.get(t));
                    }
                }
                tracing::info!(
                    node = %c.name,
                    score = c.score,
                    matched = c.matched,
                    requested = keys.len(),
                    tiers = %c.tiers,
                    namespace = %ns,
                    candidates = %summary,
                    "route decision"
                );
                Decision {
                    node: Some(c.name),
                    target: Some(c.target),
                    score: c.score,
                    matched: c.matched,
                    requested: keys.len(),
                    tiers: c.tiers,
                    in_flight: c.in_flight,
                    namespace_id: ns.to_hex(),
                    reason: None,
                    candidates,
                    node_index: Some(i),
                }
            }
            None => {
                shared.unrouted.fetch_add(1, Ordering::Relaxed);
                let reason = "no node is synced".to_string();
                tracing::warn!(
                    requested = keys.len(),
                    namespace = %ns,
                    candidates = %summary,
                    "route decision: {reason}"
                );
                Decision {
                    node: None,
                    target: None,
                    score: 0.0,
                    matched: 0,
                    requested: keys.len(),
                    tiers: TierCounts::default(),
                    in_flight: 0,
                    namespace_id: ns.to_hex(),
                    reason: Some(reason),
                    candidates,
                    node_index: None,
                }
            }
        }
    }

    /// Counts one request in flight on the decision's node until the guard is
    /// dropped (a decision without a node gives a guard that counts nothing).
    pub fn begin(&self, decision: &Decision) -> InFlight {
        match decision.node_index.filter(|i| {
            self.shared
                .nodes
                .get(*i)
                .is_some_and(|n| Some(&n.spec.name) == decision.node.as_ref())
        }) {
            Some(i) => self.begin_at(i),
            None => InFlight { node: None },
        }
    }

    /// Counts one request in flight on the node named `name` (for requests sent
    /// there without a decision).
    pub fn begin_on(&self, name: &str) -> Result<InFlight, RouterError> {
        let i = self
            .node_position(name)
            .ok_or_else(|| RouterError::UnknownNode(name.to_string()))?;
        Ok(self.begin_at(i))
    }

    fn begin_at(&self, i: usize) -> InFlight {
        if let Some(n) = self.shared.nodes.get(i) {
            n.in_flight.fetch_add(1, Ordering::AcqRel);
        }
        InFlight {
            node: Some((Arc::clone(&self.shared), i)),
        }
    }

    /// The counters now.
    pub fn stats(&self) -> RouterStats {
        let shared = &self.shared;
        let nodes = shared
            .nodes
            .iter()
            .map(|n| {
                let status = n.status();
                NodeStats {
                    name: n.spec.name.clone(),
                    target: n.spec.target.clone(),
                    status,
                    synced: status == NodeStatus::Synced,
                    in_flight: n.in_flight.load(Ordering::Acquire),
                    decisions: n.decisions.load(Ordering::Relaxed),
                    index_blocks: read(&n.index).len(),
                    snapshots: n.snapshots.load(Ordering::Relaxed),
                    reconnects: n.reconnects.load(Ordering::Relaxed),
                    lagged: n.lagged.load(Ordering::Relaxed),
                    missed_events: n.missed_events.load(Ordering::Relaxed),
                    events: n.events.load(Ordering::Relaxed),
                    last_seq: n.last_seq.load(Ordering::Relaxed),
                    last_score: *lock(&n.last_score),
                    last_error: lock(&n.last_error).clone(),
                }
            })
            .collect();
        RouterStats {
            nodes,
            decisions: shared.decisions.load(Ordering::Relaxed),
            unrouted: shared.unrouted.load(Ordering::Relaxed),
            matched_blocks: *lock(&shared.matched),
            remote_blocks: read(&shared.remote).len(),
        }
    }

    /// Stops following the nodes, for every clone: each node is marked
    /// disconnected, so later decisions name no node. Dropping the last clone
    /// stops the tasks too.
    pub fn shutdown(&self) {
        self.tasks.shutdown.send_replace(true);
        for h in &self.tasks.handles {
            h.abort();
        }
        for i in 0..self.shared.nodes.len() {
            self.shared.set_status(i, NodeStatus::Disconnected);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn ns() -> NamespaceId {
        NamespaceId([7; 16])
    }

    fn key(i: u8) -> Bytes {
        Bytes::from(vec![i; 16])
    }

    fn chain(n: u8) -> Vec<Bytes> {
        (1..=n).map(key).collect()
    }

    #[tokio::test]
    async fn start_checks_its_arguments() {
        let cfg = RouterConfig::default();
        assert!(matches!(
            Router::start(vec![], cfg.clone()),
            Err(RouterError::NoNodes)
        ));
        let twice = vec![NodeSpec::new("a", "h:1"), NodeSpec::new("a", "h:2")];
        assert!(matches!(
            Router::start(twice, cfg.clone()),
            Err(RouterError::DuplicateNode(_))
        ));
        // A node that cannot be reached is never chosen; the decision says so.
        let dir = tempfile_dir();
        let target = format!("unix://{}/absent.sock", dir.display());
        let r = Router::start(vec![NodeSpec::new("gone", target)], cfg).unwrap();
        assert!(r.wait_settled(Duration::from_secs(5)).await);
        assert!(!r.wait_synced(Duration::from_millis(10)).await);
        let d = r.route(&ns(), &chain(2));
        assert_eq!(d.node, None);
        assert_eq!(d.reason.as_deref(), Some("no node is synced"));
        assert!(!d.candidates[0].synced);
        let g = r.begin(&d);
        assert_eq!(g.node(), None);
        let s = r.stats();
        assert_eq!((s.decisions, s.unrouted), (1, 1));
        assert!(s.nodes[0].last_error.is_some());
        assert!(r.begin_on("nobody").is_err());
        let g = r.begin_on("gone").unwrap();
        assert_eq!(r.stats().nodes[0].in_flight, 1);
        drop(g);
        assert_eq!(r.stats().nodes[0].in_flight, 0);
        r.shutdown();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        std::env::temp_dir().join(format!("kvstrata-router-test-{}", std::process::id()))
    }
}
