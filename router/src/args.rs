//! The flags of `kvstrata route` ([`RouteArgs`]) and the [`RouterConfig`] they describe.

use std::time::Duration;

use crate::config::{RouterConfig, TierWeights};

/// Arguments of `kvstrata route`.
#[derive(Debug, Clone, clap::Args)]
pub struct RouteArgs {
    /// A daemon to route over, as NAME=TARGET (TARGET: http://host:port, host:port,
    /// unix:///path or /path); repeat once per node
    #[arg(long = "node", value_name = "NAME=TARGET", required = true)]
    pub nodes: Vec<String>,
    /// Namespace of the request: its id (32 hex digits) or a model id registered on the nodes
    #[arg(long)]
    pub namespace: Option<String>,
    /// Block keys of the request, parent first, as comma-separated hex
    #[arg(
        long,
        value_name = "HEX,HEX,...",
        value_delimiter = ',',
        conflicts_with = "tokens"
    )]
    pub keys: Vec<String>,
    /// Token ids of the request, comma-separated; the keys are the canonical chained
    /// hash over full blocks of the namespace's block_tokens (docs/hashing.md)
    #[arg(long, value_name = "T,T,...", value_delimiter = ',')]
    pub tokens: Vec<String>,
    /// How long to wait for the reachable nodes to sync before deciding (or serving)
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub sync_timeout: Duration,
    /// Keep running and answer POST /route (JSON) and GET /metrics on this address
    #[arg(
        long,
        value_name = "ADDR",
        conflicts_with_all = ["namespace", "keys", "tokens"]
    )]
    pub serve: Option<String>,
    /// Score of a block matched in HBM
    #[arg(long, default_value_t = TierWeights::default().hbm)]
    pub weight_hbm: f64,
    /// Score of a block matched in host memory
    #[arg(long, default_value_t = TierWeights::default().host)]
    pub weight_host: f64,
    /// Score of a block matched on disk
    #[arg(long, default_value_t = TierWeights::default().disk)]
    pub weight_disk: f64,
    /// Score of a block matched in the shared remote tier
    #[arg(long, default_value_t = TierWeights::default().remote)]
    pub weight_remote: f64,
    /// Score (in blocks) subtracted per request in flight on a node
    #[arg(long, default_value_t = RouterConfig::default().load_penalty)]
    pub load_penalty: f64,
    /// Wait before reconnecting to a node whose stream broke or lagged
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    pub reconnect_interval: Duration,
    /// Log level (RUST_LOG overrides) [default: info with --serve, else error]
    #[arg(long)]
    pub log_level: Option<String>,
}

impl RouteArgs {
    /// The router config these flags describe.
    pub fn config(&self) -> RouterConfig {
        RouterConfig {
            weights: TierWeights {
                hbm: self.weight_hbm,
                host: self.weight_host,
                disk: self.weight_disk,
                remote: self.weight_remote,
            },
            load_penalty: self.load_penalty,
            reconnect_interval: self.reconnect_interval,
            ..RouterConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        route: RouteArgs,
    }

    fn parse(args: &[&str]) -> Result<RouteArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("route").chain(args.iter().copied())).map(|c| c.route)
    }

    #[test]
    fn arguments() {
        let a = parse(&[
            "--node",
            "a=h:1",
            "--node",
            "b=h:2",
            "--namespace",
            "x",
            "--keys",
            "00,11",
        ])
        .unwrap();
        assert_eq!(a.nodes, ["a=h:1", "b=h:2"]);
        assert_eq!(a.keys, ["00", "11"]);
        assert_eq!(a.sync_timeout, Duration::from_secs(5));
        assert_eq!(a.config(), RouterConfig::default());
        let a = parse(&[
            "--node",
            "a=h:1",
            "--tokens",
            "1,2,3",
            "--load-penalty",
            "2",
        ])
        .unwrap();
        assert_eq!(a.tokens, ["1", "2", "3"]);
        assert_eq!(a.config().load_penalty, 2.0);
        assert!(parse(&["--namespace", "x"]).is_err(), "--node is required");
        assert!(parse(&["--node", "a=h:1", "--keys", "00", "--tokens", "1"]).is_err());
        assert!(parse(&["--node", "a=h:1", "--serve", "x:1", "--keys", "00"]).is_err());
    }
}
