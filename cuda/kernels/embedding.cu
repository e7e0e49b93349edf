// Ember embedding kernels: pooled forward, id sort, run-length encoding, fused backward + optimizer.
// Compiled at run time by NVRTC (no headers: only built-ins). 64-bit offsets everywhere a
// product of rows and columns is formed.
typedef unsigned long long u64;
typedef unsigned int u32;
typedef long long i64;

#define FULL 0xffffffffu

// ---------------------------------------------------------------------------------------------
// Forward: out[bag, col..col+cols] (=|+=) scale[bag] * sum_j W[ids[j], :]
// tpb threads per bag (a power of two <= 32); each thread owns float4 column chunks.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void emb_fwd_v4(const float* __restrict__ W, i64 cols, const u64* __restrict__ offsets,
                                      const u64* __restrict__ ids, const float* __restrict__ scale,
                                      float* __restrict__ out, i64 stride, i64 col, int accumulate,
                                      i64 num_bags, int tpb) {
    i64 gt = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    i64 bag = gt / tpb;
    int lane = (int)(gt % tpb);
    if (bag >= num_bags) return;
    u64 s = offsets[bag], e = offsets[bag + 1];
    float sc = scale ? scale[bag] : 1.0f;
    int nv = (int)(cols >> 2);
    for (int c = lane; c < nv; c += tpb) {
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        u64 j = s;
        for (; j + 4 <= e; j += 4) {
            u64 r0 = ids[j], r1 = ids[j + 1], r2 = ids[j + 2], r3 = ids[j + 3];
            float4 a = __ldg(reinterpret_cast<const float4*>(W + r0 * cols) + c);
            float4 b = __ldg(reinterpret_cast<const float4*>(W + r1 * cols) + c);
            float4 d = __ldg(reinterpret_cast<const float4*>(W + r2 * cols) + c);
            float4 f = __ldg(reinterpret_cast<const float4*>(W + r3 * cols) + c);
            acc.x += a.x; acc.y += a.y; acc.z += a.z; acc.w += a.w;
            acc.x += b.x; acc.y += b.y; acc.z += b.z; acc.w += b.w;
            acc.x += d.x; acc.y += d.y; acc.z += d.z; acc.w += d.w;
            acc.x += f.x; acc.y += f.y; acc.z += f.z; acc.w += f.w;
        }
        for (; j < e; ++j) {
            float4 a = __ldg(reinterpret_cast<const float4*>(W + ids[j] * cols) + c);
            acc.x += a.x; acc.y += a.y; acc.z += a.z; acc.w += a.w;
        }
        acc.x *= sc; acc.y *= sc; acc.z *= sc; acc.w *= sc;
        float4* o = reinterpret_cast<float4*>(out + bag * stride + col) + c;
        if (accumulate) {
            float4 p = *o;
            acc.x += p.x; acc.y += p.y; acc.z += p.z; acc.w += p.w;
        }
        *o = acc;
    }
}

// Any cols, any alignment: one thread per (bag, column).
extern "C" __global__ void emb_fwd_scalar(const float* __restrict__ W, i64 cols, const u64* __restrict__ offsets,
                                          const u64* __restrict__ ids, const float* __restrict__ scale,
                                          float* __restrict__ out, i64 stride, i64 col, int accumulate,
                                          i64 num_bags) {
    i64 gt = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (gt >= num_bags * cols) return;
    i64 bag = gt / cols, c = gt % cols;
    u64 s = offsets[bag], e = offsets[bag + 1];
    float acc = 0.f;
    for (u64 j = s; j < e; ++j) acc += W[ids[j] * cols + c];
    if (scale) acc *= scale[bag];
    float* o = out + bag * stride + col + c;
    *o = accumulate ? *o + acc : acc;
}

// ---------------------------------------------------------------------------------------------
// Backward preparation: keys (local row, u32), values (position), and the bag of each position.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void emb_bag_of(const u64* __restrict__ offsets, i64 num_bags, u32* __restrict__ bag_of) {
    i64 b = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= num_bags) return;
    for (u64 j = offsets[b]; j < offsets[b + 1]; ++j) bag_of[j] = (u32)b;
}

extern "C" __global__ void emb_keys(const u64* __restrict__ ids, i64 n, u32* __restrict__ keys, u32* __restrict__ vals) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    keys[i] = (u32)ids[i];
    vals[i] = (u32)i;
}

