//! Connecting to the daemon over TCP or a Unix socket.
//!
//! Accepted addresses: `http://host:port`, `host:port` (plain HTTP/2 over TCP),
//! `unix:///path` and `/path` (a Unix socket; `./path` works too). Every
//! channel raises gRPC message limits to 512 MiB and HTTP/2 flow-control
//! windows to 16 MiB per stream and 64 MiB per connection, accepts HTTP/2
//! frames of up to 1 MiB, sets `TCP_NODELAY` and opens a Unix-socket connection
//! with the client library's connector (4 MiB socket buffers).

use std::path::PathBuf;
use std::time::Duration;

use kvstrata_client::BearerToken;
use kvstrata_proto::v1::kv_cache_client::KvCacheClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::args::MAX_MESSAGE_BYTES;
use crate::error::BenchError;

/// HTTP/2 flow-control window per stream.
pub const STREAM_WINDOW_BYTES: u32 = 16 << 20;
/// HTTP/2 flow-control window per connection.
pub const CONNECTION_WINDOW_BYTES: u32 = 64 << 20;
/// Largest HTTP/2 frame the client accepts (SETTINGS_MAX_FRAME_SIZE). The
/// 16 KiB default splits a 1 MiB reply into 64 frames; on loopback 1 MiB
/// frames more than doubled read throughput of 256 KiB blocks.
pub const MAX_FRAME_BYTES: u32 = 1 << 20;
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the daemon listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An `http://host:port` URI.
    Tcp(String),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl Target {
    /// Parses an address (see the module docs for the accepted forms).
    pub fn parse(addr: &str) -> Result<Self, BenchError> {
        let bad = |reason: &str| BenchError::BadAddr {
            addr: addr.to_string(),
            reason: reason.to_string(),
        };
        let a = addr.trim();
        if a.is_empty() {
            return Err(bad("empty"));
        }
        if let Some(path) = a
            .strip_prefix("unix://")
            .or_else(|| a.strip_prefix("unix:"))
        {
            if path.is_empty() {
                return Err(bad("no socket path after unix://"));
            }
            return Ok(Target::Unix(PathBuf::from(path)));
        }
        if a.starts_with('/') || a.starts_with("./") || a.starts_with("../") {
            return Ok(Target::Unix(PathBuf::from(a)));
        }
        if a.starts_with("https://") {
            return Err(bad("TLS is not supported by the benchmark; use http://"));
        }
        let uri = if a.starts_with("http://") {
            a.to_string()
        } else if a.contains("://") {
            return Err(bad("unknown scheme; use http://, unix:// or a path"));
        } else {
            format!("http://{a}")
        };
        let parsed: Uri = uri.parse().map_err(|_| bad("not a valid URI"))?;
        if parsed.host().is_none_or(str::is_empty) {
            return Err(bad("no host"));
        }
        if parsed.port_u16().is_none() {
            return Err(bad("no port (expected host:port)"));
        }
        Ok(Target::Tcp(uri))
    }

    /// `tcp` or `uds`.
    pub fn transport(&self) -> &'static str {
        match self {
            Target::Tcp(_) => "tcp",
            Target::Unix(_) => "uds",
        }
    }
}

fn endpoint(uri: &str, addr: &str) -> Result<Endpoint, BenchError> {
    let ep = Endpoint::from_shared(uri.to_string()).map_err(|e| BenchError::BadAddr {
        addr: addr.to_string(),
        reason: e.to_string(),
    })?;
    Ok(ep
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES))
}

/// Opens one HTTP/2 connection to `addr`.
pub async fn connect_channel(addr: &str) -> Result<Channel, BenchError> {
    let connect_err = |source| BenchError::Connect {
        addr: addr.to_string(),
        source,
    };
    match Target::parse(addr)? {
        Target::Tcp(uri) => endpoint(&uri, addr)?.connect().await.map_err(connect_err),
        // The client library's connector: the same socket buffers as every
        // other client of the daemon.
        Target::Unix(path) => {
            // The URI is only a placeholder for the :authority header.
            endpoint("http://localhost", addr)?
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    kvstrata_client::connect::unix(path.clone())
                }))
                .await
                .map_err(connect_err)
        }
    }
}

/// Adds the bearer token, if any, to every call (`authorization: Bearer …`).
#[derive(Debug, Clone, Default)]
pub struct Bearer(pub Option<BearerToken>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            t.apply(&mut req);
        }
        Ok(req)
    }
}

/// A channel whose calls carry the bearer token.
pub type BearerChannel = InterceptedService<Channel, Bearer>;

/// Wraps a channel in the generated client with 512 MiB message limits,
/// sending `token` on every call.
pub fn client(channel: Channel, token: Option<&BearerToken>) -> KvCacheClient<BearerChannel> {
    KvCacheClient::with_interceptor(channel, Bearer(token.cloned()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Opens one connection to `addr` and returns the generated client on it.
pub async fn connect(
    addr: &str,
    token: Option<&BearerToken>,
) -> Result<KvCacheClient<BearerChannel>, BenchError> {
    Ok(client(connect_channel(addr).await?, token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_address_form() {
        assert_eq!(
            Target::parse("http://127.0.0.1:50051").unwrap(),
            Target::Tcp("http://127.0.0.1:50051".into())
        );
        assert_eq!(
            Target::parse("localhost:7000").unwrap(),
            Target::Tcp("http://localhost:7000".into())
        );
        assert_eq!(
            Target::parse("[::1]:7000").unwrap(),
            Target::Tcp("http://[::1]:7000".into())
        );
        assert_eq!(
            Target::parse("unix:///run/kv.sock").unwrap(),
            Target::Unix("/run/kv.sock".into())
        );
        assert_eq!(
            Target::parse("/run/kv.sock").unwrap(),
            Target::Unix("/run/kv.sock".into())
        );
        assert_eq!(
            Target::parse("./kv.sock").unwrap(),
            Target::Unix("./kv.sock".into())
        );
        assert_eq!(Target::parse("/x").unwrap().transport(), "uds");
        assert_eq!(Target::parse("h:1").unwrap().transport(), "tcp");
    }

    #[test]
    fn rejects_bad_addresses() {
        for a in [
            "",
            "unix://",
            "https://h:1",
            "ftp://h:1",
            "localhost",
            "http://localhost",
        ] {
            assert!(
                matches!(Target::parse(a), Err(BenchError::BadAddr { .. })),
                "{a:?} was accepted"
            );
        }
    }

    #[tokio::test]
    async fn connecting_to_a_missing_socket_fails_cleanly() {
        let dir =
            std::env::temp_dir().join(format!("kvstrata-bench-nosock-{}", std::process::id()));
        let err = connect(&format!("unix://{}/none.sock", dir.display()), None)
            .await
            .unwrap_err();
        assert!(matches!(err, BenchError::Connect { .. }), "{err}");
    }
}
