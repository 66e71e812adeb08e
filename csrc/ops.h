/* ops.h - the backend boundary: the network's layers as ops with the same names on every
 * backend (oneDNN on CPU in ops_dnnl.c). An op is built once for one shape (primitive
 * descriptors, weight reorders) and then only executed. Activations are NHWC float32 buffers
 * owned by the caller; weights are copied into the op at creation in the backend's best layout. */
#ifndef DS_OPS_H
#define DS_OPS_H

#include <stddef.h>

#include "status.h"

typedef struct ds_backend ds_backend;
typedef struct ds_op ds_op;

ds_status backend_create(ds_backend **backend);
void backend_destroy(ds_backend *backend);
/* Waits for every op submitted so far. */
ds_status backend_synchronize(ds_backend *backend);

/* Post-ops fused into a convolution, applied in this order: dst = act(conv(src) + dst_before). */
enum {
    POST_SUM = 1,     /* accumulate into the existing contents of dst (residual add) */
    POST_RELU = 2,
    POST_SIGMOID = 4,
};

typedef struct {
    int transposed;  /* 0: convolution, 1: transposed convolution (data-gradient of a convolution) */
    int batch, in_channels, in_height, in_width;
    int out_channels, out_height, out_width;
    int kernel, stride, dilation;  /* dilation as Keras counts it: 1 = dense */
    int pad_before, pad_after;     /* rows/cols of implicit zeros; TF 'same' is asymmetric */
    unsigned post;
} conv_desc;

/* weight: [out_channels, in_channels, kernel, kernel]; bias: [out_channels]. */
ds_status conv_forward_create(ds_op **op, ds_backend *backend, const conv_desc *desc,
                              const float *weight, const float *bias);
ds_status conv_forward(ds_op *op, const float *src, float *dst);

/* Inference batch norm followed by ReLU: dst = max(0, gamma * (src - mean) / sqrt(var + eps) + beta). */
ds_status batchnorm_relu_forward_create(ds_op **op, ds_backend *backend, int batch, int channels, int height,
                                        int width, const float *gamma, const float *beta, const float *mean,
                                        const float *variance, float epsilon);
ds_status batchnorm_relu_forward(ds_op *op, const float *src, float *dst);

/* Max pooling, padded cells never win. */
ds_status maxpool_forward_create(ds_op **op, ds_backend *backend, int batch, int channels, int height, int width,
                                 int out_height, int out_width, int kernel, int stride, int pad_before,
                                 int pad_after);
ds_status maxpool_forward(ds_op *op, const float *src, float *dst);

/* Concatenation along channels of n_inputs NHWC tensors of the same batch and size. */
#define CONCAT_MAX_INPUTS 4
ds_status concat_forward_create(ds_op **op, ds_backend *backend, int batch, int height, int width, int n_inputs,
                                const int *channels);
ds_status concat_forward(ds_op *op, const float *const *srcs, float *dst);

void op_destroy(ds_op *op);

/* ---------------------------------------------------------------- training (csrc/train.c)
 * Training ops hold one shape's forward-training and backward primitives. Weights are passed on
 * every call (they change each step): the forward reorders them into the primitive's layout and
 * the backward of the same op reuses that copy, so a backward must follow the forward it belongs
 * to with the weights unchanged. llm.c conventions: outputs first, gradients prefixed `d`; every
 * gradient output is overwritten, never accumulated. All tensors NHWC float32, weights
 * [out, in, k, k] as in conv_forward_create. */
typedef struct ds_train_op ds_train_op;

/* (Transposed) convolution; desc->post must be 0. need_dsrc = 0 skips the data gradient (first layer). */
ds_status conv_train_create(ds_train_op **op, ds_backend *backend, const conv_desc *desc, int need_dsrc);
ds_status conv_train_forward(ds_train_op *op, float *dst, const float *src, const float *weight, const float *bias);
/* dsrc may be NULL (skipped); dweight [out, in, k, k], dbias [out]. */
ds_status conv_backward(ds_train_op *op, float *dsrc, float *dweight, float *dbias, const float *ddst,
                        const float *src);

/* Batch norm, optionally followed by ReLU (fused: the op keeps the ReLU mask until its backward).
 * training = 1: normalises with the batch statistics and writes them to mean, variance (biased,
 * i.e. divided by N as Keras normalises with); training = 0: normalises with the given mean and
 * variance (inference) and no backward is possible. */
