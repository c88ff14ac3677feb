//! The allocator setting that lets a process on the inline data path reuse
//! freed HTTP/2 frame buffers instead of faulting in fresh pages for every
//! message (the daemon and clients that receive blocks both want it).
//!
//! hyper/h2 read each HTTP/2 `DATA` frame into a buffer of its own size —
//! a megabyte or more for a block — and keep it only until the payload has
//! been used. glibc's malloc serves allocations of 128 KiB and up with
//! `mmap(2)` and gives freed memory at the top of a heap back to the
//! kernel, so every such buffer comes back as fresh pages that fault in one
//! by one while the socket is read into them: a page fault per 4 KiB of
//! every payload, about a fifth of the CPU time on 1 MiB blocks (see
//! docs/benchmarks.md, issue 22). Raising the mmap and trim thresholds lets
//! freed frame buffers be reused as they are. A process-wide setting, so no
//! library calls it by itself: the daemon does at start-up, a client process
//! calls [`keep_freed_frame_buffers`] once.

/// Largest allocation served from malloc's heaps rather than `mmap(2)`
/// (glibc's maximum on 64-bit targets).
pub const MMAP_THRESHOLD_BYTES: usize = 32 << 20;
/// Free memory a heap keeps at its top before giving it back to the kernel.
pub const TRIM_THRESHOLD_BYTES: usize = 128 << 20;

/// Sets glibc's mmap and trim thresholds ([`MMAP_THRESHOLD_BYTES`],
/// [`TRIM_THRESHOLD_BYTES`]) for the whole process, unless the environment
/// already tunes malloc (`GLIBC_TUNABLES` or `MALLOC_*_` variables), which
/// then wins. Idempotent; does nothing on other C libraries. Returns whether
/// the thresholds were set.
pub fn keep_freed_frame_buffers() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tuned = std::env::vars_os().any(|(k, _)| {
            let k = k.to_string_lossy();
            k == "GLIBC_TUNABLES" || (k.starts_with("MALLOC_") && k.ends_with('_'))
        });
        if tuned {
            return false;
        }
        // SAFETY: mallopt only changes malloc's parameters; it is safe to
        // call at any time, from any thread.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES as libc::c_int) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES as libc::c_int) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_accepted() {
        // glibc refuses an mmap threshold above its maximum: this fails if
        // the constant outgrows it (and so silently stops working).
        if std::env::var_os("GLIBC_TUNABLES").is_none() && cfg!(target_env = "gnu") {
            assert!(keep_freed_frame_buffers());
            assert!(keep_freed_frame_buffers(), "idempotent");
        }
    }
}
