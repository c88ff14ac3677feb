//! [`Client`]: the typed gRPC client of `kvstrata.v1.KvCache`.
//!
//! One method per RPC. Every method takes `&self` and clones the inner tonic client
//! (a cheap handle on one shared HTTP/2 connection), so a `Client` can be shared by
//! many tasks at once, or cloned.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use kvstrata_proto::v1 as proto;
use kvstrata_proto::v1::kv_cache_client::KvCacheClient;
use kvstrata_types::{NamespaceId, NamespacePolicy, NamespaceSpec, spec_to_proto};
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

use crate::error::ClientError;
use crate::pages_found::PagesFound;
use crate::target::Target;
use kvstrata_types::wire::region_calls::CallKind;

/// A stream of server messages (`GetStream`, `Watch`).
pub type ClientStream<T> = Pin<Box<dyn Stream<Item = Result<T, ClientError>> + Send + 'static>>;

/// Connection settings. [`ClientOptions::default`] suits KV blocks up to hundreds of MiB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// Largest gRPC message sent or accepted, in bytes (default 512 MiB).
    pub max_message_bytes: usize,
    /// How long establishing the connection may take (default 5 s).
    pub connect_timeout: Duration,
    /// Bound on each unary call (also sent as `grpc-timeout`) and on the start of
    /// each streaming call; `None` (the default) waits forever.
    pub request_timeout: Option<Duration>,
    /// Sent as `authorization: Bearer <token>` on every call (the daemon's
    /// `auth.token_file`); `None` (the default) sends none. Not added to
    /// calls made through [`Client::raw`].
    pub token: Option<BearerToken>,
    /// TLS settings for `https://` targets.
    pub tls: Option<ClientTls>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            max_message_bytes: 512 << 20,
            connect_timeout: Duration::from_secs(5),
            request_timeout: None,
            token: None,
            tls: None,
        }
    }
}

/// A bearer token, checked once to be a valid header value; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(MetadataValue<Ascii>);

impl BearerToken {
    /// A token of printable ASCII characters (no spaces).
    pub fn new(token: &str) -> Result<BearerToken, ClientError> {
        let token = token.trim();
        let invalid = |reason: &str| ClientError::InvalidArgument {
            field: "token",
            reason: reason.to_string(),
        };
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                "empty, or holds spaces or non-printable / non-ASCII characters",
            ));
        }
        MetadataValue::try_from(format!("Bearer {token}"))
            .map(BearerToken)
            .map_err(|_| invalid("not a valid header value"))
    }

    /// The first token of a token file: the first word of its first line that
    /// is neither blank nor a `#` comment (the daemon's format, `TOKEN [TENANT]`).
    pub fn from_file(path: &std::path::Path) -> Result<BearerToken, ClientError> {
        let text = std::fs::read_to_string(path).map_err(|e| ClientError::InvalidArgument {
            field: "token_file",
            reason: format!("cannot read {}: {e}", path.display()),
        })?;
        let first = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .and_then(|l| l.split_whitespace().next())
            .ok_or_else(|| ClientError::InvalidArgument {
                field: "token_file",
                reason: format!("{} holds no token", path.display()),
            })?;
        BearerToken::new(first)
    }
}

impl BearerToken {
    /// Adds `authorization: Bearer <token>` to a request built by hand (calls
    /// through [`Client::raw`] or another generated client).
    pub fn apply<T>(&self, req: &mut tonic::Request<T>) {
        req.metadata_mut().insert("authorization", self.0.clone());
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// TLS settings of a client (PEM bytes).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// CA certificate(s) that signed the daemon's certificate (required:
    /// this build trusts no system roots).
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate and key, for a daemon with `tls.client_ca`.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// Name to check the daemon's certificate against (default: the target's host).
    pub domain: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca", &self.ca_pem.is_some())
            .field("identity", &self.identity_pem.is_some())
            .field("domain", &self.domain)
            .finish()
    }
}

impl ClientTls {
    /// Reads the PEM files: a CA, and optionally a client certificate and key.
    pub fn from_files(
        ca: Option<&std::path::Path>,
        cert_and_key: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Result<ClientTls, ClientError> {
        let read = |field: &'static str, p: &std::path::Path| {
            std::fs::read(p).map_err(|e| ClientError::InvalidArgument {
                field,
                reason: format!("cannot read {}: {e}", p.display()),
            })
        };
        Ok(ClientTls {
            ca_pem: ca.map(|p| read("tls_ca", p)).transpose()?,
            identity_pem: match cert_and_key {
                Some((c, k)) => Some((read("tls_cert", c)?, read("tls_key", k)?)),
                None => None,
            },
            domain: None,
        })
    }
}

/// HTTP/2 per-stream flow-control window: large blocks flow without stalls.
const STREAM_WINDOW_BYTES: u32 = 16 << 20;
/// HTTP/2 per-connection flow-control window.
const CONNECTION_WINDOW_BYTES: u32 = 64 << 20;
/// Largest HTTP/2 frame the client accepts (SETTINGS_MAX_FRAME_SIZE): with
/// the 16 KiB default a 1 MiB block arrives in 64 frames, each one a wake-up
/// and a buffer of its own.
const MAX_FRAME_BYTES: u32 = 4 << 20;
/// One block to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutItem {
    /// The block key (1 to 64 bytes).
    pub key: Bytes,
    /// The key of the previous block in the chain, if any.
    pub parent: Option<Bytes>,
    /// Exactly `block_bytes` of the namespace.
    pub payload: Bytes,
}

impl PutItem {
    /// A block without a parent.
    pub fn new(key: impl Into<Bytes>, payload: impl Into<Bytes>) -> Self {
        PutItem {
            key: key.into(),
            parent: None,
            payload: payload.into(),
        }
    }

