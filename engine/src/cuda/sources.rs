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
            "kvs_attention_flash_bf16_d32",
            "kvs_attention_flash_bf16_d64",
            "kvs_attention_flash_bf16_d128",
            "kvs_attention_flash_f16_d32",
            "kvs_attention_flash_f16_d64",
            "kvs_attention_flash_f16_d128",
            "kvs_attention_flash2_bf16_d32",
            "kvs_attention_flash2_bf16_d64",
            "kvs_attention_flash2_bf16_d128",
            "kvs_attention_flash2_f16_d32",
            "kvs_attention_flash2_f16_d64",
            "kvs_attention_flash2_f16_d128",
            "kvs_attention_combine_bf16",
            "kvs_attention_combine_f16",
        ],
    ),
    ("topk.cu", TOPK_SOURCE, &["kvs_top_k"]),
];

/// Whether the NVRTC library can be loaded.
pub use kvstrata_kernels::cuda::nvrtc_library_present;

/// Compiles one model kernel source (with [`COMMON_SOURCE`] in front) to PTX for
/// the virtual architecture `compute_<major><minor>`
/// (`kvstrata_kernels::cuda::compile_with_prelude`).
pub fn compile(name: &'static str, source: &str, cc: (i32, i32)) -> Result<String, CudaError> {
    kvstrata_kernels::cuda::compile_with_prelude(name, COMMON_SOURCE, source, cc).map_err(|e| {
        match e {
            kvstrata_kernels::GpuError::NoNvrtc => CudaError::NoNvrtc,
            kvstrata_kernels::GpuError::Compile { file, log } => CudaError::Compile { file, log },
            other => CudaError::Unsupported(format!("compiling {name}: {other}")),
        }
    })
}
