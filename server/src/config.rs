//! Daemon configuration: a TOML file, every key overridable by a flag and by an
//! environment variable (`KVSTRATA_...`). Precedence: flag > environment >
//! file > built-in default. `kvstrata serve --print-config` prints the result.

use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use kvstrata_tiers::{
    CacheConfig, DiskFileConfig, DiskTierConfig, Durability, EngineChoice, HostTierConfig,
    MovementConfig, RemoteTierConfig,
};

use crate::error::DaemonError;

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub host: HostConfig,
    pub disk: DiskConfig,
    pub remote: RemoteConfig,
    pub shm: ShmConfig,
    pub sglang: SglangConfig,
    pub gpu: GpuConfig,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
    pub log: LogConfig,
}

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
    /// Cache calls (copies, disk reads) running on the blocking pool at once;
    /// further requests wait for a slot within their deadline. Default 64.
    pub max_blocking_tasks: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            tcp_addr: "127.0.0.1:50051".into(),
            uds_path: kvstrata_client::default_uds_path().display().to_string(),
            metrics_addr: "127.0.0.1:9091".into(),
            max_message_bytes: ByteSize::mib(512),
            max_batch: 4096,
            max_lease_ms: 600_000,
            max_concurrent_streams: 256,
            request_timeout_ms: 30_000,
            max_inflight_requests: 1024,
            max_blocking_tasks: 64,
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
    pub engine: String,
    /// io_uring queue depth. Default 128.
    pub queue_depth: u32,
    /// Threads of the pread/pwrite engine. Default 8.
    pub io_threads: usize,
    /// A disk read slower than this answers a miss. Default 2000.
    pub read_timeout_ms: u64,
    /// A disk write slower than this fails. Default 10000.
    pub write_timeout_ms: u64,
    /// `process-crash` (survive SIGKILL) or `power-loss` (O_DSYNC data, fsynced index). Default `process-crash`.
    pub durability: String,
    /// Slot-file segment size (the largest block, header included). Default 64 MiB.
    #[serde(with = "crate::size")]
    pub segment_bytes: ByteSize,
    /// Copy blocks read from disk into the host tier. Default true.
    pub promote_on_get: bool,
    /// Payload bytes waiting to be demoted at most; beyond, evictions are dropped. Default 256 MiB.
    #[serde(with = "crate::size")]
    pub demote_queue: ByteSize,
}

