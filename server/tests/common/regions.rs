//! Test support for the KV-region tests (regions.rs, regions_direct.rs): a
//! daemon with a region socket, memfd regions registered by the real client,
//! the two test geometries, and memfd helpers.
#![allow(dead_code)]

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvstrata_client::region::{KvRegionError, register_raw};
use kvstrata_client::{Client, KvRegion};
use kvstrata_kernels::{PageLayout, PagedGeometry};
use kvstrata_proto::v1 as pb;
use kvstrata_server::{Config, Daemon};
use kvstrata_tiers::{Dtype, NamespaceId, NamespaceSpec};

pub struct Running {
    pub daemon: Daemon,
    pub client: Client,
    pub socket: PathBuf,
    pub _dir: tempfile::TempDir,
}

pub fn region_config(dir: &Path) -> Config {
    let mut c = crate::common::config(dir, 64 << 20, 4096);
    c.gpu.region_socket = dir.join("regions.sock").display().to_string();
    c
}

pub async fn start_with(f: impl FnOnce(&mut Config)) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = region_config(dir.path());
    f(&mut config);
    let daemon = Daemon::start(config).await.expect("daemon starts");
    let client = Client::connect(&daemon.addrs().uds_target().expect("uds"))
        .await
        .expect("connect");
    let socket = daemon.addrs().kv_region.clone().expect("region socket");
    Running {
        daemon,
        client,
        socket,
        _dir: dir,
    }
}

pub async fn start() -> Running {
    start_with(|_| {}).await
}

impl Running {
    pub fn socket(&self) -> &str {
        self.socket.to_str().expect("utf-8 path")
    }

    /// Registers a memfd region (a blocking call: the daemon runs on the
    /// other workers meanwhile).
    pub fn region(&self, name: &str, g: PagedGeometry) -> KvRegion {
        self.try_region(name, g).expect("region registers")
    }

    pub fn try_region(&self, name: &str, g: PagedGeometry) -> Result<KvRegion, KvRegionError> {
        tokio::task::block_in_place(|| KvRegion::create_memfd(self.socket(), name, g))
    }

    /// Sends a hand-made preamble (with `fd` attached) and returns the answer.
    pub fn raw(
        &self,
        preamble: &[u8],
        fd: Option<&File>,
    ) -> (UnixStream, Result<u64, KvRegionError>) {
        tokio::task::block_in_place(|| {
            let conn = UnixStream::connect(&self.socket).expect("connect");
            let r = register_raw(&conn, preamble, fd, "raw", self.socket());
            (conn, r)
        })
    }

    pub async fn stats(&self) -> pb::StatsResponse {
        self.client.stats().await.expect("stats")
    }

    pub async fn wait_regions(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.stats().await;
            if s.kv_regions.len() == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "daemon still holds {} regions, expected {n}",
                s.kv_regions.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        crate::common::metrics_text(&self.daemon).await
    }

    pub async fn stop(self) {
        self.daemon.shutdown().await.expect("clean shutdown");
    }
}

/// Per-layer, odd sizes, padded layer stride: blocks of 2 pages of 3 tokens.
pub fn per_layer() -> PagedGeometry {
    let mut g = PagedGeometry {
        layout: PageLayout::PerLayer,
        layers: 3,
        page_tokens: 3,
        kv_heads: 2,
        head_dim: 5,
        dtype_bytes: 2,
        num_pages: 13,
        layer_stride: 0,
        page_stride: 0,
        kv_stride: 0,
    };
    g.layer_stride = g.num_pages as u64 * g.page_stride() + 37;
    g
}

/// Per-layer in vLLM's `(2, num_pages, page_tokens, heads, dim)` tensors (K
/// of every page, then V of every page), padded pages and layers, odd sizes.
pub fn k_then_v() -> PagedGeometry {
    let mut g = PagedGeometry::packed(PageLayout::PerLayer, 3, 3, 2, 5, 2, 13);
    g.page_stride = g.chunk_bytes() + 6;
    g.kv_stride = g.num_pages as u64 * g.page_stride + 10;
    g.layer_stride = 2 * g.kv_stride + 22;
    g
}

/// Cross-layer, odd sizes, 1-byte elements: blocks of 1 page of 5 tokens.
pub fn cross_layer() -> PagedGeometry {
    PagedGeometry {
        layout: PageLayout::CrossLayer,
        layers: 2,
        page_tokens: 5,
        kv_heads: 3,
        head_dim: 7,
        dtype_bytes: 1,
        num_pages: 11,
        layer_stride: 0,
        page_stride: 0,
        kv_stride: 0,
    }
}

/// A namespace whose blocks are `ppb` pages of `g`.
pub fn spec_for(model: &str, g: &PagedGeometry, ppb: u32) -> NamespaceSpec {
    let dtype = match g.dtype_bytes {
        1 => Dtype::Int8,
        2 => Dtype::F16,
        _ => Dtype::F32,
    };
    NamespaceSpec::layer_major(
        model,
        g.layers,
        g.kv_heads,
        g.head_dim,
        dtype,
        ppb * g.page_tokens,
    )
}

pub async fn ns_for(c: &Client, model: &str, g: &PagedGeometry, ppb: u32) -> (NamespaceId, usize) {
    let r = c
        .register_namespace(&spec_for(model, g, ppb))
        .await
        .expect("register namespace");
    assert_eq!(r.block_bytes, g.block_bytes(ppb));
    (r.id, r.block_bytes as usize)
}

pub fn key(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// How many fds of this process point at memfds named `name`.
pub fn memfd_fds(name: &str) -> usize {
    let needle = format!("/memfd:{name} ");
    std::fs::read_dir("/proc/self/fd")
        .expect("fd dir")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|p| {
            let s = p.display().to_string();
            s.starts_with(&needle) || s == format!("/memfd:{name}")
        })
        .count()
}

pub fn memfd_file(name: &str, len: u64) -> File {
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC).expect("memfd");
    let f = File::from(fd);
    f.set_len(len).expect("size");
    f
}
