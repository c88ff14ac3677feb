//! Where the daemon's gRPC Unix socket is by default: the one place that
//! decides it, shared by the daemon (its `server.uds_path` default) and the
//! client (its default target).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// The daemon's default Unix socket: `$XDG_RUNTIME_DIR/kvstrata/kvstrata.sock` when
/// `XDG_RUNTIME_DIR` is set (and not empty), else `/tmp/kvstrata-<euid>/kvstrata.sock`.
pub fn default_uds_path() -> PathBuf {
    uds_path_for(
        std::env::var_os("XDG_RUNTIME_DIR").as_deref(),
        // SAFETY: geteuid takes no arguments, touches no memory and cannot fail.
        unsafe { libc::geteuid() },
    )
}

fn uds_path_for(xdg_runtime_dir: Option<&OsStr>, euid: u32) -> PathBuf {
    match xdg_runtime_dir {
        Some(dir) if !dir.is_empty() => Path::new(dir).join("kvstrata").join("kvstrata.sock"),
        _ => PathBuf::from(format!("/tmp/kvstrata-{euid}/kvstrata.sock")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_socket_path() {
        assert_eq!(
            uds_path_for(Some(OsStr::new("/run/user/1000")), 1000),
            PathBuf::from("/run/user/1000/kvstrata/kvstrata.sock")
        );
        assert_eq!(
            uds_path_for(Some(OsStr::new("")), 1000),
            PathBuf::from("/tmp/kvstrata-1000/kvstrata.sock")
        );
        assert_eq!(
            uds_path_for(None, 0),
            PathBuf::from("/tmp/kvstrata-0/kvstrata.sock")
        );
        assert!(default_uds_path().is_absolute());
    }
}
