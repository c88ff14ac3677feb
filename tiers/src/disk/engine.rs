//! I/O engines: io_uring (a ring thread with many requests in flight) and
//! pread/pwrite (a pool of worker threads), behind one [`IoEngine`] trait,
//! plus the start-up probe that picks one and the fault hook tests use.
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

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use io_uring::{IoUring, Probe, opcode, squeue, types};
use parking_lot::{Condvar, Mutex, RwLock};
use slab::Slab;

use super::file::{ALIGN, AlignedBuf, BufPool};

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

/// Faults injected into the real I/O path (tests and fault drills). The
/// default injects nothing. Change it at run time with
/// [`DiskTier::set_fault_plan`](super::DiskTier::set_fault_plan).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// Every read completes with this errno (e.g. `libc::EIO`) instead of its result.
    pub fail_reads_with: Option<i32>,
    /// Every write completes with this errno (e.g. `libc::ENOSPC`).
    pub fail_writes_with: Option<i32>,
    /// Every read starts this late (io_uring: a linked kernel timeout; pread: the worker waits).
    pub delay_reads: Option<Duration>,
    /// Every write starts this late (as `delay_reads`).
    pub delay_writes: Option<Duration>,
    /// Reads ask the kernel for one 4 KiB block less than needed (a short read).
    pub short_reads: bool,
    /// Puts write their data but skip the index write, as if the process
    /// died between the two (the put then reports `NoSpace`).
    pub drop_index_writes: bool,
}

/// The shared, switchable fault plan.
#[derive(Debug, Default)]
pub struct FaultCell(RwLock<FaultPlan>);

impl FaultCell {
    pub fn new(plan: FaultPlan) -> Arc<Self> {
        Arc::new(FaultCell(RwLock::new(plan)))
    }

    pub fn get(&self) -> FaultPlan {
        *self.0.read()
    }

    pub fn set(&self, plan: FaultPlan) {
        *self.0.write() = plan;
    }
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

/// Completion state of one batch, shared by its tickets and its waiter.
struct BatchShared {
    state: Mutex<BatchState>,
    /// Signalled once, when the last operation of the batch completes (or
    /// at every completion, when the waiter asked for that).
    all_done: Condvar,
}

impl BatchShared {
    fn new(capacity: usize, each: bool) -> Arc<Self> {
        Arc::new(BatchShared {
            state: Mutex::new(BatchState::new(capacity, each)),
            all_done: Condvar::new(),
        })
    }
}

fn make_job(shared: &Arc<BatchShared>, index: usize, op: IoOp) -> Job {
    Job {
        kind: op.kind,
        fd: op.fd,
        offset: op.offset,
        buf: op.buf,
        ticket: Ticket {
            index,
            batch: Arc::clone(shared),
            on_late: op.on_late,
            finished: false,
        },
    }
}

struct BatchState {
    /// Results by index - `base` (a [`Batch`] never trims, so `base` is 0).
    results: VecDeque<Option<IoDone>>,
    /// Index of `results[0]`: a [`Pipeline`] drops the entries of operations
    /// it has handed out or abandoned from the front, so a long stream keeps
    /// only its window here. Every index below `base` was handed out or
    /// abandoned.
    base: usize,
    /// [`Pipeline`] only (empty for a [`Batch`]): the state of each
    /// operation in `results`.
    status: VecDeque<OpStatus>,
    /// Operations neither completed nor abandoned.
    left: usize,
    /// The waiter stopped waiting (deadline passed, or the batch was
    /// dropped): operations completing from now on are late.
    closed: bool,
    /// Indices in completion order, not yet handed out ([`Batch::wait_each`]).
    ready: VecDeque<usize>,
    /// The waiter wants a wake-up per completion, not only after the last.
    each: bool,
}

/// Where a [`Pipeline`]'s operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpStatus {
    /// Started (or staged), or completed and not yet handed out.
    Open,
    /// Completed and handed to the caller.
    Handed,
    /// Its deadline passed first: completing it now is late.
    Abandoned,
}

impl BatchState {
    fn new(capacity: usize, each: bool) -> Self {
        BatchState {
            results: VecDeque::with_capacity(capacity),
            base: 0,
            status: VecDeque::new(),
            left: 0,
            closed: false,
            ready: VecDeque::with_capacity(capacity),
            each,
        }
    }

    /// Whether operation `index` completing now is late (its waiter gave up on it).
    fn is_late(&self, index: usize) -> bool {
        self.closed
            || match index.checked_sub(self.base) {
                // Below the window: handed out (it cannot complete twice) or abandoned.
                None => true,
                Some(pos) => self.status.get(pos) == Some(&OpStatus::Abandoned),
            }
    }

    /// Adds an operation; returns its index.
    fn add(&mut self, tracked: bool) -> usize {
        self.results.push_back(None);
        if tracked {
            self.status.push_back(OpStatus::Open);
        }
        self.left += 1;
        self.base + self.results.len() - 1
    }
}

/// Completion side of one operation; completes exactly once (on drop at the latest).
pub struct Ticket {
    index: usize,
    batch: Arc<BatchShared>,
    on_late: Option<Box<dyn FnOnce() + Send>>,
    finished: bool,
}

