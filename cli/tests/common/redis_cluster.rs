//! Test support: a real Redis Cluster of `n` masters on loopback ports
//! (redis-server and redis-cli from the distribution's packages; `make deps`
//! installs them). Each node runs in its own temp dir; dropping the cluster
//! kills every node.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisCluster {
    pub ports: Vec<u16>,
    nodes: Vec<Option<Child>>,
    pub dir: tempfile::TempDir,
}

fn free_port_pair() -> u16 {
    // The cluster bus listens on port + 10000: both must be free.
    for _ in 0..200 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        drop(l);
        if port > 55000 {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair for a Redis node")
}

fn redis_cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn start_node(dir: &Path, port: u16) -> Child {
    let node_dir: PathBuf = dir.join(port.to_string());
    std::fs::create_dir_all(&node_dir).expect("node dir");
    Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "1000",
            "--cluster-require-full-coverage",
            "no",
            "--appendonly",
            "no",
            "--save",
            "",
            "--protected-mode",
            "no",
            "--maxmemory",
            "512mb",
            "--maxmemory-policy",
            "allkeys-lru",
            "--dir",
        ])
        .arg(&node_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server not found: install the redis-server package (make deps does it)")
}

/// Waits for a freshly spawned node to answer PING; `None` (and the process
/// reaped) if it exits or stays silent for 10 s.
fn up(port: u16, mut child: Child) -> Option<Child> {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if redis_cli(port, &["PING"]).is_some_and(|s| s.contains("PONG")) {
            return Some(child);
        }
        if child.try_wait().ok().flatten().is_some() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

impl RedisCluster {
    /// Starts `n` (≥ 3) masters, joins them with `redis-cli --cluster create`
    /// and waits until every node reports `cluster_state:ok`.
    pub fn start(n: usize) -> RedisCluster {
        assert!(n >= 3, "a Redis Cluster needs at least 3 masters");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ports = Vec::with_capacity(n);
        let mut nodes = Vec::with_capacity(n);
        for _ in 0..n {
            // Another test may take a free port between our probe and the
            // node's bind: then the node exits, and we try another port.
            let (port, child) = (0..5)
                .find_map(|_| {
                    let port = free_port_pair();
                    let child = start_node(dir.path(), port);
                    up(port, child).map(|c| (port, c))
                })
                .expect("no Redis node came up on 5 ports");
            ports.push(port);
            nodes.push(Some(child));
        }
        let cluster = RedisCluster { ports, nodes, dir };
        let addrs: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let status = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli not found: install the redis-tools package");
        assert!(status.success(), "redis-cli --cluster create failed");
        for &p in &cluster.ports {
            cluster.wait(
                || {
                    redis_cli(p, &["CLUSTER", "INFO"])
                        .is_some_and(|s| s.contains("cluster_state:ok"))
                },
                "cluster_state:ok",
            );
        }
        cluster
    }

    fn wait(&self, mut ok: impl FnMut() -> bool, what: &str) {
        let end = Instant::now() + Duration::from_secs(30);
        while !ok() {
            assert!(
                Instant::now() < end,
                "Redis cluster: timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `redis://127.0.0.1:PORT` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// Kills node `i` (SIGKILL); the others keep serving their slots.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts node `i` again on its port and directory (after [`RedisCluster::kill`]).
    /// It keeps its cluster identity and slots (nodes.conf), not its data; waits
    /// until every node reports `cluster_state:ok`.
    pub fn restart(&mut self, i: usize) {
        assert!(self.nodes[i].is_none(), "node {i} is running");
        let child = up(self.ports[i], start_node(self.dir.path(), self.ports[i]))
            .expect("restarted Redis node answers");
        self.nodes[i] = Some(child);
        for &p in &self.ports {
            self.wait(
                || {
                    redis_cli(p, &["CLUSTER", "INFO"])
                        .is_some_and(|s| s.contains("cluster_state:ok"))
                },
                "cluster_state:ok after a restart",
            );
        }
    }

    /// Runs a redis-cli command against node `i` (with `-c`, following redirects).
    pub fn cli(&self, i: usize, args: &[&str]) -> Option<String> {
        let mut full = vec!["-c"];
        full.extend_from_slice(args);
        redis_cli(self.ports[i], &full)
    }

    /// Index of the node serving `key`'s hash slot.
    pub fn node_of(&self, key: &str) -> usize {
        let slot: u16 = redis_cli(self.ports[0], &["CLUSTER", "KEYSLOT", key])
            .and_then(|s| s.trim().parse().ok())
            .expect("CLUSTER KEYSLOT");
        let nodes = redis_cli(self.ports[0], &["CLUSTER", "NODES"]).expect("CLUSTER NODES");
        // id ip:port@bus flags master ping pong epoch state slot-range...
        for line in nodes.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let Some(port) = f
                .get(1)
                .and_then(|a| a.split('@').next())
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse::<u16>().ok())
            else {
                continue;
            };
            for range in f.iter().skip(8) {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(lo), Ok(hi)) = (lo.parse::<u16>(), hi.parse::<u16>())
                    && (lo..=hi).contains(&slot)
                    && let Some(n) = self.ports.iter().position(|&p| p == port)
                {
                    return n;
                }
            }
        }
        panic!("no node serves slot {slot}")
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in self.nodes.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
