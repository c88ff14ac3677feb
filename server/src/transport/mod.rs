//! How clients reach the daemon's gRPC services: the HTTP/2 settings of its
//! gRPC servers, and the TCP and Unix-socket listeners they serve on.
//!
//! - [`listeners`]: binding a TCP port or a private (0600) Unix socket, and
//!   the accepted-connection streams the servers take;
//! - [`uds_authority`]: the Unix-socket connection wrapper that lets
//!   grpc-core clients, which send the socket path as `:authority`, in.
//!
//! Which service runs on which listener is the daemon's business
//! ([`crate::daemon`]); the pool and KV-region registration sockets speak
//! their own protocols and only borrow [`listeners::bind_unix`].

pub mod listeners;
pub mod uds_authority;

use tonic::transport::{Server, ServerTlsConfig};

use crate::error::DaemonError;

pub use listeners::{bind_tcp, bind_unix};
pub use uds_authority::AuthorityFix;

/// HTTP/2 flow-control windows, large so that block-sized messages (often
/// MiBs) are not held up waiting for window updates.
const HTTP2_STREAM_WINDOW: u32 = 16 << 20;
const HTTP2_CONN_WINDOW: u32 = 64 << 20;
/// The largest HTTP/2 frame (2^24 - 1 bytes).
const HTTP2_MAX_FRAME: u32 = (1 << 24) - 1;

/// The server of the KvCache listeners (TCP and Unix socket): the large
/// windows, the largest frames, `max_concurrent_streams` per connection, and
/// TLS when `tls` is given.
pub fn kv_cache_server(
    max_concurrent_streams: u32,
    tls: Option<ServerTlsConfig>,
) -> Result<Server, DaemonError> {
    let builder = match tls {
        Some(t) => Server::builder()
            .tls_config(t)
            .map_err(|e| DaemonError::Config(format!("tls: {e}")))?,
        None => Server::builder(),
    };
    Ok(builder
        .initial_stream_window_size(HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(HTTP2_CONN_WINDOW)
        .max_frame_size(HTTP2_MAX_FRAME)
        .max_concurrent_streams(max_concurrent_streams)
        .tcp_nodelay(true))
}

/// The server of the SGLang StorageServer socket: the large windows and
/// `max_concurrent_streams` per connection.
pub fn sglang_server(max_concurrent_streams: u32) -> Server {
    Server::builder()
        .initial_stream_window_size(HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(HTTP2_CONN_WINDOW)
        .max_concurrent_streams(max_concurrent_streams)
}
