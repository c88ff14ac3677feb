//! Authentication and tenancy against a real daemon: bearer tokens on TCP
//! (rotation, SIGHUP reload), peer uid on the Unix sockets, tenants bound to
//! namespaces, the non-loopback start-up guard, TLS with and without client
//! certificates. (The CLI's token flags and SIGHUP reload of the real binary
//! are cli/tests/auth.rs.)

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kvstrata_client::{BearerToken, Client, ClientError, ClientOptions, ClientTls};
use kvstrata_server::auth::FailureReason;
use kvstrata_server::{Config, Daemon};
use tokio_stream::StreamExt;

use common::{config, openssl, payload, small_spec};

const ADMIN: &str = "admin-token-0123456789abcdef";
const ADMIN2: &str = "admin-token-second-0123456789";
const TENANT_A: &str = "tenant-a-token-0123456789abcdef";
const TENANT_B: &str = "tenant-b-token-0123456789abcdef";

fn write_tokens(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn token_config(dir: &Path, tokens: &str) -> (Config, PathBuf) {
    let file = dir.join("tokens");
    write_tokens(&file, tokens);
    let mut c = config(dir, 8 << 20, 4096);
    c.auth.token_file = file.display().to_string();
    (c, file)
}

/// Starts a daemon on `c` (whose token file names tenants "tenant-a" and
/// "tenant-b"): the daemon, its TCP target and a client of each tenant.
async fn start_tenants(c: Config) -> (Daemon, String, Client, Client) {
    let d = Daemon::start(c).await.unwrap();
    let target = d.addrs().tcp_target().unwrap();
    let a = with_token(&target, Some(TENANT_A)).await;
    let b = with_token(&target, Some(TENANT_B)).await;
    (d, target, a, b)
}

/// A client on the daemon's Unix socket: the admin (peer uid) caller.
async fn admin_over_uds(d: &Daemon) -> Client {
    Client::connect(&d.addrs().uds_target().unwrap())
        .await
        .unwrap()
}

async fn with_token(target: &str, token: Option<&str>) -> Client {
    let options = ClientOptions {
        token: token.map(|t| BearerToken::new(t).unwrap()),
        ..ClientOptions::default()
    };
    Client::connect_with(target, options).await.unwrap()
}

fn code(e: &ClientError) -> Option<tonic::Code> {
    e.code()
}

#[tokio::test]
async fn auth_tcp_needs_a_known_bearer_token_and_health_stays_open() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _) = token_config(
        dir.path(),
        &format!("# two admin tokens (rotation)\n{ADMIN}\n\n{ADMIN2}\n"),
    );
    let d = Daemon::start(c).await.unwrap();
    let target = d.addrs().tcp_target().unwrap();

    let e = with_token(&target, None).await.stats().await.unwrap_err();
    assert_eq!(code(&e), Some(tonic::Code::Unauthenticated), "{e}");
    assert!(e.to_string().contains("authorization"), "{e}");
    let e = with_token(&target, Some("wrong-token-0123456789abcdef"))
        .await
        .stats()
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(tonic::Code::Unauthenticated), "{e}");
    // Both tokens are valid at once.
    with_token(&target, Some(ADMIN))
        .await
        .stats()
        .await
        .unwrap();
    with_token(&target, Some(ADMIN2))
        .await
        .stats()
        .await
        .unwrap();
    let counters = d.auth().counters();
    assert_eq!(counters.failures(FailureReason::Missing), 1);
    assert_eq!(counters.failures(FailureReason::UnknownToken), 1);

    // The Unix socket takes no token (the peer uid is ours).
    Client::connect(&d.addrs().uds_target().unwrap())
        .await
        .unwrap()
        .stats()
        .await
        .unwrap();

    // Health answers probes without a token.
    let channel = tonic::transport::Endpoint::from_shared(target)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "kvstrata.v1.KvCache".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        r.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let m = common::metrics_text(&d).await;
    assert!(
        m.contains("kvstrata_auth_failures_total{reason=\"missing\"} 1"),
        "{m}"
    );
    d.shutdown().await.unwrap();
}

