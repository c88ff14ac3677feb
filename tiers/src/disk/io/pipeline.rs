//! [`Pipeline`]: a window of transfers kept in flight continuously, each
//! with its own deadline, refilled by the caller as transfers complete (the
//! disk tier's `put_stream` / `read_stream`).

use std::sync::Arc;
use std::time::Instant;

use super::completion::{BatchShared, Job, OpStatus, make_job};
use super::{IoDone, IoEngine, IoFailure, IoOp};

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
/// hook, as for a [`Batch`](super::Batch). Dropping the pipeline abandons everything still
/// in flight the same way, and drops staged operations unstarted.
///
/// Bookkeeping is per window, not per stream: the state of an operation
/// handed out or abandoned is dropped once every earlier one's is, so what
/// is kept spans from the oldest operation still open to the newest (wider
/// than the window only while an older operation is outstanding, at most
/// until its deadline), and a handed-out operation keeps no buffer there.
pub struct Pipeline<'e> {
    engine: &'e dyn IoEngine,
    // Visible to the engine tests, which check that only the window is kept.
    pub(super) shared: Arc<BatchShared>,
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
