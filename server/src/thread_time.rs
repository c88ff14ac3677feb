//! CPU time of the calling thread, for debug lines that set it beside wall
//! time: a request whose wall time far exceeds its thread's CPU time was
//! waiting (a lock, a descheduled thread, a sleeping vCPU), not working.

use std::time::Duration;

/// CPU time the calling thread has used (`CLOCK_THREAD_CPUTIME_ID`: user
/// and system, page faults included); zero where the clock cannot be read.
fn thread_cpu() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid, writable timespec for the call's duration.
    match unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } {
        0 => Duration::new(
            t.tv_sec.max(0) as u64,
            t.tv_nsec.clamp(0, 999_999_999) as u32,
        ),
        _ => Duration::ZERO,
    }
}

/// Microseconds of CPU time since `since` (a [`thread_cpu`] reading of
/// this thread).
fn cpu_us_since(since: Duration) -> u64 {
    thread_cpu().saturating_sub(since).as_micros() as u64
}

/// A reading of the thread's CPU clock taken only when a debug line will
/// show it: reading the clock is a system call, which a request whose
/// lines are off should not pay.
#[derive(Debug, Clone, Copy)]
pub struct CpuMark(Option<Duration>);

impl CpuMark {
    /// The clock now when `enabled` (usually `tracing::enabled!` of the
    /// line's level), else nothing.
    pub fn now_if(enabled: bool) -> Self {
        CpuMark(enabled.then(thread_cpu))
    }

    /// Microseconds of CPU time since the mark; 0 for a mark not taken.
    pub fn us(self) -> u64 {
        self.0.map_or(0, cpu_us_since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_this_threads_work_and_not_its_sleep() {
        let before = thread_cpu();
        let began = std::time::Instant::now();
        // Work until the thread clock has moved (a loaded machine may
        // deschedule the thread meanwhile: wall time is not bounded here).
        let mut x = 0u64;
        while thread_cpu().saturating_sub(before) < Duration::from_millis(2) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        assert!(cpu_us_since(before) >= 2000);
        let slept = thread_cpu();
        std::thread::sleep(Duration::from_millis(50));
        // Sleeping costs (almost) no CPU time: far less than the 50 ms slept.
        assert!(cpu_us_since(slept) < 25_000, "{} µs", cpu_us_since(slept));
        assert!(began.elapsed() >= Duration::from_millis(50));
        // A mark not taken reads nothing and counts nothing.
        assert_eq!(CpuMark::now_if(false).us(), 0);
        let mark = CpuMark::now_if(true);
        let mut y = 1u64;
        while mark.us() < 1000 {
            y = y.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(y);
    }
}
