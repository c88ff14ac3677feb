//! kvstrata's small shared types, at the bottom of the crate graph (see
//! docs/architecture.md): everything the client, the daemon and the tiers
//! must agree on, with no I/O of its own
//! (it only sets options on sockets the others opened).
//!
//! - [`key`]: [`BlockKey`], the opaque 1-64 byte block key.
//! - [`namespace`]: [`NamespaceSpec`] (a KV geometry), its [`NamespaceId`]
//!   (`xxh3_128` of the canonical encoding, `docs/hashing.md`),
//!   [`NamespacePolicy`] and the registered [`Namespace`].
//! - [`hash`]: the canonical chained block hash ([`block_keys`]).
//! - [`geometry`]: an engine's paged KV geometry ([`PagedGeometry`]) and how
//!   its pages map onto kvstrata's layer-major blocks.
//! - [`convert`]: [`NamespaceSpec`] to and from its protobuf form.
//! - [`default_uds_path`]: where the daemon's gRPC Unix socket is by default.
//! - [`sockets`]: socket options (Unix-socket buffers; the daemon's no
//!   Nagle delay and non-pacing congestion controller on loopback TCP).
//! - [`wire`]: the byte formats of the two registration sockets (the
//!   shared-memory pool preamble and the KV-region preamble and reply),
//!   encoders and parsers both, so client and daemon share one definition.
//!
//! Every fallible function fails with [`InvalidField`], which names the field.

pub mod convert;
mod error;
pub mod geometry;
pub mod hash;
pub mod key;
pub mod namespace;
mod socket_path;
pub mod sockets;
pub mod wire;

pub use convert::{spec_from_proto, spec_to_proto};
pub use error::InvalidField;
pub use geometry::{ChunkCopy, GeometryError, PageLayout, PagedGeometry};
pub use hash::{BlockHash, block_keys, chain_keys, next_block_key};
pub use key::{BlockKey, MAX_KEY_BYTES};
pub use namespace::{Dtype, Layout, Namespace, NamespaceId, NamespacePolicy, NamespaceSpec};
pub use socket_path::default_uds_path;
