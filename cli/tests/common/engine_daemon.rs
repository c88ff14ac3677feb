//! Shared by the engine tests (engine.rs, engine_device.rs): the default
//! model, fetched on first use, and a real daemon with a mempool socket.
#![allow(dead_code)]

use std::path::PathBuf;

use kvstrata_client::Client;
use kvstrata_engine::fetch;
use kvstrata_server::{Config, Daemon};

/// The default model's GGUF (fetched on first use; a failed fetch fails the
/// test, it never skips it).
pub fn model_path() -> PathBuf {
    fetch::ensure_default_model(&fetch::default_model_dir(), false)
        .expect("the default model must be fetchable (network) or present")
}

pub struct Running {
    pub daemon: Daemon,
    pub client: Client,
    pub target: String,
    pub mempool: String,
    pub dir: tempfile::TempDir,
}

/// A daemon (256 MiB host tier, 4 MiB segments) with a mempool socket, and
/// a client connected to it.
pub async fn start_daemon() -> Running {
    start_daemon_with_max_batch(4096).await
}

/// [`start_daemon`] with another `server.max_batch`.
pub async fn start_daemon_with_max_batch(max_batch: usize) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config: Config = crate::common::config(dir.path(), 256 << 20, max_batch);
    config.shm.mempool_socket = dir.path().join("mempool.sock").display().to_string();
    config.host.segment_bytes = bytesize::ByteSize::mib(4);
    let daemon = Daemon::start(config).await.expect("daemon starts");
    let target = daemon.addrs().uds_target().expect("uds");
    let client = Client::connect(&target).await.expect("connect");
    let mempool = daemon
        .addrs()
        .mempool
        .clone()
        .expect("mempool")
        .display()
        .to_string();
    Running {
        daemon,
        client,
        target,
        mempool,
        dir,
    }
}
