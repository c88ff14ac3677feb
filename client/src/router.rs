//! Cache-aware routing over several kvstrata daemons.
//!
//! A [`Router`] follows the `Watch` event streams of a set of daemons (one
//! tokio task per node), keeps an index of which node holds which block of
//! which namespace in which tier, and answers, for a request's chain of block
//! keys, which node to send the request to: the one with the best cached
//! prefix weighted by tier, minus a penalty for the requests already in flight
//! there ([`Router::route`]). Engines (or `kvstrata route`) use it to send a
//! turn of a conversation to the node that already holds the KV of its
//! prefix, instead of recomputing that prefix elsewhere.
//!
//! # Score
//!
//! For each node that is synced, the keys are walked in order. A key counts
//! with the weight of the best tier the node holds it in (HBM > host > disk by
//! default); a key the node lacks locally counts with the remote weight if the
//! shared remote tier (a Redis cluster every node reads) holds it; the first
//! key found nowhere ends the walk, since a lookup never matches past a
//! missing parent. The node's score is
//!
//! ```text
//! score = Σ weight(tier of matched key) − load_penalty × in_flight(node)
//! ```
//!
//! The highest score wins; ties go to the node with fewer requests in flight,
//! then to the node listed first. [`RouterConfig::default`] documents the
//! default weights and penalty.
//!
//! # Synchronisation
//!
//! Each node's task connects, subscribes to `Watch` (every namespace) *first*,
//! then pages through `ListBlocks` for a snapshot while buffering the events
//! that arrive meanwhile, installs the snapshot as the node's index, replays
//! the buffered events over it and then applies the stream as it comes. A
//! `LAGGED` event or a broken stream marks the node not synced; after
//! [`RouterConfig::reconnect_interval`] it reconnects and takes a fresh
//! snapshot, which replaces the node's index. A node that is not synced is
//! never chosen; when no node is, the [`Decision`] names no node.
//!
//! Blocks in the remote tier (events and listings with `TIER_REMOTE`) go into
//! one set shared by every node: the cluster is readable from each of them, so
//! a remote block counts for every node. That set is only added to (STORED)
//! and removed from (EVICTED / DELETED) by events; a re-snapshot of one node
//! does not clear it.
//!
//! # Load
//!
//! [`Router::begin`] returns an [`InFlight`] guard that counts one request in
//! flight on the chosen node until it is dropped; hold it for as long as the
//! request runs on that node.
//!
//! Every decision is logged with `tracing::info!` and counted; [`Router::stats`]
//! returns the counters (decisions per node, matched blocks per tier,
//! snapshots, reconnects, lagged events, index sizes).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use bytes::Bytes;
use kvstrata_proto::v1 as proto;
use kvstrata_tiers::NamespaceId;
use serde::Serialize;
use thiserror::Error;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;

use crate::client::{Client, ClientOptions};
use crate::error::ClientError;
use crate::target::Target;

/// Errors of the router.
#[derive(Debug, Error)]
pub enum RouterError {
    /// [`Router::start`] got an empty node list.
    #[error("no nodes to route over (give at least one)")]
    NoNodes,
    /// A node name or target is unusable (`arg` is what was given).
    #[error("invalid node {arg:?}: {reason}")]
    InvalidNode { arg: String, reason: String },
    /// Two nodes have the same name.
    #[error("duplicate node name {0:?}: every node needs its own name")]
    DuplicateNode(String),
    /// A [`RouterConfig`] value is out of range.
    #[error("invalid router config: {0}")]
    InvalidConfig(String),
    /// [`Router::start`] was called outside a tokio runtime.
    #[error("the router needs a tokio runtime (call Router::start from within one)")]
    NoRuntime,
    /// No node has this name.
    #[error("unknown node {0:?}")]
    UnknownNode(String),
}

/// One daemon to route to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeSpec {
    /// Name used in decisions, logs and metrics.
    pub name: String,
    /// Where to reach it, in any form [`Client::connect`] accepts
    /// (`http://127.0.0.1:50051`, `host:port`, `unix:///path`, `/path`).
    pub target: String,
}

impl NodeSpec {
    /// A node named `name` at `target` (not checked until [`Router::start`]).
    pub fn new(name: impl Into<String>, target: impl Into<String>) -> Self {
        NodeSpec {
            name: name.into(),
            target: target.into(),
        }
    }

