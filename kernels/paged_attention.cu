// paged_attention.cu: attention over the paged KV cache (decode, prefill, chunked prefill),
// single pass or split-K, plus the split-K log-sum-exp reduce.
//
// Layout (docs/ARCHITECTURE.md, "KV cache layout"): one layer's cache is
//     kv[2, num_blocks, num_kv_heads, BLOCK_SIZE, HEAD_DIM]      (K plane 0, V plane 1)
// and token t of sequence b lives in block block_tables[b][t / BLOCK_SIZE] at offset
// t % BLOCK_SIZE, so its K row starts at element
//     ((blk * num_kv_heads + kvh) * BLOCK_SIZE + t % BLOCK_SIZE) * HEAD_DIM
// and its V row num_blocks * num_kv_heads * BLOCK_SIZE * HEAD_DIM elements later.
//
// ---- Work decomposition ----------------------------------------------------------------------
// One CTA = (sequence b, KV head kvh, a chunk of query heads of that KV head, a tile of the
// sequence's new query tokens, a partition of the keys). Its "rows" are (query token, query
// head) pairs that all read the SAME KV head, so every K/V tile it loads from memory serves all
// of them (GQA: a KV tile is read once per CTA, not once per query head).
//
//   grid.x = num_q_tiles * num_partitions   x -> (q tile = x / P, partition = x % P)
//   grid.y = num_kv_heads * num_head_chunks  y -> (kvh = y / C, head chunk = y % C)
//   grid.z = num_seqs                        z -> b
//
//   G  = num_heads / num_kv_heads            query heads per KV head (GQA ratio)
//   Gc = heads_per_cta (<= PA_MAX_ROWS)      query heads per chunk; C = ceil(G / Gc)
//   Tq = q_per_cta                           new tokens per CTA; Tq * Gc <= PA_MAX_ROWS
//   row j in [0, Tq*Gc): token i = q_tile*Tq + j / Gc, head g = chunk*Gc + j % Gc,
//                        query head index h = kvh * G + g  (HF/Llama GQA head order)
//
// Decode is the case Tq = 1 (one new token per sequence). Prefill and chunked prefill use
// Tq = PA_MAX_ROWS / Gc; those rows are served by CUDA cores (FFMA), not tensor cores: fine
// for correctness and modest prompt lengths, the obvious place for a tensor-core kernel later.
//
// ---- Causality ---------------------------------------------------------------------------------
// context_lens[b] counts the cached tokens AFTER this step's write, new tokens included, so
// with n_new = cu_seqlens_q[b+1] - cu_seqlens_q[b] new tokens, new token i has absolute position
// prefix + i, prefix = context_lens[b] - n_new, and sees keys [0, prefix + i].
// Sliding window (window > 0): it sees keys [max(0, prefix + i - window + 1), prefix + i] only
// (transformers' `kv_idx > q_idx - sliding_window`); window = 0 is full causal attention. A CTA's
// keys start at the first row's window start (its rows' positions grow with j), and the mask
// holds each row to its own [lo, pos] range.
//
// ---- Split-K -----------------------------------------------------------------------------------
// partition_size == 0: single pass, the CTA walks all its keys and writes the final output.
// partition_size  > 0: partition p covers keys [p * partition_size, (p+1) * partition_size);
// the CTA writes, per row, the normalised partial output o_p and its running max m_p and sum
// l_p (of exp(s - m_p)) to part_out / part_ml; paged_attention_reduce_* merges them:
//     M = max_p m_p,  w_p = l_p * exp(m_p - M),  out = sum_p w_p * o_p / sum_p w_p.
// Row with position pos has keys in partitions lo / partition_size .. pos / partition_size
// exactly (lo = 0, or its window start), which is how the reduce knows which partials are valid
// (earlier and later slots are never written).
//
// ---- Inside a CTA (PA_NUM_THREADS = 128 threads) ------------------------------------------------
// VEC = 16 / sizeof(element) elements per thread per load (one 16-byte load);
// TPR = min(HEAD_DIM / VEC, 32) threads cooperate on one K/V row (8, 16 or 32 for 16-bit types),
// RPI = 128 / TPR rows are in flight per sweep, NV = HEAD_DIM / (TPR * VEC) loads per thread
// per row (2 only for fp32 at HEAD_DIM 256, else 1). Thread tid owns the columns
// [col + v * TPR * VEC, col + v * TPR * VEC + VEC), v < NV, col = (tid % TPR) * VEC, of row
// group grp = tid / TPR (load v of a warp reads TPR * 16 contiguous bytes per row).
// Keys are processed in tiles of PA_TILE tokens with an online softmax:
//   phase 1  s[j][r] = q_j . k_r    (partial dot per thread, xor-shuffle sum over TPR lanes)
//   phase 2  per row j (one warp per row): m_new = max(m, max_r s), p = exp(s - m_new),
//            l = l * exp(m - m_new) + sum p, the rescale factor kept in alpha[j]
//   phase 3  acc[j][col..] = acc * alpha[j] + sum_r p[j][r] * v_r[col..]
// At the end the RPI row groups' accumulators are summed in shared memory (in a fixed order,
// so results are deterministic) and divided by l.
// The scale is folded into q when it is staged into shared memory.