#[tokio::test]
async fn auth_reload_swaps_tokens_and_a_bad_file_keeps_the_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (c, file) = token_config(dir.path(), &format!("{ADMIN}\n"));
    let d = Daemon::start(c).await.unwrap();
    let target = d.addrs().tcp_target().unwrap();
    let old = with_token(&target, Some(ADMIN)).await;
    let new = with_token(&target, Some(ADMIN2)).await;
    old.stats().await.unwrap();
    assert!(new.stats().await.is_err());

    // Rotation, step 1: both valid.
    write_tokens(&file, &format!("{ADMIN}\n{ADMIN2}\n"));
    assert_eq!(d.reload_tokens().unwrap(), 2);
    old.stats().await.unwrap();
    new.stats().await.unwrap();
    // Step 2: the old one revoked (same connection, next call refused).
    write_tokens(&file, &format!("{ADMIN2}\n"));
    assert_eq!(d.reload_tokens().unwrap(), 1);
    let e = old.stats().await.unwrap_err();
    assert_eq!(code(&e), Some(tonic::Code::Unauthenticated), "{e}");
    new.stats().await.unwrap();

    // A bad file changes nothing.
    write_tokens(&file, "short\n");
    let e = d.reload_tokens().unwrap_err();
    assert!(e.to_string().contains("tokens:1"), "{e}");
    new.stats().await.unwrap();
    std::fs::remove_file(&file).unwrap();
    assert!(d.reload_tokens().is_err());
    new.stats().await.unwrap();
    let m = common::metrics_text(&d).await;
    assert!(
        m.contains("kvstrata_auth_reloads_total{result=\"ok\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("kvstrata_auth_reloads_total{result=\"error\"} 2"),
        "{m}"
    );
    d.shutdown().await.unwrap();
}

