//! The checks of a whole configuration: ranges, addresses, and settings that
//! only make sense together. Each error names the key at fault
//! (`config: server.max_batch: must be at least 1`). Choices (`disk.engine`,
//! `gpu.enabled`, ...) are checked as they are read ([`super::choice`]).

use super::{Config, GpuMode, socket_path};
use crate::error::DaemonError;

impl Config {
    /// Checks values a file, flag or variable could get wrong.
    pub fn validate(&self) -> Result<(), DaemonError> {
        self.check_server()?;
        self.check_tiers()?;
        self.check_sockets()?;
        self.check_gpu()?;
        self.check_access()
    }

    /// `[server]`'s connection settings: limits of at least 1, a handshake
    /// deadline, and keepalive timeouts that can be met.
    fn check_connections(&self) -> Result<(), DaemonError> {
        let s = &self.server;
        if s.max_connections == 0 {
            return bad("server.max_connections", "must be at least 1".into());
        }
        if s.max_connections_per_peer == 0 || s.max_connections_per_peer > s.max_connections {
            return bad(
                "server.max_connections_per_peer",
                format!(
                    "must be between 1 and server.max_connections ({})",
                    s.max_connections
                ),
            );
        }
        if s.handshake_timeout_ms == 0 {
            return bad("server.handshake_timeout_ms", "must be at least 1".into());
        }
        if s.keepalive_interval_ms > 0 && s.keepalive_timeout_ms == 0 {
            return bad(
                "server.keepalive_timeout_ms",
                "must be at least 1 while server.keepalive_interval_ms is on".into(),
            );
        }
        Ok(())
    }

    /// `[server]`: something to listen on, parseable addresses, limits in range.
    fn check_server(&self) -> Result<(), DaemonError> {
        if self.server.tcp_addr.is_empty() && self.server.uds_path.is_empty() {
            return bad(
                "server.tcp_addr",
                "both tcp_addr and uds_path are empty: nothing to listen on".into(),
            );
        }
        for (k, v) in [
            ("server.tcp_addr", &self.server.tcp_addr),
            ("server.metrics_addr", &self.server.metrics_addr),
        ] {
            if !v.is_empty() && v.parse::<std::net::SocketAddr>().is_err() {
                return bad(k, format!("{v:?} is not an IP:port address"));
            }
        }
        if self.server.max_message_bytes.as_u64() < 4096
            || self.server.max_message_bytes.as_u64() > (4 << 30) - 1
        {
            return bad(
                "server.max_message_bytes",
                "must be between 4 KiB and 4 GiB".into(),
            );
        }
        if self.server.max_batch == 0 {
            return bad("server.max_batch", "must be at least 1".into());
        }
        if self.server.max_lease_ms == 0 {
            return bad("server.max_lease_ms", "must be at least 1".into());
        }
        if self.server.max_concurrent_streams == 0 {
            return bad("server.max_concurrent_streams", "must be at least 1".into());
        }
        if self.server.request_timeout_ms == 0 {
            return bad("server.request_timeout_ms", "must be at least 1".into());
        }
        if self.server.max_inflight_requests == 0
            || self.server.max_inflight_requests > tokio::sync::Semaphore::MAX_PERMITS
        {
            return bad(
                "server.max_inflight_requests",
                "must be at least 1 (and below 2^61)".into(),
            );
        }
        if self.server.max_inflight_per_peer > self.server.max_inflight_requests {
            return bad(
                "server.max_inflight_per_peer",
                format!(
                    "{} exceeds server.max_inflight_requests ({}); 0 means half of it",
                    self.server.max_inflight_per_peer, self.server.max_inflight_requests
                ),
            );
        }
        if self.server.max_blocking_tasks == 0 || self.server.max_blocking_tasks > 100_000 {
            return bad(
                "server.max_blocking_tasks",
                "must be between 1 and 100000".into(),
            );
        }
        self.check_connections()?;
        Ok(())
    }

    /// `[host]`, `[disk]`, `[remote]`: the tiers' sizes, files and timeouts.
    fn check_tiers(&self) -> Result<(), DaemonError> {
        if self.host.capacity.as_u64() == 0 {
            return bad("host.capacity", "must be greater than 0".into());
        }
        if self.host.segment_bytes.as_u64() < 4096 {
            return bad("host.segment_bytes", "must be at least 4 KiB".into());
        }
        self.disk.tier_config()?;
        self.remote.tier_config()?;
        if self.disk.read_timeout_ms == 0 || self.disk.write_timeout_ms == 0 {
            return bad(
                "disk.read_timeout_ms",
                "timeouts must be at least 1 ms".into(),
            );
        }
        Ok(())
    }

