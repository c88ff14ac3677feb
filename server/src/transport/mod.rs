//! How clients reach the daemon's gRPC services: the HTTP/2 settings of its
//! gRPC servers, and the TCP and Unix-socket listeners they serve on.
//!
//! - [`listeners`]: binding a TCP port or a private (0600) Unix socket, and
//!   the accepted-connection streams the servers take;
//! - [`conn`]: the connection limits (`server.max_connections`, per peer)
//!   and the wrapper that closes a connection whose handshake is late or
//!   that has been idle too long;
//! - [`grpc_guard`]: the first layer of each server: refuses non-gRPC
//!   content types and a second message on a one-message call, and counts
//!   each connection's open calls for the idle timeout;
//! - [`uds_authority`]: the Unix-socket connection wrapper that lets
//!   grpc-core clients, which send the socket path as `:authority`, in;
//! - [`registration`]: what the pool and KV-region registration sockets
//!   share (they speak their own protocols, not gRPC): the accept loop, the
//!   reader of a preamble with fds attached, the wait for the client to hang
//!   up.
//!
//! Which service runs on which listener is the daemon's business
//! ([`crate::daemon`]).

pub mod conn;
pub mod grpc_guard;
pub mod listeners;
pub mod registration;
pub mod uds_authority;

use tonic::transport::server::Router;
use tonic::transport::{Server, ServerTlsConfig};
use tower::layer::util::{Identity, Stack};

use crate::error::DaemonError;

pub use conn::{ConnLimiter, ConnSettings};
pub use grpc_guard::GrpcGuardLayer;
pub use listeners::{Incoming, TcpAccept, UnixAccept, bind_tcp, bind_unix};
pub use uds_authority::AuthorityFix;

/// The daemon's gRPC servers: tonic's, with [`GrpcGuardLayer`] in front.
pub type GrpcServer = Server<Stack<GrpcGuardLayer, Identity>>;
/// A [`GrpcServer`] with its services.
pub type GrpcRouter = Router<Stack<GrpcGuardLayer, Identity>>;

/// HTTP/2 flow-control windows, large so that block-sized messages (often
/// MiBs) are not held up waiting for window updates.
const HTTP2_STREAM_WINDOW: u32 = 16 << 20;
const HTTP2_CONN_WINDOW: u32 = 64 << 20;
/// The largest HTTP/2 frame (2^24 - 1 bytes).
const HTTP2_MAX_FRAME: u32 = (1 << 24) - 1;
/// How much longer than `server.handshake_timeout_ms` tonic's TLS accept waits.
const TLS_TIMEOUT_BACKSTOP: std::time::Duration = std::time::Duration::from_secs(1);

/// The server of the KvCache listeners (TCP and Unix socket): the large
/// windows, the largest frames, `max_concurrent_streams` per connection,
/// HTTP/2 keepalive pings, the guard layer, and TLS when `tls` is given.
pub fn kv_cache_server(
    max_concurrent_streams: u32,
    conns: &ConnSettings,
    guard: GrpcGuardLayer,
    tls: Option<ServerTlsConfig>,
) -> Result<GrpcServer, DaemonError> {
    let builder = match tls {
        // The connection wrapper closes a late handshake at the deadline;
        // tonic's own TLS timeout, a second later, is only a backstop.
        Some(t) => Server::builder()
            .tls_config(t.timeout(conns.handshake_timeout + TLS_TIMEOUT_BACKSTOP))
            .map_err(|e| DaemonError::Config(format!("tls: {e}")))?,
        None => Server::builder(),
    };
    Ok(builder
        .initial_stream_window_size(HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(HTTP2_CONN_WINDOW)
        .max_frame_size(HTTP2_MAX_FRAME)
        .max_concurrent_streams(max_concurrent_streams)
        .http2_keepalive_interval(conns.keepalive_interval)
        .http2_keepalive_timeout(Some(conns.keepalive_timeout))
        .tcp_nodelay(true)
        .layer(guard))
}

/// The server of the SGLang StorageServer socket: the large windows,
/// `max_concurrent_streams` per connection, keepalive pings and the guard
/// layer.
pub fn sglang_server(
    max_concurrent_streams: u32,
    conns: &ConnSettings,
    guard: GrpcGuardLayer,
) -> GrpcServer {
    Server::builder()
        .initial_stream_window_size(HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(HTTP2_CONN_WINDOW)
        .max_concurrent_streams(max_concurrent_streams)
        .http2_keepalive_interval(conns.keepalive_interval)
        .http2_keepalive_timeout(Some(conns.keepalive_timeout))
        .layer(guard)
}