#[tokio::test]
async fn auth_tenants_cannot_touch_each_others_namespaces() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _) = token_config(
        dir.path(),
        &format!("{TENANT_A} tenant-a\n{TENANT_B} tenant-b\n{ADMIN}\n"),
    );
    let (d, target, a, b) = start_tenants(c).await;
    let admin = admin_over_uds(&d).await;

    let reg = a.register_namespace(&small_spec("model-a")).await.unwrap();
    let ns = reg.id;
    let len = reg.block_bytes as usize;
    common::put(&a, &ns, "k1", None, len).await;
    assert!(common::present(&a, &ns, "k1", len).await);
    let b_ns = b
        .register_namespace(&small_spec("model-b"))
        .await
        .unwrap()
        .id;

    let denied = |r: Result<(), ClientError>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(code(&e), Some(tonic::Code::PermissionDenied), "{what}: {e}");
        assert!(e.to_string().contains("namespace_id"), "{what}: {e}");
    };
    denied(b.batch_get(&ns, &[b"k1"]).await.map(|_| ()), "get");
    denied(b.lookup(&ns, &[b"k1"]).await.map(|_| ()), "lookup");
    denied(
        b.batch_put(&ns, vec![common::item("k1", None, len)])
            .await
            .map(|_| ()),
        "put",
    );
    denied(b.delete(&ns, &[b"k1"]).await.map(|_| ()), "delete");
    denied(b.evict(&ns, &[b"k1"], false).await.map(|_| ()), "evict");
    denied(
        b.pin(&ns, &[b"k1"], Duration::from_secs(5))
            .await
            .map(|_| ()),
        "pin",
    );
    denied(b.inspect(&ns, b"k1").await.map(|_| ()), "inspect");
    denied(b.get_stream(&ns, &[b"k1"]).await.map(|_| ()), "get_stream");
    denied(b.watch(Some(&ns)).await.map(|_| ()), "watch");
    denied(
        b.list_blocks(Some(&ns), None, 0, Default::default())
            .await
            .map(|_| ()),
        "list_blocks",
    );
    let streamed = b
        .put_batches(&ns, vec![vec![common::item("k2", None, len)]])
        .await;
    denied(streamed.map(|_| ()), "put_stream");
    // A tenant may not name shared-memory pools (same-host clients' memory).
    let range = kvstrata_client::proto::PoolRange {
        pool_id: 1,
        offset: 0,
        length: len as u64,
    };
    let e = b
        .batch_get_into(&b_ns, &[b"kb"], &[range])
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(tonic::Code::PermissionDenied), "{e}");
    assert!(e.to_string().contains("ranges"), "{e}");
    let e = b
        .batch_put_ranges(
            &b_ns,
            vec![kvstrata_client::RangePutItem::new(&b"kb"[..], range)],
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(tonic::Code::PermissionDenied), "{e}");
    // A page put in the array form names a KV region too.
    let mut raw = b.raw();
    let mut put = tonic::Request::new(kvstrata_client::proto::BatchPutRequest {
        namespace_id: bytes::Bytes::copy_from_slice(b_ns.as_bytes()),
        keys: vec![bytes::Bytes::from_static(b"kb")],
        page_region_id: 1,
        page_ids: vec![0],
        ..Default::default()
    });
    put.metadata_mut().insert(
        "authorization",
        format!("Bearer {TENANT_B}").parse().unwrap(),
    );
    let e = raw.batch_put(put).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    // Registering the same geometry does not take it over.
    let e = b
        .register_namespace(&small_spec("model-a"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(tonic::Code::PermissionDenied), "{e}");
    // Verify reaches every namespace: admins only.
    let e = b.verify(false).await.unwrap_err();
    assert_eq!(code(&e), Some(tonic::Code::PermissionDenied), "{e}");

    // Nothing changed: the admin (Unix socket) still reads A's bytes, k2 is absent.
    assert!(common::present(&admin, &ns, "k1", len).await);
    assert!(!common::present(&admin, &ns, "k2", len).await);
    assert!(d.auth().counters().failures(FailureReason::WrongTenant) >= 12);

    // Listings are filtered to the tenant's namespaces.
    let ids = |v: Vec<kvstrata_client::proto::NamespaceInfo>| {
        v.into_iter()
            .map(|n| n.namespace_id.to_vec())
            .collect::<Vec<_>>()
    };
    let seen_b = ids(b.list_namespaces().await.unwrap());
    assert_eq!(seen_b, vec![b_ns.as_bytes().to_vec()]);
    let seen_a = ids(a.list_namespaces().await.unwrap());
    assert_eq!(seen_a, vec![ns.as_bytes().to_vec()]);
    assert_eq!(ids(admin.list_namespaces().await.unwrap()).len(), 2);
    assert!(
        b.list_all_blocks(None, None, None)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(a.list_all_blocks(None, None, None).await.unwrap().len(), 1);
    // An admin token (no tenant) sees everything too.
    let admin_tcp = with_token(&target, Some(ADMIN)).await;
    assert!(common::present(&admin_tcp, &ns, "k1", len).await);

    // B's unfiltered Watch does not carry A's events.
    let mut events = b.watch(None).await.unwrap();
    common::put(&a, &ns, "k3", None, len).await;
    common::put(&b, &b_ns, "kb", None, len).await;
    let ev = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(&ev.namespace_id[..], b_ns.as_bytes());
    assert_eq!(&ev.key[..], b"kb");
    // A still reads its own block, byte for byte.
    let got = a.batch_get(&ns, &[b"k1"]).await.unwrap();
    assert_eq!(got[0].payload, payload("k1", 0, len));
    d.shutdown().await.unwrap();
}

#[tokio::test]
async fn auth_non_loopback_tcp_needs_a_token_file_or_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), 1 << 20, 64);
    c.server.tcp_addr = "0.0.0.0:0".into();
    let e = Daemon::start(c.clone()).await.err().expect("refused");
    let msg = e.to_string();
    assert!(
        msg.contains("auth.token_file") && msg.contains("--insecure"),
        "{msg}"
    );
    c.auth.insecure = true;
    let d = Daemon::start(c.clone()).await.unwrap();
    d.shutdown().await.unwrap();
    c.auth.insecure = false;
    let file = dir.path().join("tokens");
    write_tokens(&file, &format!("{ADMIN}\n"));
    c.auth.token_file = file.display().to_string();
    let d = Daemon::start(c).await.unwrap();
    d.shutdown().await.unwrap();
}

