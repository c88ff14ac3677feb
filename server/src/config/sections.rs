//! The sections of the configuration file, one struct each, with their
//! documented defaults, and the tier configurations they describe.

use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use kvstrata_tiers::{DiskFileConfig, DiskTierConfig, MovementConfig, RemoteTierConfig};

use super::choice::{DiskDurability, DiskIoEngine, GpuMode, LogFormat};
use crate::error::DaemonError;

/// `[server]`: listeners and request limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC over TCP. Empty string: no TCP listener. Default `127.0.0.1:50051`.
    pub tcp_addr: String,
    /// gRPC over a Unix socket (mode 0600). Empty string: no Unix listener.
    /// Default `$XDG_RUNTIME_DIR/kvstrata/kvstrata.sock`, else `/tmp/kvstrata-<uid>/kvstrata.sock`.
    pub uds_path: String,
    /// Prometheus `/metrics` over HTTP. Empty string: off. Default `127.0.0.1:9091`.
    pub metrics_addr: String,
    /// Largest gRPC message accepted or sent. Default 512 MiB.
    #[serde(with = "crate::size")]
    pub max_message_bytes: ByteSize,
    /// Most keys or items in one batch request. Default 4096.
    pub max_batch: usize,
    /// Longest lease a Pin may take, in milliseconds. Default 600000 (10 min).
    pub max_lease_ms: u64,
    /// Concurrent HTTP/2 streams per connection. Default 256.
    pub max_concurrent_streams: u32,
    /// Deadline of a unary request, in milliseconds; a shorter client
    /// `grpc-timeout` wins. Past it the request ends with DEADLINE_EXCEEDED.
    /// Streams are bounded by a client `grpc-timeout` only. Default 30000.
    pub request_timeout_ms: u64,
    /// Requests executing at once, over all connections (open GetStream and
    /// PutStream streams count until they end); beyond, a request is refused
    /// at once with RESOURCE_EXHAUSTED. Default 1024.
    pub max_inflight_requests: usize,
    /// Requests one client may have executing at once (a TCP client by its
    /// IP address, a Unix-socket client by its process), so that one client
    /// cannot take every in-flight slot; beyond, RESOURCE_EXHAUSTED.
    /// 0: half of `max_inflight_requests`, rounded up. Default 0 (512).
    pub max_inflight_per_peer: usize,
    /// Cache calls (copies, disk reads) running on the blocking pool at once;
    /// further requests wait for a slot within their deadline. Default 64.
    pub max_blocking_tasks: usize,
    /// gRPC connections open at once over the TCP, Unix and SGLang
    /// listeners; a connection beyond is closed at accept. Default 4096.
    pub max_connections: usize,
    /// gRPC connections one peer may hold open (a TCP client by its IP
    /// address, a Unix-socket client by its process). Default 512.
    pub max_connections_per_peer: usize,
    /// A new connection must complete its handshake (TLS, then the HTTP/2
    /// preface and SETTINGS) within this many milliseconds, else it is
    /// closed. Default 10000.
    pub handshake_timeout_ms: u64,
    /// A connection with no call open for this many milliseconds is closed
    /// (clients reconnect on their next call). 0: never. Default 300000.
    pub idle_timeout_ms: u64,
    /// HTTP/2 PING sent to a peer silent for this many milliseconds. 0: no
    /// pings. Default 60000.
    pub keepalive_interval_ms: u64,
    /// A peer that does not answer a PING within this many milliseconds is
    /// dropped. Default 20000.
    pub keepalive_timeout_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            tcp_addr: "127.0.0.1:50051".into(),
            uds_path: kvstrata_types::default_uds_path().display().to_string(),
            metrics_addr: "127.0.0.1:9091".into(),
            max_message_bytes: ByteSize::mib(512),
            max_batch: 4096,
            max_lease_ms: 600_000,
            max_concurrent_streams: 256,
            request_timeout_ms: 30_000,
            max_inflight_requests: 1024,
            max_inflight_per_peer: 0,
            max_blocking_tasks: 64,
            max_connections: 4096,
            max_connections_per_peer: 512,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 300_000,
            keepalive_interval_ms: 60_000,
            keepalive_timeout_ms: 20_000,
        }
    }
}

