//! The flags of `kvstrata serve` and their `KVSTRATA_*` variables: the
//! override layer of the configuration.
//!
//! Each settings flag is an `Option` (or a list, empty when not given) in the
//! struct of its file section, renamed (`serde(rename)`) to its TOML key, so
//! the layer serializes to a partial configuration file with `null` for what
//! was not given; [`super::layer`] lays it over the file. clap reads a flag
//! before its variable.

use std::path::PathBuf;

use bytesize::ByteSize;
use serde::Serialize;

use super::choice::{DiskDurability, DiskIoEngine, GpuMode, LogFormat};

/// Flags of `kvstrata serve`: the config file, the settings that override
/// its keys, and what to do once configured.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML config file.
    #[arg(long, env = "KVSTRATA_CONFIG")]
    pub config: Option<PathBuf>,
    // The settings flags; each overrides its config key.
    #[command(flatten)]
    pub settings: SettingFlags,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Once listening, write the bound addresses as JSON to this file (for scripts and tests).
    #[arg(long, env = "KVSTRATA_READY_FILE")]
    pub ready_file: Option<PathBuf>,
}

/// One flag (and variable) per overridable setting, grouped as the file's
/// sections are; serializes to the keys it sets.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct SettingFlags {
    #[command(flatten)]
    pub server: ServerFlags,
    #[command(flatten)]
    pub host: HostFlags,
    #[command(flatten)]
    pub disk: DiskFlags,
    #[command(flatten)]
    pub remote: RemoteFlags,
    #[command(flatten)]
    pub shm: ShmFlags,
    #[command(flatten)]
    pub sglang: SglangFlags,
    #[command(flatten)]
    pub gpu: GpuFlags,
    #[command(flatten)]
    pub auth: AuthFlags,
    #[command(flatten)]
    pub tls: TlsFlags,
    #[command(flatten)]
    pub log: LogFlags,
}

/// A Unix socket path given to a flag as `unix:///path` or `/path`; kept as `/path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct SocketArg(String);

impl From<&str> for SocketArg {
    fn from(s: &str) -> Self {
        SocketArg(super::socket_path(s))
    }
}

/// Overrides of `[server]`.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct ServerFlags {
    /// server.tcp_addr: gRPC TCP address ("" disables).
    #[arg(long, env = "KVSTRATA_TCP_ADDR")]
    pub tcp_addr: Option<String>,
    /// server.uds_path: gRPC Unix socket path ("" disables).
    #[arg(long, env = "KVSTRATA_UDS_PATH")]
    pub uds_path: Option<String>,
    /// server.metrics_addr: Prometheus endpoint address ("" disables).
    #[arg(long, env = "KVSTRATA_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// server.max_message_bytes, e.g. 512MiB.
    #[arg(long, env = "KVSTRATA_MAX_MESSAGE_BYTES")]
    #[serde(serialize_with = "crate::size::serialize_option")]
    pub max_message_bytes: Option<ByteSize>,
    /// server.max_batch: most keys/items per batch request.
    #[arg(long, env = "KVSTRATA_MAX_BATCH")]
    pub max_batch: Option<usize>,
    /// server.max_lease_ms: longest Pin lease.
    #[arg(long, env = "KVSTRATA_MAX_LEASE_MS")]
    pub max_lease_ms: Option<u64>,
    /// server.max_concurrent_streams: HTTP/2 streams per connection.
    #[arg(long, env = "KVSTRATA_MAX_CONCURRENT_STREAMS")]
    pub max_concurrent_streams: Option<u32>,
    /// server.request_timeout_ms: deadline of a unary request (a shorter grpc-timeout wins).
    #[arg(long, env = "KVSTRATA_REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: Option<u64>,
    /// server.max_inflight_requests: requests executing at once; beyond, RESOURCE_EXHAUSTED.
    #[arg(long, env = "KVSTRATA_MAX_INFLIGHT_REQUESTS")]
    pub max_inflight_requests: Option<usize>,
    /// server.max_inflight_per_peer: requests one client (IP address, or process on the
    /// Unix socket) may have executing at once (0: half of max_inflight_requests).
    #[arg(long, env = "KVSTRATA_MAX_INFLIGHT_PER_PEER")]
    pub max_inflight_per_peer: Option<usize>,
    /// server.max_blocking_tasks: cache calls on the blocking pool at once.
    #[arg(long, env = "KVSTRATA_MAX_BLOCKING_TASKS")]
    pub max_blocking_tasks: Option<usize>,
    /// server.max_connections: gRPC connections open at once; beyond, closed at accept.
    #[arg(long, env = "KVSTRATA_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// server.max_connections_per_peer: connections of one IP address (TCP) or process (Unix).
    #[arg(long, env = "KVSTRATA_MAX_CONNECTIONS_PER_PEER")]
    pub max_connections_per_peer: Option<usize>,
    /// server.handshake_timeout_ms: time a new connection has for its TLS and HTTP/2 handshake.
    #[arg(long, env = "KVSTRATA_HANDSHAKE_TIMEOUT_MS")]
    pub handshake_timeout_ms: Option<u64>,
    /// server.idle_timeout_ms: a connection with no call open this long is closed (0: never).
    #[arg(long, env = "KVSTRATA_IDLE_TIMEOUT_MS")]
    pub idle_timeout_ms: Option<u64>,
    /// server.keepalive_interval_ms: HTTP/2 PING to a peer silent this long (0: off).
    #[arg(long, env = "KVSTRATA_KEEPALIVE_INTERVAL_MS")]
    pub keepalive_interval_ms: Option<u64>,
    /// server.keepalive_timeout_ms: a peer not answering a PING this long is dropped.
    #[arg(long, env = "KVSTRATA_KEEPALIVE_TIMEOUT_MS")]
    pub keepalive_timeout_ms: Option<u64>,
}

