//! Command-line flags of `kvstrata bench` and their validation.

use std::time::Duration;

use bytesize::ByteSize;
use serde::Serialize;

use crate::error::BenchError;
use crate::payload::HEADER_BYTES;
use crate::plan_checks;

/// Default working set when `--keys` is not given: as many blocks as fit here.
pub const DEFAULT_WORKING_SET_BYTES: u64 = 1 << 30;
/// Largest gRPC message the benchmark sends or accepts (the client limit).
pub const MAX_MESSAGE_BYTES: usize = 512 << 20;
/// Room left in a message for keys and protobuf framing.
const MESSAGE_HEADROOM_BYTES: u64 = 1 << 20;
/// `--redis-url` when not given.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// Largest block a namespace accepts (mirrors the daemon's limit, 1 GiB).
const MAX_BLOCK_BYTES: u64 = 1 << 30;

/// How payloads travel between the benchmark and the daemon.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Inline payloads in `BatchGet` / `BatchPut` messages.
    #[default]
    Grpc,
    /// Payloads in a shared-memory pool per client task, registered on the
    /// daemon's `--mempool-socket`; `BatchGet` / `BatchPut` carry pool ranges.
    Shm,
    /// Not kvstrata: Redis `MSET` / `MGET` on `--redis-url`, same working set,
    /// batches, concurrency and verification (one connection per task).
    Redis,
}

impl Mode {
    /// Lowercase name, as given on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Grpc => "grpc",
            Mode::Shm => "shm",
            Mode::Redis => "redis",
        }
    }
}

/// Flags of `kvstrata bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Daemon address: `http://host:port`, `host:port`, `unix:///path` or `/path`.
    #[arg(long, env = "KVSTRATA_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,

    /// Payload bytes per block (e.g. 256KiB, 1MiB).
    #[arg(long, default_value = "256KiB")]
    pub block_size: ByteSize,

    /// Blocks per RPC.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,

    /// Client tasks issuing RPCs (each on its own connection unless --shared-connection).
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,

    /// All client tasks share one HTTP/2 connection (grpc and shm modes; redis
    /// always opens one connection per task).
    #[arg(long)]
    pub shared_connection: bool,

    /// Fraction of RPCs that are reads (0..=1).
    #[arg(long, default_value_t = 0.9, value_parser = parse_ratio)]
    pub read_ratio: f64,

    /// Length of the measured phase (e.g. 10s, 1m).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Unmeasured load before the measured phase.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,

    /// Working-set size in blocks [default: as many as fit in 1 GiB].
    #[arg(long)]
    pub keys: Option<u64>,

    /// Data path.
    #[arg(long, value_enum, default_value_t = Mode::Grpc)]
    pub mode: Mode,

    /// The daemon's shared-memory pool socket (`unix:///path` or `/path`);
    /// needed by `--mode shm`.
    #[arg(long, env = "KVSTRATA_MEMPOOL_SOCKET")]
    pub mempool_socket: Option<String>,

    /// Redis server for `--mode redis`: `redis://host:port` or `unix:///path`.
    #[arg(long, default_value = DEFAULT_REDIS_URL)]
    pub redis_url: String,

    /// How long to measure the single-core memcpy ceiling before the run
    /// (0s skips it).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub memcpy_duration: Duration,

    /// Print the report as JSON (and no progress bar).
    #[arg(long)]
    pub json: bool,

    /// Skip checking the bytes of every read.
    #[arg(long)]
    pub no_verify: bool,

    /// Bearer token sent on every call (a daemon with `auth.token_file`): the
    /// binary's global `--token` / `--token-file` (`kvstrata --token-file F bench`).
    #[arg(skip)]
    pub token: Option<kvstrata_client::BearerToken>,
}