#[tokio::test]
async fn auth_unix_peers_outside_the_allow_list_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), 1 << 20, 64);
    let other = kvstrata_server::auth::own_uid().wrapping_add(4242);
    c.auth.uid_allow = vec![other];
    c.shm.mempool_socket = dir.path().join("mempool.sock").display().to_string();
    c.sglang.socket = dir.path().join("sglang.sock").display().to_string();
    let d = Daemon::start(c).await.unwrap();
    // Sockets stay owner-only.
    use std::os::unix::fs::PermissionsExt;
    for p in [
        d.addrs().uds.clone().unwrap(),
        d.addrs().mempool.clone().unwrap(),
    ] {
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", p.display());
    }
    let e = Client::connect(&d.addrs().uds_target().unwrap())
        .await
        .unwrap()
        .stats()
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(tonic::Code::PermissionDenied), "{e}");
    assert!(e.to_string().contains("uid_allow"), "{e}");
    use tokio::io::AsyncReadExt;
    // The mempool and SGLang sockets close the connection at once.
    for sock in [d.addrs().mempool.clone(), d.addrs().sglang.clone()] {
        let mut s = tokio::net::UnixStream::connect(sock.unwrap())
            .await
            .unwrap();
        let mut buf = [0u8; 4];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
    assert_eq!(d.auth().counters().failures(FailureReason::UidDenied), 3);
    d.shutdown().await.unwrap();
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made
/// with the `openssl` command.
struct Certs {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn make_certs(dir: &Path) -> Certs {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=kvstrata test CA",
        ],
    );
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth",
        ),
        ("client", "extendedKeyUsage=clientAuth"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN=kvstrata {name}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
    Certs {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    }
}

async fn tls_client(target: &str, certs: &Certs, with_cert: bool) -> Result<Client, ClientError> {
    let pair = with_cert.then_some((certs.client_cert.as_path(), certs.client_key.as_path()));
    let options = ClientOptions {
        tls: Some(ClientTls::from_files(Some(&certs.ca), pair).unwrap()),
        token: Some(BearerToken::new(ADMIN).unwrap()),
        request_timeout: Some(Duration::from_secs(5)),
        ..ClientOptions::default()
    };
    Client::connect_with(target, options).await
}

/// Whether a plaintext client fails (connect or first call) within a bound.
async fn plaintext_fails(target: &str) -> bool {
    let options = ClientOptions {
        token: Some(BearerToken::new(ADMIN).unwrap()),
        request_timeout: Some(Duration::from_secs(3)),
        connect_timeout: Duration::from_secs(3),
        ..ClientOptions::default()
    };
    match Client::connect_with(target, options).await {
        Err(_) => true,
        Ok(c) => c.stats().await.is_err(),
    }
}

#[tokio::test]
async fn auth_tls_with_and_without_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let (mut c, _) = token_config(dir.path(), &format!("{ADMIN}\n"));
    c.tls.cert = certs.server_cert.display().to_string();
    c.tls.key = certs.server_key.display().to_string();
    let d = Daemon::start(c.clone()).await.unwrap();
    let port = d.addrs().tcp.unwrap().port();
    let https = format!("https://127.0.0.1:{port}");
    let client = tls_client(&https, &certs, false).await.unwrap();
    let reg = client.register_namespace(&small_spec("tls")).await.unwrap();
    common::put(&client, &reg.id, "k", None, reg.block_bytes as usize).await;
    assert!(common::present(&client, &reg.id, "k", reg.block_bytes as usize).await);
    // A plaintext client against the TLS listener fails cleanly.
    assert!(plaintext_fails(&format!("http://127.0.0.1:{port}")).await);
    // An https target without a CA is refused before connecting.
    let e = Client::connect(&https).await.unwrap_err();
    assert!(e.to_string().contains("--tls-ca"), "{e}");
    d.shutdown().await.unwrap();

    // Client certificates required.
    c.tls.client_ca = certs.ca.display().to_string();
    let d = Daemon::start(c).await.unwrap();
    let port = d.addrs().tcp.unwrap().port();
    let https = format!("https://127.0.0.1:{port}");
    let with_cert = tls_client(&https, &certs, true).await.unwrap();
    with_cert.stats().await.unwrap();
    let without = match tls_client(&https, &certs, false).await {
        Err(_) => true,
        Ok(c) => c.stats().await.is_err(),
    };
    assert!(without, "a client without a certificate was served");
    d.shutdown().await.unwrap();
}

