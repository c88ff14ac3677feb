//! Unit tests of loading, layering and checking the configuration.

use std::path::PathBuf;

use bytesize::ByteSize;
use clap::Parser;

use super::*;

/// `kvstrata serve`'s flags alone, to parse argument lists as the binary does.
#[derive(Debug, Parser)]
struct Serve {
    #[command(flatten)]
    args: ServeArgs,
}

#[test]
fn printed_config_reads_back() {
    let mut c = Config::default();
    c.host.capacity = ByteSize::b(1_000_000_007);
    let back: Config = toml::from_str(&c.to_toml()).unwrap();
    assert_eq!(back, c);
}

#[test]
fn flags_override_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("k.toml");
    std::fs::write(
        &p,
        "[host]\ncapacity = \"1 MiB\"\n[server]\nmax_batch = 7\n",
    )
    .unwrap();
    let args = ServeArgs {
        config: Some(p),
        settings: SettingFlags {
            server: ServerFlags {
                max_batch: Some(9),
                ..ServerFlags::default()
            },
            ..SettingFlags::default()
        },
        ..ServeArgs::default()
    };
    let c = Config::load(&args).unwrap();
    assert_eq!(c.host.capacity, ByteSize::mib(1));
    assert_eq!(c.server.max_batch, 9);
}

#[test]
fn disk_paths_take_sizes() {
    let mut c = Config::default();
    c.disk.paths = vec!["/a/slots".into(), "/b/slots=2GiB".into()];
    c.disk.size = ByteSize::gib(1);
    let t = c.disk.tier_config().unwrap().unwrap();
    assert_eq!(t.files[0].size_bytes, 1 << 30);
    assert_eq!(t.files[1].size_bytes, 2 << 30);
    assert_eq!(t.index_dir, PathBuf::from("/a/kvstrata-index"));
    c.disk.paths = vec!["/a=lots".into()];
    assert!(c.validate().unwrap_err().to_string().contains("disk.paths"));
    let e = toml::from_str::<Config>("[disk]\npaths = [\"/a\"]\nengine = \"aio\"\n").unwrap_err();
    assert!(e.to_string().contains("disk.engine"), "{e}");
    assert_eq!(Config::default().disk.tier_config().unwrap(), None);
}

#[test]
fn sglang_needs_a_mempool_socket() {
    let mut c = Config::default();
    c.sglang.socket = "/tmp/x/sglang.sock".into();
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("sglang.socket")
    );
    c.shm.mempool_socket = "/tmp/x/mempool.sock".into();
    c.validate().unwrap();
    assert_eq!(socket_path("unix:///run/a.sock"), "/run/a.sock");
    assert_eq!(socket_path("/run/a.sock"), "/run/a.sock");
}

#[test]
fn auth_flags_and_the_exposure_guard() {
    let c = Config::default();
    assert_eq!(c.auth.uid_allow, vec![crate::auth::own_uid()]);
    assert!(c.to_toml().contains("[auth]") && c.to_toml().contains("[tls]"));
    let args = ServeArgs {
        settings: SettingFlags {
            server: ServerFlags {
                tcp_addr: Some("0.0.0.0:50051".into()),
                ..ServerFlags::default()
            },
            auth: AuthFlags {
                uds_allow_uids: vec![7, 8],
                ..AuthFlags::default()
            },
            ..SettingFlags::default()
        },
        ..ServeArgs::default()
    };
    let c = Config::load(&args).unwrap();
    assert_eq!(c.auth.uid_allow, vec![7, 8]);
    let e = c.check_exposure().unwrap_err().to_string();
    assert!(
        e.contains("auth.token_file") && e.contains("--insecure"),
        "{e}"
    );
    let mut insecure = args.clone();
    insecure.settings.auth.insecure = Some(true);
    let c = Config::load(&insecure).unwrap();
    c.check_exposure().unwrap();
    let mut with_tokens = args;
    with_tokens.settings.auth.token_file = Some("/etc/kvstrata/tokens".into());
    let c = Config::load(&with_tokens).unwrap();
    c.check_exposure().unwrap();
    let mut c = Config::default();
    c.tls.cert = "/c.pem".into();
    assert!(c.validate().unwrap_err().to_string().contains("tls.cert"));
    c.tls.key = "/k.pem".into();
    c.validate().unwrap();
}

