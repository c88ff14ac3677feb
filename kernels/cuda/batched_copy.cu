// Batched block copy: many (src, dst, len) runs in one launch, read from a
// pointer table. Sources and destinations may be device memory or mapped
// pinned host memory (any address the device can reach). CTAs take table
// entries in a grid-stride loop; the host splits long runs into pieces so one
// large block spreads over many CTAs.
//
// CPU reference: kvstrata_kernels::reference::batched_copy.

struct KvsCopy {
    u64 src;
    u64 dst;
    u64 len;
};

extern "C" __global__ void kvs_batched_copy(const KvsCopy* __restrict__ table, u32 n) {
    for (u32 e = blockIdx.x; e < n; e += gridDim.x) {
        const KvsCopy c = table[e];
        copy_run((const char*)c.src, (char*)c.dst, c.len, threadIdx.x, blockDim.x);
    }
}
