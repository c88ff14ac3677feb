//! Daemon configuration: a TOML file, every key overridable by a flag and by an
//! environment variable (`KVSTRATA_...`). Precedence: flag > environment >
//! file > built-in default. `kvstrata serve --print-config` prints the result.
//!
//! Each setting is typed once, in its section struct ([`sections`]: the
//! file's keys and their defaults; choices are enums, [`choice`]). The flags
//! and variables are a second, partial layer of the same keys ([`args`]), laid
//! over the file by one generic merge ([`layer`]); then the whole is checked
//! ([`validate`](Config::validate)).

pub mod args;
pub mod choice;
mod layer;
pub mod sections;
mod validate;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use kvstrata_tiers::{CacheConfig, HostTierConfig, MovementConfig};

use crate::error::DaemonError;

pub use args::{
    AuthFlags, DiskFlags, GpuFlags, HostFlags, LogFlags, RemoteFlags, ServeArgs, ServerFlags,
    SettingFlags, SglangFlags, ShmFlags, SocketArg, TlsFlags,
};
pub use choice::{DiskDurability, DiskIoEngine, GpuMode, LogFormat};
pub use sections::{
    AuthConfig, DiskConfig, GpuConfig, HostConfig, LogConfig, RemoteConfig, ServerConfig,
    SglangConfig, ShmConfig, TlsConfig,
};

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub host: HostConfig,
    pub disk: DiskConfig,
    pub remote: RemoteConfig,
    pub shm: ShmConfig,
    pub sglang: SglangConfig,
    pub gpu: GpuConfig,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
    pub log: LogConfig,
}

impl Config {
    /// Reads a TOML file; unknown keys and invalid choices are errors.
    pub fn from_file(path: &std::path::Path) -> Result<Config, DaemonError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| DaemonError::Config(format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| DaemonError::Config(format!("{}: {e}", path.display())))
    }

    /// The file (if any, else the defaults) with the environment and then the
    /// flags laid over it, checked.
    pub fn load(args: &ServeArgs) -> Result<Config, DaemonError> {
        let file = match &args.config {
            Some(p) => Config::from_file(p)?,
            None => Config::default(),
        };
        let config = layer::overlay(&file, &args.settings)
            .map_err(|e| DaemonError::Config(format!("flags and KVSTRATA_* variables: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    /// The cache configuration these settings describe.
    pub fn cache_config(&self) -> Result<CacheConfig, DaemonError> {
        Ok(CacheConfig {
            host: HostTierConfig {
                capacity_bytes: self.host.capacity.as_u64(),
                segment_bytes: self.host.segment_bytes.as_u64(),
            },
            disk: self.disk.tier_config()?,
            remote: self.remote.tier_config()?,
            movement: MovementConfig {
                promote_on_get: self.disk.promote_on_get,
                demote_queue_bytes: self.disk.demote_queue.as_u64(),
                drain_on_stop: Duration::from_millis(self.disk.drain_on_stop_ms),
                persist_on_stop: Duration::from_millis(self.disk.persist_on_stop_ms),
                ..MovementConfig::default()
            },
            // Also without an HBM tier: host-tier blocks move to and from
            // engine pages through device staging.
            device_moves: Some(kvstrata_tiers::DeviceMoves {
                dma_threshold: self.gpu.dma_threshold.as_u64(),
                group_bytes: self.gpu.move_group_bytes.as_u64(),
            }),
            max_lease: Duration::from_millis(self.server.max_lease_ms),
            ..CacheConfig::default()
        })
    }

    /// TOML text of the configuration.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// A socket path given as `unix:///path` or `/path`.
pub fn socket_path(s: &str) -> String {
    s.strip_prefix("unix://").unwrap_or(s).to_string()
}

#[cfg(test)]
mod tests;
