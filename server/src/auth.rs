//! Authentication and tenancy (docs/security.md).
//!
//! - TCP: every `kvstrata.v1.KvCache` call carries `authorization: Bearer
//!   <token>`; the tokens come from `auth.token_file` (reloaded on SIGHUP),
//!   held in memory as SHA-256 digests and compared in constant time. Without
//!   a token file the TCP listener is open (start-up refuses that on a
//!   non-loopback address unless `auth.insecure`).
//! - Unix sockets: the peer's uid (`SO_PEERCRED`) must be in `auth.uid_allow`
//!   (default: the daemon's own uid). The gRPC socket answers
//!   `PermissionDenied` per call; the mempool and SGLang sockets close the
//!   connection.
//! - Tenancy: a token may name a tenant. A namespace registered with a
//!   tenant's token is bound to that tenant ([`Owners`]); any other tenant
//!   naming it (or a lease on it) gets `PermissionDenied`. Unix-socket peers
//!   and tokens without a tenant are admins and may use every namespace.
//! - `/metrics`, with `auth.metrics_require_token`: an admin token
//!   ([`Auth::check_metrics_scrape`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kvstrata_tiers::NamespaceId;
use parking_lot::{Mutex, RwLock};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Status};

/// Shortest token accepted in a token file.
pub const MIN_TOKEN_CHARS: usize = 16;
/// Longest tenant name.
pub const MAX_TENANT_CHARS: usize = 64;

/// Errors of loading auth state.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("auth.token_file {path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("auth.token_file {path}:{line}: {reason}")]
    Parse {
        path: String,
        line: usize,
        reason: String,
    },
    #[error(
        "auth.token_file {path}: no tokens (an empty token file would lock every TCP client out)"
    )]
    Empty { path: String },
    #[error("namespace owners file {path}: {reason}")]
    Owners { path: String, reason: String },
}

/// Who is calling, as established by the interceptor (a request extension).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A Unix-socket peer with an allowed uid, a token without a tenant, or a
    /// TCP client of a daemon without tokens: may use every namespace.
    Admin,
    /// A token bound to this tenant: only its own namespaces.
    Tenant(Arc<str>),
}

impl Caller {
    /// The caller of a request (admin when no interceptor ran, e.g. in-process).
    pub fn of<T>(req: &Request<T>) -> Caller {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or(Caller::Admin)
    }

    pub fn tenant(&self) -> Option<&str> {
        match self {
            Caller::Admin => None,
            Caller::Tenant(t) => Some(t),
        }
    }
}

/// One token of the file, digested.
#[derive(Clone)]
struct TokenEntry {
    digest: [u8; 32],
    tenant: Option<Arc<str>>,
}

/// The tokens valid now.
#[derive(Clone, Default)]
pub struct TokenSet {
    entries: Vec<TokenEntry>,
}

impl std::fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenSet({} tokens)", self.entries.len())
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// Equality of two digests in time independent of where they differ.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

impl TokenSet {
    /// Parses a token file: one `TOKEN [TENANT]` per line; blank lines,
    /// lines starting with `#` and trailing ` # comments` are ignored. A token is at least
    /// [`MIN_TOKEN_CHARS`] printable ASCII characters without spaces; a
    /// tenant is 1 to [`MAX_TENANT_CHARS`] of `A-Z a-z 0-9 . _ -`.
    pub fn parse(path: &str, text: &str) -> Result<TokenSet, AuthError> {
        let mut entries: Vec<TokenEntry> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: String| AuthError::Parse {
                path: path.to_string(),
                line: i + 1,
                reason,
            };
            // A word starting with `#` starts a trailing comment.
            let mut words = line.split_whitespace().take_while(|w| !w.starts_with('#'));
            let token = words.next().unwrap_or_default();
            let tenant = words.next();
            if words.next().is_some() {
                return Err(bad(
                    "expected `TOKEN [TENANT]`; found more than two words".into()
                ));
            }
            if token.len() < MIN_TOKEN_CHARS {
                return Err(bad(format!(
                    "token of {} characters; at least {MIN_TOKEN_CHARS} required",
                    token.len()
                )));
            }
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad("token holds non-printable or non-ASCII bytes".into()));
            }
            if let Some(t) = tenant
                && (t.len() > MAX_TENANT_CHARS
                    || !t
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')))
            {
                return Err(bad(format!(
                    "tenant {t:?}: 1 to {MAX_TENANT_CHARS} of A-Z a-z 0-9 . _ -"
                )));
            }
            let d = digest(token.as_bytes());
            if entries.iter().any(|e| ct_eq(&e.digest, &d)) {
                return Err(bad("the same token appears twice".into()));
            }
            entries.push(TokenEntry {
                digest: d,
                tenant: tenant.map(Arc::from),
            });
        }
        if entries.is_empty() {
            return Err(AuthError::Empty {
                path: path.to_string(),
            });
        }
        Ok(TokenSet { entries })
    }

    /// Reads and parses a token file.
    pub fn load(path: &Path) -> Result<TokenSet, AuthError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: shown.clone(),
            source,
        })?;
        warn_if_readable_by_others(path);
        TokenSet::parse(&shown, &text)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The caller a presented token makes, or `None` for an unknown token.
    /// Every entry is compared (no early exit).
    pub fn check(&self, token: &[u8]) -> Option<Caller> {
        let d = digest(token);
        let mut found: Option<&TokenEntry> = None;
        for e in &self.entries {
            if ct_eq(&e.digest, &d) {
                found = Some(e);
            }
        }
        found.map(|e| match &e.tenant {
            Some(t) => Caller::Tenant(Arc::clone(t)),
            None => Caller::Admin,
        })
    }
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path)
        && m.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", m.permissions().mode() & 0o777), "auth.token_file is readable by group or others; chmod 600 it");
    }
}