impl Ticket {
    fn finish(&mut self, buf: Option<AlignedBuf>, result: Result<(), IoFailure>) {
        if self.finished {
            return;
        }
        self.finished = true;
        let (late, wake) = {
            let mut st = self.batch.state.lock();
            if st.is_late(self.index) {
                (Some(buf), false)
            } else {
                let pos = self.index - st.base;
                if let Some(slot) = st.results.get_mut(pos)
                    && slot.is_none()
                {
                    *slot = Some(IoDone { buf, result });
                    st.left = st.left.saturating_sub(1);
                    st.ready.push_back(self.index);
                }
                (None, st.left == 0 || st.each)
            }
        };
        // The waiter is woken once per batch, not once per operation.
        if wake {
            self.batch.all_done.notify_one();
        }
        if let Some(buf) = late {
            // The kernel is done with the buffer: free it, then release
            // whatever the abandoned operation held.
            drop(buf);
            if let Some(hook) = self.on_late.take() {
                hook();
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.finish(None, Err(IoFailure::Shutdown));
    }
}

/// A transfer handed to an engine.
pub struct Job {
    pub kind: OpKind,
    pub fd: RawFd,
    pub offset: u64,
    pub buf: AlignedBuf,
    pub ticket: Ticket,
}

impl Job {
    fn finish(mut self, result: Result<(), IoFailure>) {
        let buf = self.buf;
        self.ticket.finish(Some(buf), result);
    }
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
}

/// Transfers started one by one (or a few at a time) and waited for
/// together: a caller that prepares buffers can start each transfer as soon
/// as its buffer is ready ([`Batch::submit`]), so the drive works while the
/// next buffer is prepared, or stage them ([`Batch::push`]) and start them
/// all at once. [`run`] is `push` for every op, then [`Batch::wait`].
///
/// A batch dropped without `wait` abandons what is still in flight, as a
/// deadline does (buffers are kept until the kernel is done with them, then
/// `on_late` runs); staged operations are dropped unstarted (their `on_late`
/// runs at once).
pub struct Batch<'e> {
    engine: &'e dyn IoEngine,
    shared: Arc<BatchShared>,
    staged: Vec<Job>,
}

impl<'e> Batch<'e> {
    /// An empty batch on `engine`, with room for `capacity` operations.
    pub fn new(engine: &'e dyn IoEngine, capacity: usize) -> Self {
        Batch {
            engine,
            shared: BatchShared::new(capacity, false),
            staged: Vec::with_capacity(capacity),
        }
    }

    fn job(&mut self, op: IoOp) -> Job {
        let index = self.shared.state.lock().add(false);
        make_job(&self.shared, index, op)
    }

    /// Adds `op`; it starts with the next [`Batch::flush`], [`Batch::submit`]
    /// or [`Batch::wait`].
    pub fn push(&mut self, op: IoOp) {
        let job = self.job(op);
        self.staged.push(job);
    }

    /// Adds `op` and starts it now (with any staged ones).
    pub fn submit(&mut self, op: IoOp) {
        self.push(op);
        self.flush();
    }

    /// Starts the staged operations.
    pub fn flush(&mut self) {
        if !self.staged.is_empty() {
            let jobs = std::mem::take(&mut self.staged);
            self.engine.submit(jobs);
        }
    }

    /// Operations added so far.
    pub fn len(&self) -> usize {
        self.shared.state.lock().results.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts the staged operations and waits until every operation has
    /// completed or `deadline` has passed. Results are in the order the
    /// operations were added; one still in flight at the deadline is
    /// abandoned ([`IoFailure::Timeout`], no buffer).
    pub fn wait(mut self, deadline: Instant) -> Vec<IoDone> {
        self.flush();
        let mut st = self.shared.state.lock();
        while st.left > 0 {
            if self
                .shared
                .all_done
                .wait_until(&mut st, deadline)
                .timed_out()
            {
                break;
            }
        }
        st.closed = true;
        let results = std::mem::take(&mut st.results);
        drop(st);
        results
            .into_iter()
            .map(|d| {
                d.unwrap_or(IoDone {
                    buf: None,
                    result: Err(IoFailure::Timeout),
                })
            })
            .collect()
    }

    /// Starts the staged operations and hands each operation's result to
    /// `f` as soon as it completes (in completion order, with its index in
    /// the batch), so the caller can work on finished transfers while the
    /// others are still in flight. At `deadline` the ones still in flight
    /// are abandoned and handed to `f` as [`IoFailure::Timeout`]. Returns
    /// when every operation has been handed out.
    pub fn wait_each(mut self, deadline: Instant, mut f: impl FnMut(usize, IoDone)) {
        self.flush();
        let mut st = self.shared.state.lock();
        st.each = true;
        let mut handed = vec![false; st.results.len()];
        loop {
            while let Some(i) = st.ready.pop_front() {
                if let Some(done) = st.results.get_mut(i).and_then(Option::take) {
                    if let Some(h) = handed.get_mut(i) {
                        *h = true;
                    }
                    drop(st);
                    f(i, done);
                    st = self.shared.state.lock();
                }
            }
            if st.left == 0 {
                return;
            }
            if self
                .shared
                .all_done
                .wait_until(&mut st, deadline)
                .timed_out()
                && st.ready.is_empty()
            {
                // Everything not completed by now is abandoned.
                st.closed = true;
                drop(st);
                for (i, _) in handed.iter().enumerate().filter(|(_, h)| !**h) {
                    f(
                        i,
                        IoDone {
                            buf: None,
                            result: Err(IoFailure::Timeout),
                        },
                    );
                }
                return;
            }
        }
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        // Whatever completes after this is late (after `wait`, nothing is left).
        self.shared.state.lock().closed = true;
    }
}

/// A window of transfers kept in flight continuously: the caller adds
/// transfers ([`Pipeline::push`], each with its own deadline), waits for
/// some to complete ([`Pipeline::wait_some`]) and adds the next ones at
/// once, so the drive always has work queued, as with fio's `iodepth`,
/// instead of draining at the end of every batch. How many are in flight is
/// the caller's choice ([`Pipeline::open`] counts them).
///
/// An operation whose deadline passes before it completes is handed out as
/// [`IoFailure::Timeout`] (no buffer) and abandoned alone; the engine keeps
/// its buffer until the kernel is done with it and then runs its `on_late`
/// hook, as for a [`Batch`]. Dropping the pipeline abandons everything still
/// in flight the same way, and drops staged operations unstarted.
///
/// Bookkeeping is per window, not per stream: the state of operations
/// already handed out or abandoned is dropped as the window moves on.
pub struct Pipeline<'e> {
    engine: &'e dyn IoEngine,
    shared: Arc<BatchShared>,
    staged: Vec<Job>,
    /// Operations added and not yet handed out: (index, deadline).
    open: Vec<(usize, Instant)>,
}

impl<'e> Pipeline<'e> {
    /// An empty pipeline on `engine`, sized for `depth` operations in flight.
    pub fn new(engine: &'e dyn IoEngine, depth: usize) -> Self {
        Pipeline {
            engine,
            shared: BatchShared::new(depth, true),
            staged: Vec::with_capacity(depth),
            open: Vec::with_capacity(depth),
        }
    }

