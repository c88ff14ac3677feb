//! The byte formats of kvstrata's two registration sockets, each defined
//! once here and used by both ends (the client encodes and the daemon
//! parses; tests do both):
//!
//! - [`pool`]: the shared-memory pool preamble of the mempool socket
//!   (kvstrata's wide format and SGLang HiCache's) and its reply, the pool id;
//! - [`kv_region`]: the KV-region preamble of the region socket (a 128-byte
//!   header and a name) and its reply (status, message, region id);
//! - [`region_calls`]: page puts and gets sent on a region's registration
//!   connection afterwards (a 24-byte header and the gRPC request's protobuf
//!   encoding; answered the same way).
//!
//! Pool and region ids are unique to one run of the daemon (a random base
//! per run), so an id a client kept across a daemon restart is refused
//! rather than naming another client's memory.
//!
//! Parsers are pure (no I/O, no panics on any input), so they can be fuzzed;
//! each refusal is an [`InvalidField`](crate::InvalidField) naming the field.
//! `docs/protocol.md` documents both formats.

pub mod kv_region;
pub mod pool;
pub mod region_calls;
