// Ember dense kernels: bias + activation, reductions, interaction, DCN cross combine, loss,
// dense optimizers, and the element-wise helpers (fill, axpy, scale: the replica-sync average is
// a sum of axpys and a scale by 1/M).
typedef unsigned long long u64;
typedef long long i64;

#define GRID_STRIDE(i, n) for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)

extern "C" __global__ void fill_f32(float* x, i64 n, float v) { GRID_STRIDE(i, n) x[i] = v; }

extern "C" __global__ void axpy_f32(float a, const float* __restrict__ x, float* __restrict__ y, i64 n) {
    GRID_STRIDE(i, n) y[i] += a * x[i];
}

extern "C" __global__ void scale_f32(float* x, float a, i64 n) { GRID_STRIDE(i, n) x[i] *= a; }

// x (rows x cols) += bias, then act (0 none, 1 relu).
extern "C" __global__ void bias_act(float* x, const float* __restrict__ bias, i64 rows, i64 cols, int act) {
    GRID_STRIDE(i, rows * cols) {
        float v = x[i] + bias[i % cols];
        if (act == 1) v = v > 0.f ? v : 0.f;
        x[i] = v;
    }
}

extern "C" __global__ void act_backward(const float* __restrict__ y, float* dy, i64 n, int act) {
    if (act == 0) return;
    GRID_STRIDE(i, n) if (!(y[i] > 0.f)) dy[i] = 0.f;
}

// out[c] = beta * out[c] + sum_r x[r, c]. Block: 32 columns x 8 row lanes.
extern "C" __global__ void col_sum(const float* __restrict__ x, i64 rows, i64 cols, float beta, float* out) {
    __shared__ float part[8][33];
    int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    i64 c = (i64)blockIdx.x * 32 + tx;
    float s = 0.f;
    if (c < cols)
        for (i64 r = ty; r < rows; r += 8) s += x[r * cols + c];
    part[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && c < cols) {
        float t = 0.f;
        for (int k = 0; k < 8; ++k) t += part[k][tx];
        out[c] = beta == 0.f ? t : beta * out[c] + t;
    }
}

// narrow (rows x cols) <-> wide[r * stride + col + c]
extern "C" __global__ void copy_block(float* narrow, float* wide, i64 rows, i64 cols, i64 stride, i64 col, int to_wide) {
    GRID_STRIDE(i, rows * cols) {
        i64 r = i / cols, c = i % cols;
        if (to_wide) wide[r * stride + col + c] = narrow[i];
        else narrow[i] = wide[r * stride + col + c];
    }
}

// dst[dst_off + r * dst_stride + c] = src[src_off + r * src_stride + c]: the 2D step's packing.
extern "C" __global__ void copy_2d(const float* __restrict__ src, i64 src_off, i64 src_stride, float* __restrict__ dst, i64 dst_off, i64 dst_stride, i64 rows, i64 cols) {
    GRID_STRIDE(i, rows * cols) {
        i64 r = i / cols, c = i % cols;
        dst[dst_off + r * dst_stride + c] = src[src_off + r * src_stride + c];
    }
}

// x[off + r * stride + c] *= s[r]: per-sample gradient scaling.
extern "C" __global__ void scale_rows(float* x, i64 off, i64 stride, i64 rows, i64 cols, const float* __restrict__ s) {
    GRID_STRIDE(i, rows * cols) {
        i64 r = i / cols, c = i % cols;
        x[off + r * stride + c] *= s[r];
    }
}

// Dot interaction. x: (batch, f+1, d). out: (batch, d + (f+1)f/2): the dense vector, then for
// i in 1..=f, j in 0..i: <x_i, x_j> (row-major lower triangle without the diagonal).
extern "C" __global__ void dot_interaction(const float* __restrict__ x, i64 batch, i64 f, i64 d, float* __restrict__ out) {
    i64 np = (f + 1) * f / 2, w = d + np;
    GRID_STRIDE(t, batch * w) {
        i64 b = t / w, k = t % w;
        const float* xb = x + b * (f + 1) * d;
        if (k < d) { out[t] = xb[k]; continue; }
        i64 p = k - d;
        // p = i(i-1)/2 + j with j < i
        i64 i = (i64)((1.0 + sqrt(1.0 + 8.0 * (double)p)) * 0.5);
        while (i * (i - 1) / 2 > p) --i;
        while ((i + 1) * i / 2 <= p) ++i;
        i64 j = p - i * (i - 1) / 2;
        float s = 0.f;
        for (i64 e = 0; e < d; ++e) s += xb[i * d + e] * xb[j * d + e];
        out[t] = s;
    }
}

