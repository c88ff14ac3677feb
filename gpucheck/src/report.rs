//! What a `kvstrata gpu-check` run found, and how it is printed: one
//! [`CheckRow`] per check (pass/fail), one [`BenchRow`] per benchmark line
//! (GB/s and its ratio to a ceiling), both gathered in a [`GpuCheckReport`]
//! (the pass/fail table, the benchmark table, `--json-out`). [`check`] runs
//! one named check and records its row.

use std::time::Instant;

use kvstrata_kernels::DeviceInfo;
use serde::Serialize;

/// One check's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct CheckRow {
    pub name: String,
    pub pass: bool,
    pub detail: String,
    pub seconds: f64,
}

/// One benchmark line: GB/s (decimal, bytes as stated in `counted`) and its
/// ratio to the ceiling it is compared with.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub path: String,
    pub block: String,
    pub gb_per_s: f64,
    pub ceiling: String,
    pub ceiling_gb_per_s: f64,
    pub ratio: f64,
    pub counted: String,
}

/// Everything one run found.
#[derive(Debug, Clone, Serialize)]
pub struct GpuCheckReport {
    pub device: String,
    pub backend: String,
    pub compute_capability: String,
    pub memory_gib: f64,
    pub checks: Vec<CheckRow>,
    pub bench: Vec<BenchRow>,
    /// The DMA threshold the batched-copy measurements suggest (bytes).
    pub suggested_dma_threshold: Option<u64>,
}

impl GpuCheckReport {
    /// An empty report for `info`'s device.
    pub fn new(info: &DeviceInfo) -> Self {
        GpuCheckReport {
            device: info.name.clone(),
            backend: info.backend.name().to_string(),
            compute_capability: format!(
                "{}.{}",
                info.compute_capability.0, info.compute_capability.1
            ),
            memory_gib: info.total_bytes as f64 / (1u64 << 30) as f64,
            checks: Vec::new(),
            bench: Vec::new(),
            suggested_dma_threshold: None,
        }
    }

    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.pass)
    }

    pub fn print(&self) {
        println!(
            "device: {} ({}), compute capability {}, {:.1} GiB",
            self.device, self.backend, self.compute_capability, self.memory_gib
        );
        println!();
        println!("{:<58} {:<6} {:>8}  detail", "check", "result", "seconds");
        for c in &self.checks {
            println!(
                "{:<58} {:<6} {:>8.2}  {}",
                c.name,
                if c.pass { "PASS" } else { "FAIL" },
                c.seconds,
                c.detail
            );
        }
        if !self.bench.is_empty() {
            println!();
            println!(
                "{:<44} {:>8} {:>9} {:>24} {:>9} {:>6}  counted",
                "path", "block", "GB/s", "ceiling", "GB/s", "ratio"
            );
            for b in &self.bench {
                println!(
                    "{:<44} {:>8} {:>9.2} {:>24} {:>9.2} {:>6.2}  {}",
                    b.path, b.block, b.gb_per_s, b.ceiling, b.ceiling_gb_per_s, b.ratio, b.counted
                );
            }
        }
        if let Some(t) = self.suggested_dma_threshold {
            println!();
            println!(
                "suggested DMA threshold: {} (batched kernel below, DMA from there)",
                human(t)
            );
        }
        println!();
        let failed = self.checks.iter().filter(|c| !c.pass).count();
        println!(
            "{} checks, {} passed, {} failed",
            self.checks.len(),
            self.checks.len() - failed,
            failed
        );
    }
}

/// `bytes` in the largest binary unit that divides it (`16KiB`, `1GiB`, `720KiB`, `7B`).
pub fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{}GiB", bytes >> 30)
    } else if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{}MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{}KiB", bytes >> 10)
    } else {
        format!("{bytes}B")
    }
}

/// Runs a named check, catching errors and panics into a failed row.
pub fn check(
    rows: &mut Vec<CheckRow>,
    name: impl Into<String>,
    f: impl FnOnce() -> Result<String, String>,
) {
    let name = name.into();
    let started = Instant::now();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        Err(p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".to_string()))
    });
    let seconds = started.elapsed().as_secs_f64();
    let (pass, detail) = match outcome {
        Ok(d) => (true, d),
        Err(d) => (false, d),
    };
    eprintln!("{} {name}: {detail}", if pass { "PASS" } else { "FAIL" });
    rows.push(CheckRow {
        name,
        pass,
        detail,
        seconds,
    });
}
