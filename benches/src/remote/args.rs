//! Flags of `kvstrata bench-remote` and the checked plan a run follows.

use std::time::Duration;

use bytesize::ByteSize;

use crate::disk::parse_size;
use crate::error::BenchError;
use crate::pattern::STAMP;
use crate::plan_checks;

/// Largest block accepted: Redis refuses bulk strings over 512 MB
/// (`proto-max-bulk-len`), and the tier adds its header.
const MAX_BLOCK_BYTES: u64 = 256 << 20;

/// Flags of `kvstrata bench-remote` (`--json` is the global flag).
#[derive(clap::Args, Debug, Clone)]
pub struct RemoteBenchArgs {
    /// Seed node of the Redis Cluster, redis://host:port (repeatable, or a
    /// comma-separated list).
    #[arg(
        long = "node",
        value_name = "URL",
        required = true,
        value_delimiter = ','
    )]
    pub nodes: Vec<String>,

    /// Payload bytes per block; a comma-separated list runs each size
    /// (fio-style: 256K and 1M are KiB and MiB).
    #[arg(
        long = "block-size",
        value_name = "SIZE",
        value_delimiter = ',',
        default_values = ["256KiB", "1MiB"],
        value_parser = parse_size
    )]
    pub block_sizes: Vec<ByteSize>,

    /// Blocks written and then read per block size and path.
    #[arg(long, default_value_t = 512)]
    pub blocks: u64,

    /// Rounds per block size. Each round writes and reads `--blocks` blocks
    /// on both paths; even rounds run kvstrata first, odd rounds raw first.
    /// The report sums all rounds.
    #[arg(long, default_value_t = 2)]
    pub rounds: u32,

    /// Blocks per batch: commands in flight at once (per put_many /
    /// get_many call of the tier, per batch of SET / GET on the raw path).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,

    /// Per-command deadline of both paths, milliseconds. A command past it
    /// fails the run. The tier's production default (250 ms) is meant for
    /// serving; the benchmark measures throughput, so it waits longer.
    #[arg(long, default_value_t = 5000)]
    pub deadline_ms: u64,

    /// How long to wait for the first connection to the cluster, milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub connect_wait_ms: u64,

    /// Print the result as a markdown table (ignored with --json).
    #[arg(long)]
    pub markdown: bool,

    /// Hide the progress bar (it is shown only when stderr is a terminal).
    #[arg(long)]
    pub no_progress: bool,
}

impl Default for RemoteBenchArgs {
    fn default() -> Self {
        RemoteBenchArgs {
            nodes: Vec::new(),
            block_sizes: vec![ByteSize::kib(256), ByteSize::mib(1)],
            blocks: 512,
            rounds: 2,
            concurrency: 16,
            deadline_ms: 5000,
            connect_wait_ms: 10_000,
            markdown: false,
            no_progress: false,
        }
    }
}

/// Flags checked.
#[derive(Debug, Clone)]
pub(super) struct RemotePlan {
    pub(super) nodes: Vec<String>,
    pub(super) sizes: Vec<usize>,
    pub(super) blocks: u64,
    pub(super) rounds: u32,
    pub(super) concurrency: usize,
    pub(super) deadline: Duration,
}

impl RemoteBenchArgs {
    pub(super) fn plan(&self) -> Result<RemotePlan, BenchError> {
        let bad =
            |field: &'static str, reason: String| Err(BenchError::InvalidArg { field, reason });
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect();
        if nodes.is_empty() {
            return bad("--node", "at least one node is needed".into());
        }
        if self.block_sizes.is_empty() {
            return bad("--block-size", "at least one size is needed".into());
        }
        let sizes = self
            .block_sizes
            .iter()
            .map(|bs| {
                plan_checks::block_size(
                    "--block-size",
                    bs.as_u64(),
                    STAMP as u64,
                    "the verification stamp",
                    MAX_BLOCK_BYTES,
                )
            })
            .collect::<Result<Vec<usize>, BenchError>>()?;
        plan_checks::at_least_one("--blocks", self.blocks)?;
        plan_checks::at_least_one("--rounds", self.rounds.into())?;
        plan_checks::at_least_one("--concurrency", self.concurrency as u64)?;
        plan_checks::at_least_one("--deadline-ms", self.deadline_ms)?;
        Ok(RemotePlan {
            nodes,
            sizes,
            blocks: self.blocks,
            rounds: self.rounds,
            concurrency: self.concurrency,
            deadline: Duration::from_millis(self.deadline_ms),
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
        bench: RemoteBenchArgs,
    }

    fn parse(args: &[&str]) -> Result<RemoteBenchArgs, clap::Error> {
        let mut v = vec!["bench-remote"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).map(|c| c.bench)
    }

    #[test]
    fn defaults_and_lists() {
        let a = parse(&["--node", "redis://127.0.0.1:7000"]).unwrap();
        assert_eq!(a.nodes, ["redis://127.0.0.1:7000"]);
        assert_eq!(
            a.block_sizes.iter().map(|b| b.as_u64()).collect::<Vec<_>>(),
            [256 << 10, 1 << 20]
        );
        assert_eq!((a.blocks, a.concurrency, a.deadline_ms), (512, 16, 5000));
        assert_eq!(a.rounds, 2);
        assert!(!a.markdown);
        let a = parse(&[
            "--node",
            "redis://a:1,redis://b:2",
            "--node",
            "redis://c:3",
            "--block-size",
            "64KiB,1M",
            "--blocks",
            "16",
            "--concurrency",
            "4",
            "--markdown",
        ])
        .unwrap();
        assert_eq!(a.nodes, ["redis://a:1", "redis://b:2", "redis://c:3"]);
        assert_eq!(
            a.block_sizes.iter().map(|b| b.as_u64()).collect::<Vec<_>>(),
            [64 << 10, 1 << 20]
        );
        let p = a.plan().unwrap();
        assert_eq!(p.sizes, [64 << 10, 1 << 20]);
        assert_eq!((p.blocks, p.concurrency), (16, 4));
        assert!(parse(&[]).is_err(), "--node is required");
    }

    #[test]
    fn rejects_bad_flags() {
        let base = RemoteBenchArgs {
            nodes: vec!["redis://127.0.0.1:1".into()],
            ..RemoteBenchArgs::default()
        };
        for (args, field) in [
            (
                RemoteBenchArgs {
                    nodes: vec![" ".into()],
                    ..base.clone()
                },
                "--node",
            ),
            (
                RemoteBenchArgs {
                    blocks: 0,
                    ..base.clone()
                },
                "--blocks",
            ),
            (
                RemoteBenchArgs {
                    concurrency: 0,
                    ..base.clone()
                },
                "--concurrency",
            ),
            (
                RemoteBenchArgs {
                    rounds: 0,
                    ..base.clone()
                },
                "--rounds",
            ),
            (
                RemoteBenchArgs {
                    block_sizes: vec![ByteSize::b(8)],
                    ..base.clone()
                },
                "--block-size",
            ),
            (
                RemoteBenchArgs {
                    deadline_ms: 0,
                    ..base.clone()
                },
                "--deadline-ms",
            ),
        ] {
            match args.plan() {
                Err(BenchError::InvalidArg { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        assert!(base.plan().is_ok());
    }
}
