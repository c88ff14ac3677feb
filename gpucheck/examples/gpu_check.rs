//! The kernel checks and the copy benchmarks alone, without the tier and CUDA
//! IPC checks or the `kvstrata` binary:
//! `cargo run --release -p kvstrata-gpucheck --example gpu_check -- [--no-bench] [--bytes N] [--json FILE]`.
//! `kvstrata gpu-check` runs these and the tier and CUDA IPC checks.

use kvstrata_gpucheck::{GpuCheckReport, ceilings, kernels};
use kvstrata_kernels::Gpu;

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().any(|a| a == name);
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let gpu = match Gpu::cuda(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("no CUDA device ({e}): checking the CPU backend");
            Gpu::cpu()
        }
    };
    let bytes: u64 = value("--bytes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 30);
    let mut report = GpuCheckReport::new(gpu.info());
    kernels::kernel_checks(&gpu, 20, &mut report.checks);
    if !flag("--no-bench") && gpu.backend() == kvstrata_kernels::Backend::Cuda {
        match ceilings::run(&gpu, bytes, 10) {
            Ok((rows, threshold)) => {
                report.bench = rows;
                report.suggested_dma_threshold = threshold;
            }
            Err(e) => eprintln!("benchmarks failed: {e}"),
        }
    }
    report.print();
    if let Some(path) = value("--json")
        && let Ok(json) = serde_json::to_string_pretty(&report)
    {
        let _ = std::fs::write(path, json);
    }
    if report.passed() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
