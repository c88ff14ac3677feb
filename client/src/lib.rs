//! Rust client of the kvstrata daemon.
//!
//! - [`Client`]: typed async methods for every RPC of `kvstrata.v1.KvCache`, over
//!   TCP (`http://host:port`, `host:port`) or a Unix socket (`unix:///path`,
//!   `/path`), with message limits and HTTP/2 windows sized for large KV blocks.
//! - [`SharedPool`] / [`PoolRange`]: shared-memory pools registered with the daemon,
//!   for [`Client::batch_put_ranges`] and [`Client::batch_get_into`] (no payload
//!   bytes in the gRPC messages; same host only).
//! - [`KvRegion`]: an engine's paged KV memory (a CUDA IPC handle, or a memfd
//!   without a GPU) registered with the daemon, for [`Client::put_pages`] and
//!   [`Client::get_pages`] (page ids instead of payloads; [`region`]).
//! - [`hash`]: the canonical chained block hash (`docs/hashing.md`).
//! - [`NamespaceSpec`], [`NamespaceId`] and the other types the methods take
//!   and return, [`spec_to_proto`] / [`spec_from_proto`] and the hash are
//!   `kvstrata-types`' (re-exported here), shared with the daemon.
//! - [`default_uds_path`] / [`default_target`]: where the daemon listens by default.
//! - [`connect`]: the Unix-socket connector with kvstrata's socket buffers,
//!   for building a tonic channel by hand.

mod client;
pub mod connect;
mod error;
pub mod inline;
mod pages_found;
pub mod pool;
pub mod region;
mod region_calls;
mod target;

pub use client::{
    BearerToken, Client, ClientOptions, ClientStream, ClientTls, MAX_BATCH, PutItem, RangePutItem,
    RegisteredNamespace,
};
pub use error::ClientError;
pub use kvstrata_types::hash::{self, BlockHash, block_keys, chain_keys, next_block_key};
pub use kvstrata_types::{
    Dtype, Layout, NamespaceId, NamespacePolicy, NamespaceSpec, PageLayout, PagedGeometry,
    spec_from_proto, spec_to_proto,
};
pub use pages_found::PagesFound;
pub use pool::{PoolRange, SharedPool};
pub use region::{KvRegion, KvRegionError, PagesPutItem};
pub use target::{DEFAULT_TCP_TARGET, Target, default_target, default_uds_path};

/// The generated wire types of `kvstrata.v1`, re-exported for convenience.
pub use kvstrata_proto::v1 as proto;
