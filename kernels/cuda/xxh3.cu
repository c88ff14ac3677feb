// xxh3-64 (seed 0, default 192-byte secret) of many runs in one launch:
// out[i] = XXH3_64bits(table[i].addr, table[i].len), bit for bit the value of
// xxhash_rust::xxh3::xxh3_64. Sources may be device memory or mapped pinned
// host memory (any address the device can reach); `out` is usually mapped
// pinned host memory. One CTA of 256 threads (8 warps; THREADS in cuda.rs)
// per run, grid-stride over the runs.
//
// len <= 240: thread 0 alone runs xxh3's short paths (0, 1-3, 4-8, 9-16,
// 17-128, 129-240) with unaligned-safe loads.
//
// len > 240 (the hot path, blocks of 16 KiB - 2 MiB): xxh3's long loop takes
// 1 KiB "chunks" (16 stripes of 64 bytes) and scrambles its 8 accumulators
// after each full chunk. Within a chunk the accumulators only receive
// additions, so for full chunk k and lane j (0..8)
//   S_k[j] = sum over stripes s of  w[s][j^1] + lo32(d) * hi32(d),
//            d = w[s][j] ^ secret64(8s + 8j)
// (w[s][j]: the u64 at byte 1024k + 64s + 8j; wrapping arithmetic), and the
// chain is acc = scramble(acc + S_k) with secret bytes 128..192. The chunk
// sums are independent; only the chain is serial. The CTA works through
// windows of XXH3_WINDOW (56) chunks, double-buffered in shared memory:
//   iteration t: warps 1..7 compute the chunk sums of window t into buf[t&1]
//                (8 chunks per warp, all 16 of a lane's 16-byte loads issued
//                before any is used), while warp 0 chains window t-1 from
//                buf[(t-1)&1]; then __syncthreads.
// A warp computes a chunk as 64 16-byte words: lane L takes words L and L+32
// (stripes L/4 and L/4+8), both of which feed accumulator pair p = L%4, i.e.
// lanes j = 2p and 2p+1 (the j^1 cross term stays inside a 16-byte word).
// A butterfly over the lanes with equal L%4 (shuffle xor 4, 8, 16) leaves
// the pair's sums in lanes 0..3, which store them.
// Then warp 0 runs the tail exactly as xxh3 does: the stripes of the last
// partial chunk up to (not including) the final byte with keys at 8s, the
// last stripe (bytes [len-64, len)) with key offset 192-64-7 = 121, and the
// merge (secret offset 11, start len * PRIME64_1) and avalanche. Warp 0 runs
// the chain and tail with all 32 lanes (lane L plays accumulator L%8; the
// four copies agree), so its shuffles use the full mask.
//
// 16-byte loads (uint4, read-only path) where the run's address is 16-byte
// aligned; otherwise 8-byte loads where aligned, else bytes.
//
// CPU reference (the same decomposition, step for step):
// kvstrata_kernels::xxh3::xxh3_64.

struct KvsHashRun {
    u64 addr;
    u64 len;
};

#define XXH_PRIME32_1 0x9E3779B1ULL
#define XXH_PRIME32_2 0x85EBCA77ULL
#define XXH_PRIME32_3 0xC2B2AE3DULL
#define XXH_PRIME64_1 0x9E3779B185EBCA87ULL
#define XXH_PRIME64_2 0xC2B2AE3D27D4EB4FULL
#define XXH_PRIME64_3 0x165667B19E3779F9ULL
#define XXH_PRIME64_4 0x85EBCA77C2B2AE63ULL
#define XXH_PRIME64_5 0x27D4EB2F165667C5ULL

#define XXH3_WARPS 8              // warps per CTA (256 threads)
#define XXH3_CHUNKS_PER_WARP 8    // chunks a compute warp sums per window
#define XXH3_WINDOW ((XXH3_WARPS - 1) * XXH3_CHUNKS_PER_WARP)  // 56 chunks

// xxh3's default secret as 24 little-endian u64s (bytes 8i..8i+8).
// secret table begin
__constant__ u64 kvs_xxh3_secret[24] = {
    0xbe4ba423396cfeb8ULL, 0x1cad21f72c81017cULL, 0xdb979083e96dd4deULL,
    0x1f67b3b7a4a44072ULL, 0x78e5c0cc4ee679cbULL, 0x2172ffcc7dd05a82ULL,
    0x8e2443f7744608b8ULL, 0x4c263a81e69035e0ULL, 0xcb00c391bb52283cULL,
    0xa32e531b8b65d088ULL, 0x4ef90da297486471ULL, 0xd8acdea946ef1938ULL,
    0x3f349ce33f76faa8ULL, 0x1d4f0bc7c7bbdcf9ULL, 0x3159b4cd4be0518aULL,
    0x647378d9c97e9fc8ULL, 0xc3ebd33483acc5eaULL, 0xeb6313faffa081c5ULL,
    0x49daf0b751dd0d17ULL, 0x9e68d429265516d3ULL, 0xfca1477d58be162bULL,
    0xce31d07ad1b8f88fULL, 0x280416958f3acb45ULL, 0x7e404bbbcafbd7afULL,
};
// secret table end