impl ServerConfig {
    /// The per-peer share in effect: `max_inflight_per_peer`, or half of
    /// `max_inflight_requests` (rounded up) when it is 0.
    pub fn inflight_per_peer(&self) -> usize {
        match self.max_inflight_per_peer {
            0 => self.max_inflight_requests.div_ceil(2),
            n => n.min(self.max_inflight_requests),
        }
    }
}

/// `[host]`: the host-memory tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostConfig {
    /// Hard limit on block bytes held in host memory. Default 4 GiB.
    #[serde(with = "crate::size")]
    pub capacity: ByteSize,
    /// Arena segment size: the largest block accepted. Default 64 MiB.
    #[serde(with = "crate::size")]
    pub segment_bytes: ByteSize,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            capacity: ByteSize::gib(4),
            segment_bytes: ByteSize::mib(64),
        }
    }
}

/// `[disk]`: the NVMe tier. Off while `paths` is empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiskConfig {
    /// Slot files, one per drive: `PATH` (of `size` bytes) or `PATH=SIZE`.
    /// Created and preallocated on first start. Default none (no disk tier).
    pub paths: Vec<String>,
    /// Size of each slot file given without `=SIZE`. Default 16 GiB.
    #[serde(with = "crate::size")]
    pub size: ByteSize,
    /// RocksDB index directory. Default: `kvstrata-index` beside the first slot file.
    pub index_dir: String,
    /// `auto` (io_uring, else pread/pwrite), `io_uring` or `pread`. Default `auto`.
    pub engine: DiskIoEngine,
    /// io_uring queue depth. Default 128.
    pub queue_depth: u32,
    /// Threads of the pread/pwrite engine. Default 8.
    pub io_threads: usize,
    /// A disk read slower than this answers a miss. Default 2000.
    pub read_timeout_ms: u64,
    /// A disk write slower than this fails. Default 10000.
    pub write_timeout_ms: u64,
    /// `process-crash` (survive SIGKILL) or `power-loss` (O_DSYNC data, fsynced index). Default `process-crash`.
    pub durability: DiskDurability,
    /// Slot-file segment size (the largest block, header included). Default 64 MiB.
    #[serde(with = "crate::size")]
    pub segment_bytes: ByteSize,
    /// Copy blocks read from disk into the host tier. Default true.
    pub promote_on_get: bool,
    /// Payload bytes waiting to be demoted at most; beyond, evictions are dropped. Default 256 MiB.
    #[serde(with = "crate::size")]
    pub demote_queue: ByteSize,
    /// On a graceful stop, how long the write queue (write-through copies
    /// and demotions) may drain into the disk tier, in milliseconds; what is
    /// still queued then is dropped (logged and counted). Default 5000.
    pub drain_on_stop_ms: u64,
    /// On a graceful stop (after the drain), how long the host tier's blocks
    /// that the disk lacks may be written to it, hottest first, in
    /// milliseconds, so a restart finds them; 0: not at all. Default 10000.
    pub persist_on_stop_ms: u64,
}

impl Default for DiskConfig {
    fn default() -> Self {
        let d = DiskTierConfig::default();
        let m = MovementConfig::default();
        DiskConfig {
            paths: Vec::new(),
            size: ByteSize::gib(16),
            index_dir: String::new(),
            engine: DiskIoEngine::Auto,
            queue_depth: d.queue_depth,
            io_threads: d.io_threads,
            read_timeout_ms: d.read_timeout.as_millis() as u64,
            write_timeout_ms: d.write_timeout.as_millis() as u64,
            durability: DiskDurability::ProcessCrash,
            segment_bytes: ByteSize::b(d.segment_bytes),
            promote_on_get: m.promote_on_get,
            demote_queue: ByteSize::b(m.demote_queue_bytes),
            drain_on_stop_ms: m.drain_on_stop.as_millis() as u64,
            persist_on_stop_ms: m.persist_on_stop.as_millis() as u64,
        }
    }
}

impl DiskConfig {
    /// The slot files: `(path, size)` for each entry of `paths`.
    pub fn files(&self) -> Result<Vec<DiskFileConfig>, DaemonError> {
        self.paths
            .iter()
            .map(|p| {
                let (path, size) = match p.rsplit_once('=') {
                    Some((path, size)) => (
                        path,
                        size.trim().parse::<ByteSize>().map_err(|e| {
                            DaemonError::Config(format!("disk.paths: {p:?}: bad size: {e}"))
                        })?,
                    ),
                    None => (p.as_str(), self.size),
                };
                if path.is_empty() {
                    return Err(DaemonError::Config(format!(
                        "disk.paths: {p:?}: empty path"
                    )));
                }
                Ok(DiskFileConfig {
                    path: PathBuf::from(path),
                    size_bytes: size.as_u64(),
                })
            })
            .collect()
    }

