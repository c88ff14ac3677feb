//! The running daemon: builds the cache, binds the TCP, Unix-socket and
//! metrics listeners, runs the gRPC services (kvstrata, health, reflection) and
//! the lease reaper, and stops them all through one cancellation token.
//!
//! [`Daemon::start`] is a list of steps, each a function of this file
//! (open the cache, build the services, start the listeners, ...); binding
//! sockets and the HTTP/2 settings are [`crate::transport`]'s.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kvstrata_proto::sglang::storage_server_server::StorageServerServer;
use kvstrata_proto::v1::kv_cache_server::KvCacheServer;
use kvstrata_tiers::{BlockCache, TierKind};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic_health::server::HealthReporter;

use crate::auth::{Auth, AuthInterceptor, Owners, Transport};
use crate::config::{Config, GpuConfig, GpuMode, socket_path};
use crate::error::DaemonError;
use crate::limits::{BlockingPool, Limited, Limiter, RequestLimits};
use crate::metrics::{self, ConnCounters, ConnListener, Metrics};
use crate::region::{self, GpuSet, RegionLimits, RegionRegistry};
use crate::service::{KvCacheService, Limits};
use crate::shm::mempool;
use crate::shm::pool::{PoolLimits, PoolRegistry};
use crate::shm::sglang::SglangService;
use crate::transport::{
    self, ConnLimiter, ConnSettings, GrpcGuardLayer, GrpcRouter, Incoming, TcpAccept, UnixAccept,
};

/// Where a started daemon listens (also written as JSON by `--ready-file`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BoundAddrs {
    pub tcp: Option<SocketAddr>,
    pub uds: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
    /// The mempool (pool registration) socket, when on.
    pub mempool: Option<PathBuf>,
    /// The SGLang StorageServer socket, when on.
    pub sglang: Option<PathBuf>,
    /// The KV region (CUDA IPC / memfd registration) socket, when on.
    pub kv_region: Option<PathBuf>,
}

impl BoundAddrs {
    /// A client target for the TCP listener (`http://ip:port`).
    pub fn tcp_target(&self) -> Option<String> {
        self.tcp.map(|a| format!("http://{a}"))
    }

    /// A client target for the Unix socket (`unix:///path`).
    pub fn uds_target(&self) -> Option<String> {
        self.uds.as_ref().map(|p| format!("unix://{}", p.display()))
    }
}

/// A running daemon.
pub struct Daemon {
    addrs: BoundAddrs,
    cache: Arc<BlockCache>,
    pools: Arc<PoolRegistry>,
    regions: Arc<RegionRegistry>,
    auth: Arc<Auth>,
    shutdown: CancellationToken,
    tasks: JoinSet<Result<(), DaemonError>>,
}

/// How often expired leases are ended.
const LEASE_REAP_PERIOD: Duration = Duration::from_millis(100);
/// How often disk access times are persisted (`BlockCache::maintain`).
const UPKEEP_PERIOD: Duration = Duration::from_secs(5);

impl Daemon {
    /// Starts every listener and task; returns once they are all bound.
    ///
    /// The steps, in order: check the configuration, open the cache (on the
    /// GPUs found), build the services, bind the listeners, serve the
    /// metrics, start the background tasks.
    pub async fn start(config: Config) -> Result<Daemon, DaemonError> {
        config.validate()?;
        config.check_exposure()?;
        let auth = Arc::new(start_auth(&config)?);
        let tls = server_tls(&config)?;
        let (cache, gpu_set) = open_cache(&config).await?;
        if !crate::service::codec::tonic_path_requested()
            && !kvstrata_proto::frame_buffers::keep_freed_frame_buffers()
        {
            tracing::debug!(
                "malloc's mmap/trim thresholds left as they are (the environment tunes malloc, or mallopt refused)"
            );
        }
        let state = DaemonState::new(&config, cache, gpu_set, auth);
        let services = GrpcServices::build(&config, &state).await?;
        let mut tasks = JoinSet::new();
        let mut addrs = start_listeners(&config, tls, &state, &services, &mut tasks).await?;
        addrs.metrics = serve_metrics(&config, &state, &mut tasks).await?;
        spawn_lease_reaper(&state, &mut tasks);
        spawn_health_on_shutdown(&state, services.health_reporter.clone(), &mut tasks);
        log_serving(&addrs, &state);
        let DaemonState {
            cache,
            pools,
            regions,
            auth,
            shutdown,
            ..
        } = state;
        Ok(Daemon {
            addrs,
            cache,
            pools,
            regions,
            auth,
            shutdown,
            tasks,
        })
    }