#[tokio::test]
async fn auth_tenant_bindings_survive_a_restart_with_the_disk_tier() {
    // O_DIRECT slot files need a real file system (not tmpfs).
    let dir = tempfile::Builder::new()
        .prefix("kvs-auth-disk-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let (mut c, _) = token_config(
        dir.path(),
        &format!("{TENANT_A} tenant-a\n{TENANT_B} tenant-b\n"),
    );
    c.disk.paths = vec![format!("{}=8MiB", dir.path().join("slots.kvs").display())];
    c.disk.engine = kvstrata_server::config::DiskIoEngine::Pread;
    c.disk.segment_bytes = bytesize::ByteSize::mib(1);
    let d = Daemon::start(c.clone()).await.unwrap();
    let a = with_token(&d.addrs().tcp_target().unwrap(), Some(TENANT_A)).await;
    let policy = kvstrata_tiers::NamespacePolicy {
        write_through: true,
        ..Default::default()
    };
    let reg = a
        .register_namespace_with(&small_spec("persist"), Some(policy))
        .await
        .unwrap();
    let len = reg.block_bytes as usize;
    common::put(&a, &reg.id, "k", None, len).await;
    // Wait for the write-through copy to reach the disk tier (an admin's
    // Stats: a tenant's shows no occupancy).
    let admin = admin_over_uds(&d).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = admin.stats().await.unwrap();
        let on_disk = s
            .tiers
            .iter()
            .any(|t| t.tier == kvstrata_client::proto::Tier::Disk as i32 && t.blocks >= 1);
        if on_disk {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "write-through never reached the disk"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(admin);
    d.shutdown().await.unwrap();

    let (d, _, a, b) = start_tenants(c).await;
    let e = b.batch_get(&reg.id, &[b"k"]).await.unwrap_err();
    assert_eq!(code(&e), Some(tonic::Code::PermissionDenied), "{e}");
    let e = b
        .register_namespace(&small_spec("persist"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(tonic::Code::PermissionDenied), "{e}");
    assert!(common::present(&a, &reg.id, "k", len).await);
    let seen: Vec<_> = a.list_namespaces().await.unwrap();
    assert_eq!(seen.len(), 1);
    assert!(b.list_namespaces().await.unwrap().is_empty());
    d.shutdown().await.unwrap();
}

#[tokio::test]
async fn auth_a_tenant_may_unpin_only_leases_on_its_own_namespaces() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _) = token_config(
        dir.path(),
        &format!("{TENANT_A} tenant-a\n{TENANT_B} tenant-b\n"),
    );
    let (d, _, a, b) = start_tenants(c).await;
    let admin = admin_over_uds(&d).await;
    let reg = a.register_namespace(&small_spec("lease-a")).await.unwrap();
    let (ns, len) = (reg.id, reg.block_bytes as usize);
    common::put(&a, &ns, "k1", None, len).await;
    let lease = a.pin(&ns, &[b"k1"], Duration::from_secs(60)).await.unwrap();
    let pins =
        |blocks: Vec<kvstrata_client::proto::BlockInfo>| blocks.iter().map(|b| b.pins).sum::<u32>();

    // B cannot end A's lease: refused, naming lease_id; the pin holds.
    let before = d.auth().counters().failures(FailureReason::WrongTenant);
    let e = b.unpin(lease.lease_id).await.unwrap_err();
    assert_eq!(code(&e), Some(tonic::Code::PermissionDenied), "{e}");
    assert!(e.to_string().contains("lease_id"), "{e}");
    assert_eq!(
        d.auth().counters().failures(FailureReason::WrongTenant),
        before + 1
    );
    assert_eq!(
        pins(admin.list_all_blocks(Some(&ns), None, None).await.unwrap()),
        1
    );
    let r = admin.evict(&ns, &[b"k1"], false).await.unwrap();
    assert_eq!((r.evicted, r.skipped_pinned), (0, 1));
    // A lease on an admin's (unbound) namespace is not B's either.
    let (admin_ns, _) = common::register(&admin, "lease-admin").await;
    common::put(&admin, &admin_ns, "k", None, len).await;
    let admin_lease = admin
        .pin(&admin_ns, &[b"k"], Duration::from_secs(60))
        .await
        .unwrap();
    let e = b.unpin(admin_lease.lease_id).await.unwrap_err();
    assert_eq!(code(&e), Some(tonic::Code::PermissionDenied), "{e}");
    // An unknown lease stays NOT_FOUND for a tenant too.
    let e = b.unpin(999_999).await.unwrap_err();
    assert_eq!(code(&e), Some(tonic::Code::NotFound), "{e}");

    // A ends its own lease; the admin may end any.
    a.unpin(lease.lease_id).await.unwrap();
    assert_eq!(
        pins(admin.list_all_blocks(Some(&ns), None, None).await.unwrap()),
        0
    );
    admin.unpin(admin_lease.lease_id).await.unwrap();
    assert!(common::present(&a, &ns, "k1", len).await);
    d.shutdown().await.unwrap();
}

