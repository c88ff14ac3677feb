//! Where to reach the daemon: parsing of target strings and the default socket path.
//!
//! Accepted forms: `http://host:port`, `host:port` (plain HTTP/2),
//! `https://host:port` (TLS; see [`crate::ClientTls`]), `unix:///abs/path`,
//! `unix:/abs/path` and `/abs/path` (Unix socket).

use std::fmt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use crate::error::ClientError;
pub use kvstrata_types::default_uds_path;

/// TCP target used when no Unix socket is found at [`default_uds_path`].
pub const DEFAULT_TCP_TARGET: &str = "http://127.0.0.1:50051";

/// A parsed target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// HTTP/2 over TCP; the string is a full `http://host:port` URI, or
    /// `https://host:port` for TLS.
    Http(String),
    /// A Unix domain socket at an absolute path.
    Unix(PathBuf),
}

impl Target {
    /// Parses one of the accepted forms (see the module docs).
    pub fn parse(target: &str) -> Result<Target, ClientError> {
        let t = target.trim();
        let invalid = |reason: &str| ClientError::InvalidTarget {
            target: target.to_string(),
            reason: reason.to_string(),
        };
        if t.is_empty() {
            return Err(invalid("empty"));
        }
        let lower = t.to_ascii_lowercase();
        if lower.starts_with("unix:") {
            let rest = &t["unix:".len()..];
            let path = match rest.strip_prefix("//") {
                Some(p) => p,
                None => rest,
            };
            if !path.starts_with('/') {
                return Err(invalid(
                    "a unix socket path must be absolute (unix:///abs/path or unix:/abs/path)",
                ));
            }
            return unix_path(path).ok_or_else(|| invalid("the socket path names no file"));
        }
        if t.starts_with('/') {
            return unix_path(t).ok_or_else(|| invalid("the socket path names no file"));
        }
        let uri = if lower.starts_with("http://") {
            format!("http://{}", &t["http://".len()..])
        } else if lower.starts_with("https://") {
            format!("https://{}", &t["https://".len()..])
        } else if let Some((scheme, _)) = t.split_once("://") {
            return Err(invalid(&format!(
                "unsupported scheme {scheme:?} (use http://, https://, unix:// or host:port)"
            )));
        } else {
            check_host_port(t).map_err(|r| invalid(&r))?;
            format!("http://{t}")
        };
        let parsed: tonic::codegen::http::Uri = uri
            .parse()
            .map_err(|e| invalid(&format!("not a valid URI: {e}")))?;
        if parsed.host().is_none_or(str::is_empty) {
            return Err(invalid("missing host"));
        }
        if parsed.path_and_query().is_some_and(|p| p.as_str() != "/") {
            return Err(invalid("a gRPC target takes no path"));
        }
        Ok(Target::Http(uri))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Http(uri) => f.write_str(uri),
            Target::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

fn unix_path(p: &str) -> Option<Target> {
    let path = Path::new(p);
    path.file_name()?;
    Some(Target::Unix(path.to_path_buf()))
}

/// `host:port` with a numeric port; the host may be a bracketed IPv6 address.
fn check_host_port(s: &str) -> Result<(), String> {
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err("expected host:port, http://host:port or a unix socket path".into());
    };
    if host.is_empty() {
        return Err("missing host".into());
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err("an IPv6 address must be bracketed ([::1]:50051)".into());
    }
    port.parse::<u16>()
        .map_err(|_| format!("port {port:?} is not a number from 0 to 65535"))?;
    Ok(())
}

/// `unix://<default_uds_path>` when a socket exists there, else [`DEFAULT_TCP_TARGET`].
pub fn default_target() -> String {
    let path = default_uds_path();
    let is_socket = std::fs::metadata(&path).is_ok_and(|m| m.file_type().is_socket());
    if is_socket {
        format!("unix://{}", path.display())
    } else {
        DEFAULT_TCP_TARGET.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(s: &str) -> Target {
        Target::Http(s.to_string())
    }
    fn unix(s: &str) -> Target {
        Target::Unix(PathBuf::from(s))
    }

    #[test]
    fn accepted_forms() {
        let ok = [
            ("http://127.0.0.1:50051", http("http://127.0.0.1:50051")),
            ("http://localhost:1", http("http://localhost:1")),
            ("HTTP://host:9", http("http://host:9")),
            ("http://[::1]:50051", http("http://[::1]:50051")),
            ("http://host:50051/", http("http://host:50051/")),
            ("127.0.0.1:50051", http("http://127.0.0.1:50051")),
            ("db-3.internal:7000", http("http://db-3.internal:7000")),
            ("[::1]:50051", http("http://[::1]:50051")),
            ("  host:1  ", http("http://host:1")),
            ("unix:///run/kvstrata.sock", unix("/run/kvstrata.sock")),
            ("unix:/run/kvstrata.sock", unix("/run/kvstrata.sock")),
            (
                "/tmp/kvstrata-0/kvstrata.sock",
                unix("/tmp/kvstrata-0/kvstrata.sock"),
            ),
        ];
        for (input, want) in ok {
            assert_eq!(Target::parse(input).unwrap(), want, "{input}");
        }
    }

    #[test]
    fn refused_forms() {
        for bad in [
            "",
            "   ",
            "localhost",
            "host:port",
            "host:70000",
            ":50051",
            "::1:50051",
            "unix://relative/path",
            "unix:relative",
            "unix:///",
            "/",
            "grpc://host:1",
            "http://host:1/some/path",
            "http://",
        ] {
            let e = Target::parse(bad).unwrap_err();
            assert!(
                matches!(e, ClientError::InvalidTarget { .. }),
                "{bad:?} gave {e:?}"
            );
        }
    }

    #[test]
    fn https_is_a_tls_target() {
        assert_eq!(
            Target::parse("HTTPS://host:443").unwrap(),
            http("https://host:443")
        );
    }

    #[test]
    fn display_round_trips() {
        for s in ["http://h:1", "unix:///a/b.sock"] {
            let t = Target::parse(s).unwrap();
            assert_eq!(Target::parse(&t.to_string()).unwrap(), t);
        }
    }

    #[test]
    fn default_target_is_valid() {
        // Whatever the environment, the default target is a valid target.
        Target::parse(&default_target()).unwrap();
    }
}
