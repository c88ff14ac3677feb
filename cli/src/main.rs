//! `kvstrata`: the daemon (`serve`), the load generator (`bench`) and the
//! client verbs (`stats`, `ls`, `put`, `get`, ...), in one binary.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kvstrata_cli::client_verbs::{ClientCommand, GlobalArgs};
use kvstrata_server::{Config, Daemon, ServeArgs};
use tracing_subscriber::EnvFilter;

/// kvstrata: a hierarchical KV-cache store for LLM inference.
#[derive(Debug, Parser)]
#[command(
    name = "kvstrata",
    version,
    about = "kvstrata: a hierarchical KV-cache store for LLM inference",
    propagate_version = true
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (gRPC on TCP and a Unix socket, Prometheus metrics)
    Serve(Box<ServeArgs>),
    /// Load generator: ops/s, GB/s and latency percentiles against a running daemon
    /// (`bench ttft`: time to first token with and without cached KV)
    Bench(Box<BenchCommand>),
    /// Disk-tier throughput in-process (write, then cold reads), for comparison with fio
    #[command(name = "bench-disk")]
    BenchDisk(kvstrata_benches::DiskBenchArgs),
    /// Remote-tier (Redis Cluster) throughput and latency vs the same cluster used directly
    #[command(name = "bench-remote")]
    BenchRemote(kvstrata_benches::RemoteBenchArgs),
    /// Prefill a prompt with the built-in engine: reuse cached KV, store the new blocks,
    /// write a hand-off for `kvstrata decode`
    Prefill(Box<kvstrata_cli::engine_verbs::PrefillArgs>),
    /// Decode from a prefill's hand-off: load its KV from kvstrata, generate, stream text
    Decode(Box<kvstrata_cli::engine_verbs::DecodeArgs>),
    /// Interactive multi-turn chat through the prefill and decode engines
    Chat(Box<kvstrata_cli::engine_verbs::ChatArgs>),
    /// Multi-turn RAG through an in-process daemon: TTFT with the cache vs a full recompute
    Demo(Box<kvstrata_cli::demo::DemoArgs>),
    /// Cache-aware routing: follow several daemons' Watch streams and pick the node
    /// with the best tier-weighted cached prefix, minus load (`--serve`: over HTTP)
    Route(Box<kvstrata_router::RouteArgs>),
    /// GPU checks and benchmarks (kernels vs their CPU references, HBM tier, CUDA IPC,
    /// copy ceilings): what `scripts/gpu-check.sh` runs on a GPU machine
    #[command(name = "gpu-check")]
    GpuCheck(kvstrata_gpucheck::GpuCheckArgs),
    #[command(flatten)]
    Client(ClientCommand),
}

/// `kvstrata bench`: the load generator, or a benchmark named by a subcommand.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct BenchCommand {
    #[command(subcommand)]
    which: Option<BenchWhich>,
    #[command(flatten)]
    load: kvstrata_benches::BenchArgs,
}

#[derive(Debug, Subcommand)]
enum BenchWhich {
    /// Time to first token for 512..4k-token contexts, 0/50/100% cached, host and disk tier
    Ttft(Box<kvstrata_cli::ttft::TtftArgs>),
    /// GPU decode step times quiet vs while another engine's KV is stored into the daemon
    Interference(Box<kvstrata_cli::interference::InterferenceArgs>),
    /// The loopback socket ceiling: GB/s that TCP or a Unix socket carries here
    /// with no protocol and no work per byte (the bound for any server's GET)
    Socket(Box<kvstrata_benches::SocketBenchArgs>),
}