// dx[b, i, e] = [i == 0] dout[b, e] + sum_{j != i} dout[b, pair(i, j)] * x[b, j, e]
extern "C" __global__ void dot_interaction_backward(const float* __restrict__ x, const float* __restrict__ dout, i64 batch, i64 f, i64 d,
                                                    float* __restrict__ dx) {
    i64 n = f + 1, np = n * f / 2, w = d + np;
    GRID_STRIDE(t, batch * n * d) {
        i64 b = t / (n * d), r = t % (n * d), i = r / d, e = r % d;
        const float* xb = x + b * n * d;
        const float* db = dout + b * w + d;
        float s = i == 0 ? dout[b * w + e] : 0.f;
        for (i64 j = 0; j < n; ++j) {
            if (j == i) continue;
            i64 hi = i > j ? i : j, lo = i > j ? j : i;
            s += db[hi * (hi - 1) / 2 + lo] * xb[j * d + e];
        }
        dx[t] = s;
    }
}

// out = x0 * (uv + bias) + xl
extern "C" __global__ void cross_combine(const float* __restrict__ x0, const float* __restrict__ uv, const float* __restrict__ bias,
                                         const float* __restrict__ xl, i64 rows, i64 cols, float* __restrict__ out) {
    GRID_STRIDE(i, rows * cols) out[i] = x0[i] * (uv[i] + bias[i % cols]) + xl[i];
}

// duv = dout * x0; dx0 += dout * (uv + bias)
extern "C" __global__ void cross_combine_backward(const float* __restrict__ x0, const float* __restrict__ uv, const float* __restrict__ bias,
                                                  const float* __restrict__ dout, i64 rows, i64 cols, float* __restrict__ duv, float* dx0) {
    GRID_STRIDE(i, rows * cols) {
        float g = dout[i];
        duv[i] = g * x0[i];
        dx0[i] += g * (uv[i] + bias[i % cols]);
    }
}

// BCE with logits: dlogits = scale (sigmoid(x) - y); partial[block] = sum of losses (double).
extern "C" __global__ void __launch_bounds__(256) bce_with_logits(const float* __restrict__ x, const float* __restrict__ y, i64 n, float scale,
                                                                  float* __restrict__ dx, double* __restrict__ partial) {
    __shared__ double red[256];
    double acc = 0.0;
    GRID_STRIDE(i, n) {
        float z = x[i], t = y[i];
        float loss = fmaxf(z, 0.f) - z * t + log1pf(expf(-fabsf(z)));
        float sg = 1.f / (1.f + expf(-z));
        dx[i] = scale * (sg - t);
        acc += (double)loss;
    }
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int s = 128; s > 0; s >>= 1) {
        if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = red[0];
}

// Dense optimizers. kind 0: SGD p -= lr (g + l2 p). kind 1: AdaGrad s += g'^2, p -= lr g' / (sqrt(s) + eps).
extern "C" __global__ void dense_update(float* p, const float* __restrict__ g, float* s, i64 n, int kind, float lr, float eps, float l2) {
    GRID_STRIDE(i, n) {
        float gi = g[i] + l2 * p[i];
        if (kind == 0) {
            p[i] -= lr * gi;
        } else {
            float v = s[i] + gi * gi;
            s[i] = v;
            p[i] -= lr * gi / (sqrtf(v) + eps);
        }
    }
}

// Replica sync's packed rows. gather_rows: dst[i, c] = src[rows[i], c]; a row at or beyond
// src_rows is not read: it flags `bad` with its index + 1. put_rows, the mirror: dst[rows[i], c]
// = src[i, c], its rows checked beforehand (check_rows_ascending).
extern "C" __global__ void gather_rows(const float* __restrict__ src, u64 src_rows, const u64* __restrict__ rows, i64 nrows, i64 cols, float* __restrict__ dst, unsigned long long* bad) {
    GRID_STRIDE(t, nrows * cols) {
        i64 i = t / cols;
        u64 r = rows[i];
        if (r >= src_rows) {
            atomicCAS(bad, 0ull, (unsigned long long)(i + 1));
            continue;
        }
        dst[t] = src[(i64)r * cols + t % cols];
    }
}

extern "C" __global__ void put_rows(const float* __restrict__ src, const u64* __restrict__ rows, i64 nrows, i64 cols, float* __restrict__ dst) {
    GRID_STRIDE(t, nrows * cols) dst[(i64)rows[t / cols] * cols + t % cols] = src[t];
}

// The f64 mean of n contributions of len floats (parts[p * len + i]): summed in f64 in rank
// order starting from rank 0's, divided, rounded once (the host transport's exact arithmetic).
extern "C" __global__ void mean_f64_parts(const float* __restrict__ parts, int n, i64 len, float* __restrict__ out) {
    GRID_STRIDE(i, len) {
        double s = (double)parts[i];
        for (int p = 1; p < n; ++p) s += (double)parts[(i64)p * len + i];
        out[i] = (float)(s / (double)n);
    }
}
