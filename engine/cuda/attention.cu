// Rotary embeddings, the store of new K/V rows into the paged KV cache, and
// attention over the paged KV cache (a prefill chunk under a causal mask, or
// one decode position; grouped-query heads). CPU references:
// engine/src/cuda/reference.rs (`rope`, `kv_store`, `attention`).
//
// The KV cache is a pool of pages, each one kvstrata block in the layer-major
// layout [layer][K|V][token][kv_head][head_dim], f16. A sequence names its
// pages by index in the pool (`pages[pos / block_tokens]`).

// In place on the q and k heads of `rows` rows of [q heads | k heads | ...]
// (f32, `stride` apart), position start + row. `interleaved`: dims (2i, 2i+1)
// rotate together (llama.cpp's GGUF layout); else (i, i + hd/2) (Hugging Face).
// cos/sin: [position][hd/2]. Each product and sum rounded once, as candle's
// CPU rope computes it.
extern "C" __global__ void kvs_rope(float* qkv, u64 stride, const float* cos_t, const float* sin_t, u32 rows,
                                    u32 start, u32 heads, u32 hd, u32 interleaved) {
    const u32 half = hd / 2;
    GRID_LOOP(e, (u64)rows * heads * half) {
        const u64 r = e / ((u64)heads * half);
        const u32 rest = (u32)(e % ((u64)heads * half));
        const u32 h = rest / half, i = rest % half;
        float* v = qkv + r * stride + (u64)h * hd;
        const u64 t = (u64)(start + r) * half + i;
        const float c = cos_t[t], s = sin_t[t];
        const u32 a = interleaved ? 2 * i : i;
        const u32 b = interleaved ? 2 * i + 1 : i + half;
        const float x0 = v[a], x1 = v[b];
        v[a] = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
        v[b] = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
    }
}

// K and V of `rows` rows (f32 columns k_col.. and v_col.. of `qkv`, `row`
// values each = kv_heads * head_dim) into the pages of positions start.., f16.
extern "C" __global__ void kvs_kv_store(const float* qkv, u64 stride, u32 k_col, u32 v_col, u16* pool,
                                        const u32* pages, u64 page_elems, u32 layer, u32 block_tokens, u32 row,
                                        u32 rows, u32 start) {
    GRID_LOOP(e, (u64)rows * row) {
        const u64 r = e / row;
        const u32 j = (u32)(e % row);
        const u32 pos = start + (u32)r;
        const u64 base = (u64)pages[pos / block_tokens] * page_elems +
                         ((u64)layer * 2 * block_tokens + pos % block_tokens) * row + j;
        pool[base] = f32_to_f16(qkv[r * stride + k_col + j]);
        pool[base + (u64)block_tokens * row] = f32_to_f16(qkv[r * stride + v_col + j]);
    }
}

// Attention. Grid (ceil(rows / 32), heads); 256 threads: 32 query rows of one
// head, 8 threads per row, each holding head_dim / 8 dims of q and of the
// output. Keys are read from the pages in tiles of 32 positions (shared
// memory, f16), scored in f32, and folded in with an online softmax (one
// rescale per tile). Row r (position start + r) sees keys 0..=start + r.
// q: f32 rows `q_stride` apart, head h at column h * hd; out: 16-bit rows
// `out_stride` apart, same columns. hd <= 8 * PER.
#define ATT_ROWS 32
#define ATT_TPR 8
#define ATT_KEYS 32

