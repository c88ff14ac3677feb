// Gather and scatter between an engine's paged KV cache and kvstrata's
// layer-major blocks ([layer][K|V][token][kv_head][head_dim]).
//
// The engine's memory is addressed by strides, so one kernel serves every
// layout the engines use:
//   per-layer tensors [num_pages, 2, page_tokens, heads, dim] (one tensor per
//   layer, `layer_stride` apart): page_stride = 2 * chunk, kv_stride = chunk;
//   per-layer tensors [2, num_pages, page_tokens, heads, dim] (vLLM's K of
//   every page, then V of every page): page_stride = chunk,
//   kv_stride = num_pages * chunk;
//   cross-layer pages [num_pages, layers, 2, page_tokens, heads, dim]:
//   layer_stride = 2 * chunk, page_stride = layers * 2 * chunk, kv_stride = chunk.
// The host checks that no two chunks overlap (PagedGeometry::validate).
// A chunk is the page_tokens * heads * dim * dtype bytes of one (layer, K|V,
// page): contiguous on both sides. A block is `ppb` pages; work item w names
// (block b, layer l, K|V k, page j of the block):
//   engine offset = l * layer_stride + page_ids[b * ppb + j] * page_stride + k * kv_stride
//   block offset  = ((l * 2 + k) * ppb + j) * chunk
// One warp copies one chunk at a time (grid-stride over the work items): a
// chunk is small (384 bytes for one token of the default model, 6 KiB for 16),
// so warps rather than whole CTAs keep every lane busy. Chunks of at most 32
// 16-byte words (`small16`, checked by the host) go eight to a warp
// iteration, each lane loading its word of all eight before storing any, with
// the addresses of 32 chunks worked out at once, one per lane, so that short
// chunks (one-token pages) keep enough loads in flight and the index
// arithmetic does not dominate.
//
// CPU references: kvstrata_kernels::reference::{gather, scatter}.

struct KvsPaged {
    u64 engine;        // base address of the engine's region
    u64 layer_stride;  // bytes
    u64 page_stride;   // bytes
    u64 kv_stride;     // bytes from a page's K chunk to its V chunk
    u64 chunk;         // bytes of one (layer, K|V, page) run
    u32 layers;
    u32 ppb;           // pages per block
    u32 n_blocks;
    u32 small16;       // 1: chunk <= 512 bytes and every address 16-byte aligned
};

__device__ __forceinline__ void paged_item(const KvsPaged& p, u64 w, const u32* __restrict__ page_ids,
                                           const u64* __restrict__ blocks, u64* engine_off, u64* block_addr) {
    const u64 j = w % p.ppb;
    u64 rest = w / p.ppb;
    const u64 k = rest & 1;
    rest >>= 1;
    const u64 l = rest % p.layers;
    const u64 b = rest / p.layers;
    const u64 page = page_ids[b * p.ppb + j];
    *engine_off = l * p.layer_stride + page * p.page_stride + k * p.kv_stride;
    *block_addr = blocks[b] + ((l * 2 + k) * p.ppb + j) * p.chunk;
}

// Short chunks (one-token pages), lane = 16-byte word. Each warp takes 32
// consecutive work items at a time: lane i works out the addresses of item i
// (the index arithmetic, with its 64-bit divisions, runs once per item rather
// than once per lane per item), then the warp copies the 32 chunks eight at a
// time, every lane loading its word of all eight before storing any, the
// addresses passed round with shuffles. `gather` picks the direction.
#define PAGED_SMALL_BATCH 8

__device__ __forceinline__ void paged_small16(const KvsPaged& p, const u32* __restrict__ page_ids,
                                              const u64* __restrict__ blocks, bool gather) {
    const u64 items = (u64)p.n_blocks * p.layers * 2 * p.ppb;
    const u64 warps = (u64)gridDim.x * (blockDim.x / 32);
    const u32 lane = threadIdx.x % 32;
    const u64 words = p.chunk >> 4;
    for (u64 base = ((u64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32) * 32; base < items;
         base += 32 * warps) {
        // This lane's item: its source and destination.
        u64 my_src = 0, my_dst = 0;
        const u64 mine = base + lane;
        if (mine < items) {
            u64 off = 0, addr = 0;
            paged_item(p, mine, page_ids, blocks, &off, &addr);
            const u64 engine = p.engine + off;
            my_src = gather ? engine : addr;
            my_dst = gather ? addr : engine;
        }
        const u32 n = (u32)min((u64)32, items - base);  // uniform across the warp
        for (u32 g = 0; g < n; g += PAGED_SMALL_BATCH) {
            const uint4* src[PAGED_SMALL_BATCH];
            uint4* dst[PAGED_SMALL_BATCH];
#pragma unroll
            for (int i = 0; i < PAGED_SMALL_BATCH; i++) {
                src[i] = (const uint4*)__shfl_sync(0xffffffffu, my_src, (g + i) & 31);
                dst[i] = (uint4*)__shfl_sync(0xffffffffu, my_dst, (g + i) & 31);
            }
            uint4 v[PAGED_SMALL_BATCH];
#pragma unroll
            for (int i = 0; i < PAGED_SMALL_BATCH; i++) {
                if (g + i < n && lane < words) {
                    v[i] = src[i][lane];
                }
            }
#pragma unroll
            for (int i = 0; i < PAGED_SMALL_BATCH; i++) {
                if (g + i < n && lane < words) {
                    dst[i][lane] = v[i];
                }
            }
        }
    }
}

extern "C" __global__ void kvs_gather(const KvsPaged p, const u32* __restrict__ page_ids,
                                      const u64* __restrict__ blocks) {
    if (p.small16) {
        paged_small16(p, page_ids, blocks, true);
        return;
    }
    const u64 items = (u64)p.n_blocks * p.layers * 2 * p.ppb;
    const u64 warps = (u64)gridDim.x * (blockDim.x / 32);
    const u64 lane = threadIdx.x % 32;
    for (u64 w = (u64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; w < items; w += warps) {
        u64 off, dst;
        paged_item(p, w, page_ids, blocks, &off, &dst);
        copy_run((const char*)(p.engine + off), (char*)dst, p.chunk, lane, 32);
    }
}

extern "C" __global__ void kvs_scatter(const KvsPaged p, const u32* __restrict__ page_ids,
                                       const u64* __restrict__ blocks) {
    if (p.small16) {
        paged_small16(p, page_ids, blocks, false);
        return;
    }
    const u64 items = (u64)p.n_blocks * p.layers * 2 * p.ppb;
    const u64 warps = (u64)gridDim.x * (blockDim.x / 32);
    const u64 lane = threadIdx.x % 32;
    for (u64 w = (u64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; w < items; w += warps) {
        u64 off, src;
        paged_item(p, w, page_ids, blocks, &off, &src);
        copy_run((const char*)src, (char*)(p.engine + off), p.chunk, lane, 32);
    }
}
