//! The single-core memcpy ceiling, measured in the same run as the benchmark.
//!
//! Copies block-size buffers from one preallocated working set to another, one
//! block after the other, on one thread, for about `--memcpy-duration`. Each
//! working set is at least twice the last-level cache (and at least 256 MiB), so
//! the copies stream from and to DRAM as the daemon's copies of a large working
//! set do. Both sets are written before the clock starts, so page faults are not
//! counted. GB/s counts the bytes copied (read once, written once), decimal.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Smallest working set per side.
const MIN_WORKING_SET_BYTES: usize = 256 << 20;
/// Used when the last-level cache size cannot be read.
const FALLBACK_LLC_BYTES: usize = 64 << 20;

/// Result of [`measure`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MemcpyReport {
    /// Bytes copied per second, decimal GB.
    pub gb_per_s: f64,
    /// Bytes per copy (the benchmark's block size).
    pub block_size: u64,
    /// Bytes of each of the two working sets.
    pub working_set_bytes: u64,
    /// Last-level cache size the working sets were sized from (0: unknown).
    pub llc_bytes: u64,
    pub seconds: f64,
}

/// Size of the largest CPU cache of cpu0 (sysfs), if it can be read.
pub fn last_level_cache_bytes() -> Option<usize> {
    let dir = Path::new("/sys/devices/system/cpu/cpu0/cache");
    let mut best = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let size = std::fs::read_to_string(entry.path().join("size")).ok();
        if let Some(bytes) = size.as_deref().and_then(parse_cache_size) {
            best = best.max(Some(bytes));
        }
    }
    best
}

/// `307200K`, `32M`, `1024` (sysfs cache sizes).
fn parse_cache_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let (num, mult) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1 << 10),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>().ok()?.checked_mul(mult)
}

/// Measures the single-core memcpy rate of `block_size` copies for about
/// `duration` (blocking: call it from a blocking thread).
pub fn measure(block_size: usize, duration: Duration) -> MemcpyReport {
    let llc = last_level_cache_bytes();
    let want = llc
        .unwrap_or(FALLBACK_LLC_BYTES)
        .saturating_mul(2)
        .max(MIN_WORKING_SET_BYTES);
    let mut r = measure_with(block_size, duration, want);
    r.llc_bytes = llc.unwrap_or(0) as u64;
    r
}

/// [`measure`] with working sets of at least `set_bytes` each.
fn measure_with(block_size: usize, duration: Duration, set_bytes: usize) -> MemcpyReport {
    let block = block_size.max(1);
    let blocks = set_bytes.div_ceil(block).max(2);
    let set = blocks * block;
    // Non-zero contents, written (so faulted in) before the clock starts.
    let src = vec![0x5au8; set];
    let mut dst = vec![0xa5u8; set];

    let start = Instant::now();
    let mut copied: u64 = 0;
    let mut k = 0;
    loop {
        let range = k * block..(k + 1) * block;
        dst[range.clone()].copy_from_slice(&src[range]);
        std::hint::black_box(&mut dst);
        copied += block as u64;
        k += 1;
        if k == blocks {
            k = 0;
        }
        if start.elapsed() >= duration {
            break;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    MemcpyReport {
        gb_per_s: crate::report::gb_per_s(copied, seconds),
        block_size: block as u64,
        working_set_bytes: set as u64,
        llc_bytes: 0,
        seconds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_sizes_parse() {
        assert_eq!(parse_cache_size("307200K\n"), Some(307_200 << 10));
        assert_eq!(parse_cache_size("32M"), Some(32 << 20));
        assert_eq!(parse_cache_size("4096"), Some(4096));
        assert_eq!(parse_cache_size("K"), None);
        assert_eq!(parse_cache_size(""), None);
    }

    #[test]
    fn a_short_measurement_reports_a_rate() {
        let r = measure_with(256 << 10, Duration::from_millis(50), 3 << 20);
        assert!(r.gb_per_s > 0.0, "{r:?}");
        assert_eq!(r.working_set_bytes, 3 << 20);
        assert_eq!(r.block_size, 256 << 10);
        assert!(r.seconds >= 0.05);
        // Never fewer than two blocks.
        assert_eq!(
            measure_with(1000, Duration::ZERO, 1).working_set_bytes,
            2000
        );
    }
}
