//! The client verbs of the `kvstrata` binary (`stats`, `ls`, `get`, `put`, ...).
//!
//! The binary (`src/main.rs`) flattens [`ClientCommand`] into its own subcommand enum,
//! flattens [`GlobalArgs`] into its top-level arguments, calls [`run`], and prints a
//! [`CliError`] as one line (`error: {e}`) with a non-zero exit status:
//!
//! ```no_run
//! use clap::Parser;
//!
//! #[derive(clap::Parser)]
//! struct Cli {
//!     #[command(flatten)]
//!     global: kvstrata_cli::client_verbs::GlobalArgs,
//!     #[command(subcommand)]
//!     cmd: Command,
//! }
//!
//! #[derive(clap::Subcommand)]
//! enum Command {
//!     /// A verb of the binary's own
//!     Serve,
//!     #[command(flatten)]
//!     Client(kvstrata_cli::client_verbs::ClientCommand),
//! }
//!
//! # async fn main_() -> Result<(), kvstrata_cli::client_verbs::CliError> {
//! let cli = Cli::parse();
//! if let Command::Client(cmd) = cli.cmd {
//!     kvstrata_cli::client_verbs::run(cmd, &cli.global).await?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Namespace arguments (`--ns`) are 32 hex digits or a model id that names exactly
//! one registered namespace. Key arguments are text, or `hex:<digits>` for binary
//! keys. `--json` prints one JSON document per command (`watch`: one object per line).

use std::path::PathBuf;
use std::time::Duration;

use kvstrata_types::Dtype;
use thiserror::Error;

use kvstrata_client::{BearerToken, ClientError, ClientOptions, ClientTls};

mod output;
mod parse;
mod run;

pub use parse::{
    NsArg, fill_payload, find_namespace, parse_dtype, parse_key, parse_keys, resolve_model,
    spec_from_args,
};

/// Arguments shared by every verb.
#[derive(Debug, Clone, clap::Args)]
pub struct GlobalArgs {
    /// Daemon address: unix:///path, /path, http://host:port or host:port
    /// [default: the daemon's default socket if it exists, else http://127.0.0.1:50051]
    #[arg(
        long,
        global = true,
        env = "KVSTRATA_ADDR",
        default_value_t = kvstrata_client::default_target(),
        hide_default_value = true
    )]
    pub addr: String,
    /// Print JSON instead of tables (one document per command; `watch`: one object per line)
    #[arg(long, global = true)]
    pub json: bool,
    /// Bearer token sent on every call (a daemon with auth.token_file).
    /// Connection flags go before the verb: `kvstrata --token-file F stats`
    #[arg(
        long,
        env = "KVSTRATA_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// File holding the bearer token (its first `TOKEN [TENANT]` line; `#` comments skipped)
    #[arg(long, env = "KVSTRATA_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) of an https:// daemon
    #[arg(long, env = "KVSTRATA_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), for a daemon with tls.client_ca
    #[arg(long, env = "KVSTRATA_CLIENT_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert
    #[arg(long, env = "KVSTRATA_CLIENT_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl GlobalArgs {
    /// The connection options these arguments ask for (token, TLS).
    pub fn client_options(&self) -> Result<ClientOptions, CliError> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => Some(BearerToken::new(t)?),
            (None, Some(f)) => Some(BearerToken::from_file(f)?),
            (None, None) => None,
        };
        let tls = if self.tls_ca.is_some() || self.tls_cert.is_some() {
            let pair = self.tls_cert.as_deref().zip(self.tls_key.as_deref());
            Some(ClientTls::from_files(self.tls_ca.as_deref(), pair)?)
        } else {
            None
        };
        Ok(ClientOptions {
            token,
            tls,
            ..ClientOptions::default()
        })
    }
}