    /// The auth state (tokens, uid allow-list, namespace owners).
    pub fn auth(&self) -> &Arc<Auth> {
        &self.auth
    }

    /// Re-reads `auth.token_file` (what SIGHUP does). A file that cannot be
    /// read or parsed keeps the old tokens. Returns the tokens now valid.
    pub fn reload_tokens(&self) -> Result<usize, DaemonError> {
        self.auth
            .reload()
            .map_err(|e| DaemonError::Config(e.to_string()))
    }

    pub fn addrs(&self) -> &BoundAddrs {
        &self.addrs
    }

    pub fn cache(&self) -> &Arc<BlockCache> {
        &self.cache
    }

    /// The shared-memory pools registered now.
    pub fn pools(&self) -> &Arc<PoolRegistry> {
        &self.pools
    }

    /// The KV regions registered now, and the GPUs found at start-up.
    pub fn regions(&self) -> &Arc<RegionRegistry> {
        &self.regions
    }

    /// The token that stops the daemon when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs until the shutdown token is cancelled (or a task fails), then
    /// stops every task and removes the Unix socket.
    pub async fn run_until_stopped(mut self) -> Result<(), DaemonError> {
        let mut first_err = None;
        tokio::select! {
            _ = self.shutdown.cancelled() => {}
            Some(r) = self.tasks.join_next() => {
                if let Some(e) = flatten(r) {
                    first_err = Some(e);
                }
                self.shutdown.cancel();
            }
        }
        while let Some(r) = self.tasks.join_next().await {
            if let Some(e) = flatten(r)
                && first_err.is_none()
            {
                first_err = Some(e);
            }
        }
        // The listeners have drained: close the cache in order (movement
        // drained, tiers stopped top to bottom); it blocks, so off the
        // async workers.
        let cache = Arc::clone(&self.cache);
        if let Err(e) = tokio::task::spawn_blocking(move || cache.close()).await
            && first_err.is_none()
        {
            first_err = Some(DaemonError::Task(format!("closing the cache: {e}")));
        }
        tracing::info!("kvstrata stopped");
        first_err.map_or(Ok(()), Err)
    }

    /// Stops the daemon and waits for it.
    pub async fn shutdown(self) -> Result<(), DaemonError> {
        self.shutdown.cancel();
        self.run_until_stopped().await
    }
}

/// What the services, listeners and tasks of one daemon share.
struct DaemonState {
    cache: Arc<BlockCache>,
    gpu_set: Arc<GpuSet>,
    pools: Arc<PoolRegistry>,
    regions: Arc<RegionRegistry>,
    auth: Arc<Auth>,
    metrics: Arc<Metrics>,
    /// Overload protection and deadlines (src/limits.rs), shared by the
    /// kvstrata and SGLang services of this daemon.
    limiter: Arc<Limiter>,
    /// The connection limits and deadlines of the gRPC listeners.
    conns: Arc<ConnLimiter>,
    shutdown: CancellationToken,
}