#[test]
fn gpu_section_reads_flags_and_refuses_bad_values() {
    let c = Config::default();
    assert_eq!(c.gpu.enabled, GpuMode::Auto);
    assert!(c.to_toml().contains("[gpu]"), "{}", c.to_toml());
    let args = ServeArgs {
        settings: SettingFlags {
            gpu: GpuFlags {
                gpu_enabled: Some("on".parse().unwrap()),
                gpu_devices: vec![1, 2],
                gpu_hbm_bytes: Some(ByteSize::gib(2)),
                kv_region_socket: Some("unix:///tmp/x/regions.sock".into()),
                ..GpuFlags::default()
            },
            ..SettingFlags::default()
        },
        ..ServeArgs::default()
    };
    let c = Config::load(&args).unwrap();
    assert_eq!(c.gpu.enabled, GpuMode::On);
    assert_eq!(c.gpu.devices, vec![1, 2]);
    assert_eq!(c.gpu.hbm_bytes, ByteSize::gib(2));
    assert_eq!(c.gpu.region_socket, "/tmp/x/regions.sock");
    let back: Config = toml::from_str(&c.to_toml()).unwrap();
    assert_eq!(back, c);
    let e = toml::from_str::<Config>("[gpu]\nenabled = \"maybe\"\n").unwrap_err();
    assert!(e.to_string().contains("gpu.enabled"), "{e}");
    let e = "maybe".parse::<GpuMode>().unwrap_err();
    assert!(e.contains("gpu.enabled"), "{e}");
    let mut c = Config::default();
    c.gpu.region_socket = "/tmp/x/m.sock".into();
    c.shm.mempool_socket = "/tmp/x/m.sock".into();
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("gpu.region_socket")
    );
}

#[test]
fn unknown_keys_and_bad_values_are_refused() {
    assert!(toml::from_str::<Config>("[host]\ncapacityy = 1\n").is_err());
    let e = toml::from_str::<Config>("[log]\nformat = \"xml\"\n").unwrap_err();
    assert!(e.to_string().contains("log.format"), "{e}");
    let mut c = Config::default();
    c.server.tcp_addr = "nope".into();
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("server.tcp_addr")
    );
}

#[test]
fn choices_read_and_print_by_name() {
    let c: Config = toml::from_str(
        "[disk]\nengine = \"io-uring\"\ndurability = \"power-loss\"\n\
         [gpu]\nenabled = \"cpu\"\n[log]\nformat = \"json\"\n",
    )
    .unwrap();
    assert_eq!(c.disk.engine, DiskIoEngine::IoUring);
    assert_eq!(c.disk.durability, DiskDurability::PowerLoss);
    assert_eq!(c.gpu.enabled, GpuMode::Cpu);
    assert_eq!(c.log.format, LogFormat::Json);
    let text = c.to_toml();
    for line in [
        "engine = \"io_uring\"",
        "durability = \"power-loss\"",
        "enabled = \"cpu\"",
        "format = \"json\"",
    ] {
        assert!(text.contains(line), "{line} in {text}");
    }
    let e = toml::from_str::<Config>("[disk]\ndurability = \"never\"\n").unwrap_err();
    assert!(e.to_string().contains("disk.durability"), "{e}");
    let t = c.disk.tier_config().unwrap();
    assert_eq!(t, None, "no paths, no disk tier");
}