    /// Parses `NAME=TARGET` (the name is everything before the first `=`) and
    /// checks both parts.
    pub fn parse(arg: &str) -> Result<NodeSpec, RouterError> {
        let invalid = |reason: &str| RouterError::InvalidNode {
            arg: arg.to_string(),
            reason: reason.to_string(),
        };
        let Some((name, target)) = arg.split_once('=') else {
            return Err(invalid(
                "expected NAME=TARGET (e.g. a=http://127.0.0.1:50051 or b=unix:///run/kv.sock)",
            ));
        };
        let spec = NodeSpec::new(name.trim(), target.trim());
        spec.check().map_err(|e| match e {
            RouterError::InvalidNode { reason, .. } => invalid(&reason),
            other => other,
        })?;
        Ok(spec)
    }

    fn check(&self) -> Result<(), RouterError> {
        let invalid = |reason: String| RouterError::InvalidNode {
            arg: format!("{}={}", self.name, self.target),
            reason,
        };
        if self.name.is_empty() {
            return Err(invalid("empty node name".into()));
        }
        if !self
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
        {
            return Err(invalid(
                "a node name may hold only ASCII letters, digits, '-', '_', '.' and ':'".into(),
            ));
        }
        Target::parse(&self.target).map_err(|e| invalid(e.to_string()))?;
        Ok(())
    }
}

/// A tier a matched block counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteTier {
    Hbm,
    Host,
    Disk,
    /// The shared remote tier (a cluster every node reads).
    Remote,
}

impl RouteTier {
    /// Every tier, fastest first.
    pub const ALL: [RouteTier; 4] = [
        RouteTier::Hbm,
        RouteTier::Host,
        RouteTier::Disk,
        RouteTier::Remote,
    ];
    const LOCAL: [RouteTier; 3] = [RouteTier::Hbm, RouteTier::Host, RouteTier::Disk];

    /// Short name (`hbm`, `host`, `disk`, `remote`).
    pub fn name(self) -> &'static str {
        match self {
            RouteTier::Hbm => "hbm",
            RouteTier::Host => "host",
            RouteTier::Disk => "disk",
            RouteTier::Remote => "remote",
        }
    }

    /// From a wire tier code; `None` for unspecified or unknown codes.
    pub fn from_proto(code: i32) -> Option<RouteTier> {
        match proto::Tier::try_from(code) {
            Ok(proto::Tier::Hbm) => Some(RouteTier::Hbm),
            Ok(proto::Tier::Host) => Some(RouteTier::Host),
            Ok(proto::Tier::Disk) => Some(RouteTier::Disk),
            Ok(proto::Tier::Remote) => Some(RouteTier::Remote),
            _ => None,
        }
    }

    fn bit(self) -> u8 {
        match self {
            RouteTier::Hbm => 1,
            RouteTier::Host => 2,
            RouteTier::Disk => 4,
            RouteTier::Remote => 8,
        }
    }
}

impl fmt::Display for RouteTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Score of one matched block in each tier.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TierWeights {
    /// Default 1.0.
    pub hbm: f64,
    /// Default 0.8.
    pub host: f64,
    /// Default 0.5.
    pub disk: f64,
    /// Default 0.25: a block in the shared remote tier, which every node can read.
    pub remote: f64,
}

impl Default for TierWeights {
    fn default() -> Self {
        TierWeights {
            hbm: 1.0,
            host: 0.8,
            disk: 0.5,
            remote: 0.25,
        }
    }
}

impl TierWeights {
    /// The weight of `tier`.
    pub fn weight(&self, tier: RouteTier) -> f64 {
        match tier {
            RouteTier::Hbm => self.hbm,
            RouteTier::Host => self.host,
            RouteTier::Disk => self.disk,
            RouteTier::Remote => self.remote,
        }
    }
}

/// How the router scores and how it follows the nodes.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterConfig {
    /// Score of one matched block per tier (default: hbm 1.0, host 0.8, disk 0.5, remote 0.25).
    pub weights: TierWeights,
    /// Score subtracted per request in flight on a node, in blocks (default 4.0).
    pub load_penalty: f64,
    /// Wait before reconnecting to a node whose stream broke or lagged (default 1 s).
    pub reconnect_interval: Duration,
    /// Blocks per `ListBlocks` page of a snapshot (default 1000; the daemon allows 1 to 10,000).
    pub snapshot_page_size: u32,
    /// How long connecting to a node may take (default 2 s).
    pub connect_timeout: Duration,
    /// Bound on each `ListBlocks` call of a snapshot and on opening the `Watch` stream (default 10 s).
    pub request_timeout: Duration,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            weights: TierWeights::default(),
            load_penalty: 4.0,
            reconnect_interval: Duration::from_secs(1),
            snapshot_page_size: 1000,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
        }
    }
}