impl DaemonState {
    /// The (empty) pool and KV-region registries, the metrics registry with
    /// every collector, and the request limiter.
    fn new(
        config: &Config,
        cache: Arc<BlockCache>,
        gpu_set: Arc<GpuSet>,
        auth: Arc<Auth>,
    ) -> DaemonState {
        let pools = Arc::new(PoolRegistry::new(PoolLimits {
            max_pools: config.shm.max_pools,
            max_pool_bytes: config.shm.max_pool_bytes.as_u64(),
        }));
        let regions = Arc::new(RegionRegistry::new(
            RegionLimits {
                max_regions: config.gpu.max_regions,
                max_region_bytes: config.gpu.max_region_bytes.as_u64(),
            },
            Arc::clone(&gpu_set),
        ));
        let mut metrics = Metrics::new(Arc::clone(&cache), Arc::clone(&pools));
        metrics.register_collector(Box::new(auth.collector()));
        metrics.register_collector(Box::new(metrics::RegionCollector::new(Arc::clone(
            &regions,
        ))));
        let conn_counters = Arc::new(ConnCounters::default());
        metrics.register_collector(Box::new(conn_counters.collector()));
        let conns = ConnLimiter::new(ConnSettings::from_config(&config.server), conn_counters);
        let metrics = Arc::new(metrics);
        let limiter = Limiter::new(
            RequestLimits {
                max_inflight: config.server.max_inflight_requests,
                max_inflight_per_peer: config.server.inflight_per_peer(),
                request_timeout: Duration::from_millis(config.server.request_timeout_ms),
                max_blocking: config.server.max_blocking_tasks,
            },
            Arc::clone(&metrics),
        );
        DaemonState {
            cache,
            gpu_set,
            pools,
            regions,
            auth,
            metrics,
            limiter,
            conns,
            shutdown: CancellationToken::new(),
        }
    }
}

/// Finds the GPUs and opens the cache on them, both off the async workers.
async fn open_cache(config: &Config) -> Result<(Arc<BlockCache>, Arc<GpuSet>), DaemonError> {
    // GPU detection: CUDA is loaded at run time; without a library or a
    // device the daemon runs with host and disk tiers only
    // (`gpu.enabled = "on"` makes that a start-up error).
    let gpu_config = config.gpu.clone();
    let gpu_set = tokio::task::spawn_blocking(move || detect_gpus(&gpu_config))
        .await
        .map_err(|e| DaemonError::Task(format!("GPU detection: {e}")))??;
    // The cache gets every GPU found: the host arena is page-locked with
    // the first, and with gpu.hbm_bytes > 0 each gets an HBM tier (T0).
    let cache_gpus: Vec<kvstrata_kernels::Gpu> = gpu_set.devices.clone();
    let gpu_set = Arc::new(gpu_set);
    let mut cache_config = config.cache_config()?;
    if config.gpu.hbm_bytes.as_u64() > 0 && !cache_gpus.is_empty() {
        cache_config.hbm = Some(kvstrata_tiers::HbmTierConfig {
            capacity_bytes: config.gpu.hbm_bytes.as_u64(),
            dma_threshold: config.gpu.dma_threshold.as_u64(),
            move_group_bytes: config.gpu.move_group_bytes.as_u64(),
            ..Default::default()
        });
    }
    // Opening the disk tier reads its whole index (about 1 s per million
    // blocks): off the async workers. The remote tier runs on this
    // runtime.
    let runtime = tokio::runtime::Handle::current();
    let cache = tokio::task::spawn_blocking(move || {
        let cache = BlockCache::open(cache_config, cache_gpus, Some(runtime))?;
        // Give the cluster a moment, so the first requests do not all miss.
        if let Some(r) = cache.remote()
            && !r.wait_connected(r.config().connect_timeout)
        {
            tracing::warn!(nodes = ?r.config().nodes, "remote tier: not connected yet; reads miss until the cluster answers");
        }
        Ok::<_, kvstrata_tiers::OpenError>(cache)
    })
    .await
        .map_err(|e| DaemonError::Task(format!("opening the cache: {e}")))??;
    Ok((Arc::new(cache), gpu_set))
}

/// The gRPC services the listeners serve, built once and cloned into each.
struct GrpcServices {
    kv_cache: KvCacheService,
    /// Health checking and server reflection: open to every caller, for probes.
    probes: Routes,
    /// Health checking alone.
    health: Routes,
    health_reporter: HealthReporter,
    max_message_bytes: usize,
    /// The first layer of every gRPC server (see [`GrpcGuardLayer`]).
    guard: GrpcGuardLayer,
}

