// Row-wise and element-wise model kernels: embedding lookup, RMSNorm, SwiGLU,
// and the seeded weights of the synthetic models. CPU references:
// engine/src/cuda/reference.rs (`embed`, `rms_norm`, `swiglu`, `synthetic`).

// out[i][d] = table[ids[i]][d] as f32 (the residual stream is f32).
template <int KIND>
__device__ void embed_impl(const u16* __restrict__ table, const u32* __restrict__ ids,
                           float* __restrict__ out, u32 rows, u32 hidden) {
    GRID_LOOP(e, (u64)rows * hidden) {
        const u64 i = e / hidden, d = e % hidden;
        out[e] = load16<KIND>(table[(u64)ids[i] * hidden + d]);
    }
}

extern "C" __global__ void kvs_embed_bf16(const u16* table, const u32* ids, float* out, u32 rows, u32 hidden) {
    embed_impl<KIND_BF16>(table, ids, out, rows, hidden);
}
extern "C" __global__ void kvs_embed_f16(const u16* table, const u32* ids, float* out, u32 rows, u32 hidden) {
    embed_impl<KIND_F16>(table, ids, out, rows, hidden);
}

// One CTA per row: out = x / sqrt(mean(x^2) + eps) * w, as candle's CPU
// rms_norm computes it, stored 16-bit (it feeds a matrix product).
template <int KIND>
__device__ void rms_norm_impl(const float* __restrict__ x, u64 x_stride, const float* __restrict__ w,
                              u16* __restrict__ out, u64 out_stride, u32 hidden, float eps) {
    __shared__ float scratch[32];
    const float* row = x + blockIdx.x * x_stride;
    u16* dst = out + blockIdx.x * out_stride;
    float s = 0.0f;
    for (u32 d = threadIdx.x; d < hidden; d += blockDim.x) s += row[d] * row[d];
    const float total = block_sum(s, scratch);
    const float m = sqrtf(total / (float)hidden + eps);
    for (u32 d = threadIdx.x; d < hidden; d += blockDim.x) dst[d] = store16<KIND>(row[d] / m * w[d]);
}

extern "C" __global__ void kvs_rms_norm_bf16(const float* x, u64 x_stride, const float* w, u16* out, u64 out_stride,
                                             u32 hidden, float eps) {
    rms_norm_impl<KIND_BF16>(x, x_stride, w, out, out_stride, hidden, eps);
}
extern "C" __global__ void kvs_rms_norm_f16(const float* x, u64 x_stride, const float* w, u16* out, u64 out_stride,
                                            u32 hidden, float eps) {
    rms_norm_impl<KIND_F16>(x, x_stride, w, out, out_stride, hidden, eps);
}

// gate_up: rows of [gate (inter) | up (inter)] in f32 (one fused matrix
// product); out = silu(gate) * up, stored 16-bit. silu(g) = g / (1 + exp(-g)).
template <int KIND>
__device__ void swiglu_impl(const float* __restrict__ gate_up, u16* __restrict__ out, u32 rows, u32 inter) {
    GRID_LOOP(e, (u64)rows * inter) {
        const u64 r = e / inter, j = e % inter;
        const float g = gate_up[r * 2 * inter + j];
        const float u = gate_up[r * 2 * inter + inter + j];
        out[e] = store16<KIND>(g / (1.0f + expf(-g)) * u);
    }
}

extern "C" __global__ void kvs_swiglu_bf16(const float* gate_up, u16* out, u32 rows, u32 inter) {
    swiglu_impl<KIND_BF16>(gate_up, out, rows, inter);
}
extern "C" __global__ void kvs_swiglu_f16(const float* gate_up, u16* out, u32 rows, u32 inter) {
    swiglu_impl<KIND_F16>(gate_up, out, rows, inter);
}

// splitmix64, the synthetic models' generator.
__device__ __forceinline__ u64 splitmix64(u64 x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// Element i of a synthetic tensor: offset + scale * (2u - 1) with u the top
// 24 bits of splitmix64(key + i) over 2^24 (exact), each step rounded once
// (no fused multiply-add), then rounded to the storage type.
template <int KIND>
__device__ __forceinline__ u16 synthetic_value(u64 key, u64 i, float scale, float offset) {
    const float u = (float)(splitmix64(key + i) >> 40) * (1.0f / 16777216.0f);
    const float v = __fadd_rn(offset, __fmul_rn(scale, __fsub_rn(__fmul_rn(u, 2.0f), 1.0f)));
    return store16<KIND>(v);
}

extern "C" __global__ void kvs_synthetic_bf16(u16* out, u64 n, u64 key, float scale, float offset) {
    GRID_LOOP(i, n) out[i] = synthetic_value<KIND_BF16>(key, i, scale, offset);
}
extern "C" __global__ void kvs_synthetic_f16(u16* out, u64 n, u64 key, float scale, float offset) {
    GRID_LOOP(i, n) out[i] = synthetic_value<KIND_F16>(key, i, scale, offset);
}
// The same values widened to f32 (norm weights are kept in f32).
extern "C" __global__ void kvs_synthetic_f32_bf16(float* out, u64 n, u64 key, float scale, float offset) {
    GRID_LOOP(i, n) out[i] = bf16_to_f32(synthetic_value<KIND_BF16>(key, i, scale, offset));
}
extern "C" __global__ void kvs_synthetic_f32_f16(float* out, u64 n, u64 key, float scale, float offset) {
    GRID_LOOP(i, n) out[i] = f16_to_f32(synthetic_value<KIND_F16>(key, i, scale, offset));
}
