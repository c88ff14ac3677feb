//! Every GPU check and GPU benchmark of kvstrata, run by `kvstrata gpu-check`
//! on the lent GPU machine (`scripts/gpu-check.sh` carries the release binary
//! there and runs this): [`run`] with the command's [`GpuCheckArgs`].
//!
//! - Checks, one pass/fail row each ([`report::CheckRow`]):
//!   - [`kernels`]: each kernel (batched copy, xxh3, gather and scatter in both
//!     paged layouts) and the DMA path against its CPU reference on fresh
//!     random data, with poisoned outputs;
//!   - [`hbm`]: the HBM tier's round trips under demotion/promotion pressure,
//!     through a real `BlockCache`;
//!   - [`engine`]: the GPU engine's kernels and forward pass against their CPU
//!     references and the CPU engine, cached vs recomputed prefixes, and the
//!     first TTFT numbers of the synthetic 8B geometry (CUDA only);
//!   - [`ipc`]: the two-process CUDA IPC path (this process plays the engine,
//!     a `kvstrata serve` child process the daemon), by the KV-region round
//!     trip of [`pages`].
//! - Benchmarks, one row each with its ratio to a ceiling
//!   ([`report::BenchRow`]):
//!   - [`ceilings`]: the copy ceilings (pinned `cuMemcpyAsync` each way, a
//!     large device-to-device copy) and the kernels' paths measured in the
//!     same run;
//!   - [`movement`]: blocks moved T0↔T1 through the cache, and the parts of a
//!     move timed alone.
//!
//! [`report::GpuCheckReport::print`] prints a pass/fail table and a benchmark
//! table; `--json-out` writes both. Without a GPU the checks run on the CPU
//! backend (useful only to test this command itself; CI does).

pub mod ceilings;
pub mod engine;
mod error;
pub mod hbm;
pub mod ipc;
pub mod kernels;
pub mod movement;
pub mod pages;
pub mod report;

use std::path::PathBuf;

use kvstrata_kernels::{Backend, Gpu};

pub use error::GpuCheckError;
pub use pages::{
    DeviceBytes, PagesCheckReport, RegionBytes, check_pages_round_trip, nonzero_bytes,
};
pub use report::{BenchRow, CheckRow, GpuCheckReport};

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
    #[command(flatten)]
    pub engine: engine::EngineCheckArgs,
}

/// Opens the device (or the CPU backend) and runs every check, then every
/// benchmark (CUDA only, unless `--no-bench`); writes `--json-out` if asked.
/// Blocks: call it off the async workers. `rt` drives the CUDA IPC check's
/// client. A failed check is a failed row of the report, not an error.
pub fn run(
    args: &GpuCheckArgs,
    rt: &tokio::runtime::Handle,
) -> Result<GpuCheckReport, GpuCheckError> {
    let gpu = open_device(args)?;
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
    if !args.engine.engine_only {
        kernels::kernel_checks(&gpu, args.rounds, &mut rows);
        report::check(
            &mut rows,
            "hbm tier: round trips under demotion/promotion pressure",
            || hbm::hbm_round_trips(gpu.clone()),
        );
        ipc::ipc_checks(&gpu, &mut rows, rt);
    }
    if info.backend == Backend::Cuda {
        engine::engine_checks(info.ordinal, &args.engine, &mut rows);
    }
    let (bench, threshold) =
        if args.no_bench || args.engine.engine_only || info.backend == Backend::Cpu {
            (Vec::new(), None)
        } else {
            run_benchmarks(&gpu, args, &mut rows)
        };
    let mut report = GpuCheckReport::new(&info);
    report.checks = rows;
    report.bench = bench;
    report.suggested_dma_threshold = threshold;
    if let Some(path) = &args.json_out {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json).map_err(|source| GpuCheckError::WriteReport {
            path: path.clone(),
            source,
        })?;
    }
    Ok(report)
}

/// The CUDA device of `--device`, or the CPU backend with `--cpu` or when no
/// GPU is present.
fn open_device(args: &GpuCheckArgs) -> Result<Gpu, GpuCheckError> {
    if args.cpu {
        return Ok(Gpu::cpu());
    }
    match Gpu::cuda(args.device) {
        Ok(g) => Ok(g),
        Err(e) if e.is_absent() => {
            eprintln!("no GPU ({e}): running the checks on the CPU backend");
            Ok(Gpu::cpu())
        }
        Err(source) => Err(GpuCheckError::OpenDevice {
            device: args.device,
            source,
        }),
    }
}

/// The ceilings and the kernels' paths, then the tier movement against those
/// ceilings; returns the rows and the suggested DMA threshold. When the
/// ceilings cannot be measured, a failed "benchmarks ran" check is added.
fn run_benchmarks(
    gpu: &Gpu,
    args: &GpuCheckArgs,
    checks: &mut Vec<CheckRow>,
) -> (Vec<BenchRow>, Option<u64>) {
    let bytes = args.bench_bytes.as_u64();
    match ceilings::run(gpu, bytes, args.repeat.max(1)) {
        Ok((mut rows, threshold)) => {
            let ceiling = |name: &str| {
                rows.iter()
                    .find(|b| b.path.contains(name))
                    .map(|b| b.gb_per_s)
                    .unwrap_or(f64::NAN)
            };
            let pinned = (ceiling("pinned H2D"), ceiling("pinned D2H"));
            match movement::tier_movement_bench(gpu, bytes, pinned) {
                Ok(more) => rows.extend(more),
                Err(e) => eprintln!("tier movement benchmark failed: {e}"),
            }
            (rows, threshold)
        }
        Err(e) => {
            checks.push(CheckRow {
                name: "benchmarks ran".to_string(),
                pass: false,
                detail: e,
                seconds: 0.0,
            });
            (Vec::new(), None)
        }
    }
}
