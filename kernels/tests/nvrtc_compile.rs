//! Every kernel source compiles with NVRTC for the architectures kvstrata
//! runs on. NVRTC needs no GPU: `make test` provides the library (the
//! `nvidia-cuda-nvrtc` wheel, see the Makefile) through `KVSTRATA_NVRTC_DIR`,
//! so a syntax error in `kernels/cuda/` fails CI, not the GPU machine.

use kvstrata_kernels::cuda::{
    BATCHED_COPY_SOURCE, PAGED_SOURCE, XXH3_SOURCE, compile, nvrtc_library_present,
};

/// Loads libnvrtc from `KVSTRATA_NVRTC_DIR` (once loaded, the loader finds it
/// by its soname when cudarc asks for it).
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
fn every_kernel_compiles_with_nvrtc() {
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
        for (name, src, kernels) in [
            (
                "batched_copy.cu",
                BATCHED_COPY_SOURCE,
                &["kvs_batched_copy"][..],
            ),
            ("paged.cu", PAGED_SOURCE, &["kvs_gather", "kvs_scatter"][..]),
            ("xxh3.cu", XXH3_SOURCE, &["kvs_xxh3"][..]),
        ] {
            let ptx = compile(name, src, cc).unwrap_or_else(|e| panic!("{name} for {cc:?}: {e}"));
            for k in kernels {
                assert!(
                    ptx.contains(&format!(".entry {k}")),
                    "{name}: no entry {k} in the PTX"
                );
            }
            // 16-byte accesses in the copy loops; xxh3 reads its chunks
            // through the read-only path (`__ldg`).
            let wide = if name == "xxh3.cu" {
                &["ld.global.nc.v4.u32"][..]
            } else {
                &["ld.global.v4.u32", "ld.v4.u32"][..]
            };
            assert!(
                wide.iter().any(|w| ptx.contains(w)),
                "{name}: no 16-byte loads"
            );
        }
    }
}