fn init_logging(format: &str, level: &str) {
    // The redis crate logs every failed reconnect attempt to a dead cluster node
    // (many per second); the remote tier counts and reports those itself
    // (`kvstrata stats`, kvstrata_remote_* metrics), so it is quiet unless asked for.
    let level = if level.contains("redis") {
        level.to_string()
    } else {
        format!("{level},redis=off")
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// The signals `serve` acts on, caught from its first moment: SIGTERM and
/// SIGINT stop the daemon (one that arrives during start-up stops it as soon
/// as start-up completes, cleanly), SIGHUP reloads the token file.
struct Signals {
    /// SIGHUPs (one that came during start-up is seen once started).
    hup: tokio::signal::unix::Signal,
    /// The name of the first stop signal, once one arrived.
    stop: tokio::sync::watch::Receiver<Option<&'static str>>,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
        let hup = signal(SignalKind::hangup()).context("listening for SIGHUP")?;
        // Handled from here on: let in what main() held back (a signal
        // that came meanwhile is delivered now).
        set_stop_signals_blocked(false);
        let (stop_tx, stop) = tokio::sync::watch::channel(None);
        tokio::spawn(async move {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            let _ = stop_tx.send(Some(name));
        });
        Ok(Signals { hup, stop })
    }
}

/// Blocks (or unblocks) SIGTERM, SIGINT and SIGHUP for the calling thread
/// and the threads it starts afterwards.
fn set_stop_signals_blocked(blocked: bool) {
    // SAFETY: sigemptyset/sigaddset fill a local set; pthread_sigmask only
    // changes this thread's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        let how = if blocked {
            libc::SIG_BLOCK
        } else {
            libc::SIG_UNBLOCK
        };
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // First of all, so that no moment of start-up is left to a signal's
    // default action (death, with the Unix socket left behind).
    let Signals { mut hup, stop } = Signals::install()?;
    let config = Config::load(&args)?;
    if args.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    init_logging(config.log.format.as_str(), &config.log.level);
    let daemon = Daemon::start(config).await?;
    let stopped_early = *stop.borrow();
    if let Some(name) = stopped_early {
        tracing::info!("{name} during start-up: shutting down");
        daemon.shutdown().await?;
        return Ok(());
    }
    if let Some(path) = &args.ready_file {
        let json = serde_json::to_string(daemon.addrs())?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, json).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    }
    // SIGHUP re-reads auth.token_file (a bad file keeps the old tokens).
    let auth = std::sync::Arc::clone(daemon.auth());
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading auth tokens");
            let _ = auth.reload();
        }
    });
    let token = daemon.shutdown_token();
    let mut stop = stop;
    tokio::spawn(async move {
        if let Ok(name) = stop.wait_for(Option::is_some).await {
            tracing::info!("{}: shutting down", name.unwrap_or("signal"));
            token.cancel();
        }
    });
    daemon.run_until_stopped().await?;
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Bench(cmd) => match cmd.which {
            // In-process daemons on private Unix sockets: no token to send.
            Some(BenchWhich::Ttft(args)) => {
                // Logs only when asked for (stderr; `RUST_LOG=kvstrata_engine=debug`
                // shows each load's request times).
                if std::env::var_os("RUST_LOG").is_some() {
                    init_logging("text", "warn");
                }
                let json = args.json || cli.global.json;
                kvstrata_cli::ttft::run_ttft(*args, json).await
            }
            Some(BenchWhich::Interference(args)) => {
                let json = args.json || cli.global.json;
                kvstrata_cli::interference::run_interference(*args, json).await
            }
            // Blocking threads of its own: off the async workers.
            Some(BenchWhich::Socket(args)) => {
                let json = args.json || cli.global.json;
                tokio::task::spawn_blocking(move || {
                    kvstrata_benches::run_socket_and_print(&args, json)
                })
                .await??;
                Ok(())
            }
            None => {
                let mut load = cmd.load;
                let options = cli.global.client_options()?;
                if options.tls.is_some() {
                    anyhow::bail!(
                        "bench: TLS is not supported by the load generator (--tls-ca, --tls-cert); use an http:// or unix:// address"
                    );
                }
                load.token = options.token;
                kvstrata_benches::run_and_print(load).await?;
                Ok(())
            }
        },
        Command::Prefill(args) => {
            let options = cli.global.client_options()?;
            Ok(kvstrata_cli::engine_verbs::run_prefill(
                *args,
                &cli.global.addr,
                options,
                cli.global.json,
            )
            .await?)
        }
        Command::Decode(args) => {
            let options = cli.global.client_options()?;
            Ok(kvstrata_cli::engine_verbs::run_decode(
                *args,
                &cli.global.addr,
                options,
                cli.global.json,
            )
            .await?)
        }
        Command::Chat(args) => {
            let options = cli.global.client_options()?;
            Ok(kvstrata_cli::engine_verbs::run_chat(*args, &cli.global.addr, options).await?)
        }
        Command::Demo(args) => kvstrata_cli::demo::run_demo(*args, cli.global.json).await,
        Command::Route(args) => {
            let options = cli.global.client_options()?;
            kvstrata_cli::route::run(*args, options, cli.global.json).await
        }
        // The disk tier's calls block: run them off the async workers.
        Command::BenchDisk(args) => {
            tokio::task::spawn_blocking(move || kvstrata_benches::run_disk_and_print(&args))
                .await??;
            Ok(())
        }
        Command::BenchRemote(args) => {
            kvstrata_benches::run_remote_and_print(&args, cli.global.json).await?;
            Ok(())
        }
        // The CLI error already carries its cause in one line.
        Command::GpuCheck(args) => {
            // Logs only when asked for (stderr; `RUST_LOG=kvstrata_tiers=debug`
            // shows the timings of each batched T0<->T1 move).
            if std::env::var_os("RUST_LOG").is_some() {
                init_logging("text", "warn");
            }
            // The checks block (device work, a daemon child process): off the
            // async workers; the CUDA IPC check drives its client on this runtime.
            let rt = tokio::runtime::Handle::current();
            let report =
                tokio::task::spawn_blocking(move || kvstrata_gpucheck::run(&args, &rt)).await??;
            report.print();
            if !report.passed() {
                anyhow::bail!("gpu-check: some checks failed");
            }
            Ok(())
        }
        Command::Client(cmd) => kvstrata_cli::client_verbs::run(cmd, &cli.global)
            .await
            .map_err(|e| anyhow::anyhow!("{e}")),
    }
}

/// mimalloc instead of glibc's malloc: a request allocates per key on one
/// thread (its decode, on an async worker) and frees on another (the
/// blocking pool), where glibc's arenas take their slow paths. A 512-key
/// KV-region get by the Rust client costs about a tenth less (see
/// docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Serve(_)) {
        // Until serve() has its handlers in place, a stop signal waits
        // (blocked) instead of killing the daemon half started; the
        // runtime's threads inherit the mask, serve() lifts it.
        set_stop_signals_blocked(true);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and those causes it does not already spell out.
            let mut msg = String::new();
            for cause in e.chain() {
                let text = cause.to_string();
                if !msg.contains(&text) {
                    if !msg.is_empty() {
                        msg.push_str(": ");
                    }
                    msg.push_str(&text);
                }
            }
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}
