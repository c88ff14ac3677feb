//! The two-process CUDA IPC check of `kvstrata gpu-check`: this process plays
//! the engine, a `kvstrata serve` child process (the same binary) is the
//! daemon.
//!
//! The engine allocates its paged KV region with `cuMemAlloc`, exports it
//! with `cuIpcGetMemHandle`, registers it on the daemon's KV-region socket,
//! then [`check_pages_round_trip`] fills it with random bytes, has the daemon
//! gather blocks out of its pages (BatchPut by page ids), reads them back
//! inline against the CPU gather reference, has the daemon scatter them into
//! other pages (BatchGet into pages) and compares the whole region with the
//! CPU scatter reference. Then the engine disconnects and the daemon must
//! report no region left.
//!
//! The daemon is the running executable started as `serve` (the `kvstrata`
//! binary that runs `gpu-check`), so this crate needs no dependency on the
//! daemon's crate.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvstrata_client::{Client, KvRegion};
use kvstrata_kernels::{Backend, Gpu, PageLayout, PagedGeometry};

use crate::pages::{DeviceBytes, check_pages_round_trip};
use crate::report::{CheckRow, check};

/// A `kvstrata serve` child process (the running executable) on private
/// sockets in a temporary directory, killed on drop. The engine checks and
/// `kvstrata bench ttft --device cuda` use it too: a CUDA IPC handle cannot
/// be opened in the process that exported it, so the daemon of a GPU engine
/// is another process.
pub struct DaemonChild {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for DaemonChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Diagnostics: `KVSTRATA_DAEMON_LOG_KEEP=<dir>` keeps each child's
        // log there (`daemon-<pid>.log`) when it ends.
        if let Some(keep) = std::env::var_os("KVSTRATA_DAEMON_LOG_KEEP") {
            let to = Path::new(&keep).join(format!("daemon-{}.log", self.child.id()));
            let _ = std::fs::copy(self.dir.path().join("daemon.log"), to);
        }
    }
}

/// `args` with `--log-level` set from `KVSTRATA_DAEMON_LOG_LEVEL` when that
/// is set (diagnostics: e.g. `warn,kvstrata_server::region=debug`).
fn with_log_level(args: &[String]) -> Vec<String> {
    let mut args = args.to_vec();
    let Ok(level) = std::env::var("KVSTRATA_DAEMON_LOG_LEVEL") else {
        return args;
    };
    match args.iter().position(|a| a == "--log-level") {
        Some(i) if i + 1 < args.len() => args[i + 1] = level,
        _ => args.extend(["--log-level".to_string(), level]),
    }
    args
}

impl DaemonChild {
    /// The gRPC Unix socket.
    pub fn uds(&self) -> PathBuf {
        self.dir.path().join("kvstrata.sock")
    }

    /// The KV-region socket.
    pub fn regions(&self) -> PathBuf {
        self.dir.path().join("regions.sock")
    }

    /// The mempool socket.
    pub fn mempool(&self) -> PathBuf {
        self.dir.path().join("mempool.sock")
    }

    /// The directory of the sockets and the log (also for a disk tier).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last lines of the daemon's log, on one line.
    pub fn log_tail(&self) -> String {
        daemon_log(self.dir.path())
    }

