// pagedserve_common.cuh: element types and 16-byte vector helpers shared by kernels/*.cu.
//
// The kernels deliberately include NO CUDA headers (not cuda_fp16.h / cuda_bf16.h): the same
// text then compiles under `nvcc --ptx` (tests/test_kernels_compile.py) and under NVRTC through
// cupy.RawModule without needing a CUDA include path at run time. fp16 conversions use the PTX
// `cvt` instructions (in C++ when PAGEDSERVE_HOST compiles them for the CPU); bf16 is the top half
// of an fp32 word.
//
// services/executor/attention/cuda.py inlines this header textually (it replaces the
// `#include "pagedserve_common.cuh"` line) so CuPy's kernel cache key covers its contents.
#pragma once

// ---- element traits -------------------------------------------------------------------------
// storage: how one element sits in memory; to_float / from_float: the only conversions used.
// All arithmetic in the kernels is fp32.

struct F16 {
    typedef unsigned short storage;
#ifdef PAGEDSERVE_HOST   // the CPU run of the kernels (kernels/host/cuda_host.h): the same IEEE rounding in C++
    static __forceinline__ float to_float(storage x) { return ps_half_to_float(x); }
    static __forceinline__ storage from_float(float f) { return ps_float_to_half(f); }
#else
    static __device__ __forceinline__ float to_float(storage x) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
        return f;
    }
    static __device__ __forceinline__ storage from_float(float f) {
        storage h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
        return h;
    }
#endif
};

struct BF16 {
    typedef unsigned short storage;
    static __device__ __forceinline__ float to_float(storage x) {
        return __uint_as_float(((unsigned int)x) << 16);
    }
    static __device__ __forceinline__ storage from_float(float f) {
        // round to nearest even; NaN stays a (quiet) NaN
        unsigned int u = __float_as_uint(f);
        if ((u & 0x7fffffffu) > 0x7f800000u) return (storage)0x7fc0u;
        u += 0x7fffu + ((u >> 16) & 1u);
        return (storage)(u >> 16);
    }
};

struct F32 {
    typedef float storage;
    static __device__ __forceinline__ float to_float(storage x) { return x; }
    static __device__ __forceinline__ storage from_float(float f) { return f; }
};

// ---- 16-byte vectors ------------------------------------------------------------------------
// Every global K/V/Q access is one 16-byte load per thread: VEC = 16 / sizeof(element)
// (8 for fp16/bf16, 4 for fp32). Rows (head_dim elements) are 16-byte aligned because
// head_dim * sizeof(element) is a multiple of 16 and the Python side checks base alignment.

template <typename Tr>
struct Vec16 {
    typedef typename Tr::storage S;
    static constexpr int N = 16 / (int)sizeof(S);
    union U {
        uint4 raw;
        S e[N];
    };

    static __device__ __forceinline__ void load(const S* p, float (&out)[N]) {
        U u;
        u.raw = *reinterpret_cast<const uint4*>(p);
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = Tr::to_float(u.e[i]);
    }
};

__device__ __forceinline__ uint4 zero_u4() {
    uint4 z;
    z.x = z.y = z.z = z.w = 0u;
    return z;
}

__device__ __forceinline__ float warp_max(float v, int width) {
    for (int o = width / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v, int width) {
    for (int o = width / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

#define PS_NEG_INF (__int_as_float(0xff800000))