    /// `[shm]`, `[sglang]` and the KV-region socket: distinct sockets, and
    /// SGLang's pools.
    fn check_sockets(&self) -> Result<(), DaemonError> {
        if self.shm.max_pools == 0 {
            return bad("shm.max_pools", "must be at least 1".into());
        }
        if !self.sglang.socket.is_empty() && self.shm.mempool_socket.is_empty() {
            return bad(
                "sglang.socket",
                "SGLang moves bytes through registered pools: set shm.mempool_socket (--mempool-socket) too".into(),
            );
        }
        if self.sglang.namespace.len() > crate::shm::pool::MAX_POOL_NAME_BYTES {
            return bad(
                "sglang.namespace",
                format!(
                    "{} bytes, at most {}",
                    self.sglang.namespace.len(),
                    crate::shm::pool::MAX_POOL_NAME_BYTES
                ),
            );
        }
        for (k, v) in [
            ("shm.mempool_socket", &self.shm.mempool_socket),
            ("sglang.socket", &self.sglang.socket),
            ("gpu.region_socket", &self.gpu.region_socket),
        ] {
            if !v.is_empty() && (v == &self.server.uds_path) {
                return bad(k, format!("{v:?} is already server.uds_path"));
            }
        }
        if !self.sglang.socket.is_empty() && self.sglang.socket == self.shm.mempool_socket {
            return bad(
                "sglang.socket",
                "must differ from shm.mempool_socket".into(),
            );
        }
        let region_socket = socket_path(&self.gpu.region_socket);
        if !region_socket.is_empty()
            && (region_socket == socket_path(&self.shm.mempool_socket)
                || region_socket == socket_path(&self.sglang.socket))
        {
            return bad(
                "gpu.region_socket",
                "must differ from shm.mempool_socket and sglang.socket".into(),
            );
        }
        Ok(())
    }

    /// `[gpu]`: devices for `on`, and the copy and region limits.
    fn check_gpu(&self) -> Result<(), DaemonError> {
        if self.gpu.enabled == GpuMode::On && self.gpu.devices.is_empty() {
            return bad(
                "gpu.devices",
                "empty, but gpu.enabled = \"on\": list at least one device ordinal".into(),
            );
        }
        if self.gpu.max_regions == 0 {
            return bad("gpu.max_regions", "must be at least 1".into());
        }
        if self.gpu.dma_threshold.as_u64() == 0 {
            return bad("gpu.dma_threshold", "must be at least 1 byte".into());
        }
        if self.gpu.move_group_bytes.as_u64() == 0 {
            return bad("gpu.move_group_bytes", "must be at least 1 byte".into());
        }
        Ok(())
    }

    /// `[tls]` and `[auth]`: complete TLS settings, and someone allowed on the
    /// Unix sockets.
    fn check_access(&self) -> Result<(), DaemonError> {
        if self.tls.cert.is_empty() != self.tls.key.is_empty() {
            return bad(
                "tls.cert",
                "tls.cert and tls.key go together: set both (--tls-cert, --tls-key) or neither"
                    .into(),
            );
        }
        if !self.tls.client_ca.is_empty() && self.tls.cert.is_empty() {
            return bad(
                "tls.client_ca",
                "client certificates need TLS: set tls.cert and tls.key too".into(),
            );
        }
        if !self.tls.cert.is_empty() && self.server.tcp_addr.is_empty() {
            return bad(
                "tls.cert",
                "TLS applies to the TCP listener, but server.tcp_addr is empty".into(),
            );
        }
        let unix_sockets_on = !self.server.uds_path.is_empty()
            || !self.shm.mempool_socket.is_empty()
            || !self.sglang.socket.is_empty()
            || !self.gpu.region_socket.is_empty();
        if self.auth.metrics_require_token && self.auth.token_file.is_empty() {
            return bad(
                "auth.metrics_require_token",
                "needs auth.token_file (the admin tokens /metrics accepts)".into(),
            );
        }
        if self.auth.uid_allow.is_empty() && unix_sockets_on {
            return bad(
                "auth.uid_allow",
                "empty: no peer could use the Unix sockets (list at least the daemon's own uid)"
                    .into(),
            );
        }
        Ok(())
    }

    /// Refuses a TCP listener reachable from other hosts with no token file,
    /// unless `auth.insecure` says so (checked at start-up).
    pub fn check_exposure(&self) -> Result<(), DaemonError> {
        let addr = &self.server.tcp_addr;
        if addr.is_empty()
            || crate::auth::is_loopback(addr)
            || !self.auth.token_file.is_empty()
            || self.auth.insecure
        {
            return Ok(());
        }
        Err(DaemonError::Config(format!(
            "server.tcp_addr: {addr:?} is reachable from other hosts but no tokens are configured: \
             set auth.token_file (--token-file), or pass --insecure (auth.insecure = true) to serve it unauthenticated"
        )))
    }
}

/// The error for `key`, saying why.
fn bad(key: &str, why: String) -> Result<(), DaemonError> {
    Err(DaemonError::Config(format!("{key}: {why}")))
}
