//! `kvstrata gpu-check`: every GPU check and GPU benchmark in one run, for the
//! lent GPU machine (`scripts/gpu-check.sh` carries the release binary there
//! and runs this).
//!
//! - Checks (`kvstrata_kernels::check::kernels`): each kernel (batched copy, gather, scatter, in both
//!   paged layouts) and the DMA path against its CPU reference on fresh
//!   random data, with poisoned outputs; the HBM tier's round trips under
//!   demotion/promotion pressure; the two-process CUDA IPC path (a child
//!   process plays the engine).
//! - Benchmarks (`kvstrata_kernels::check::bench`): the ceilings (pinned `cuMemcpyAsync` each way,
//!   a large device-to-device copy) and kvstrata's paths measured in the same
//!   run, each reported with its ratio to its ceiling.
//!
//! Prints a pass/fail table and a benchmark table; `--json-out` writes both.
//! Exit status 1 when a check fails. Without a GPU it runs the checks on the
//! CPU backend (useful only to test this command itself).

use std::path::PathBuf;

use kvstrata_kernels::check::{self, CheckRow, GpuCheckReport};
use kvstrata_kernels::{Backend, Gpu};

/// Options of `kvstrata gpu-check`.
#[derive(Debug, Clone, clap::Args)]
pub struct GpuCheckArgs {
    /// CUDA device ordinal
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Run on the CPU backend even if a GPU is present (tests this command)
    #[arg(long)]
    pub cpu: bool,
    /// Skip the benchmarks (checks only)
    #[arg(long)]
    pub no_bench: bool,
    /// Bytes moved per benchmark measurement
    #[arg(long, default_value = "1GiB")]
    pub bench_bytes: bytesize::ByteSize,
    /// Timed repetitions per benchmark (the median is reported)
    #[arg(long, default_value_t = 10)]
    pub repeat: usize,
    /// Random-data rounds per kernel check
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,
    /// Write the results as JSON to this file
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

/// Opens the device (or the CPU backend) and runs everything. `extra` runs
/// further checks that need crates above this one (the daemon's CUDA IPC
/// path), with the same device.
pub fn run_gpu_check(
    args: &GpuCheckArgs,
    extra: impl FnOnce(&Gpu, &mut Vec<CheckRow>),
) -> Result<GpuCheckReport, String> {
    let gpu = if args.cpu {
        Gpu::cpu()
    } else {
        match Gpu::cuda(args.device) {
            Ok(g) => g,
            Err(e) if e.is_absent() => {
                eprintln!("no GPU ({e}): running the checks on the CPU backend");
                Gpu::cpu()
            }
            Err(e) => return Err(format!("cannot open CUDA device {}: {e}", args.device)),
        }
    };
    let info = gpu.info().clone();
    eprintln!(
        "device {}: {} ({}), compute capability {}.{}, {} multiprocessors",
        info.ordinal,
        info.name,
        info.backend.name(),
        info.compute_capability.0,
        info.compute_capability.1,
        info.multiprocessors
    );
    let mut rows = Vec::new();
    check::kernels::kernel_checks(&gpu, args.rounds, &mut rows);
    extra(&gpu, &mut rows);
    let (bench, threshold) = if args.no_bench || info.backend == Backend::Cpu {
        (Vec::new(), None)
    } else {
        match check::bench::run(&gpu, args.bench_bytes.as_u64(), args.repeat.max(1)) {
            Ok(r) => r,
            Err(e) => {
                rows.push(CheckRow {
                    name: "benchmarks ran".to_string(),
                    pass: false,
                    detail: e,
                    seconds: 0.0,
                });
                (Vec::new(), None)
            }
        }
    };
    let mut report = GpuCheckReport::new(&info);
    report.checks = rows;
    report.bench = bench;
    report.suggested_dma_threshold = threshold;
    if let Some(path) = &args.json_out {
        let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, json).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(report)
}
