/* kernels.c - the CPU kernels of ops.h (kernels_cuda.cu is their GPU twin): element-wise ops,
 * spatial dropout, the DeepSpot loss, the Adam update and the BN moving statistics. Backend memory
 * is host memory here, so the backend argument is unused. Loops are written to vectorise (-O3) and
 * the large ones are split over threads with OpenMP (the libgomp that oneDNN already uses). */
#include "ops.h"

#include <math.h>
#include <stdint.h>

#define PARALLEL_MIN 65536 /* below this many values a loop stays on one thread */

ds_status ds_add_forward(ds_backend *backend, float *dst, const float *a, const float *b, size_t n)
{
#pragma omp parallel for simd if (n >= PARALLEL_MIN) schedule(static)
    for (size_t i = 0; i < n; i++)
        dst[i] = a[i] + b[i];
    return DS_OK;
}

ds_status ds_add_inplace(ds_backend *backend, float *dst, const float *src, size_t n)
{
#pragma omp parallel for simd if (n >= PARALLEL_MIN) schedule(static)
    for (size_t i = 0; i < n; i++)
        dst[i] += src[i];
    return DS_OK;
}

ds_status ds_relu_inplace(ds_backend *backend, float *x, size_t n)
{
#pragma omp parallel for simd if (n >= PARALLEL_MIN) schedule(static)
    for (size_t i = 0; i < n; i++)
        x[i] = x[i] > 0.0f ? x[i] : 0.0f;
    return DS_OK;
}

ds_status ds_relu_backward(ds_backend *backend, float *dsrc, const float *ddst, const float *dst, size_t n,
                           int accumulate)
{
    if (accumulate) {
#pragma omp parallel for simd if (n >= PARALLEL_MIN) schedule(static)
        for (size_t i = 0; i < n; i++)
            dsrc[i] += dst[i] > 0.0f ? ddst[i] : 0.0f;
    } else {
#pragma omp parallel for simd if (n >= PARALLEL_MIN) schedule(static)
        for (size_t i = 0; i < n; i++)
            dsrc[i] = dst[i] > 0.0f ? ddst[i] : 0.0f;
    }
    return DS_OK;
}

ds_status ds_concat_backward(ds_backend *backend, float *const *dsrcs, const float *ddst, size_t pixels, int n_inputs,
                             const int *channels)
{
    int total = 0;
    for (int k = 0; k < n_inputs; k++)
        total += channels[k];
#pragma omp parallel for if (pixels * (size_t)total >= PARALLEL_MIN) schedule(static)
    for (size_t p = 0; p < pixels; p++) {
        const float *row = ddst + p * (size_t)total;
        for (int k = 0; k < n_inputs; k++) {
            float *out = dsrcs[k] + p * (size_t)channels[k];
            for (int c = 0; c < channels[k]; c++)
                out[c] = row[c];
            row += channels[k];
        }
    }
    return DS_OK;
}

/* ---- spatial dropout ---- */

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

ds_status ds_dropout_mask(ds_backend *backend, float *mask, int batch, int channels, float rate,
                          unsigned long long seed, unsigned long long stream)
{
    float keep_scale = rate > 0.0f ? 1.0f / (1.0f - rate) : 1.0f;
    uint64_t base = splitmix64(splitmix64((uint64_t)seed) ^ (uint64_t)stream);
    for (int i = 0; i < batch * channels; i++) {
        /* 24 random bits -> a uniform draw in [0, 1) */
        double u = (double)(splitmix64(base + (uint64_t)i) >> 40) * (1.0 / 16777216.0);
        mask[i] = rate > 0.0f && u < rate ? 0.0f : keep_scale;
    }
    return DS_OK;
}

ds_status ds_spatial_dropout_forward(ds_backend *backend, float *dst, const float *src, const float *mask, int batch,
                                     size_t pixels, int channels)
{
    for (int b = 0; b < batch; b++) {
        const float *m = mask + (size_t)b * channels;
        size_t start = (size_t)b * pixels;
#pragma omp parallel for if (pixels * (size_t)channels >= PARALLEL_MIN) schedule(static)
        for (size_t p = start; p < start + pixels; p++) {
            const float *s = src + p * (size_t)channels;
            float *d = dst + p * (size_t)channels;
#pragma omp simd
            for (int c = 0; c < channels; c++)
                d[c] = s[c] * m[c];
        }
    }
    return DS_OK;
}

/* ---- loss ---- */

static inline float sigmoidf(float z)
{
    if (z >= 0.0f)
        return 1.0f / (1.0f + expf(-z));
    float e = expf(z);
    return e / (1.0f + e);
}

#define BCE_EPSILON 1e-7f /* Keras backend.epsilon() */