    /// The same block, naming its parent.
    pub fn with_parent(mut self, parent: impl Into<Bytes>) -> Self {
        self.parent = Some(parent.into());
        self
    }
}

impl From<PutItem> for proto::PutItem {
    fn from(item: PutItem) -> Self {
        proto::PutItem {
            key: item.key,
            parent: item.parent.unwrap_or_default(),
            payload: item.payload,
            range: None,
            pages: None,
        }
    }
}

/// One block to store from a shared-memory pool range ([`Client::batch_put_ranges`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangePutItem {
    /// The block key (1 to 64 bytes).
    pub key: Bytes,
    /// The key of the previous block in the chain, if any.
    pub parent: Option<Bytes>,
    /// Where the block's bytes lie: `length` must be `block_bytes` of the namespace
    /// (see [`crate::PoolRange::to_proto`]).
    pub range: proto::PoolRange,
}

impl RangePutItem {
    /// A block without a parent.
    pub fn new(key: impl Into<Bytes>, range: proto::PoolRange) -> Self {
        RangePutItem {
            key: key.into(),
            parent: None,
            range,
        }
    }

    /// The same block, naming its parent.
    pub fn with_parent(mut self, parent: impl Into<Bytes>) -> Self {
        self.parent = Some(parent.into());
        self
    }
}

impl From<RangePutItem> for proto::PutItem {
    fn from(item: RangePutItem) -> Self {
        proto::PutItem {
            key: item.key,
            parent: item.parent.unwrap_or_default(),
            payload: Bytes::new(),
            range: Some(item.range),
            pages: None,
        }
    }
}

/// Answer of [`Client::register_namespace`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisteredNamespace {
    pub id: NamespaceId,
    /// Payload bytes of one block of this namespace.
    pub block_bytes: u64,
    /// False when the namespace was already registered.
    pub created: bool,
}

fn ns_bytes(ns: &NamespaceId) -> Bytes {
    Bytes::copy_from_slice(ns.as_bytes())
}

/// Keys per request the daemon takes by default (`server.max_batch`; a
/// longer request is refused `RESOURCE_EXHAUSTED`): `lookup`, `delete` and
/// `evict` send longer key lists as several requests of at most this many,
/// or of the daemon's own `max_batch` once a `register_namespace` answer
/// has told it ([`Client::max_batch`]).
pub const MAX_BATCH: usize = 4096;

/// `keys` in requests of at most `max` keys; one (empty) request for no
/// keys.
fn key_chunks<K>(keys: &[K], max: usize) -> impl Iterator<Item = &[K]> {
    let empty: &[K] = &[];
    keys.chunks(max.max(1))
        .chain(keys.is_empty().then_some(empty))
}

fn keys_bytes(keys: &[impl AsRef<[u8]>]) -> Vec<Bytes> {
    keys.iter()
        .map(|k| Bytes::copy_from_slice(k.as_ref()))
        .collect()
}

/// A BatchGet of `keys` in `ns` with nothing else set: payloads in the
/// answer, unless the caller adds ranges or pages.
fn get_request(ns: &NamespaceId, keys: &[impl AsRef<[u8]>]) -> proto::BatchGetRequest {
    proto::BatchGetRequest {
        namespace_id: ns_bytes(ns),
        keys: keys_bytes(keys),
        ..Default::default()
    }
}

/// Lease length in whole milliseconds; a non-zero lease shorter than 1 ms is 1 ms.
fn lease_millis(lease: Duration) -> u64 {
    let ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 && !lease.is_zero() { 1 } else { ms }
}

/// A connection to a kvstrata daemon.
#[derive(Debug, Clone)]
pub struct Client {
    inner: KvCacheClient<Channel>,
    /// The channel under `inner`, for the calls decoded by hand ([`crate::inline`]).
    channel: Channel,
    options: ClientOptions,
    /// What the daemon's last `register_namespace` answer told; shared by clones.
    learnt: Arc<Learnt>,
}

/// What a client learns from the daemon's `register_namespace` answers.
#[derive(Debug)]
struct Learnt {
    /// The daemon's `server.max_batch` ([`MAX_BATCH`] until told).
    max_batch: AtomicUsize,
    /// Whether the daemon reads a BatchGet's pages as one page-id array
    /// (`page_id_arrays`; false until told).
    page_id_arrays: AtomicBool,
    /// Whether the daemon answers a get into pages compactly on request
    /// (`compact_answers`; false until told).
    compact_answers: AtomicBool,
    /// Whether the daemon serves region calls (`region_calls`; false until
    /// told) and this client may use them (`KVSTRATA_REGION_CALLS` is not
    /// `0`, `off` or `false`).
    region_calls: AtomicBool,
    region_calls_allowed: bool,
    /// Whether the daemon reads a page put in the array form
    /// (`page_id_array_puts`; false until told).
    page_id_array_puts: AtomicBool,
}

impl Client {
    /// Connects with [`ClientOptions::default`]. See [`Target`] for accepted forms.
    pub async fn connect(target: &str) -> Result<Client, ClientError> {
        Client::connect_with(target, ClientOptions::default()).await
    }

