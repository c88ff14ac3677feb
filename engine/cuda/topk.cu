// The k largest logits, largest first, ties to the lower index (greedy
// decoding is k = 1, matching the CPU engine's argmax); NaN is never chosen.
// Slots past the last candidate get index 0xffffffff and -inf. One CTA of
// 1024 threads; pass t selects the best element ordered after pass t-1's
// pick (value descending, index ascending), so nothing needs marking.
// CPU reference: engine/src/cuda/reference.rs (`top_k`).

#define TOPK_NONE 0xffffffffu

__device__ __forceinline__ bool topk_before(float a, u32 ia, float b, u32 ib) {
    return ib == TOPK_NONE || (ia != TOPK_NONE && (a > b || (a == b && ia < ib)));
}

extern "C" __global__ void __launch_bounds__(1024) kvs_top_k(const float* x, u32 n, u32 k, u32* out_index,
                                                             float* out_value) {
    __shared__ float sv[32];
    __shared__ u32 si[32];
    __shared__ float prev_v;
    __shared__ u32 prev_i;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (threadIdx.x == 0) prev_i = TOPK_NONE;
    __syncthreads();
    for (u32 t = 0; t < k; t++) {
        const float pv = prev_v;
        const u32 pi = prev_i;
        const bool first = t == 0;
        float bv = -KVS_INF;
        u32 bi = TOPK_NONE;
        if (first || pi != TOPK_NONE) {
            for (u32 i = threadIdx.x; i < n; i += blockDim.x) {
                const float v = x[i];
                if (v != v) continue;
                const bool after = first || v < pv || (v == pv && i > pi);
                if (after && topk_before(v, i, bv, bi)) {
                    bv = v;
                    bi = i;
                }
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const u32 oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (topk_before(ov, oi, bv, bi)) {
                bv = ov;
                bi = oi;
            }
        }
        __syncthreads();
        if (lane == 0) {
            sv[warp] = bv;
            si[warp] = bi;
        }
        __syncthreads();
        if (warp == 0) {
            bv = lane < warps ? sv[lane] : -KVS_INF;
            bi = lane < warps ? si[lane] : TOPK_NONE;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
                const u32 oi = __shfl_xor_sync(0xffffffffu, bi, o);
                if (topk_before(ov, oi, bv, bi)) {
                    bv = ov;
                    bi = oi;
                }
            }
            if (lane == 0) {
                out_index[t] = bi;
                out_value[t] = bi == TOPK_NONE ? -KVS_INF : bv;
                prev_v = bv;
                prev_i = bi;
            }
        }
        __syncthreads();
    }
}