    /// Adds `op`, to complete by `deadline`; it starts with the next
    /// [`Pipeline::flush`] or [`Pipeline::wait_some`]. Returns its index
    /// (indices count up from 0 and are never reused).
    pub fn push(&mut self, op: IoOp, deadline: Instant) -> usize {
        let index = self.shared.state.lock().add(true);
        self.staged.push(make_job(&self.shared, index, op));
        self.open.push((index, deadline));
        index
    }

    /// Starts the staged operations.
    pub fn flush(&mut self) {
        if !self.staged.is_empty() {
            let jobs = std::mem::take(&mut self.staged);
            self.engine.submit(jobs);
        }
    }

    /// Operations added and not yet handed out (in flight, staged, or
    /// completed and waiting for [`Pipeline::wait_some`]).
    pub fn open(&self) -> usize {
        self.open.len()
    }

    /// Starts the staged operations, waits until at least one operation
    /// has completed or the earliest deadline has passed, and appends to
    /// `out` every operation completed by now (in completion order) and
    /// every one whose deadline has passed ([`IoFailure::Timeout`], no
    /// buffer; abandoned). Returns at once when nothing is open.
    pub fn wait_some(&mut self, out: &mut Vec<(usize, IoDone)>) {
        self.flush();
        let Some(earliest) = self.open.iter().map(|&(_, d)| d).min() else {
            return;
        };
        let mut st = self.shared.state.lock();
        while st.ready.is_empty() {
            if self
                .shared
                .all_done
                .wait_until(&mut st, earliest)
                .timed_out()
            {
                break;
            }
        }
        let before = out.len();
        while let Some(index) = st.ready.pop_front() {
            let Some(pos) = index.checked_sub(st.base) else {
                continue;
            };
            let done = st.results.get_mut(pos).and_then(Option::take);
            if let (Some(done), Some(status)) = (done, st.status.get_mut(pos)) {
                *status = OpStatus::Handed;
                out.push((index, done));
            }
        }
        for &(index, _) in &out[before..] {
            if let Some(k) = self.open.iter().position(|&(i, _)| i == index) {
                self.open.swap_remove(k);
            }
        }
        // What is still open now has not completed: abandon the overdue ones.
        let now = Instant::now();
        let mut k = 0;
        while k < self.open.len() {
            let (index, deadline) = self.open[k];
            if deadline > now {
                k += 1;
                continue;
            }
            self.open.swap_remove(k);
            if let Some(status) = index
                .checked_sub(st.base)
                .and_then(|pos| st.status.get_mut(pos))
            {
                *status = OpStatus::Abandoned;
                st.left = st.left.saturating_sub(1);
            }
            out.push((
                index,
                IoDone {
                    buf: None,
                    result: Err(IoFailure::Timeout),
                },
            ));
        }
        // Forget the operations that are done with, from the front.
        while st.status.front().is_some_and(|s| *s != OpStatus::Open) {
            st.status.pop_front();
            st.results.pop_front();
            st.base += 1;
        }
    }
}

impl Drop for Pipeline<'_> {
    fn drop(&mut self) {
        // Whatever completes after this is late.
        self.shared.state.lock().closed = true;
    }
}

/// Submits `ops` as one batch and waits until each has completed or
/// `deadline` has passed. Results are in the order of `ops`.
pub fn run(engine: &dyn IoEngine, ops: Vec<IoOp>, deadline: Instant) -> Vec<IoDone> {
    let mut batch = Batch::new(engine, ops.len());
    for op in ops {
        batch.push(op);
    }
    batch.wait(deadline)
}

fn check_len(done: usize, want: usize) -> Result<(), IoFailure> {
    if done == want {
        Ok(())
    } else {
        Err(IoFailure::Short { done, want })
    }
}

// ---------------------------------------------------------------------------
// pread/pwrite

