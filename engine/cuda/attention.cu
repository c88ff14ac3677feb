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

// Flash attention on the tensor cores with fixed key spans (the engine's
// default for head dims 32, 64 and 128). CPU reference:
// engine/src/cuda/reference.rs (`attention_spans`).
//
// Keys are cut into spans of `span` positions at absolute boundaries (0, span,
// 2 span, ...; a multiple of 64). Each span of a query row gets its own
// online-softmax partial (m: running max of the scores in log2 units, l: sum of
// 2^(s - m), o: sum of 2^(s - m) v), and the partials are folded in span order
// by `fold_step`: M' = max(M, m), L' = L 2^(M - M') + l 2^(m - M'), O' likewise,
// out = O / L. Either one CTA walks all spans of its rows and folds as it goes
// (`split` = 0: long prompt chunks), or each CTA takes one span (grid z) and
// writes its partials to `part`, and `kvs_attention_combine_*` folds them
// (`split` = 1: decode steps and short chunks, so that a single query row still
// fills the GPU). Both run the same float operations in the same order, every
// rounding explicit (no contraction), so a row's result depends only on its q
// and its keys: never on the rows beside it in the launch, where the chunk
// starts, or which of the two ways ran. Spans past a row's position are not
// folded; a 64-key tile past a row's position adds exactly nothing (its
// probabilities are 0 and the rescale is skipped, not multiplied by 2^0).
//
// Grid (ceil(rows / (128 / group)), kv_heads, split ? spans : 1), 256 threads =
// 8 warps of 16 "M rows"; M row i of a CTA is query row first + i / group of
// head kv_head * group + i % group, so the heads of a group share each K/V tile
// the CTA loads. Tiles of 64 keys come from the pages by cp.async (16 bytes,
// zero-filled past the keys in range) into shared memory as [key][dim]; V of a
// tile loads while the scores of its K are computed, the next K while the
// probabilities multiply V. Scores S = Q K^T by mma.sync m16n8k16 (f16 in, f32
// accumulate) with K fragments from ldmatrix; O += P V with V fragments from
// ldmatrix.trans. q is multiplied by scale * log2(e) and rounded to f16 once;
// probabilities 2^(s - m) (ex2.approx) are rounded to f16 for the product, their
// sum l stays f32. A warp skips a tile past all of its rows' positions.
// part: [rows][heads][spans][head_dim] of o, then [rows][heads][spans][2] of
// (m, l), f32. Dynamic shared memory: STAGES (1, or 2 for `_flash2_`) K and V
// tiles (2 x 64 x (head_dim + 8) f16 each) and the running fold (head_dim / 2
// f32 per thread), FLASH_SMEM bytes.
#define FLASH_SMEM(HD, STAGES) ((STAGES) * 2 * 64 * ((HD) + 8) * 2 + (HD) / 2 * 256 * 4)

#define FA_WARPS 8
#define FA_MROWS (FA_WARPS * 16)
#define FA_KEYS 64
#define FA_PAD 8

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