__constant__ u64 kvs_xxh3_init_acc[8] = {
    XXH_PRIME32_3, XXH_PRIME64_1, XXH_PRIME64_2, XXH_PRIME64_3,
    XXH_PRIME64_4, XXH_PRIME32_2, XXH_PRIME64_5, XXH_PRIME32_1,
};

// The u64 at secret byte `off` (any offset up to 184).
__device__ __forceinline__ u64 xxh_secret64(u32 off) {
    const u32 i = off >> 3, r = off & 7;
    const u64 lo = kvs_xxh3_secret[i];
    return r == 0 ? lo : (lo >> (8 * r)) | (kvs_xxh3_secret[min(i + 1, 23u)] << (64 - 8 * r));
}

// Little-endian loads from any address: one access where aligned, else bytes.
__device__ __forceinline__ u64 xxh_ld64(const unsigned char* p) {
    if (((u64)p & 7) == 0) {
        return *(const u64*)p;
    }
    u64 v = 0;
#pragma unroll
    for (int b = 7; b >= 0; b--) {
        v = (v << 8) | p[b];
    }
    return v;
}

__device__ __forceinline__ u32 xxh_ld32(const unsigned char* p) {
    if (((u64)p & 3) == 0) {
        return *(const u32*)p;
    }
    return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}

__device__ __forceinline__ u64 xxh_mul128_fold64(u64 a, u64 b) {
    return (a * b) ^ __umul64hi(a, b);
}

__device__ __forceinline__ u64 xxh_lo_hi(u64 d) {
    return (u64)(u32)d * (u64)(u32)(d >> 32);
}

__device__ __forceinline__ u64 xxh_rotl64(u64 v, u32 r) {
    return (v << r) | (v >> (64 - r));
}

__device__ __forceinline__ u64 xxh_bswap64(u64 v) {
    const u32 lo = __byte_perm((u32)v, 0, 0x0123);
    const u32 hi = __byte_perm((u32)(v >> 32), 0, 0x0123);
    return ((u64)lo << 32) | hi;
}

// xxh64's avalanche (the 0..3-byte paths).
__device__ __forceinline__ u64 xxh64_avalanche(u64 h) {
    h ^= h >> 33;
    h *= XXH_PRIME64_2;
    h ^= h >> 29;
    h *= XXH_PRIME64_3;
    return h ^ (h >> 32);
}

__device__ __forceinline__ u64 xxh3_avalanche(u64 h) {
    h ^= h >> 37;
    h *= 0x165667919E3779F9ULL;
    return h ^ (h >> 32);
}

// xxh3's rrmxmx (the 4..8-byte path).
__device__ __forceinline__ u64 xxh3_rrmxmx(u64 h, u64 len) {
    h ^= xxh_rotl64(h, 49) ^ xxh_rotl64(h, 24);
    h *= 0x9FB21C651E98DF25ULL;
    h ^= (h >> 35) + len;
    h *= 0x9FB21C651E98DF25ULL;
    return h ^ (h >> 28);
}

// 16 input bytes at `p` against 16 secret bytes at `s`.
__device__ __forceinline__ u64 xxh3_mix16(const unsigned char* p, u32 s) {
    return xxh_mul128_fold64(xxh_ld64(p) ^ xxh_secret64(s), xxh_ld64(p + 8) ^ xxh_secret64(s + 8));
}