#[test]
fn every_flag_lands_on_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("k.toml");
    std::fs::write(&p, "[server]\nmax_batch = 7\n[disk]\nengine = \"pread\"\n").unwrap();
    let file = p.to_str().unwrap();
    #[rustfmt::skip]
    let argv = [
        "serve", "--config", file,
        "--tcp-addr", "127.0.0.1:1", "--uds-path", "/tmp/x/kv.sock", "--metrics-addr", "",
        "--max-message-bytes", "1MiB", "--max-batch", "11", "--max-lease-ms", "12",
        "--max-concurrent-streams", "13", "--request-timeout-ms", "14",
        "--max-inflight-requests", "15", "--max-blocking-tasks", "16",
        "--host-capacity", "2MiB", "--host-segment-bytes", "64KiB",
        "--disk-path", "/d/a=1GiB", "--disk-path", "/d/b", "--disk-size", "3GiB",
        "--disk-index-dir", "/d/index", "--disk-engine", "io_uring",
        "--disk-durability", "power-loss", "--disk-read-timeout-ms", "17",
        "--disk-promote-on-get", "false", "--disk-demote-queue", "5MiB",
        "--disk-drain-on-stop-ms", "1234", "--disk-persist-on-stop-ms", "0",
        "--remote-node", "redis://a:1,redis://b:2", "--remote-deadline-ms", "18",
        "--remote-write-through", "true", "--remote-demote", "false",
        "--remote-key-prefix", "kv",
        "--mempool-socket", "unix:///tmp/x/m.sock", "--sglang-socket", "/tmp/x/s.sock",
        "--sglang-namespace", "sg",
        "--gpu", "off", "--gpu-device", "3", "--gpu-hbm-bytes", "0",
        "--gpu-dma-threshold", "4KiB", "--gpu-move-group-bytes", "8MiB",
        "--kv-region-socket", "unix:///tmp/x/r.sock", "--max-kv-regions", "19",
        "--token-file", "/t", "--uds-allow-uid", "1,2", "--insecure",
        "--tls-cert", "/c.pem", "--tls-key", "/k.pem", "--tls-client-ca", "/ca.pem",
        "--log-format", "json", "--log-level", "debug",
    ];
    let args = Serve::try_parse_from(argv).unwrap().args;
    let c = Config::load(&args).unwrap();
    let s = &c.server;
    assert_eq!(
        (
            s.tcp_addr.as_str(),
            s.uds_path.as_str(),
            s.metrics_addr.as_str()
        ),
        ("127.0.0.1:1", "/tmp/x/kv.sock", "")
    );
    assert_eq!(s.max_message_bytes, ByteSize::mib(1));
    assert_eq!(
        (
            s.max_batch,
            s.max_lease_ms,
            s.max_concurrent_streams,
            s.request_timeout_ms
        ),
        (11, 12, 13, 14)
    );
    assert_eq!((s.max_inflight_requests, s.max_blocking_tasks), (15, 16));
    assert_eq!(
        (c.host.capacity, c.host.segment_bytes),
        (ByteSize::mib(2), ByteSize::kib(64))
    );
    let d = &c.disk;
    assert_eq!(d.paths, vec!["/d/a=1GiB", "/d/b"]);
    assert_eq!(
        (d.size, d.index_dir.as_str()),
        (ByteSize::gib(3), "/d/index")
    );
    assert_eq!(
        (d.engine, d.durability),
        (DiskIoEngine::IoUring, DiskDurability::PowerLoss)
    );
    assert_eq!((d.read_timeout_ms, d.promote_on_get), (17, false));
    assert_eq!(d.demote_queue, ByteSize::mib(5));
    assert_eq!((d.drain_on_stop_ms, d.persist_on_stop_ms), (1234, 0));
    let m = c.cache_config().unwrap().movement;
    assert_eq!(m.drain_on_stop, Duration::from_millis(1234));
    assert!(m.persist_on_stop.is_zero());
    let r = &c.remote;
    assert_eq!(r.nodes, vec!["redis://a:1", "redis://b:2"]);
    assert_eq!(
        (r.deadline_ms, r.write_through, r.demote),
        (18, true, false)
    );
    assert_eq!(r.key_prefix, "kv");
    assert_eq!(c.shm.mempool_socket, "/tmp/x/m.sock");
    assert_eq!(
        (c.sglang.socket.as_str(), c.sglang.namespace.as_str()),
        ("/tmp/x/s.sock", "sg")
    );
    let g = &c.gpu;
    assert_eq!((g.enabled, g.devices.as_slice()), (GpuMode::Off, &[3][..]));
    assert_eq!(
        (g.hbm_bytes, g.dma_threshold, g.move_group_bytes),
        (ByteSize::b(0), ByteSize::kib(4), ByteSize::mib(8))
    );
    // With no HBM tier the staging settings still reach the cache.
    let cache = c.cache_config().expect("cache config");
    assert_eq!(
        cache.device_moves,
        Some(kvstrata_tiers::DeviceMoves {
            dma_threshold: 4 << 10,
            group_bytes: 8 << 20,
        })
    );
    assert_eq!(
        (g.region_socket.as_str(), g.max_regions),
        ("/tmp/x/r.sock", 19)
    );
    assert_eq!(
        (
            c.auth.token_file.as_str(),
            c.auth.uid_allow.as_slice(),
            c.auth.insecure
        ),
        ("/t", &[1, 2][..], true)
    );
    assert_eq!(
        (
            c.tls.cert.as_str(),
            c.tls.key.as_str(),
            c.tls.client_ca.as_str()
        ),
        ("/c.pem", "/k.pem", "/ca.pem")
    );
    assert_eq!(
        (c.log.format, c.log.level.as_str()),
        (LogFormat::Json, "debug")
    );

    // Flags not given keep the file's values, and the defaults below them.
    let args = Serve::try_parse_from(["serve", "--config", file])
        .unwrap()
        .args;
    let c = Config::load(&args).unwrap();
    assert_eq!(
        (c.server.max_batch, c.disk.engine),
        (7, DiskIoEngine::Pread)
    );
    assert_eq!(c.host, HostConfig::default());
    // A bad choice is refused while parsing, naming the key.
    let e = Serve::try_parse_from(["serve", "--disk-engine", "aio"]).unwrap_err();
    assert!(
        e.to_string()
            .contains("disk.engine: \"aio\" is not auto, io_uring or pread"),
        "{e}"
    );
}