/// Why a request or connection was refused (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    Missing,
    UnknownToken,
    WrongTenant,
    UidDenied,
}

impl FailureReason {
    const ALL: [FailureReason; 4] = [
        FailureReason::Missing,
        FailureReason::UnknownToken,
        FailureReason::WrongTenant,
        FailureReason::UidDenied,
    ];

    pub fn label(self) -> &'static str {
        match self {
            FailureReason::Missing => "missing",
            FailureReason::UnknownToken => "unknown_token",
            FailureReason::WrongTenant => "wrong_tenant",
            FailureReason::UidDenied => "uid_denied",
        }
    }
}

/// Counters of the auth layer.
#[derive(Debug, Default)]
pub struct AuthCounters {
    failures: [AtomicU64; 4],
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
}

impl AuthCounters {
    pub fn failure(&self, reason: FailureReason) {
        self.failures[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn failures(&self, reason: FailureReason) -> u64 {
        self.failures[reason as usize].load(Ordering::Relaxed)
    }
}

/// The daemon's auth state, shared by every listener.
#[derive(Debug)]
pub struct Auth {
    token_file: Option<PathBuf>,
    tokens: RwLock<Option<Arc<TokenSet>>>,
    uid_allow: Vec<u32>,
    counters: Arc<AuthCounters>,
    owners: Arc<Owners>,
}

impl Auth {
    /// Loads the token file (if any). `owners` holds the namespace bindings.
    pub fn new(
        token_file: Option<PathBuf>,
        uid_allow: Vec<u32>,
        owners: Arc<Owners>,
    ) -> Result<Auth, AuthError> {
        let tokens = match &token_file {
            Some(p) => Some(Arc::new(TokenSet::load(p)?)),
            None => None,
        };
        Ok(Auth {
            token_file,
            tokens: RwLock::new(tokens),
            uid_allow,
            counters: Arc::new(AuthCounters::default()),
            owners,
        })
    }

    /// Whether TCP callers must present a token.
    pub fn tokens_required(&self) -> bool {
        self.tokens.read().is_some()
    }

    pub fn owners(&self) -> &Arc<Owners> {
        &self.owners
    }

    pub fn counters(&self) -> &Arc<AuthCounters> {
        &self.counters
    }

    /// Re-reads the token file. All or nothing: a file that cannot be read or
    /// parsed keeps the old tokens (and is logged and counted). Returns the
    /// number of tokens now valid.
    pub fn reload(&self) -> Result<usize, AuthError> {
        let Some(path) = &self.token_file else {
            tracing::info!("reload: no auth.token_file configured; nothing to do");
            return Ok(0);
        };
        match TokenSet::load(path) {
            Ok(set) => {
                let n = set.len();
                *self.tokens.write() = Some(Arc::new(set));
                self.counters.reloads_ok.fetch_add(1, Ordering::Relaxed);
                tracing::info!(path = %path.display(), tokens = n, "auth tokens reloaded");
                Ok(n)
            }
            Err(e) => {
                self.counters.reloads_failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "auth token reload failed; the previous tokens stay valid");
                Err(e)
            }
        }
    }

    /// Whether a Unix-socket peer uid may talk to the daemon.
    pub fn uid_allowed(&self, uid: u32) -> bool {
        self.uid_allow.contains(&uid)
    }

    /// Checks a Unix-socket peer at accept time (mempool, SGLang sockets);
    /// counts and logs a refusal.
    pub fn admit_unix_peer(&self, what: &str, stream: &tokio::net::UnixStream) -> bool {
        let cred = stream.peer_cred().ok();
        let uid = cred.map(|c| c.uid());
        if uid.is_some_and(|u| self.uid_allowed(u)) {
            return true;
        }
        self.counters.failure(FailureReason::UidDenied);
        tracing::warn!(socket = what, peer_uid = ?uid, peer_pid = ?cred.and_then(|c| c.pid()), allowed = ?self.uid_allow, "unix socket: peer uid not in auth.uid_allow; connection closed");
        false
    }

    /// The caller of a TCP request, from its `authorization` metadata.
    fn tcp_caller(&self, md: &MetadataMap) -> Result<Caller, Status> {
        self.bearer_caller(md.get("authorization").map(|v| v.as_bytes()))
    }

    /// The caller an `authorization` value (`Bearer <token>`) makes; an admin
    /// when the daemon has no tokens.
    fn bearer_caller(&self, authorization: Option<&[u8]>) -> Result<Caller, Status> {
        let Some(tokens) = self.tokens.read().clone() else {
            return Ok(Caller::Admin);
        };
        let Some(bytes) = authorization else {
            self.counters.failure(FailureReason::Missing);
            return Err(Status::unauthenticated(
                "authorization: missing; send the metadata `authorization: Bearer <token>` (kvstrata --token-file)",
            ));
        };
        let token = bytes
            .strip_prefix(b"Bearer ")
            .or_else(|| bytes.strip_prefix(b"bearer "))
            .map(|t| t.trim_ascii());
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            self.counters.failure(FailureReason::Missing);
            return Err(Status::unauthenticated(
                "authorization: not of the form `Bearer <token>`",
            ));
        };
        tokens.check(token).ok_or_else(|| {
            self.counters.failure(FailureReason::UnknownToken);
            Status::unauthenticated("authorization: unknown or revoked bearer token")
        })
    }