// xxh3-64 of a run of at most 240 bytes (one thread).
__device__ u64 xxh3_short(const unsigned char* p, u64 len) {
    if (len == 0) {
        return xxh64_avalanche(xxh_secret64(56) ^ xxh_secret64(64));
    }
    if (len <= 3) {
        const u32 c1 = p[0], c2 = p[len >> 1], c3 = p[len - 1];
        const u32 combo = (c1 << 16) | (c2 << 24) | c3 | ((u32)len << 8);
        const u64 flip = (u32)xxh_secret64(0) ^ (u32)xxh_secret64(4);
        return xxh64_avalanche((u64)combo ^ flip);
    }
    if (len <= 8) {
        const u64 in1 = xxh_ld32(p), in2 = xxh_ld32(p + len - 4);
        const u64 flip = xxh_secret64(8) ^ xxh_secret64(16);
        return xxh3_rrmxmx((in2 + (in1 << 32)) ^ flip, len);
    }
    if (len <= 16) {
        const u64 flip1 = xxh_secret64(24) ^ xxh_secret64(32);
        const u64 flip2 = xxh_secret64(40) ^ xxh_secret64(48);
        const u64 lo = xxh_ld64(p) ^ flip1;
        const u64 hi = xxh_ld64(p + len - 8) ^ flip2;
        return xxh3_avalanche(len + xxh_bswap64(lo) + hi + xxh_mul128_fold64(lo, hi));
    }
    u64 acc = len * XXH_PRIME64_1;
    if (len <= 128) {
        if (len > 32) {
            if (len > 64) {
                if (len > 96) {
                    acc += xxh3_mix16(p + 48, 96);
                    acc += xxh3_mix16(p + len - 64, 112);
                }
                acc += xxh3_mix16(p + 32, 64);
                acc += xxh3_mix16(p + len - 48, 80);
            }
            acc += xxh3_mix16(p + 16, 32);
            acc += xxh3_mix16(p + len - 32, 48);
        }
        acc += xxh3_mix16(p, 0);
        acc += xxh3_mix16(p + len - 16, 16);
        return xxh3_avalanche(acc);
    }
    // 129..240: eight rounds, avalanche, the remaining rounds with the
    // secret shifted by 3, and the last 16 bytes at secret 136 - 17.
    const u32 rounds = (u32)(len / 16);
    for (u32 i = 0; i < 8; i++) {
        acc += xxh3_mix16(p + 16 * i, 16 * i);
    }
    acc = xxh3_avalanche(acc);
    for (u32 i = 8; i < rounds; i++) {
        acc += xxh3_mix16(p + 16 * i, 16 * (i - 8) + 3);
    }
    acc += xxh3_mix16(p + len - 16, 119);
    return xxh3_avalanche(acc);
}

// One 16-byte word (u64s a = w[s][2p], b = w[s][2p+1]) into the pair sums.
__device__ __forceinline__ void xxh3_word(u64 a, u64 b, u64 ka, u64 kb, u64& sa, u64& sb) {
    sa += b + xxh_lo_hi(a ^ ka);
    sb += a + xxh_lo_hi(b ^ kb);
}

