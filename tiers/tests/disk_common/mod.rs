//! Helpers shared by the disk-tier tests: temp dirs on a real filesystem
//! (the target dir, never tmpfs), configs, deterministic payloads.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kvstrata_tiers::disk::{DiskTier, DiskTierConfig, EngineChoice};
use kvstrata_tiers::{BlockKey, EventBus, NamespaceId};

/// A temp dir under the target dir (O_DIRECT needs a real filesystem).
pub fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kvs-disk-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

pub fn ns() -> NamespaceId {
    NamespaceId([0x5a; 16])
}

pub fn key(s: &str) -> BlockKey {
    BlockKey::new("key", s.as_bytes()).unwrap()
}

pub fn config(dir: &Path, capacity: u64, engine: EngineChoice) -> DiskTierConfig {
    DiskTierConfig {
        segment_bytes: 1 << 20,
        engine,
        read_timeout: Duration::from_secs(2),
        ..DiskTierConfig::in_dir(dir, capacity)
    }
}

pub fn open(cfg: &DiskTierConfig) -> DiskTier {
    let t = DiskTier::open(cfg, Arc::new(EventBus::new(4096))).unwrap();
    check_engine(&t, cfg.engine);
    t
}

/// The io_uring variants must really run on io_uring (this kernel allows it),
/// unless KVSTRATA_ALLOW_NO_URING is set (e.g. under a seccomp profile).
pub fn check_engine(t: &DiskTier, engine: EngineChoice) {
    match engine {
        EngineChoice::Pread => assert_eq!(t.engine_name(), "pread"),
        _ => {
            if std::env::var_os("KVSTRATA_ALLOW_NO_URING").is_none() {
                assert_eq!(
                    t.engine_name(),
                    "io_uring",
                    "io_uring probe failed (set KVSTRATA_ALLOW_NO_URING=1 to allow)"
                );
            }
        }
    }
}

/// Deterministic pseudo-random bytes (never all zeros).
pub fn payload(tag: u64, len: usize) -> Vec<u8> {
    let mut x = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 30;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 27;
        x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Flips one byte of a file in place (buffered I/O; the kernel writes the
/// page back before any direct read of that range).
pub fn flip_byte(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0xFF;
    f.write_all_at(&b, offset).unwrap();
    f.sync_all().unwrap();
}

/// Generates one test per engine: `name::io_uring` and `name::pread`.
#[macro_export]
macro_rules! both_engines {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn io_uring() {
                    super::$name(kvstrata_tiers::disk::EngineChoice::Auto)
                }
                #[test]
                fn pread() {
                    super::$name(kvstrata_tiers::disk::EngineChoice::Pread)
                }
            }
        )*
    };
}