#include "pagedserve_common.cuh"

#define PA_NUM_THREADS 128
#define PA_NUM_WARPS (PA_NUM_THREADS / 32)
#define PA_MAX_ROWS 8
#define PA_TILE 64

template <typename Tr, int HEAD_DIM, int BLOCK_SIZE>
__device__ __forceinline__ void paged_attention_impl(
    typename Tr::storage* __restrict__ out,        // [T, Hq, D] (single pass)
    float* __restrict__ part_out,                   // [T, Hq, P, D] (split-K)
    float* __restrict__ part_ml,                    // [T, Hq, P, 2] (split-K): (m, l)
    const typename Tr::storage* __restrict__ q,     // [T, Hq, D], last dim contiguous
    long long q_stride_t, long long q_stride_h,
    const typename Tr::storage* __restrict__ kv,    // [2, NB, Hkv, BS, D] contiguous
    long long num_blocks,
    const int* __restrict__ block_tables, int bt_stride,  // [B, max_blocks]
    const int* __restrict__ context_lens,                 // [B]
    const int* __restrict__ cu_seqlens_q,                 // [B + 1]
    int num_heads, int num_kv_heads, int heads_per_cta, int num_head_chunks,
    int q_per_cta, int num_partitions, int partition_size, float scale, int window) {
    typedef typename Tr::storage S;
    typedef Vec16<Tr> V;
    constexpr int VEC = V::N;
    constexpr int TPR = HEAD_DIM / VEC < 32 ? HEAD_DIM / VEC : 32;   // threads per K/V row
    constexpr int NV = HEAD_DIM / (TPR * VEC);    // 16-byte loads per thread per row
    constexpr int RPI = PA_NUM_THREADS / TPR;     // rows per sweep
    constexpr int SWEEPS = PA_TILE / RPI;         // sweeps per tile
    static_assert(HEAD_DIM == NV * TPR * VEC && (32 % TPR) == 0, "row must fit a warp");
    static_assert(PA_TILE % RPI == 0, "tile must be whole sweeps");

    __shared__ __align__(16) float q_s[PA_MAX_ROWS][HEAD_DIM];  // scaled q, later the output
    __shared__ float s_s[PA_MAX_ROWS][PA_TILE];                 // scores, then probabilities
    __shared__ float m_s[PA_MAX_ROWS], l_s[PA_MAX_ROWS], alpha_s[PA_MAX_ROWS];
    __shared__ int pos_s[PA_MAX_ROWS];  // last visible key of row j; -1: row unused
    __shared__ int lo_s[PA_MAX_ROWS];   // first visible key of row j (0 without a window)

    const int tid = threadIdx.x;
    const int warp = tid / 32, lane = tid % 32;
    const int grp = tid / TPR;                 // which row of a sweep this thread loads
    const int col = (tid % TPR) * VEC;         // first column this thread owns

    // ---- grid index -> (seq, kv head, head chunk, q tile, partition)
    const int part = blockIdx.x % num_partitions;
    const int q_tile = blockIdx.x / num_partitions;
    const int kvh = blockIdx.y / num_head_chunks;
    const int chunk = blockIdx.y % num_head_chunks;
    const int b = blockIdx.z;
    const int G = num_heads / num_kv_heads;

    const int q_begin = cu_seqlens_q[b];
    const int n_new = cu_seqlens_q[b + 1] - q_begin;
    const int ctx = context_lens[b];
    const int prefix = ctx - n_new;            // tokens cached before this step's new ones
    const int i0 = q_tile * q_per_cta;         // first new token of this CTA
    if (i0 >= n_new || prefix < 0) return;     // ragged: this seq has fewer q tiles
    const int n_tok = min(q_per_cta, n_new - i0);
    const int nrows = n_tok * heads_per_cta;
    const int key_end = prefix + i0 + n_tok;   // one past the last key any row here sees
    const int key_lo = window > 0 ? max(0, prefix + i0 - window + 1) : 0;   // first key any row sees

    const bool split = partition_size > 0;
    const int k_begin = split ? max(part * partition_size, key_lo) : key_lo;
    const int k_end = split ? min(part * partition_size + partition_size, key_end) : key_end;
    if (k_begin >= k_end) return;              // partition outside this CTA's keys

    // ---- stage q (scaled, fp32) and per-row state
    for (int idx = tid; idx < PA_MAX_ROWS * HEAD_DIM; idx += PA_NUM_THREADS) {
        const int j = idx / HEAD_DIM, d = idx % HEAD_DIM;
        const int g = chunk * heads_per_cta + j % heads_per_cta;
        float v = 0.f;
        if (j < nrows && g < G) {
            const long long row = q_begin + i0 + j / heads_per_cta;
            const long long h = (long long)kvh * G + g;
            v = Tr::to_float(q[row * q_stride_t + h * q_stride_h + d]) * scale;
        }
        q_s[j][d] = v;
    }
    if (tid < PA_MAX_ROWS) {
        const int j = tid;
        const int g = chunk * heads_per_cta + j % heads_per_cta;
        pos_s[j] = (j < nrows && g < G) ? prefix + i0 + j / heads_per_cta : -1;
        lo_s[j] = window > 0 ? max(0, prefix + i0 + j / heads_per_cta - window + 1) : 0;
        m_s[j] = PS_NEG_INF;
        l_s[j] = 0.f;
        alpha_s[j] = 1.f;
    }
    __syncthreads();

    const S* k_cache = kv;
    const S* v_cache = kv + num_blocks * num_kv_heads * BLOCK_SIZE * HEAD_DIM;
    const int* table = block_tables + (long long)b * bt_stride;

    float acc[PA_MAX_ROWS][NV * VEC];          // column col + v * TPR * VEC + e at v * VEC + e
#pragma unroll
    for (int j = 0; j < PA_MAX_ROWS; ++j)
#pragma unroll
        for (int e = 0; e < NV * VEC; ++e) acc[j][e] = 0.f;

    for (int t0 = k_begin; t0 < k_end; t0 += PA_TILE) {
        const int tile_len = min(PA_TILE, k_end - t0);

        // ---- phase 1: scores. Issue all of this thread's K loads for the tile first
        // (SWEEPS independent 16-byte loads in flight), then reduce.
        uint4 raw[SWEEPS][NV];
#pragma unroll
        for (int s = 0; s < SWEEPS; ++s) {
            const int r = s * RPI + grp;       // token t0 + r of the tile
#pragma unroll
            for (int v = 0; v < NV; ++v) raw[s][v] = zero_u4();
            if (r < tile_len) {
                const int t = t0 + r;
                const long long blk = table[t / BLOCK_SIZE];
                const long long off =
                    ((blk * num_kv_heads + kvh) * BLOCK_SIZE + t % BLOCK_SIZE) * HEAD_DIM + col;
#pragma unroll
                for (int v = 0; v < NV; ++v)
                    raw[s][v] = *reinterpret_cast<const uint4*>(k_cache + off + v * TPR * VEC);
            }
        }
#pragma unroll
        for (int s = 0; s < SWEEPS; ++s) {
            const int r = s * RPI + grp;
            if (s * RPI >= tile_len) break;    // uniform over the CTA: shuffles stay converged
            float k[NV][VEC];
#pragma unroll
            for (int v = 0; v < NV; ++v) {
                typename V::U u;
                u.raw = raw[s][v];
#pragma unroll
                for (int e = 0; e < VEC; ++e) k[v][e] = Tr::to_float(u.e[e]);
            }
#pragma unroll
            for (int j = 0; j < PA_MAX_ROWS; ++j) {
                if (j >= nrows) break;
                float dot = 0.f;
#pragma unroll
                for (int v = 0; v < NV; ++v)
#pragma unroll
                    for (int e = 0; e < VEC; ++e) dot = fmaf(q_s[j][col + v * TPR * VEC + e], k[v][e], dot);
                dot = warp_sum(dot, TPR);      // xor within aligned TPR-lane groups
                if ((tid % TPR) == 0 && r < tile_len) {
                    const int t = t0 + r;      // causal and window mask
                    s_s[j][r] = (t <= pos_s[j] && t >= lo_s[j]) ? dot : PS_NEG_INF;
                }
            }
        }
        __syncthreads();

        // ---- phase 2: online softmax, one warp per row
        for (int j = warp; j < nrows; j += PA_NUM_WARPS) {
            float mx = PS_NEG_INF;
            for (int r = lane; r < tile_len; r += 32) mx = fmaxf(mx, s_s[j][r]);
            mx = warp_max(mx, 32);
            const float m_old = m_s[j];
            const float m_new = fmaxf(m_old, mx);
            float sum = 0.f, alpha = 1.f;
            if (m_new == PS_NEG_INF) {         // nothing visible yet: avoid exp(-inf - -inf)
                for (int r = lane; r < tile_len; r += 32) s_s[j][r] = 0.f;
            } else {
                alpha = expf(m_old - m_new);   // 0 when m_old = -inf
                for (int r = lane; r < tile_len; r += 32) {
                    const float p = expf(s_s[j][r] - m_new);  // 0 for masked (-inf) scores
                    s_s[j][r] = p;
                    sum += p;
                }
            }
            sum = warp_sum(sum, 32);
            if (lane == 0) {
                m_s[j] = m_new;
                l_s[j] = l_s[j] * alpha + sum;
                alpha_s[j] = alpha;
            }
        }
        __syncthreads();

        // ---- phase 3: rescale and accumulate P V
#pragma unroll
        for (int s = 0; s < SWEEPS; ++s) {
            const int r = s * RPI + grp;
#pragma unroll
            for (int v = 0; v < NV; ++v) raw[s][v] = zero_u4();
            if (r < tile_len) {
                const int t = t0 + r;
                const long long blk = table[t / BLOCK_SIZE];
                const long long off =
                    ((blk * num_kv_heads + kvh) * BLOCK_SIZE + t % BLOCK_SIZE) * HEAD_DIM + col;
#pragma unroll
                for (int v = 0; v < NV; ++v)
                    raw[s][v] = *reinterpret_cast<const uint4*>(v_cache + off + v * TPR * VEC);
            }
        }
#pragma unroll
        for (int j = 0; j < PA_MAX_ROWS; ++j) {
            const float a = alpha_s[j];
#pragma unroll
            for (int e = 0; e < NV * VEC; ++e) acc[j][e] *= a;
        }
#pragma unroll
        for (int s = 0; s < SWEEPS; ++s) {
            const int r = s * RPI + grp;
            if (r >= tile_len) break;          // per-thread guard; no shuffles in this loop
#pragma unroll
            for (int v = 0; v < NV; ++v) {
                typename V::U u;
                u.raw = raw[s][v];
#pragma unroll
                for (int j = 0; j < PA_MAX_ROWS; ++j) {
                    if (j >= nrows) break;
                    const float p = s_s[j][r];
#pragma unroll
                    for (int e = 0; e < VEC; ++e)
                        acc[j][v * VEC + e] = fmaf(p, Tr::to_float(u.e[e]), acc[j][v * VEC + e]);
                }
            }
        }
        __syncthreads();                       // s_s / alpha_s are rewritten by the next tile
    }

    // ---- sum the RPI row groups' accumulators into q_s (reused as the output tile)
    for (int idx = tid; idx < PA_MAX_ROWS * HEAD_DIM; idx += PA_NUM_THREADS)
        q_s[idx / HEAD_DIM][idx % HEAD_DIM] = 0.f;
    __syncthreads();
    for (int g2 = 0; g2 < RPI; ++g2) {
        if (grp == g2) {
#pragma unroll
            for (int j = 0; j < PA_MAX_ROWS; ++j) {
                if (j >= nrows) break;
#pragma unroll
                for (int v = 0; v < NV; ++v)
#pragma unroll
                    for (int e = 0; e < VEC; ++e) q_s[j][col + v * TPR * VEC + e] += acc[j][v * VEC + e];
            }
        }
        __syncthreads();
    }

    // ---- write: final output (single pass) or normalised partial + (m, l) (split-K)
    for (int idx = tid; idx < nrows * HEAD_DIM; idx += PA_NUM_THREADS) {
        const int j = idx / HEAD_DIM, d = idx % HEAD_DIM;
        if (pos_s[j] < 0) continue;            // head index past G in the last chunk
        const long long row = q_begin + i0 + j / heads_per_cta;
        const long long h = (long long)kvh * G + chunk * heads_per_cta + j % heads_per_cta;
        const float l = l_s[j];
        const float o = l > 0.f ? q_s[j][d] / l : 0.f;
        if (split) {
            const long long slot = (row * num_heads + h) * num_partitions + part;
            part_out[slot * HEAD_DIM + d] = o;
            if (d == 0) {
                part_ml[slot * 2 + 0] = m_s[j];
                part_ml[slot * 2 + 1] = l;
            }
        } else {
            out[(row * num_heads + h) * HEAD_DIM + d] = Tr::from_float(o);
        }
    }
}