    /// The caller of a Unix-socket request, from its peer credentials.
    fn uds_caller(&self, info: Option<&UdsConnectInfo>) -> Result<Caller, Status> {
        let uid = info.and_then(|i| i.peer_cred).map(|c| c.uid());
        match uid {
            Some(u) if self.uid_allowed(u) => Ok(Caller::Admin),
            _ => {
                self.counters.failure(FailureReason::UidDenied);
                Err(Status::permission_denied(format!(
                    "peer uid {}: not in the daemon's auth.uid_allow",
                    uid.map_or_else(|| "unknown".to_string(), |u| u.to_string())
                )))
            }
        }
    }

    /// Checks that `caller` may use namespace `ns`; `exists` tells whether the
    /// cache knows it (an unknown namespace is left to the cache's NotFound).
    pub fn authorize(&self, caller: &Caller, ns: &NamespaceId, exists: bool) -> Result<(), Status> {
        let Caller::Tenant(t) = caller else {
            return Ok(());
        };
        match self.owners.owner(ns) {
            Some(o) if *o == **t => Ok(()),
            Some(_) => {
                self.counters.failure(FailureReason::WrongTenant);
                Err(Status::permission_denied(format!(
                    "namespace_id: namespace {} belongs to another tenant",
                    hex::encode(ns.as_bytes())
                )))
            }
            None if !exists => Ok(()),
            None => {
                self.counters.failure(FailureReason::WrongTenant);
                Err(Status::permission_denied(format!(
                    "namespace_id: namespace {} is not bound to tenant {t:?}; register it with this token first",
                    hex::encode(ns.as_bytes())
                )))
            }
        }
    }

    /// Whether a scrape of `/metrics` with this `Authorization` header may
    /// read the daemon-wide metrics: an admin token of `auth.token_file`
    /// (`UNAUTHENTICATED` without a known one, `PERMISSION_DENIED` for a
    /// tenant's). Counted like refused calls.
    pub fn check_metrics_scrape(&self, authorization: Option<&[u8]>) -> Result<(), Status> {
        match self.bearer_caller(authorization)? {
            Caller::Admin => Ok(()),
            Caller::Tenant(t) => {
                self.counters.failure(FailureReason::WrongTenant);
                Err(Status::permission_denied(format!(
                    "authorization: /metrics describes every tenant; tenant {t:?} may not read it (use an admin token)"
                )))
            }
        }
    }