impl GrpcServices {
    async fn build(config: &Config, state: &DaemonState) -> Result<GrpcServices, DaemonError> {
        let kv_cache = KvCacheService::new(
            Arc::clone(&state.cache),
            Arc::clone(&state.pools),
            Limits {
                max_batch: config.server.max_batch,
                blocking: BlockingPool::new(
                    config.server.max_blocking_tasks,
                    state.metrics.blocking_gauge(),
                ),
            },
            Arc::clone(&state.metrics),
            state.shutdown.clone(),
        )
        .with_auth(Arc::clone(&state.auth))
        .with_regions(Arc::clone(&state.regions));
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<KvCacheServer<KvCacheService>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(kvstrata_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| DaemonError::Reflection(e.to_string()))?;
        Ok(GrpcServices {
            kv_cache,
            probes: Routes::new(health_service.clone()).add_service(reflection),
            health: Routes::new(health_service),
            health_reporter,
            max_message_bytes: config.server.max_message_bytes.as_u64() as usize,
            guard: GrpcGuardLayer::new(
                Arc::new(transport::grpc_guard::one_message_methods(&[
                    kvstrata_proto::FILE_DESCRIPTOR_SET,
                    tonic_health::pb::FILE_DESCRIPTOR_SET,
                ])),
                Arc::clone(state.conns.counters()),
            ),
        })
    }

    /// The KvCache listener's router for callers arriving over `transport`.
    /// The KvCache service answers only callers the auth layer admits
    /// (bearer token on TCP, peer uid on the Unix socket); health and
    /// reflection stay open for probes.
    fn kv_cache_router(
        &self,
        config: &Config,
        state: &DaemonState,
        transport: Transport,
        tls: Option<ServerTlsConfig>,
    ) -> Result<GrpcRouter, DaemonError> {
        let max_msg = self.max_message_bytes;
        Ok(transport::kv_cache_server(
            config.server.max_concurrent_streams,
            state.conns.settings(),
            self.guard.clone(),
            tls,
        )?
        .add_routes(self.probes.clone())
        .add_service(InterceptedService::new(
            Limited::new(
                crate::service::codec::kv_cache_service(self.kv_cache.clone(), max_msg),
                Arc::clone(&state.limiter),
            ),
            AuthInterceptor::new(Arc::clone(&state.auth), transport),
        )))
    }

    /// The SGLang socket's router: the StorageServer service and health.
    fn sglang_router(&self, config: &Config, state: &DaemonState) -> GrpcRouter {
        let max_msg = self.max_message_bytes;
        let sglang = SglangService::new(
            Arc::clone(&state.cache),
            Arc::clone(&state.pools),
            Arc::clone(&state.metrics),
            Some(config.sglang.namespace.clone()),
        );
        transport::sglang_server(
            config.server.max_concurrent_streams,
            state.conns.settings(),
            self.guard.clone(),
        )
        .add_routes(self.health.clone())
        .add_service(Limited::new(
            StorageServerServer::new(sglang)
                .max_decoding_message_size(max_msg)
                .max_encoding_message_size(max_msg),
            Arc::clone(&state.limiter),
        ))
    }
}