__device__ __forceinline__ void cp_async16(u32 dst, const void* src, u32 bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ void ldsm_x4(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

__device__ __forceinline__ void ldsm_x4_trans(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// 2^x (ex2.approx: 2^-inf = +0).
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Two f32 -> f16 (round to nearest even), lo in the low half.
__device__ __forceinline__ u32 pack2_f16(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// One step of the span fold: (M, L) takes span partial (m, l); a and b are
// the factors for the running and the new o.
__device__ __forceinline__ void fold_step(float& M, float& L, float m, float l, float& a, float& b) {
    const float mn = fmaxf(M, m);
    a = ex2(__fsub_rn(M, mn));
    b = ex2(__fsub_rn(m, mn));
    L = __fadd_rn(__fmul_rn(L, a), __fmul_rn(l, b));
    M = mn;
}

__device__ __forceinline__ float fold_value(float O, float o, float a, float b) {
    return __fadd_rn(__fmul_rn(O, a), __fmul_rn(o, b));
}

template <int KIND, int HD, int STAGES>
__device__ void flash_impl(const float* __restrict__ q, u64 q_stride, const u16* __restrict__ pool,
                           const u32* __restrict__ pages, u64 page_elems, u32 layer, u32 block_tokens,
                           u32 kv_heads, u32 group, u32 rows, u32 start, float scale_log2, u32 span, u32 split,
                           u32 nspans, float* __restrict__ part, u16* __restrict__ out, u64 out_stride) {
    constexpr int KSTEPS = HD / 16;
    constexpr int DTILES = HD / 8;
    constexpr int NTILES = FA_KEYS / 8;
    constexpr int LD = HD + FA_PAD;
    constexpr int CHUNKS = FA_KEYS * HD / 8;
    // STAGES buffers of [K tile][V tile], then the fold of the spans before
    // the current one (unless split), one column per thread: O[d][i] at
    // Of[(d * 4 + i) * 256].
    extern __shared__ __align__(16) u16 fa_smem[];
    constexpr u32 STAGE_BYTES = 2 * FA_KEYS * LD * 2;
    float* Of = (float*)(fa_smem + STAGES * 2 * FA_KEYS * LD) + threadIdx.x;
    const u32 kh = blockIdx.y;
    const u32 heads = kv_heads * group;
    const u32 per = FA_MROWS / group;
    // The CTAs of the latest rows (the most keys) first.
    const u32 first = (gridDim.x - 1 - blockIdx.x) * per;
    const u32 last = min(rows, first + per) - 1;
    const u32 kend = start + last + 1;
    const u32 row_elems = kv_heads * HD;
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u32 g = lane >> 2, t = lane & 3;

    u32 kbegin = 0, kstop = kend;
    if (split) {
        kbegin = blockIdx.z * span;
        if (kbegin >= kend) return;
        kstop = min(kbegin + span, kend);
    }

    // This thread's two M rows (g and g + 8 of its warp).
    u32 row[2], hq[2], qpos[2];
    bool valid[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const u32 mr = warp * 16 + g + 8 * i;
        const u32 lp = mr / group;
        row[i] = first + lp;
        valid[i] = lp < per && row[i] < rows;
        hq[i] = kh * group + mr % group;
        qpos[i] = valid[i] ? start + row[i] : start + first;
    }
    const bool active = __any_sync(0xffffffffu, valid[0] || valid[1]);
    const u32 wmax = __reduce_max_sync(0xffffffffu, max(valid[0] ? qpos[0] : 0u, valid[1] ? qpos[1] : 0u));

    u32 qa[KSTEPS][4];
    {
        const float* q0 = q + (u64)(valid[0] ? row[0] : 0) * q_stride + (u64)hq[0] * HD;
        const float* q1 = q + (u64)(valid[1] ? row[1] : 0) * q_stride + (u64)hq[1] * HD;
#pragma unroll
        for (int s = 0; s < KSTEPS; s++) {
            const int c = s * 16 + 2 * t;
            if (valid[0]) {
                qa[s][0] = pack2_f16(q0[c] * scale_log2, q0[c + 1] * scale_log2);
                qa[s][2] = pack2_f16(q0[c + 8] * scale_log2, q0[c + 9] * scale_log2);
            } else {
                qa[s][0] = qa[s][2] = 0;
            }
            if (valid[1]) {
                qa[s][1] = pack2_f16(q1[c] * scale_log2, q1[c + 1] * scale_log2);
                qa[s][3] = pack2_f16(q1[c + 8] * scale_log2, q1[c + 9] * scale_log2);
            } else {
                qa[s][1] = qa[s][3] = 0;
            }
        }
    }

    // The span being computed (o, m, l) and, unless split, the fold of the
    // spans before it (O in shared memory, M, L).
    float o[DTILES][4];
#pragma unroll
    for (int d = 0; d < DTILES; d++) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            o[d][i] = 0.0f;
            if (!split) Of[(d * 4 + i) * FA_WARPS * 32] = 0.0f;
        }
    }
    float m[2] = {-KVS_INF, -KVS_INF}, l[2] = {0.0f, 0.0f};
    float M[2] = {-KVS_INF, -KVS_INF}, L[2] = {0.0f, 0.0f};

    const u32 smem_base = smem_addr(fa_smem);
    const u64 kv_off = (u64)kh * HD;
    auto load = [&](u32 base, u32 k0, u32 which) {
#pragma unroll
        for (int i = 0; i < CHUNKS / (FA_WARPS * 32); i++) {
            const u32 c = threadIdx.x + i * (FA_WARPS * 32);
            const u32 j = c / (HD / 8), col = (c % (HD / 8)) * 8, kp = k0 + j;
            const u16* src = pool;
            u32 bytes = 0;
            if (kp < kstop) {
                src = pool + (u64)pages[kp / block_tokens] * page_elems +
                      ((u64)layer * 2 * block_tokens + which * block_tokens + kp % block_tokens) * row_elems + kv_off +
                      col;
                bytes = 16;
            }
            cp_async16(base + (j * LD + col) * 2, src, bytes);
        }
    };

    // One stage: V(j) loads while QK(j) runs, K(j + 1) while softmax and PV(j)
    // run. Two stages: K and V of tile j + 1 load while tile j is computed.
    load(smem_base, kbegin, 0);
    if (STAGES == 2) load(smem_base + FA_KEYS * LD * 2, kbegin, 1);
    cp_async_commit();
    u32 stage = 0;
    for (u32 k0 = kbegin; k0 < kstop; k0 += FA_KEYS) {
        const u32 ks_base = smem_base + stage * STAGE_BYTES;
        const u32 vs_base = ks_base + FA_KEYS * LD * 2;
        cp_async_wait_all();
        __syncthreads();
        if (STAGES == 2) {
            if (k0 + FA_KEYS < kstop) {
                const u32 other = smem_base + (stage ^ 1) * STAGE_BYTES;
                load(other, k0 + FA_KEYS, 0);
                load(other + FA_KEYS * LD * 2, k0 + FA_KEYS, 1);
                cp_async_commit();
            }
            stage ^= 1;
        } else {
            load(vs_base, k0, 1);
            cp_async_commit();
        }
        const bool work = active && k0 <= wmax;
        float sc[NTILES][4];
        if (work) {
#pragma unroll
            for (int n = 0; n < NTILES; n++) {
                sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.0f;
#pragma unroll
                for (int s = 0; s < KSTEPS; s += 2) {
                    u32 b[4];
                    ldsm_x4(b, ks_base + ((n * 8 + (lane & 7)) * LD + s * 16 + (lane >> 3) * 8) * 2);
                    mma_16816(sc[n], qa[s], b[0], b[1]);
                    mma_16816(sc[n], qa[s + 1], b[2], b[3]);
                }
            }
        }
        if (STAGES == 1) {
            cp_async_wait_all();
            __syncthreads();
            if (k0 + FA_KEYS < kstop) {
                load(ks_base, k0 + FA_KEYS, 0);
                cp_async_commit();
            }
        }
        if (work) {
            float mx[2] = {-KVS_INF, -KVS_INF};
#pragma unroll
            for (int n = 0; n < NTILES; n++) {
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const u32 key = k0 + n * 8 + 2 * t + (i & 1);
                    sc[n][i] = key <= qpos[i >> 1] ? sc[n][i] : -KVS_INF;
                    mx[i >> 1] = fmaxf(mx[i >> 1], sc[n][i]);
                }
            }
            float base[2], corr[2];
#pragma unroll
            for (int r = 0; r < 2; r++) {
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
                const float nm = fmaxf(m[r], mx[r]);
                // No key yet: everything stays zero. No new maximum: no rescale.
                base[r] = nm == -KVS_INF ? 0.0f : nm;
                corr[r] = nm == m[r] ? 1.0f : ex2(__fsub_rn(m[r], base[r]));
                l[r] = __fmul_rn(l[r], corr[r]);
                m[r] = nm;
            }
#pragma unroll
            for (int d = 0; d < DTILES; d++) {
                o[d][0] = __fmul_rn(o[d][0], corr[0]);
                o[d][1] = __fmul_rn(o[d][1], corr[0]);
                o[d][2] = __fmul_rn(o[d][2], corr[1]);
                o[d][3] = __fmul_rn(o[d][3], corr[1]);
            }
#pragma unroll
            for (int n = 0; n < NTILES; n++) {
#pragma unroll
                for (int i = 0; i < 4; i++) sc[n][i] = ex2(__fsub_rn(sc[n][i], base[i >> 1]));
                l[0] = __fadd_rn(l[0], __fadd_rn(sc[n][0], sc[n][1]));
                l[1] = __fadd_rn(l[1], __fadd_rn(sc[n][2], sc[n][3]));
            }
#pragma unroll
            for (int kc = 0; kc < FA_KEYS / 16; kc++) {
                u32 pa[4];
                pa[0] = pack2_f16(sc[2 * kc][0], sc[2 * kc][1]);
                pa[1] = pack2_f16(sc[2 * kc][2], sc[2 * kc][3]);
                pa[2] = pack2_f16(sc[2 * kc + 1][0], sc[2 * kc + 1][1]);
                pa[3] = pack2_f16(sc[2 * kc + 1][2], sc[2 * kc + 1][3]);
#pragma unroll
                for (int d = 0; d < DTILES; d += 2) {
                    u32 b[4];
                    ldsm_x4_trans(b, vs_base + ((kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD +
                                                (d + (lane >> 4)) * 8) *
                                                   2);
                    mma_16816(o[d], pa, b[0], b[1]);
                    mma_16816(o[d + 1], pa, b[2], b[3]);
                }
            }
        }
        const u32 next = k0 + FA_KEYS;
        if (next % span == 0 || next >= kstop) {
            // The span ends: its sums over the row's four lanes.
            const u32 span_start = k0 / span * span;
            float ls[2];
#pragma unroll
            for (int r = 0; r < 2; r++) {
                ls[r] = __fadd_rn(l[r], __shfl_xor_sync(0xffffffffu, l[r], 1));
                ls[r] = __fadd_rn(ls[r], __shfl_xor_sync(0xffffffffu, ls[r], 2));
            }
            if (split) {
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    if (!valid[r] || span_start > qpos[r]) continue;
                    const u64 at = ((u64)row[r] * heads + hq[r]) * nspans + blockIdx.z;
                    float* po = part + at * HD + 2 * t;
#pragma unroll
                    for (int d = 0; d < DTILES; d++) {
                        po[d * 8] = o[d][2 * r];
                        po[d * 8 + 1] = o[d][2 * r + 1];
                    }
                    if (t == 0) {
                        float* ml = part + (u64)rows * heads * nspans * HD + at * 2;
                        ml[0] = m[r];
                        ml[1] = ls[r];
                    }
                }
            } else {
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    if (span_start > qpos[r]) continue;
                    float a, b;
                    fold_step(M[r], L[r], m[r], ls[r], a, b);
#pragma unroll
                    for (int d = 0; d < DTILES; d++) {
#pragma unroll
                        for (int e = 0; e < 2; e++) {
                            float* x = Of + (d * 4 + 2 * r + e) * FA_WARPS * 32;
                            *x = fold_value(*x, o[d][2 * r + e], a, b);
                        }
                    }
                }
#pragma unroll
                for (int d = 0; d < DTILES; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
                m[0] = m[1] = -KVS_INF;
                l[0] = l[1] = 0.0f;
            }
        }
    }
    if (split) return;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (!valid[r]) continue;
        u16* dst = out + (u64)row[r] * out_stride + (u64)hq[r] * HD + 2 * t;
#pragma unroll
        for (int d = 0; d < DTILES; d++) {
            dst[d * 8] = store16<KIND>(__fdiv_rn(Of[(d * 4 + 2 * r) * FA_WARPS * 32], L[r]));
            dst[d * 8 + 1] = store16<KIND>(__fdiv_rn(Of[(d * 4 + 2 * r + 1) * FA_WARPS * 32], L[r]));
        }
    }
}

