//! The disk tier's configuration: its slot files, index directory, segment
//! size, I/O engine and its settings, deadlines, durability and buffer pool,
//! with the checks [`DiskTier::open`](super::DiskTier::open) runs first and
//! the layout string it keeps in the index.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::DiskError;
use super::file;
use super::header::{self, HEADER_REGION};
use super::io::{EngineChoice, FaultPlan};

/// One slot file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskFileConfig {
    pub path: PathBuf,
    /// Bytes preallocated for the file (a multiple of 4 KiB).
    pub size_bytes: u64,
}

/// What `Stored` guarantees (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Survives a crash or SIGKILL of the process.
    #[default]
    ProcessCrash,
    /// Survives power loss: `O_DSYNC` data writes and an fsynced WAL.
    PowerLoss,
}

/// Configuration of the disk tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskTierConfig {
    /// Slot files, one per drive; at least one. Their sizes add up to the capacity.
    pub files: Vec<DiskFileConfig>,
    /// Directory of the RocksDB index.
    pub index_dir: PathBuf,
    /// Segment size of the slot arenas; the largest slot (header included).
    /// A multiple of 4 KiB, at least 8 KiB. Default 64 MiB.
    pub segment_bytes: u64,
    /// I/O engine. Default `Auto` (io_uring if the probe passes).
    pub engine: EngineChoice,
    /// io_uring submission queue entries. Default 128.
    pub queue_depth: u32,
    /// Worker threads of the pread/pwrite engine. Default 8.
    pub io_threads: usize,
    /// A read slower than this is abandoned and answers a miss. Default 2 s.
    pub read_timeout: Duration,
    /// A write slower than this is abandoned and the put fails. Default 10 s.
    pub write_timeout: Duration,
    /// Default [`Durability::ProcessCrash`].
    pub durability: Durability,
    /// Aligned I/O buffers: the size of the region they are carved from,
    /// allocated at open (and, with io_uring and `fixed_buffers`, registered
    /// with the kernel, so pinned); also the most idle heap buffers kept
    /// once the region is used up. Default 64 MiB.
    pub buffer_pool_bytes: usize,
    /// io_uring: register the buffer region as fixed buffers (falls back to
    /// plain reads and writes, with a log line, where the kernel refuses).
    /// Default true.
    pub fixed_buffers: bool,
    /// Injected faults (tests). Default none.
    #[cfg(feature = "testing")]
    pub faults: FaultPlan,
}

impl Default for DiskTierConfig {
    fn default() -> Self {
        DiskTierConfig {
            files: Vec::new(),
            index_dir: PathBuf::new(),
            segment_bytes: 64 << 20,
            engine: EngineChoice::Auto,
            queue_depth: 128,
            io_threads: 8,
            read_timeout: Duration::from_secs(2),
            write_timeout: Duration::from_secs(10),
            durability: Durability::ProcessCrash,
            buffer_pool_bytes: 64 << 20,
            fixed_buffers: true,
            #[cfg(feature = "testing")]
            faults: FaultPlan::default(),
        }
    }
}

impl DiskTierConfig {
    /// One slot file `dir/slots-0.kvs` of `capacity` bytes and the index in
    /// `dir/index`; other settings default.
    pub fn in_dir(dir: &Path, capacity: u64) -> Self {
        DiskTierConfig {
            files: vec![DiskFileConfig {
                path: dir.join("slots-0.kvs"),
                size_bytes: capacity,
            }],
            index_dir: dir.join("index"),
            ..DiskTierConfig::default()
        }
    }

    /// The fault plan the tier starts with.
    #[cfg(feature = "testing")]
    pub(super) fn initial_faults(&self) -> FaultPlan {
        self.faults
    }

    /// The fault plan the tier starts with: none without the `testing` feature.
    #[cfg(not(feature = "testing"))]
    pub(super) fn initial_faults(&self) -> FaultPlan {
        FaultPlan::default()
    }

    /// The layout string kept in the index: opening with another fails.
    pub(super) fn layout(&self) -> String {
        let sizes: Vec<String> = self
            .files
            .iter()
            .map(|f| f.size_bytes.to_string())
            .collect();
        format!(
            "kvstrata-disk format={} header={} segment={} files={}",
            header::FORMAT_VERSION,
            HEADER_REGION,
            self.segment_bytes,
            sizes.join(",")
        )
    }

    pub(super) fn validate(&self) -> Result<(), DiskError> {
        let a = file::ALIGN as u64;
        if self.files.is_empty() {
            return Err(DiskError::config(
                "files",
                "at least one slot file is needed",
            ));
        }
        if self.files.len() > u16::MAX as usize {
            return Err(DiskError::config("files", "too many slot files"));
        }
        if self.segment_bytes < 2 * a || !self.segment_bytes.is_multiple_of(a) {
            return Err(DiskError::config(
                "segment_bytes",
                "must be a multiple of 4096 and at least 8192",
            ));
        }
        if self.segment_bytes > u32::MAX as u64 {
            return Err(DiskError::config("segment_bytes", "must be below 4 GiB"));
        }
        for f in &self.files {
            if f.size_bytes < 2 * a || !f.size_bytes.is_multiple_of(a) {
                return Err(DiskError::config(
                    "files.size_bytes",
                    format!(
                        "{}: must be a multiple of 4096 and at least 8192",
                        f.path.display()
                    ),
                ));
            }
        }
        if self.index_dir.as_os_str().is_empty() {
            return Err(DiskError::config("index_dir", "must be set"));
        }
        if self.read_timeout.is_zero() || self.write_timeout.is_zero() {
            return Err(DiskError::config(
                "read_timeout",
                "timeouts must be positive",
            ));
        }
        Ok(())
    }
}