ds_status ds_deepspot_loss(ds_backend *backend, double *terms, float *pred, float *dlogits, const float *logits,
                           const float *target, int batch, size_t pixels, int bce_mode, int max_mode)
{
    size_t n = (size_t)batch * pixels;
    double bce = 0.0, inv_n = 1.0 / (double)n;
    for (size_t i = 0; i < n; i++) {
        float z = logits[i], t = target[i], p = sigmoidf(z);
        double grad;
        if (bce_mode == DS_BCE_CLIPPED) {
            double pc = p < BCE_EPSILON ? BCE_EPSILON : p > 1.0f - BCE_EPSILON ? 1.0f - BCE_EPSILON : p;
            bce -= t * log(pc) + (1.0 - t) * log(1.0 - pc);
            /* clip_by_value passes the gradient inside [lo, hi] only */
            int inside = p >= BCE_EPSILON && p <= 1.0f - BCE_EPSILON;
            grad = inside ? (pc - t) / (pc * (1.0 - pc)) * ((double)p * (1.0 - (double)p)) : 0.0;
        } else {
            double zd = z;
            bce += (zd > 0.0 ? zd : 0.0) - zd * t + log1p(exp(-fabs(zd)));
            grad = (double)p - t;
        }
        if (pred)
            pred[i] = p;
        if (dlogits)
            dlogits[i] = (float)(grad * inv_n);
    }
    bce *= inv_n;

    double max_term = 0.0;
    if (max_mode == DS_MAX_BATCH || max_mode == DS_MAX_PER_IMAGE) {
        int groups = max_mode == DS_MAX_BATCH ? 1 : batch;
        size_t per_group = n / (size_t)groups;
        for (int g = 0; g < groups; g++) {
            const float *z = logits + (size_t)g * per_group, *t = target + (size_t)g * per_group;
            float max_p = -1.0f, max_t = -INFINITY;
            size_t ties = 0;
            for (size_t i = 0; i < per_group; i++) {
                float p = sigmoidf(z[i]);
                if (p > max_p) {
                    max_p = p;
                    ties = 1;
                } else if (p == max_p) {
                    ties++;
                }
                if (t[i] > max_t)
                    max_t = t[i];
            }
            double diff = (double)max_p - (double)max_t;
            max_term += diff * diff / groups;
            if (dlogits) {
                /* d/dp of diff^2 / groups, shared by the tied maxima, times sigmoid' = p (1 - p) */
                double share = 2.0 * diff / groups / (double)ties;
                float *dz = dlogits + (size_t)g * per_group;
                for (size_t i = 0; i < per_group; i++) {
                    float p = sigmoidf(z[i]);
                    if (p == max_p)
                        dz[i] += (float)(share * ((double)p * (1.0 - (double)p)));
                }
            }
        }
    }
    terms[0] = bce + max_term;
    terms[1] = bce;
    terms[2] = max_term;
    return DS_OK;
}

/* ---- Adam (Keras) ---- */

static int guard_passes(const double *guard) { return !guard || isfinite(*guard); }

ds_status ds_adam_update(ds_backend *backend, float *param, float *m, float *v, const float *grad, size_t n, float lr,
                         double beta1, double beta2, float epsilon, long step, const double *guard)
{
    if (!guard_passes(guard))
        return DS_OK;
    float t = (float)step;
    float b1t = powf((float)beta1, t), b2t = powf((float)beta2, t);
    float alpha = lr * sqrtf(1.0f - b2t) / (1.0f - b1t);
    float one_minus_b1 = (float)(1.0 - beta1), one_minus_b2 = (float)(1.0 - beta2);
#pragma omp parallel for simd if (n >= PARALLEL_MIN) schedule(static)
    for (size_t i = 0; i < n; i++) {
        float g = grad[i];
        float mi = m[i] + (g - m[i]) * one_minus_b1;
        float vi = v[i] + (g * g - v[i]) * one_minus_b2;
        m[i] = mi;
        v[i] = vi;
        param[i] -= mi * alpha / (sqrtf(vi) + epsilon);
    }
    return DS_OK;
}

ds_status ds_moving_statistics_update(ds_backend *backend, float *moving_mean, float *moving_variance,
                                      const float *mean, const float *variance, int channels, double momentum,
                                      float variance_correction, const double *guard)
{
    if (!guard_passes(guard))
        return DS_OK;
    /* both factors rounded from the double momentum, as Keras does */
    float keep = (float)momentum, rest = (float)(1.0 - momentum);
    for (int c = 0; c < channels; c++) {
        moving_mean[c] = moving_mean[c] * keep + mean[c] * rest;
        moving_variance[c] = moving_variance[c] * keep + variance[c] * variance_correction * rest;
    }
    return DS_OK;
}