// ---- split-K reduce ---------------------------------------------------------------------------
// grid = (num_heads, T), block = PA_NUM_THREADS, dynamic shared memory = num_partitions floats.
// One CTA merges the partials of one (query row, head).

__device__ __forceinline__ float block_reduce(float v, bool is_max, float* red) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    v = is_max ? warp_max(v, 32) : warp_sum(v, 32);
    __syncthreads();                           // red may still be read by a previous call
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = red[0];
    for (int w = 1; w < PA_NUM_WARPS; ++w) v = is_max ? fmaxf(v, red[w]) : v + red[w];
    return v;
}

template <typename Tr, int HEAD_DIM>
__device__ __forceinline__ void paged_attention_reduce_impl(
    typename Tr::storage* __restrict__ out,         // [T, Hq, D]
    const float* __restrict__ part_out,             // [T, Hq, P, D]
    const float* __restrict__ part_ml,              // [T, Hq, P, 2]
    const int* __restrict__ context_lens, const int* __restrict__ cu_seqlens_q,
    int num_seqs, int num_heads, int num_partitions, int partition_size, int window) {
    extern __shared__ float w_s[];             // [num_partitions] merge weights
    __shared__ float red[PA_NUM_WARPS];
    const int h = blockIdx.x;
    const int row = blockIdx.y;

    // sequence of this row: the b with cu[b] <= row < cu[b+1] (binary search)
    int lo = 0, hi = num_seqs;
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (cu_seqlens_q[mid] <= row) lo = mid; else hi = mid;
    }
    const int n_new = cu_seqlens_q[lo + 1] - cu_seqlens_q[lo];
    const int i = row - cu_seqlens_q[lo];
    const int pos = context_lens[lo] - n_new + i;
    if (i < 0 || i >= n_new || pos < 0) return;
    const int n_parts = min(pos / partition_size + 1, num_partitions);  // partials written: p0 .. n_parts-1
    const int p0 = window > 0 ? max(0, pos - window + 1) / partition_size : 0;

    const long long base = ((long long)row * num_heads + h) * num_partitions;
    float mx = PS_NEG_INF;
    for (int p = p0 + threadIdx.x; p < n_parts; p += PA_NUM_THREADS) mx = fmaxf(mx, part_ml[(base + p) * 2]);
    mx = block_reduce(mx, true, red);
    float sum = 0.f;
    for (int p = p0 + threadIdx.x; p < n_parts; p += PA_NUM_THREADS) {
        const float m = part_ml[(base + p) * 2], l = part_ml[(base + p) * 2 + 1];
        const float w = (m == PS_NEG_INF) ? 0.f : l * expf(m - mx);  // every m <= mx: no overflow
        w_s[p] = w;
        sum += w;
    }
    sum = block_reduce(sum, false, red);       // also the barrier that publishes w_s
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    for (int d = threadIdx.x; d < HEAD_DIM; d += PA_NUM_THREADS) {
        float o = 0.f;
        for (int p = p0; p < n_parts; ++p) o = fmaf(w_s[p], part_out[(base + p) * HEAD_DIM + d], o);
        out[((long long)row * num_heads + h) * HEAD_DIM + d] = Tr::from_float(o * inv);
    }
}