template <int KIND, int PER>
__device__ void attention_impl(const float* __restrict__ q, u64 q_stride, const u16* __restrict__ pool,
                               const u32* __restrict__ pages, u64 page_elems, u32 layer, u32 block_tokens,
                               u32 kv_heads, u32 hd, u32 group, u32 rows, u32 start, float scale,
                               u16* __restrict__ out, u64 out_stride) {
    constexpr int MAXD = PER * ATT_TPR;
    __shared__ u16 ks[ATT_KEYS * MAXD];
    __shared__ u16 vs[ATT_KEYS * MAXD];
    const u32 h = blockIdx.y, kh = h / group;
    const u32 r = threadIdx.x / ATT_TPR, lane = threadIdx.x % ATT_TPR;
    const u32 first = blockIdx.x * ATT_ROWS;
    const u32 last = min(rows, first + ATT_ROWS) - 1;
    const bool valid = first + r < rows;
    const u32 qi = valid ? first + r : last;
    const u32 qpos = start + qi;
    const u32 kend = start + last + 1;
    const u32 row_elems = kv_heads * hd;
    const u32 leader = (threadIdx.x & 31) & ~(ATT_TPR - 1);

    float qv[PER], o[PER];
    const float* qrow = q + (u64)qi * q_stride + (u64)h * hd;
#pragma unroll
    for (int k = 0; k < PER; k++) {
        const u32 d = lane + k * ATT_TPR;
        qv[k] = d < hd ? qrow[d] : 0.0f;
        o[k] = 0.0f;
    }
    float m = -KVS_INF, l = 0.0f;
    for (u32 k0 = 0; k0 < kend; k0 += ATT_KEYS) {
        const u32 nk = min((u32)ATT_KEYS, kend - k0);
        __syncthreads();
        for (u32 e = threadIdx.x; e < nk * hd; e += blockDim.x) {
            const u32 j = e / hd, d = e % hd, kp = k0 + j;
            const u64 base = (u64)pages[kp / block_tokens] * page_elems +
                             ((u64)layer * 2 * block_tokens + kp % block_tokens) * row_elems + (u64)kh * hd + d;
            ks[j * MAXD + d] = pool[base];
            vs[j * MAXD + d] = pool[base + (u64)block_tokens * row_elems];
        }
        __syncthreads();
        float s[ATT_KEYS];
        float tmax = -KVS_INF;
#pragma unroll
        for (int j = 0; j < ATT_KEYS; j++) {
            float dot = 0.0f;
#pragma unroll
            for (int k = 0; k < PER; k++) {
                const u32 d = lane + k * ATT_TPR;
                if (d < hd) dot += qv[k] * f16_to_f32(ks[j * MAXD + d]);
            }
            dot += __shfl_xor_sync(0xffffffffu, dot, 4);
            dot += __shfl_xor_sync(0xffffffffu, dot, 2);
            dot += __shfl_xor_sync(0xffffffffu, dot, 1);
            // Every lane of the row takes the same sum (the butterfly's
            // orders differ per lane).
            dot = __shfl_sync(0xffffffffu, dot, leader);
            const bool seen = (u32)j < nk && k0 + j <= qpos;
            s[j] = seen ? dot * scale : -KVS_INF;
            tmax = fmaxf(tmax, s[j]);
        }
        if (tmax == -KVS_INF) continue;
        const float mnew = fmaxf(m, tmax);
        const float corr = expf(m - mnew);
        l *= corr;
#pragma unroll
        for (int k = 0; k < PER; k++) o[k] *= corr;
#pragma unroll
        for (int j = 0; j < ATT_KEYS; j++) {
            const float p = expf(s[j] - mnew);
            l += p;
#pragma unroll
            for (int k = 0; k < PER; k++) {
                const u32 d = lane + k * ATT_TPR;
                if (d < hd) o[k] += p * f16_to_f32(vs[j * MAXD + d]);
            }
        }
        m = mnew;
    }
    if (valid) {
        u16* dst = out + (u64)qi * out_stride + (u64)h * hd;
#pragma unroll
        for (int k = 0; k < PER; k++) {
            const u32 d = lane + k * ATT_TPR;
            if (d < hd) dst[d] = store16<KIND>(o[k] / l);
        }
    }
}

#define ATTENTION_ENTRY(name, KIND, PER)                                                                          \
    extern "C" __global__ void __launch_bounds__(256) name(                                                       \
        const float* q, u64 q_stride, const u16* pool, const u32* pages, u64 page_elems, u32 layer,               \
        u32 block_tokens, u32 kv_heads, u32 hd, u32 group, u32 rows, u32 start, float scale, u16* out,            \
        u64 out_stride) {                                                                                         \
        attention_impl<KIND, PER>(q, q_stride, pool, pages, page_elems, layer, block_tokens, kv_heads, hd, group, \
                                  rows, start, scale, out, out_stride);                                           \
    }

ATTENTION_ENTRY(kvs_attention_bf16_d64, KIND_BF16, 8)
ATTENTION_ENTRY(kvs_attention_bf16_d128, KIND_BF16, 16)
ATTENTION_ENTRY(kvs_attention_f16_d64, KIND_F16, 8)
ATTENTION_ENTRY(kvs_attention_f16_d128, KIND_F16, 16)