impl Default for BenchArgs {
    fn default() -> Self {
        BenchArgs {
            addr: "http://127.0.0.1:50051".into(),
            block_size: ByteSize::kib(256),
            batch: 4,
            concurrency: 4,
            shared_connection: false,
            read_ratio: 0.9,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            keys: None,
            mode: Mode::Grpc,
            mempool_socket: None,
            redis_url: DEFAULT_REDIS_URL.into(),
            memcpy_duration: Duration::from_secs(1),
            json: false,
            no_verify: false,
            token: None,
        }
    }
}

/// Parses `--read-ratio`: a number in `0..=1`.
fn parse_ratio(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|e| format!("not a number: {e}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is outside 0..=1"))
    }
}

/// Flags checked and with defaults filled in.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub block_size: usize,
    pub batch: usize,
    pub concurrency: usize,
    pub keys: u64,
}

impl BenchArgs {
    /// Working-set size in blocks: `--keys`, or as many blocks as fit in 1 GiB
    /// (at least one batch).
    pub fn working_set_blocks(&self) -> u64 {
        self.keys.unwrap_or_else(|| {
            let per_gib = DEFAULT_WORKING_SET_BYTES / self.block_size.as_u64().max(1);
            per_gib.max(self.batch as u64).max(1)
        })
    }

