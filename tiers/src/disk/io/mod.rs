//! The disk tier's I/O engines: io_uring (a ring thread with many requests
//! in flight, [`UringEngine`]) and pread/pwrite (a pool of worker threads,
//! [`PreadEngine`]), behind one [`IoEngine`] trait, plus the start-up choice
//! between them ([`EngineChoice`], the io_uring probe) and the fault hook
//! tests use.
//!
//! # Files
//!
//! - `mod.rs` (here): the transfer types, the [`IoEngine`] trait, the
//!   choice and the probe.
//! - `completion.rs`: jobs and tickets, how a transfer's result reaches its
//!   waiter exactly once (or is late).
//! - `batch.rs`: [`Batch`] and [`run`]; `pipeline.rs`: [`Pipeline`].
//! - `pread.rs`: [`PreadEngine`]; `uring.rs`: [`UringEngine`].
//! - `fault.rs`: the injected faults both engines apply.
//!
//! # Ownership and deadlines
//!
//! A transfer's [`AlignedBuf`] is moved into the engine with the request and
//! comes back with its completion. A [`Batch`] starts transfers (all at once,
//! or each as soon as its buffer is ready) and waits for every completion
//! until a deadline, either for all of them ([`Batch::wait`], one wake-up of
//! the caller per batch; [`run`] is this) or for each as it completes
//! ([`Batch::wait_each`], so a caller can verify finished reads while others
//! are in flight). A [`Pipeline`] instead keeps a window of transfers in
//! flight for as long as its caller keeps adding them: each transfer has its
//! own deadline, and the caller starts the next one as each completes, so
//! the queue never drains between batches. An operation still in flight at
//! its deadline is
//! *abandoned*: the caller gets [`IoFailure::Timeout`] at once, while the
//! engine keeps the buffer until the kernel has finished with it and only
//! then frees it and runs the operation's `on_late` hook (the disk tier uses
//! it to release a slot that a late write may still be filling). So a slow
//! or hung drive never blocks a caller past its deadline, and no buffer the
//! kernel may still write is ever freed or reused.
//!
//! # Probe
//!
//! [`probe_uring`] sets up a ring, checks that the kernel supports the
//! opcodes used (read, write, timeout, async cancel), starts the ring thread
//! and performs one real `O_DIRECT` read of the first slot file. Any failure
//! (typically `EPERM`/`ENOSYS` from a container's seccomp profile) is
//! reported as a reason string and the tier falls back to [`PreadEngine`].

mod batch;
mod completion;
mod fault;
mod pipeline;
mod pread;
mod uring;

#[cfg(test)]
mod tests;

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use batch::{Batch, run};
pub use completion::{Job, Ticket};
pub(crate) use fault::FaultCell;
#[cfg(feature = "testing")]
pub use fault::FaultPlan;
#[cfg(not(feature = "testing"))]
pub(crate) use fault::FaultPlan;
pub use pipeline::Pipeline;
pub use pread::PreadEngine;
pub use uring::UringEngine;

use super::DiskTierConfig;
use super::error::DiskError;
use super::file::{ALIGN, AlignedBuf, BufPool, SlotFile};

/// Which engine to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// io_uring if the probe succeeds, else pread/pwrite.
    #[default]
    Auto,
    /// io_uring or fail to open.
    IoUring,
    /// pread/pwrite, no probe.
    Pread,
}

/// Direction of a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
}

/// Why a transfer failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoFailure {
    /// The kernel answered this errno.
    Errno(i32),
    /// Fewer bytes than asked were transferred.
    Short { done: usize, want: usize },
    /// The deadline passed first; the operation was abandoned.
    Timeout,
    /// The engine is shut down or broken.
    Shutdown,
}

/// One transfer of the whole buffer at `offset` of `fd`.
pub struct IoOp {
    pub kind: OpKind,
    pub fd: RawFd,
    pub offset: u64,
    pub buf: AlignedBuf,
    /// Runs (on the engine's thread) once the kernel is done with an
    /// operation that was abandoned; dropped unrun otherwise.
    pub on_late: Option<Box<dyn FnOnce() + Send>>,
}

/// The result of one transfer: the buffer (absent after a timeout) and the outcome.
#[derive(Debug)]
pub struct IoDone {
    pub buf: Option<AlignedBuf>,
    pub result: Result<(), IoFailure>,
}