struct PreadShared {
    queue: Mutex<VecDeque<Job>>,
    ready: Condvar,
    shutdown: AtomicBool,
    /// Interruptible sleeps (injected read delays) wait here.
    sleep_lock: Mutex<()>,
    sleep_wake: Condvar,
    faults: Arc<FaultCell>,
}

/// pread/pwrite on a pool of worker threads (the caller never blocks in a
/// syscall, so deadlines hold even when a drive hangs).
pub struct PreadEngine {
    shared: Arc<PreadShared>,
    threads: Vec<JoinHandle<()>>,
}

impl PreadEngine {
    pub fn start(threads: usize, faults: Arc<FaultCell>) -> std::io::Result<Self> {
        let shared = Arc::new(PreadShared {
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            shutdown: AtomicBool::new(false),
            sleep_lock: Mutex::new(()),
            sleep_wake: Condvar::new(),
            faults,
        });
        let mut engine = PreadEngine {
            shared,
            threads: Vec::new(),
        };
        for i in 0..threads.max(1) {
            let shared = Arc::clone(&engine.shared);
            let t = std::thread::Builder::new()
                .name(format!("kvstrata-pread-{i}"))
                .spawn(move || pread_worker(&shared))?;
            engine.threads.push(t);
        }
        Ok(engine)
    }
}

impl IoEngine for PreadEngine {
    fn name(&self) -> &'static str {
        "pread"
    }

    fn submit(&self, jobs: Vec<Job>) {
        if self.shared.shutdown.load(Ordering::Acquire) {
            for j in jobs {
                j.finish(Err(IoFailure::Shutdown));
            }
            return;
        }
        let n = jobs.len();
        self.shared.queue.lock().extend(jobs);
        if n == 1 {
            self.shared.ready.notify_one();
        } else {
            self.shared.ready.notify_all();
        }
    }
}

impl Drop for PreadEngine {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        {
            let _g = self.shared.queue.lock();
            self.shared.ready.notify_all();
        }
        {
            let _g = self.shared.sleep_lock.lock();
            self.shared.sleep_wake.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let left: Vec<Job> = self.shared.queue.lock().drain(..).collect();
        for j in left {
            j.finish(Err(IoFailure::Shutdown));
        }
    }
}

fn pread_worker(shared: &PreadShared) {
    loop {
        let job = {
            let mut q = shared.queue.lock();
            loop {
                if let Some(j) = q.pop_front() {
                    break Some(j);
                }
                if shared.shutdown.load(Ordering::Acquire) {
                    break None;
                }
                shared.ready.wait(&mut q);
            }
        };
        match job {
            Some(j) => pread_one(shared, j),
            None => return,
        }
    }
}

fn pread_one(shared: &PreadShared, mut job: Job) {
    let faults = shared.faults.get();
    let want = job.buf.len();
    let mut ask = want;
    let delay = match job.kind {
        OpKind::Read => faults.delay_reads,
        OpKind::Write => faults.delay_writes,
    };
    if let Some(d) = delay {
        let until = Instant::now() + d;
        let mut g = shared.sleep_lock.lock();
        while !shared.shutdown.load(Ordering::Acquire) && Instant::now() < until {
            shared.sleep_wake.wait_until(&mut g, until);
        }
    }
    if job.kind == OpKind::Read {
        if let Some(e) = faults.fail_reads_with {
            return job.finish(Err(IoFailure::Errno(e)));
        }
        if faults.short_reads && want > ALIGN {
            ask = want - ALIGN;
        }
    } else if let Some(e) = faults.fail_writes_with {
        return job.finish(Err(IoFailure::Errno(e)));
    }
    let mut done = 0usize;
    let result = loop {
        if done >= ask {
            break check_len(done, want);
        }
        let off = job.offset + done as u64;
        let Ok(off) = libc::off_t::try_from(off) else {
            break Err(IoFailure::Errno(libc::EINVAL));
        };
        // SAFETY: the buffer is owned by this job for the duration of the
        // call and `done < ask <= len`.
        let rc = unsafe {
            match job.kind {
                OpKind::Read => libc::pread(
                    job.fd,
                    job.buf.as_mut_ptr().add(done).cast(),
                    ask - done,
                    off,
                ),
                OpKind::Write => {
                    libc::pwrite(job.fd, job.buf.as_ptr().add(done).cast(), ask - done, off)
                }
            }
        };
        if rc < 0 {
            let err = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if err == libc::EINTR {
                continue;
            }
            break Err(IoFailure::Errno(err));
        }
        if rc == 0 {
            break check_len(done, want);
        }
        done += rc as usize;
    };
    job.finish(result);
}

// ---------------------------------------------------------------------------
// io_uring

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
    thread: Option<JoinHandle<()>>,
    fixed: bool,
}

/// The pool region registered as fixed buffer 0. Holds the pool, so the
/// region outlives the ring.
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
            thread: Some(thread),
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
        if self.shared.shutdown.load(Ordering::Acquire)
            || self.shared.broken.load(Ordering::Acquire)
        {
            for j in jobs {
                j.finish(Err(IoFailure::Shutdown));
            }
            return;
        }
        self.shared.queue.lock().extend(jobs);
        self.shared.wake();
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        self.shared.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let left: Vec<Job> = self.shared.queue.lock().drain(..).collect();
        for j in left {
            j.finish(Err(IoFailure::Shutdown));
        }
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