/// Binds every configured listener (TCP, Unix socket, mempool, KV region,
/// SGLang) and runs its server as a task of `tasks`.
async fn start_listeners(
    config: &Config,
    tls: Option<ServerTlsConfig>,
    state: &DaemonState,
    services: &GrpcServices,
    tasks: &mut DaemonTasks,
) -> Result<BoundAddrs, DaemonError> {
    let mut addrs = BoundAddrs {
        tcp: None,
        uds: None,
        metrics: None,
        mempool: None,
        sglang: None,
        kv_region: None,
    };
    check_open_file_limit(config);
    if !config.server.tcp_addr.is_empty() {
        let (listener, bound) = transport::bind_tcp(&config.server.tcp_addr).await?;
        addrs.tcp = Some(bound);
        let incoming = Incoming::new(
            TcpAccept(listener),
            ConnListener::Tcp,
            Arc::clone(&state.conns),
            tls.is_some(),
        );
        let token = state.shutdown.clone();
        let r = services.kv_cache_router(config, state, Transport::Tcp, tls)?;
        tasks.spawn(async move {
            r.serve_with_incoming_shutdown(incoming, token.cancelled_owned())
                .await
                .map_err(|e| DaemonError::Task(format!("tcp listener: {e}")))
        });
    }
    if !config.server.uds_path.is_empty() {
        let path = PathBuf::from(&config.server.uds_path);
        let listener = transport::bind_unix(&path).await?;
        addrs.uds = Some(path.clone());
        let incoming = Incoming::new(
            UnixAccept {
                listener,
                auth: None,
            },
            ConnListener::Unix,
            Arc::clone(&state.conns),
            false,
        );
        let token = state.shutdown.clone();
        let r = services.kv_cache_router(config, state, Transport::Unix, None)?;
        spawn_unix_server(tasks, path, "unix listener", async move {
            r.serve_with_incoming_shutdown(incoming, token.cancelled_owned())
                .await
        });
    }
    if !config.shm.mempool_socket.is_empty() {
        let path = PathBuf::from(socket_path(&config.shm.mempool_socket));
        let listener = transport::bind_unix(&path).await?;
        addrs.mempool = Some(path.clone());
        let token = state.shutdown.clone();
        let registry = Arc::clone(&state.pools);
        let a = Arc::clone(&state.auth);
        spawn_unix_server(
            tasks,
            path,
            "mempool socket",
            mempool::serve(listener, registry, token, Some(a)),
        );
    }
    if !config.gpu.region_socket.is_empty() {
        let path = PathBuf::from(socket_path(&config.gpu.region_socket));
        let listener = transport::bind_unix(&path).await?;
        addrs.kv_region = Some(path.clone());
        let token = state.shutdown.clone();
        let registry = Arc::clone(&state.regions);
        let a = Arc::clone(&state.auth);
        let calls = region::RegionCalls {
            handler: Arc::new(services.kv_cache.clone()),
            request_timeout: Duration::from_millis(config.server.request_timeout_ms),
        };
        spawn_unix_server(
            tasks,
            path,
            "region socket",
            region::serve(listener, registry, token, Some(a), Some(calls)),
        );
    }
    if !config.sglang.socket.is_empty() {
        let path = PathBuf::from(socket_path(&config.sglang.socket));
        let listener = transport::bind_unix(&path).await?;
        addrs.sglang = Some(path.clone());
        let server = services.sglang_router(config, state);
        // Peers whose uid is not allowed are closed at accept time.
        let incoming = Incoming::new(
            UnixAccept {
                listener,
                auth: Some((Arc::clone(&state.auth), "sglang")),
            },
            ConnListener::Sglang,
            Arc::clone(&state.conns),
            false,
        );
        let token = state.shutdown.clone();
        spawn_unix_server(tasks, path, "sglang socket", async move {
            server
                .serve_with_incoming_shutdown(incoming, token.cancelled_owned())
                .await
        });
    }
    Ok(addrs)
}

/// Raises the open-file limit to its hard limit and warns when
/// `server.max_connections` is not far enough below it for the connection
/// limit to be the one that bites.
fn check_open_file_limit(config: &Config) {
    let Some(nofile) = transport::listeners::raise_open_file_limit() else {
        return;
    };
    let max = config.server.max_connections as u64;
    if max.saturating_add(256) > nofile {
        tracing::warn!(
            max_connections = max,
            open_file_limit = nofile,
            "server.max_connections is close to or above the open-file limit (RLIMIT_NOFILE): connections beyond the file limit fail at accept (kvstrata_connection_accept_errors_total); lower server.max_connections or raise the limit (LimitNOFILE)"
        );
    }
}

/// The daemon's tasks: each listener's server and the background loops.
type DaemonTasks = JoinSet<Result<(), DaemonError>>;

/// Runs the server of the Unix socket at `path` as a task; the socket file is
/// removed when it stops. A failure is reported as `what: error`.
fn spawn_unix_server<E: std::fmt::Display>(
    tasks: &mut DaemonTasks,
    path: PathBuf,
    what: &'static str,
    server: impl Future<Output = Result<(), E>> + Send + 'static,
) {
    tasks.spawn(async move {
        let res = server
            .await
            .map_err(|e| DaemonError::Task(format!("{what}: {e}")));
        let _ = std::fs::remove_file(&path);
        res
    });
}