/// An I/O engine: takes jobs and completes each job's ticket exactly once.
pub trait IoEngine: Send + Sync {
    /// "io_uring" or "pread".
    fn name(&self) -> &'static str;
    /// Whether transfers from the buffer pool's region use registered
    /// (fixed) buffers.
    fn fixed_buffers(&self) -> bool {
        false
    }
    /// Starts the jobs (all of them together where the engine can).
    fn submit(&self, jobs: Vec<Job>);
    /// Stops the engine's threads, once the kernel has finished every
    /// transfer still in flight (an abandoned one's `on_late` hook has run
    /// by then); transfers in flight may complete failed. Jobs submitted
    /// afterwards run on the caller's thread with blocking
    /// `pread`/`pwrite` calls, so their deadlines no longer hold. The
    /// first call waits; later ones (and dropping the engine) do nothing
    /// more.
    fn shutdown(&self);
}

fn check_len(done: usize, want: usize) -> Result<(), IoFailure> {
    if done == want {
        Ok(())
    } else {
        Err(IoFailure::Short { done, want })
    }
}

/// Picks the engine: forced pread, forced io_uring, or probe with fallback.
pub(super) fn pick_engine(
    config: &DiskTierConfig,
    faults: &Arc<FaultCell>,
    files: &[SlotFile],
    pool: &Arc<BufPool>,
) -> Result<Box<dyn IoEngine>, DiskError> {
    let fixed = config.fixed_buffers.then(|| Arc::clone(pool));
    let pread = || -> Result<Box<dyn IoEngine>, DiskError> {
        PreadEngine::start(config.io_threads, Arc::clone(faults))
            .map(|e| Box::new(e) as Box<dyn IoEngine>)
            .map_err(|source| DiskError::Io {
                path: PathBuf::new(),
                op: "spawn I/O threads",
                source,
            })
    };
    let fd = files
        .first()
        .map(|f| f.fd())
        .ok_or_else(|| DiskError::config("files", "no slot file"))?;
    match config.engine {
        EngineChoice::Pread => {
            tracing::info!("disk tier: pread/pwrite engine (forced by config)");
            pread()
        }
        EngineChoice::IoUring => {
            match probe_uring(config.queue_depth, Arc::clone(faults), fd, fixed.clone()) {
                Ok(u) => {
                    tracing::info!("disk tier: io_uring engine");
                    Ok(Box::new(u))
                }
                Err(reason) => Err(DiskError::EngineUnavailable(reason)),
            }
        }
        EngineChoice::Auto => {
            match probe_uring(config.queue_depth, Arc::clone(faults), fd, fixed.clone()) {
                Ok(u) => {
                    tracing::info!("disk tier: io_uring engine");
                    Ok(Box::new(u))
                }
                Err(reason) => {
                    tracing::warn!(%reason, "disk tier: io_uring unavailable; using pread/pwrite");
                    pread()
                }
            }
        }
    }
}

/// Starts an io_uring engine and proves it works with one real read of
/// `ALIGN` bytes at offset 0 of `fd` (a slot file opened with `O_DIRECT`).
/// With `pool`, its region is registered as fixed buffers (see
/// [`UringEngine`]) and the probe read goes through a buffer of that region;
/// if that read fails, the engine starts again without fixed buffers.
pub fn probe_uring(
    depth: u32,
    faults: Arc<FaultCell>,
    fd: RawFd,
    pool: Option<Arc<BufPool>>,
) -> Result<UringEngine, String> {
    if let Some(pool) = pool.filter(|p| p.region().is_some()) {
        let engine =
            UringEngine::start_with_pool(depth, Arc::clone(&faults), Some(Arc::clone(&pool)))?;
        if engine.fixed_buffers() {
            let buf = pool.get(ALIGN).ok_or("cannot allocate a probe buffer")?;
            match probe_read(&engine, fd, buf) {
                Ok(()) => return Ok(engine),
                Err(e) => tracing::info!(
                    error = %e,
                    "io_uring: a read into the registered region failed; plain reads and writes"
                ),
            }
        } else {
            let buf = AlignedBuf::zeroed(ALIGN).ok_or("cannot allocate a probe buffer")?;
            probe_read(&engine, fd, buf)?;
            return Ok(engine);
        }
    }
    let engine = UringEngine::start(depth, faults)?;
    let buf = AlignedBuf::zeroed(ALIGN).ok_or("cannot allocate a probe buffer")?;
    probe_read(&engine, fd, buf)?;
    Ok(engine)
}

/// One real read of `buf.len()` bytes at offset 0 of `fd`.
fn probe_read(engine: &UringEngine, fd: RawFd, buf: AlignedBuf) -> Result<(), String> {
    let op = IoOp {
        kind: OpKind::Read,
        fd,
        offset: 0,
        buf,
        on_late: None,
    };
    let done = run(engine, vec![op], Instant::now() + Duration::from_secs(5));
    match done.into_iter().next().map(|d| d.result) {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(format!("io_uring probe read failed: {e:?}")),
        None => Err("io_uring probe read returned nothing".into()),
    }
}