    /// The disk tier's configuration, or `None` without paths.
    pub fn tier_config(&self) -> Result<Option<DiskTierConfig>, DaemonError> {
        let files = self.files()?;
        let Some(first) = files.first() else {
            return Ok(None);
        };
        let index_dir = if self.index_dir.is_empty() {
            first
                .path
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join("kvstrata-index")
        } else {
            PathBuf::from(&self.index_dir)
        };
        Ok(Some(DiskTierConfig {
            files,
            index_dir,
            segment_bytes: self.segment_bytes.as_u64(),
            engine: self.engine.into(),
            queue_depth: self.queue_depth,
            io_threads: self.io_threads,
            read_timeout: Duration::from_millis(self.read_timeout_ms),
            write_timeout: Duration::from_millis(self.write_timeout_ms),
            durability: self.durability.into(),
            ..DiskTierConfig::default()
        }))
    }
}

/// `[remote]`: the shared remote tier on a Redis Cluster / Valkey cluster.
/// Off while `nodes` is empty. See docs/remote.md for the cluster settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RemoteConfig {
    /// Seed nodes, `redis://host:port` (one is enough; the rest is discovered). Default none.
    pub nodes: Vec<String>,
    /// Prefix of every Redis key written. Default `kvstrata`.
    pub key_prefix: String,
    /// A cluster command slower than this is a miss (reads) or a failed write. Default 250.
    pub deadline_ms: u64,
    /// Time allowed to connect to a node. Default 1000.
    pub connect_timeout_ms: u64,
    /// Blocks leaving the host tier are written to the cluster too. Default true.
    pub demote: bool,
    /// Every put of every namespace is written to the cluster. Default false
    /// (a namespace's `remote_write_through` policy asks for it per namespace).
    pub write_through: bool,
    /// Copy blocks read from the cluster into the host tier. Default true.
    pub promote_on_get: bool,
    /// Payload bytes waiting for the cluster at most; beyond, writes are dropped. Default 256 MiB.
    #[serde(with = "crate::size")]
    pub queue: ByteSize,
    /// Commands the writer keeps in flight. Default 16.
    pub write_concurrency: usize,
    /// Expiry of every block written, in seconds; 0: none (the cluster's eviction decides). Default 0.
    pub ttl_secs: u64,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        let r = RemoteTierConfig::default();
        RemoteConfig {
            nodes: Vec::new(),
            key_prefix: r.key_prefix,
            deadline_ms: r.deadline.as_millis() as u64,
            connect_timeout_ms: r.connect_timeout.as_millis() as u64,
            demote: r.demote,
            write_through: r.write_through,
            promote_on_get: r.promote_on_get,
            queue: ByteSize::b(r.queue_bytes),
            write_concurrency: r.write_concurrency,
            ttl_secs: 0,
        }
    }
}

impl RemoteConfig {
    /// The remote tier's configuration, or `None` without nodes.
    pub fn tier_config(&self) -> Result<Option<RemoteTierConfig>, DaemonError> {
        if self.nodes.is_empty() {
            return Ok(None);
        }
        let config = RemoteTierConfig {
            nodes: self.nodes.clone(),
            key_prefix: self.key_prefix.clone(),
            deadline: Duration::from_millis(self.deadline_ms),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            demote: self.demote,
            write_through: self.write_through,
            promote_on_get: self.promote_on_get,
            queue_bytes: self.queue.as_u64(),
            write_concurrency: self.write_concurrency,
            ttl: (self.ttl_secs > 0).then(|| Duration::from_secs(self.ttl_secs)),
            ..RemoteTierConfig::default()
        };
        config
            .validate()
            .map_err(|e| DaemonError::Config(e.to_string()))?;
        Ok(Some(config))
    }
}

/// `[shm]`: shared-memory pools registered by same-host clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShmConfig {
    /// Unix socket (mode 0600) where clients register pools (SGLang's
    /// registration format). Empty: off, and requests naming pools fail. Default off.
    pub mempool_socket: String,
    /// Most pools registered at once. Default 256.
    pub max_pools: usize,
    /// Largest pool accepted. Default 1 TiB.
    #[serde(with = "crate::size")]
    pub max_pool_bytes: ByteSize,
}

