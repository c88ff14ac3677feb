//! The HBM tier's check of `kvstrata gpu-check` ([`kvstrata_gpucheck::hbm`]):
//! on the CPU backend (what CI runs), and on CUDA device 0 when there is one.

use kvstrata_gpucheck::hbm;
use kvstrata_kernels::Gpu;

#[test]
fn selfcheck_passes_on_the_cpu_backend() {
    let summary = hbm::hbm_round_trips(Gpu::cpu()).unwrap();
    eprintln!("{summary}");
    assert!(summary.contains("demoted"));
}

/// The selfcheck on CUDA device 0 when there is one (the GPU machine runs
/// this binary); without a CUDA library or device it says so and passes.
#[test]
fn selfcheck_on_cuda_when_present() {
    match Gpu::cuda(0) {
        Ok(gpu) => {
            let summary = hbm::hbm_round_trips(gpu).unwrap();
            eprintln!("{summary}");
            assert!(summary.contains("pinned: true"), "{summary}");
        }
        Err(e) if e.is_absent() => eprintln!("no CUDA here: {e}"),
        Err(e) => panic!("CUDA device 0: {e}"),
    }
}
