//! The model kernels' CUDA C sources (`engine/cuda/*.cu`, embedded in the binary)
//! and their compilation with NVRTC for a device's compute capability.

use super::error::CudaError;

/// Prepended to every source (NVRTC is given no include path).
pub const COMMON_SOURCE: &str = include_str!("../../cuda/common.cuh");
/// Embedding lookup, RMSNorm, SwiGLU, the synthetic weights.
pub const POINTWISE_SOURCE: &str = include_str!("../../cuda/pointwise.cu");
/// Rotary embeddings, the KV store into pages, attention over pages.
pub const ATTENTION_SOURCE: &str = include_str!("../../cuda/attention.cu");
/// Logits top-k (argmax = top-1).
pub const TOPK_SOURCE: &str = include_str!("../../cuda/topk.cu");

/// Every source with its file name and the kernels it defines.
pub const SOURCES: &[(&str, &str, &[&str])] = &[
    (
        "pointwise.cu",
        POINTWISE_SOURCE,
        &[
            "kvs_embed_bf16",
            "kvs_embed_f16",
            "kvs_rms_norm_bf16",
            "kvs_rms_norm_f16",
            "kvs_swiglu_bf16",
            "kvs_swiglu_f16",
            "kvs_synthetic_bf16",
            "kvs_synthetic_f16",
            "kvs_synthetic_f32_bf16",
            "kvs_synthetic_f32_f16",
        ],
    ),
    (
        "attention.cu",
        ATTENTION_SOURCE,
        &[
            "kvs_rope",
            "kvs_kv_store",
            "kvs_attention_bf16_d64",
            "kvs_attention_bf16_d128",
            "kvs_attention_f16_d64",
            "kvs_attention_f16_d128",
            "kvs_attention_mma_bf16_d32",
            "kvs_attention_mma_bf16_d64",
            "kvs_attention_mma_bf16_d128",
            "kvs_attention_mma_f16_d32",
            "kvs_attention_mma_f16_d64",
            "kvs_attention_mma_f16_d128",
        ],
    ),
    ("topk.cu", TOPK_SOURCE, &["kvs_top_k"]),
];

/// Whether the NVRTC library can be loaded.
pub fn nvrtc_library_present() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles one model kernel source (with [`COMMON_SOURCE`] in front) to PTX for
/// the virtual architecture `compute_<major><minor>`.
pub fn compile(name: &'static str, source: &str, cc: (i32, i32)) -> Result<String, CudaError> {
    if !nvrtc_library_present() {
        return Err(CudaError::NoNvrtc);
    }
    let arch: &'static str = match cc {
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 7) => "compute_87",
        (8, 9) => "compute_89",
        (9, 0) => "compute_90",
        (10, 0) => "compute_100",
        (12, 0) => "compute_120",
        (major, minor) => Box::leak(format!("compute_{major}{minor}").into_boxed_str()),
    };
    let full = format!("{COMMON_SOURCE}\n{source}");
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        name: Some(name.to_string()),
        options: vec!["--std=c++17".to_string()],
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(full, opts).map_err(|e| CudaError::Compile {
        file: name,
        log: match &e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                log.to_string_lossy().into_owned()
            }
            other => format!("{other:?}"),
        },
    })?;
    Ok(ptx.to_src())
}
