//! `kvstrata serve` and SIGTERM at every moment of its start-up: before the
//! listeners are bound, while they are, around the ready file, and after.
//! Each time the daemon must stop cleanly: exit status 0 and no socket file
//! left behind.
//!
//! Two ways of starting are mixed. Most runs wait until the process has
//! reached `main()` (its async runtime's threads exist, `Threads:` in
//! `/proc/PID/status`; before that no program can catch a signal) and
//! then wait a delay from 0 to a bit past the measured time to readiness.
//! Every fifth run starts the daemon with the stop signals blocked, as a
//! supervisor may, and signals it at once: the daemon must lift the block
//! once its handlers are in place and act on the pending signal.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

const BIN: &str = env!("CARGO_BIN_EXE_kvstrata");
const RUNS: usize = 50;
/// How long a daemon may take to start or to stop on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(20);

/// Starts a light daemon (small host tier, no disk, no GPU, no metrics) in
/// `dir`; with `blocked`, SIGTERM, SIGINT and SIGHUP start blocked.
fn spawn(dir: &Path, blocked: bool) -> Child {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "serve",
        "--tcp-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "",
        "--host-capacity",
        "16MiB",
        "--host-segment-bytes",
        "1MiB",
        "--gpu",
        "off",
        "--log-level",
        "warn",
    ])
    .arg("--uds-path")
    .arg(dir.join("kv.sock"))
    .arg("--ready-file")
    .arg(dir.join("ready.json"))
    .stdin(Stdio::null())
    .stdout(Stdio::null());
    if blocked {
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                    libc::sigaddset(&mut set, sig);
                }
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                Ok(())
            });
        }
    }
    cmd.spawn().expect("spawn kvstrata serve")
}

/// Waits until the process runs more than one thread: `main()` has built
/// its runtime (and blocked the stop signals before that).
fn wait_until_in_main(child: &mut Child) {
    let status = format!("/proc/{}/status", child.id());
    let deadline = Instant::now() + PATIENCE;
    loop {
        let threads = std::fs::read_to_string(&status).ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse::<u32>().ok())
        });
        if threads.is_some_and(|n| n > 1) {
            return;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("daemon exited before it started: {st:?}");
        }
        assert!(Instant::now() < deadline, "daemon never reached main()");
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn sigterm(child: &Child) {
    // SAFETY: signalling our own child process.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
}

/// Waits for the daemon to exit; kills it (and fails) past the deadline.
fn wait_exit(child: &mut Child, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: the daemon did not stop within {PATIENCE:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn sockets_left(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sock"))
        .collect()
}

/// Time from spawn to the ready file, for a daemon stopped normally after.
fn time_to_ready(root: &Path) -> Duration {
    let dir = tempfile::tempdir_in(root).unwrap();
    let start = Instant::now();
    let mut child = spawn(dir.path(), false);
    let ready = dir.path().join("ready.json");
    while !ready.exists() {
        assert!(start.elapsed() < PATIENCE, "daemon did not become ready");
        std::thread::sleep(Duration::from_millis(1));
    }
    let took = start.elapsed();
    sigterm(&child);
    let st = wait_exit(&mut child, "measuring");
    assert!(st.success(), "{st:?}");
    took
}

#[test]
fn sigterm_at_any_moment_of_start_up_stops_the_daemon_cleanly() {
    let root = tempfile::tempdir().unwrap();
    let ready_in = time_to_ready(root.path()).max(time_to_ready(root.path()));
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5167_7e57);
    let (mut before_ready, mut after_ready) = (0, 0);
    for run in 0..RUNS {
        let dir = tempfile::tempdir_in(root.path()).unwrap();
        let blocked = run % 5 == 0;
        let mut child = spawn(dir.path(), blocked);
        let what = if blocked {
            format!("run {run} (started with the signals blocked, signalled at once)")
        } else {
            // Up to 1.3 times the time to readiness; every tenth run once
            // the ready file is there.
            wait_until_in_main(&mut child);
            let delay = if run % 10 == 9 {
                let deadline = Instant::now() + PATIENCE;
                while !dir.path().join("ready.json").exists() {
                    assert!(Instant::now() < deadline, "run {run}: never ready");
                    std::thread::sleep(Duration::from_millis(1));
                }
                Duration::ZERO
            } else {
                ready_in.mul_f64(rng.random_range(0.0..1.3))
            };
            std::thread::sleep(delay);
            format!("run {run} (SIGTERM {delay:?} after main())")
        };
        sigterm(&child);
        let was_ready = dir.path().join("ready.json").exists();
        let st = wait_exit(&mut child, &what);
        assert_eq!(
            st.code(),
            Some(0),
            "{what}: exit status {st:?} (signal {:?})",
            st.signal()
        );
        let left = sockets_left(dir.path());
        assert!(
            left.is_empty(),
            "{what}: socket files left behind: {left:?}"
        );
        if was_ready {
            after_ready += 1;
        } else {
            before_ready += 1;
        }
    }
    eprintln!(
        "time to ready {ready_in:?}; SIGTERM before the ready file in {before_ready} runs, after it in {after_ready}"
    );
    assert!(before_ready > 0 && after_ready > 0);
}
