/* CPU kernels of the executor (float32), loaded by services/executor/attention/cpu_kernels.py.
 *
 * Paged decode attention: one new query token per sequence, K and V read in place from
 * the paged cache, with no gathered copy. The torch reference gathers every sequence's K/V into a
 * padded batch and then runs SDPA over it: it moves the bytes three times, and this reads them once.
 *
 * Built once per machine with the system C compiler (CFLAGS in services/executor/attention/cpu_kernels.py)
 * and loaded with ctypes; OpenMP binds to the libgomp torch already loaded (same soname), so the
 * kernels share torch's thread pool.
 *
 * Layouts (float32, contiguous):
 *   q       [S, Hq, D]          the decode rows' queries
 *   k, v    [N, Hkv, bs, D]     the cache's K and V planes (kv[0], kv[1] of [2, N, Hkv, bs, D])
 *   tables  [S, max_blocks]     int32 block ids, row s for sequence s
 *   ctx     [S]                 int32 keys per sequence (positions 0 .. ctx-1, the new token included)
 *   out     [S, Hq, D]
 * window > 0: sliding-window attention, the query (at position ctx-1) sees only keys
 * ctx-window .. ctx-1; the block loop starts at the block holding key ctx-window and skips the
 * keys before it there. window = 0: every key.
 * One task per (sequence, KV head): its G = Hq / Hkv query heads (GQA) share every K/V row it reads.
 * The softmax runs block by block with a running max and sum: one rescale of the accumulator per
 * block, as a flash-decoding split would do, all in float32. Built with -ffast-math so the exp of a
 * block's scores is one vector call (glibc's libmvec) and dot products may be reassociated; hence
 * no infinities here: the running max starts at -FLT_MAX.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>

#define PS_MAX_G 16
#define PS_MAX_BS 64
#define PS_MAX_D 256

/* Limits of the stack buffers below; the loader checks a model against them. */
int pagedserve_cpu_limits(int64_t *max_g, int64_t *max_bs, int64_t *max_d)
{
    *max_g = PS_MAX_G;
    *max_bs = PS_MAX_BS;
    *max_d = PS_MAX_D;
    return 0;
}

/* Returns 0, or -1 when a shape is outside the limits (nothing written then). */
int pagedserve_decode_f32(const float *q, const float *k, const float *v, const int32_t *tables,
                          const int32_t *ctx, float *out, int64_t S, int64_t Hq, int64_t Hkv,
                          int64_t D, int64_t bs, int64_t max_blocks, float scale, int64_t window,
                          int num_threads)
{
    if (Hkv <= 0 || Hq % Hkv != 0 || Hq / Hkv > PS_MAX_G || bs > PS_MAX_BS || D > PS_MAX_D || window < 0)
        return -1;
    const int64_t G = Hq / Hkv;

#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t task = 0; task < S * Hkv; ++task) {
        const int64_t s = task / Hkv, h = task % Hkv;
        const int64_t L = ctx[s];
        const int64_t k0 = (window > 0 && L > window) ? L - window : 0;   /* first visible key */
        const float *qs = q + (s * Hq + h * G) * D;           /* [G, D] */
        float acc[PS_MAX_G][PS_MAX_D];
        float m[PS_MAX_G], l[PS_MAX_G], sc[PS_MAX_BS];

        for (int64_t g = 0; g < G; ++g) {
            m[g] = -FLT_MAX;
            l[g] = 0.0f;
            for (int64_t i = 0; i < D; ++i)
                acc[g][i] = 0.0f;
        }
        for (int64_t b = k0 / bs; b * bs < L; ++b) {
            const int64_t blk = tables[s * max_blocks + b];
            const int64_t n = (L - b * bs < bs) ? L - b * bs : bs;
            const int64_t t0 = (b * bs < k0) ? k0 - b * bs : 0;          /* keys t0 .. n-1 of this block */
            const float *kb = k + (blk * Hkv + h) * bs * D;    /* [bs, D] */
            const float *vb = v + (blk * Hkv + h) * bs * D;
            for (int64_t g = 0; g < G; ++g) {
                const float *qg = qs + g * D;
                float bmax = -FLT_MAX;
                for (int64_t t = t0; t < n; ++t) {
                    const float *kt = kb + t * D;
                    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                    for (int64_t i = 0; i < D; ++i)
                        dot += qg[i] * kt[i];
                    sc[t] = dot * scale;
                    bmax = sc[t] > bmax ? sc[t] : bmax;
                }
                const float mnew = bmax > m[g] ? bmax : m[g];
                const float corr = expf(m[g] - mnew);          /* 0 on the first block (m = -FLT_MAX) */
                float *a = acc[g];
                float bsum = 0.0f;
#pragma omp simd reduction(+ : bsum)
                for (int64_t t = t0; t < n; ++t) {
                    sc[t] = expf(sc[t] - mnew);
                    bsum += sc[t];
                }
                l[g] = l[g] * corr + bsum;
#pragma omp simd
                for (int64_t i = 0; i < D; ++i)
                    a[i] *= corr;
                for (int64_t t = t0; t < n; ++t) {
                    const float p = sc[t];
                    const float *vt = vb + t * D;
#pragma omp simd
                    for (int64_t i = 0; i < D; ++i)
                        a[i] += p * vt[i];
                }
                m[g] = mnew;
            }
        }
        float *os = out + (s * Hq + h * G) * D;
        for (int64_t g = 0; g < G; ++g) {
            const float inv = L > 0 ? 1.0f / l[g] : 0.0f;
            for (int64_t i = 0; i < D; ++i)
                os[g * D + i] = acc[g][i] * inv;
        }
    }
    return 0;
}

/* Residual add fused with RMSNorm, the op between every two sublayers of the decoder:
 *   residual[t] += x[t];  out[t] = residual[t] * rsqrt(mean(residual[t]^2) + eps) * weight
 * x, residual, out [T, D] float32 contiguous (out may not alias the others); weight [D].
 * Eight small torch ops (add, pow, mean, add, rsqrt, mul, mul) become one pass over the rows. */
void pagedserve_add_rms_norm_f32(const float *x, float *residual, const float *weight, float *out,
                                 int64_t T, int64_t D, float eps, int num_threads)
{
#pragma omp parallel for num_threads(num_threads) schedule(static) if (T * D > 65536)
    for (int64_t t = 0; t < T; ++t) {
        float *r = residual + t * D;
        const float *xt = x + t * D;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < D; ++i) {
            r[i] += xt[i];
            ss += r[i] * r[i];
        }
        const float inv = 1.0f / sqrtf(ss / (float)D + eps);
        float *o = out + t * D;
#pragma omp simd
        for (int64_t i = 0; i < D; ++i)
            o[i] = r[i] * inv * weight[i];
    }
}
