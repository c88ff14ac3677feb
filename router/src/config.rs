//! What the router is given: the nodes ([`NodeSpec`]), the tiers a matched block
//! counts in ([`RouteTier`]) and how much ([`TierWeights`]), and how it follows
//! the nodes ([`RouterConfig`]).

use std::fmt;
use std::time::Duration;

use kvstrata_client::{BearerToken, ClientTls, Target};
use kvstrata_proto::v1 as proto;
use serde::Serialize;

use crate::error::RouterError;

/// One daemon to route to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeSpec {
    /// Name used in decisions, logs and metrics.
    pub name: String,
    /// Where to reach it, in any form [`Client::connect`] accepts
    /// (`http://127.0.0.1:50051`, `host:port`, `unix:///path`, `/path`).
    pub target: String,
}

impl NodeSpec {
    /// A node named `name` at `target` (not checked until [`Router::start`]).
    pub fn new(name: impl Into<String>, target: impl Into<String>) -> Self {
        NodeSpec {
            name: name.into(),
            target: target.into(),
        }
    }

    /// Parses `NAME=TARGET` (the name is everything before the first `=`) and
    /// checks both parts.
    pub fn parse(arg: &str) -> Result<NodeSpec, RouterError> {
        let invalid = |reason: &str| RouterError::InvalidNode {
            arg: arg.to_string(),
            reason: reason.to_string(),
        };
        let Some((name, target)) = arg.split_once('=') else {
            return Err(invalid(
                "expected NAME=TARGET (e.g. a=http://127.0.0.1:50051 or b=unix:///run/kv.sock)",
            ));
        };
        let spec = NodeSpec::new(name.trim(), target.trim());
        spec.check().map_err(|e| match e {
            RouterError::InvalidNode { reason, .. } => invalid(&reason),
            other => other,
        })?;
        Ok(spec)
    }

    pub(crate) fn check(&self) -> Result<(), RouterError> {
        let invalid = |reason: String| RouterError::InvalidNode {
            arg: format!("{}={}", self.name, self.target),
            reason,
        };
        if self.name.is_empty() {
            return Err(invalid("empty node name".into()));
        }
        if !self
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
        {
            return Err(invalid(
                "a node name may hold only ASCII letters, digits, '-', '_', '.' and ':'".into(),
            ));
        }
        Target::parse(&self.target).map_err(|e| invalid(e.to_string()))?;
        Ok(())
    }
}

/// A tier a matched block counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteTier {
    Hbm,
    Host,
    Disk,
    /// The shared remote tier (a cluster every node reads).
    Remote,
}

impl RouteTier {
    /// Every tier, fastest first.
    pub const ALL: [RouteTier; 4] = [
        RouteTier::Hbm,
        RouteTier::Host,
        RouteTier::Disk,
        RouteTier::Remote,
    ];
    pub(crate) const LOCAL: [RouteTier; 3] = [RouteTier::Hbm, RouteTier::Host, RouteTier::Disk];

    /// Short name (`hbm`, `host`, `disk`, `remote`).
    pub fn name(self) -> &'static str {
        match self {
            RouteTier::Hbm => "hbm",
            RouteTier::Host => "host",
            RouteTier::Disk => "disk",
            RouteTier::Remote => "remote",
        }
    }

    /// From a wire tier code; `None` for unspecified or unknown codes.
    pub fn from_proto(code: i32) -> Option<RouteTier> {
        match proto::Tier::try_from(code) {
            Ok(proto::Tier::Hbm) => Some(RouteTier::Hbm),
            Ok(proto::Tier::Host) => Some(RouteTier::Host),
            Ok(proto::Tier::Disk) => Some(RouteTier::Disk),
            Ok(proto::Tier::Remote) => Some(RouteTier::Remote),
            _ => None,
        }
    }

    pub(crate) fn bit(self) -> u8 {
        match self {
            RouteTier::Hbm => 1,
            RouteTier::Host => 2,
            RouteTier::Disk => 4,
            RouteTier::Remote => 8,
        }
    }
}

impl fmt::Display for RouteTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Score of one matched block in each tier.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TierWeights {
    /// Default 1.0.
    pub hbm: f64,
    /// Default 0.8.
    pub host: f64,
    /// Default 0.5.
    pub disk: f64,
    /// Default 0.25: a block in the shared remote tier, which every node can read.
    pub remote: f64,
}