// Compute warp `cw` (0..6): the sums of its chunks of the window starting at
// chunk `first` (of `nb` full chunks) into `sums` (the window's buffer).
__device__ __forceinline__ void xxh3_window_sums(const unsigned char* p, bool a16, u64 nb, u64 first,
                                                u32 cw, u32 lane, const u64 (&key)[4],
                                                u64 (*sums)[8]) {
    const u64 c0 = first + (u64)cw * XXH3_CHUNKS_PER_WARP;
    // Issue every load of this warp's chunks first (16 x 16 bytes a lane in
    // flight), then compute.
    u64 w[XXH3_CHUNKS_PER_WARP][4];
#pragma unroll
    for (int i = 0; i < XXH3_CHUNKS_PER_WARP; i++) {
        if (c0 + i < nb) {  // uniform across the warp
            const unsigned char* q = p + (c0 + i) * 1024 + 16 * lane;
            if (a16) {
                const uint4 x = __ldg((const uint4*)q);
                const uint4 y = __ldg((const uint4*)(q + 512));
                w[i][0] = (u64)x.x | ((u64)x.y << 32);
                w[i][1] = (u64)x.z | ((u64)x.w << 32);
                w[i][2] = (u64)y.x | ((u64)y.y << 32);
                w[i][3] = (u64)y.z | ((u64)y.w << 32);
            } else {
                w[i][0] = xxh_ld64(q);
                w[i][1] = xxh_ld64(q + 8);
                w[i][2] = xxh_ld64(q + 512);
                w[i][3] = xxh_ld64(q + 520);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < XXH3_CHUNKS_PER_WARP; i++) {
        if (c0 + i < nb) {
            u64 sa = 0, sb = 0;
            xxh3_word(w[i][0], w[i][1], key[0], key[1], sa, sb);  // stripe lane/4
            xxh3_word(w[i][2], w[i][3], key[2], key[3], sa, sb);  // stripe lane/4 + 8
            // Sum over the 8 lanes with the same lane % 4.
#pragma unroll
            for (int m = 4; m < 32; m <<= 1) {
                sa += __shfl_xor_sync(0xffffffffu, sa, m);
                sb += __shfl_xor_sync(0xffffffffu, sb, m);
            }
            if (lane < 4) {
                u64* s = sums[cw * XXH3_CHUNKS_PER_WARP + i];
                s[2 * lane] = sa;
                s[2 * lane + 1] = sb;
            }
        }
    }
}

// One stripe (64 bytes at `q`, key offset `k`) into accumulator j = lane % 8.
__device__ __forceinline__ u64 xxh3_stripe_lane(const unsigned char* q, u32 k, u32 j) {
    const u64 w = xxh_ld64(q + 8 * j);
    const u64 ws = xxh_ld64(q + 8 * (j ^ 1));
    return ws + xxh_lo_hi(w ^ xxh_secret64(k + 8 * j));
}

// xxh3-64 of a run longer than 240 bytes (the whole CTA); the hash in
// thread 0's return value.
__device__ __forceinline__ u64 xxh3_long(const unsigned char* p, u64 len, u64 (*sums)[XXH3_WINDOW][8]) {
    const u32 warp = threadIdx.x / 32, lane = threadIdx.x % 32, j = lane % 8;
    const bool a16 = ((u64)p & 15) == 0;
    const u64 nb = (len - 1) / 1024;  // full chunks, each followed by a scramble
    const u64 windows = (nb + XXH3_WINDOW - 1) / XXH3_WINDOW;

    u64 acc = kvs_xxh3_init_acc[j];             // warp 0: accumulator j
    const u64 scramble_key = xxh_secret64(128 + 8 * j);
    // Compute warps: the keys of this lane's two words (stripes lane/4 and
    // lane/4 + 8, pair lane%4), the same for every chunk.
    u64 key[4];
    {
        const u32 s0 = lane / 4, pr = lane % 4;
        key[0] = xxh_secret64(8 * s0 + 16 * pr);
        key[1] = xxh_secret64(8 * s0 + 16 * pr + 8);
        key[2] = xxh_secret64(8 * (s0 + 8) + 16 * pr);
        key[3] = xxh_secret64(8 * (s0 + 8) + 16 * pr + 8);
    }

    for (u64 t = 0; t <= windows; t++) {
        if (warp == 0) {
            if (t > 0) {
                // Chain window t-1.
                const u64 first = (t - 1) * XXH3_WINDOW;
                const u32 cnt = (u32)min((u64)XXH3_WINDOW, nb - first);
                const u64 (*s)[8] = sums[(t - 1) & 1];
#pragma unroll 8
                for (u32 c = 0; c < cnt; c++) {
                    acc += s[c][j];
                    acc ^= acc >> 47;
                    acc ^= scramble_key;
                    acc *= XXH_PRIME32_1;
                }
            }
        } else if (t < windows) {
            xxh3_window_sums(p, a16, nb, t * XXH3_WINDOW, warp - 1, lane, key, sums[t & 1]);
        }
        __syncthreads();
    }

    if (warp != 0) {
        return 0;
    }
    // The last, partial chunk: whole stripes up to but excluding the final byte.
    const unsigned char* base = p + nb * 1024;
    const u32 stripes = (u32)(((len - 1) - nb * 1024) / 64);
    for (u32 s = 0; s < stripes; s++) {
        acc += xxh3_stripe_lane(base + 64 * s, 8 * s, j);
    }
    // The last stripe: the final 64 bytes, secret offset 192 - 64 - 7.
    acc += xxh3_stripe_lane(p + len - 64, 121, j);

    // Merge: lane 2i mixes accumulators 2i and 2i+1 with secret 11 + 16i.
    const u64 next = __shfl_down_sync(0xffffffffu, acc, 1);
    u64 m = xxh_mul128_fold64(acc ^ xxh_secret64(11 + 8 * j), next ^ xxh_secret64(19 + 8 * j));
    m += __shfl_down_sync(0xffffffffu, m, 2);
    m += __shfl_down_sync(0xffffffffu, m, 4);
    // Lane 0: lanes 0 + 2 + 4 + 6.
    return xxh3_avalanche(len * XXH_PRIME64_1 + m);
}

extern "C" __global__ void __launch_bounds__(256, 2)
kvs_xxh3(const KvsHashRun* __restrict__ table, u32 n, u64* __restrict__ out) {
    // Chunk sums of two windows (7 KiB).
    __shared__ u64 sums[2][XXH3_WINDOW][8];
    for (u32 e = blockIdx.x; e < n; e += gridDim.x) {
        const KvsHashRun r = table[e];
        const unsigned char* p = (const unsigned char*)r.addr;
        u64 h;
        if (r.len <= 240) {  // uniform across the CTA
            if (threadIdx.x != 0) {
                continue;
            }
            h = xxh3_short(p, r.len);
        } else {
            h = xxh3_long(p, r.len, sums);
            if (threadIdx.x != 0) {
                continue;
            }
        }
        if (((u64)out & 7) == 0) {
            out[e] = h;
        } else {
            unsigned char* o = (unsigned char*)out + 8 * (u64)e;
#pragma unroll
            for (int b = 0; b < 8; b++) {
                o[b] = (unsigned char)(h >> (8 * b));
            }
        }
    }
}
