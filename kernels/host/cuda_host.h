// cuda_host.h: the CUDA built-ins kernels/*.cu use, for the host C++ compiler, so the unchanged
// kernel text runs on a CPU in the test suite (services/executor/attention/host_kernels.py).
//
// The threads of one CTA are fibers (ucontext) on one OS thread. A fiber runs until it reaches a
// __syncthreads (a CTA barrier) or a __shfl_xor_sync (a warp barrier plus exchange), then the next
// one runs. The order in which fibers run between barriers is the launch's `mode`: in order,
// reversed, shuffled by a seed, or one warp alone up to its next barrier. A shared-memory race
// that a missing barrier leaves then reads differently in some order, and the result changes.
// Checks: all 32 lanes of a warp reach the same shuffle with a full mask and the same width and
// lane mask; no CTA deadlocks (some threads at a barrier while others wait in a shuffle); a
// 16-byte vector load from a misaligned address is caught by UBSan (-fsanitize=alignment: uint4 is
// 16-byte aligned here as in CUDA). Shared memory is filled with 0xff bytes (NaN in f32, f16 and
// bf16) before each CTA. CTAs run one after another, so `static` storage is per-CTA shared memory.
#pragma once
#define PAGEDSERVE_HOST 1

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <random>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static __attribute__((section("ps_shared")))

struct __attribute__((aligned(16))) uint4 { unsigned int x, y, z, w; };
struct ps_dim3 { unsigned int x, y, z; };

// CUDA's integer min/max of device code
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

inline float __uint_as_float(unsigned int u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }

// IEEE binary16 conversions (what PTX cvt.f32.f16 / cvt.rn.f16.f32 do): GCC's _Float16 rounds
// to nearest even.
inline float ps_half_to_float(unsigned short h) { _Float16 x; memcpy(&x, &h, 2); return (float)x; }
inline unsigned short ps_float_to_half(float f) { _Float16 x = (_Float16)f; unsigned short h; memcpy(&h, &x, 2); return h; }

namespace ps {

enum State { RUNNABLE, AT_BARRIER, AT_SHFL, DONE };

struct Fiber {
    ucontext_t uc;          // only to start the fiber on its own stack
    jmp_buf jb;             // every later switch: no signal-mask system call
    bool started;
    std::vector<char> stack;
    ps_dim3 tid;
    State state;
    long barriers;          // barriers passed (all threads of a CTA must agree)
    long shuffles;          // shuffles done (all lanes of a warp must agree)
    unsigned int mask;
    int lane_mask, width;
    float value, result;
};

inline Fiber* cur = nullptr;
inline ucontext_t sched_uc;
inline jmp_buf sched_jb;
inline void (*cur_call)(void**) = nullptr;
inline void** cur_args = nullptr;
inline char error[512] = {0};
alignas(16) inline unsigned char dynamic_shared[64 * 1024];

}  // namespace ps

inline ps_dim3 blockIdx, blockDim, gridDim;
#define threadIdx (ps::cur->tid)

namespace ps {
inline void yield() {
    if (!_setjmp(cur->jb)) _longjmp(sched_jb, 1);
}
}  // namespace ps

inline void __syncthreads() {
    ps::cur->state = ps::AT_BARRIER;
    ps::cur->barriers++;
    ps::yield();
}

inline float __shfl_xor_sync(unsigned int mask, float v, int lane_mask, int width = 32) {
    ps::Fiber* f = ps::cur;
    f->state = ps::AT_SHFL;
    f->mask = mask;
    f->value = v;
    f->lane_mask = lane_mask;
    f->width = width;
    f->shuffles++;
    ps::yield();
    return f->result;
}

extern char __start_ps_shared[] __attribute__((weak));
extern char __stop_ps_shared[] __attribute__((weak));