impl RouterConfig {
    /// Checks that weights and penalty are finite and not negative, and the page
    /// size and intervals usable.
    pub fn validate(&self) -> Result<(), RouterError> {
        let bad = |s: String| Err(RouterError::InvalidConfig(s));
        for tier in RouteTier::ALL {
            let w = self.weights.weight(tier);
            if !w.is_finite() || w < 0.0 {
                return bad(format!(
                    "weight of tier {tier} is {w}; it must be a finite number >= 0"
                ));
            }
        }
        if !self.load_penalty.is_finite() || self.load_penalty < 0.0 {
            return bad(format!(
                "load_penalty is {}; it must be a finite number >= 0",
                self.load_penalty
            ));
        }
        if !(1..=10_000).contains(&self.snapshot_page_size) {
            return bad(format!(
                "snapshot_page_size is {}; it must be 1 to 10000",
                self.snapshot_page_size
            ));
        }
        if self.reconnect_interval.is_zero() {
            return bad("reconnect_interval must be more than zero".into());
        }
        if self.connect_timeout.is_zero() || self.request_timeout.is_zero() {
            return bad("connect_timeout and request_timeout must be more than zero".into());
        }
        Ok(())
    }
}

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

    fn add(&mut self, tier: RouteTier, n: u64) {
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
    node_index: Option<usize>,
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

/// Which tiers of one node hold a block (bits of [`RouteTier::bit`]).
type TierSet = u8;

/// One node's index: namespace → key → local tiers holding it.
#[derive(Debug, Default)]
struct NodeIndex {
    blocks: HashMap<NamespaceId, HashMap<Bytes, TierSet>>,
}

impl NodeIndex {
    fn add(&mut self, ns: NamespaceId, key: Bytes, tier: RouteTier) {
        *self.blocks.entry(ns).or_default().entry(key).or_default() |= tier.bit();
    }

    /// Removes `tier` (every local tier with `None`) from the block's set.
    fn remove(&mut self, ns: &NamespaceId, key: &[u8], tier: Option<RouteTier>) {
        let Some(keys) = self.blocks.get_mut(ns) else {
            return;
        };
        if let Some(set) = keys.get_mut(key) {
            *set &= !tier.map_or(0xff, RouteTier::bit);
            if *set == 0 {
                keys.remove(key);
            }
        }
        if keys.is_empty() {
            self.blocks.remove(ns);
        }
    }

    fn tiers(&self, ns: &NamespaceId, key: &[u8]) -> TierSet {
        self.blocks
            .get(ns)
            .and_then(|k| k.get(key))
            .copied()
            .unwrap_or(0)
    }

    fn len(&self) -> u64 {
        self.blocks.values().map(|k| k.len() as u64).sum()
    }
}

/// The shared remote set: namespace → keys in the remote tier.
#[derive(Debug, Default)]
struct RemoteSet {
    blocks: HashMap<NamespaceId, HashSet<Bytes>>,
}

impl RemoteSet {
    fn add(&mut self, ns: NamespaceId, key: Bytes) {
        self.blocks.entry(ns).or_default().insert(key);
    }

    fn remove(&mut self, ns: &NamespaceId, key: &[u8]) {
        if let Some(keys) = self.blocks.get_mut(ns) {
            keys.remove(key);
            if keys.is_empty() {
                self.blocks.remove(ns);
            }
        }
    }

    fn contains(&self, ns: &NamespaceId, key: &[u8]) -> bool {
        self.blocks.get(ns).is_some_and(|k| k.contains(key))
    }

    fn len(&self) -> u64 {
        self.blocks.values().map(|k| k.len() as u64).sum()
    }
}

/// The best tier among `set`'s local tiers by weight (the faster one on equal weights).
fn best_local(weights: &TierWeights, set: TierSet) -> Option<RouteTier> {
    let mut best: Option<RouteTier> = None;
    for t in RouteTier::LOCAL {
        if set & t.bit() != 0 && best.is_none_or(|b| weights.weight(t) > weights.weight(b)) {
            best = Some(t);
        }
    }
    best
}

/// Walks `keys` over one node's index and the shared remote set: the block
/// score (without the load penalty), leading keys matched, and per-tier counts.
fn score_chain(
    weights: &TierWeights,
    index: &NodeIndex,
    remote: &RemoteSet,
    ns: &NamespaceId,
    keys: &[impl AsRef<[u8]>],
) -> (f64, usize, TierCounts) {
    let mut score = 0.0;
    let mut counts = TierCounts::default();
    let mut matched = 0;
    for key in keys {
        let key = key.as_ref();
        let tier = match best_local(weights, index.tiers(ns, key)) {
            Some(t) => t,
            None if remote.contains(ns, key) => RouteTier::Remote,
            None => break,
        };
        score += weights.weight(tier);
        counts.add(tier, 1);
        matched += 1;
    }
    (score, matched, counts)
}

/// The score rounded to 6 decimals, so that sums of the same weights in any
/// order compare (and print) equal: `0.8 + 0.8 + 0.8` is 2.4, not 2.4000000000000004.
fn round_score(score: f64) -> f64 {
    (score * 1e6).round() / 1e6
}

/// Scores closer than this are equal (they are sums of the same few weights).
const SCORE_EPSILON: f64 = 1e-9;

/// The winner among synced candidates: highest score, then fewer in flight,
/// then the earlier one.
fn pick(candidates: &[Candidate]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, c) in candidates.iter().enumerate() {
        if !c.synced {
            continue;
        }
        let better = match best.and_then(|b| candidates.get(b)) {
            None => true,
            Some(b) => {
                c.score > b.score + SCORE_EPSILON
                    || ((c.score - b.score).abs() <= SCORE_EPSILON && c.in_flight < b.in_flight)
            }
        };
        if better {
            best = Some(i);
        }
    }
    best
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

fn lock<T>(l: &Mutex<T>) -> MutexGuard<'_, T> {
    l.lock().unwrap_or_else(PoisonError::into_inner)
}