#[tokio::test]
async fn auth_a_tenants_stats_show_the_daemons_shape_not_others_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _) = token_config(
        dir.path(),
        &format!("{TENANT_A} tenant-a\n{TENANT_B} tenant-b\n{ADMIN}\n"),
    );
    let (d, target, a, b) = start_tenants(c).await;
    let admin = with_token(&target, Some(ADMIN)).await;
    let reg = a.register_namespace(&small_spec("stats-a")).await.unwrap();
    let (ns, len) = (reg.id, reg.block_bytes as usize);
    for k in ["k1", "k2", "k3"] {
        common::put(&a, &ns, k, None, len).await;
    }
    assert!(common::present(&a, &ns, "k1", len).await);
    a.pin(&ns, &[b"k2"], Duration::from_secs(60)).await.unwrap();

    // The admin sees the traffic.
    let full = admin.stats().await.unwrap();
    let host = |s: &kvstrata_client::proto::StatsResponse| {
        s.tiers
            .iter()
            .find(|t| t.tier == kvstrata_client::proto::Tier::Host as i32)
            .cloned()
            .unwrap()
    };
    let h = host(&full);
    assert_eq!((h.blocks, h.hits, h.bytes_in), (3, 1, 3 * len as u64));
    assert_eq!((full.namespaces, full.active_leases), (1, 1));
    assert!(full.event_seq >= 3);

    // Tenant B, who stored nothing, learns none of it: only the daemon's
    // shape (tiers and capacities, version, uptime) and its own namespaces.
    let seen = b.stats().await.unwrap();
    let h = host(&seen);
    assert_eq!(h.capacity_bytes, host(&full).capacity_bytes);
    assert_eq!(
        (
            h.blocks,
            h.used_bytes,
            h.hits,
            h.misses,
            h.bytes_in,
            h.pinned_blocks
        ),
        (0, 0, 0, 0, 0, 0)
    );
    assert_eq!(seen.tiers.len(), full.tiers.len());
    assert_eq!(
        (seen.namespaces, seen.active_leases, seen.event_seq),
        (0, 0, 0)
    );
    assert_eq!(seen.version, full.version);
    assert!(seen.kv_regions.is_empty() && seen.remote.is_none());
    // A counts its own namespace, and no one's traffic either.
    let own = a.stats().await.unwrap();
    assert_eq!((own.namespaces, host(&own).blocks), (1, 0));
    d.shutdown().await.unwrap();
}

#[tokio::test]
async fn auth_metrics_can_require_an_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    // Without a token file the setting is refused, naming it.
    let mut c = config(dir.path(), 8 << 20, 4096);
    c.auth.metrics_require_token = true;
    let e = Daemon::start(c).await.err().expect("refused").to_string();
    assert!(e.contains("auth.metrics_require_token"), "{e}");

    let (mut c, _) = token_config(dir.path(), &format!("{ADMIN}\n{TENANT_A} tenant-a\n"));
    c.auth.metrics_require_token = true;
    let d = Daemon::start(c).await.unwrap();
    let metrics = d.addrs().metrics.unwrap();
    let (code, body) = common::http_get(metrics, "/metrics", None).await;
    assert_eq!(code, 401, "{body}");
    assert!(!body.contains("kvstrata_requests_in_flight"), "{body}");
    let (code, body) = common::http_get(
        metrics,
        "/metrics",
        Some("Bearer wrong-token-0123456789abcdef"),
    )
    .await;
    assert_eq!(code, 401, "{body}");
    let (code, body) =
        common::http_get(metrics, "/metrics", Some(&format!("Bearer {TENANT_A}"))).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("tenant"), "{body}");
    // Health stays open for probes.
    let (code, body) = common::http_get(metrics, "/healthz", None).await;
    assert_eq!(code, 200, "{body}");
    let (code, body) =
        common::http_get(metrics, "/metrics", Some(&format!("Bearer {ADMIN}"))).await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("kvstrata_auth_failures_total{reason=\"missing\"} 1")
            && body.contains("kvstrata_auth_failures_total{reason=\"unknown_token\"} 1")
            && body.contains("kvstrata_auth_failures_total{reason=\"wrong_tenant\"} 1"),
        "{body}"
    );
    d.shutdown().await.unwrap();
}
