//! Every model kernel of the GPU engine (`engine/cuda/*.cu`) compiles with NVRTC
//! for the architectures kvstrata runs on, and defines the entry points the
//! engine loads. NVRTC needs no GPU: `make test` provides the library (the
//! `nvidia-cuda-nvrtc` wheel, see the Makefile's `nvrtc` target) through
//! `KVSTRATA_NVRTC_DIR`, so a kernel that does not compile fails CI, not the
//! GPU machine.

use kvstrata_engine::cuda::sources::{SOURCES, compile, nvrtc_library_present};
use kvstrata_kernels::cuda::load_nvrtc_from_env;

#[test]
fn every_model_kernel_compiles_with_nvrtc() {
    load_nvrtc_from_env().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        nvrtc_library_present(),
        "NVRTC not found: run through `make test` (it installs the nvidia-cuda-nvrtc wheel) or set \
         KVSTRATA_NVRTC_DIR to a directory holding libnvrtc.so.13"
    );
    for cc in [(8, 0), (8, 9), (9, 0)] {
        for (name, src, kernels) in SOURCES {
            let ptx = compile(name, src, cc).unwrap_or_else(|e| panic!("{name} for {cc:?}: {e}"));
            for k in kernels.iter() {
                assert!(
                    ptx.contains(&format!(".entry {k}(")),
                    "{name}: no entry {k} in the PTX"
                );
            }
        }
    }
    // K/V pages are stored as f16 with round-to-nearest-even conversions.
    let ptx = compile("attention.cu", SOURCES[1].1, (9, 0)).unwrap();
    assert!(
        ptx.contains("cvt.rn.f16.f32"),
        "no f16 stores in attention.cu"
    );
}
