//! The kvstrata daemon as a library: configuration, the gRPC service, the
//! listeners and metrics. `kvstrata serve` (cli/src/main.rs) and the integration
//! tests start it through [`Daemon::start`].

pub mod auth;
pub mod config;
pub mod convert;
pub mod daemon;
pub mod error;
pub mod limits;
pub mod metrics;
pub mod region;
pub mod service;
pub mod shm;
pub mod size;
pub mod thread_time;
pub mod transport;

pub use config::{Config, ServeArgs};
pub use daemon::{BoundAddrs, Daemon};
pub use error::DaemonError;