#define FLASH_ENTRY(name, KIND, HD, STAGES)                                                                             \
    extern "C" __global__ void __launch_bounds__(FA_WARPS * 32, 1)                                                \
        name(const float* q, u64 q_stride, const u16* pool, const u32* pages, u64 page_elems, u32 layer,          \
             u32 block_tokens, u32 kv_heads, u32 group, u32 rows, u32 start, float scale_log2, u32 span,          \
             u32 split, u32 nspans, float* part, u16* out, u64 out_stride) {                                     \
        flash_impl<KIND, HD, STAGES>(q, q_stride, pool, pages, page_elems, layer, block_tokens, kv_heads, group, rows,    \
                             start, scale_log2, span, split, nspans, part, out, out_stride);                     \
    }

FLASH_ENTRY(kvs_attention_flash_bf16_d32, KIND_BF16, 32, 1)
FLASH_ENTRY(kvs_attention_flash_bf16_d64, KIND_BF16, 64, 1)
FLASH_ENTRY(kvs_attention_flash_bf16_d128, KIND_BF16, 128, 1)
FLASH_ENTRY(kvs_attention_flash_f16_d32, KIND_F16, 32, 1)
FLASH_ENTRY(kvs_attention_flash_f16_d64, KIND_F16, 64, 1)
FLASH_ENTRY(kvs_attention_flash_f16_d128, KIND_F16, 128, 1)
// Two stages of K/V tiles (KVSTRATA_GPU_ATTENTION=flash2): same results.
FLASH_ENTRY(kvs_attention_flash2_bf16_d32, KIND_BF16, 32, 2)
FLASH_ENTRY(kvs_attention_flash2_bf16_d64, KIND_BF16, 64, 2)
FLASH_ENTRY(kvs_attention_flash2_bf16_d128, KIND_BF16, 128, 2)
FLASH_ENTRY(kvs_attention_flash2_f16_d32, KIND_F16, 32, 2)
FLASH_ENTRY(kvs_attention_flash2_f16_d64, KIND_F16, 64, 2)
FLASH_ENTRY(kvs_attention_flash2_f16_d128, KIND_F16, 128, 2)