// ---------------------------------------------------------------------------------------------
// Stable LSD radix sort of (u32 key, u32 value) pairs, 8-bit digits, tiles of 1024 (4 rounds of
// 256 threads). hist is digit-major: hist[d * num_tiles + tile].
// ---------------------------------------------------------------------------------------------
#define RS_THREADS 256
#define RS_TILE 1024

extern "C" __global__ void __launch_bounds__(RS_THREADS) radix_hist(const u32* __restrict__ keys, i64 n, int shift, u32* __restrict__ hist, int num_tiles) {
    __shared__ u32 cnt[256];
    cnt[threadIdx.x] = 0;
    __syncthreads();
    i64 base = (i64)blockIdx.x * RS_TILE;
    for (int r = 0; r < RS_TILE / RS_THREADS; ++r) {
        i64 i = base + r * RS_THREADS + threadIdx.x;
        if (i < n) atomicAdd(&cnt[(keys[i] >> shift) & 255u], 1u);
    }
    __syncthreads();
    hist[(i64)threadIdx.x * num_tiles + blockIdx.x] = cnt[threadIdx.x];
}

extern "C" __global__ void __launch_bounds__(RS_THREADS) radix_scatter(const u32* __restrict__ kin, const u32* __restrict__ vin, i64 n, int shift,
                                         const u32* __restrict__ hist_scan, int num_tiles,
                                         u32* __restrict__ kout, u32* __restrict__ vout) {
    __shared__ u32 run[256];           // per-digit output cursor of this tile
    __shared__ u32 cnt[8][256];        // per-warp digit counts in this round
    int t = threadIdx.x, warp = t >> 5, lane = t & 31;
    run[t] = hist_scan[(i64)t * num_tiles + blockIdx.x];
    i64 base = (i64)blockIdx.x * RS_TILE;
    for (int r = 0; r < RS_TILE / RS_THREADS; ++r) {
        #pragma unroll
        for (int w = 0; w < 8; ++w) cnt[w][t] = 0;
        __syncthreads();
        i64 i = base + r * RS_THREADS + t;
        bool valid = i < n;
        u32 k = valid ? kin[i] : 0u;
        u32 v = valid ? vin[i] : 0u;
        u32 d = valid ? ((k >> shift) & 255u) : 256u;
        u32 peers = __match_any_sync(FULL, d);
        u32 rank = __popc(peers & ((1u << lane) - 1u));
        int leader = __ffs(peers) - 1;
        if (valid && lane == leader) cnt[warp][d] = __popc(peers);
        __syncthreads();
        // thread t owns digit t: turn warp counts into offsets
        u32 acc = run[t];
        #pragma unroll
        for (int w = 0; w < 8; ++w) { u32 c = cnt[w][t]; cnt[w][t] = acc; acc += c; }
        run[t] = acc;
        __syncthreads();
        if (valid) {
            u32 pos = cnt[warp][d] + rank;
            kout[pos] = k;
            vout[pos] = v;
        }
        __syncthreads();
    }
}

// ---------------------------------------------------------------------------------------------
// Exclusive scan of u32 (three phases: per-block scan writing block totals, scan of the totals,
// add). Block of 1024 elements = 256 threads x 4.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(256) scan_blocks(const u32* __restrict__ in, u32* __restrict__ out, i64 n, u32* __restrict__ block_sums) {
    __shared__ u32 wsum[8];
    int t = threadIdx.x, warp = t >> 5, lane = t & 31;
    i64 base = (i64)blockIdx.x * 1024 + (i64)t * 4;
    u32 v[4];
    u32 tot = 0;
    #pragma unroll
    for (int k = 0; k < 4; ++k) { v[k] = (base + k < n) ? in[base + k] : 0u; tot += v[k]; }
    u32 x = tot;
    #pragma unroll
    for (int o = 1; o < 32; o <<= 1) { u32 y = __shfl_up_sync(FULL, x, o); if (lane >= o) x += y; }
    if (lane == 31) wsum[warp] = x;
    __syncthreads();
    if (t == 0) {
        u32 a = 0;
        for (int w = 0; w < 8; ++w) { u32 c = wsum[w]; wsum[w] = a; a += c; }
        if (block_sums) block_sums[blockIdx.x] = a;
    }
    __syncthreads();
    u32 run = x - tot + wsum[warp];
    #pragma unroll
    for (int k = 0; k < 4; ++k) { if (base + k < n) out[base + k] = run; run += v[k]; }
}

