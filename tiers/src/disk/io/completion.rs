//! Completion bookkeeping shared by [`Batch`](super::Batch) and
//! [`Pipeline`](super::Pipeline): each transfer handed to an engine is a
//! [`Job`] carrying a [`Ticket`], and the ticket records the transfer's
//! result in its batch's shared state exactly once, waking the waiter; a
//! transfer completing after its waiter gave up on it is *late*: its buffer
//! is freed and its `on_late` hook runs.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::{IoDone, IoFailure, IoOp, OpKind};
use crate::disk::file::AlignedBuf;

/// Completion state of one batch, shared by its tickets and its waiter.
pub(super) struct BatchShared {
    pub(super) state: Mutex<BatchState>,
    /// Signalled once, when the last operation of the batch completes (or
    /// at every completion, when the waiter asked for that).
    pub(super) all_done: Condvar,
}

impl BatchShared {
    pub(super) fn new(capacity: usize, each: bool) -> Arc<Self> {
        Arc::new(BatchShared {
            state: Mutex::new(BatchState::new(capacity, each)),
            all_done: Condvar::new(),
        })
    }
}

pub(super) fn make_job(shared: &Arc<BatchShared>, index: usize, op: IoOp) -> Job {
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

pub(super) struct BatchState {
    /// Results by index - `base` (a [`Batch`](super::Batch) never trims, so `base` is 0).
    pub(super) results: VecDeque<Option<IoDone>>,
    /// Index of `results[0]`: a [`Pipeline`](super::Pipeline) drops the entries of operations
    /// it has handed out or abandoned from the front, so a long stream keeps
    /// only its window here. Every index below `base` was handed out or
    /// abandoned.
    pub(super) base: usize,
    /// [`Pipeline`](super::Pipeline) only (empty for a [`Batch`](super::Batch)): the state of each
    /// operation in `results`.
    pub(super) status: VecDeque<OpStatus>,
    /// Operations neither completed nor abandoned.
    pub(super) left: usize,
    /// The waiter stopped waiting (deadline passed, or the batch was
    /// dropped): operations completing from now on are late.
    pub(super) closed: bool,
    /// Indices in completion order, not yet handed out ([`Batch::wait_each`](super::Batch::wait_each)).
    pub(super) ready: VecDeque<usize>,
    /// The waiter wants a wake-up per completion, not only after the last.
    pub(super) each: bool,
}

/// Where a [`Pipeline`](super::Pipeline)'s operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OpStatus {
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
    pub(super) fn add(&mut self, tracked: bool) -> usize {
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
    pub(super) fn finish(mut self, result: Result<(), IoFailure>) {
        let buf = self.buf;
        self.ticket.finish(Some(buf), result);
    }
}