    /// Starts `kvstrata serve` with its gRPC, region and mempool sockets in a
    /// fresh temporary directory, no TCP or metrics listener, and `args`
    /// (e.g. `--gpu on --gpu-hbm-bytes 2GiB`); waits until it is ready.
    pub fn start(args: &[String]) -> Result<DaemonChild, String> {
        let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let ready = dir.path().join("ready.json");
        let log =
            std::fs::File::create(dir.path().join("daemon.log")).map_err(|e| e.to_string())?;
        let mut command = Command::new(exe);
        // `RUST_LOG` would override the child's `--log-level` (a bench run
        // with `RUST_LOG` for its own logs): the diagnostic level wins.
        if let Ok(level) = std::env::var("KVSTRATA_DAEMON_LOG_LEVEL") {
            command.env("RUST_LOG", level);
        }
        let child = command
            .arg("serve")
            .args(["--tcp-addr", ""])
            .args(["--metrics-addr", ""])
            .arg("--uds-path")
            .arg(dir.path().join("kvstrata.sock"))
            .arg("--kv-region-socket")
            .arg(dir.path().join("regions.sock"))
            .arg("--mempool-socket")
            .arg(dir.path().join("mempool.sock"))
            .args(with_log_level(args))
            .arg("--ready-file")
            .arg(&ready)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting the daemon: {e}"))?;
        let mut daemon = DaemonChild { child, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready.exists() {
            let exited = matches!(daemon.child.try_wait(), Ok(Some(_)));
            if exited || Instant::now() > deadline {
                return Err(format!(
                    "the daemon did not start: {}",
                    daemon_log(daemon.dir.path())
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(daemon)
    }
}

fn start_daemon(gpu: &Gpu) -> Result<DaemonChild, String> {
    let ordinal = gpu.info().ordinal.to_string();
    let args: Vec<String> = [
        "--gpu",
        "on",
        "--gpu-device",
        &ordinal,
        "--gpu-hbm-bytes",
        "2GiB",
        "--host-capacity",
        "2GiB",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    DaemonChild::start(&args)
}

fn daemon_log(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(5).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// One engine region: allocate, export, register, round-trip, check the
/// tiers the blocks landed in; returns a one-line summary.
async fn engine_round_trip(
    gpu: &Gpu,
    daemon: &DaemonChild,
    layout: PageLayout,
    page_tokens: u32,
    seed: u64,
) -> Result<String, String> {
    let client = Client::connect(&format!("unix://{}", daemon.uds().display()))
        .await
        .map_err(|e| e.to_string())?;
    let geometry = PagedGeometry {
        layout,
        layers: 30,
        page_tokens,
        kv_heads: 3,
        head_dim: 64,
        dtype_bytes: 2,
        num_pages: 4096 / page_tokens.max(1) * 4,
        layer_stride: 0,
        page_stride: 0,
        kv_stride: 0,
    };
    let bytes = geometry.region_bytes() as usize;
    let buffer = gpu.alloc_device(bytes).map_err(|e| e.to_string())?;
    let handle = gpu.ipc_handle(&buffer).map_err(|e| e.to_string())?;
    let socket = daemon.regions();
    let name = format!("gpu-check-{}", layout.name());
    let ordinal = gpu.info().ordinal as u32;
    // A short blocking exchange on a Unix socket (this runs on a blocking
    // thread of its own, not on an async worker).
    let mut region = KvRegion::register_cuda_ipc(
        socket.to_str().unwrap_or_default(),
        &name,
        handle.0,
        ordinal,
        bytes as u64,
        geometry,
    )
    .map_err(|e| format!("registering the CUDA IPC region: {e}"))?;
    let mut memory = DeviceBytes::new(gpu, &buffer);
    let ppb = 32 / page_tokens;
    let report = check_pages_round_trip(&client, &mut region, Some(&mut memory), ppb, 64, seed)
        .await
        .map_err(|e| e.to_string())?;
    let stats = client.stats().await.map_err(|e| e.to_string())?;
    let regions_live = stats.kv_regions.len();
    drop(region);
    // The registration ends with the connection: the daemon must let go.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = client.stats().await.map_err(|e| e.to_string())?;
        if s.kv_regions.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} region(s) still registered after the engine disconnected",
                s.kv_regions.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gbps =
        |d: Duration| (report.blocks as u64 * report.block_bytes) as f64 / d.as_secs_f64() / 1e9;
    Ok(format!(
        "{} blocks of {} B: put by pages {:.2} GB/s, get into pages {:.2} GB/s (gRPC round trips); \
         {regions_live} region live during, 0 after disconnect; {} of {} blocks put by pages read back from HBM; \
         a get answered when queued: {}",
        report.blocks,
        report.block_bytes,
        gbps(report.put),
        gbps(report.get),
        report.read_back_from_hbm,
        report.blocks,
        match report.waited_on_event {
            true => "byte-exact after waiting on the daemon's event",
            false => "byte-exact, answered after the copies (no event)",
        },
    ))
}

/// Runs the two-process CUDA IPC checks (CUDA only; on the CPU backend the
/// KV-region path is tested by the daemon's `regions` integration tests).
pub fn ipc_checks(gpu: &Gpu, rows: &mut Vec<CheckRow>, rt: &tokio::runtime::Handle) {
    if gpu.backend() != Backend::Cuda {
        return;
    }
    let daemon = match start_daemon(gpu) {
        Ok(d) => d,
        Err(e) => {
            check(rows, "cuda ipc: daemon child process started", || Err(e));
            return;
        }
    };
    for (layout, page_tokens) in [
        (PageLayout::PerLayer, 16),
        (PageLayout::CrossLayer, 16),
        (PageLayout::PerLayer, 1),
    ] {
        let name = format!(
            "cuda ipc, 2 processes: {} pages of {page_tokens} tokens, put/get by page ids",
            layout.name()
        );
        check(rows, name, || {
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7);
            let r = rt.block_on(engine_round_trip(gpu, &daemon, layout, page_tokens, seed));
            r.map_err(|e| format!("{e}; daemon log: {}", daemon_log(daemon.dir.path())))
        });
    }
}