extern "C" __global__ void scan_add(u32* __restrict__ out, i64 n, const u32* __restrict__ block_off) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] += block_off[i / 1024];
}

// ---------------------------------------------------------------------------------------------
// Run-length encoding of sorted keys.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void rle_flags(const u32* __restrict__ keys, i64 n, u32* __restrict__ flags) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) flags[i] = (i == 0 || keys[i] != keys[i - 1]) ? 1u : 0u;
}

// counters[0] = number of unique rows; seg[u] = first sorted position of unique row u; seg[nu] = n.
extern "C" __global__ void rle_compact(const u32* __restrict__ keys, const u32* __restrict__ flags, const u32* __restrict__ idx,
                                       i64 n, u32* __restrict__ uniq, u32* __restrict__ seg, u32* __restrict__ counters) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (flags[i]) { uniq[idx[i]] = keys[i]; seg[idx[i]] = (u32)i; }
    if (i == n - 1) { u32 nu = idx[i] + flags[i]; counters[0] = nu; seg[nu] = (u32)n; }
}

// ---------------------------------------------------------------------------------------------
// Fused backward + optimizer.
// ---------------------------------------------------------------------------------------------
struct Opt {
    int kind;        // 0 SGD, 1 row-wise AdaGrad, 2 element-wise AdaGrad
    float lr, eps, c;
    int eps_inside;
    float l2;
    float dim;       // whole-row width (row-wise AdaGrad divides the sum of squares by it)
};

__device__ __forceinline__ float rate(const Opt& o, float v) {
    return o.eps_inside ? o.lr / sqrtf(v / o.c + o.eps) : o.lr / (sqrtf(v / o.c) + o.eps);
}

__device__ __forceinline__ float warp_sum(float x) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(FULL, x, o);
    return x;
}

#define MAXC 16   // columns per lane: cols <= 512

// Shared tail: g holds the summed gradient of unique row u (columns lane, lane+32, ...).
// mode 0: apply the optimizer; mode 1: write RowGrads (grads, sq).
__device__ __forceinline__ void finish_row(int lane, u32 u, u64 row, float (&g)[MAXC], i64 cols, float* W, float* state,
                                           const Opt& o, int mode, float* rg_grads, float* rg_sq, const float* row_sq_in) {
    float* w = W + row * (u64)cols;
    if (o.l2 != 0.f && row_sq_in == 0) {
        #pragma unroll
        for (int k = 0; k < MAXC; ++k) { i64 c = lane + 32 * k; if (c < cols) g[k] += o.l2 * w[c]; }
    }
    float sq;
    if (row_sq_in) {
        sq = row_sq_in[u];
    } else {
        float s = 0.f;
        #pragma unroll
        for (int k = 0; k < MAXC; ++k) { i64 c = lane + 32 * k; if (c < cols) s += g[k] * g[k]; }
        sq = warp_sum(s);
    }
    if (mode == 1) {
        #pragma unroll
        for (int k = 0; k < MAXC; ++k) { i64 c = lane + 32 * k; if (c < cols) rg_grads[(u64)u * cols + c] = g[k]; }
        if (lane == 0) rg_sq[u] = sq;
        return;
    }
    if (o.kind == 0) {
        #pragma unroll
        for (int k = 0; k < MAXC; ++k) { i64 c = lane + 32 * k; if (c < cols) w[c] -= o.lr * g[k]; }
    } else if (o.kind == 1) {
        float v = state[row] + sq / o.dim;
        __syncwarp();
        if (lane == 0) state[row] = v;
        float r = rate(o, v);
        #pragma unroll
        for (int k = 0; k < MAXC; ++k) { i64 c = lane + 32 * k; if (c < cols) w[c] -= r * g[k]; }
    } else {
        float* st = state + row * (u64)cols;
        #pragma unroll
        for (int k = 0; k < MAXC; ++k) {
            i64 c = lane + 32 * k;
            if (c < cols) { float v = st[c] + g[k] * g[k]; st[c] = v; w[c] -= rate(o, v) * g[k]; }
        }
    }
}

#define SHORT_RUN 32
#define CHUNK 1024

