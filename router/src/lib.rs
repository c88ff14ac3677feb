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
//!
//! # Crate layout
//!
//! - [`config`]: the nodes, the tier weights and the [`RouterConfig`].
//! - [`router`]: the [`Router`] itself ([`Router::route`], [`Router::begin`]).
//! - `score` (private): a node's index, the shared remote set and the walk that
//!   scores a chain of keys; `sync` (private): following one node's `Watch` stream.
//! - [`decision`]: what [`Router::route`] and [`Router::stats`] return.
//! - [`args`]: the flags of `kvstrata route`; [`request`]: parsing keys and the
//!   `POST /route` body; [`service`]: the HTTP service of `kvstrata route --serve`
//!   and its metrics (`docs/routing.md`).

pub mod args;
pub mod config;
pub mod decision;
mod error;
pub mod request;
pub mod router;
mod score;
pub mod service;
mod sync;

pub use args::RouteArgs;
pub use config::{NodeSpec, RouteTier, RouterConfig, TierWeights};
pub use decision::{Candidate, Decision, NodeStats, NodeStatus, RouterStats, TierCounts};
pub use error::RouterError;
pub use request::{hex_namespace, parse_hex_key, parse_route_request};
pub use router::{InFlight, Router};
pub use service::{app, render_metrics, serve};