fn ring_main(mut ring: IoUring, shared: &UringShared, fixed: Option<&FixedRegion>) -> RingExit {
    let capacity = ring.params().sq_entries() as usize;
    // Keep room for the eventfd read and a cancel request.
    let max_ops = capacity.saturating_sub(2).max(1);
    let mut inflight: Slab<InFlight> = Slab::new();
    let mut ops_in_ring = 0usize;
    let mut pending: VecDeque<Job> = VecDeque::new();
    let mut efd_buf = Box::new([0u8; 8]);
    let mut efd_armed = false;
    let mut cancel_sent = false;
    loop {
        let shutting = shared.shutdown.load(Ordering::Acquire);
        if shutting {
            pending.extend(shared.queue.lock().drain(..));
            for j in pending.drain(..) {
                j.finish(Err(IoFailure::Shutdown));
            }
            if inflight.is_empty() && !efd_armed {
                drop(ring);
                return RingExit::Closed;
            }
            if !cancel_sent {
                let e = opcode::AsyncCancel2::new(types::CancelBuilder::any())
                    .build()
                    .user_data(CANCEL_TAG);
                // SAFETY: the cancel entry references no memory.
                if unsafe { ring.submission().push(&e) }.is_ok() {
                    cancel_sent = true;
                }
            }
        } else if !efd_armed {
            let e = opcode::Read::new(types::Fd(shared.efd.as_raw_fd()), efd_buf.as_mut_ptr(), 8)
                .build()
                .user_data(EFD_TAG);
            // SAFETY: `efd_buf` lives (boxed, not moved) until the thread
            // exits, which happens only after this read completed.
            if unsafe { ring.submission().push(&e) }.is_ok() {
                efd_armed = true;
            }
        }
        // Move queued jobs into the ring.
        while let Some(job) = pending.pop_front() {
            let faults = shared.faults.get();
            let delay = match job.kind {
                OpKind::Read => faults.delay_reads,
                OpKind::Write => faults.delay_writes,
            };
            let need = if delay.is_some() { 2 } else { 1 };
            let room = {
                let sq = ring.submission();
                sq.capacity() - sq.len()
            };
            if ops_in_ring + need > max_ops || room < need {
                pending.push_front(job);
                break;
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
            let entry = inflight.vacant_entry();
            let id = entry.key() as u64;
            let fd = types::Fd(job.fd);
            let mut job = job;
            let Ok(len) = u32::try_from(ask) else {
                job.finish(Err(IoFailure::Errno(libc::EINVAL)));
                continue;
            };
            let registered = fixed.is_some_and(|f| f.covers(job.buf.as_ptr(), ask));
            let op = match (job.kind, registered) {
                (OpKind::Read, false) => opcode::Read::new(fd, job.buf.as_mut_ptr(), len)
                    .offset(job.offset)
                    .build(),
                (OpKind::Write, false) => opcode::Write::new(fd, job.buf.as_ptr(), len)
                    .offset(job.offset)
                    .build(),
                // Inside the region registered as buffer 0.
                (OpKind::Read, true) => opcode::ReadFixed::new(fd, job.buf.as_mut_ptr(), len, 0)
                    .offset(job.offset)
                    .build(),
                (OpKind::Write, true) => opcode::WriteFixed::new(fd, job.buf.as_ptr(), len, 0)
                    .offset(job.offset)
                    .build(),
            }
            .user_data(id);
            let mut sq = ring.submission();
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
            ops_in_ring += need;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) => {}
            Err(e) => {
                tracing::error!(error = %e, "io_uring submit failed; the disk engine stops");
                shared.broken.store(true, Ordering::Release);
                pending.extend(shared.queue.lock().drain(..));
                for j in pending.drain(..) {
                    j.finish(Err(IoFailure::Shutdown));
                }
                // The kernel may still own these buffers: leak them rather
                // than free memory it could write.
                for f in inflight.drain() {
                    let InFlight { mut job, .. } = f;
                    let placeholder = AlignedBuf::zeroed(ALIGN);
                    if let Some(p) = placeholder {
                        std::mem::forget(std::mem::replace(&mut job.buf, p));
                    }
                    job.finish(Err(IoFailure::Shutdown));
                }
                std::mem::forget(efd_buf);
                std::mem::forget(ring);
                return RingExit::Leaked;
            }
        }
        let cqes: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (ud, res) in cqes {
            if ud == EFD_TAG {
                efd_armed = false;
                pending.extend(shared.queue.lock().drain(..));
                continue;
            }
            if ud == CANCEL_TAG {
                continue;
            }
            let timer = ud & TIMER_BIT != 0;
            let id = (ud & !TIMER_BIT) as usize;
            let Some(f) = inflight.get_mut(id) else {
                continue;
            };
            ops_in_ring = ops_in_ring.saturating_sub(1);
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
                let f = inflight.remove(id);
                let result = f.result.unwrap_or(Err(IoFailure::Errno(libc::ECANCELED)));
                f.job.finish(result);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn tmpfile(len: usize) -> (tempfile::TempDir, std::fs::File) {
        let dir = tempfile::Builder::new()
            .prefix("kvs-engine")
            .tempdir()
            .unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; len]).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (dir, f)
    }

    fn engines(faults: &Arc<FaultCell>) -> Vec<Box<dyn IoEngine>> {
        let mut v: Vec<Box<dyn IoEngine>> =
            vec![Box::new(PreadEngine::start(2, Arc::clone(faults)).unwrap())];
        match UringEngine::start(32, Arc::clone(faults)) {
            Ok(u) => v.push(Box::new(u)),
            Err(e) => eprintln!("io_uring unavailable here: {e}"),
        }
        v
    }

    /// Writes of 8 KiB at offsets 0, 8 KiB, ... filled with 1, 2, ... 8.
    fn eight_writes(fd: RawFd) -> Vec<IoOp> {
        (0..8u8)
            .map(|i| {
                let mut buf = AlignedBuf::zeroed(8192).unwrap();
                buf.as_mut_slice().fill(i + 1);
                IoOp {
                    kind: OpKind::Write,
                    fd,
                    offset: i as u64 * 8192,
                    buf,
                    on_late: None,
                }
            })
            .collect()
    }

    #[test]
    fn batch_write_then_read() {
        let faults = FaultCell::new(FaultPlan::default());
        for engine in engines(&faults) {
            let (_d, f) = tmpfile(64 * 1024);
            let ops = eight_writes(f.as_raw_fd());
            let done = run(&*engine, ops, Instant::now() + Duration::from_secs(5));
            assert!(
                done.iter().all(|d| d.result.is_ok()),
                "{}: {done:?}",
                engine.name()
            );
            let ops: Vec<_> = (0..8u8)
                .map(|i| IoOp {
                    kind: OpKind::Read,
                    fd: f.as_raw_fd(),
                    offset: i as u64 * 8192,
                    buf: AlignedBuf::zeroed(8192).unwrap(),
                    on_late: None,
                })
                .collect();
            let done = run(&*engine, ops, Instant::now() + Duration::from_secs(5));
            for (i, d) in done.iter().enumerate() {
                assert!(d.result.is_ok());
                assert!(
                    d.buf
                        .as_ref()
                        .unwrap()
                        .as_slice()
                        .iter()
                        .all(|&b| b == i as u8 + 1)
                );
            }
        }
    }

    /// Transfers from the registered region (READ_FIXED / WRITE_FIXED)
    /// and from the heap, mixed in one batch, with a fault on the fixed path.
    #[test]
    fn fixed_buffers_round_trip() {
        let faults = FaultCell::new(FaultPlan::default());
        let pool = BufPool::with_arena(1 << 20, 6 * 8192);
        let engine =
            match UringEngine::start_with_pool(32, Arc::clone(&faults), Some(Arc::clone(&pool))) {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("io_uring unavailable here: {e}");
                    return;
                }
            };
        if !engine.fixed_buffers() {
            eprintln!("fixed buffers not registered here; plain transfers tested");
        }
        let (_d, f) = tmpfile(64 * 1024);
        let (base, len) = pool.region().unwrap();
        let in_region = |b: &AlignedBuf| {
            let p = b.as_ptr() as usize;
            p >= base as usize && p + b.len() <= base as usize + len
        };
        // Six buffers fill the region; the last two come from the heap.
        let bufs: Vec<AlignedBuf> = (0..8).map(|_| pool.get(8192).unwrap()).collect();
        assert_eq!(bufs.iter().filter(|b| in_region(b)).count(), 6);
        let ops: Vec<_> = bufs
            .into_iter()
            .enumerate()
            .map(|(i, mut buf)| {
                buf.as_mut_slice().fill(i as u8 + 1);
                IoOp {
                    kind: OpKind::Write,
                    fd: f.as_raw_fd(),
                    offset: i as u64 * 8192,
                    buf,
                    on_late: None,
                }
            })
            .collect();
        let done = run(&engine, ops, Instant::now() + Duration::from_secs(5));
        assert!(done.iter().all(|d| d.result.is_ok()), "{done:?}");
        drop(done);
        let reads = |n: u64| -> Vec<IoOp> {
            (0..n)
                .map(|i| IoOp {
                    kind: OpKind::Read,
                    fd: f.as_raw_fd(),
                    offset: (7 - i) * 8192,
                    buf: pool.get(8192).unwrap(),
                    on_late: None,
                })
                .collect()
        };
        let done = run(&engine, reads(8), Instant::now() + Duration::from_secs(5));
        for (i, d) in done.iter().enumerate() {
            assert!(d.result.is_ok(), "{i}: {d:?}");
            let want = 8 - i as u8;
            assert!(
                d.buf
                    .as_ref()
                    .unwrap()
                    .as_slice()
                    .iter()
                    .all(|&b| b == want)
            );
        }
        drop(done);
        // Faults apply to fixed transfers as to plain ones.
        faults.set(FaultPlan {
            short_reads: true,
            ..FaultPlan::default()
        });
        let done = run(&engine, reads(1), Instant::now() + Duration::from_secs(5));
        assert_eq!(
            done[0].result,
            Err(IoFailure::Short {
                done: 4096,
                want: 8192
            })
        );
        faults.set(FaultPlan {
            fail_writes_with: Some(libc::ENOSPC),
            ..FaultPlan::default()
        });
        let op = IoOp {
            kind: OpKind::Write,
            fd: f.as_raw_fd(),
            offset: 0,
            buf: pool.get(8192).unwrap(),
            on_late: None,
        };
        let done = run(&engine, vec![op], Instant::now() + Duration::from_secs(5));
        assert_eq!(done[0].result, Err(IoFailure::Errno(libc::ENOSPC)));
        drop(done);
        faults.set(FaultPlan::default());
        // The engine holds the pool: dropping ours first is fine.
        drop(pool);
        drop(engine);
    }

    #[test]
    fn batch_starts_each_op_as_it_is_added() {
        let faults = FaultCell::new(FaultPlan::default());
        for engine in engines(&faults) {
            let (_d, f) = tmpfile(64 * 1024);
            let mut batch = Batch::new(&*engine, 8);
            for i in 0..8u8 {
                let mut buf = AlignedBuf::zeroed(8192).unwrap();
                buf.as_mut_slice().fill(i + 1);
                batch.submit(IoOp {
                    kind: OpKind::Write,
                    fd: f.as_raw_fd(),
                    offset: i as u64 * 8192,
                    buf,
                    on_late: None,
                });
            }
            assert_eq!(batch.len(), 8);
            let done = batch.wait(Instant::now() + Duration::from_secs(5));
            assert!(
                done.iter().all(|d| d.result.is_ok() && d.buf.is_some()),
                "{}: {done:?}",
                engine.name()
            );
            // Staged reads start with `wait`, results in the order added.
            let mut batch = Batch::new(&*engine, 8);
            for i in (0..8u8).rev() {
                batch.push(IoOp {
                    kind: OpKind::Read,
                    fd: f.as_raw_fd(),
                    offset: i as u64 * 8192,
                    buf: AlignedBuf::zeroed(8192).unwrap(),
                    on_late: None,
                });
            }
            let done = batch.wait(Instant::now() + Duration::from_secs(5));
            for (k, d) in done.iter().enumerate() {
                let want = 8 - k as u8;
                let buf = d.buf.as_ref().unwrap();
                assert!(
                    buf.as_slice().iter().all(|&b| b == want),
                    "{}",
                    engine.name()
                );
            }
            assert!(Batch::new(&*engine, 0).wait(Instant::now()).is_empty());
        }
    }

    #[test]
    fn wait_each_hands_out_every_op_once() {
        let faults = FaultCell::new(FaultPlan::default());
        for engine in engines(&faults) {
            let (_d, f) = tmpfile(64 * 1024);
            let read = |i: u64, late: Option<Box<dyn FnOnce() + Send>>| IoOp {
                kind: OpKind::Read,
                fd: f.as_raw_fd(),
                offset: i * 8192,
                buf: AlignedBuf::zeroed(8192).unwrap(),
                on_late: late,
            };
            let mut batch = Batch::new(&*engine, 8);
            for i in 0..8 {
                batch.submit(read(i, None));
            }
            let mut seen = [0u8; 8];
            batch.wait_each(Instant::now() + Duration::from_secs(5), |i, d| {
                assert!(d.result.is_ok() && d.buf.is_some(), "{}", engine.name());
                seen[i] += 1;
            });
            assert_eq!(seen, [1; 8], "{}", engine.name());

            // At the deadline the ops in flight are handed out as timeouts;
            // their buffers are released later, by the engine.
            faults.set(FaultPlan {
                delay_reads: Some(Duration::from_millis(300)),
                ..FaultPlan::default()
            });
            let (tx, rx) = mpsc::channel();
            let mut batch = Batch::new(&*engine, 2);
            for i in 0..2 {
                let tx = tx.clone();
                batch.push(read(
                    i,
                    Some(Box::new(move || {
                        let _ = tx.send(i);
                    })),
                ));
            }
            let t0 = Instant::now();
            let mut timeouts = 0;
            batch.wait_each(Instant::now() + Duration::from_millis(50), |_, d| {
                assert_eq!(d.result, Err(IoFailure::Timeout));
                assert!(d.buf.is_none());
                timeouts += 1;
            });
            assert_eq!(timeouts, 2, "{}", engine.name());
            assert!(t0.elapsed() < Duration::from_millis(250));
            for _ in 0..2 {
                rx.recv_timeout(Duration::from_secs(5)).unwrap();
            }
            faults.set(FaultPlan::default());
        }
    }

    /// A pipeline keeps a window of `depth` ops in flight, refilled as
    /// each completes; every op is handed out once, its state is dropped
    /// once handed out, and an overdue op is abandoned alone.
    #[test]
    fn pipeline_refills_its_window_and_abandons_each_op_alone() {
        let faults = FaultCell::new(FaultPlan::default());
        for engine in engines(&faults) {
            let (_d, f) = tmpfile(64 * 1024);
            let ops = eight_writes(f.as_raw_fd());
            assert!(
                run(&*engine, ops, Instant::now() + Duration::from_secs(5))
                    .iter()
                    .all(|d| d.result.is_ok())
            );
            let read = |i: u64, late: Option<Box<dyn FnOnce() + Send>>| IoOp {
                kind: OpKind::Read,
                fd: f.as_raw_fd(),
                offset: (i % 8) * 8192,
                buf: AlignedBuf::zeroed(8192).unwrap(),
                on_late: late,
            };
            let depth = 3;
            let total = 40u64;
            let mut pipe = Pipeline::new(&*engine, depth);
            let mut what = std::collections::HashMap::new();
            let mut next = 0u64;
            let mut seen = vec![0u8; total as usize];
            let mut out = Vec::new();
            while next < total || pipe.open() > 0 {
                while pipe.open() < depth && next < total {
                    let i = pipe.push(read(next, None), Instant::now() + Duration::from_secs(5));
                    assert_eq!(i as u64, next, "indices count up from 0");
                    what.insert(i, next);
                    next += 1;
                }
                assert!(pipe.open() <= depth);
                out.clear();
                pipe.wait_some(&mut out);
                assert!(!out.is_empty(), "{}", engine.name());
                for (i, d) in out.drain(..) {
                    let block = what[&i];
                    seen[block as usize] += 1;
                    assert!(d.result.is_ok(), "{}: {d:?}", engine.name());
                    let want = (block % 8) as u8 + 1;
                    assert!(d.buf.unwrap().as_slice().iter().all(|&b| b == want));
                }
                // Only the window's state is kept.
                assert!(pipe.shared.state.lock().results.len() <= depth);
            }
            assert_eq!(seen, vec![1u8; total as usize], "{}", engine.name());
            pipe.wait_some(&mut out);
            assert!(out.is_empty());

            // One op overdue, one not: the overdue one is handed out as a
            // timeout on its own deadline, the other completes normally.
            faults.set(FaultPlan {
                delay_reads: Some(Duration::from_millis(400)),
                ..FaultPlan::default()
            });
            let (tx, rx) = mpsc::channel();
            let t0 = Instant::now();
            let late = pipe.push(
                read(
                    0,
                    Some(Box::new(move || {
                        let _ = tx.send(());
                    })),
                ),
                Instant::now() + Duration::from_millis(50),
            );
            let patient = pipe.push(read(1, None), Instant::now() + Duration::from_secs(5));
            pipe.wait_some(&mut out);
            assert_eq!(out.len(), 1, "{}", engine.name());
            assert_eq!(out[0].0, late);
            assert_eq!(out[0].1.result, Err(IoFailure::Timeout));
            assert!(out[0].1.buf.is_none());
            assert!(t0.elapsed() < Duration::from_millis(350));
            assert_eq!(pipe.open(), 1);
            out.clear();
            pipe.wait_some(&mut out);
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].0, patient);
            assert!(out[0].1.result.is_ok(), "{}", engine.name());
            // The abandoned op's hook ran once the kernel was done with it.
            rx.recv_timeout(Duration::from_secs(5)).unwrap();
            faults.set(FaultPlan::default());
        }
    }

    #[test]
    fn dropped_batch_abandons_what_is_in_flight() {
        let faults = FaultCell::new(FaultPlan::default());
        for engine in engines(&faults) {
            let (_d, f) = tmpfile(64 * 1024);
            let (tx, rx) = mpsc::channel::<&'static str>();
            let read = |tag: &'static str| {
                let tx = tx.clone();
                IoOp {
                    kind: OpKind::Read,
                    fd: f.as_raw_fd(),
                    offset: 0,
                    buf: AlignedBuf::zeroed(8192).unwrap(),
                    on_late: Some(Box::new(move || {
                        let _ = tx.send(tag);
                    })),
                }
            };
            faults.set(FaultPlan {
                delay_reads: Some(Duration::from_millis(200)),
                ..FaultPlan::default()
            });
            let mut batch = Batch::new(&*engine, 2);
            batch.submit(read("started"));
            batch.push(read("staged"));
            drop(batch);
            // The staged op never started: released at once. The started
            // one only once the engine is done with its buffer.
            assert_eq!(
                rx.recv_timeout(Duration::from_secs(1)).unwrap(),
                "staged",
                "{}",
                engine.name()
            );
            assert_eq!(
                rx.recv_timeout(Duration::from_secs(5)).unwrap(),
                "started",
                "{}",
                engine.name()
            );
            faults.set(FaultPlan::default());
        }
    }

    #[test]
    fn faults_and_deadlines() {
        let faults = FaultCell::new(FaultPlan::default());
        for engine in engines(&faults) {
            let (_d, f) = tmpfile(64 * 1024);
            let read = |late: Option<Box<dyn FnOnce() + Send>>| IoOp {
                kind: OpKind::Read,
                fd: f.as_raw_fd(),
                offset: 0,
                buf: AlignedBuf::zeroed(8192).unwrap(),
                on_late: late,
            };
            faults.set(FaultPlan {
                fail_reads_with: Some(libc::EIO),
                ..FaultPlan::default()
            });
            let d = run(
                &*engine,
                vec![read(None)],
                Instant::now() + Duration::from_secs(5),
            );
            assert_eq!(
                d[0].result,
                Err(IoFailure::Errno(libc::EIO)),
                "{}",
                engine.name()
            );
            faults.set(FaultPlan {
                short_reads: true,
                ..FaultPlan::default()
            });
            let d = run(
                &*engine,
                vec![read(None)],
                Instant::now() + Duration::from_secs(5),
            );
            assert_eq!(
                d[0].result,
                Err(IoFailure::Short {
                    done: 4096,
                    want: 8192
                }),
                "{}",
                engine.name()
            );
            faults.set(FaultPlan {
                delay_reads: Some(Duration::from_millis(300)),
                ..FaultPlan::default()
            });
            let (tx, rx) = mpsc::channel();
            let t0 = Instant::now();
            let d = run(
                &*engine,
                vec![read(Some(Box::new(move || {
                    let _ = tx.send(());
                })))],
                Instant::now() + Duration::from_millis(50),
            );
            assert_eq!(d[0].result, Err(IoFailure::Timeout), "{}", engine.name());
            assert!(t0.elapsed() < Duration::from_millis(250));
            // The late hook runs once the kernel is done with the buffer.
            rx.recv_timeout(Duration::from_secs(5)).unwrap();
            faults.set(FaultPlan::default());
        }
    }
}
