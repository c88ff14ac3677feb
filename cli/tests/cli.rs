//! The `kvstrata` binary end to end: `serve` as a real process (ready file,
//! SIGTERM), and the CLI verbs against it, human and `--json` output, errors.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_kvstrata");

struct Served {
    child: Child,
    dir: tempfile::TempDir,
    addr: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(extra: &[&str]) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("kv.sock");
    let ready = dir.path().join("ready.json");
    let child = Command::new(BIN)
        .args([
            "serve",
            "--tcp-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--log-level",
            "warn",
        ])
        .arg("--uds-path")
        .arg(&sock)
        .arg("--ready-file")
        .arg(&ready)
        .args(extra)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "daemon did not become ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ready).unwrap()).unwrap();
    assert!(info["tcp"].as_str().unwrap().starts_with("127.0.0.1:"));
    Served {
        child,
        dir,
        addr: format!("unix://{}", sock.display()),
    }
}

fn kv(addr: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--addr")
        .arg(addr)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok(addr: &str, args: &[&str]) -> String {
    let o = kv(addr, args);
    assert!(
        o.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn fails(addr: &str, args: &[&str]) -> String {
    let o = kv(addr, args);
    assert!(!o.status.success(), "{args:?} should fail");
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line on stderr, got {err:?}"
    );
    assert!(err.starts_with("error: "), "{err}");
    err
}

fn register(addr: &str) -> String {
    let out = ok(
        addr,
        &[
            "--json",
            "ns",
            "register",
            "--model",
            "cli-test",
            "--layers",
            "2",
            "--kv-heads",
            "1",
            "--head-dim",
            "64",
            "--dtype",
            "f16",
            "--block-tokens",
            "16",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = v["namespace_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no namespace_id in {v}"))
        .to_string();
    assert_eq!(id.len(), 32);
    id
}

fn write_block(dir: &Path, name: &str, len: usize, seed: u8) -> PathBuf {
    let p = dir.join(name);
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(17).wrapping_add(seed))
        .collect();
    std::fs::write(&p, data).unwrap();
    p
}

#[test]
fn verbs_round_trip_bytes_and_report() {
    let s = serve(&["--host-capacity", "1MiB"]);
    let a = s.addr.as_str();
    let ns = register(a);
    let f1 = write_block(s.dir.path(), "b1", 8192, 1);
    let f2 = write_block(s.dir.path(), "b2", 8192, 2);
    ok(
        a,
        &[
            "put",
            "--ns",
            "cli-test",
            "blk1",
            "--file",
            f1.to_str().unwrap(),
        ],
    );
    ok(
        a,
        &[
            "put",
            "--ns",
            &ns,
            "blk2",
            "--parent",
            "blk1",
            "--file",
            f2.to_str().unwrap(),
        ],
    );
    ok(a, &["put", "--ns", &ns, "hex:00ff10", "--fill-seed", "9"]);
    let back = s.dir.path().join("back");
    ok(
        a,
        &["get", "--ns", &ns, "blk2", "--out", back.to_str().unwrap()],
    );
    assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&f2).unwrap());

    let stats: serde_json::Value = serde_json::from_str(&ok(a, &["--json", "stats"])).unwrap();
    let host = &stats["tiers"][0];
    assert_eq!(host["tier"], "host");
    assert_eq!(host["blocks"], 3);
    assert_eq!(host["used_bytes"], 3 * 8192);
    assert!(ok(a, &["stats"]).contains("host"));

    let ls: serde_json::Value =
        serde_json::from_str(&ok(a, &["--json", "ls", "--ns", &ns])).unwrap();
    let text = ls.to_string();
    assert!(
        text.contains("blk1") && text.contains("blk2") && text.contains("hex:00ff10"),
        "{text}"
    );
    let human = ok(a, &["ls", "--tier", "host"]);
    assert!(human.contains("blk2"));

    let insp: serde_json::Value =
        serde_json::from_str(&ok(a, &["--json", "inspect", "--ns", &ns, "blk2"])).unwrap();
    assert_eq!(insp["checksum_ok"], true, "{insp}");
    let lookup = ok(
        a,
        &["--json", "lookup", "--ns", &ns, "blk1", "blk2", "blk3"],
    );
    assert!(
        lookup.contains("\"matched\": 2") || lookup.contains("\"matched\":2"),
        "{lookup}"
    );

    ok(a, &["evict", "--ns", &ns, "hex:00ff10"]);
    ok(a, &["delete", "--ns", &ns, "blk1"]);
    let stats: serde_json::Value = serde_json::from_str(&ok(a, &["--json", "stats"])).unwrap();
    assert_eq!(stats["tiers"][0]["blocks"], 1);
    assert_eq!(stats["tiers"][0]["evictions"], 1);
}