/// Overrides of `[host]`.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct HostFlags {
    /// host.capacity: host tier size, e.g. 4GiB.
    #[arg(long, env = "KVSTRATA_HOST_CAPACITY")]
    #[serde(rename = "capacity", serialize_with = "crate::size::serialize_option")]
    pub host_capacity: Option<ByteSize>,
    /// host.segment_bytes: arena segment size (largest block), e.g. 64MiB.
    #[arg(long, env = "KVSTRATA_HOST_SEGMENT_BYTES")]
    #[serde(
        rename = "segment_bytes",
        serialize_with = "crate::size::serialize_option"
    )]
    pub host_segment_bytes: Option<ByteSize>,
}

/// Overrides of `[disk]`.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct DiskFlags {
    /// disk.paths: a slot file (PATH or PATH=SIZE); repeat once per drive. Enables the disk tier.
    #[arg(long = "disk-path", env = "KVSTRATA_DISK_PATHS", value_delimiter = ',')]
    #[serde(rename = "paths", skip_serializing_if = "Vec::is_empty")]
    pub disk_paths: Vec<String>,
    /// disk.size: size of each slot file given without =SIZE, e.g. 100GiB.
    #[arg(long, env = "KVSTRATA_DISK_SIZE")]
    #[serde(rename = "size", serialize_with = "crate::size::serialize_option")]
    pub disk_size: Option<ByteSize>,
    /// disk.index_dir: RocksDB index directory.
    #[arg(long, env = "KVSTRATA_DISK_INDEX_DIR")]
    #[serde(rename = "index_dir")]
    pub disk_index_dir: Option<String>,
    /// disk.engine: auto, io_uring or pread.
    #[arg(long, env = "KVSTRATA_DISK_ENGINE")]
    #[serde(rename = "engine")]
    pub disk_engine: Option<DiskIoEngine>,
    /// disk.durability: process-crash or power-loss.
    #[arg(long, env = "KVSTRATA_DISK_DURABILITY")]
    #[serde(rename = "durability")]
    pub disk_durability: Option<DiskDurability>,
    /// disk.read_timeout_ms: a slower disk read answers a miss.
    #[arg(long, env = "KVSTRATA_DISK_READ_TIMEOUT_MS")]
    #[serde(rename = "read_timeout_ms")]
    pub disk_read_timeout_ms: Option<u64>,
    /// disk.promote_on_get: copy blocks read from disk into host memory (true/false).
    #[arg(long, env = "KVSTRATA_DISK_PROMOTE_ON_GET")]
    #[serde(rename = "promote_on_get")]
    pub disk_promote_on_get: Option<bool>,
    /// disk.demote_queue: bytes waiting to be demoted at most, e.g. 256MiB.
    #[arg(long, env = "KVSTRATA_DISK_DEMOTE_QUEUE")]
    #[serde(
        rename = "demote_queue",
        serialize_with = "crate::size::serialize_option"
    )]
    pub disk_demote_queue: Option<ByteSize>,
    /// disk.drain_on_stop_ms: on a graceful stop, how long the disk write queue may drain.
    #[arg(long, env = "KVSTRATA_DISK_DRAIN_ON_STOP_MS")]
    #[serde(rename = "drain_on_stop_ms")]
    pub disk_drain_on_stop_ms: Option<u64>,
    /// disk.persist_on_stop_ms: on a graceful stop, how long host-tier blocks may be written to disk (0: off).
    #[arg(long, env = "KVSTRATA_DISK_PERSIST_ON_STOP_MS")]
    #[serde(rename = "persist_on_stop_ms")]
    pub disk_persist_on_stop_ms: Option<u64>,
}