// One warp per unique row (grid-stride). Runs of at most SHORT_RUN occurrences are summed and
// finished here; longer runs are registered for the block kernels (long_cnt, long_rows, items).
extern "C" __global__ void emb_bwd_short(float* W, float* state, i64 cols, const u32* __restrict__ uniq,
                                         const u32* __restrict__ seg, const u32* __restrict__ counters,
                                         const u32* __restrict__ vals, const u32* __restrict__ bag_of,
                                         const float* __restrict__ grad, i64 stride, i64 col, const float* __restrict__ scale,
                                         Opt o, int mode, float* rg_grads, float* rg_sq,
                                         u32* long_counters, u32* long_rows, u64* items) {
    u32 nu = counters[0];
    int lane = threadIdx.x & 31;
    i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    i64 nwarps = ((i64)gridDim.x * blockDim.x) >> 5;
    for (i64 u = warp; u < nu; u += nwarps) {
        u32 s = seg[u], e = seg[u + 1];
        if (e - s > SHORT_RUN) {
            if (lane == 0) {
                u32 li = atomicAdd(&long_counters[0], 1u);
                long_rows[li] = (u32)u;
                u32 nch = (e - s + CHUNK - 1) / CHUNK;
                u32 b = atomicAdd(&long_counters[1], nch);
                for (u32 k = 0; k < nch; ++k) items[b + k] = ((u64)li << 32) | k;
            }
            continue;
        }
        float g[MAXC];
        #pragma unroll
        for (int k = 0; k < MAXC; ++k) g[k] = 0.f;
        for (u32 j = s; j < e; ++j) {
            u32 b = bag_of[vals[j]];
            float sc = scale ? scale[b] : 1.f;
            const float* gp = grad + (u64)b * stride + col;
            #pragma unroll
            for (int k = 0; k < MAXC; ++k) { i64 c = lane + 32 * k; if (c < cols) g[k] += sc * gp[c]; }
        }
        finish_row(lane, (u32)u, uniq[u], g, cols, W, state, o, mode, rg_grads, rg_sq, 0);
    }
}

// One block per chunk of CHUNK occurrences of a long run: 8 warps sum their share, reduce in
// shared memory, add into acc[li, :]. A run of one chunk has one writer (deterministic);
// atomics combine only runs longer than CHUNK.
extern "C" __global__ void __launch_bounds__(256) emb_bwd_long_accum(i64 cols, const u32* __restrict__ seg, const u32* __restrict__ vals,
                                              const u32* __restrict__ bag_of, const float* __restrict__ grad, i64 stride, i64 col,
                                              const float* __restrict__ scale, const u32* __restrict__ long_counters,
                                              const u32* __restrict__ long_rows, const u64* __restrict__ items, float* acc) {
    __shared__ float part[8][MAXC * 32];
    int t = threadIdx.x, warp = t >> 5, lane = t & 31;
    u32 nitems = long_counters[1];
    for (u64 it = blockIdx.x; it < nitems; it += gridDim.x) {
        u64 item = items[it];
        u32 li = (u32)(item >> 32), k0 = (u32)item;
        u32 u = long_rows[li];
        u32 s = seg[u] + k0 * CHUNK, e = min(seg[u + 1], s + CHUNK);
        float g[MAXC];
        #pragma unroll
        for (int k = 0; k < MAXC; ++k) g[k] = 0.f;
        for (u32 j = s + warp; j < e; j += 8) {
            u32 b = bag_of[vals[j]];
            float sc = scale ? scale[b] : 1.f;
            const float* gp = grad + (u64)b * stride + col;
            #pragma unroll
            for (int k = 0; k < MAXC; ++k) { i64 c = lane + 32 * k; if (c < cols) g[k] += sc * gp[c]; }
        }
        #pragma unroll
        for (int k = 0; k < MAXC; ++k) part[warp][lane + 32 * k] = g[k];
        __syncthreads();
        for (i64 c = t; c < cols; c += 256) {
            float x = 0.f;
            #pragma unroll
            for (int w = 0; w < 8; ++w) x += part[w][c];
            atomicAdd(&acc[(u64)li * cols + c], x);
        }
        __syncthreads();
    }
}

// One warp per long row: finish from acc.
extern "C" __global__ void emb_bwd_long_apply(float* W, float* state, i64 cols, const u32* __restrict__ uniq,
                                              const u32* __restrict__ long_counters, const u32* __restrict__ long_rows,
                                              const float* __restrict__ acc, Opt o, int mode, float* rg_grads, float* rg_sq) {
    u32 nl = long_counters[0];
    int lane = threadIdx.x & 31;
    i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    i64 nwarps = ((i64)gridDim.x * blockDim.x) >> 5;
    for (i64 li = warp; li < nl; li += nwarps) {
        u32 u = long_rows[li];
        float g[MAXC];
        #pragma unroll
        for (int k = 0; k < MAXC; ++k) { i64 c = lane + 32 * k; g[k] = c < cols ? acc[(u64)li * cols + c] : 0.f; }
        finish_row(lane, u, uniq[u], g, cols, W, state, o, mode, rg_grads, rg_sq, 0);
    }
}

