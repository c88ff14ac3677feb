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
