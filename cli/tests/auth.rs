//! Authentication with the real binary: `kvstrata serve --token-file`, the
//! client verbs' `--token` / `--token-file` flags, and SIGHUP reloading the
//! token file of a running daemon.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_kvstrata");
const ADMIN: &str = "admin-token-0123456789abcdef";
const ADMIN2: &str = "admin-token-second-0123456789";

fn write_tokens(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn auth_cli_token_file_and_sighup_reload_of_the_real_binary() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    write_tokens(&tokens, &format!("# admin\n{ADMIN}\n"));
    let client_token = dir.path().join("client-token");
    std::fs::write(&client_token, format!("{ADMIN}\n")).unwrap();
    let ready = dir.path().join("ready.json");
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--tcp-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "",
            "--log-level",
            "warn",
        ])
        .arg("--uds-path")
        .arg(dir.path().join("kv.sock"))
        .arg("--token-file")
        .arg(&tokens)
        .arg("--ready-file")
        .arg(&ready)
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
    let addr = format!("http://{}", info["tcp"].as_str().unwrap());
    let kv = |extra: &[&str]| {
        Command::new(BIN)
            .env_remove("KVSTRATA_TOKEN")
            .env_remove("KVSTRATA_TOKEN_FILE")
            .arg("--addr")
            .arg(&addr)
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let token_file = client_token.display().to_string();
    let o = kv(&["--token-file", &token_file, "stats"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = kv(&["stats"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: Unauthenticated") && err.contains("authorization"),
        "{err}"
    );

    // Rotate to a new token and send SIGHUP: the new one works, the old one stops.
    write_tokens(&tokens, &format!("{ADMIN2}\n"));
    // SAFETY: kill only sends a signal to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGHUP) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if kv(&["--token", ADMIN2, "stats"]).status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload the tokens"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!kv(&["--token-file", &token_file, "stats"]).status.success());
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// A daemon (in-process) whose TCP listener needs `ADMIN`, with one block
/// stored: its namespace id and key, in hex.
async fn protected_daemon(dir: &Path) -> (kvstrata_server::Daemon, String, String) {
    let tokens = dir.join("tokens");
    write_tokens(&tokens, &format!("{ADMIN}\n"));
    let mut c = kvstrata_server::Config::default();
    c.server.tcp_addr = "127.0.0.1:0".into();
    c.server.uds_path = dir.join("kv.sock").display().to_string();
    c.server.metrics_addr = String::new();
    c.host.capacity = bytesize::ByteSize::mib(8);
    c.auth.token_file = tokens.display().to_string();
    let d = kvstrata_server::Daemon::start(c).await.unwrap();
    let admin = kvstrata_client::Client::connect(&d.addrs().uds_target().unwrap())
        .await
        .unwrap();
    let spec = kvstrata_types::NamespaceSpec::layer_major(
        "auth-cli",
        2,
        1,
        64,
        kvstrata_types::Dtype::F16,
        16,
    );
    let reg = admin.register_namespace(&spec).await.unwrap();
    let payload = vec![7u8; reg.block_bytes as usize];
    let r = admin
        .batch_put(&reg.id, vec![kvstrata_client::PutItem::new("k1", payload)])
        .await
        .unwrap();
    assert_eq!(r.stored, 1);
    (d, reg.id.to_hex(), hex::encode("k1"))
}

/// Runs the binary with `args`, no token in the environment.
async fn kvstrata(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .env_remove("KVSTRATA_TOKEN")
            .env_remove("KVSTRATA_TOKEN_FILE")
            .env_remove("KVSTRATA_ADDR")
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_route_sends_the_global_token_to_every_node() {
    let dir = tempfile::tempdir().unwrap();
    let (d, ns, key) = protected_daemon(dir.path()).await;
    let node = format!("a={}", d.addrs().tcp_target().unwrap());
    let route = |token: Option<&str>| {
        let mut args = match token {
            Some(t) => strings(&["--token", t]),
            None => Vec::new(),
        };
        args.extend(strings(&["--json", "route", "--node", &node]));
        args.extend(strings(&["--namespace", &ns, "--keys", &key]));
        args.extend(strings(&["--sync-timeout", "10s"]));
        args
    };
    let o = kvstrata(route(Some(ADMIN))).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((&v["node"], &v["matched"]), (&"a".into(), &1.into()), "{v}");

    // Without it the node never syncs, and the one error line says why.
    let o = kvstrata(route(None)).await;
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no node is synced") && err.contains("Unauthenticated"),
        "{err}"
    );
    d.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_bench_sends_the_global_token() {
    let dir = tempfile::tempdir().unwrap();
    let (d, _, _) = protected_daemon(dir.path()).await;
    let addr = d.addrs().tcp_target().unwrap();
    let bench = |token: Option<&str>| {
        let mut args = match token {
            Some(t) => strings(&["--token", t]),
            None => Vec::new(),
        };
        args.extend(strings(&["bench", "--addr", &addr, "--json"]));
        args.extend(strings(&[
            "--block-size",
            "4KiB",
            "--keys",
            "16",
            "--batch",
            "2",
        ]));
        args.extend(strings(&["--concurrency", "1", "--duration", "300ms"]));
        args.extend(strings(&["--warmup", "0s", "--memcpy-duration", "0s"]));
        args
    };
    let o = kvstrata(bench(Some(ADMIN))).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v.is_object(), "{v}");

    let o = kvstrata(bench(None)).await;
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("RegisterNamespace") && err.contains("authorization: missing"),
        "{err}"
    );
    d.shutdown().await.unwrap();
}
