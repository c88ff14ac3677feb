//! The real binary and KV regions: `kvstrata serve --gpu on` on a machine
//! without a GPU refuses to start with a one-line error, and
//! `serve --print-config` shows the `[gpu]` section with the region socket.
//! (The data path of regions runs against the daemon library in
//! server/tests/regions.rs.)

const BIN: &str = env!("CARGO_BIN_EXE_kvstrata");

#[test]
fn the_binary_refuses_gpu_on_without_a_gpu_and_prints_the_gpu_section() {
    if kvstrata_kernels::Gpu::cuda(0).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // The binary: a one-line error and a failing exit code.
    let out = std::process::Command::new(BIN)
        .args([
            "serve",
            "--gpu",
            "on",
            "--tcp-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "",
        ])
        .arg("--uds-path")
        .arg(dir.path().join("bin.sock"))
        .output()
        .expect("run kvstrata");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let err_lines: Vec<&str> = err.lines().filter(|l| l.contains("gpu.enabled")).collect();
    assert_eq!(err_lines.len(), 1, "{err}");
    // --print-config shows the section.
    let out = std::process::Command::new(BIN)
        .args([
            "serve",
            "--print-config",
            "--kv-region-socket",
            "/tmp/x/r.sock",
        ])
        .output()
        .expect("run kvstrata");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("[gpu]") && text.contains("region_socket = \"/tmp/x/r.sock\""),
        "{text}"
    );
}