#[test]
fn connection_settings_read_flags_and_refuse_bad_values() {
    let argv = [
        "serve",
        "--max-connections",
        "100",
        "--max-connections-per-peer",
        "10",
        "--handshake-timeout-ms",
        "1500",
        "--idle-timeout-ms",
        "0",
        "--keepalive-interval-ms",
        "2000",
        "--keepalive-timeout-ms",
        "700",
    ];
    let c = Config::load(&Serve::try_parse_from(argv).unwrap().args).unwrap();
    let s = &c.server;
    assert_eq!((s.max_connections, s.max_connections_per_peer), (100, 10));
    assert_eq!(
        (
            s.handshake_timeout_ms,
            s.idle_timeout_ms,
            s.keepalive_interval_ms,
            s.keepalive_timeout_ms
        ),
        (1500, 0, 2000, 700)
    );
    let d = ServerConfig::default();
    assert_eq!(
        (
            d.max_connections,
            d.max_connections_per_peer,
            d.handshake_timeout_ms,
            d.idle_timeout_ms,
            d.keepalive_interval_ms,
            d.keepalive_timeout_ms
        ),
        (4096, 512, 10_000, 300_000, 60_000, 20_000)
    );
    let refused = |edit: &dyn Fn(&mut Config), key: &str| {
        let mut c = Config::default();
        edit(&mut c);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains(key), "{e}");
    };
    refused(&|c| c.server.max_connections = 0, "server.max_connections");
    refused(
        &|c| c.server.max_connections_per_peer = 5000,
        "server.max_connections_per_peer",
    );
    refused(
        &|c| c.server.handshake_timeout_ms = 0,
        "server.handshake_timeout_ms",
    );
    refused(
        &|c| c.server.keepalive_timeout_ms = 0,
        "server.keepalive_timeout_ms",
    );
    // No keepalive pings: no timeout needed.
    let mut c = Config::default();
    c.server.keepalive_interval_ms = 0;
    c.server.keepalive_timeout_ms = 0;
    c.validate().unwrap();
}