// embedding_apply: RowGrads (rows as u64) → optimizer; row_sq (optional) replaces rg_sq.
extern "C" __global__ void emb_apply_rowgrads(float* W, float* state, i64 cols, const u64* __restrict__ rows, i64 nrows,
                                              const float* __restrict__ rg_grads, const float* __restrict__ rg_sq,
                                              const float* __restrict__ row_sq, Opt o) {
    int lane = threadIdx.x & 31;
    i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    i64 nwarps = ((i64)gridDim.x * blockDim.x) >> 5;
    for (i64 u = warp; u < nrows; u += nwarps) {
        float g[MAXC];
        #pragma unroll
        for (int k = 0; k < MAXC; ++k) { i64 c = lane + 32 * k; g[k] = c < cols ? rg_grads[(u64)u * cols + c] : 0.f; }
        Opt o2 = o;
        o2.l2 = 0.f; // already in the row gradients
        finish_row(lane, (u32)u, rows[u], g, cols, W, state, o2, 0, 0, 0, row_sq ? row_sq : rg_sq);
    }
}

// Row check of RowGrads before they are applied: rows[i] < limit and rows[i-1] < rows[i] for
// every i; *bad (zeroed by the host) receives 1 + an index that violates it.
extern "C" __global__ void check_rows_ascending(const u64* __restrict__ rows, i64 n, u64 limit, unsigned long long* bad) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        if (rows[i] >= limit || (i > 0 && rows[i - 1] >= rows[i])) atomicCAS(bad, 0ull, (unsigned long long)(i + 1));
    }
}

// u32 → u64 widening (unique rows of RowGrads).
extern "C" __global__ void widen_u32(const u32* __restrict__ in, const u32* __restrict__ counters, u64* __restrict__ out) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < counters[0]) out[i] = in[i];
}

// =============================================================================================
// Fast fused backward (the general path, sort + RLE, is above). Host sequence, no host round trip:
//   emb_keys_bags        keys = local row (u32), vals = bag (u32); zeroes the long-run counters
//   radix sort           ceil(log2(rows)/8) passes; stable, so within a row bags stay ascending
//   emb_bwd_fused{1,4}   one group of T = next_pow2(cols/4) (<= 32) lanes per sorted position;
//                        only run starts work: the run end is found with one coalesced probe of
//                        the next keys (ballot), the run's gradient rows are summed with float4
//                        loads, and the optimizer is applied in place. Runs > SHORT_RUN are
//                        registered (start, end, row) and their acc rows zeroed.
//   emb_bwd_long_accum2  one block per CHUNK of a long run, atomics into acc (only runs > CHUNK
//                        have several writers)
//   emb_bwd_long_apply2  one warp per long run: optimizer from acc
// No run-length-encoding pass, no scan, no unique-row count: the grid is an upper bound and
// positions that are not run starts exit after one comparison.
// =============================================================================================
extern "C" __global__ void emb_keys_bags(const u64* __restrict__ offsets, const u64* __restrict__ ids, i64 num_bags,
                                         u32* __restrict__ keys, u32* __restrict__ vals, u32* __restrict__ long_counters) {
    i64 gt = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (gt < 4) long_counters[gt] = 0u;
    i64 b = gt >> 5;
    int lane = threadIdx.x & 31;
    if (b >= num_bags) return;
    u64 s = offsets[b], e = offsets[b + 1];
    for (u64 j = s + lane; j < e; j += 32) { keys[j] = (u32)ids[j]; vals[j] = (u32)b; }
}

__device__ __forceinline__ void f4_fma(float4& a, float s, const float4& x) {
    a.x += s * x.x; a.y += s * x.y; a.z += s * x.z; a.w += s * x.w;
}

