//! [`Batch`]: transfers started together (or each as its buffer is ready)
//! and waited for together until one deadline, either all at once
//! ([`Batch::wait`], [`run`]) or each as it completes ([`Batch::wait_each`]).
//! The disk tier's `put_many` / `read_many` calls are one batch each.

use std::sync::Arc;
use std::time::Instant;

use super::completion::{BatchShared, Job, make_job};
use super::{IoDone, IoEngine, IoFailure, IoOp};

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

/// Submits `ops` as one batch and waits until each has completed or
/// `deadline` has passed. Results are in the order of `ops`.
pub fn run(engine: &dyn IoEngine, ops: Vec<IoOp>, deadline: Instant) -> Vec<IoDone> {
    let mut batch = Batch::new(engine, ops.len());
    for op in ops {
        batch.push(op);
    }
    batch.wait(deadline)
}