namespace ps {

// A fiber lives across CTAs and launches: it runs the kernel for whatever thread it is given.
inline void fiber_main() {
    for (;;) {
        cur_call(cur_args);
        cur->state = DONE;
        yield();
    }
}

// All live lanes of warp w wait in a shuffle: check they agree and exchange. Returns false when
// the warp is not (yet) all at a shuffle.
template <class Fibers>
inline bool resolve_warp(Fibers& fs, int w, int n) {
    int lo = w * 32, hi = std::min(n, lo + 32);
    bool any = false;
    for (int i = lo; i < hi; ++i) {
        if (fs[i].state == RUNNABLE) return false;
        any |= fs[i].state == AT_SHFL;
    }
    if (!any) return false;
    Fiber& a = fs[lo];
    for (int i = lo; i < hi; ++i) {
        Fiber& f = fs[i];
        if (f.state != AT_SHFL) { snprintf(error, sizeof error, "warp %d: lane %d is not in the shuffle the others wait in", w, i - lo); return false; }
        if (hi - lo != 32 || f.mask != 0xffffffffu) { snprintf(error, sizeof error, "warp %d: shuffle mask %#x with %d lanes (a full warp is expected)", w, f.mask, hi - lo); return false; }
        if (f.width != a.width || f.lane_mask != a.lane_mask || f.shuffles != a.shuffles) {
            snprintf(error, sizeof error, "warp %d: lanes reached different shuffles (lane %d: xor %d width %d #%ld; lane 0: xor %d width %d #%ld)",
                     w, i - lo, f.lane_mask, f.width, f.shuffles, a.lane_mask, a.width, a.shuffles);
            return false;
        }
    }
    for (int i = lo; i < hi; ++i) {
        int lane = i - lo, seg = lane - lane % a.width, src = seg + ((lane % a.width) ^ a.lane_mask);
        fs[i].result = fs[lo + (src < a.width + seg ? src : lane)].value;
    }
    for (int i = lo; i < hi; ++i) fs[i].state = RUNNABLE;
    return true;
}

inline void run(Fiber& f) {
    cur = &f;
    if (_setjmp(sched_jb)) return;             // the fiber yielded
    if (f.started) _longjmp(f.jb, 1);
    f.started = true;
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = f.stack.data();
    f.uc.uc_stack.ss_size = f.stack.size();
    f.uc.uc_link = nullptr;                    // fiber_main never returns
    makecontext(&f.uc, fiber_main, 0);
    swapcontext(&sched_uc, &f.uc);
}

inline Fiber* pool[1024];

// One CTA of `n` threads; mode 0 in order, 1 reversed, 2 shuffled by seed, 3 one warp at a time
// (each warp alone up to its next barrier, last warp first). Returns false with `error` set.
inline bool run_cta(int n, int mode, unsigned seed) {
    struct View { Fiber& operator[](int i) { return *pool[i]; } } fs;
    for (int i = 0; i < n; ++i) {
        Fiber& f = fs[i];
        f.tid = ps_dim3{(unsigned)(i % blockDim.x), (unsigned)(i / blockDim.x % blockDim.y), (unsigned)(i / (blockDim.x * blockDim.y))};
        f.state = RUNNABLE;
        f.barriers = f.shuffles = 0;
    }
    std::vector<int> order(n);
    for (int i = 0; i < n; ++i) order[i] = i;
    if (mode == 1 || mode == 3) std::reverse(order.begin(), order.end());
    std::mt19937 rng(seed);
    const int warps = (n + 31) / 32;
    for (;;) {
        if (mode == 2) std::shuffle(order.begin(), order.end(), rng);
        if (mode == 3) {                       // warp by warp: shuffles resolved inside the warp
            for (int w = warps - 1; w >= 0; --w) {
                for (;;) {
                    for (int k = 0; k < n; ++k) {
                        int i = order[k];
                        if (i / 32 == w && fs[i].state == RUNNABLE) run(fs[i]);
                        if (error[0]) return false;
                    }
                    if (!resolve_warp(fs, w, n)) break;
                }
                if (error[0]) return false;
            }
        } else {
            for (int k = 0; k < n; ++k)
                if (fs[order[k]].state == RUNNABLE) { run(fs[order[k]]); if (error[0]) return false; }
        }
        bool progress = false;
        for (int w = 0; w < warps; ++w) progress |= resolve_warp(fs, w, n);
        if (error[0]) return false;
        if (progress) continue;
        int at_barrier = 0, done = 0;
        long bar = -1;
        for (int i = 0; i < n; ++i) {
            Fiber& f = fs[i];
            if (f.state == DONE) { ++done; continue; }
            if (f.state == AT_BARRIER) {
                if (bar >= 0 && f.barriers != bar) { snprintf(error, sizeof error, "threads wait at different barriers (#%ld and #%ld)", bar, f.barriers); return false; }
                bar = f.barriers;
                ++at_barrier;
            }
        }
        if (done == n) return true;
        if (at_barrier + done != n) { snprintf(error, sizeof error, "deadlock: %d threads at a barrier, %d done, the rest in a shuffle", at_barrier, done); return false; }
        if (done) { snprintf(error, sizeof error, "__syncthreads after %d threads of the CTA exited", done); return false; }
        for (int i = 0; i < n; ++i) fs[i].state = RUNNABLE;
    }
}

}  // namespace ps

// The launch: every CTA of the grid in order, each with `block` threads. 0 = ok, else `err`.
extern "C" int ps_launch(void (*call)(void**), void** args, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                         long shared_bytes, int mode, unsigned seed, char* err, int errlen) {
    ps::error[0] = 0;
    if (shared_bytes > (long)sizeof ps::dynamic_shared || bx > 1024 || bx == 0) {
        snprintf(err, errlen, "launch: block %u, dynamic shared %ld bytes out of range", bx, shared_bytes);
        return 1;
    }
    for (unsigned i = 0; i < bx; ++i)
        if (ps::pool[i] == nullptr) {
            ps::pool[i] = new ps::Fiber{};
            ps::pool[i]->stack.resize(256 * 1024);
        }
    ps::cur_call = call;
    ps::cur_args = args;
    gridDim = ps_dim3{gx, gy, gz};
    blockDim = ps_dim3{bx, 1, 1};
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                if (__start_ps_shared != nullptr) memset(__start_ps_shared, 0xff, __stop_ps_shared - __start_ps_shared);
                memset(ps::dynamic_shared, 0xff, sizeof ps::dynamic_shared);
                blockIdx = ps_dim3{x, y, z};
                unsigned cta_seed = seed ^ (x * 2654435761u) ^ (y * 40503u) ^ (z * 97u);
                if (!ps::run_cta((int)bx, mode, cta_seed)) {
                    for (unsigned i = 0; i < bx; ++i) ps::pool[i]->started = false;   // abandoned mid-kernel
                    snprintf(err, errlen, "CTA (%u, %u, %u): %s", x, y, z, ps::error);
                    return 2;
                }
            }
    return 0;
}
