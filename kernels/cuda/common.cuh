// Shared by every kvstrata kernel (prepended to each source before NVRTC
// compiles it; NVRTC has no include path here).
//
// copy_run: `n_threads` cooperating threads (thread `t` of them: a whole CTA
// or one warp) copy `len` bytes from `src` to `dst`. When both addresses and
// the length are multiples of 16 every access is 16 bytes wide (uint4), four
// loads in flight per thread before the first store; else 4 or 1 byte wide.
// The width is the same for all the cooperating threads (a uniform branch).

typedef unsigned long long u64;
typedef unsigned int u32;

__device__ __forceinline__ void copy_run(const char* __restrict__ src, char* __restrict__ dst, u64 len,
                                         u64 t, u64 n_threads) {
    const u64 mix = (u64)src | (u64)dst | len;
    if ((mix & 15) == 0) {
        const uint4* s = (const uint4*)src;
        uint4* d = (uint4*)dst;
        const u64 n = len >> 4;
        u64 i = t;
        for (; i + 3 * n_threads < n; i += 4 * n_threads) {
            uint4 a = s[i];
            uint4 b = s[i + n_threads];
            uint4 c = s[i + 2 * n_threads];
            uint4 e = s[i + 3 * n_threads];
            d[i] = a;
            d[i + n_threads] = b;
            d[i + 2 * n_threads] = c;
            d[i + 3 * n_threads] = e;
        }
        for (; i < n; i += n_threads) {
            d[i] = s[i];
        }
    } else if ((mix & 3) == 0) {
        const u32* s = (const u32*)src;
        u32* d = (u32*)dst;
        const u64 n = len >> 2;
        for (u64 i = t; i < n; i += n_threads) {
            d[i] = s[i];
        }
    } else {
        for (u64 i = t; i < len; i += n_threads) {
            dst[i] = src[i];
        }
    }
}