    /// Refuses tenants (calls that reach every namespace, e.g. Verify).
    pub fn admin_only(&self, caller: &Caller, method: &str) -> Result<(), Status> {
        match caller {
            Caller::Admin => Ok(()),
            Caller::Tenant(t) => {
                self.counters.failure(FailureReason::WrongTenant);
                Err(Status::permission_denied(format!(
                    "{method}: touches every namespace; tenant {t:?} may not call it (use an admin token or the Unix socket)"
                )))
            }
        }
    }

    /// The Prometheus collector of the auth counters.
    pub fn collector(&self) -> AuthCollector {
        AuthCollector {
            counters: Arc::clone(&self.counters),
        }
    }
}

/// Which listener an interceptor guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Unix,
}

/// The interceptor of the KvCache service: establishes the [`Caller`] (a
/// request extension) or refuses the call.
#[derive(Debug, Clone)]
pub struct AuthInterceptor {
    auth: Arc<Auth>,
    transport: Transport,
}

impl AuthInterceptor {
    pub fn new(auth: Arc<Auth>, transport: Transport) -> Self {
        AuthInterceptor { auth, transport }
    }
}

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let caller = match self.transport {
            Transport::Tcp => self.auth.tcp_caller(req.metadata())?,
            Transport::Unix => self
                .auth
                .uds_caller(req.extensions().get::<UdsConnectInfo>())?,
        };
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

/// `kvstrata_auth_failures_total{reason}` and `kvstrata_auth_reloads_total{result}`.
#[derive(Debug)]
pub struct AuthCollector {
    counters: Arc<AuthCounters>,
}

impl Collector for AuthCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut f = encoder.encode_descriptor(
            "kvstrata_auth_failures",
            "Requests or connections refused by authentication, by reason",
            None,
            MetricType::Counter,
        )?;
        for r in FailureReason::ALL {
            ConstCounter::new(self.counters.failures(r))
                .encode(f.encode_family(&[("reason", r.label())])?)?;
        }
        let mut f = encoder.encode_descriptor(
            "kvstrata_auth_reloads",
            "Token file reloads (SIGHUP), by result",
            None,
            MetricType::Counter,
        )?;
        for (label, c) in [
            ("ok", &self.counters.reloads_ok),
            ("error", &self.counters.reloads_failed),
        ] {
            ConstCounter::new(c.load(Ordering::Relaxed))
                .encode(f.encode_family(&[("result", label)])?)?;
        }
        Ok(())
    }
}

/// Namespace → tenant bindings. Persisted (JSON, written atomically) when a
/// file is given, so they survive a restart with the disk tier.
#[derive(Debug, Default)]
pub struct Owners {
    map: Mutex<HashMap<NamespaceId, Arc<str>>>,
    file: Option<PathBuf>,
}

impl Owners {
    /// Bindings kept in memory only.
    pub fn in_memory() -> Owners {
        Owners::default()
    }

    /// Bindings persisted in `file` (read now if it exists).
    pub fn persisted(file: PathBuf) -> Result<Owners, AuthError> {
        let bad = |reason: String| AuthError::Owners {
            path: file.display().to_string(),
            reason,
        };
        let mut map = HashMap::new();
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                let raw: HashMap<String, String> =
                    serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
                for (id, tenant) in raw {
                    let bytes = hex::decode(&id).map_err(|e| bad(format!("{id:?}: {e}")))?;
                    let ns = NamespaceId::from_slice("namespace_id", &bytes)
                        .map_err(|e| bad(format!("{id:?}: {e}")))?;
                    map.insert(ns, Arc::from(tenant));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(bad(e.to_string())),
        }
        Ok(Owners {
            map: Mutex::new(map),
            file: Some(file),
        })
    }

    /// The tenant a namespace is bound to.
    pub fn owner(&self, ns: &NamespaceId) -> Option<Arc<str>> {
        self.map.lock().get(ns).cloned()
    }