struct NodeState {
    spec: NodeSpec,
    status: Mutex<NodeStatus>,
    /// Attempts to follow the node that ended (failed to sync, or broke after).
    ended_attempts: AtomicU64,
    index: RwLock<NodeIndex>,
    in_flight: AtomicU64,
    decisions: AtomicU64,
    snapshots: AtomicU64,
    reconnects: AtomicU64,
    lagged: AtomicU64,
    missed_events: AtomicU64,
    events: AtomicU64,
    last_seq: AtomicU64,
    last_score: Mutex<Option<f64>>,
    last_error: Mutex<Option<String>>,
}

impl NodeState {
    fn new(spec: NodeSpec) -> Self {
        NodeState {
            spec,
            status: Mutex::new(NodeStatus::Connecting),
            ended_attempts: AtomicU64::new(0),
            index: RwLock::new(NodeIndex::default()),
            in_flight: AtomicU64::new(0),
            decisions: AtomicU64::new(0),
            snapshots: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            lagged: AtomicU64::new(0),
            missed_events: AtomicU64::new(0),
            events: AtomicU64::new(0),
            last_seq: AtomicU64::new(0),
            last_score: Mutex::new(None),
            last_error: Mutex::new(None),
        }
    }

    fn status(&self) -> NodeStatus {
        *lock(&self.status)
    }
}

struct Shared {
    config: RouterConfig,
    nodes: Vec<NodeState>,
    remote: RwLock<RemoteSet>,
    decisions: AtomicU64,
    unrouted: AtomicU64,
    matched: Mutex<TierCounts>,
    /// Bumped on every status change, for [`Router::wait_synced`].
    changes: watch::Sender<u64>,
}

impl Shared {
    fn set_status(&self, i: usize, status: NodeStatus) {
        if let Some(n) = self.nodes.get(i) {
            *lock(&n.status) = status;
        }
        self.changes.send_modify(|c| *c = c.wrapping_add(1));
    }

