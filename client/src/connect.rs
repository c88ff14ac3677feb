//! The connectors a tonic [`Endpoint`](tonic::transport::Endpoint) opens its
//! connection with, so that every client of the daemon (this crate's
//! [`Client`](crate::Client), the benchmark client) sets the same socket
//! options (`kvstrata_types::sockets`):
//!
//! - [`tcp`]: `TCP_NODELAY`, and a non-pacing congestion controller when
//!   the daemon is on this host (a loopback address);
//! - [`unix`]: 4 MiB socket buffers.
//!
//! Use them with `Endpoint::connect_with_connector(tower::service_fn(..))`;
//! the endpoint still applies its connect timeout and TLS on top.

use std::io;
use std::path::Path;

use hyper_util::rt::TokioIo;
use kvstrata_types::sockets;
use tokio::net::{TcpStream, UnixStream};
use tonic::transport::Uri;

/// Opens a TCP connection to the host and port of `uri` (port 80 for
/// `http`, 443 for `https` when none is given), trying each resolved
/// address in turn, and tunes it.
pub async fn tcp(uri: Uri) -> io::Result<TokioIo<TcpStream>> {
    let host = uri
        .host()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no host in {uri}")))?;
    // An IPv6 literal comes bracketed from the URI.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let stream = TcpStream::connect((host, port)).await?;
    match stream
        .peer_addr()
        .and_then(|peer| sockets::tune_tcp(&stream, peer))
    {
        Ok(congestion) => tracing::trace!(?congestion, "tcp connection tuned"),
        Err(error) => tracing::debug!(%error, "could not tune a TCP connection"),
    }
    Ok(TokioIo::new(stream))
}

/// Opens a Unix-socket connection to `path` with raised buffers.
pub async fn unix(path: impl AsRef<Path>) -> io::Result<TokioIo<UnixStream>> {
    let stream = UnixStream::connect(path).await?;
    if let Err(error) = sockets::raise_unix_buffers(&stream) {
        tracing::debug!(%error, "could not raise a Unix socket's buffers");
    }
    Ok(TokioIo::new(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tcp_connection_to_this_host_is_tuned() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: Uri = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let (io, accepted) = tokio::join!(tcp(uri), listener.accept());
        let io = io.unwrap();
        accepted.unwrap();
        assert_eq!(
            sockets::congestion(io.inner()).unwrap(),
            sockets::LOOPBACK_CONGESTION
        );
        assert!(io.inner().nodelay().unwrap());
    }

    #[tokio::test]
    async fn a_uri_without_a_host_is_refused() {
        let uri = Uri::from_static("/just/a/path");
        let err = tcp(uri).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[tokio::test]
    async fn a_unix_connection_gets_raised_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (io, accepted) = tokio::join!(unix(&path), listener.accept());
        let io = io.unwrap();
        accepted.unwrap();
        let sent = socket2::SockRef::from(io.inner())
            .send_buffer_size()
            .unwrap();
        // The default (net.core.wmem_default) is about 208 KiB.
        assert!(sent > 256 << 10, "send buffer {sent}");
    }
}