// Attention on the tensor cores (mma.sync m16n8k16, f16 inputs, f32
// accumulators), for head dims 32, 64 and 128: the prompt path. Grid
// (ceil(rows / 64), heads); 128 threads = 4 warps of 16 query rows each. Keys
// and values come from the pages in tiles of 64 positions (K as [key][dim] and
// V transposed as [dim][key] in shared memory, f16); per tile a warp computes
// its 16 x 64 scores (f32), applies the causal mask and the scale, folds them
// into an online softmax, rounds the probabilities to f16 and multiplies them
// with V. q is rounded to f16 on the way into the tensor cores. Fragment
// layouts are PTX's for m16n8k16 (row-major A, column-major B): in a warp,
// lane = 4 g + t; A rows g and g + 8, columns 2t, 2t + 1 (+ 8); B columns
// (keys or dims) g, rows 2t, 2t + 1 (+ 8); C rows g and g + 8, columns 2t, 2t + 1.
// A row's result depends only on its own q and keys, never on the other rows of
// its CTA: a tile past a row's position adds exactly nothing.

#define MMA_ROWS 64
#define MMA_KEYS 64
#define MMA_PAD 8

__device__ __forceinline__ void mma_16816(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 pack_f16(float lo, float hi) {
    return (u32)f32_to_f16(lo) | ((u32)f32_to_f16(hi) << 16);
}

template <int KIND, int HD>
__device__ void attention_mma_impl(const float* __restrict__ q, u64 q_stride, const u16* __restrict__ pool,
                                   const u32* __restrict__ pages, u64 page_elems, u32 layer, u32 block_tokens,
                                   u32 kv_heads, u32 group, u32 rows, u32 start, float scale,
                                   u16* __restrict__ out, u64 out_stride) {
    constexpr int KSTEPS = HD / 16;
    constexpr int DTILES = HD / 8;
    constexpr int NTILES = MMA_KEYS / 8;
    __shared__ __align__(16) u16 ks[MMA_KEYS][HD + MMA_PAD];
    __shared__ __align__(16) u16 vt[HD][MMA_KEYS + MMA_PAD];
    const u32 h = blockIdx.y, kh = h / group;
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u32 g = lane >> 2, t = lane & 3;
    const u32 first = blockIdx.x * MMA_ROWS;
    const u32 last = min(rows, first + MMA_ROWS) - 1;
    const u32 kend = start + last + 1;
    const u32 row_elems = kv_heads * HD;
    const u32 r0 = first + warp * 16 + g, r1 = r0 + 8;
    const u32 qi0 = min(r0, last), qi1 = min(r1, last);
    const u32 qpos0 = start + qi0, qpos1 = start + qi1;

    u32 qa[KSTEPS][4];
    {
        const float* q0 = q + (u64)qi0 * q_stride + (u64)h * HD;
        const float* q1 = q + (u64)qi1 * q_stride + (u64)h * HD;
#pragma unroll
        for (int s = 0; s < KSTEPS; s++) {
            const int c = s * 16 + 2 * t;
            qa[s][0] = pack_f16(q0[c], q0[c + 1]);
            qa[s][1] = pack_f16(q1[c], q1[c + 1]);
            qa[s][2] = pack_f16(q0[c + 8], q0[c + 9]);
            qa[s][3] = pack_f16(q1[c + 8], q1[c + 9]);
        }
    }
    float o[DTILES][4];
#pragma unroll
    for (int d = 0; d < DTILES; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
    float m0 = -KVS_INF, m1 = -KVS_INF, l0 = 0.0f, l1 = 0.0f;

    for (u32 k0 = 0; k0 < kend; k0 += MMA_KEYS) {
        __syncthreads();
        for (u32 e = threadIdx.x; e < MMA_KEYS * HD / 2; e += blockDim.x) {
            const u32 j = e / (HD / 2), d = (e % (HD / 2)) * 2, kp = k0 + j;
            u32 kw = 0, vw = 0;
            if (kp < kend) {
                const u64 base = (u64)pages[kp / block_tokens] * page_elems +
                                 ((u64)layer * 2 * block_tokens + kp % block_tokens) * row_elems +
                                 (u64)kh * HD + d;
                kw = *(const u32*)(pool + base);
                vw = *(const u32*)(pool + base + (u64)block_tokens * row_elems);
            }
            *(u32*)&ks[j][d] = kw;
            vt[d][j] = (u16)(vw & 0xffffu);
            vt[d + 1][j] = (u16)(vw >> 16);
        }
        __syncthreads();
        float sc[NTILES][4];
#pragma unroll
        for (int n = 0; n < NTILES; n++) {
            sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.0f;
#pragma unroll
            for (int s = 0; s < KSTEPS; s++) {
                const u16* krow = &ks[n * 8 + g][s * 16 + 2 * t];
                mma_16816(sc[n], qa[s], *(const u32*)krow, *(const u32*)(krow + 8));
            }
        }
        float mx0 = -KVS_INF, mx1 = -KVS_INF;
#pragma unroll
        for (int n = 0; n < NTILES; n++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const u32 key = k0 + n * 8 + 2 * t + (i & 1);
                const u32 qp = i < 2 ? qpos0 : qpos1;
                sc[n][i] = key <= qp ? sc[n][i] * scale : -KVS_INF;
            }
            mx0 = fmaxf(mx0, fmaxf(sc[n][0], sc[n][1]));
            mx1 = fmaxf(mx1, fmaxf(sc[n][2], sc[n][3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
        // A row that has seen no key yet keeps everything at zero.
        const float b0 = n0 == -KVS_INF ? 0.0f : n0, b1 = n1 == -KVS_INF ? 0.0f : n1;
        const float c0 = expf(m0 - b0), c1 = expf(m1 - b1);
        l0 *= c0;
        l1 *= c1;
#pragma unroll
        for (int d = 0; d < DTILES; d++) {
            o[d][0] *= c0;
            o[d][1] *= c0;
            o[d][2] *= c1;
            o[d][3] *= c1;
        }
#pragma unroll
        for (int n = 0; n < NTILES; n++) {
            sc[n][0] = expf(sc[n][0] - b0);
            sc[n][1] = expf(sc[n][1] - b0);
            sc[n][2] = expf(sc[n][2] - b1);
            sc[n][3] = expf(sc[n][3] - b1);
            l0 += sc[n][0] + sc[n][1];
            l1 += sc[n][2] + sc[n][3];
        }
#pragma unroll
        for (int kc = 0; kc < MMA_KEYS / 16; kc++) {
            u32 pa[4];
            pa[0] = pack_f16(sc[2 * kc][0], sc[2 * kc][1]);
            pa[1] = pack_f16(sc[2 * kc][2], sc[2 * kc][3]);
            pa[2] = pack_f16(sc[2 * kc + 1][0], sc[2 * kc + 1][1]);
            pa[3] = pack_f16(sc[2 * kc + 1][2], sc[2 * kc + 1][3]);
#pragma unroll
            for (int d = 0; d < DTILES; d++) {
                const u16* vrow = &vt[d * 8 + g][kc * 16 + 2 * t];
                mma_16816(o[d], pa, *(const u32*)vrow, *(const u32*)(vrow + 8));
            }
        }
        m0 = n0;
        m1 = n1;
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
#pragma unroll
    for (int d = 0; d < DTILES; d++) {
        const u32 c = h * HD + d * 8 + 2 * t;
        if (r0 < rows) {
            u16* dst = out + (u64)r0 * out_stride + c;
            dst[0] = store16<KIND>(o[d][0] / l0);
            dst[1] = store16<KIND>(o[d][1] / l0);
        }
        if (r1 < rows) {
            u16* dst = out + (u64)r1 * out_stride + c;
            dst[0] = store16<KIND>(o[d][2] / l1);
            dst[1] = store16<KIND>(o[d][3] / l1);
        }
    }
}

#define ATTENTION_MMA_ENTRY(name, KIND, HD)                                                                           \
    extern "C" __global__ void __launch_bounds__(128) name(                                                           \
        const float* q, u64 q_stride, const u16* pool, const u32* pages, u64 page_elems, u32 layer,                   \
        u32 block_tokens, u32 kv_heads, u32 hd, u32 group, u32 rows, u32 start, float scale, u16* out,                \
        u64 out_stride) {                                                                                             \
        attention_mma_impl<KIND, HD>(q, q_stride, pool, pages, page_elems, layer, block_tokens, kv_heads, group, rows, \
                                     start, scale, out, out_stride);                                                  \
    }

ATTENTION_MMA_ENTRY(kvs_attention_mma_bf16_d32, KIND_BF16, 32)
ATTENTION_MMA_ENTRY(kvs_attention_mma_bf16_d64, KIND_BF16, 64)
ATTENTION_MMA_ENTRY(kvs_attention_mma_bf16_d128, KIND_BF16, 128)
ATTENTION_MMA_ENTRY(kvs_attention_mma_f16_d32, KIND_F16, 32)
ATTENTION_MMA_ENTRY(kvs_attention_mma_f16_d64, KIND_F16, 64)
ATTENTION_MMA_ENTRY(kvs_attention_mma_f16_d128, KIND_F16, 128)
