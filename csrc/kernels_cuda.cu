/* kernels_cuda.cu - the GPU twin of kernels.c: element-wise ops, spatial dropout, the DeepSpot loss,
 * the Adam update and the BN moving statistics as CUDA kernels, for the GPU backend (ops_cuda.cu holds
 * the cuDNN ops and the backend itself). Everything is queued on the backend's stream and nothing here
 * waits for the device or reads device memory from the host, so a whole training step is queued at once.
 * Results follow kernels.c: the dropout mask bit for bit, Adam and the moving statistics rounded as the
 * CPU rounds them, and the loss reduced in a fixed order (deterministic; its sums differ from the CPU's
 * sequential ones only in the last bits). */
#include "cuda_backend.h"

#include <math.h>
#include <stdint.h>

/* ---- element-wise ---- */

static __global__ void add_kernel(float *dst, const float *a, const float *b, size_t n)
{
    GRID_STRIDE_LOOP(i, n)
        dst[i] = a[i] + b[i];
}

ds_status ds_add_forward(ds_backend *backend, float *dst, const float *a, const float *b, size_t n)
{
    if (n == 0)
        return DS_OK;
    add_kernel<<<ds_blocks(n), DS_THREADS, 0, backend->stream>>>(dst, a, b, n);
    LAUNCH_TRY();
    return DS_OK;
}

ds_status ds_add_inplace(ds_backend *backend, float *dst, const float *src, size_t n)
{
    return ds_add_forward(backend, dst, dst, src, n);
}