    /// Applies one (non-LAGGED) event to node `i`'s index or the remote set.
    fn apply_event(&self, index: &mut NodeIndex, e: &proto::WatchEvent) {
        let Some(ev) = parse_event(e) else {
            return;
        };
        match ev.tier {
            Some(RouteTier::Remote) => {
                let mut remote = write(&self.remote);
                match ev.kind {
                    proto::EventKind::Stored => remote.add(ev.ns, ev.key),
                    _ => remote.remove(&ev.ns, &ev.key),
                }
            }
            tier => match ev.kind {
                proto::EventKind::Stored => {
                    if let Some(t) = tier {
                        index.add(ev.ns, ev.key, t);
                    }
                }
                _ => index.remove(&ev.ns, &ev.key, tier),
            },
        }
    }
}

struct ParsedEvent {
    kind: proto::EventKind,
    ns: NamespaceId,
    key: Bytes,
    tier: Option<RouteTier>,
}

/// A STORED / EVICTED / DELETED event with a valid namespace and key.
fn parse_event(e: &proto::WatchEvent) -> Option<ParsedEvent> {
    let kind = proto::EventKind::try_from(e.kind).ok()?;
    if !matches!(
        kind,
        proto::EventKind::Stored | proto::EventKind::Evicted | proto::EventKind::Deleted
    ) || e.key.is_empty()
    {
        return None;
    }
    let ns = NamespaceId::from_slice("namespace_id", &e.namespace_id).ok()?;
    Some(ParsedEvent {
        kind,
        ns,
        key: e.key.clone(),
        tier: RouteTier::from_proto(e.tier),
    })
}

/// Why following a node stopped.
enum SyncEnd {
    Client(ClientError),
    Lagged(u64),
    StreamEnded,
    BufferFull,
}

/// Events buffered while a snapshot is taken, at most; beyond, the node is
/// resynchronised as if it had lagged.
const MAX_BUFFERED_EVENTS: usize = 1 << 20;

impl fmt::Display for SyncEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SyncEnd::Client(e) => write!(f, "{e}"),
            SyncEnd::Lagged(n) => write!(f, "watch stream lagged ({n} events missed)"),
            SyncEnd::StreamEnded => f.write_str("watch stream ended"),
            SyncEnd::BufferFull => write!(
                f,
                "more than {MAX_BUFFERED_EVENTS} events arrived during the snapshot"
            ),
        }
    }
}

/// Connect, subscribe, snapshot, follow: returns when the node must be resynchronised.
async fn follow_node(shared: &Shared, i: usize) -> SyncEnd {
    let Some(node) = shared.nodes.get(i) else {
        return SyncEnd::StreamEnded;
    };
    let cfg = &shared.config;
    shared.set_status(i, NodeStatus::Connecting);
    let options = ClientOptions {
        connect_timeout: cfg.connect_timeout,
        request_timeout: Some(cfg.request_timeout),
        ..ClientOptions::default()
    };
    let client = match Client::connect_with(&node.spec.target, options).await {
        Ok(c) => c,
        Err(e) => return SyncEnd::Client(e),
    };
    // Subscribe first: every change after this point arrives as an event, so
    // replaying them over the snapshot leaves nothing out.
    let mut events = match client.watch(None).await {
        Ok(s) => s,
        Err(e) => return SyncEnd::Client(e),
    };
    shared.set_status(i, NodeStatus::Snapshotting);
    let snapshot = take_snapshot(&client, cfg.snapshot_page_size);
    tokio::pin!(snapshot);
    let mut buffered = Vec::new();
    let blocks = loop {
        tokio::select! {
            r = &mut snapshot => match r {
                Ok(b) => break b,
                Err(e) => return SyncEnd::Client(e),
            },
            ev = events.next() => match ev {
                Some(Ok(e)) if e.kind == proto::EventKind::Lagged as i32 => {
                    node.lagged.fetch_add(1, Ordering::Relaxed);
                    node.missed_events.fetch_add(e.missed, Ordering::Relaxed);
                    return SyncEnd::Lagged(e.missed);
                }
                Some(Ok(_)) if buffered.len() >= MAX_BUFFERED_EVENTS => {
                    return SyncEnd::BufferFull;
                }
                Some(Ok(e)) => buffered.push(e),
                Some(Err(e)) => return SyncEnd::Client(e),
                None => return SyncEnd::StreamEnded,
            },
        }
    };
    let mut index = NodeIndex::default();
    {
        let mut remote = write(&shared.remote);
        for b in &blocks {
            if b.key.is_empty() {
                continue;
            }
            let Ok(ns) = NamespaceId::from_slice("namespace_id", &b.namespace_id) else {
                continue;
            };
            match RouteTier::from_proto(b.tier) {
                Some(RouteTier::Remote) => remote.add(ns, b.key.clone()),
                Some(t) => index.add(ns, b.key.clone(), t),
                None => {}
            }
        }
    }
    let replayed = buffered.len();
    for e in &buffered {
        shared.apply_event(&mut index, e);
        node.last_seq.fetch_max(e.seq, Ordering::Relaxed);
    }
    node.events.fetch_add(replayed as u64, Ordering::Relaxed);
    let size = index.len();
    *write(&node.index) = index;
    node.snapshots.fetch_add(1, Ordering::Relaxed);
    *lock(&node.last_error) = None;
    shared.set_status(i, NodeStatus::Synced);
    tracing::info!(
        node = %node.spec.name,
        target = %node.spec.target,
        listed = blocks.len(),
        replayed,
        index_blocks = size,
        "route: node synced"
    );
    loop {
        match events.next().await {
            Some(Ok(e)) if e.kind == proto::EventKind::Lagged as i32 => {
                node.lagged.fetch_add(1, Ordering::Relaxed);
                node.missed_events.fetch_add(e.missed, Ordering::Relaxed);
                return SyncEnd::Lagged(e.missed);
            }
            Some(Ok(e)) => {
                {
                    let mut index = write(&node.index);
                    shared.apply_event(&mut index, &e);
                }
                node.events.fetch_add(1, Ordering::Relaxed);
                node.last_seq.fetch_max(e.seq, Ordering::Relaxed);
            }
            Some(Err(e)) => return SyncEnd::Client(e),
            None => return SyncEnd::StreamEnded,
        }
    }
}