impl Default for TierWeights {
    fn default() -> Self {
        TierWeights {
            hbm: 1.0,
            host: 0.8,
            disk: 0.5,
            remote: 0.25,
        }
    }
}

impl TierWeights {
    /// The weight of `tier`.
    pub fn weight(&self, tier: RouteTier) -> f64 {
        match tier {
            RouteTier::Hbm => self.hbm,
            RouteTier::Host => self.host,
            RouteTier::Disk => self.disk,
            RouteTier::Remote => self.remote,
        }
    }
}

/// How the router scores and how it follows the nodes.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterConfig {
    /// Score of one matched block per tier (default: hbm 1.0, host 0.8, disk 0.5, remote 0.25).
    pub weights: TierWeights,
    /// Score subtracted per request in flight on a node, in blocks (default 4.0).
    pub load_penalty: f64,
    /// Wait before reconnecting to a node whose stream broke or lagged (default 1 s).
    pub reconnect_interval: Duration,
    /// Blocks per `ListBlocks` page of a snapshot (default 1000; the daemon allows 1 to 10,000).
    pub snapshot_page_size: u32,
    /// How long connecting to a node may take (default 2 s).
    pub connect_timeout: Duration,
    /// Bound on each `ListBlocks` call of a snapshot and on opening the `Watch` stream (default 10 s).
    pub request_timeout: Duration,
    /// Bearer token sent to every node (daemons with `auth.token_file`; default none).
    pub token: Option<BearerToken>,
    /// TLS settings for `https://` nodes (default none).
    pub tls: Option<ClientTls>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            weights: TierWeights::default(),
            load_penalty: 4.0,
            reconnect_interval: Duration::from_secs(1),
            snapshot_page_size: 1000,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            token: None,
            tls: None,
        }
    }
}

impl RouterConfig {
    /// Checks that weights and penalty are finite and not negative, and the page
    /// size and intervals usable.
    pub fn validate(&self) -> Result<(), RouterError> {
        let bad = |s: String| Err(RouterError::InvalidConfig(s));
        for tier in RouteTier::ALL {
            let w = self.weights.weight(tier);
            if !w.is_finite() || w < 0.0 {
                return bad(format!(
                    "weight of tier {tier} is {w}; it must be a finite number >= 0"
                ));
            }
        }
        if !self.load_penalty.is_finite() || self.load_penalty < 0.0 {
            return bad(format!(
                "load_penalty is {}; it must be a finite number >= 0",
                self.load_penalty
            ));
        }
        if !(1..=10_000).contains(&self.snapshot_page_size) {
            return bad(format!(
                "snapshot_page_size is {}; it must be 1 to 10000",
                self.snapshot_page_size
            ));
        }
        if self.reconnect_interval.is_zero() {
            return bad("reconnect_interval must be more than zero".into());
        }
        if self.connect_timeout.is_zero() || self.request_timeout.is_zero() {
            return bad("connect_timeout and request_timeout must be more than zero".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_documented_values() {
        let c = RouterConfig::default();
        assert_eq!(
            (
                c.weights.hbm,
                c.weights.host,
                c.weights.disk,
                c.weights.remote
            ),
            (1.0, 0.8, 0.5, 0.25)
        );
        assert_eq!(c.load_penalty, 4.0);
        assert_eq!(c.reconnect_interval, Duration::from_secs(1));
        assert_eq!(c.snapshot_page_size, 1000);
        c.validate().unwrap();
        let mut bad = c.clone();
        bad.weights.disk = -1.0;
        assert!(bad.validate().unwrap_err().to_string().contains("disk"));
        let mut bad = c.clone();
        bad.load_penalty = f64::NAN;
        assert!(bad.validate().is_err());
        let mut bad = c;
        bad.snapshot_page_size = 0;
        assert!(bad.validate().is_err());
    }

    #[test]
    fn node_specs_parse_and_check() {
        let n = NodeSpec::parse("a=http://127.0.0.1:5000").unwrap();
        assert_eq!(n, NodeSpec::new("a", "http://127.0.0.1:5000"));
        assert_eq!(
            NodeSpec::parse("b=unix:///run/kv.sock").unwrap().target,
            "unix:///run/kv.sock"
        );
        for bad in ["nonsense", "=http://h:1", "a=", "a=ftp://h:1", "a b=h:1"] {
            let e = NodeSpec::parse(bad).unwrap_err();
            assert!(matches!(e, RouterError::InvalidNode { .. }), "{bad}: {e:?}");
            assert!(!e.to_string().contains('\n'));
        }
    }
}
