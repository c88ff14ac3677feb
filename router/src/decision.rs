//! What the router answers: a [`Decision`] with every [`Candidate`] scored, and
//! its counters ([`RouterStats`], one [`NodeStats`] per node).

use std::fmt;

use serde::Serialize;

use crate::config::RouteTier;

/// Matched blocks per tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TierCounts {
    pub hbm: u64,
    pub host: u64,
    pub disk: u64,
    pub remote: u64,
}

impl TierCounts {
    /// The count of `tier`.
    pub fn get(&self, tier: RouteTier) -> u64 {
        match tier {
            RouteTier::Hbm => self.hbm,
            RouteTier::Host => self.host,
            RouteTier::Disk => self.disk,
            RouteTier::Remote => self.remote,
        }
    }

    pub(crate) fn add(&mut self, tier: RouteTier, n: u64) {
        let slot = match tier {
            RouteTier::Hbm => &mut self.hbm,
            RouteTier::Host => &mut self.host,
            RouteTier::Disk => &mut self.disk,
            RouteTier::Remote => &mut self.remote,
        };
        *slot = slot.saturating_add(n);
    }

    /// Sum over every tier.
    pub fn total(&self) -> u64 {
        RouteTier::ALL.iter().map(|t| self.get(*t)).sum()
    }
}

impl fmt::Display for TierCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for t in RouteTier::ALL {
            let n = self.get(t);
            if n > 0 {
                if !first {
                    f.write_str(" ")?;
                }
                write!(f, "{t}={n}")?;
                first = false;
            }
        }
        if first {
            f.write_str("-")?;
        }
        Ok(())
    }
}

/// Where a node's synchronisation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    /// Connecting (first attempt or a reconnect).
    Connecting,
    /// Subscribed to `Watch`, taking the `ListBlocks` snapshot.
    Snapshotting,
    /// Index installed and following the event stream: the node may be chosen.
    Synced,
    /// The last attempt failed or the stream broke or lagged; waiting to reconnect.
    Disconnected,
}

impl NodeStatus {
    /// Short name (`connecting`, `snapshotting`, `synced`, `disconnected`).
    pub fn name(self) -> &'static str {
        match self {
            NodeStatus::Connecting => "connecting",
            NodeStatus::Snapshotting => "snapshotting",
            NodeStatus::Synced => "synced",
            NodeStatus::Disconnected => "disconnected",
        }
    }
}

/// One node as scored for one decision.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    pub name: String,
    pub target: String,
    /// Only synced nodes are scored and may be chosen; the others show 0 matched.
    pub synced: bool,
    /// Σ weight(tier) over the matched blocks − load_penalty × in_flight.
    pub score: f64,
    /// Leading keys matched (locally or in the shared remote tier).
    pub matched: usize,
    /// Requests in flight on the node when the decision was made.
    pub in_flight: u64,
    /// Matched blocks per tier.
    pub tiers: TierCounts,
}

/// The answer of [`Router::route`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// The chosen node; `None` when no node is synced.
    pub node: Option<String>,
    /// Its target.
    pub target: Option<String>,
    /// Its score (0 when no node was chosen).
    pub score: f64,
    /// Leading keys it holds (locally or in the shared remote tier).
    pub matched: usize,
    /// Keys asked about.
    pub requested: usize,
    /// Its matched blocks per tier.
    pub tiers: TierCounts,
    /// Requests in flight on it when the decision was made.
    pub in_flight: u64,
    /// Namespace id, 32 hex digits.
    pub namespace_id: String,
    /// Why no node was chosen (`None` when one was).
    pub reason: Option<String>,
    /// Every node, in the order given to [`Router::start`].
    pub candidates: Vec<Candidate>,
    #[serde(skip)]
    pub(crate) node_index: Option<usize>,
}

impl Decision {
    /// Position of the chosen node in the list given to [`Router::start`].
    pub fn node_index(&self) -> Option<usize> {
        self.node_index
    }
}

/// Counters of one node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeStats {
    pub name: String,
    pub target: String,
    pub status: NodeStatus,
    pub synced: bool,
    /// Requests in flight now ([`InFlight`] guards alive).
    pub in_flight: u64,
    /// Decisions that chose this node.
    pub decisions: u64,
    /// Distinct blocks (namespace, key) in the node's index, any local tier.
    pub index_blocks: u64,
    /// Snapshots installed.
    pub snapshots: u64,
    /// Reconnect attempts after the first connection attempt.
    pub reconnects: u64,
    /// `LAGGED` events received, and the events they said were missed.
    pub lagged: u64,
    pub missed_events: u64,
    /// Events applied to the index.
    pub events: u64,
    /// Sequence number of the last event applied.
    pub last_seq: u64,
    /// Score of this node in the last decision that chose it.
    pub last_score: Option<f64>,
    /// Why the last attempt to follow the node ended, if it did.
    pub last_error: Option<String>,
}

/// A snapshot of the router's counters ([`Router::stats`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouterStats {
    pub nodes: Vec<NodeStats>,
    /// Decisions made, and those that found no synced node.
    pub decisions: u64,
    pub unrouted: u64,
    /// Matched blocks of the chosen nodes, per tier, summed over decisions.
    pub matched_blocks: TierCounts,
    /// Blocks in the shared remote set.
    pub remote_blocks: u64,
}