ds_status batchnorm_train_create(ds_train_op **op, ds_backend *backend, int batch, int channels, int height,
                                 int width, float epsilon, int relu, int training);
ds_status batchnorm_train_forward(ds_train_op *op, float *dst, float *mean, float *variance, const float *src,
                                  const float *gamma, const float *beta);
ds_status batchnorm_backward(ds_train_op *op, float *dsrc, float *dgamma, float *dbeta, const float *ddst,
                             const float *src, const float *mean, const float *variance, const float *gamma);

/* Max pooling that keeps the arg-max (workspace) in the op for its backward. */
ds_status maxpool_train_create(ds_train_op **op, ds_backend *backend, int batch, int channels, int height,
                               int width, int out_height, int out_width, int kernel, int stride, int pad_before,
                               int pad_after);
ds_status maxpool_train_forward(ds_train_op *op, float *dst, const float *src);
ds_status maxpool_backward(ds_train_op *op, float *dsrc, const float *ddst);

void train_op_destroy(ds_train_op *op);

/* ---- plain C kernels (csrc/kernels.c): element-wise, loss, optimizer; n counts floats ---- */

/* dst = a + b (dst may alias a or b). */
void add_forward(float *dst, const float *a, const float *b, size_t n);
/* dst += src. */
void add_inplace(float *dst, const float *src, size_t n);
/* dsrc = ddst where dst > 0, else 0 (dst: the ReLU output). accumulate: dsrc += instead. */
void relu_backward(float *dsrc, const float *ddst, const float *dst, size_t n, int accumulate);
/* Splits the gradient of a channel concatenation: dsrcs[i] [pixels, channels[i]] from ddst [pixels, sum]. */
void concat_backward(float *const *dsrcs, const float *ddst, size_t pixels, int n_inputs, const int *channels);

/* Spatial dropout (Keras SpatialDropout2D): one keep/drop draw per (sample, channel), kept channels
 * scaled by 1 / (1 - rate). mask [batch, channels] gets 0 or 1 / (1 - rate); rate 0 gives all 1.
 * The draw is a pure function of (seed, stream, sample, channel). */
void dropout_mask(float *mask, int batch, int channels, float rate, unsigned long long seed,
                  unsigned long long stream);
/* dst = src * mask (per sample and channel); dst may alias src. Also the backward (dsrc = ddst * mask). */
void spatial_dropout_forward(float *dst, const float *src, const float *mask, int batch, size_t pixels, int channels);
#define spatial_dropout_backward spatial_dropout_forward

/* The DeepSpot loss on the head's logits z [batch, pixels] (one channel) against targets t in [0, 1]:
 *   BCE: mean over all values. DS_BCE_LOGITS: max(z,0) - z t + log(1 + exp(-|z|)), what Keras computes
 *   for a sigmoid output inside fit (tf.nn.sigmoid_cross_entropy_with_logits); DS_BCE_CLIPPED: p clipped
 *   to [1e-7, 1 - 1e-7], -(t log p + (1 - t) log(1 - p)) (Keras on a plain probability tensor).
 *   max term, p = sigmoid(z): DS_MAX_BATCH (max over the batch of p - max over the batch of t)^2 (the
 *   authors' code), DS_MAX_PER_IMAGE mean over images of (max p_i - max t_i)^2 (the paper), DS_MAX_NONE.
 * Ties of a maximum share its gradient equally (as TF's reduce_max). pred (may be NULL) gets p;
 * dlogits (may be NULL) gets d loss / d z. terms[0] = BCE, terms[1] = max term; returns the loss. */
enum { DS_BCE_LOGITS = 0, DS_BCE_CLIPPED = 1 };
enum { DS_MAX_BATCH = 0, DS_MAX_PER_IMAGE = 1, DS_MAX_NONE = 2 };
double deepspot_loss(float *pred, float *dlogits, double terms[2], const float *logits, const float *target,
                     int batch, size_t pixels, int bce_mode, int max_mode);

/* Keras Adam on n values: m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2);
 * param -= lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps). step is t, counted from 1.
 * Rounded as Keras does: 1 - beta from the double betas, the powers in float32. */
void adam_update(float *param, float *m, float *v, const float *grad, size_t n, float lr, double beta1, double beta2,
                 float epsilon, long step);

#endif