static __global__ void relu_kernel(float *x, size_t n)
{
    GRID_STRIDE_LOOP(i, n)
        x[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

ds_status ds_relu_inplace(ds_backend *backend, float *x, size_t n)
{
    if (n == 0)
        return DS_OK;
    relu_kernel<<<ds_blocks(n), DS_THREADS, 0, backend->stream>>>(x, n);
    LAUNCH_TRY();
    return DS_OK;
}

/* dsrc may alias ddst: each value is read before it is written, by the same thread */
static __global__ void relu_backward_kernel(float *dsrc, const float *ddst, const float *dst, size_t n,
                                            int accumulate)
{
    GRID_STRIDE_LOOP(i, n) {
        float passed = dst[i] > 0.0f ? ddst[i] : 0.0f;
        dsrc[i] = accumulate ? dsrc[i] + passed : passed;
    }
}

ds_status ds_relu_backward(ds_backend *backend, float *dsrc, const float *ddst, const float *dst, size_t n,
                           int accumulate)
{
    if (n == 0)
        return DS_OK;
    relu_backward_kernel<<<ds_blocks(n), DS_THREADS, 0, backend->stream>>>(dsrc, ddst, dst, n, accumulate);
    LAUNCH_TRY();
    return DS_OK;
}

/* The host arrays of ds_concat_backward, passed to the kernel by value. */
typedef struct {
    float *dsrcs[CONCAT_MAX_INPUTS];
    int channels[CONCAT_MAX_INPUTS];
    int n_inputs;
    int total_channels;
} concat_split;

/* one thread per value of ddst, so the reads are coalesced */
static __global__ void concat_backward_kernel(concat_split split, const float *ddst, size_t n)
{
    GRID_STRIDE_LOOP(i, n) {
        size_t pixel = i / (size_t)split.total_channels;
        int c = (int)(i % (size_t)split.total_channels), width = split.channels[0];
        float *out = split.dsrcs[0];
        /* unrolled so that the struct is indexed by constants (no copy to local memory) */
#pragma unroll
        for (int k = 1; k < CONCAT_MAX_INPUTS; k++)
            if (k < split.n_inputs && c >= width) {
                c -= width;
                out = split.dsrcs[k];
                width = split.channels[k];
            }
        out[pixel * (size_t)width + (size_t)c] = ddst[i];
    }
}

ds_status ds_concat_backward(ds_backend *backend, float *const *dsrcs, const float *ddst, size_t pixels, int n_inputs,
                             const int *channels)
{
    if (n_inputs < 1 || n_inputs > CONCAT_MAX_INPUTS)
        return ds_fail(DS_ERR_VALUE, "concat_backward: %d inputs, expected 1 to %d", n_inputs, CONCAT_MAX_INPUTS);
    concat_split split = {};
    split.n_inputs = n_inputs;
    for (int k = 0; k < n_inputs; k++) {
        split.dsrcs[k] = dsrcs[k];
        split.channels[k] = channels[k];
        split.total_channels += channels[k];
    }
    size_t n = pixels * (size_t)split.total_channels;
    if (n == 0)
        return DS_OK;
    concat_backward_kernel<<<ds_blocks(n), DS_THREADS, 0, backend->stream>>>(split, ddst, n);
    LAUNCH_TRY();
    return DS_OK;
}

/* ---- spatial dropout ---- */

/* kernels.c's hash: the host derives the stream's base, the device the draws */
static __host__ __device__ uint64_t splitmix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static __global__ void dropout_mask_kernel(float *mask, size_t n, uint64_t base, float rate, float keep_scale)
{
    GRID_STRIDE_LOOP(i, n) {
        /* 24 random bits -> a uniform draw in [0, 1) */
        double u = (double)(splitmix64(base + (uint64_t)i) >> 40) * (1.0 / 16777216.0);
        mask[i] = rate > 0.0f && u < rate ? 0.0f : keep_scale;
    }
}

ds_status ds_dropout_mask(ds_backend *backend, float *mask, int batch, int channels, float rate,
                          unsigned long long seed, unsigned long long stream)
{
    if (batch <= 0 || channels <= 0)
        return DS_OK;
    size_t n = (size_t)batch * (size_t)channels;
    float keep_scale = rate > 0.0f ? 1.0f / (1.0f - rate) : 1.0f;
    uint64_t base = splitmix64(splitmix64((uint64_t)seed) ^ (uint64_t)stream);
    dropout_mask_kernel<<<ds_blocks(n), DS_THREADS, 0, backend->stream>>>(mask, n, base, rate, keep_scale);
    LAUNCH_TRY();
    return DS_OK;
}

static __global__ void spatial_dropout_kernel(float *dst, const float *src, const float *mask, size_t n,
                                              size_t image_size, size_t channels)
{
    GRID_STRIDE_LOOP(i, n)
        dst[i] = src[i] * mask[i / image_size * channels + i % channels];
}

ds_status ds_spatial_dropout_forward(ds_backend *backend, float *dst, const float *src, const float *mask, int batch,
                                     size_t pixels, int channels)
{
    if (batch <= 0 || channels <= 0 || pixels == 0)
        return DS_OK;
    size_t image_size = pixels * (size_t)channels, n = (size_t)batch * image_size;
    spatial_dropout_kernel<<<ds_blocks(n), DS_THREADS, 0, backend->stream>>>(dst, src, mask, n, image_size,
                                                                              (size_t)channels);
    LAUNCH_TRY();
    return DS_OK;
}

/* ---- loss ----
 * Three kernels. loss_values: one block per (row, chunk), a row being one group of the max term (the
 * whole batch, or one image for DS_MAX_PER_IMAGE), a chunk a strided share of it; each block writes
 * pred and the BCE part of dlogits and leaves its partial sums in the scratch. loss_finalize: one
 * block; a warp per row merges the row's chunks, then one thread adds the rows up in order and writes
 * terms. loss_max_gradient: the same grid as loss_values adds the max term's gradient to the tied
 * maxima. The reductions follow a fixed pattern that depends only on the shape: deterministic.
 * Scratch: loss_sums[rows * chunks], then loss_row[rows]. */

/* What a block, then a row, has summed up. */
typedef struct {
    double bce;              /* sum of the per-value BCE */
    float max_p;             /* largest p seen, -1 before any (p >= 0) */
    float max_t;             /* largest target seen */
    unsigned long long ties; /* how many values have p == max_p */
} loss_sums;

/* One row's results: the max term's share and what loss_max_gradient needs. */
typedef struct {
    double bce;       /* sum of the row's BCE */
    double max_term;  /* (max p - max t)^2 / groups */
    double tie_share; /* d max_term / d max p, per tied maximum */
    float max_p;
} loss_row;

#define LOSS_SCRATCH_BYTES (DS_SCRATCH_DOUBLES * sizeof(double))
#define LOSS_MAX_ROWS ((int)(LOSS_SCRATCH_BYTES / (sizeof(loss_sums) + sizeof(loss_row))))
#define WARP 32

static __device__ loss_sums no_values(void)
{
    loss_sums none = {0.0, -1.0f, -INFINITY, 0};
    return none;
}

/* NaN p or t never win, as in kernels.c's comparisons */
static __device__ loss_sums merge_sums(loss_sums a, loss_sums b)
{
    loss_sums m;
    m.bce = a.bce + b.bce;
    m.max_p = b.max_p > a.max_p ? b.max_p : a.max_p;
    m.ties = (a.max_p == m.max_p ? a.ties : 0) + (b.max_p == m.max_p ? b.ties : 0);
    m.max_t = b.max_t > a.max_t ? b.max_t : a.max_t;
    return m;
}

/* the result is in lane 0 */
static __device__ loss_sums warp_merge(loss_sums sums)
{
    for (int offset = WARP / 2; offset > 0; offset /= 2) {
        loss_sums other;
        other.bce = __shfl_down_sync(0xffffffffu, sums.bce, offset);
        other.max_p = __shfl_down_sync(0xffffffffu, sums.max_p, offset);
        other.max_t = __shfl_down_sync(0xffffffffu, sums.max_t, offset);
        other.ties = __shfl_down_sync(0xffffffffu, sums.ties, offset);
        sums = merge_sums(sums, other);
    }
    return sums;
}

/* for blocks of DS_THREADS threads; the result is in thread 0 */
static __device__ loss_sums block_merge(loss_sums sums)
{
    __shared__ loss_sums warp_sums[DS_THREADS / WARP];
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    sums = warp_merge(sums);
    if (lane == 0)
        warp_sums[warp] = sums;
    __syncthreads();
    if (warp == 0)
        sums = warp_merge(lane < DS_THREADS / WARP ? warp_sums[lane] : no_values());
    return sums;
}

#define BCE_EPSILON 1e-7f /* Keras backend.epsilon() */

/* The BCE of one value and its derivative by z, as kernels.c computes them. */
static __device__ double bce_value(float z, float t, float p, int bce_mode, double *grad)
{
    if (bce_mode == DS_BCE_CLIPPED) {
        double pc = p < BCE_EPSILON ? BCE_EPSILON : p > 1.0f - BCE_EPSILON ? 1.0f - BCE_EPSILON : p;
        /* clip_by_value passes the gradient inside [lo, hi] only */
        int inside = p >= BCE_EPSILON && p <= 1.0f - BCE_EPSILON;
        *grad = inside ? (pc - t) / (pc * (1.0 - pc)) * ((double)p * (1.0 - (double)p)) : 0.0;
        return -(t * log(pc) + (1.0 - t) * log(1.0 - pc));
    }
    double zd = z;
    *grad = (double)p - t;
    return (zd > 0.0 ? zd : 0.0) - zd * t + log1p(exp(-fabs(zd)));
}

static __global__ void loss_values(loss_sums *partials, float *pred, float *dlogits, const float *logits,
                                   const float *target, size_t row_len, int chunks, int bce_mode, double inv_n)
{
    size_t row_start = (size_t)(blockIdx.x / chunks) * row_len;
    loss_sums sums = no_values();
    STRIDED_LOOP(k, row_len, blockIdx.x % chunks, chunks) {
        size_t i = row_start + k;
        float z = logits[i], t = target[i], p = ds_sigmoid(z);
        double grad;
        loss_sums value = {bce_value(z, t, p, bce_mode, &grad), p, t, 1};
        sums = merge_sums(sums, value);
        if (pred)
            pred[i] = p;
        if (dlogits)
            dlogits[i] = (float)(grad * inv_n);
    }
    sums = block_merge(sums);
    if (threadIdx.x == 0)
        partials[blockIdx.x] = sums;
}

/* one block of DS_THREADS threads */
static __global__ void loss_finalize(double *terms, loss_row *rows_out, const loss_sums *partials, int rows,
                                     int chunks, int with_max, double inv_n)
{
    int lane = threadIdx.x % WARP;
    for (int r = threadIdx.x / WARP; r < rows; r += DS_THREADS / WARP) {
        loss_sums sums = no_values();
        for (int c = lane; c < chunks; c += WARP)
            sums = merge_sums(sums, partials[(size_t)r * chunks + c]);
        sums = warp_merge(sums);
        if (lane == 0) {
            /* rows are the max term's groups */
            double diff = (double)sums.max_p - (double)sums.max_t;
            loss_row row = {sums.bce, 0.0, 0.0, sums.max_p};
            if (with_max) {
                row.max_term = diff * diff / rows;
                row.tie_share = 2.0 * diff / rows / (double)sums.ties;
            }
            rows_out[r] = row;
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double bce = 0.0, max_term = 0.0;
        for (int r = 0; r < rows; r++) {
            bce += rows_out[r].bce;
            max_term += rows_out[r].max_term;
        }
        bce *= inv_n;
        terms[0] = bce + max_term;
        terms[1] = bce;
        terms[2] = max_term;
    }
}

/* d max_term / d z = tie_share * sigmoid'(z), sigmoid' = p (1 - p), for the values with p == max p */
static __global__ void loss_max_gradient(float *dlogits, const float *logits, const loss_row *rows, size_t row_len,
                                         int chunks)
{
    unsigned row = blockIdx.x / chunks;
    float max_p = rows[row].max_p;
    double tie_share = rows[row].tie_share;
    size_t row_start = (size_t)row * row_len;
    STRIDED_LOOP(k, row_len, blockIdx.x % chunks, chunks) {
        size_t i = row_start + k;
        float p = ds_sigmoid(logits[i]);
        if (p == max_p)
            dlogits[i] += (float)(tie_share * ((double)p * (1.0 - (double)p)));
    }
}

ds_status ds_deepspot_loss(ds_backend *backend, double *terms, float *pred, float *dlogits, const float *logits,
                           const float *target, int batch, size_t pixels, int bce_mode, int max_mode)
{
    if (batch <= 0 || pixels == 0)
        return ds_fail(DS_ERR_VALUE, "deepspot_loss: empty batch (%d x %zu values)", batch, pixels);
    int with_max = max_mode == DS_MAX_BATCH || max_mode == DS_MAX_PER_IMAGE;
    int rows = max_mode == DS_MAX_PER_IMAGE ? batch : 1;
    if (rows > LOSS_MAX_ROWS)
        return ds_fail(DS_ERR_VALUE, "deepspot_loss: the per-image max term takes at most %d images on the GPU, got %d",
                       LOSS_MAX_ROWS, rows);
    size_t n = (size_t)batch * pixels, row_len = n / (size_t)rows;
    /* as many chunks as keep every thread busy, as far as the scratch holds their sums */
    size_t chunks_wanted = (row_len + DS_THREADS - 1) / DS_THREADS;
    size_t chunks_fitting = (LOSS_SCRATCH_BYTES / (size_t)rows - sizeof(loss_row)) / sizeof(loss_sums);
    int chunks = (int)(chunks_wanted < chunks_fitting ? chunks_wanted : chunks_fitting);
    unsigned blocks = (unsigned)(rows * chunks);
    loss_sums *partials = (loss_sums *)backend->scratch;
    loss_row *row_results = (loss_row *)(partials + blocks);
    double inv_n = 1.0 / (double)n;

    loss_values<<<blocks, DS_THREADS, 0, backend->stream>>>(partials, pred, dlogits, logits, target, row_len, chunks,
                                                             bce_mode, inv_n);
    LAUNCH_TRY();
    loss_finalize<<<1, DS_THREADS, 0, backend->stream>>>(terms, row_results, partials, rows, chunks, with_max, inv_n);
    LAUNCH_TRY();
    if (with_max && dlogits) {
        loss_max_gradient<<<blocks, DS_THREADS, 0, backend->stream>>>(dlogits, logits, row_results, row_len, chunks);
        LAUNCH_TRY();
    }
    return DS_OK;
}

/* ---- Adam (Keras) and BN moving statistics ----
 * The step's factors are computed on the host exactly as kernels.c does. The CPU build rounds every
 * product on its own (no FMA on baseline x86-64), so products that feed an addition use __fmul_rn,
 * which the compiler never contracts into an FMA: the updates then match the CPU bit for bit. */

static __device__ bool guard_passes(const double *guard) { return !guard || isfinite(*guard); }

static __global__ void adam_kernel(float *param, float *m, float *v, const float *grad, size_t n, float alpha,
                                   float one_minus_b1, float one_minus_b2, float epsilon, const double *guard)
{
    if (!guard_passes(guard))
        return;
    GRID_STRIDE_LOOP(i, n) {
        float g = grad[i];
        float mi = m[i] + __fmul_rn(g - m[i], one_minus_b1);
        float vi = v[i] + __fmul_rn(__fmul_rn(g, g) - v[i], one_minus_b2);
        m[i] = mi;
        v[i] = vi;
        param[i] -= mi * alpha / (sqrtf(vi) + epsilon);
    }
}

ds_status ds_adam_update(ds_backend *backend, float *param, float *m, float *v, const float *grad, size_t n, float lr,
                         double beta1, double beta2, float epsilon, long step, const double *guard)
{
    if (n == 0)
        return DS_OK;
    float t = (float)step;
    float b1t = powf((float)beta1, t), b2t = powf((float)beta2, t);
    float alpha = lr * sqrtf(1.0f - b2t) / (1.0f - b1t);
    float one_minus_b1 = (float)(1.0 - beta1), one_minus_b2 = (float)(1.0 - beta2);
    adam_kernel<<<ds_blocks(n), DS_THREADS, 0, backend->stream>>>(param, m, v, grad, n, alpha, one_minus_b1,
                                                                   one_minus_b2, epsilon, guard);
    LAUNCH_TRY();
    return DS_OK;
}

static __global__ void moving_statistics_kernel(float *moving_mean, float *moving_variance, const float *mean,
                                                const float *variance, size_t channels, float keep, float rest,
                                                float variance_correction, const double *guard)
{
    if (!guard_passes(guard))
        return;
    GRID_STRIDE_LOOP(c, channels) {
        moving_mean[c] = __fmul_rn(moving_mean[c], keep) + __fmul_rn(mean[c], rest);
        moving_variance[c] = __fmul_rn(moving_variance[c], keep) +
                             __fmul_rn(__fmul_rn(variance[c], variance_correction), rest);
    }
}

ds_status ds_moving_statistics_update(ds_backend *backend, float *moving_mean, float *moving_variance,
                                      const float *mean, const float *variance, int channels, double momentum,
                                      float variance_correction, const double *guard)
{
    if (channels <= 0)
        return DS_OK;
    /* both factors rounded from the double momentum, as Keras does */
    float keep = (float)momentum, rest = (float)(1.0 - momentum);
    moving_statistics_kernel<<<ds_blocks((size_t)channels), DS_THREADS, 0, backend->stream>>>(
        moving_mean, moving_variance, mean, variance, (size_t)channels, keep, rest, variance_correction, guard);
    LAUNCH_TRY();
    return DS_OK;
}
