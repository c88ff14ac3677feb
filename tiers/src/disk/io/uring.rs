//! The io_uring engine: one ring thread keeps many transfers in flight.
//! Callers queue jobs and wake the thread through an eventfd; the thread
//! moves them into the ring (with a linked kernel timeout where a fault
//! plan delays them), submits, and completes each job's ticket as its
//! completion arrives. At shutdown it cancels what is in flight and closes
//! the ring only once the kernel has finished with every buffer; jobs
//! submitted after that run on the caller's thread.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use io_uring::{IoUring, Probe, opcode, squeue, types};
use parking_lot::Mutex;
use slab::Slab;

use super::pread::run_inline;
use super::{FaultCell, IoEngine, IoFailure, Job, OpKind, check_len};
use crate::disk::file::{ALIGN, AlignedBuf, BufPool};

const EFD_TAG: u64 = u64::MAX;
const CANCEL_TAG: u64 = u64::MAX - 1;
const TIMER_BIT: u64 = 1 << 62;

struct UringShared {
    queue: Mutex<Vec<Job>>,
    efd: OwnedFd,
    shutdown: AtomicBool,
    broken: AtomicBool,
    faults: Arc<FaultCell>,
}

impl UringShared {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        let _ = unsafe { libc::write(self.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

/// io_uring on a dedicated ring thread: callers queue jobs and wake the
/// thread through an eventfd; the thread keeps up to `depth` operations in
/// flight and completes tickets as completions arrive.
///
/// Started with a [`BufPool`] that has a region ([`BufPool::with_arena`]),
/// the engine registers that region with the ring as fixed buffer 0, and
/// every transfer whose buffer lies inside it is a `READ_FIXED` /
/// `WRITE_FIXED`: the kernel pinned those pages once, at registration,
/// instead of pinning and unpinning them for every `O_DIRECT` transfer.
/// Buffers outside the region (the pool's heap overflow) use plain
/// `READ`/`WRITE`. If registration fails (`RLIMIT_MEMLOCK` for an
/// unprivileged process, an old kernel), everything uses plain transfers.
pub struct UringEngine {
    shared: Arc<UringShared>,
    /// Taken (and joined) by the first [`IoEngine::shutdown`].
    thread: Mutex<Option<JoinHandle<()>>>,
    fixed: bool,
}

/// The buffer pool's memory, registered as fixed buffer 0. Holds the pool,
/// so the memory outlives the ring.
struct FixedRegion {
    start: usize,
    len: usize,
    _pool: Arc<BufPool>,
}

impl FixedRegion {
    fn covers(&self, ptr: *const u8, len: usize) -> bool {
        let p = ptr as usize;
        p >= self.start && p + len <= self.start + self.len
    }
}

struct InFlight {
    job: Job,
    want: usize,
    /// Completions still expected (the operation, plus its delay timer).
    outstanding: u8,
    result: Option<Result<(), IoFailure>>,
    forced: Option<i32>,
    _timer: Option<Box<types::Timespec>>,
}

impl UringEngine {
    /// Sets up a ring of `depth` entries and starts its thread (no fixed buffers).
    pub fn start(depth: u32, faults: Arc<FaultCell>) -> Result<Self, String> {
        Self::start_with_pool(depth, faults, None)
    }

    /// [`UringEngine::start`], registering `pool`'s region (if it has one)
    /// as fixed buffers; a failed registration only logs.
    pub fn start_with_pool(
        depth: u32,
        faults: Arc<FaultCell>,
        pool: Option<Arc<BufPool>>,
    ) -> Result<Self, String> {
        let depth = depth.clamp(8, 4096).next_power_of_two();
        let ring: IoUring = IoUring::new(depth).map_err(|e| format!("io_uring_setup: {e}"))?;
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| format!("io_uring probe: {e}"))?;
        for (code, name) in [
            (opcode::Read::CODE, "read"),
            (opcode::Write::CODE, "write"),
            (opcode::Timeout::CODE, "timeout"),
            (opcode::AsyncCancel::CODE, "async cancel"),
        ] {
            if !probe.is_supported(code) {
                return Err(format!("io_uring opcode {name} is not supported"));
            }
        }
        let fixed_ok = probe.is_supported(opcode::ReadFixed::CODE)
            && probe.is_supported(opcode::WriteFixed::CODE);
        let fixed = pool.filter(|_| fixed_ok).and_then(|pool| {
            let (ptr, len) = pool.region()?;
            let iov = libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            };
            // SAFETY: the region is allocated for as long as the pool
            // lives, and the ring thread holds the pool until the ring is
            // closed (or leaks both, if the ring breaks).
            match unsafe { ring.submitter().register_buffers(&[iov]) } {
                Ok(()) => Some(FixedRegion {
                    start: ptr as usize,
                    len,
                    _pool: pool,
                }),
                Err(e) => {
                    tracing::info!(
                        error = %e,
                        bytes = len,
                        "io_uring: buffer region not registered; plain reads and writes"
                    );
                    None
                }
            }
        });
        let fixed_on = fixed.is_some();
        // SAFETY: plain syscall; the result is checked before use.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(format!("eventfd: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: `efd` is a fresh descriptor that nothing else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        let shared = Arc::new(UringShared {
            queue: Mutex::new(Vec::new()),
            efd,
            shutdown: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            faults,
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("kvstrata-uring".into())
            .spawn(move || {
                // The ring goes first (it unregisters the region), then the
                // pool it held; a broken ring leaks both.
                if ring_main(ring, &s, fixed.as_ref()) == RingExit::Leaked {
                    std::mem::forget(fixed);
                }
            })
            .map_err(|e| format!("spawn ring thread: {e}"))?;
        Ok(UringEngine {
            shared,
            thread: Mutex::new(Some(thread)),
            fixed: fixed_on,
        })
    }
}

impl IoEngine for UringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn fixed_buffers(&self) -> bool {
        self.fixed
    }