// ---- extern "C" entry points, one per (dtype, head_dim, block_size) -----------------------------
// Names: paged_attention_<dtype>_d<HEAD_DIM>_bs<BLOCK_SIZE>, paged_attention_reduce_<dtype>_d<HEAD_DIM>.

#define PA_ENTRY(NAME, TR, D, BS)                                                                \
    extern "C" __global__ void __launch_bounds__(PA_NUM_THREADS) paged_attention_##NAME##_d##D##_bs##BS( \
        TR::storage* out, float* part_out, float* part_ml, const TR::storage* q,                 \
        long long q_stride_t, long long q_stride_h, const TR::storage* kv, long long num_blocks,  \
        const int* block_tables, int bt_stride, const int* context_lens, const int* cu_seqlens_q, \
        int num_heads, int num_kv_heads, int heads_per_cta, int num_head_chunks, int q_per_cta,   \
        int num_partitions, int partition_size, float scale, int window) {                        \
        paged_attention_impl<TR, D, BS>(out, part_out, part_ml, q, q_stride_t, q_stride_h, kv,   \
                                        num_blocks, block_tables, bt_stride, context_lens,        \
                                        cu_seqlens_q, num_heads, num_kv_heads, heads_per_cta,     \
                                        num_head_chunks, q_per_cta, num_partitions,               \
                                        partition_size, scale, window);                           \
    }