impl Default for DiskConfig {
    fn default() -> Self {
        let d = DiskTierConfig::default();
        let m = MovementConfig::default();
        DiskConfig {
            paths: Vec::new(),
            size: ByteSize::gib(16),
            index_dir: String::new(),
            engine: "auto".into(),
            queue_depth: d.queue_depth,
            io_threads: d.io_threads,
            read_timeout_ms: d.read_timeout.as_millis() as u64,
            write_timeout_ms: d.write_timeout.as_millis() as u64,
            durability: "process-crash".into(),
            segment_bytes: ByteSize::b(d.segment_bytes),
            promote_on_get: m.promote_on_get,
            demote_queue: ByteSize::b(m.demote_queue_bytes),
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
        let engine = match self.engine.as_str() {
            "auto" => EngineChoice::Auto,
            "io_uring" | "io-uring" => EngineChoice::IoUring,
            "pread" => EngineChoice::Pread,
            other => {
                return Err(DaemonError::Config(format!(
                    "disk.engine: {other:?} is not auto, io_uring or pread"
                )));
            }
        };
        let durability = match self.durability.as_str() {
            "process-crash" => Durability::ProcessCrash,
            "power-loss" => Durability::PowerLoss,
            other => {
                return Err(DaemonError::Config(format!(
                    "disk.durability: {other:?} is not process-crash or power-loss"
                )));
            }
        };
        Ok(Some(DiskTierConfig {
            files,
            index_dir,
            segment_bytes: self.segment_bytes.as_u64(),
            engine,
            queue_depth: self.queue_depth,
            io_threads: self.io_threads,
            read_timeout: Duration::from_millis(self.read_timeout_ms),
            write_timeout: Duration::from_millis(self.write_timeout_ms),
            durability,
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
    pub enabled: String,
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
            enabled: "auto".into(),
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

/// `gpu.enabled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuMode {
    Auto,
    On,
    Off,
    /// The CPU backend stands in for one GPU: the HBM tier lives in host
    /// memory and the kernels run their CPU references. For tests and for
    /// trying the GPU data paths on a machine without one (docs/gpu.md).
    Cpu,
}

impl GpuConfig {
    pub fn mode(&self) -> Result<GpuMode, DaemonError> {
        match self.enabled.as_str() {
            "auto" => Ok(GpuMode::Auto),
            "on" | "true" => Ok(GpuMode::On),
            "off" | "false" => Ok(GpuMode::Off),
            "cpu" => Ok(GpuMode::Cpu),
            other => Err(DaemonError::Config(format!(
                "gpu.enabled: {other:?} is not auto, on, off or cpu"
            ))),
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
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            token_file: String::new(),
            uid_allow: vec![crate::auth::own_uid()],
            insecure: false,
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
    pub format: String,
    /// A tracing filter (`info`, `kvstrata=debug,info`, ...). `RUST_LOG` wins. Default `info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

/// Flags of `kvstrata serve`; each one overrides its config key.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML config file.
    #[arg(long, env = "KVSTRATA_CONFIG")]
    pub config: Option<PathBuf>,
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
    /// server.max_blocking_tasks: cache calls on the blocking pool at once.
    #[arg(long, env = "KVSTRATA_MAX_BLOCKING_TASKS")]
    pub max_blocking_tasks: Option<usize>,
    /// host.capacity: host tier size, e.g. 4GiB.
    #[arg(long, env = "KVSTRATA_HOST_CAPACITY")]
    pub host_capacity: Option<ByteSize>,
    /// host.segment_bytes: arena segment size (largest block), e.g. 64MiB.
    #[arg(long, env = "KVSTRATA_HOST_SEGMENT_BYTES")]
    pub host_segment_bytes: Option<ByteSize>,
    /// disk.paths: a slot file (PATH or PATH=SIZE); repeat once per drive. Enables the disk tier.
    #[arg(long = "disk-path", env = "KVSTRATA_DISK_PATHS", value_delimiter = ',')]
    pub disk_paths: Vec<String>,
    /// disk.size: size of each slot file given without =SIZE, e.g. 100GiB.
    #[arg(long, env = "KVSTRATA_DISK_SIZE")]
    pub disk_size: Option<ByteSize>,
    /// disk.index_dir: RocksDB index directory.
    #[arg(long, env = "KVSTRATA_DISK_INDEX_DIR")]
    pub disk_index_dir: Option<String>,
    /// disk.engine: auto, io_uring or pread.
    #[arg(long, env = "KVSTRATA_DISK_ENGINE")]
    pub disk_engine: Option<String>,
    /// disk.durability: process-crash or power-loss.
    #[arg(long, env = "KVSTRATA_DISK_DURABILITY")]
    pub disk_durability: Option<String>,
    /// disk.read_timeout_ms: a slower disk read answers a miss.
    #[arg(long, env = "KVSTRATA_DISK_READ_TIMEOUT_MS")]
    pub disk_read_timeout_ms: Option<u64>,
    /// disk.promote_on_get: copy blocks read from disk into host memory (true/false).
    #[arg(long, env = "KVSTRATA_DISK_PROMOTE_ON_GET")]
    pub disk_promote_on_get: Option<bool>,
    /// disk.demote_queue: bytes waiting to be demoted at most, e.g. 256MiB.
    #[arg(long, env = "KVSTRATA_DISK_DEMOTE_QUEUE")]
    pub disk_demote_queue: Option<ByteSize>,
    /// remote.nodes: a seed node of the remote tier's Redis/Valkey cluster (redis://host:port);
    /// repeat or comma-separate. Enables the remote tier.
    #[arg(
        long = "remote-node",
        env = "KVSTRATA_REMOTE_NODES",
        value_delimiter = ','
    )]
    pub remote_nodes: Vec<String>,
    /// remote.deadline_ms: a slower cluster command is a miss.
    #[arg(long, env = "KVSTRATA_REMOTE_DEADLINE_MS")]
    pub remote_deadline_ms: Option<u64>,
    /// remote.write_through: write every put to the cluster (true/false).
    #[arg(long, env = "KVSTRATA_REMOTE_WRITE_THROUGH")]
    pub remote_write_through: Option<bool>,
    /// remote.demote: write blocks leaving the host tier to the cluster (true/false).
    #[arg(long, env = "KVSTRATA_REMOTE_DEMOTE")]
    pub remote_demote: Option<bool>,
    /// remote.key_prefix: prefix of every Redis key written.
    #[arg(long, env = "KVSTRATA_REMOTE_KEY_PREFIX")]
    pub remote_key_prefix: Option<String>,
    /// shm.mempool_socket: Unix socket where same-host clients register shared-memory pools.
    #[arg(long, env = "KVSTRATA_MEMPOOL_SOCKET")]
    pub mempool_socket: Option<String>,
    /// sglang.socket: Unix socket serving SGLang HiCache's StorageServer (needs --mempool-socket).
    #[arg(long, env = "KVSTRATA_SGLANG_SOCKET")]
    pub sglang_socket: Option<String>,
    /// sglang.namespace: one name for every SGLang block instead of the pool's name.
    #[arg(long, env = "KVSTRATA_SGLANG_NAMESPACE")]
    pub sglang_namespace: Option<String>,
    /// gpu.enabled: auto (use GPUs when present), on (no GPU is a start-up error), off, or cpu
    /// (the CPU backend stands in for a GPU: for tests).
    #[arg(long = "gpu", env = "KVSTRATA_GPU")]
    pub gpu_enabled: Option<String>,
    /// gpu.devices: a CUDA device ordinal to use; repeat or comma-separate (default 0).
    #[arg(
        long = "gpu-device",
        env = "KVSTRATA_GPU_DEVICES",
        value_delimiter = ','
    )]
    pub gpu_devices: Vec<u32>,
    /// gpu.hbm_bytes: HBM tier size per device, e.g. 8GiB (0: no HBM tier).
    #[arg(long, env = "KVSTRATA_GPU_HBM_BYTES")]
    pub gpu_hbm_bytes: Option<ByteSize>,
    /// gpu.dma_threshold: copies at least this long use DMA instead of the batched kernel.
    #[arg(long, env = "KVSTRATA_GPU_DMA_THRESHOLD")]
    pub gpu_dma_threshold: Option<ByteSize>,
    /// gpu.move_group_bytes: bytes of blocks moved between the HBM and host tiers per launch.
    #[arg(long, env = "KVSTRATA_GPU_MOVE_GROUP_BYTES")]
    pub gpu_move_group_bytes: Option<ByteSize>,
    /// gpu.region_socket: Unix socket where engines register their paged KV memory (CUDA IPC or memfd).
    #[arg(long, env = "KVSTRATA_KV_REGION_SOCKET")]
    pub kv_region_socket: Option<String>,
    /// gpu.max_regions: most KV regions registered at once.
    #[arg(long, env = "KVSTRATA_MAX_KV_REGIONS")]
    pub max_kv_regions: Option<usize>,
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
    pub uds_allow_uids: Vec<u32>,
    /// auth.insecure: allow a non-loopback --tcp-addr without a token file.
    #[arg(long, env = "KVSTRATA_INSECURE", num_args = 0..=1, default_missing_value = "true")]
    pub insecure: Option<bool>,
    /// tls.cert: server certificate (PEM); turns TLS on for the TCP listener.
    #[arg(long, env = "KVSTRATA_TLS_CERT")]
    pub tls_cert: Option<String>,
    /// tls.key: private key of --tls-cert (PEM).
    #[arg(long, env = "KVSTRATA_TLS_KEY")]
    pub tls_key: Option<String>,
    /// tls.client_ca: CA (PEM) that must have signed every TCP client's certificate.
    #[arg(long, env = "KVSTRATA_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<String>,
    /// log.format: text or json.
    #[arg(long, env = "KVSTRATA_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// log.level: tracing filter.
    #[arg(long, env = "KVSTRATA_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Once listening, write the bound addresses as JSON to this file (for scripts and tests).
    #[arg(long, env = "KVSTRATA_READY_FILE")]
    pub ready_file: Option<PathBuf>,
}

impl Config {
    /// Reads a TOML file; unknown keys are errors.
    pub fn from_file(path: &std::path::Path) -> Result<Config, DaemonError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| DaemonError::Config(format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| DaemonError::Config(format!("{}: {e}", path.display())))
    }

    /// The file (if any) with the flags and environment applied on top.
    pub fn load(args: &ServeArgs) -> Result<Config, DaemonError> {
        let mut c = match &args.config {
            Some(p) => Config::from_file(p)?,
            None => Config::default(),
        };
        let s = &mut c.server;
        if let Some(v) = &args.tcp_addr {
            s.tcp_addr = v.clone();
        }
        if let Some(v) = &args.uds_path {
            s.uds_path = v.clone();
        }
        if let Some(v) = &args.metrics_addr {
            s.metrics_addr = v.clone();
        }
        if let Some(v) = args.max_message_bytes {
            s.max_message_bytes = v;
        }
        if let Some(v) = args.max_batch {
            s.max_batch = v;
        }
        if let Some(v) = args.max_lease_ms {
            s.max_lease_ms = v;
        }
        if let Some(v) = args.max_concurrent_streams {
            s.max_concurrent_streams = v;
        }
        if let Some(v) = args.request_timeout_ms {
            s.request_timeout_ms = v;
        }
        if let Some(v) = args.max_inflight_requests {
            s.max_inflight_requests = v;
        }
        if let Some(v) = args.max_blocking_tasks {
            s.max_blocking_tasks = v;
        }
        if let Some(v) = args.host_capacity {
            c.host.capacity = v;
        }
        if let Some(v) = args.host_segment_bytes {
            c.host.segment_bytes = v;
        }
        let d = &mut c.disk;
        if !args.disk_paths.is_empty() {
            d.paths = args.disk_paths.clone();
        }
        if let Some(v) = args.disk_size {
            d.size = v;
        }
        if let Some(v) = &args.disk_index_dir {
            d.index_dir = v.clone();
        }
        if let Some(v) = &args.disk_engine {
            d.engine = v.clone();
        }
        if let Some(v) = &args.disk_durability {
            d.durability = v.clone();
        }
        if let Some(v) = args.disk_read_timeout_ms {
            d.read_timeout_ms = v;
        }
        if let Some(v) = args.disk_promote_on_get {
            d.promote_on_get = v;
        }
        if let Some(v) = args.disk_demote_queue {
            d.demote_queue = v;
        }
        let r = &mut c.remote;
        if !args.remote_nodes.is_empty() {
            r.nodes = args.remote_nodes.clone();
        }
        if let Some(v) = args.remote_deadline_ms {
            r.deadline_ms = v;
        }
        if let Some(v) = args.remote_write_through {
            r.write_through = v;
        }
        if let Some(v) = args.remote_demote {
            r.demote = v;
        }
        if let Some(v) = &args.remote_key_prefix {
            r.key_prefix = v.clone();
        }
        if let Some(v) = &args.mempool_socket {
            c.shm.mempool_socket = socket_path(v);
        }
        if let Some(v) = &args.sglang_socket {
            c.sglang.socket = socket_path(v);
        }
        if let Some(v) = &args.sglang_namespace {
            c.sglang.namespace = v.clone();
        }
        let g = &mut c.gpu;
        if let Some(v) = &args.gpu_enabled {
            g.enabled = v.clone();
        }
        if !args.gpu_devices.is_empty() {
            g.devices = args.gpu_devices.clone();
        }
        if let Some(v) = args.gpu_hbm_bytes {
            g.hbm_bytes = v;
        }
        if let Some(v) = args.gpu_dma_threshold {
            g.dma_threshold = v;
        }
        if let Some(v) = args.gpu_move_group_bytes {
            g.move_group_bytes = v;
        }
        if let Some(v) = &args.kv_region_socket {
            g.region_socket = socket_path(v);
        }
        if let Some(v) = args.max_kv_regions {
            g.max_regions = v;
        }
        if let Some(v) = &args.token_file {
            c.auth.token_file = v.clone();
        }
        if !args.uds_allow_uids.is_empty() {
            c.auth.uid_allow = args.uds_allow_uids.clone();
        }
        if let Some(v) = args.insecure {
            c.auth.insecure = v;
        }
        if let Some(v) = &args.tls_cert {
            c.tls.cert = v.clone();
        }
        if let Some(v) = &args.tls_key {
            c.tls.key = v.clone();
        }
        if let Some(v) = &args.tls_client_ca {
            c.tls.client_ca = v.clone();
        }
        if let Some(v) = &args.log_format {
            c.log.format = v.clone();
        }
        if let Some(v) = &args.log_level {
            c.log.level = v.clone();
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks values a file, flag or variable could get wrong.
    pub fn validate(&self) -> Result<(), DaemonError> {
        let bad = |k: &str, why: String| Err(DaemonError::Config(format!("{k}: {why}")));
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
        if self.server.max_blocking_tasks == 0 || self.server.max_blocking_tasks > 100_000 {
            return bad(
                "server.max_blocking_tasks",
                "must be between 1 and 100000".into(),
            );
        }
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
        if self.shm.max_pools == 0 {
            return bad("shm.max_pools", "must be at least 1".into());
        }
        if !self.sglang.socket.is_empty() && self.shm.mempool_socket.is_empty() {
            return bad(
                "sglang.socket",
                "SGLang moves bytes through registered pools: set shm.mempool_socket (--mempool-socket) too".into(),
            );
        }
        if self.sglang.namespace.len() > crate::pool::MAX_POOL_NAME_BYTES {
            return bad(
                "sglang.namespace",
                format!(
                    "{} bytes, at most {}",
                    self.sglang.namespace.len(),
                    crate::pool::MAX_POOL_NAME_BYTES
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
        let mode = self.gpu.mode()?;
        if mode == GpuMode::On && self.gpu.devices.is_empty() {
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
        if !self.sglang.socket.is_empty() && self.sglang.socket == self.shm.mempool_socket {
            return bad(
                "sglang.socket",
                "must differ from shm.mempool_socket".into(),
            );
        }
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
        if self.auth.uid_allow.is_empty() && unix_sockets_on {
            return bad(
                "auth.uid_allow",
                "empty: no peer could use the Unix sockets (list at least the daemon's own uid)"
                    .into(),
            );
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return bad(
                "log.format",
                format!("{:?} is neither \"text\" nor \"json\"", self.log.format),
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

    /// The cache configuration these settings describe.
    pub fn cache_config(&self) -> Result<CacheConfig, DaemonError> {
        Ok(CacheConfig {
            host: HostTierConfig {
                capacity_bytes: self.host.capacity.as_u64(),
                segment_bytes: self.host.segment_bytes.as_u64(),
            },
            disk: self.disk.tier_config()?,
            remote: self.remote.tier_config()?,
            movement: MovementConfig {
                promote_on_get: self.disk.promote_on_get,
                demote_queue_bytes: self.disk.demote_queue.as_u64(),
                ..MovementConfig::default()
            },
            max_lease: Duration::from_millis(self.server.max_lease_ms),
            ..CacheConfig::default()
        })
    }

    /// TOML text of the configuration.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// A socket path given as `unix:///path` or `/path`.
pub fn socket_path(s: &str) -> String {
    s.strip_prefix("unix://").unwrap_or(s).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_config_reads_back() {
        let mut c = Config::default();
        c.host.capacity = ByteSize::b(1_000_000_007);
        let back: Config = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.toml");
        std::fs::write(
            &p,
            "[host]\ncapacity = \"1 MiB\"\n[server]\nmax_batch = 7\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(p),
            max_batch: Some(9),
            ..ServeArgs::default()
        };
        let c = Config::load(&args).unwrap();
        assert_eq!(c.host.capacity, ByteSize::mib(1));
        assert_eq!(c.server.max_batch, 9);
    }

    #[test]
    fn disk_paths_take_sizes() {
        let mut c = Config::default();
        c.disk.paths = vec!["/a/slots".into(), "/b/slots=2GiB".into()];
        c.disk.size = ByteSize::gib(1);
        let t = c.disk.tier_config().unwrap().unwrap();
        assert_eq!(t.files[0].size_bytes, 1 << 30);
        assert_eq!(t.files[1].size_bytes, 2 << 30);
        assert_eq!(t.index_dir, PathBuf::from("/a/kvstrata-index"));
        c.disk.paths = vec!["/a=lots".into()];
        assert!(c.validate().unwrap_err().to_string().contains("disk.paths"));
        c.disk.paths = vec!["/a".into()];
        c.disk.engine = "aio".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("disk.engine")
        );
        assert_eq!(Config::default().disk.tier_config().unwrap(), None);
    }

    #[test]
    fn sglang_needs_a_mempool_socket() {
        let mut c = Config::default();
        c.sglang.socket = "/tmp/x/sglang.sock".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("sglang.socket")
        );
        c.shm.mempool_socket = "/tmp/x/mempool.sock".into();
        c.validate().unwrap();
        assert_eq!(socket_path("unix:///run/a.sock"), "/run/a.sock");
        assert_eq!(socket_path("/run/a.sock"), "/run/a.sock");
    }

    #[test]
    fn auth_flags_and_the_exposure_guard() {
        let c = Config::default();
        assert_eq!(c.auth.uid_allow, vec![crate::auth::own_uid()]);
        assert!(c.to_toml().contains("[auth]") && c.to_toml().contains("[tls]"));
        let args = ServeArgs {
            tcp_addr: Some("0.0.0.0:50051".into()),
            uds_allow_uids: vec![7, 8],
            ..ServeArgs::default()
        };
        let c = Config::load(&args).unwrap();
        assert_eq!(c.auth.uid_allow, vec![7, 8]);
        let e = c.check_exposure().unwrap_err().to_string();
        assert!(
            e.contains("auth.token_file") && e.contains("--insecure"),
            "{e}"
        );
        let c = Config::load(&ServeArgs {
            insecure: Some(true),
            ..args.clone()
        })
        .unwrap();
        c.check_exposure().unwrap();
        let c = Config::load(&ServeArgs {
            token_file: Some("/etc/kvstrata/tokens".into()),
            ..args
        })
        .unwrap();
        c.check_exposure().unwrap();
        let mut c = Config::default();
        c.tls.cert = "/c.pem".into();
        assert!(c.validate().unwrap_err().to_string().contains("tls.cert"));
        c.tls.key = "/k.pem".into();
        c.validate().unwrap();
    }

    #[test]
    fn gpu_section_reads_flags_and_refuses_bad_values() {
        let c = Config::default();
        assert_eq!(c.gpu.mode().unwrap(), GpuMode::Auto);
        assert!(c.to_toml().contains("[gpu]"), "{}", c.to_toml());
        let args = ServeArgs {
            gpu_enabled: Some("on".into()),
            gpu_devices: vec![1, 2],
            gpu_hbm_bytes: Some(ByteSize::gib(2)),
            kv_region_socket: Some("unix:///tmp/x/regions.sock".into()),
            ..ServeArgs::default()
        };
        let c = Config::load(&args).unwrap();
        assert_eq!(c.gpu.mode().unwrap(), GpuMode::On);
        assert_eq!(c.gpu.devices, vec![1, 2]);
        assert_eq!(c.gpu.hbm_bytes, ByteSize::gib(2));
        assert_eq!(c.gpu.region_socket, "/tmp/x/regions.sock");
        let back: Config = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
        let mut c = Config::default();
        c.gpu.enabled = "maybe".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("gpu.enabled")
        );
        let mut c = Config::default();
        c.gpu.region_socket = "/tmp/x/m.sock".into();
        c.shm.mempool_socket = "/tmp/x/m.sock".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("gpu.region_socket")
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(toml::from_str::<Config>("[host]\ncapacityy = 1\n").is_err());
        let mut c = Config::default();
        c.log.format = "xml".into();
        assert!(c.validate().unwrap_err().to_string().contains("log.format"));
        let mut c = Config::default();
        c.server.tcp_addr = "nope".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("server.tcp_addr")
        );
    }
}
