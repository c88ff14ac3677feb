//! `kvstrata bench-remote` end to end against a real 3-node Redis Cluster:
//! both paths run, every block is read back and verified, and the keys are
//! gone afterwards.

#[path = "common/redis_cluster.rs"]
mod redis_cluster;

use std::process::Command;

use redis_cluster::RedisCluster;

#[test]
fn bench_remote_runs_both_paths_against_a_real_cluster() {
    let cluster = RedisCluster::start(3);
    let nodes = cluster.urls().join(",");
    let out = Command::new(env!("CARGO_BIN_EXE_kvstrata"))
        .args([
            "bench-remote",
            "--node",
            &nodes,
            "--block-size",
            "64KiB,100000",
            "--blocks",
            "16",
            "--concurrency",
            "4",
            "--no-progress",
            "--json",
        ])
        .output()
        .expect("run kvstrata bench-remote");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench-remote failed: {}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let report: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));

    let sizes = report["sizes"].as_array().expect("sizes");
    assert_eq!(sizes.len(), 2);
    assert_eq!(sizes[0]["block_size"], 65536);
    assert_eq!(sizes[1]["block_size"], 100000);
    for s in sizes {
        for path in ["kvstrata", "raw"] {
            let p = &s[path];
            assert_eq!(p["verified_blocks"], 32, "{path}: {s}");
            assert_eq!(p["verify_failures"], 0, "{path}: {s}");
            for dir in ["write", "read"] {
                let d = &p[dir];
                // 2 rounds of 16 blocks in batches of 4.
                assert_eq!(d["blocks"], 32, "{path} {dir}: {d}");
                assert_eq!(d["hits"], 32, "{path} {dir}: {d}");
                assert_eq!(d["rpcs"], 8, "{path} {dir}: {d}");
                assert!(
                    d["gb_per_s"].as_f64().expect("gb_per_s") > 0.0,
                    "{path} {dir}: {d}"
                );
                assert!(
                    d["p99_us"].as_f64().expect("p99_us") > 0.0,
                    "{path} {dir}: {d}"
                );
            }
        }
        for r in ["write_gb_per_s", "read_gb_per_s", "write_p99", "read_p99"] {
            assert!(s["ratio"][r].as_f64().expect("ratio") > 0.0, "{r}: {s}");
        }
        assert_eq!(
            s["kvstrata"]["value_bytes"],
            s["block_size"].as_u64().unwrap() + 200
        );
    }
    assert_eq!(report["rounds"], 2);
    let tier = &report["tier"];
    assert_eq!(tier["writes"], 64);
    assert_eq!(tier["hits"], 64);
    assert_eq!(tier["misses"], 0);
    assert_eq!(tier["errors"], 0);
    assert_eq!(tier["timeouts"], 0);
    assert_eq!(tier["corrupt_blocks"], 0);

    // Both paths deleted their keys.
    for i in 0..3 {
        let n = cluster.cli(i, &["DBSIZE"]).expect("DBSIZE");
        assert_eq!(n.trim(), "0", "node {i} still holds keys");
    }
}

#[test]
fn bench_remote_fails_cleanly_without_a_cluster() {
    // A port nothing listens on: an error, not numbers.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let out = Command::new(env!("CARGO_BIN_EXE_kvstrata"))
        .args([
            "bench-remote",
            "--node",
            &format!("redis://127.0.0.1:{port}"),
            "--blocks",
            "4",
            "--connect-wait-ms",
            "1500",
            "--json",
        ])
        .output()
        .expect("run kvstrata bench-remote");
    assert!(!out.status.success());
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("did not connect"), "{stderr}");
}
