// cache_ops.cu: writing new K/V into the paged cache, and block copies (copy-on-write, swap).
//
// Layout (docs/ARCHITECTURE.md): per layer kv[2, num_blocks, num_kv_heads, block_size, head_dim].
// One block of one plane (K or V) is num_kv_heads * block_size * head_dim CONTIGUOUS elements,
// which is what copy_blocks moves as a unit.

#include "pagedserve_common.cuh"

// ---- reshape_and_cache -------------------------------------------------------------------------
// grid = (T), block = 128. CTA t copies token t's K and V rows for all KV heads.
//   slot = slot_mapping[t]            (-1 or any negative: padding token, skip)
//   blk  = slot / block_size, off = slot % block_size
//   K row (kvh) -> kv[0, blk, kvh, off, :] = element ((blk * Hkv + kvh) * block_size + off) * D
//   V row (kvh) -> the same + num_blocks * Hkv * block_size * D   (plane 1)
// Each thread moves 16-byte vectors; key/value may be strided views ([T, Hkv, D] with the last
// dim contiguous, e.g. slices of a fused QKV projection).
template <typename S>
__device__ __forceinline__ void reshape_and_cache_impl(
    const S* __restrict__ key, const S* __restrict__ value,
    long long k_stride_t, long long k_stride_h, long long v_stride_t, long long v_stride_h,
    S* __restrict__ kv, const long long* __restrict__ slot_mapping, long long num_blocks,
    int num_kv_heads, int head_dim, int block_size) {
    constexpr int VEC = 16 / (int)sizeof(S);
    const long long t = blockIdx.x;
    const long long slot = slot_mapping[t];
    if (slot < 0) return;
    const long long blk = slot / block_size;
    const long long off = slot % block_size;
    const long long plane = num_blocks * num_kv_heads * block_size * head_dim;
    const int vecs_per_row = head_dim / VEC;
    for (int idx = threadIdx.x; idx < num_kv_heads * vecs_per_row; idx += blockDim.x) {
        const long long h = idx / vecs_per_row;
        const long long c = (long long)(idx % vecs_per_row) * VEC;
        const long long dst = ((blk * num_kv_heads + h) * block_size + off) * head_dim + c;
        *reinterpret_cast<uint4*>(kv + dst) =
            *reinterpret_cast<const uint4*>(key + t * k_stride_t + h * k_stride_h + c);
        *reinterpret_cast<uint4*>(kv + plane + dst) =
            *reinterpret_cast<const uint4*>(value + t * v_stride_t + h * v_stride_h + c);
    }
}

// Only the element size matters for a copy: b16 serves fp16 and bf16, b32 serves fp32.
#define RC_ENTRY(NAME, S)                                                                       \
    extern "C" __global__ void reshape_and_cache_##NAME(                                        \
        const S* key, const S* value, long long k_stride_t, long long k_stride_h,              \
        long long v_stride_t, long long v_stride_h, S* kv, const long long* slot_mapping,     \
        long long num_blocks, int num_kv_heads, int head_dim, int block_size) {               \
        reshape_and_cache_impl<S>(key, value, k_stride_t, k_stride_h, v_stride_t, v_stride_h, \
                                  kv, slot_mapping, num_blocks, num_kv_heads, head_dim,       \
                                  block_size);                                                 \
    }

RC_ENTRY(b16, unsigned short)
RC_ENTRY(b32, float)

// ---- copy_blocks ---------------------------------------------------------------------------------
// Copies block pairs between two pools with the same per-block shape, for all layers and both
// planes, in ONE launch.
//   grid = (num_pairs, num_layers * 2), block = 256
//   x -> pair p: (src block, dst block) = (pairs[2p], pairs[2p + 1])
//   y -> layer = y / 2, plane = y % 2 (K, V)
//   source bytes: src_layers[layer] + (plane * src_num_blocks + src_block) * block_bytes
//   dest   bytes: dst_layers[layer] + (plane * dst_num_blocks + dst_block) * block_bytes
// block_bytes = num_kv_heads * block_size * head_dim * sizeof(element), a multiple of 16.
// copy-on-write: src_layers == dst_layers (the device caches).
extern "C" __global__ void copy_blocks_kernel(
    const unsigned long long* __restrict__ src_layers,
    const unsigned long long* __restrict__ dst_layers,
    const long long* __restrict__ pairs,
    long long src_num_blocks, long long dst_num_blocks, long long block_bytes) {
    const long long p = blockIdx.x;
    const int layer = blockIdx.y / 2;
    const int plane = blockIdx.y % 2;
    const long long src_blk = pairs[2 * p];
    const long long dst_blk = pairs[2 * p + 1];
    const uint4* src = reinterpret_cast<const uint4*>(
        src_layers[layer] + (plane * src_num_blocks + src_blk) * block_bytes);
    uint4* dst = reinterpret_cast<uint4*>(
        dst_layers[layer] + (plane * dst_num_blocks + dst_blk) * block_bytes);
    const long long n = block_bytes / 16;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
}
