//! Every kernel source compiles with NVRTC for the architectures kvstrata
//! runs on. NVRTC needs no GPU: `make test` provides the library (the
//! `nvidia-cuda-nvrtc` wheel, see the Makefile) through `KVSTRATA_NVRTC_DIR`,
//! so a syntax error in `kernels/cuda/` fails CI, not the GPU machine.

use kvstrata_kernels::cuda::{
    BATCHED_COPY_SOURCE, PAGED_SOURCE, XXH3_SOURCE, compile, load_nvrtc_from_env,
    nvrtc_library_present,
};

#[test]
fn every_kernel_compiles_with_nvrtc() {
    load_nvrtc_from_env().unwrap_or_else(|e| panic!("{e}"));
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
