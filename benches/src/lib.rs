//! kvstrata load generator: the library behind `kvstrata bench`.
//!
//! The benchmark (`--mode grpc`, the default) registers an opaque namespace whose block size is the
//! `--block-size` flag, fills a working set of `--keys` blocks with `BatchPut`,
//! runs a warm-up, then for `--duration` has `--concurrency` tasks issue
//! `BatchGet` / `BatchPut` RPCs of `--batch` random blocks each, choosing the
//! kind by `--read-ratio`. Per-RPC latencies go into one HDR histogram per op
//! kind; the result is a [`BenchReport`] (human table or JSON).
//!
//! Every read is verified (unless `--no-verify`): payloads are derived from one
//! seeded random buffer with a 16-byte header (key index, version), so a read
//! is checked with one `memcmp` and two integer comparisons, including a
//! staleness check (each key is written by exactly one task, so a read that
//! starts after a put was acknowledged must see that version or a newer one).
//! A miss is not a failure (the cache may evict); wrong bytes are.
//!
//! `--mode shm` runs the same workload with payloads in a shared-memory pool
//! per task, registered on the daemon's `--mempool-socket` (requests carry pool
//! regions instead of bytes); `--mode redis` runs it against a Redis server
//! (`MSET` / `MGET`, same keys, payloads and verification), for comparison.
//! Before the run every mode measures the single-core memcpy rate of
//! block-size copies between two working sets larger than the last-level cache
//! ([`memcpy`]), so ratios to that ceiling come from the same run.
//!
//! `kvstrata bench-disk` ([`disk`]) measures the disk tier in-process instead
//! (write, then cold verified reads), for comparison with fio.
//!
//! `kvstrata bench socket` ([`socket`]) measures the loopback socket ceiling:
//! what TCP or a Unix socket carries on this machine with nothing but the
//! kernel touching the bytes, the bound any server's GET over it stays under.
//!
//! `kvstrata bench-remote` ([`remote`]) measures the remote tier against a
//! Redis Cluster, and the same cluster through the redis crate directly, in
//! one run (write, then verified reads, per block size).
//!
//! It talks to the daemon with the generated tonic client
//! ([`kvstrata_proto::v1::kv_cache_client::KvCacheClient`]) over TCP or a Unix
//! socket, with [`BenchArgs::token`] on every call; see [`connect()`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), kvstrata_benches::BenchError> {
//! use clap::Parser;
//! #[derive(Parser)]
//! struct Cli {
//!     #[command(flatten)]
//!     bench: kvstrata_benches::BenchArgs,
//! }
//! let cli = Cli::parse();
//! kvstrata_benches::run_and_print(cli.bench).await?;
//! # Ok(())
//! # }
//! ```

pub mod args;
pub mod connect;
pub mod disk;
pub mod error;
mod grpc_conn;
pub mod memcpy;
mod pattern;
pub mod payload;
mod plan_checks;
mod redis_conn;
pub mod remote;
pub mod report;
mod runner;
mod shm;
pub mod socket;

pub use args::{BenchArgs, Mode};
pub use connect::{Target, connect, connect_channel};
pub use disk::{DiskBenchArgs, DiskBenchReport, DiskEngine, run_disk_and_print, run_disk_bench};
pub use error::BenchError;
pub use memcpy::MemcpyReport;
pub use payload::{PayloadGen, VerifyError};
pub use remote::{RemoteBenchArgs, RemoteBenchReport, run_remote_and_print, run_remote_bench};
pub use report::{BenchReport, OpReport, PopulateReport};
pub use runner::run;
pub use socket::{
    SocketBenchArgs, SocketBenchReport, SocketTransport, run_socket_and_print, run_socket_bench,
};

/// Runs the benchmark and prints its report: JSON on stdout with `--json`,
/// the human table otherwise. When reads failed verification the report is
/// printed too, and the [`BenchError::VerifyFailed`] error is returned.
pub async fn run_and_print(args: BenchArgs) -> Result<BenchReport, BenchError> {
    let json = args.json;
    let print = |report: &BenchReport| -> Result<(), BenchError> {
        if json {
            println!("{}", report.to_json()?);
        } else {
            report.print_human();
        }
        Ok(())
    };
    match run(args).await {
        Ok(report) => {
            print(&report)?;
            Ok(report)
        }
        Err(err) => {
            if let Some(report) = err.report() {
                print(report)?;
            }
            Err(err)
        }
    }
}