/// Serves `/metrics` on `server.metrics_addr` (off when empty).
async fn serve_metrics(
    config: &Config,
    state: &DaemonState,
    tasks: &mut DaemonTasks,
) -> Result<Option<SocketAddr>, DaemonError> {
    if config.server.metrics_addr.is_empty() {
        return Ok(None);
    }
    let (listener, bound) = metrics::bind(&config.server.metrics_addr)
        .await
        .map_err(|source| DaemonError::Listen {
            what: format!("metrics {}", config.server.metrics_addr),
            source,
        })?;
    let token = state.shutdown.clone();
    let m = Arc::clone(&state.metrics);
    let auth = config
        .auth
        .metrics_require_token
        .then(|| Arc::clone(&state.auth));
    if auth.is_none() && !crate::auth::is_loopback(&bound.to_string()) {
        tracing::info!(metrics = %bound, "/metrics is reachable from other hosts and takes no token (auth.metrics_require_token is off)");
    }
    tasks.spawn(async move {
        metrics::serve(listener, m, auth, token)
            .await
            .map_err(DaemonError::Io)
    });
    Ok(Some(bound))
}

/// Ends expired leases every [`LEASE_REAP_PERIOD`], and every
/// [`UPKEEP_PERIOD`] runs the cache's upkeep on the blocking pool.
fn spawn_lease_reaper(state: &DaemonState, tasks: &mut DaemonTasks) {
    let token = state.shutdown.clone();
    let c = Arc::clone(&state.cache);
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(LEASE_REAP_PERIOD);
        let mut last_upkeep = std::time::Instant::now();
        loop {
            tokio::select! {
                _ = token.cancelled() => return Ok(()),
                _ = tick.tick() => {
                    let n = c.expire_leases();
                    if n > 0 {
                        tracing::debug!(expired = n, "leases expired");
                    }
                    if last_upkeep.elapsed() >= UPKEEP_PERIOD {
                        last_upkeep = std::time::Instant::now();
                        let c = Arc::clone(&c);
                        let _ = tokio::task::spawn_blocking(move || c.maintain()).await;
                    }
                }
            }
        }
    });
}

/// Health turns NOT_SERVING as soon as shutdown starts.
fn spawn_health_on_shutdown(
    state: &DaemonState,
    reporter: HealthReporter,
    tasks: &mut DaemonTasks,
) {
    let token = state.shutdown.clone();
    tasks.spawn(async move {
        token.cancelled().await;
        reporter
            .set_not_serving::<KvCacheServer<KvCacheService>>()
            .await;
        reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        Ok(())
    });
}

/// The start-up line: where the daemon listens and what it holds.
fn log_serving(addrs: &BoundAddrs, state: &DaemonState) {
    let stats = state.cache.stats();
    let capacity = |kind: TierKind| {
        stats
            .tiers
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, t)| t.capacity_bytes)
    };
    tracing::info!(
        tcp = ?addrs.tcp,
        uds = ?addrs.uds,
        metrics = ?addrs.metrics,
        mempool = ?addrs.mempool,
        sglang = ?addrs.sglang,
        kv_region = ?addrs.kv_region,
        gpus = state.gpu_set.devices.len(),
        hbm_capacity_per_device = capacity(TierKind::Hbm).unwrap_or(0),
        host_pinned = stats.host_pinned,
        host_capacity = capacity(TierKind::Host).unwrap_or(0),
        disk_capacity = capacity(TierKind::Disk).unwrap_or(0),
        disk_engine = stats.disk.as_ref().map(|d| d.engine).unwrap_or("none"),
        disk_blocks = stats.disk.as_ref().map(|d| d.tier.blocks).unwrap_or(0),
        "kvstrata serving"
    );
}