#[test]
fn errors_are_one_line_and_non_zero() {
    let s = serve(&[]);
    let a = s.addr.as_str();
    let ns = register(a);
    let short = write_block(s.dir.path(), "short", 100, 0);
    let e = fails(
        a,
        &["put", "--ns", &ns, "k", "--file", short.to_str().unwrap()],
    );
    assert!(
        e.contains("InvalidArgument") && e.contains("items[0].payload"),
        "{e}"
    );
    let e = fails(a, &["get", "--ns", "no-such-model", "k"]);
    assert!(e.contains("no-such-model"), "{e}");
    let e = fails(a, &["pin", "--ns", &ns, "--lease", "5s", "missing"]);
    assert!(e.contains("FailedPrecondition"), "{e}");
    let e = fails("unix:///nonexistent/kv.sock", &["stats"]);
    assert!(e.contains("nonexistent"), "{e}");
    // Nothing was stored by the failed put.
    let stats: serde_json::Value = serde_json::from_str(&ok(a, &["--json", "stats"])).unwrap();
    assert_eq!(stats["tiers"][0]["blocks"], 0);
}

#[test]
fn serve_prints_config_and_stops_cleanly_on_sigterm() {
    let out = Command::new(BIN)
        .args(["serve", "--print-config", "--max-batch", "77"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let cfg: toml::Value = toml::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(cfg["server"]["max_batch"].as_integer(), Some(77));
    let out = Command::new(BIN)
        .args(["serve", "--print-config"])
        .env("KVSTRATA_HOST_CAPACITY", "3GiB")
        .output()
        .unwrap();
    assert!(String::from_utf8(out.stdout).unwrap().contains("\"3GiB\""));
    let bad = Command::new(BIN)
        .args(["serve", "--log-format", "xml"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("log.format"));

    let mut s = serve(&[]);
    let sock = s.addr.trim_start_matches("unix://").to_string();
    // SAFETY: sending a signal to our own child process.
    let rc = unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "daemon did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status:?}");
    assert!(!Path::new(&sock).exists(), "socket removed");
}

#[test]
fn disk_verbs_list_inspect_and_verify() {
    let disk = tempfile::Builder::new()
        .prefix("kvs-cli-disk-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let slots = disk.path().join("slots.kvs");
    let slots_arg = format!("{}=4MiB", slots.display());
    let s = serve(&["--host-capacity", "1MiB", "--disk-path", &slots_arg]);
    let a = s.addr.as_str();
    let ns = register(a);
    for (i, k) in ["d0", "d1", "d2"].iter().enumerate() {
        let f = write_block(s.dir.path(), k, 8192, i as u8);
        ok(a, &["put", "--ns", &ns, k, "--file", f.to_str().unwrap()]);
    }
    let stats: serde_json::Value = serde_json::from_str(&ok(a, &["--json", "stats"])).unwrap();
    let disk_tier = stats["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tier"] == "disk")
        .unwrap_or_else(|| panic!("no disk tier in {stats}"));
    if std::env::var_os("KVSTRATA_ALLOW_NO_URING").is_none() {
        assert_eq!(disk_tier["io_engine"], "io_uring", "{disk_tier}");
    }
    assert!(stats["movement"].is_object(), "{stats}");

    // Host → disk, then list the disk tier.
    ok(a, &["evict", "--ns", &ns, "--all"]);
    let ls: serde_json::Value =
        serde_json::from_str(&ok(a, &["--json", "ls", "--tier", "disk"])).unwrap();
    let blocks = ls["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 3, "{ls}");
    assert!(blocks.iter().all(|b| b["tier"] == "disk"), "{ls}");
    let human = ok(a, &["ls", "--tier", "disk"]);
    assert!(
        human.contains("d1") && human.contains("3 blocks"),
        "{human}"
    );

    // Inspect shows the header and that it verifies.
    let insp: serde_json::Value =
        serde_json::from_str(&ok(a, &["--json", "inspect", "--ns", &ns, "d1"])).unwrap();
    let slot = &insp["disk_slot"];
    assert_eq!(slot["verifies"], true, "{insp}");
    assert_eq!(slot["header"]["key"], "d1", "{insp}");
    assert_eq!(slot["header"]["payload_len"], 8192, "{insp}");
    let human = ok(a, &["inspect", "--ns", &ns, "d1"]);
    assert!(
        human.contains("disk header") && human.contains("ok (header"),
        "{human}"
    );

    // Corrupt d1's payload on disk: inspect says so, verify fails with one line.
    let file = slot["file"].as_str().unwrap();
    let offset = slot["offset"].as_u64().unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
        f.write_all_at(b"\xff\xee", offset + 4096 + 10).unwrap();
        f.sync_all().unwrap();
    }
    let human = ok(a, &["inspect", "--ns", &ns, "d1"]);
    assert!(
        human.contains("FAILED: payload checksum mismatch"),
        "{human}"
    );
    let err = fails(a, &["verify"]);
    assert!(err.contains("1 corrupt disk slot(s) found"), "{err}");
    let out = kv(a, &["--json", "verify", "--drop"]);
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["corrupt"][0]["key"], "d1", "{v}");
    assert_eq!(
        v["corrupt"][0]["problem"], "payload checksum mismatch",
        "{v}"
    );
    // Dropped: verify is clean, d1 is a miss, the others read back exactly.
    let out = ok(a, &["verify"]);
    assert!(out.contains("2 slots scanned, 0 corrupt"), "{out}");
    fails(a, &["get", "--ns", &ns, "d1"]);
    let got = s.dir.path().join("d2.out");
    ok(
        a,
        &["get", "--ns", &ns, "d2", "--out", got.to_str().unwrap()],
    );
    assert_eq!(
        std::fs::read(got).unwrap(),
        std::fs::read(s.dir.path().join("d2")).unwrap()
    );
}

#[test]
fn bench_socket_measures_both_transports_and_names_bad_flags() {
    // No daemon: the ceiling opens its own connections. `--json` after the
    // subcommand and before `bench` both work.
    for (transport, json_first) in [("tcp", false), ("uds", true)] {
        let mut args = vec![];
        if json_first {
            args.push("--json");
        }
        args.extend([
            "bench",
            "socket",
            "--transport",
            transport,
            "--connections",
            "2",
            "--write-size",
            "64KiB",
            "--working-set",
            "1MiB",
            "--duration",
            "200ms",
            "--warmup",
            "0s",
        ]);
        if !json_first {
            args.push("--json");
        }
        let out = ok("unix:///nonexistent", &args);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["transport"], transport, "{v}");
        assert_eq!(v["connections"], 2, "{v}");
        assert_eq!(v["write_size"], 65536, "{v}");
        assert_eq!(v["working_set"], 1 << 20, "{v}");
        assert!(v["gb_per_s"].as_f64().unwrap() > 0.0, "{v}");
        assert_eq!(v["bytes_sent"], v["bytes_received"], "{v}");
    }
    let human = ok(
        "unix:///nonexistent",
        &[
            "bench",
            "socket",
            "--working-set",
            "2MiB",
            "--duration",
            "100ms",
            "--warmup",
            "0s",
        ],
    );
    assert!(
        human.starts_with(
            "socket ceiling (loopback TCP, 4 connections, 256.0 KiB writes from 2.0 MiB): "
        ),
        "{human}"
    );
    let err = fails(
        "unix:///nonexistent",
        &["bench", "socket", "--connections", "0"],
    );
    assert!(err.contains("--connections"), "{err}");
    let err = fails(
        "unix:///nonexistent",
        &["bench", "socket", "--write-size", "65MiB"],
    );
    assert!(err.contains("--write-size"), "{err}");
}
