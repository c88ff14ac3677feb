//! What the block layer saw of each phase: the counters of the block
//! device holding the benchmark's directory (`/sys/dev/block/M:m/stat`),
//! sampled before and after a phase and turned into a [`DriveReport`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

/// What the block layer saw of one phase's direction (reads in the read
/// phase, writes in the write phase), from `/sys/dev/block/M:m/stat` of
/// the device holding the directory. Counts the whole device, so other
/// I/O on it during the run is included.
///
/// `in_flight` (device busy time summed over requests, per second of the
/// phase; Little's law) tells whether the tier kept the drive as full as
/// fio does (fio's equivalent: its IOPS times its mean completion
/// latency). The same queue depth at a lower rate means the drive served
/// the tier's requests more slowly (size, alignment), not that the tier
/// left it idle.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DriveReport {
    /// Block device (`MAJOR:MINOR`).
    pub device: String,
    /// Requests completed.
    pub requests: u64,
    /// Requests merged into others before they were issued.
    pub merged: u64,
    /// Mean request size, KiB.
    pub mean_kib: f64,
    /// Mean time per request in the block layer and the drive, ms.
    pub mean_ms: f64,
    /// Mean requests in flight over the phase.
    pub in_flight: f64,
}

/// One direction of a block device's `stat` counters.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct DriveCounters {
    requests: u64,
    merged: u64,
    sectors: u64,
    ticks_ms: u64,
}

/// The block device holding the benchmark's directory, when there is one:
/// samples its counters and reports a phase.
pub(super) struct DriveProbe {
    /// Device name (`MAJOR:MINOR`) and its `stat` file.
    stat: Option<(String, PathBuf)>,
}

impl DriveProbe {
    /// The probe of the device holding `dir` (none when `dir` is not on a
    /// block device).
    pub(super) fn new(dir: &Path) -> Self {
        DriveProbe {
            stat: drive_stat_path(dir),
        }
    }

    /// The device's write (`write` true) or read counters now.
    pub(super) fn sample(&self, write: bool) -> Option<DriveCounters> {
        self.stat
            .as_ref()
            .and_then(|(_, path)| drive_counters(path, write))
    }

    /// The report of a phase of `elapsed` that started at `before`.
    pub(super) fn phase(
        &self,
        before: Option<DriveCounters>,
        write: bool,
        elapsed: Duration,
    ) -> Option<DriveReport> {
        let (name, _) = self.stat.as_ref()?;
        Some(drive_report(name, before?, self.sample(write)?, elapsed))
    }
}

/// The `stat` file of the block device holding `dir`, if there is one.
fn drive_stat_path(dir: &Path) -> Option<(String, PathBuf)> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir).ok()?.dev();
    // Linux's dev_t encoding (glibc's gnu_dev_major / gnu_dev_minor).
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let name = format!("{major}:{minor}");
    let path = PathBuf::from(format!("/sys/dev/block/{name}/stat"));
    path.exists().then_some((name, path))
}

/// Reads (`write` false) or writes counters of a block device `stat` file.
fn drive_counters(path: &Path, write: bool) -> Option<DriveCounters> {
    let text = std::fs::read_to_string(path).ok()?;
    let f: Vec<u64> = text
        .split_whitespace()
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let at = if write { 4 } else { 0 };
    Some(DriveCounters {
        requests: *f.get(at)?,
        merged: *f.get(at + 1)?,
        sectors: *f.get(at + 2)?,
        ticks_ms: *f.get(at + 3)?,
    })
}

fn drive_report(
    device: &str,
    before: DriveCounters,
    after: DriveCounters,
    elapsed: Duration,
) -> DriveReport {
    let requests = after.requests.saturating_sub(before.requests);
    let sectors = after.sectors.saturating_sub(before.sectors);
    let ticks = after.ticks_ms.saturating_sub(before.ticks_ms) as f64;
    let per_request = |x: f64| {
        if requests > 0 {
            x / requests as f64
        } else {
            0.0
        }
    };
    let ms = elapsed.as_secs_f64() * 1e3;
    DriveReport {
        device: device.to_string(),
        requests,
        merged: after.merged.saturating_sub(before.merged),
        mean_kib: per_request(sectors as f64 * 512.0 / 1024.0),
        mean_ms: per_request(ticks),
        in_flight: if ms > 0.0 { ticks / ms } else { 0.0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drive_counters_per_phase() {
        let c = |requests, sectors, ticks_ms| DriveCounters {
            requests,
            merged: 0,
            sectors,
            ticks_ms,
        };
        // 100 reads of 260 KiB, 300 ms of busy time summed, over 20 ms: 15 in flight.
        let d = drive_report(
            "254:0",
            c(1000, 7, 50),
            c(1100, 7 + 100 * 520, 350),
            Duration::from_millis(20),
        );
        assert_eq!(d.requests, 100);
        assert!((d.mean_kib - 260.0).abs() < 1e-9);
        assert!((d.mean_ms - 3.0).abs() < 1e-9);
        assert!((d.in_flight - 15.0).abs() < 1e-9);
        // Nothing happened: no division by zero.
        let idle = drive_report("254:0", c(5, 5, 5), c(5, 5, 5), Duration::ZERO);
        assert_eq!(
            (idle.mean_kib, idle.mean_ms, idle.in_flight),
            (0.0, 0.0, 0.0)
        );
        // This machine's root, when it is a block device, parses.
        if let Some((_, path)) = drive_stat_path(Path::new("/")) {
            assert!(drive_counters(&path, false).is_some());
            assert!(drive_counters(&path, true).is_some());
        }
    }
}