impl Default for ShmConfig {
    fn default() -> Self {
        ShmConfig {
            mempool_socket: String::new(),
            max_pools: 256,
            max_pool_bytes: ByteSize::tib(1),
        }
    }
}

/// `[sglang]`: SGLang HiCache L3 storage (`sglang.runtime.hicache.StorageServer`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct SglangConfig {
    /// Unix socket (mode 0600) serving SGLang's StorageServer. Needs
    /// `shm.mempool_socket`. Empty: off. Default off.
    pub socket: String,
    /// Store every SGLang block under this name instead of the registering
    /// pool's name. Default empty (one namespace per pool name).
    pub namespace: String,
}

/// `[gpu]`: GPUs, the HBM tier and engines' KV regions (CUDA IPC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GpuConfig {
    /// `auto` (use the GPUs when present, else run with host and disk tiers
    /// only), `on` (no usable GPU is a start-up error), `off`, or `cpu` (the
    /// CPU backend stands in for one GPU; for tests). Default `auto`.
    pub enabled: GpuMode,
    /// CUDA device ordinals to use. Default `[0]`.
    pub devices: Vec<u32>,
    /// HBM tier bytes per device; 0: no HBM tier. Default 8 GiB.
    #[serde(with = "crate::size")]
    pub hbm_bytes: ByteSize,
    /// Copies at least this long use DMA (`cuMemcpyAsync`), shorter ones the
    /// batched kernel. Default 512 KiB.
    #[serde(with = "crate::size")]
    pub dma_threshold: ByteSize,
    /// Bytes of blocks moved between the HBM tier and the host tier per
    /// launch and fence (four such groups stay queued). Default 64 MiB.
    #[serde(with = "crate::size")]
    pub move_group_bytes: ByteSize,
    /// Unix socket (mode 0600) where engines register their KV memory (a CUDA
    /// IPC handle, or a memfd without a GPU) for `KvPages` requests. Empty: off. Default off.
    pub region_socket: String,
    /// Most KV regions registered at once. Default 64.
    pub max_regions: usize,
    /// Largest KV region accepted. Default 1 TiB.
    #[serde(with = "crate::size")]
    pub max_region_bytes: ByteSize,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            enabled: GpuMode::Auto,
            devices: vec![0],
            hbm_bytes: ByteSize::gib(8),
            dma_threshold: ByteSize::b(kvstrata_kernels::DEFAULT_DMA_THRESHOLD),
            move_group_bytes: ByteSize::b(kvstrata_tiers::DEFAULT_MOVE_GROUP_BYTES),
            region_socket: String::new(),
            max_regions: 64,
            max_region_bytes: ByteSize::tib(1),
        }
    }
}

/// `[auth]`: who may call the daemon (docs/security.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Bearer tokens required on the TCP listener: one `TOKEN [TENANT]` per
    /// line, `#` comments. Reloaded on SIGHUP. Empty: no tokens (TCP open;
    /// refused on a non-loopback address unless `insecure`). Default empty.
    pub token_file: String,
    /// Uids allowed on the Unix sockets (gRPC, mempool, SGLang), checked with
    /// SO_PEERCRED. Default: the daemon's own uid.
    pub uid_allow: Vec<u32>,
    /// Allow a non-loopback `server.tcp_addr` without tokens. Default false.
    pub insecure: bool,
    /// `/metrics` answers only `Authorization: Bearer <admin token>` (a
    /// token of `token_file` without a tenant); `/healthz` stays open. Needs
    /// `token_file`. Default false (open: keep `server.metrics_addr` on
    /// loopback or a trusted network).
    pub metrics_require_token: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            token_file: String::new(),
            uid_allow: vec![crate::auth::own_uid()],
            insecure: false,
            metrics_require_token: false,
        }
    }
}

/// `[tls]`: TLS on the TCP listener. Off while `cert` is empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificate chain (PEM). Default empty (plaintext TCP).
    pub cert: String,
    /// Private key of `cert` (PEM).
    pub key: String,
    /// CA bundle (PEM); when set, TCP clients must present a certificate it signed.
    pub client_ca: String,
}

/// `[log]`: logging.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`. Default `text`.
    pub format: LogFormat,
    /// A tracing filter (`info`, `kvstrata=debug,info`, ...). `RUST_LOG` wins. Default `info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}