    fn submit(&self, jobs: Vec<Job>) {
        if self.shared.broken.load(Ordering::Acquire) {
            for j in jobs {
                j.finish(Err(IoFailure::Shutdown));
            }
            return;
        }
        if self.shared.shutdown.load(Ordering::Acquire) {
            run_inline(jobs, &self.shared.faults);
            return;
        }
        self.shared.queue.lock().extend(jobs);
        self.shared.wake();
    }

    fn shutdown(&self) {
        self.stop();
    }
}

impl UringEngine {
    /// Stops the ring thread (see [`IoEngine::shutdown`]): it cancels what
    /// is in flight and closes the ring once the kernel has finished with
    /// every buffer. Jobs queued then run inline.
    fn stop(&self) {
        self.shared.shutdown.store(true, Ordering::Release);
        self.shared.wake();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
        let left: Vec<Job> = self.shared.queue.lock().drain(..).collect();
        if self.shared.broken.load(Ordering::Acquire) {
            for j in left {
                j.finish(Err(IoFailure::Shutdown));
            }
        } else {
            run_inline(left, &self.shared.faults);
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How the ring thread ended.
#[derive(Debug, PartialEq, Eq)]
enum RingExit {
    /// Shut down with nothing in flight; the ring is closed.
    Closed,
    /// Submission failed: the ring (and what it may still write) is leaked.
    Leaked,
}

/// The ring thread's state: the ring, the jobs in it, and the jobs waiting
/// for room in it.
struct RingLoop<'a> {
    ring: IoUring,
    shared: &'a UringShared,
    fixed: Option<&'a FixedRegion>,
    /// Entries the ring may hold for transfers and their timers (room is
    /// kept for the eventfd read and a cancel request).
    max_ops: usize,
    inflight: Slab<InFlight>,
    /// Entries in the ring whose completion has not arrived yet.
    ops_in_ring: usize,
    /// Jobs taken from the queue, not yet in the ring.
    pending: VecDeque<Job>,
    efd_buf: Box<[u8; 8]>,
    efd_armed: bool,
    cancel_sent: bool,
}

fn ring_main(ring: IoUring, shared: &UringShared, fixed: Option<&FixedRegion>) -> RingExit {
    let capacity = ring.params().sq_entries() as usize;
    RingLoop {
        ring,
        shared,
        fixed,
        // Keep room for the eventfd read and a cancel request.
        max_ops: capacity.saturating_sub(2).max(1),
        inflight: Slab::new(),
        ops_in_ring: 0,
        pending: VecDeque::new(),
        efd_buf: Box::new([0u8; 8]),
        efd_armed: false,
        cancel_sent: false,
    }
    .run()
}

impl RingLoop<'_> {
    /// One round per wake-up: arm the eventfd (or, shutting down, cancel
    /// what is in flight), move queued jobs into the ring, submit and wait,
    /// then complete what finished.
    fn run(mut self) -> RingExit {
        loop {
            if self.shared.shutdown.load(Ordering::Acquire) {
                if self.shut_down() {
                    // Dropping `self` closes the ring.
                    return RingExit::Closed;
                }
            } else if !self.efd_armed {
                let e = opcode::Read::new(
                    types::Fd(self.shared.efd.as_raw_fd()),
                    self.efd_buf.as_mut_ptr(),
                    8,
                )
                .build()
                .user_data(EFD_TAG);
                // SAFETY: `efd_buf` lives (boxed, not moved) until the thread
                // exits, which happens only after this read completed.
                if unsafe { self.ring.submission().push(&e) }.is_ok() {
                    self.efd_armed = true;
                }
            }
            self.fill();
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
                    ) => {}
                Err(e) => {
                    tracing::error!(error = %e, "io_uring submit failed; the disk engine stops");
                    return self.leak();
                }
            }
            self.reap();
        }
    }

    /// Fails every job not yet in the ring and cancels those in it; true
    /// once nothing is in flight (the ring can close).
    fn shut_down(&mut self) -> bool {
        self.pending.extend(self.shared.queue.lock().drain(..));
        for j in self.pending.drain(..) {
            j.finish(Err(IoFailure::Shutdown));
        }
        if self.inflight.is_empty() && !self.efd_armed {
            return true;
        }
        if !self.cancel_sent {
            let e = opcode::AsyncCancel2::new(types::CancelBuilder::any())
                .build()
                .user_data(CANCEL_TAG);
            // SAFETY: the cancel entry references no memory.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                self.cancel_sent = true;
            }
        }
        false
    }

    /// Moves queued jobs into the ring while it has room.
    fn fill(&mut self) {
        while let Some(job) = self.pending.pop_front() {
            if let Err(job) = self.push(job) {
                self.pending.push_front(job);
                break;
            }
        }
    }

    /// Puts one job into the ring, behind a linked timer if the fault plan
    /// delays it; gives the job back if the ring has no room for it.
    fn push(&mut self, mut job: Job) -> Result<(), Job> {
        let faults = self.shared.faults.get();
        let delay = match job.kind {
            OpKind::Read => faults.delay_reads,
            OpKind::Write => faults.delay_writes,
        };
        let need = if delay.is_some() { 2 } else { 1 };
        let room = {
            let sq = self.ring.submission();
            sq.capacity() - sq.len()
        };
        if self.ops_in_ring + need > self.max_ops || room < need {
            return Err(job);
        }
        let want = job.buf.len();
        let (forced, ask) = match job.kind {
            OpKind::Read => {
                let ask = if faults.short_reads && want > ALIGN {
                    want - ALIGN
                } else {
                    want
                };
                (faults.fail_reads_with, ask)
            }
            OpKind::Write => (faults.fail_writes_with, want),
        };
        let timer = delay.map(|d| Box::new(types::Timespec::from(d)));
        let Ok(len) = u32::try_from(ask) else {
            job.finish(Err(IoFailure::Errno(libc::EINVAL)));
            return Ok(());
        };
        let entry = self.inflight.vacant_entry();
        let id = entry.key() as u64;
        let registered = self.fixed.is_some_and(|f| f.covers(job.buf.as_ptr(), ask));
        let op = transfer_entry(&mut job, len, registered).user_data(id);
        let mut sq = self.ring.submission();
        // SAFETY: the buffer and timespec are owned by the in-flight
        // record, which is removed only after every completion of it
        // has arrived; there is room for `need` entries (checked above).
        unsafe {
            if let Some(ts) = &timer {
                let t = opcode::Timeout::new(&**ts as *const types::Timespec)
                    .flags(types::TimeoutFlags::ETIME_SUCCESS)
                    .build()
                    .flags(squeue::Flags::IO_LINK)
                    .user_data(id | TIMER_BIT);
                let _ = sq.push(&t);
            }
            let _ = sq.push(&op);
        }
        drop(sq);
        entry.insert(InFlight {
            job,
            want,
            outstanding: need as u8,
            result: None,
            forced,
            _timer: timer,
        });
        self.ops_in_ring += need;
        Ok(())
    }

    /// Completes the jobs whose last completion has arrived; re-arms the
    /// eventfd's jobs into `pending`.
    fn reap(&mut self) {
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (ud, res) in cqes {
            if ud == EFD_TAG {
                self.efd_armed = false;
                self.pending.extend(self.shared.queue.lock().drain(..));
                continue;
            }
            if ud == CANCEL_TAG {
                continue;
            }
            let timer = ud & TIMER_BIT != 0;
            let id = (ud & !TIMER_BIT) as usize;
            let Some(f) = self.inflight.get_mut(id) else {
                continue;
            };
            self.ops_in_ring = self.ops_in_ring.saturating_sub(1);
            f.outstanding = f.outstanding.saturating_sub(1);
            if !timer {
                f.result = Some(if let Some(e) = f.forced {
                    Err(IoFailure::Errno(e))
                } else if res < 0 {
                    Err(IoFailure::Errno(-res))
                } else {
                    check_len(res as usize, f.want)
                });
            }
            if f.outstanding == 0 {
                let f = self.inflight.remove(id);
                let result = f.result.unwrap_or(Err(IoFailure::Errno(libc::ECANCELED)));
                f.job.finish(result);
            }
        }
    }

    /// Submission failed: marks the engine broken, fails every job, and
    /// leaks the ring and every buffer the kernel may still write.
    fn leak(mut self) -> RingExit {
        self.shared.broken.store(true, Ordering::Release);
        self.pending.extend(self.shared.queue.lock().drain(..));
        for j in self.pending.drain(..) {
            j.finish(Err(IoFailure::Shutdown));
        }
        // The kernel may still own these buffers: leak them rather
        // than free memory it could write.
        for f in self.inflight.drain() {
            let InFlight { mut job, .. } = f;
            let placeholder = AlignedBuf::zeroed(ALIGN);
            if let Some(p) = placeholder {
                std::mem::forget(std::mem::replace(&mut job.buf, p));
            }
            job.finish(Err(IoFailure::Shutdown));
        }
        let RingLoop { ring, efd_buf, .. } = self;
        std::mem::forget(efd_buf);
        std::mem::forget(ring);
        RingExit::Leaked
    }
}

/// The submission entry of a job's transfer: `READ`/`WRITE`, or
/// `READ_FIXED`/`WRITE_FIXED` when its buffer lies in the registered region
/// (buffer 0).
fn transfer_entry(job: &mut Job, len: u32, registered: bool) -> squeue::Entry {
    let fd = types::Fd(job.fd);
    match (job.kind, registered) {
        (OpKind::Read, false) => opcode::Read::new(fd, job.buf.as_mut_ptr(), len)
            .offset(job.offset)
            .build(),
        (OpKind::Write, false) => opcode::Write::new(fd, job.buf.as_ptr(), len)
            .offset(job.offset)
            .build(),
        (OpKind::Read, true) => opcode::ReadFixed::new(fd, job.buf.as_mut_ptr(), len, 0)
            .offset(job.offset)
            .build(),
        (OpKind::Write, true) => opcode::WriteFixed::new(fd, job.buf.as_ptr(), len, 0)
            .offset(job.offset)
            .build(),
    }
}