// The fold of the span partials `kvs_attention_flash_*` wrote with split = 1:
// grid (rows, heads), head_dim threads, one output value each. Spans
// 0..=position / span of each row, in order, with the same `fold_step` as the
// CTA that walks its spans.
template <int KIND>
__device__ void combine_impl(const float* __restrict__ part, u32 rows, u32 heads, u32 hd, u32 start, u32 span,
                             u32 nspans, u16* __restrict__ out, u64 out_stride) {
    const u32 r = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
    const u32 spans = (start + r) / span + 1;
    const u64 at = ((u64)r * heads + h) * nspans;
    const float* ml = part + (u64)rows * heads * nspans * hd + at * 2;
    const float* po = part + at * hd + d;
    float M = -KVS_INF, L = 0.0f, O = 0.0f;
    for (u32 z = 0; z < spans; z++) {
        float a, b;
        fold_step(M, L, ml[2 * z], ml[2 * z + 1], a, b);
        O = fold_value(O, po[(u64)z * hd], a, b);
    }
    out[(u64)r * out_stride + (u64)h * hd + d] = store16<KIND>(__fdiv_rn(O, L));
}

extern "C" __global__ void kvs_attention_combine_bf16(const float* part, u32 rows, u32 heads, u32 hd, u32 start,
                                                      u32 span, u32 nspans, u16* out, u64 out_stride) {
    combine_impl<KIND_BF16>(part, rows, heads, hd, start, span, nspans, out, out_stride);
}

extern "C" __global__ void kvs_attention_combine_f16(const float* part, u32 rows, u32 heads, u32 hd, u32 start,
                                                     u32 span, u32 nspans, u16* out, u64 out_stride) {
    combine_impl<KIND_F16>(part, rows, heads, hd, start, span, nspans, out, out_stride);
}