/// Overrides of `[remote]`.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct RemoteFlags {
    /// remote.nodes: a seed node of the remote tier's Redis/Valkey cluster (redis://host:port);
    /// repeat or comma-separate. Enables the remote tier.
    #[arg(
        long = "remote-node",
        env = "KVSTRATA_REMOTE_NODES",
        value_delimiter = ','
    )]
    #[serde(rename = "nodes", skip_serializing_if = "Vec::is_empty")]
    pub remote_nodes: Vec<String>,
    /// remote.deadline_ms: a slower cluster command is a miss.
    #[arg(long, env = "KVSTRATA_REMOTE_DEADLINE_MS")]
    #[serde(rename = "deadline_ms")]
    pub remote_deadline_ms: Option<u64>,
    /// remote.write_through: write every put to the cluster (true/false).
    #[arg(long, env = "KVSTRATA_REMOTE_WRITE_THROUGH")]
    #[serde(rename = "write_through")]
    pub remote_write_through: Option<bool>,
    /// remote.demote: write blocks leaving the host tier to the cluster (true/false).
    #[arg(long, env = "KVSTRATA_REMOTE_DEMOTE")]
    #[serde(rename = "demote")]
    pub remote_demote: Option<bool>,
    /// remote.key_prefix: prefix of every Redis key written.
    #[arg(long, env = "KVSTRATA_REMOTE_KEY_PREFIX")]
    #[serde(rename = "key_prefix")]
    pub remote_key_prefix: Option<String>,
}

/// Overrides of `[shm]`.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct ShmFlags {
    /// shm.mempool_socket: Unix socket where same-host clients register shared-memory pools.
    #[arg(long, env = "KVSTRATA_MEMPOOL_SOCKET")]
    pub mempool_socket: Option<SocketArg>,
}

/// Overrides of `[sglang]`.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct SglangFlags {
    /// sglang.socket: Unix socket serving SGLang HiCache's StorageServer (needs --mempool-socket).
    #[arg(long, env = "KVSTRATA_SGLANG_SOCKET")]
    #[serde(rename = "socket")]
    pub sglang_socket: Option<SocketArg>,
    /// sglang.namespace: one name for every SGLang block instead of the pool's name.
    #[arg(long, env = "KVSTRATA_SGLANG_NAMESPACE")]
    #[serde(rename = "namespace")]
    pub sglang_namespace: Option<String>,
}