    /// Connects with the given options; fails when the daemon is not reachable.
    pub async fn connect_with(target: &str, options: ClientOptions) -> Result<Client, ClientError> {
        let parsed = Target::parse(target)?;
        let uri = match &parsed {
            Target::Http(uri) => uri.clone(),
            // The authority is a placeholder: the connector below ignores it.
            Target::Unix(_) => "http://localhost".to_string(),
        };
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|e| ClientError::InvalidTarget {
                target: target.to_string(),
                reason: crate::error::error_chain(&e),
            })?
            .connect_timeout(options.connect_timeout)
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .max_frame_size(MAX_FRAME_BYTES)
            .tcp_nodelay(true)
            .keep_alive_while_idle(false);
        let endpoint = match &parsed {
            Target::Http(uri) if uri.starts_with("https://") => {
                let tls = options
                    .tls
                    .as_ref()
                    .and_then(|t| t.ca_pem.as_ref().map(|ca| (t, ca)));
                let Some((t, ca)) = tls else {
                    return Err(ClientError::InvalidTarget {
                        target: target.to_string(),
                        reason: "an https:// target needs the daemon's CA certificate (--tls-ca); this build trusts no system roots".into(),
                    });
                };
                let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
                if let Some((cert, key)) = &t.identity_pem {
                    config = config.identity(Identity::from_pem(cert, key));
                }
                if let Some(d) = &t.domain {
                    config = config.domain_name(d.clone());
                }
                endpoint
                    .tls_config(config)
                    .map_err(|e| ClientError::InvalidTarget {
                        target: target.to_string(),
                        reason: crate::error::error_chain(&e),
                    })?
            }
            _ => endpoint,
        };
        let connected = match &parsed {
            Target::Http(_) => endpoint.connect().await,
            Target::Unix(path) => {
                let path = path.clone();
                endpoint
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        crate::connect::unix(path.clone())
                    }))
                    .await
            }
        };
        let channel = connected.map_err(|source| ClientError::Connect {
            target: parsed.to_string(),
            source,
        })?;
        Ok(Client::from_channel(channel, options))
    }

    /// Wraps an existing channel (for example one built by a test harness).
    pub fn from_channel(channel: Channel, options: ClientOptions) -> Client {
        let inner = KvCacheClient::new(channel.clone())
            .max_decoding_message_size(options.max_message_bytes)
            .max_encoding_message_size(options.max_message_bytes);
        Client {
            inner,
            channel,
            options,
            learnt: Arc::new(Learnt {
                max_batch: AtomicUsize::new(MAX_BATCH),
                page_id_arrays: AtomicBool::new(false),
                compact_answers: AtomicBool::new(false),
                region_calls: AtomicBool::new(false),
                region_calls_allowed: region_calls_allowed(
                    std::env::var("KVSTRATA_REGION_CALLS").ok().as_deref(),
                ),
                page_id_array_puts: AtomicBool::new(false),
            }),
        }
    }

    /// The generated tonic client, with this client's message limits.
    pub fn raw(&self) -> KvCacheClient<Channel> {
        self.inner.clone()
    }

    /// The options this client was built with.
    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    fn request<T>(&self, msg: T, unary: bool) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if unary && let Some(d) = self.options.request_timeout {
            req.set_timeout(d);
        }
        if let Some(t) = &self.options.token {
            req.metadata_mut().insert("authorization", t.0.clone());
        }
        req
    }

    /// Awaits a call (a unary call, or the start of a streaming one) under the
    /// request timeout.
    async fn call<T>(
        &self,
        fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, ClientError> {
        let res = match self.options.request_timeout {
            Some(d) => tokio::time::timeout(d, fut)
                .await
                .map_err(|_| ClientError::Timeout(d))?,
            None => fut.await,
        };
        Ok(res?.into_inner())
    }

    /// Registers (idempotently) a KV geometry; the server validates it. A
    /// registered namespace keeps its policy.
    pub async fn register_namespace(
        &self,
        spec: &NamespaceSpec,
    ) -> Result<RegisteredNamespace, ClientError> {
        self.register_namespace_with(spec, None).await
    }

    /// Registers a KV geometry; a given policy replaces the namespace's own
    /// (e.g. `write_through`, which needs a disk tier).
    pub async fn register_namespace_with(
        &self,
        spec: &NamespaceSpec,
        policy: Option<NamespacePolicy>,
    ) -> Result<RegisteredNamespace, ClientError> {
        let req = proto::RegisterNamespaceRequest {
            spec: Some(spec_to_proto(spec)),
            policy: policy.map(|p| proto::NamespacePolicy {
                write_through: p.write_through,
                remote_write_through: p.remote_write_through,
                sync_write_through: p.sync_write_through,
            }),
        };
        let mut c = self.inner.clone();
        let resp = self
            .call(c.register_namespace(self.request(req, true)))
            .await?;
        let id = NamespaceId::from_slice("namespace_id", &resp.namespace_id)
            .map_err(|e| ClientError::InvalidResponse(e.to_string()))?;
        if resp.max_batch > 0 {
            self.learnt
                .max_batch
                .store(resp.max_batch as usize, Ordering::Relaxed);
        }
        self.learnt
            .page_id_arrays
            .store(resp.page_id_arrays, Ordering::Relaxed);
        self.learnt
            .compact_answers
            .store(resp.compact_answers, Ordering::Relaxed);
        self.learnt.region_calls.store(
            resp.region_calls && self.learnt.region_calls_allowed,
            Ordering::Relaxed,
        );
        self.learnt
            .page_id_array_puts
            .store(resp.page_id_array_puts, Ordering::Relaxed);
        Ok(RegisteredNamespace {
            id,
            block_bytes: resp.block_bytes,
            created: resp.created,
        })
    }

    /// The most keys the client sends in one `lookup`, `delete` or `evict`
    /// request: the daemon's `server.max_batch` once a `register_namespace`
    /// answer has given it, else [`MAX_BATCH`] (the daemon's default).
    pub fn max_batch(&self) -> usize {
        self.learnt.max_batch.load(Ordering::Relaxed)
    }

    /// Every registered namespace.
    pub async fn list_namespaces(&self) -> Result<Vec<proto::NamespaceInfo>, ClientError> {
        let mut c = self.inner.clone();
        let resp = self
            .call(c.list_namespaces(self.request(proto::ListNamespacesRequest {}, true)))
            .await?;
        Ok(resp.namespaces)
    }

    /// Longest cached prefix of a chain of keys (parent first), with the tier
    /// of each hit: one request per [`Client::max_batch`] keys, the next only while
    /// every key before it was found.
    pub async fn lookup(
        &self,
        ns: &NamespaceId,
        keys: &[impl AsRef<[u8]>],
    ) -> Result<proto::LookupResponse, ClientError> {
        let mut out = proto::LookupResponse::default();
        for chunk in key_chunks(keys, self.max_batch()) {
            let req = proto::LookupRequest {
                namespace_id: ns_bytes(ns),
                keys: keys_bytes(chunk),
            };
            let mut c = self.inner.clone();
            let resp = self.call(c.lookup(self.request(req, true))).await?;
            out.matched += resp.matched;
            out.tiers.extend(resp.tiers);
            if (resp.matched as usize) < chunk.len() {
                break;
            }
        }
        Ok(out)
    }

    /// Stores blocks in one message; one result per item, same order.
    pub async fn batch_put(
        &self,
        ns: &NamespaceId,
        items: Vec<PutItem>,
    ) -> Result<proto::BatchPutResponse, ClientError> {
        self.put_items(ns, items.into_iter().map(Into::into).collect())
            .await
    }

    /// BatchPut of items already in wire form (inline, pool ranges or KV pages).
    async fn put_items(
        &self,
        ns: &NamespaceId,
        items: Vec<proto::PutItem>,
    ) -> Result<proto::BatchPutResponse, ClientError> {
        let req = proto::BatchPutRequest {
            namespace_id: ns_bytes(ns),
            items,
            ..Default::default()
        };
        // Framed around the payloads: each inline payload goes out as it is.
        let mut channel = self.channel.clone();
        let max = self.options.max_message_bytes;
        self.call(crate::inline::batch_put(
            &mut channel,
            self.request(req, true),
            max,
        ))
        .await
    }

    /// BatchGet whose blocks go to pool ranges or KV pages (one per key):
    /// checks that the daemon answered one result per key.
    async fn get_into(
        &self,
        req: proto::BatchGetRequest,
    ) -> Result<Vec<proto::GetResult>, ClientError> {
        let keys = req.keys.len();
        let mut c = self.inner.clone();
        let results = self
            .call(c.batch_get(self.request(req, true)))
            .await?
            .results;
        if results.len() != keys {
            return Err(ClientError::InvalidResponse(format!(
                "BatchGet answered {} results for {keys} keys",
                results.len()
            )));
        }
        Ok(results)
    }

    /// Reads blocks in one message; one result per key, same order.
    pub async fn batch_get(
        &self,
        ns: &NamespaceId,
        keys: &[impl AsRef<[u8]>],
    ) -> Result<Vec<proto::GetResult>, ClientError> {
        let req = get_request(ns, keys);
        // Decoded where the frames arrived: each payload is its own frame.
        let mut channel = self.channel.clone();
        let max = self.options.max_message_bytes;
        Ok(self
            .call(crate::inline::batch_get(
                &mut channel,
                self.request(req, true),
                max,
            ))
            .await?
            .results)
    }

    /// Stores blocks whose bytes the daemon copies out of registered
    /// shared-memory pools ([`crate::SharedPool`]); one result per item, same
    /// order. An item whose range names no registered pool or lies outside
    /// its pool gets `PutStatus::BadRegion`; the others are stored as usual.
    /// Keep the ranges untouched until this returns.
    pub async fn batch_put_ranges(
        &self,
        ns: &NamespaceId,
        items: Vec<RangePutItem>,
    ) -> Result<proto::BatchPutResponse, ClientError> {
        self.put_items(ns, items.into_iter().map(Into::into).collect())
            .await
    }

    /// Reads blocks straight into shared-memory pool ranges, one range per
    /// key (each `length` = `block_bytes`); one result per key, same order.
    /// A found block's bytes are in its range and `payload` is empty; a
    /// result with `region_error` set (and `found` false) names a range the
    /// daemon could not write (unknown or closed pool, outside the pool).
    /// Ranges of keys not found are left as they were. Keep the ranges
    /// untouched until this returns.
    pub async fn batch_get_into(
        &self,
        ns: &NamespaceId,
        keys: &[impl AsRef<[u8]>],
        ranges: &[proto::PoolRange],
    ) -> Result<Vec<proto::GetResult>, ClientError> {
        if keys.len() != ranges.len() {
            // An empty `ranges` would silently turn this into an inline get.
            return Err(ClientError::InvalidArgument {
                field: "ranges",
                reason: format!(
                    "{} ranges for {} keys; exactly one range per key",
                    ranges.len(),
                    keys.len()
                ),
            });
        }
        let req = proto::BatchGetRequest {
            ranges: ranges.to_vec(),
            ..get_request(ns, keys)
        };
        self.get_into(req).await
    }

    /// Stores blocks gathered by the daemon from the pages of a registered KV
    /// region ([`crate::KvRegion`]); one result per item, same order. An item
    /// naming an unknown or closed region gets `PutStatus::BadRegion`; a page
    /// list that does not fit the region or the namespace is refused
    /// (INVALID_ARGUMENT naming `items[i].pages...`) and nothing is stored.
    /// Keep the pages untouched until this returns.
    pub async fn put_pages(
        &self,
        ns: &NamespaceId,
        items: Vec<crate::region::PagesPutItem>,
    ) -> Result<proto::BatchPutResponse, ClientError> {
        self.put_items(ns, items.into_iter().map(Into::into).collect())
            .await
    }

    /// [`Client::put_pages`] of pages of `region`, sent as a region call on
    /// the region's own connection when the daemon serves them
    /// (`docs/protocol.md`, "Region calls") and no other call holds that
    /// connection; otherwise over gRPC. The same request and answer either
    /// way. Blocks the calling thread for the call (in a multi-threaded
    /// runtime, through `block_in_place`).
    pub async fn put_pages_on(
        &self,
        region: &crate::KvRegion,
        ns: &NamespaceId,
        items: Vec<crate::region::PagesPutItem>,
    ) -> Result<proto::BatchPutResponse, ClientError> {
        let array = match self.learnt.page_id_array_puts.load(Ordering::Relaxed) {
            true => array_put(ns, region.id(), &items),
            false => None,
        };
        let req = array.unwrap_or_else(|| proto::BatchPutRequest {
            namespace_id: ns_bytes(ns),
            items: items.into_iter().map(Into::into).collect(),
            ..Default::default()
        });
        if self.learnt.region_calls.load(Ordering::Relaxed) {
            let body = prost::Message::encode_to_vec(&req);
            if let Some(answer) = self.region_call(region, CallKind::BatchPut, &body) {
                return decode_answer(&answer?);
            }
        }
        let mut c = self.inner.clone();
        self.call(c.batch_put(self.request(req, true))).await
    }

    /// [`Client::get_page_ids`] (`when_queued`: [`Client::get_page_ids_when_queued`])
    /// into pages of `region`, sent as a region call on the region's own
    /// connection when the daemon serves them and answers compactly, and no
    /// other call holds that connection; otherwise over gRPC. Blocks the
    /// calling thread for the call, as [`Client::put_pages_on`].
    pub async fn get_page_ids_on(
        &self,
        region: &crate::KvRegion,
        ns: &NamespaceId,
        keys: &[impl AsRef<[u8]>],
        page_ids: &[u32],
        when_queued: bool,
    ) -> Result<PagesFound, ClientError> {
        self.page_ids_get(ns, keys, region.id(), page_ids, when_queued, Some(region))
            .await
    }

    /// One region call on `region`'s connection, within the client's request
    /// timeout; `None` when the connection is busy or lost.
    fn region_call(
        &self,
        region: &crate::KvRegion,
        kind: CallKind,
        body: &[u8],
    ) -> Option<Result<Vec<u8>, ClientError>> {
        let timeout = self.options.request_timeout;
        let call = || region.try_call(kind, body, timeout);
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(call)
            }
            _ => call(),
        }
    }

    /// Reads blocks and has the daemon scatter them into the pages of a
    /// registered KV region, one `KvPages` per key; one result per key, same
    /// order. A found block is in its pages and `payload` is empty; a result
    /// with `region_error` set (and `found` false) names a region the daemon
    /// could not use. Pages of keys not found are left as they were.
    pub async fn get_pages(
        &self,
        ns: &NamespaceId,
        keys: &[impl AsRef<[u8]>],
        pages: &[proto::KvPages],
    ) -> Result<Vec<proto::GetResult>, ClientError> {
        if keys.len() != pages.len() {
            return Err(ClientError::InvalidArgument {
                field: "pages",
                reason: format!(
                    "{} page lists for {} keys; exactly one per key",
                    pages.len(),
                    keys.len()
                ),
            });
        }
        let req = proto::BatchGetRequest {
            pages: pages.to_vec(),
            ..get_request(ns, keys)
        };
        self.get_into(req).await
    }

    /// [`Client::get_pages`] for keys whose pages are all in region
    /// `region_id`: `page_ids` holds each key's page ids (the same number per
    /// key), one key's after the other. Sent as one page-id array, answered
    /// compactly (each key's tier, the keys that failed), when the daemon
    /// said at `register_namespace` that it can (no message per key to
    /// build, encode and decode either way), else as one `KvPages` per key
    /// answered with one `GetResult` per key; [`PagesFound`] reads either.
    pub async fn get_page_ids(
        &self,
        ns: &NamespaceId,
        keys: &[impl AsRef<[u8]>],
        region_id: u64,
        page_ids: &[u32],
    ) -> Result<PagesFound, ClientError> {
        self.page_ids_get(ns, keys, region_id, page_ids, false, None)
            .await
    }

    /// [`Client::get_page_ids`] that lets the daemon answer as soon as its
    /// copies into the pages are queued on the GPU (`answer_when_queued`):
    /// the answer's [`PagesFound::ready_event`], when set, is the CUDA IPC
    /// event the caller must wait on before it reads the pages (the copies
    /// then overlap the answer's way back). Asked only of a daemon that
    /// answers compactly; one that does not know the request answers once
    /// the pages are written, without an event.
    pub async fn get_page_ids_when_queued(
        &self,
        ns: &NamespaceId,
        keys: &[impl AsRef<[u8]>],
        region_id: u64,
        page_ids: &[u32],
    ) -> Result<PagesFound, ClientError> {
        self.page_ids_get(ns, keys, region_id, page_ids, true, None)
            .await
    }

    /// A get of `keys` into `page_ids` of region `region_id`; with `region`
    /// (that region), as a region call when the daemon serves them and the
    /// get is answered compactly.
    async fn page_ids_get(
        &self,
        ns: &NamespaceId,
        keys: &[impl AsRef<[u8]>],
        region_id: u64,
        page_ids: &[u32],
        when_queued: bool,
        region: Option<&crate::KvRegion>,
    ) -> Result<PagesFound, ClientError> {
        if keys.is_empty() && page_ids.is_empty() {
            return Ok(PagesFound::default());
        }
        if keys.is_empty() || page_ids.is_empty() || !page_ids.len().is_multiple_of(keys.len()) {
            return Err(ClientError::InvalidArgument {
                field: "page_ids",
                reason: format!(
                    "{} page ids for {} keys; give the same number for each key",
                    page_ids.len(),
                    keys.len()
                ),
            });
        }
        if !self.learnt.page_id_arrays.load(Ordering::Relaxed) {
            let per_key = page_ids.len() / keys.len();
            let pages: Vec<proto::KvPages> = page_ids
                .chunks(per_key)
                .map(|ids| proto::KvPages {
                    region_id,
                    page_ids: ids.to_vec(),
                })
                .collect();
            let results = self.get_pages(ns, keys, &pages).await?;
            return Ok(PagesFound::from_results(&results));
        }
        let compact = self.learnt.compact_answers.load(Ordering::Relaxed);
        let req = proto::BatchGetRequest {
            page_region_id: region_id,
            page_ids: page_ids.to_vec(),
            compact_answer: compact,
            answer_when_queued: when_queued && compact,
            ..get_request(ns, keys)
        };
        if !compact {
            return Ok(PagesFound::from_results(&self.get_into(req).await?));
        }
        if let Some(region) = region.filter(|_| self.learnt.region_calls.load(Ordering::Relaxed)) {
            let body = prost::Message::encode_to_vec(&req);
            if let Some(answer) = self.region_call(region, CallKind::BatchGet, &body) {
                return PagesFound::from_compact(decode_answer(&answer?)?, keys.len());
            }
        }
        let mut c = self.inner.clone();
        let resp = self.call(c.batch_get(self.request(req, true))).await?;
        PagesFound::from_compact(resp, keys.len())
    }

    /// Streams batches in (one request message per batch) and collects the
    /// answers, one per batch, in order.
    pub async fn put_stream<S>(
        &self,
        ns: &NamespaceId,
        batches: S,
    ) -> Result<Vec<proto::BatchPutResponse>, ClientError>
    where
        S: Stream<Item = Vec<PutItem>> + Send + 'static,
    {
        let namespace_id = ns_bytes(ns);
        let requests = batches.map(move |items| proto::BatchPutRequest {
            namespace_id: namespace_id.clone(),
            items: items.into_iter().map(Into::into).collect(),
            ..Default::default()
        });
        let mut c = self.inner.clone();
        let mut responses = self
            .call(c.put_stream(self.request(requests, false)))
            .await?;
        let mut out = Vec::new();
        while let Some(resp) = responses.message().await? {
            out.push(resp);
        }
        Ok(out)
    }

    /// [`Client::put_stream`] over batches already in memory.
    pub async fn put_batches(
        &self,
        ns: &NamespaceId,
        batches: Vec<Vec<PutItem>>,
    ) -> Result<Vec<proto::BatchPutResponse>, ClientError> {
        self.put_stream(ns, tokio_stream::iter(batches)).await
    }

    /// Streams blocks out: one message per key, in request order.
    pub async fn get_stream(
        &self,
        ns: &NamespaceId,
        keys: &[impl AsRef<[u8]>],
    ) -> Result<ClientStream<proto::GetResult>, ClientError> {
        let req = get_request(ns, keys);
        let mut c = self.inner.clone();
        let stream = self.call(c.get_stream(self.request(req, false))).await?;
        Ok(Box::pin(stream.map(|r| r.map_err(ClientError::from))))
    }

    /// Removes blocks from every tier (one request per [`Client::max_batch`] keys).
    pub async fn delete(
        &self,
        ns: &NamespaceId,
        keys: &[impl AsRef<[u8]>],
    ) -> Result<proto::DeleteResponse, ClientError> {
        let mut out = proto::DeleteResponse::default();
        for chunk in key_chunks(keys, self.max_batch()) {
            let req = proto::DeleteRequest {
                namespace_id: ns_bytes(ns),
                keys: keys_bytes(chunk),
            };
            let mut c = self.inner.clone();
            out.deleted += self.call(c.delete(self.request(req, true))).await?.deleted;
        }
        Ok(out)
    }

    /// Demotes blocks one tier down (one request per [`Client::max_batch`] keys);
    /// with `all` and no keys, the whole namespace.
    pub async fn evict(
        &self,
        ns: &NamespaceId,
        keys: &[impl AsRef<[u8]>],
        all: bool,
    ) -> Result<proto::EvictResponse, ClientError> {
        let mut out = proto::EvictResponse::default();
        for chunk in key_chunks(keys, self.max_batch()) {
            let req = proto::EvictRequest {
                namespace_id: ns_bytes(ns),
                keys: keys_bytes(chunk),
                all,
            };
            let mut c = self.inner.clone();
            let resp = self.call(c.evict(self.request(req, true))).await?;
            out.evicted += resp.evicted;
            out.skipped_pinned += resp.skipped_pinned;
        }
        Ok(out)
    }

    /// Pins blocks under a lease (sent in whole milliseconds).
    pub async fn pin(
        &self,
        ns: &NamespaceId,
        keys: &[impl AsRef<[u8]>],
        lease: Duration,
    ) -> Result<proto::PinResponse, ClientError> {
        let req = proto::PinRequest {
            namespace_id: ns_bytes(ns),
            keys: keys_bytes(keys),
            lease_ms: lease_millis(lease),
        };
        let mut c = self.inner.clone();
        self.call(c.pin(self.request(req, true))).await
    }

    /// Ends a lease before its deadline.
    pub async fn unpin(&self, lease_id: u64) -> Result<(), ClientError> {
        let mut c = self.inner.clone();
        self.call(c.unpin(self.request(proto::UnpinRequest { lease_id }, true)))
            .await?;
        Ok(())
    }

    /// Per-tier counters and occupancy.
    pub async fn stats(&self) -> Result<proto::StatsResponse, ClientError> {
        let mut c = self.inner.clone();
        self.call(c.stats(self.request(proto::StatsRequest {}, true)))
            .await
    }

    /// One page of cached blocks. `page_size` 0 is the server's default; an empty
    /// `page_token` asks for the first page.
    pub async fn list_blocks(
        &self,
        ns: Option<&NamespaceId>,
        tier: Option<proto::Tier>,
        page_size: u32,
        page_token: Bytes,
    ) -> Result<proto::ListBlocksResponse, ClientError> {
        let req = proto::ListBlocksRequest {
            namespace_id: ns.map(ns_bytes).unwrap_or_default(),
            tier: tier.unwrap_or(proto::Tier::Unspecified) as i32,
            page_size,
            page_token,
        };
        let mut c = self.inner.clone();
        self.call(c.list_blocks(self.request(req, true))).await
    }

    /// Every cached block (following pages), or the first `limit` of them.
    pub async fn list_all_blocks(
        &self,
        ns: Option<&NamespaceId>,
        tier: Option<proto::Tier>,
        limit: Option<usize>,
    ) -> Result<Vec<proto::BlockInfo>, ClientError> {
        const PAGE: usize = 1000;
        let mut out = Vec::new();
        let mut token = Bytes::new();
        loop {
            let want = match limit {
                Some(l) if out.len() >= l => break,
                Some(l) => (l - out.len()).min(PAGE),
                None => PAGE,
            };
            let page = self
                .list_blocks(ns, tier, want as u32, token.clone())
                .await?;
            out.extend(page.blocks);
            if page.next_page_token.is_empty() {
                break;
            }
            if page.next_page_token == token {
                return Err(ClientError::InvalidResponse(
                    "ListBlocks returned the same page token twice".into(),
                ));
            }
            token = page.next_page_token;
        }
        if let Some(l) = limit {
            out.truncate(l);
        }
        Ok(out)
    }

    /// Everything known about one block, with a fresh checksum of its payload.
    pub async fn inspect(
        &self,
        ns: &NamespaceId,
        key: impl AsRef<[u8]>,
    ) -> Result<proto::InspectResponse, ClientError> {
        let req = proto::InspectRequest {
            namespace_id: ns_bytes(ns),
            key: Bytes::copy_from_slice(key.as_ref()),
        };
        let mut c = self.inner.clone();
        self.call(c.inspect(self.request(req, true))).await
    }

    /// Reads and checks every disk-tier slot (no request timeout: the scan
    /// takes as long as reading the disk tier); with `drop_corrupt` the bad
    /// slots are dropped as a read would drop them.
    pub async fn verify(&self, drop_corrupt: bool) -> Result<proto::VerifyResponse, ClientError> {
        let mut c = self.inner.clone();
        let resp = c
            .verify(self.request(proto::VerifyRequest { drop_corrupt }, false))
            .await?;
        Ok(resp.into_inner())
    }

    /// Stored / evicted / deleted events of one namespace, or of all with `None`.
    pub async fn watch(
        &self,
        ns: Option<&NamespaceId>,
    ) -> Result<ClientStream<proto::WatchEvent>, ClientError> {
        let req = proto::WatchRequest {
            namespace_id: ns.map(ns_bytes).unwrap_or_default(),
        };
        let mut c = self.inner.clone();
        let stream = self.call(c.watch(self.request(req, false))).await?;
        Ok(Box::pin(stream.map(|r| r.map_err(ClientError::from))))
    }
}

