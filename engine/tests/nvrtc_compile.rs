//! Every model kernel of the GPU engine (`engine/cuda/*.cu`) compiles with NVRTC
//! for the architectures kvstrata runs on, and defines the entry points the
//! engine loads. NVRTC needs no GPU: `make test` provides the library (the
//! `nvidia-cuda-nvrtc` wheel, see the Makefile's `nvrtc` target) through
//! `KVSTRATA_NVRTC_DIR`, so a kernel that does not compile fails CI, not the
//! GPU machine.

use kvstrata_engine::cuda::sources::{SOURCES, compile, nvrtc_library_present};

/// Loads libnvrtc from `KVSTRATA_NVRTC_DIR` (once loaded, the loader finds it by
/// its soname when cudarc asks for it).
fn load_nvrtc() -> Option<&'static libloading::Library> {
    let dir = std::env::var("KVSTRATA_NVRTC_DIR").ok()?;
    // NVRTC opens its builtins library by name when it compiles: load it first.
    let builtins =
        unsafe { libloading::Library::new(format!("{dir}/libnvrtc-builtins.so.13.0")) }.ok()?;
    Box::leak(Box::new(builtins));
    let lib = unsafe { libloading::Library::new(format!("{dir}/libnvrtc.so.13")) }.ok()?;
    Some(Box::leak(Box::new(lib)))
}

#[test]
fn every_model_kernel_compiles_with_nvrtc() {
    let loaded = load_nvrtc();
    if std::env::var_os("KVSTRATA_NVRTC_DIR").is_some() {
        assert!(
            loaded.is_some(),
            "KVSTRATA_NVRTC_DIR is set but libnvrtc.so.13 does not load from it"
        );
    }
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