/// Overrides of `[gpu]`.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct GpuFlags {
    /// gpu.enabled: auto (use GPUs when present), on (no GPU is a start-up error), off, or cpu
    /// (the CPU backend stands in for a GPU: for tests).
    #[arg(long = "gpu", env = "KVSTRATA_GPU")]
    #[serde(rename = "enabled")]
    pub gpu_enabled: Option<GpuMode>,
    /// gpu.devices: a CUDA device ordinal to use; repeat or comma-separate (default 0).
    #[arg(
        long = "gpu-device",
        env = "KVSTRATA_GPU_DEVICES",
        value_delimiter = ','
    )]
    #[serde(rename = "devices", skip_serializing_if = "Vec::is_empty")]
    pub gpu_devices: Vec<u32>,
    /// gpu.hbm_bytes: HBM tier size per device, e.g. 8GiB (0: no HBM tier).
    #[arg(long, env = "KVSTRATA_GPU_HBM_BYTES")]
    #[serde(rename = "hbm_bytes", serialize_with = "crate::size::serialize_option")]
    pub gpu_hbm_bytes: Option<ByteSize>,
    /// gpu.dma_threshold: copies at least this long use DMA instead of the batched kernel.
    #[arg(long, env = "KVSTRATA_GPU_DMA_THRESHOLD")]
    #[serde(
        rename = "dma_threshold",
        serialize_with = "crate::size::serialize_option"
    )]
    pub gpu_dma_threshold: Option<ByteSize>,
    /// gpu.move_group_bytes: bytes of blocks moved between the HBM and host tiers per launch.
    #[arg(long, env = "KVSTRATA_GPU_MOVE_GROUP_BYTES")]
    #[serde(
        rename = "move_group_bytes",
        serialize_with = "crate::size::serialize_option"
    )]
    pub gpu_move_group_bytes: Option<ByteSize>,
    /// gpu.region_socket: Unix socket where engines register their paged KV memory (CUDA IPC or memfd).
    #[arg(long, env = "KVSTRATA_KV_REGION_SOCKET")]
    #[serde(rename = "region_socket")]
    pub kv_region_socket: Option<SocketArg>,
    /// gpu.max_regions: most KV regions registered at once.
    #[arg(long, env = "KVSTRATA_MAX_KV_REGIONS")]
    #[serde(rename = "max_regions")]
    pub max_kv_regions: Option<usize>,
}

/// Overrides of `[auth]`.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct AuthFlags {
    /// auth.token_file: bearer tokens required on TCP (`TOKEN [TENANT]` per line; SIGHUP reloads).
    #[arg(long, env = "KVSTRATA_AUTH_TOKEN_FILE")]
    pub token_file: Option<String>,
    /// auth.uid_allow: a uid allowed on the Unix sockets; repeat or comma-separate
    /// (default: the daemon's own uid).
    #[arg(
        long = "uds-allow-uid",
        env = "KVSTRATA_UDS_ALLOW_UIDS",
        value_delimiter = ','
    )]
    #[serde(rename = "uid_allow", skip_serializing_if = "Vec::is_empty")]
    pub uds_allow_uids: Vec<u32>,
    /// auth.insecure: allow a non-loopback --tcp-addr without a token file.
    #[arg(long, env = "KVSTRATA_INSECURE", num_args = 0..=1, default_missing_value = "true")]
    pub insecure: Option<bool>,
    /// auth.metrics_require_token: /metrics needs an admin bearer token of --token-file.
    #[arg(
        long,
        env = "KVSTRATA_METRICS_REQUIRE_TOKEN",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub metrics_require_token: Option<bool>,
}

/// Overrides of `[tls]`.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct TlsFlags {
    /// tls.cert: server certificate (PEM); turns TLS on for the TCP listener.
    #[arg(long, env = "KVSTRATA_TLS_CERT")]
    #[serde(rename = "cert")]
    pub tls_cert: Option<String>,
    /// tls.key: private key of --tls-cert (PEM).
    #[arg(long, env = "KVSTRATA_TLS_KEY")]
    #[serde(rename = "key")]
    pub tls_key: Option<String>,
    /// tls.client_ca: CA (PEM) that must have signed every TCP client's certificate.
    #[arg(long, env = "KVSTRATA_TLS_CLIENT_CA")]
    #[serde(rename = "client_ca")]
    pub tls_client_ca: Option<String>,
}

/// Overrides of `[log]`.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct LogFlags {
    /// log.format: text or json.
    #[arg(long, env = "KVSTRATA_LOG_FORMAT")]
    #[serde(rename = "format")]
    pub log_format: Option<LogFormat>,
    /// log.level: tracing filter.
    #[arg(long, env = "KVSTRATA_LOG_LEVEL")]
    #[serde(rename = "level")]
    pub log_level: Option<String>,
}
