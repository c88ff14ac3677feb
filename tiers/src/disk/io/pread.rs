//! The pread/pwrite engine: a pool of worker threads, each taking one
//! transfer at a time from a shared queue and running it with blocking
//! `pread`/`pwrite` calls (the caller never blocks in a syscall, so its
//! deadlines hold even when a drive hangs). The fallback where io_uring is
//! not allowed, and the engine `EngineChoice::Pread` forces. Also the
//! transfers an engine runs on its caller's thread once it is shut down
//! ([`run_inline`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use super::{FaultCell, FaultPlan, IoEngine, IoFailure, Job, OpKind, check_len};
use crate::disk::file::ALIGN;

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
    /// Taken (and joined) by the first [`IoEngine::shutdown`].
    threads: Mutex<Vec<JoinHandle<()>>>,
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
        let engine = PreadEngine {
            shared,
            threads: Mutex::new(Vec::new()),
        };
        for i in 0..threads.max(1) {
            let shared = Arc::clone(&engine.shared);
            let t = std::thread::Builder::new()
                .name(format!("kvstrata-pread-{i}"))
                .spawn(move || pread_worker(&shared))?;
            engine.threads.lock().push(t);
        }
        Ok(engine)
    }
}

impl IoEngine for PreadEngine {
    fn name(&self) -> &'static str {
        "pread"
    }

    fn shutdown(&self) {
        self.stop();
    }

    fn submit(&self, jobs: Vec<Job>) {
        if self.shared.shutdown.load(Ordering::Acquire) {
            run_inline(jobs, &self.shared.faults);
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

impl PreadEngine {
    /// Stops the workers (see [`IoEngine::shutdown`]); jobs queued then are
    /// run inline.
    fn stop(&self) {
        self.shared.shutdown.store(true, Ordering::Release);
        {
            let _g = self.shared.queue.lock();
            self.shared.ready.notify_all();
        }
        {
            let _g = self.shared.sleep_lock.lock();
            self.shared.sleep_wake.notify_all();
        }
        let threads = std::mem::take(&mut *self.threads.lock());
        for t in threads {
            let _ = t.join();
        }
        // Queued after the workers last looked: run here.
        let left: Vec<Job> = self.shared.queue.lock().drain(..).collect();
        run_inline(left, &self.shared.faults);
    }
}

impl Drop for PreadEngine {
    fn drop(&mut self) {
        self.stop();
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
    let result = transfer(&mut job, &faults);
    job.finish(result);
}

/// Runs jobs one after the other on the caller's thread, with blocking
/// `pread`/`pwrite` calls (no deadline holds; injected delays are skipped):
/// what an engine does with the jobs it gets after
/// [`IoEngine::shutdown`](super::IoEngine::shutdown).
pub(super) fn run_inline(jobs: Vec<Job>, faults: &FaultCell) {
    if jobs.is_empty() {
        return;
    }
    let plan = faults.get();
    for mut job in jobs {
        let result = transfer(&mut job, &plan);
        job.finish(result);
    }
}

/// One job's transfer with blocking `pread`/`pwrite` calls, after the
/// plan's injected errors and short reads.
fn transfer(job: &mut Job, faults: &FaultPlan) -> Result<(), IoFailure> {
    let want = job.buf.len();
    let mut ask = want;
    if job.kind == OpKind::Read {
        if let Some(e) = faults.fail_reads_with {
            return Err(IoFailure::Errno(e));
        }
        if faults.short_reads && want > ALIGN {
            ask = want - ALIGN;
        }
    } else if let Some(e) = faults.fail_writes_with {
        return Err(IoFailure::Errno(e));
    }
    let mut done = 0usize;
    loop {
        if done >= ask {
            return check_len(done, want);
        }
        let off = job.offset + done as u64;
        let Ok(off) = libc::off_t::try_from(off) else {
            return Err(IoFailure::Errno(libc::EINVAL));
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
            return Err(IoFailure::Errno(err));
        }
        if rc == 0 {
            return check_len(done, want);
        }
        done += rc as usize;
    }
}