/// Opens the configured GPUs. `off`: none. `auto`: those present; no CUDA
/// library or no device is logged once and the daemon runs without. `on`:
/// every configured device must open, else a start-up error.
pub fn detect_gpus(config: &GpuConfig) -> Result<GpuSet, DaemonError> {
    let mode = config.enabled;
    let hbm_bytes = config.hbm_bytes.as_u64();
    if mode == GpuMode::Off {
        tracing::info!("GPU disabled (gpu.enabled = off): running with host and disk tiers only");
        return Ok(GpuSet {
            devices: Vec::new(),
            status: "disabled: gpu.enabled = off".into(),
            hbm_bytes,
        });
    }
    if mode == GpuMode::Cpu {
        tracing::info!(
            hbm_tier_bytes = hbm_bytes,
            "gpu.enabled = cpu: the CPU backend stands in for one GPU (HBM tier in host memory)"
        );
        return Ok(GpuSet {
            devices: vec![kvstrata_kernels::Gpu::cpu()],
            status: "cpu backend (gpu.enabled = cpu)".into(),
            hbm_bytes,
        });
    }
    let mut devices = Vec::new();
    let mut absent: Vec<String> = Vec::new();
    for &ordinal in &config.devices {
        match kvstrata_kernels::Gpu::cuda(ordinal as usize) {
            Ok(gpu) => {
                let i = gpu.info();
                tracing::info!(
                    device = i.ordinal,
                    name = %i.name,
                    compute_capability = format!("{}.{}", i.compute_capability.0, i.compute_capability.1),
                    memory = %bytesize::ByteSize::b(i.total_bytes),
                    multiprocessors = i.multiprocessors,
                    hbm_tier_bytes = hbm_bytes,
                    "GPU found"
                );
                devices.push(gpu);
            }
            Err(e) if mode == GpuMode::On => {
                return Err(DaemonError::Config(format!(
                    "gpu.enabled = \"on\", but CUDA device {ordinal} cannot be used: {e} \
                     (set gpu.enabled = \"auto\" or --gpu auto to run without a GPU)"
                )));
            }
            Err(e) if e.is_absent() => absent.push(e.to_string()),
            Err(e) => {
                tracing::warn!(device = ordinal, error = %e, "GPU present but unusable; running without it");
                absent.push(format!("device {ordinal}: {e}"));
            }
        }
    }
    absent.dedup();
    let status = if devices.is_empty() {
        let why = if absent.is_empty() {
            "gpu.devices is empty".to_string()
        } else {
            absent.join("; ")
        };
        tracing::info!(reason = %why, "no GPU: running with host and disk tiers only");
        format!("no GPU: {why}")
    } else {
        if !absent.is_empty() {
            tracing::warn!(missing = %absent.join("; "), "some configured GPUs are missing");
        }
        String::new()
    };
    Ok(GpuSet {
        devices,
        status,
        hbm_bytes,
    })
}

/// The auth state of `config`: tokens loaded, namespace owners read (kept
/// beside the disk tier's index when there is one, so they survive restarts).
fn start_auth(config: &Config) -> Result<Auth, DaemonError> {
    let owners = match config.disk.tier_config()? {
        Some(disk) => {
            let mut file = disk.index_dir.into_os_string();
            file.push(".owners.json");
            Owners::persisted(PathBuf::from(file))
                .map_err(|e| DaemonError::Config(e.to_string()))?
        }
        None => Owners::in_memory(),
    };
    let token_file =
        (!config.auth.token_file.is_empty()).then(|| PathBuf::from(&config.auth.token_file));
    let auth = Auth::new(token_file, config.auth.uid_allow.clone(), Arc::new(owners))
        .map_err(|e| DaemonError::Config(e.to_string()))?;
    if !config.server.tcp_addr.is_empty() && !auth.tokens_required() {
        if crate::auth::is_loopback(&config.server.tcp_addr) {
            tracing::info!(tcp = %config.server.tcp_addr, "no auth.token_file: the loopback TCP listener takes no token");
        } else {
            tracing::warn!(tcp = %config.server.tcp_addr, "auth.insecure: TCP listener reachable from other hosts WITHOUT authentication");
        }
    }
    Ok(auth)
}

/// The TLS settings of the TCP listener, when `tls.cert` is set.
fn server_tls(config: &Config) -> Result<Option<ServerTlsConfig>, DaemonError> {
    let t = &config.tls;
    if t.cert.is_empty() {
        return Ok(None);
    }
    let read = |key: &str, path: &str| {
        std::fs::read(path)
            .map_err(|e| DaemonError::Config(format!("{key}: cannot read {path}: {e}")))
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
        read("tls.cert", &t.cert)?,
        read("tls.key", &t.key)?,
    ));
    if !t.client_ca.is_empty() {
        tls = tls.client_ca_root(Certificate::from_pem(read("tls.client_ca", &t.client_ca)?));
    }
    Ok(Some(tls))
}

fn flatten(r: Result<Result<(), DaemonError>, tokio::task::JoinError>) -> Option<DaemonError> {
    match r {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(e) => Some(DaemonError::Task(e.to_string())),
    }
}