template <int KV>
__device__ __forceinline__ void emb_bwd_fused_impl(float* __restrict__ W, float* __restrict__ state, i64 cols,
                                                   const u32* __restrict__ keys, const u32* __restrict__ vals, i64 n,
                                                   const float* __restrict__ grad, i64 stride, i64 col,
                                                   const float* __restrict__ scale, Opt o, int tlog,
                                                   u32* __restrict__ long_counters, u32* __restrict__ long_info,
                                                   u64* __restrict__ items, float* __restrict__ acc) {
    const int T = 1 << tlog;
    const int lane = threadIdx.x & 31;
    const int gl = lane & (T - 1);
    const int gbase = lane & ~(T - 1);
    const u32 gmask = (T == 32) ? FULL : (((1u << T) - 1u) << gbase);
    const int nv = (int)(cols >> 2);
    i64 g = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> tlog;
    i64 ng = ((i64)gridDim.x * blockDim.x) >> tlog;
    for (i64 i = g; i < n; i += ng) {
        u32 key = keys[i];
        if (i > 0 && keys[i - 1] == key) continue;           // not a run start (uniform in the group)
        // Prefetch the row (weights, row-wise state) while the run is being found and summed.
        float4* w4 = reinterpret_cast<float4*>(W + (u64)key * (u64)cols);
        float4 wv[KV];
        #pragma unroll
        for (int k = 0; k < KV; ++k) { int c = gl + T * k; wv[k] = c < nv ? w4[c] : make_float4(0.f, 0.f, 0.f, 0.f); }
        float st_row = (o.kind == 1) ? state[key] : 0.f;
        // Run end: probe SHORT_RUN positions after i, T at a time.
        i64 e = -1;
        for (int r = 0; r < SHORT_RUN; r += T) {
            i64 p = i + 1 + r + gl;
            bool stop = (p >= n) || (keys[p] != key);
            u32 bal = (__ballot_sync(gmask, stop) >> gbase) & (T == 32 ? FULL : ((1u << T) - 1u));
            if (bal) { e = i + 1 + r + (__ffs(bal) - 1); break; }
        }
        if (e < 0) {
            // Long run (> SHORT_RUN occurrences): gallop then bisect for its end, register it.
            u32 li = 0;
            if (gl == 0) {
                i64 lo = i + SHORT_RUN, step = SHORT_RUN, hi = lo + step;   // keys[lo] == key
                while (hi < n && keys[hi] == key) { lo = hi; step <<= 1; hi = lo + step; }
                if (hi > n) hi = n;                                          // answer in (lo, hi]
                while (hi - lo > 1) { i64 m = lo + ((hi - lo) >> 1); if (keys[m] == key) lo = m; else hi = m; }
                e = hi;
                li = atomicAdd(&long_counters[0], 1u);
                long_info[3 * (u64)li] = (u32)i;
                long_info[3 * (u64)li + 1] = (u32)e;
                long_info[3 * (u64)li + 2] = key;
                u32 nch = (u32)((e - i + CHUNK - 1) / CHUNK);
                u32 b0 = atomicAdd(&long_counters[1], nch);
                for (u32 k = 0; k < nch; ++k) items[b0 + k] = ((u64)li << 32) | k;
            }
            li = __shfl_sync(gmask, li, gbase);
            for (i64 c = gl; c < cols; c += T) acc[(u64)li * cols + c] = 0.f;
            continue;
        }
        // Sum the run's scaled gradient rows (CPU order: bags ascending).
        float4 gv[KV];
        #pragma unroll
        for (int k = 0; k < KV; ++k) gv[k] = make_float4(0.f, 0.f, 0.f, 0.f);
        const int len = (int)(e - i);
        u32 bpre = vals[min(i + gl, n - 1)];     // issued before len is known (one latency level less)
        const float4* g4 = reinterpret_cast<const float4*>(grad + col);
        const i64 s4 = stride >> 2;
        #pragma unroll 4
        for (int j = 0; j < len; ++j) {
            u32 b = (j < T) ? __shfl_sync(gmask, bpre, gbase + j) : vals[i + j];
            float sc = scale ? scale[b] : 1.f;
            const float4* gp = g4 + (u64)b * s4;
            #pragma unroll
            for (int k = 0; k < KV; ++k) { int c = gl + T * k; if (c < nv) f4_fma(gv[k], sc, __ldg(gp + c)); }
        }
        if (o.l2 != 0.f) {
            #pragma unroll
            for (int k = 0; k < KV; ++k) f4_fma(gv[k], o.l2, wv[k]);
        }
        if (o.kind == 0) {
            #pragma unroll
            for (int k = 0; k < KV; ++k) { int c = gl + T * k; if (c < nv) { float4 w = wv[k]; f4_fma(w, -o.lr, gv[k]); w4[c] = w; } }
        } else if (o.kind == 1) {
            float s = 0.f;
            #pragma unroll
            for (int k = 0; k < KV; ++k) s += gv[k].x * gv[k].x + gv[k].y * gv[k].y + gv[k].z * gv[k].z + gv[k].w * gv[k].w;
            for (int off = T >> 1; off > 0; off >>= 1) s += __shfl_xor_sync(gmask, s, off);
            float v = st_row + s / o.dim;
            if (gl == 0) state[key] = v;
            float rt = rate(o, v);
            #pragma unroll
            for (int k = 0; k < KV; ++k) { int c = gl + T * k; if (c < nv) { float4 w = wv[k]; f4_fma(w, -rt, gv[k]); w4[c] = w; } }
        } else {
            float4* st4 = reinterpret_cast<float4*>(state + (u64)key * (u64)cols);
            #pragma unroll
            for (int k = 0; k < KV; ++k) {
                int c = gl + T * k;
                if (c < nv) {
                    float4 st = st4[c], w = wv[k], gg = gv[k];
                    st.x += gg.x * gg.x; st.y += gg.y * gg.y; st.z += gg.z * gg.z; st.w += gg.w * gg.w;
                    w.x -= rate(o, st.x) * gg.x; w.y -= rate(o, st.y) * gg.y; w.z -= rate(o, st.z) * gg.z; w.w -= rate(o, st.w) * gg.w;
                    st4[c] = st; w4[c] = w;
                }
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) emb_bwd_fused1(float* W, float* state, i64 cols, const u32* __restrict__ keys, const u32* __restrict__ vals, i64 n,
                                      const float* __restrict__ grad, i64 stride, i64 col, const float* __restrict__ scale, Opt o, int tlog,
                                      u32* long_counters, u32* long_info, u64* items, float* acc) {
    emb_bwd_fused_impl<1>(W, state, cols, keys, vals, n, grad, stride, col, scale, o, tlog, long_counters, long_info, items, acc);
}

extern "C" __global__ void __launch_bounds__(256) emb_bwd_fused4(float* W, float* state, i64 cols, const u32* __restrict__ keys, const u32* __restrict__ vals, i64 n,
                                      const float* __restrict__ grad, i64 stride, i64 col, const float* __restrict__ scale, Opt o, int tlog,
                                      u32* long_counters, u32* long_info, u64* items, float* acc) {
    emb_bwd_fused_impl<4>(W, state, cols, keys, vals, n, grad, stride, col, scale, o, tlog, long_counters, long_info, items, acc);
}

// Long runs registered by emb_bwd_fused*: long_info[3 li] = (start, end, row); vals are bags.
extern "C" __global__ void __launch_bounds__(256) emb_bwd_long_accum2(i64 cols, const u32* __restrict__ vals, const float* __restrict__ grad, i64 stride, i64 col,
                                               const float* __restrict__ scale, const u32* __restrict__ long_counters,
                                               const u32* __restrict__ long_info, const u64* __restrict__ items, float* acc) {
    __shared__ float part[8][MAXC * 32];
    int t = threadIdx.x, warp = t >> 5, lane = t & 31;
    u32 nitems = long_counters[1];
    for (u64 it = blockIdx.x; it < nitems; it += gridDim.x) {
        u64 item = items[it];
        u32 li = (u32)(item >> 32), k0 = (u32)item;
        u32 s = long_info[3 * (u64)li] + k0 * CHUNK, e = min(long_info[3 * (u64)li + 1], s + CHUNK);
        float g[MAXC];
        #pragma unroll
        for (int k = 0; k < MAXC; ++k) g[k] = 0.f;
        for (u32 j = s + warp; j < e; j += 8) {
            u32 b = vals[j];
            float sc = scale ? scale[b] : 1.f;
            const float* gp = grad + (u64)b * stride + col;
            #pragma unroll
            for (int k = 0; k < MAXC; ++k) { i64 c = lane + 32 * k; if (c < cols) g[k] += sc * gp[c]; }
        }
        #pragma unroll
        for (int k = 0; k < MAXC; ++k) part[warp][lane + 32 * k] = g[k];
        __syncthreads();
        for (i64 c = t; c < cols; c += 256) {
            float x = 0.f;
            #pragma unroll
            for (int w = 0; w < 8; ++w) x += part[w][c];
            atomicAdd(&acc[(u64)li * cols + c], x);
        }
        __syncthreads();
    }
}

extern "C" __global__ void emb_bwd_long_apply2(float* W, float* state, i64 cols, const u32* __restrict__ long_counters,
                                               const u32* __restrict__ long_info, const float* __restrict__ acc, Opt o) {
    u32 nl = long_counters[0];
    int lane = threadIdx.x & 31;
    i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    i64 nwarps = ((i64)gridDim.x * blockDim.x) >> 5;
    for (i64 li = warp; li < nl; li += nwarps) {
        float g[MAXC];
        #pragma unroll
        for (int k = 0; k < MAXC; ++k) { i64 c = lane + 32 * k; g[k] = c < cols ? acc[(u64)li * cols + c] : 0.f; }
        finish_row(lane, (u32)li, (u64)long_info[3 * (u64)li + 2], g, cols, W, state, o, 0, 0, 0, 0);
    }
}

// Long runs, float4 version for the fast path: a block of 256 threads = 256/T groups of T lanes;
// group q sums occurrences s+q, s+q+G, ... of one CHUNK (4 in flight), shared-memory reduction
// over the groups, one atomicAdd per column into acc.
template <int KV>
__device__ __forceinline__ void long_accum_v4_impl(i64 cols, const u32* __restrict__ vals, const float* __restrict__ grad, i64 stride, i64 col,
                                                   const float* __restrict__ scale, const u32* __restrict__ long_counters,
                                                   const u32* __restrict__ long_info, const u64* __restrict__ items, float* acc, int tlog) {
    __shared__ float4 part[256 * KV];
    const int T = 1 << tlog;
    const int t = threadIdx.x, gl = t & (T - 1), q = t >> tlog, G = 256 >> tlog;
    const int nv = (int)(cols >> 2);
    const float4* g4 = reinterpret_cast<const float4*>(grad + col);
    const i64 s4 = stride >> 2;
    u32 nitems = long_counters[1];
    for (u64 it = blockIdx.x; it < nitems; it += gridDim.x) {
        u64 item = items[it];
        u32 li = (u32)(item >> 32), k0 = (u32)item;
        u32 s = long_info[3 * (u64)li] + k0 * CHUNK, e = min(long_info[3 * (u64)li + 1], s + CHUNK);
        float4 gv[KV];
        #pragma unroll
        for (int k = 0; k < KV; ++k) gv[k] = make_float4(0.f, 0.f, 0.f, 0.f);
        #pragma unroll 4
        for (u32 j = s + q; j < e; j += G) {
            u32 b = vals[j];
            float sc = scale ? scale[b] : 1.f;
            const float4* gp = g4 + (u64)b * s4;
            #pragma unroll
            for (int k = 0; k < KV; ++k) { int c = gl + T * k; if (c < nv) f4_fma(gv[k], sc, __ldg(gp + c)); }
        }
        #pragma unroll
        for (int k = 0; k < KV; ++k) part[q * (T * KV) + gl + T * k] = gv[k];
        __syncthreads();
        float* pf = reinterpret_cast<float*>(part);
        for (int c = t; c < (int)cols; c += 256) {
            int c4 = c >> 2, lane4 = c & 3;
            int k = c4 / T, glc = c4 % T;
            float x = 0.f;
            for (int g = 0; g < G; ++g) x += pf[(g * (T * KV) + glc + T * k) * 4 + lane4];
            atomicAdd(&acc[(u64)li * cols + c], x);
        }
        __syncthreads();
    }
}

extern "C" __global__ void __launch_bounds__(256) emb_bwd_long_accum_v4_1(i64 cols, const u32* __restrict__ vals, const float* __restrict__ grad, i64 stride, i64 col,
                                                   const float* __restrict__ scale, const u32* __restrict__ long_counters,
                                                   const u32* __restrict__ long_info, const u64* __restrict__ items, float* acc, int tlog) {
    long_accum_v4_impl<1>(cols, vals, grad, stride, col, scale, long_counters, long_info, items, acc, tlog);
}

extern "C" __global__ void __launch_bounds__(256) emb_bwd_long_accum_v4_4(i64 cols, const u32* __restrict__ vals, const float* __restrict__ grad, i64 stride, i64 col,
                                                   const float* __restrict__ scale, const u32* __restrict__ long_counters,
                                                   const u32* __restrict__ long_info, const u64* __restrict__ items, float* acc, int tlog) {
    long_accum_v4_impl<4>(cols, vals, grad, stride, col, scale, long_counters, long_info, items, acc, tlog);
}
