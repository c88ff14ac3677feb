//! The Unix-socket connector a tonic [`Endpoint`](tonic::transport::Endpoint)
//! opens its connection with, so that every client of the daemon (this
//! crate's [`Client`](crate::Client), the benchmark client) asks for the same
//! socket buffers (`kvstrata_types::sockets`). Use it with
//! `Endpoint::connect_with_connector(tower::service_fn(..))`.
//!
//! TCP connections are the endpoint's own (with `TCP_NODELAY`) and keep the
//! system's congestion controller: the daemon switches its side of a
//! loopback connection to Reno, which speeds up what it sends (answers);
//! the same on the client's side sped up BatchPut with 4 clients but slowed
//! it with 16 (docs/benchmarks.md), so clients leave it.

use std::io;
use std::path::Path;

use hyper_util::rt::TokioIo;
use kvstrata_types::sockets;
use tokio::net::UnixStream;

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