    /// Checks every flag; the error names the flag.
    pub(crate) fn plan(&self) -> Result<Plan, BenchError> {
        let bad =
            |field: &'static str, reason: String| Err(BenchError::InvalidArg { field, reason });
        let bs = self.block_size.as_u64();
        let block_size = plan_checks::block_size(
            "--block-size",
            bs,
            HEADER_BYTES as u64,
            "the verification header",
            MAX_BLOCK_BYTES,
        )?;
        plan_checks::at_least_one("--batch", self.batch as u64)?;
        let message = bs.saturating_mul(self.batch as u64);
        if message > MAX_MESSAGE_BYTES as u64 - MESSAGE_HEADROOM_BYTES {
            return bad(
                "--batch",
                format!(
                    "{} blocks of {bs} bytes make a {message}-byte message; the limit is {} bytes",
                    self.batch,
                    MAX_MESSAGE_BYTES as u64 - MESSAGE_HEADROOM_BYTES
                ),
            );
        }
        plan_checks::at_least_one("--concurrency", self.concurrency as u64)?;
        if !(0.0..=1.0).contains(&self.read_ratio) {
            return bad(
                "--read-ratio",
                format!("{} is outside 0..=1", self.read_ratio),
            );
        }
        if self.duration.is_zero() {
            return bad("--duration", "must be longer than zero".into());
        }
        match self.mode {
            Mode::Shm if self.mempool_socket.as_deref().is_none_or(str::is_empty) => {
                return bad(
                    "--mempool-socket",
                    "--mode shm needs the daemon's mempool socket (kvstrata serve --mempool-socket PATH)"
                        .into(),
                );
            }
            Mode::Redis if self.redis_url.trim().is_empty() => {
                return bad("--redis-url", "must not be empty".into());
            }
            _ => {}
        }
        let keys = self.working_set_blocks();
        if keys < self.batch as u64 {
            return bad(
                "--keys",
                format!("{keys} blocks; at least --batch ({})", self.batch),
            );
        }
        if usize::try_from(keys).is_err() {
            return bad("--keys", format!("{keys} is too large"));
        }
        Ok(Plan {
            block_size,
            batch: self.batch,
            concurrency: self.concurrency,
            keys,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        let mut v = vec!["bench"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).map(|c| c.bench)
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let a = parse(&["--addr", "http://127.0.0.1:50051"]).unwrap();
        assert_eq!(a.block_size.as_u64(), 256 * 1024);
        assert_eq!(a.batch, 4);
        assert_eq!(a.concurrency, 4);
        assert!(!a.shared_connection);
        assert_eq!(a.read_ratio, 0.9);
        assert_eq!(a.duration, Duration::from_secs(10));
        assert_eq!(a.warmup, Duration::from_secs(2));
        assert_eq!(a.mode, Mode::Grpc);
        assert_eq!(a.memcpy_duration, Duration::from_secs(1));
        assert_eq!(a.working_set_blocks(), 4096);
        let p = a.plan().unwrap();
        assert_eq!(p.keys, 4096);
        assert_eq!(p.block_size, 262_144);
    }

    #[test]
    fn parses_sizes_durations_and_ratios() {
        let a = parse(&[
            "--addr",
            "/tmp/kv.sock",
            "--block-size",
            "1MiB",
            "--duration",
            "1m 30s",
            "--warmup",
            "0s",
            "--read-ratio",
            "0.5",
            "--keys",
            "10",
            "--json",
            "--no-verify",
            "--shared-connection",
        ])
        .unwrap();
        assert_eq!(a.block_size.as_u64(), 1 << 20);
        assert_eq!(a.duration, Duration::from_secs(90));
        assert!(a.warmup.is_zero());
        assert_eq!(a.read_ratio, 0.5);
        assert_eq!(a.working_set_blocks(), 10);
        assert!(a.json && a.no_verify && a.shared_connection);
        assert_eq!(a.plan().unwrap().keys, 10);
    }

    #[test]
    fn rejects_bad_flags() {
        assert!(parse(&["--read-ratio", "1.5"]).is_err());
        assert!(parse(&["--read-ratio", "-0.1"]).is_err());
        assert!(parse(&["--mode", "rdma"]).is_err());
        let shm = parse(&["--mode", "shm"]).unwrap();
        assert!(matches!(
            shm.plan(),
            Err(BenchError::InvalidArg {
                field: "--mempool-socket",
                ..
            })
        ));
        let shm = parse(&["--mode", "shm", "--mempool-socket", "/run/kv/mempool.sock"]).unwrap();
        assert_eq!(shm.mode, Mode::Shm);
        assert!(shm.plan().is_ok());
        let redis = parse(&["--mode", "redis", "--redis-url", "unix:///tmp/r.sock"]).unwrap();
        assert_eq!(
            (redis.mode, redis.redis_url.as_str()),
            (Mode::Redis, "unix:///tmp/r.sock")
        );
        assert!(redis.plan().is_ok());
        assert_eq!(parse(&[]).unwrap().redis_url, DEFAULT_REDIS_URL);
        let small = BenchArgs {
            block_size: ByteSize::b(8),
            ..BenchArgs::default()
        };
        assert!(matches!(
            small.plan(),
            Err(BenchError::InvalidArg {
                field: "--block-size",
                ..
            })
        ));
        let few_keys = BenchArgs {
            keys: Some(3),
            ..BenchArgs::default()
        };
        assert!(matches!(
            few_keys.plan(),
            Err(BenchError::InvalidArg {
                field: "--keys",
                ..
            })
        ));
        let huge_batch = BenchArgs {
            block_size: ByteSize::mib(64),
            batch: 8,
            ..BenchArgs::default()
        };
        assert!(matches!(
            huge_batch.plan(),
            Err(BenchError::InvalidArg {
                field: "--batch",
                ..
            })
        ));
        let zero = BenchArgs {
            concurrency: 0,
            ..BenchArgs::default()
        };
        assert!(zero.plan().is_err());
    }

    #[test]
    fn default_working_set_is_one_gib_but_at_least_one_batch() {
        let a = BenchArgs {
            block_size: ByteSize::mib(1),
            ..BenchArgs::default()
        };
        assert_eq!(a.working_set_blocks(), 1024);
        let big = BenchArgs {
            block_size: ByteSize::mib(512),
            batch: 1,
            ..BenchArgs::default()
        };
        assert_eq!(big.working_set_blocks(), 2);
        let b = BenchArgs {
            block_size: ByteSize::mib(100),
            ..BenchArgs::default()
        };
        assert_eq!(b.working_set_blocks(), 10);
    }
}