/// The client verbs.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ClientCommand {
    /// Register or list namespaces (KV geometries)
    #[command(subcommand)]
    Ns(NsCommand),
    /// Per-tier occupancy and counters
    Stats,
    /// List cached blocks (follows pages)
    Ls {
        /// Only this namespace (id or model id)
        #[arg(long)]
        ns: Option<String>,
        /// Only this tier
        #[arg(long, value_enum)]
        tier: Option<TierArg>,
        /// At most this many blocks
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Everything known about one block, with a fresh checksum
    Inspect {
        /// Namespace (id or model id)
        #[arg(long)]
        ns: String,
        /// Block key (text, or hex:<digits>)
        key: String,
    },
    /// Store one block
    Put(PutArgs),
    /// Read one block
    Get {
        /// Namespace (id or model id)
        #[arg(long)]
        ns: String,
        /// Block key (text, or hex:<digits>)
        key: String,
        /// Write the payload to this file (`-`: stdout) instead of printing a summary
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Remove blocks from every tier
    Delete {
        /// Namespace (id or model id)
        #[arg(long)]
        ns: String,
        /// Block keys (text, or hex:<digits>)
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Demote blocks one tier down (from the lowest tier: drop them)
    Evict {
        /// Namespace (id or model id)
        #[arg(long)]
        ns: String,
        /// Block keys (text, or hex:<digits>)
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        keys: Vec<String>,
        /// Every block of the namespace
        #[arg(long)]
        all: bool,
    },
    /// Longest cached prefix of a chain of keys (parent first)
    Lookup {
        /// Namespace (id or model id)
        #[arg(long)]
        ns: String,
        /// Block keys, parent first (text, or hex:<digits>)
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Pin blocks in place under a lease
    Pin {
        /// Namespace (id or model id)
        #[arg(long)]
        ns: String,
        /// Lease length (`30s`, `5m`, `1500ms`)
        #[arg(long, value_parser = humantime::parse_duration)]
        lease: Duration,
        /// Block keys (text, or hex:<digits>)
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// End a lease before its deadline
    Unpin {
        /// Lease id printed by `pin`
        lease_id: u64,
    },
    /// Print stored / evicted / deleted events as they happen
    Watch {
        /// Only this namespace (id or model id)
        #[arg(long)]
        ns: Option<String>,
        /// Stop after this many events
        #[arg(long)]
        count: Option<u64>,
    },
    /// Read and check every disk-tier slot; exits non-zero if any is corrupt
    Verify {
        /// Also drop the corrupt slots (as a read would), instead of only reporting them
        #[arg(long)]
        drop: bool,
    },
}

/// `ns` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum NsCommand {
    /// Register (idempotently) a KV geometry and print its id
    Register(RegisterArgs),
    /// List registered namespaces
    Ls,
}

/// Arguments of `ns register`.
#[derive(Debug, Clone, clap::Args)]
pub struct RegisterArgs {
    /// Model id (e.g. SmolLM2-135M-Instruct)
    #[arg(long)]
    pub model: String,
    /// Number of layers
    #[arg(long)]
    pub layers: u32,
    /// KV heads (of this tensor-parallel rank)
    #[arg(long)]
    pub kv_heads: u32,
    /// Head dimension
    #[arg(long)]
    pub head_dim: u32,
    /// Element type: f16, bf16, f32, fp8_e4m3, fp8_e5m2, int8
    #[arg(long, value_parser = parse_dtype)]
    pub dtype: Dtype,
    /// Tokens per block
    #[arg(long)]
    pub block_tokens: u32,
    /// Model fingerprint (hex; a hash of weights or config)
    #[arg(long)]
    pub fingerprint: Option<String>,
    /// Tensor-parallel rank
    #[arg(long, default_value_t = 0)]
    pub tp_rank: u32,
    /// Tensor-parallel size
    #[arg(long, default_value_t = 1)]
    pub tp_size: u32,
    /// Opaque layout with blocks of exactly this many bytes (instead of layer-major)
    #[arg(long)]
    pub opaque_bytes: Option<u64>,
    /// Write every put to the disk tier too, in the background (needs a disk tier).
    /// Given on an already registered namespace, it changes its policy;
    /// `--write-through=false` turns it off.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub write_through: Option<bool>,
    /// Write every put to the remote tier (the shared cluster) too, in the background
    /// (needs a remote tier). Any policy flag sets the whole policy: the others are off
    /// unless given as well.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub remote_write_through: Option<bool>,
    /// Write every put to the disk tier before acknowledging it (needs a disk tier):
    /// an acknowledged block survives a crash of the daemon right after the answer;
    /// a put whose disk write fails answers DISK_FAILED and is not stored.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub sync_write_through: Option<bool>,
}

/// Arguments of `put`.
#[derive(Debug, Clone, clap::Args)]
pub struct PutArgs {
    /// Namespace (id or model id)
    #[arg(long)]
    pub ns: String,
    /// Block key (text, or hex:<digits>)
    pub key: String,
    /// Key of the previous block in the chain
    #[arg(long)]
    pub parent: Option<String>,
    /// Read the payload from this file (default: stdin)
    #[arg(long, conflicts_with = "fill_seed")]
    pub file: Option<PathBuf>,
    /// Send block_bytes of deterministic pseudo-random bytes (SplitMix64 from this seed)
    #[arg(long)]
    pub fill_seed: Option<u64>,
}

/// A tier name on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TierArg {
    Hbm,
    Host,
    Disk,
}

/// Errors of the CLI verbs; each displays as one line.
#[derive(Debug, Error)]
pub enum CliError {
    /// Connecting failed or the server answered with an error (`Code: message`).
    #[error("{0}")]
    Client(#[from] ClientError),
    /// A KEY argument is not a valid key.
    #[error("invalid key {arg:?}: {reason}")]
    InvalidKey { arg: String, reason: String },
    /// A namespace argument names no namespace, or several.
    #[error("{0}")]
    Namespace(String),
    /// Another argument is invalid.
    #[error("{0}")]
    InvalidArgument(String),
    /// A requested block is not cached.
    #[error("{0}")]
    NotFound(String),
    /// The server did not store a block.
    #[error("{0}")]
    NotStored(String),
    /// `verify` found corrupt disk slots.
    #[error("{0} corrupt disk slot(s) found")]
    Corrupt(u64),
    /// Reading or writing a file (or stdin/stdout) failed.
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The server answered something this CLI cannot make sense of.
    #[error("invalid response from the server: {0}")]
    InvalidResponse(String),
    /// JSON encoding failed.
    #[error("cannot encode JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl CliError {
    /// The gRPC status code, when the error came from the server.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            CliError::Client(e) => e.code(),
            _ => None,
        }
    }
}

/// Runs one verb against the daemon at `global.addr`. A closed stdout (e.g. `| head`)
/// ends the command quietly.
pub async fn run(cmd: ClientCommand, global: &GlobalArgs) -> Result<(), CliError> {
    match run::run(cmd, global).await {
        Err(CliError::Io { path, source })
            if path == "stdout" && source.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            Ok(())
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct TestCli {
        #[command(flatten)]
        global: GlobalArgs,
        #[command(subcommand)]
        cmd: Top,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Top {
        Serve,
        #[command(flatten)]
        Client(ClientCommand),
    }

    fn parse(args: &[&str]) -> Result<TestCli, clap::Error> {
        TestCli::try_parse_from(std::iter::once("kvstrata").chain(args.iter().copied()))
    }

    #[test]
    fn flattens_into_a_binary() {
        TestCli::command().debug_assert();
        assert!(matches!(parse(&["serve"]).unwrap().cmd, Top::Serve));
        let c = parse(&["--addr", "h:1", "stats", "--json"]).unwrap();
        assert_eq!(c.global.addr, "h:1");
        assert!(c.global.json);
        assert!(matches!(c.cmd, Top::Client(ClientCommand::Stats)));
    }

    /// `ns register` with the given geometry flags, then `extra`.
    fn register(model: &str, geometry: [&str; 5], extra: &[&str]) -> Result<RegisterArgs, String> {
        let [layers, heads, dim, dtype, tokens] = geometry;
        let mut args = vec![
            "ns",
            "register",
            "--model",
            model,
            "--layers",
            layers,
            "--kv-heads",
            heads,
            "--head-dim",
            dim,
            "--dtype",
            dtype,
            "--block-tokens",
            tokens,
        ];
        args.extend_from_slice(extra);
        match parse(&args).map_err(|e| e.to_string())?.cmd {
            Top::Client(ClientCommand::Ns(NsCommand::Register(a))) => Ok(a),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn register_args() {
        let a = register("SmolLM2-135M-Instruct", ["30", "3", "64", "f16", "16"], &[]).unwrap();
        assert_eq!(
            spec_from_args(&a).unwrap(),
            kvstrata_types::NamespaceSpec::layer_major(
                "SmolLM2-135M-Instruct",
                30,
                3,
                64,
                Dtype::F16,
                16
            )
        );
        assert_eq!(a.write_through, None);
        let extra = [
            "--opaque-bytes",
            "4096",
            "--fingerprint",
            "abcd",
            "--tp-rank",
            "1",
            "--tp-size",
            "2",
            "--write-through",
        ];
        let a = register("m", ["1", "1", "1", "int8", "4"], &extra).unwrap();
        let spec = spec_from_args(&a).unwrap();
        assert_eq!(spec.layout, kvstrata_types::Layout::Opaque);
        assert_eq!(spec.opaque_block_bytes, 4096);
        assert_eq!(spec.model_fingerprint, vec![0xab, 0xcd]);
        assert_eq!((spec.tp_rank, spec.tp_size), (1, 2));
        assert_eq!(a.write_through, Some(true));
        let a = register(
            "m",
            ["1", "1", "1", "int8", "4"],
            &["--write-through=false"],
        )
        .unwrap();
        assert_eq!(a.write_through, Some(false));
        assert_eq!(a.sync_write_through, None);
        let a = register("m", ["1", "1", "1", "int8", "4"], &["--sync-write-through"]).unwrap();
        assert_eq!(a.sync_write_through, Some(true));
        assert!(register("m", ["1", "1", "1", "f64", "4"], &[]).is_err());
    }

    #[test]
    fn verb_arguments() {
        let c = parse(&["pin", "--ns", "m", "--lease", "1500ms", "a", "hex:00"]).unwrap();
        let Top::Client(ClientCommand::Pin { lease, keys, .. }) = c.cmd else {
            panic!()
        };
        assert_eq!(lease, Duration::from_millis(1500));
        assert_eq!(keys, ["a", "hex:00"]);
        assert!(parse(&["evict", "--ns", "m"]).is_err(), "keys or --all");
        assert!(parse(&["evict", "--ns", "m", "--all", "k"]).is_err());
        assert!(parse(&["evict", "--ns", "m", "--all"]).is_ok());
        assert!(parse(&["put", "--ns", "m", "k", "--file", "f", "--fill-seed", "1"]).is_err());
        assert!(parse(&["delete", "--ns", "m"]).is_err());
        let c = parse(&["ls", "--tier", "disk", "--limit", "5"]).unwrap();
        let Top::Client(ClientCommand::Ls { tier, limit, ns }) = c.cmd else {
            panic!()
        };
        assert_eq!((tier, limit, ns), (Some(TierArg::Disk), Some(5), None));
        assert!(parse(&["ls", "--tier", "ssd"]).is_err());
        assert!(parse(&["watch", "--count", "3"]).is_ok());
        assert!(parse(&["unpin", "17"]).is_ok());
        assert!(matches!(
            parse(&["verify", "--drop"]).unwrap().cmd,
            Top::Client(ClientCommand::Verify { drop: true })
        ));
    }
}
