//! Faults injected into the engines' real I/O path: errnos, delays, short
//! reads and skipped index writes, switchable while the tier runs. Both
//! engines consult the plan for every transfer; the default plan injects
//! nothing. Tests set it through the `testing` feature
//! ([`FaultPlan`] and `DiskTier::set_fault_plan` are public only there).

use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;

/// Faults injected into the real I/O path (tests, `testing` feature). The
/// default injects nothing. Change it at run time with
/// [`DiskTier::set_fault_plan`](crate::disk::DiskTier::set_fault_plan).
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

    #[cfg(any(test, feature = "testing"))]
    pub fn set(&self, plan: FaultPlan) {
        *self.0.write() = plan;
    }
}