    /// Binds `ns` to `tenant` unless bound to another (then `Err` names the
    /// owner). Returns whether the binding is new (so a failed registration
    /// can [`Owners::release`] it).
    pub fn claim(&self, ns: &NamespaceId, tenant: &Arc<str>) -> Result<bool, Arc<str>> {
        let mut map = self.map.lock();
        match map.get(ns) {
            Some(o) if o == tenant => Ok(false),
            Some(o) => Err(Arc::clone(o)),
            None => {
                map.insert(*ns, Arc::clone(tenant));
                self.save(&map);
                Ok(true)
            }
        }
    }

    /// Drops a binding made by [`Owners::claim`].
    pub fn release(&self, ns: &NamespaceId) {
        let mut map = self.map.lock();
        if map.remove(ns).is_some() {
            self.save(&map);
        }
    }

    fn save(&self, map: &HashMap<NamespaceId, Arc<str>>) {
        let Some(file) = &self.file else { return };
        let raw: HashMap<String, &str> = map
            .iter()
            .map(|(k, v)| (hex::encode(k.as_bytes()), &**v))
            .collect();
        let write = || -> std::io::Result<()> {
            let text = serde_json::to_string_pretty(&raw).map_err(std::io::Error::other)?;
            let tmp = file.with_extension("tmp");
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, file)
        };
        if let Err(e) = write() {
            tracing::error!(path = %file.display(), error = %e, "cannot persist namespace owners; bindings hold until restart");
        }
    }
}

/// Whether a TCP address is loopback only.
pub fn is_loopback(addr: &str) -> bool {
    addr.parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().is_loopback())
}

/// The daemon's effective uid.
pub fn own_uid() -> u32 {
    // SAFETY: geteuid takes no arguments, touches no memory and cannot fail.
    unsafe { libc::geteuid() }
}

/// The next connection on a registration socket (mempool, KV regions) whose
/// peer `auth` admits, or `None` once `shutdown` fires. A failed accept
/// (EMFILE and friends) waits 50 ms instead of spinning; a refused peer is
/// closed at once and reported through `refused`.
pub async fn next_admitted_peer(
    listener: &tokio::net::UnixListener,
    shutdown: &tokio_util::sync::CancellationToken,
    auth: Option<&Auth>,
    socket: &'static str,
    refused: impl Fn(),
) -> Option<tokio::net::UnixStream> {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, socket, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if auth.is_some_and(|a| !a.admit_unix_peer(socket, &stream)) {
            refused();
            continue;
        }
        return Some(stream);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "token-aaaaaaaaaaaaaaaa";
    const B: &str = "token-bbbbbbbbbbbbbbbb";

    #[test]
    fn token_file_format() {
        let set = TokenSet::parse(
            "f",
            &format!("# comment\n\n{A} tenant-a # team A\n  {B}  \nadmin-token-cccccccccc #x y\n"),
        )
        .unwrap();
        assert_eq!(set.len(), 3);
        assert_eq!(
            set.check(A.as_bytes()),
            Some(Caller::Tenant("tenant-a".into()))
        );
        assert_eq!(set.check(B.as_bytes()), Some(Caller::Admin));
        assert_eq!(set.check(b"nope-nope-nope-nope"), None);
        for bad in [
            "short x",
            &format!("{A} t extra"),
            &format!("{A} bad/tenant"),
            &format!("{A}\n{A}"),
            "# only comments\n",
            "",
        ] {
            assert!(TokenSet::parse("f", bad).is_err(), "{bad:?}");
        }
        let e = TokenSet::parse("f", &format!("{A}\nshort\n")).unwrap_err();
        assert!(e.to_string().contains("f:2"), "{e}");
    }

    #[test]
    fn owners_bind_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("owners.json");
        let ns = NamespaceId([7; 16]);
        let a: Arc<str> = Arc::from("a");
        let b: Arc<str> = Arc::from("b");
        let o = Owners::persisted(file.clone()).unwrap();
        assert_eq!(o.claim(&ns, &a), Ok(true));
        assert_eq!(o.claim(&ns, &a), Ok(false));
        assert_eq!(o.claim(&ns, &b), Err(a.clone()));
        let o = Owners::persisted(file).unwrap();
        assert_eq!(o.owner(&ns).as_deref(), Some("a"));
        o.release(&ns);
        assert_eq!(o.owner(&ns), None);
    }

    #[test]
    fn loopback_addresses() {
        assert!(is_loopback("127.0.0.1:1"));
        assert!(is_loopback("[::1]:1"));
        assert!(!is_loopback("0.0.0.0:1"));
        assert!(!is_loopback("10.0.0.1:50051"));
    }
}
