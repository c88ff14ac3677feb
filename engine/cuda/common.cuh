// Shared by every model kernel of kvstrata's GPU engine (prepended to each
// source before NVRTC compiles it; NVRTC is given no include path, so nothing
// here includes a CUDA header).
//
// Storage types: weights and the activations fed to cuBLAS are 16-bit, bf16
// or f16 (one build of each kernel per type, `_bf16` / `_f16` entry points);
// KV pages are always f16, like the CPU engine's; everything is computed and
// accumulated in f32. The conversions are written out here so that the CPU
// references (engine/src/cuda/reference.rs) can match them bit for bit:
// f32 -> bf16 and f32 -> f16 round to nearest, ties to even.

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;

// +infinity (NVRTC defines no INFINITY without <math.h>).
#define KVS_INF __int_as_float(0x7f800000)

#define KIND_BF16 0
#define KIND_F16 1

__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }

__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (u16)0x7fc0;  // NaN
    }
    u32 bias = 0x7fffu + ((u >> 16) & 1u);
    return (u16)((u + bias) >> 16);
}

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("{ cvt.f32.f16 %0, %1; }" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(h) : "f"(f));
    return h;
}

template <int KIND>
__device__ __forceinline__ float load16(u16 v) {
    return KIND == KIND_BF16 ? bf16_to_f32(v) : f16_to_f32(v);
}

template <int KIND>
__device__ __forceinline__ u16 store16(float f) {
    return KIND == KIND_BF16 ? f32_to_bf16(f) : f32_to_f16(f);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over a CTA of at most 1024 threads (a multiple of 32); every thread gets
// the total. `scratch` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(t);
}

// Grid-stride loop over [0, n).
#define GRID_LOOP(i, n) \
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < (u64)(n); i += (u64)gridDim.x * blockDim.x)