#define PA_REDUCE_ENTRY(NAME, TR, D)                                                             \
    extern "C" __global__ void __launch_bounds__(PA_NUM_THREADS) paged_attention_reduce_##NAME##_d##D( \
        TR::storage* out, const float* part_out, const float* part_ml, const int* context_lens,  \
        const int* cu_seqlens_q, int num_seqs, int num_heads, int num_partitions,                \
        int partition_size, int window) {                                                         \
        paged_attention_reduce_impl<TR, D>(out, part_out, part_ml, context_lens, cu_seqlens_q,   \
                                           num_seqs, num_heads, num_partitions, partition_size,  \
                                           window);                                               \
    }

#define PA_ALL_FOR_DTYPE(NAME, TR)   \
    PA_ENTRY(NAME, TR, 64, 16)       \
    PA_ENTRY(NAME, TR, 64, 32)       \
    PA_ENTRY(NAME, TR, 128, 16)      \
    PA_ENTRY(NAME, TR, 128, 32)      \
    PA_ENTRY(NAME, TR, 256, 16)      \
    PA_ENTRY(NAME, TR, 256, 32)      \
    PA_REDUCE_ENTRY(NAME, TR, 64)    \
    PA_REDUCE_ENTRY(NAME, TR, 128)   \
    PA_REDUCE_ENTRY(NAME, TR, 256)

PA_ALL_FOR_DTYPE(f16, F16)
PA_ALL_FOR_DTYPE(bf16, BF16)
PA_ALL_FOR_DTYPE(f32, F32)