/// Every block of every namespace and tier, page by page.
async fn take_snapshot(
    client: &Client,
    page_size: u32,
) -> Result<Vec<proto::BlockInfo>, ClientError> {
    let mut out = Vec::new();
    let mut token = Bytes::new();
    loop {
        let page = client
            .list_blocks(None, None, page_size, token.clone())
            .await?;
        out.extend(page.blocks);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        if page.next_page_token == token {
            return Err(ClientError::InvalidResponse(
                "ListBlocks returned the same page token twice".into(),
            ));
        }
        token = page.next_page_token;
    }
}

/// One node's task: follow it, and after each end wait and start over.
async fn run_node(shared: Arc<Shared>, i: usize, mut shutdown: watch::Receiver<bool>) {
    let Some(node) = shared.nodes.get(i) else {
        return;
    };
    let mut first = true;
    loop {
        if *shutdown.borrow() {
            return;
        }
        if !first {
            node.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        let end = tokio::select! {
            end = follow_node(&shared, i) => end,
            _ = shutdown.changed() => return,
        };
        let was_synced = node.status() == NodeStatus::Synced;
        let reason = end.to_string();
        *lock(&node.last_error) = Some(reason.clone());
        node.ended_attempts.fetch_add(1, Ordering::Relaxed);
        shared.set_status(i, NodeStatus::Disconnected);
        tracing::warn!(
            node = %node.spec.name,
            target = %node.spec.target,
            was_synced,
            error = %reason,
            retry_in = ?shared.config.reconnect_interval,
            "route: node not synced"
        );
        tokio::select! {
            _ = tokio::time::sleep(shared.config.reconnect_interval) => {}
            _ = shutdown.changed() => return,
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

    fn ns() -> NamespaceId {
        NamespaceId([7; 16])
    }

    fn key(i: u8) -> Bytes {
        Bytes::from(vec![i; 16])
    }

    fn chain(n: u8) -> Vec<Bytes> {
        (1..=n).map(key).collect()
    }

    fn cand(name: &str, synced: bool, score: f64, in_flight: u64) -> Candidate {
        Candidate {
            name: name.into(),
            target: format!("http://{name}:1"),
            synced,
            score,
            matched: 0,
            in_flight,
            tiers: TierCounts::default(),
        }
    }

    #[test]
    fn defaults_are_documented_values() {
        let c = RouterConfig::default();
        assert_eq!(
            (
                c.weights.hbm,
                c.weights.host,
                c.weights.disk,
                c.weights.remote
            ),
            (1.0, 0.8, 0.5, 0.25)
        );
        assert_eq!(c.load_penalty, 4.0);
        assert_eq!(c.reconnect_interval, Duration::from_secs(1));
        assert_eq!(c.snapshot_page_size, 1000);
        c.validate().unwrap();
        let mut bad = c.clone();
        bad.weights.disk = -1.0;
        assert!(bad.validate().unwrap_err().to_string().contains("disk"));
        let mut bad = c.clone();
        bad.load_penalty = f64::NAN;
        assert!(bad.validate().is_err());
        let mut bad = c;
        bad.snapshot_page_size = 0;
        assert!(bad.validate().is_err());
    }

    #[test]
    fn score_weights_tiers_and_stops_at_the_first_gap() {
        let w = TierWeights::default();
        let mut idx = NodeIndex::default();
        let remote = RemoteSet::default();
        idx.add(ns(), key(1), RouteTier::Hbm);
        idx.add(ns(), key(2), RouteTier::Host);
        idx.add(ns(), key(3), RouteTier::Disk);
        // key 4 missing; key 5 present but past the gap.
        idx.add(ns(), key(5), RouteTier::Hbm);
        let (s, m, t) = score_chain(&w, &idx, &remote, &ns(), &chain(5));
        assert_eq!(m, 3);
        assert!((s - 2.3).abs() < 1e-9, "{s}");
        assert_eq!(
            t,
            TierCounts {
                hbm: 1,
                host: 1,
                disk: 1,
                remote: 0
            }
        );
        // Another namespace holds nothing.
        let (s, m, _) = score_chain(&w, &idx, &remote, &NamespaceId([8; 16]), &chain(3));
        assert_eq!((s, m), (0.0, 0));
        // A missing first key matches nothing at all.
        let (_, m, _) = score_chain(&w, &idx, &remote, &ns(), &[key(4), key(5)]);
        assert_eq!(m, 0);
    }

    #[test]
    fn best_local_tier_counts_and_removal_follows() {
        let w = TierWeights::default();
        let mut idx = NodeIndex::default();
        let remote = RemoteSet::default();
        idx.add(ns(), key(1), RouteTier::Host);
        idx.add(ns(), key(1), RouteTier::Disk);
        let (s, _, t) = score_chain(&w, &idx, &remote, &ns(), &chain(1));
        assert!((s - 0.8).abs() < 1e-9);
        assert_eq!(t.host, 1);
        idx.remove(&ns(), &key(1), Some(RouteTier::Host));
        let (s, _, t) = score_chain(&w, &idx, &remote, &ns(), &chain(1));
        assert!((s - 0.5).abs() < 1e-9);
        assert_eq!(t.disk, 1);
        assert_eq!(idx.len(), 1);
        idx.remove(&ns(), &key(1), None);
        assert_eq!(idx.len(), 0);
        assert!(idx.blocks.is_empty(), "empty namespaces are dropped");
    }

    #[test]
    fn remote_counts_for_every_node_and_local_beats_it() {
        let w = TierWeights::default();
        let mut remote = RemoteSet::default();
        for k in chain(3) {
            remote.add(ns(), k);
        }
        let empty = NodeIndex::default();
        let mut local = NodeIndex::default();
        local.add(ns(), key(1), RouteTier::Disk);
        let (s, m, t) = score_chain(&w, &empty, &remote, &ns(), &chain(4));
        assert_eq!((m, t.remote), (3, 3));
        assert!((s - 0.75).abs() < 1e-9);
        let (s, m, t) = score_chain(&w, &local, &remote, &ns(), &chain(4));
        assert_eq!((m, t.disk, t.remote), (3, 1, 2));
        assert!((s - 1.0).abs() < 1e-9);
        // A local gap bridged by the remote tier continues the walk.
        local.add(ns(), key(3), RouteTier::Hbm);
        let (_, m, t) = score_chain(&w, &local, &remote, &ns(), &chain(3));
        assert_eq!((m, t.hbm, t.disk, t.remote), (3, 1, 1, 1));
        remote.remove(&ns(), &key(2));
        let (_, m, _) = score_chain(&w, &empty, &remote, &ns(), &chain(3));
        assert_eq!(m, 1);
    }

    #[test]
    fn pick_prefers_score_then_fewer_in_flight_then_earlier() {
        assert_eq!(
            pick(&[cand("a", true, 1.0, 0), cand("b", true, 2.0, 5)]),
            Some(1)
        );
        assert_eq!(
            pick(&[cand("a", true, 2.0, 3), cand("b", true, 2.0, 1)]),
            Some(1)
        );
        assert_eq!(
            pick(&[cand("a", true, 2.0, 1), cand("b", true, 2.0, 1)]),
            Some(0)
        );
        assert_eq!(
            pick(&[
                cand("a", false, 9.0, 0),
                cand("b", true, -4.0, 1),
                cand("c", true, -4.0, 1)
            ]),
            Some(1),
            "unsynced nodes are never chosen, even with a better score"
        );
        assert_eq!(pick(&[cand("a", false, 1.0, 0)]), None);
        assert_eq!(pick(&[]), None);
        assert_eq!(round_score(0.8 + 0.8 + 0.8), 2.4);
        assert_eq!(round_score(-2.4000000000000004), -2.4);
        // Sums of the same weights in another order still tie.
        let x = 0.8 + 0.5 + 0.25;
        let y = 0.25 + 0.8 + 0.5;
        assert_eq!(
            pick(&[cand("a", true, x, 2), cand("b", true, y, 0)]),
            Some(1)
        );
    }

    #[test]
    fn events_update_the_node_and_the_remote_set() {
        let (changes, _) = watch::channel(0);
        let shared = Shared {
            config: RouterConfig::default(),
            nodes: Vec::new(),
            remote: RwLock::new(RemoteSet::default()),
            decisions: AtomicU64::new(0),
            unrouted: AtomicU64::new(0),
            matched: Mutex::new(TierCounts::default()),
            changes,
        };
        let ev = |kind: proto::EventKind, k: u8, tier: proto::Tier| proto::WatchEvent {
            seq: 1,
            kind: kind as i32,
            namespace_id: Bytes::copy_from_slice(ns().as_bytes()),
            key: key(k),
            tier: tier as i32,
            ..Default::default()
        };
        let mut idx = NodeIndex::default();
        use proto::EventKind::{Deleted, Evicted, Stored};
        shared.apply_event(&mut idx, &ev(Stored, 1, proto::Tier::Host));
        shared.apply_event(&mut idx, &ev(Stored, 1, proto::Tier::Disk));
        shared.apply_event(&mut idx, &ev(Stored, 2, proto::Tier::Remote));
        assert_eq!(idx.tiers(&ns(), &key(1)), 2 | 4);
        assert!(read(&shared.remote).contains(&ns(), &key(2)));
        assert_eq!(idx.tiers(&ns(), &key(2)), 0, "remote is not a node tier");
        shared.apply_event(&mut idx, &ev(Evicted, 1, proto::Tier::Host));
        assert_eq!(idx.tiers(&ns(), &key(1)), 4);
        shared.apply_event(&mut idx, &ev(Deleted, 1, proto::Tier::Unspecified));
        assert_eq!(idx.tiers(&ns(), &key(1)), 0);
        shared.apply_event(&mut idx, &ev(Deleted, 2, proto::Tier::Remote));
        assert!(!read(&shared.remote).contains(&ns(), &key(2)));
        // Malformed events change nothing.
        let mut bad = ev(Stored, 3, proto::Tier::Host);
        bad.namespace_id = Bytes::from_static(b"short");
        shared.apply_event(&mut idx, &bad);
        let mut lagged = ev(Stored, 3, proto::Tier::Host);
        lagged.kind = proto::EventKind::Lagged as i32;
        shared.apply_event(&mut idx, &lagged);
        assert_eq!(idx.len(), 0);
    }

    #[test]
    fn node_specs_parse_and_check() {
        let n = NodeSpec::parse("a=http://127.0.0.1:5000").unwrap();
        assert_eq!(n, NodeSpec::new("a", "http://127.0.0.1:5000"));
        assert_eq!(
            NodeSpec::parse("b=unix:///run/kv.sock").unwrap().target,
            "unix:///run/kv.sock"
        );
        for bad in ["nonsense", "=http://h:1", "a=", "a=ftp://h:1", "a b=h:1"] {
            let e = NodeSpec::parse(bad).unwrap_err();
            assert!(matches!(e, RouterError::InvalidNode { .. }), "{bad}: {e:?}");
            assert!(!e.to_string().contains('\n'));
        }
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