/// Whether `KVSTRATA_REGION_CALLS` lets a client use region calls: yes
/// unless it says `0`, `off` or `false` (as the Python client reads it).
fn region_calls_allowed(setting: Option<&str>) -> bool {
    !setting.is_some_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "0" | "off" | "false"
        )
    })
}

/// A page put in the array form (`keys`, `page_region_id`, `page_ids`,
/// parents chained when each item's parent is the key before it), when every
/// item names the same number of pages of region `region_id`; else `None`.
fn array_put(
    ns: &NamespaceId,
    region_id: u64,
    items: &[crate::region::PagesPutItem],
) -> Option<proto::BatchPutRequest> {
    let ppb = items.first()?.pages.page_ids.len();
    if items
        .iter()
        .any(|it| it.pages.region_id != region_id || it.pages.page_ids.len() != ppb)
    {
        return None;
    }
    let chained = items
        .windows(2)
        .all(|w| w[1].parent.as_ref() == Some(&w[0].key));
    let mut req = proto::BatchPutRequest {
        namespace_id: ns_bytes(ns),
        keys: items.iter().map(|it| it.key.clone()).collect(),
        page_region_id: region_id,
        page_ids: items
            .iter()
            .flat_map(|it| it.pages.page_ids.iter().copied())
            .collect(),
        ..Default::default()
    };
    if chained {
        req.chain_parents = true;
        req.first_parent = items[0].parent.clone().unwrap_or_default();
    } else if items.iter().any(|it| it.parent.is_some()) {
        req.parents = items
            .iter()
            .map(|it| it.parent.clone().unwrap_or_default())
            .collect();
    }
    Some(req)
}

