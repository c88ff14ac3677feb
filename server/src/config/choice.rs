//! The settings that pick one of a few named behaviours, as enums.
//!
//! Each one is read from the config file, a flag or a variable through the same
//! [`FromStr`](std::str::FromStr), whose error names the TOML key, and is
//! written back (`--print-config`) by its canonical name.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Implements the text forms of a choice from its `parse` and `as_str`:
/// `FromStr` (flags and variables), `TryFrom<String>` (serde reads),
/// `From<Self> for &'static str` (serde writes) and `Display`.
macro_rules! named_choice {
    ($ty:ty) => {
        impl std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                Self::parse(s)
            }
        }

        impl TryFrom<String> for $ty {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                Self::parse(&s)
            }
        }

        impl From<$ty> for &'static str {
            fn from(choice: $ty) -> &'static str {
                choice.as_str()
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

/// `disk.engine`: how the disk tier does its I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum DiskIoEngine {
    /// `auto`: io_uring if the start-up probe passes, else pread/pwrite.
    #[default]
    Auto,
    /// `io_uring` (also `io-uring`): io_uring, or the tier does not open.
    IoUring,
    /// `pread`: pread/pwrite worker threads, no probe.
    Pread,
}

impl DiskIoEngine {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "io_uring" | "io-uring" => Ok(Self::IoUring),
            "pread" => Ok(Self::Pread),
            other => Err(format!(
                "disk.engine: {other:?} is not auto, io_uring or pread"
            )),
        }
    }

    /// The canonical name, as `--print-config` writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::IoUring => "io_uring",
            Self::Pread => "pread",
        }
    }
}

named_choice!(DiskIoEngine);

impl From<DiskIoEngine> for kvstrata_tiers::EngineChoice {
    fn from(engine: DiskIoEngine) -> Self {
        match engine {
            DiskIoEngine::Auto => Self::Auto,
            DiskIoEngine::IoUring => Self::IoUring,
            DiskIoEngine::Pread => Self::Pread,
        }
    }
}

/// `disk.durability`: what an acknowledged disk write survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum DiskDurability {
    /// `process-crash`: a crash or SIGKILL of the process.
    #[default]
    ProcessCrash,
    /// `power-loss`: also power loss (`O_DSYNC` slot writes, fsynced index WAL).
    PowerLoss,
}

impl DiskDurability {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "process-crash" => Ok(Self::ProcessCrash),
            "power-loss" => Ok(Self::PowerLoss),
            other => Err(format!(
                "disk.durability: {other:?} is not process-crash or power-loss"
            )),
        }
    }

    /// The canonical name, as `--print-config` writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ProcessCrash => "process-crash",
            Self::PowerLoss => "power-loss",
        }
    }
}

named_choice!(DiskDurability);

impl From<DiskDurability> for kvstrata_tiers::Durability {
    fn from(durability: DiskDurability) -> Self {
        match durability {
            DiskDurability::ProcessCrash => Self::ProcessCrash,
            DiskDurability::PowerLoss => Self::PowerLoss,
        }
    }
}

/// `gpu.enabled`: whether the daemon uses GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum GpuMode {
    /// `auto`: the GPUs of `gpu.devices` that are present; none is fine.
    #[default]
    Auto,
    /// `on` (also `true`): a configured device that cannot be opened is a start-up error.
    On,
    /// `off` (also `false`): no GPU code runs.
    Off,
    /// `cpu`: the CPU backend stands in for one GPU: the HBM tier lives in host
    /// memory and the kernels run their CPU references. For tests and for
    /// trying the GPU data paths on a machine without one (docs/gpu.md).
    Cpu,
}

impl GpuMode {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" | "true" => Ok(Self::On),
            "off" | "false" => Ok(Self::Off),
            "cpu" => Ok(Self::Cpu),
            other => Err(format!(
                "gpu.enabled: {other:?} is not auto, on, off or cpu"
            )),
        }
    }

    /// The canonical name, as `--print-config` writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::On => "on",
            Self::Off => "off",
            Self::Cpu => "cpu",
        }
    }
}

named_choice!(GpuMode);

/// `log.format`: how log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum LogFormat {
    /// `text`: human-readable lines.
    #[default]
    Text,
    /// `json`: one JSON object per line.
    Json,
}

impl LogFormat {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "log.format: {other:?} is neither \"text\" nor \"json\""
            )),
        }
    }

    /// The canonical name, as `--print-config` writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

named_choice!(LogFormat);
