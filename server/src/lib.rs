//! The kvstrata daemon as a library: configuration, the gRPC service, the
//! listeners and metrics. `kvstrata serve` (src/main.rs) and the integration
//! tests start it through [`Daemon::start`].

pub mod config;
pub mod convert;
pub mod daemon;
pub mod error;
pub mod metrics;
pub mod service;
pub mod size;

pub use config::{Config, ServeArgs};
pub use daemon::{BoundAddrs, Daemon};
pub use error::DaemonError;