/// A region call's answer: the response's protobuf encoding.
fn decode_answer<M: prost::Message + Default>(body: &[u8]) -> Result<M, ClientError> {
    M::decode(body).map_err(|e| ClientError::InvalidResponse(format!("region call answer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_puts_chain_or_list_parents_and_need_one_region() {
        use crate::region::PagesPutItem;
        let ns = NamespaceId::from_slice("ns", &[3u8; 16]).expect("ns");
        let pages = |ids: Vec<u32>| proto::KvPages {
            region_id: 7,
            page_ids: ids,
        };
        let chain = vec![
            PagesPutItem::new(&b"a"[..], pages(vec![1, 2])).with_parent(&b"r"[..]),
            PagesPutItem::new(&b"b"[..], pages(vec![3, 4])).with_parent(&b"a"[..]),
        ];
        let req = array_put(&ns, 7, &chain).expect("one region");
        assert!(req.chain_parents && req.parents.is_empty() && req.items.is_empty());
        assert_eq!(&req.first_parent[..], b"r");
        assert_eq!(req.page_ids, vec![1, 2, 3, 4]);
        assert_eq!(
            req.keys,
            vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]
        );
        let listed = vec![
            PagesPutItem::new(&b"a"[..], pages(vec![1, 2])),
            PagesPutItem::new(&b"b"[..], pages(vec![3, 4])).with_parent(&b"x"[..]),
        ];
        let req = array_put(&ns, 7, &listed).expect("one region");
        assert!(!req.chain_parents && req.first_parent.is_empty());
        assert_eq!(req.parents, vec![Bytes::new(), Bytes::from_static(b"x")]);
        let none = vec![PagesPutItem::new(&b"a"[..], pages(vec![1, 2]))];
        let req = array_put(&ns, 7, &none).expect("one region");
        assert!(req.chain_parents && req.first_parent.is_empty() && req.parents.is_empty());
        assert!(array_put(&ns, 8, &none).is_none(), "another region");
        let uneven = vec![
            PagesPutItem::new(&b"a"[..], pages(vec![1, 2])),
            PagesPutItem::new(&b"b"[..], pages(vec![3])),
        ];
        assert!(array_put(&ns, 7, &uneven).is_none(), "page counts differ");
        assert!(array_put(&ns, 7, &[]).is_none());
    }

    #[test]
    fn region_calls_are_on_unless_the_setting_says_off() {
        for on in [None, Some(""), Some("1"), Some("on"), Some("yes")] {
            assert!(region_calls_allowed(on), "{on:?}");
        }
        for off in ["0", "off", "false", " OFF ", "False"] {
            assert!(!region_calls_allowed(Some(off)), "{off:?}");
        }
    }

    #[test]
    fn put_item_without_parent_sends_empty_parent() {
        let w: proto::PutItem = PutItem::new(&b"k"[..], &b"pp"[..]).into();
        assert!(w.parent.is_empty());
        let w: proto::PutItem = PutItem::new(&b"k"[..], &b"pp"[..])
            .with_parent(&b"p"[..])
            .into();
        assert_eq!(&w.parent[..], b"p");
    }

    #[test]
    fn range_put_item_sends_the_range_and_no_payload() {
        let range = proto::PoolRange {
            pool_id: 3,
            offset: 128,
            length: 4096,
        };
        let w: proto::PutItem = RangePutItem::new(&b"k"[..], range).into();
        assert!(w.payload.is_empty() && w.parent.is_empty());
        assert_eq!(w.range, Some(range));
        let w: proto::PutItem = RangePutItem::new(&b"k"[..], range)
            .with_parent(&b"p"[..])
            .into();
        assert_eq!(&w.parent[..], b"p");
        assert_eq!(&w.key[..], b"k");
    }

    #[tokio::test]
    async fn batch_get_into_needs_one_range_per_key() {
        // A lazily connected channel: the check fails before anything is sent.
        let channel = Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let client = Client::from_channel(channel, ClientOptions::default());
        let ns = NamespaceId::from_slice("ns", &[1; 16]).unwrap();
        let e = client
            .batch_get_into(&ns, &[b"a", b"b"], &[proto::PoolRange::default()])
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                ClientError::InvalidArgument {
                    field: "ranges",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("1 ranges for 2 keys"), "{e}");
    }

    #[test]
    fn lease_is_whole_milliseconds() {
        assert_eq!(lease_millis(Duration::from_secs(30)), 30_000);
        assert_eq!(lease_millis(Duration::from_micros(10)), 1);
        assert_eq!(lease_millis(Duration::ZERO), 0);
        assert_eq!(lease_millis(Duration::from_micros(2500)), 2);
    }

    #[test]
    fn defaults() {
        let o = ClientOptions::default();
        assert_eq!(o.max_message_bytes, 512 * 1024 * 1024);
        assert_eq!(o.connect_timeout, Duration::from_secs(5));
        assert_eq!(o.request_timeout, None);
    }

    #[tokio::test]
    async fn connecting_to_nothing_is_a_connect_error() {
        let dir = std::env::temp_dir().join(format!("kvstrata-client-test-{}", std::process::id()));
        let sock = dir.join("absent.sock");
        let e = Client::connect(&format!("unix://{}", sock.display()))
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }), "{e:?}");
        assert!(e.to_string().contains("absent.sock"), "{e}");
        let e = Client::connect("https://x:1").await.unwrap_err();
        assert!(e.to_string().contains("--tls-ca"), "{e}");
    }

    #[test]
    fn bearer_tokens() {
        assert!(BearerToken::new("abc def").is_err());
        assert!(BearerToken::new("").is_err());
        let t = BearerToken::new(" tok-123 ").unwrap();
        assert_eq!(t.0.to_str().unwrap(), "Bearer tok-123");
        assert!(!format!("{t:?}").contains("tok-123"));
    }
}
