//! A `kvstrata serve` process, for the tests of the binary (cli/tests, which
//! include this module by path and pass `env!("CARGO_BIN_EXE_kvstrata")`).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A daemon process, SIGKILLed when dropped (also when a check panics).
pub struct ServeProcess {
    child: Option<Child>,
    /// Its Unix-socket target, `unix://DIR/kv.sock`.
    pub target: String,
    log: Option<PathBuf>,
}

/// Starts `bin serve` with the arguments `configure` adds, then
/// `--uds-path DIR/kv.sock --ready-file DIR/ready.json`, and waits until the
/// ready file appears. Stdin is closed; with `log`, stderr goes to that file
/// and stdout is dropped, else both are the test's. Panics (with the log)
/// when the daemon exits first or is not ready within `patience`.
pub fn spawn_serve(
    bin: impl AsRef<OsStr>,
    dir: &Path,
    patience: Duration,
    log: Option<&Path>,
    configure: impl FnOnce(&mut Command),
) -> ServeProcess {
    let sock = dir.join("kv.sock");
    let ready = dir.join("ready.json");
    let _ = std::fs::remove_file(&ready);
    let mut cmd = Command::new(bin);
    cmd.arg("serve");
    configure(&mut cmd);
    cmd.arg("--uds-path")
        .arg(&sock)
        .arg("--ready-file")
        .arg(&ready)
        .stdin(Stdio::null());
    if let Some(log) = log {
        cmd.stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log file"));
    }
    let child = cmd.spawn().expect("spawn kvstrata serve");
    let mut proc = ServeProcess {
        child: Some(child),
        target: format!("unix://{}", sock.display()),
        log: log.map(Path::to_path_buf),
    };
    let deadline = Instant::now() + patience;
    while !ready.exists() {
        if let Some(status) = proc.child_mut().try_wait().expect("wait") {
            panic!("daemon exited before ready: {status}{}", proc.log_note());
        }
        assert!(
            Instant::now() < deadline,
            "daemon did not become ready{}",
            proc.log_note()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    proc
}

impl ServeProcess {
    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("the daemon process")
    }

    /// The daemon's log so far (without colour sequences; empty without a
    /// log file).
    pub fn log(&self) -> String {
        self.log.as_deref().map(read_log).unwrap_or_default()
    }

    fn log_note(&self) -> String {
        match &self.log {
            Some(_) => format!(": {}", self.log()),
            None => String::new(),
        }
    }

    /// SIGTERM, then waits (at most a minute) for the exit.
    pub fn sigterm(mut self) -> ExitStatus {
        let child = self.child_mut();
        let pid = libc::pid_t::try_from(child.id()).expect("pid");
        // SAFETY: kill(2) on the pid of our own child, which has not been
        // waited for yet (so the pid is still ours).
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit within 60 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The process itself, no longer killed on drop (the caller kills it).
    pub fn into_child(mut self) -> Child {
        self.child.take().expect("the daemon process")
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A daemon log without its ANSI colour sequences.
pub fn read_log(path: &Path) -> String {
    let raw = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            // ESC [ ... letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}
