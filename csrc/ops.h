/* ops.h - the backend boundary: the network's layers as ops with the same names on every
 * backend: oneDNN on CPU (ops_dnnl.c, kernels.c) and cuDNN on an NVIDIA GPU (ops_cuda.cu,
 * kernels_cuda.cu). model.c and train.c are written once against this header and compiled once
 * per backend, into the extension modules _core (CPU) and _core_cuda (GPU).
 * An op is built once for one shape (descriptors, weight reorders, algorithm choice) and then only
 * executed. Every tensor an op reads or writes is backend memory (ds_backend_alloc: host memory on the
 * CPU, device memory on the GPU), NHWC float32; the only host data an op takes are the weights and
 * statistics given at its creation, which it copies. Ops run in order on the backend's stream:
 * nothing waits until ds_backend_download or ds_backend_synchronize. */
#ifndef DS_OPS_H
#define DS_OPS_H

#include <stddef.h>

#include "status.h"

typedef struct ds_backend ds_backend;
typedef struct ds_op ds_op;

/* How convolutions may round their inputs. DS_MATH_FLOAT32: plain float32 (the default). DS_MATH_TF32:
 * tensor cores with TF32 inputs and float32 accumulation (GPU only). DS_MATH_BF16: inference convolutions
 * multiply bfloat16 inputs and weights with float32 accumulation and float32 outputs (CPU only, where it
 * has bf16 instructions), except those that gain nothing or that the accuracy needs (see ops_dnnl.c).
 * In every mode weights, activations between layers, training and optimizer state stay float32. */
enum { DS_MATH_FLOAT32 = 0, DS_MATH_TF32 = 1, DS_MATH_BF16 = 2 };

ds_status ds_backend_create(ds_backend **backend, int math_mode);
void ds_backend_destroy(ds_backend *backend);
/* Waits for every op submitted so far. */
ds_status ds_backend_synchronize(ds_backend *backend);
/* Whether this backend can run here, and on what: a one-line description of the device, or DS_ERR_BACKEND with
 * the reason it cannot (no GPU, no driver). Creates nothing. */
ds_status ds_backend_probe(char *description, size_t size);
/* Whether DS_MATH_BF16 can run here: the CPU has bf16 instructions (CPU backend; the CUDA backend says 0). */
int ds_cpu_has_bf16(void);

/* ---- backend memory. Sizes in bytes; alloc returns zeroed memory aligned for any op. ---- */
ds_status ds_backend_alloc(ds_backend *backend, void **memory, size_t bytes);
void ds_backend_free(ds_backend *backend, void *memory);
/* host -> backend; the host buffer may be reused as soon as this returns. */
ds_status ds_backend_upload(ds_backend *backend, void *dst, const void *host_src, size_t bytes);
/* backend -> host, after every op submitted before it (so the host data are ready on return). */
ds_status ds_backend_download(ds_backend *backend, void *host_dst, const void *src, size_t bytes);
ds_status ds_backend_copy(ds_backend *backend, void *dst, const void *src, size_t bytes);
ds_status ds_backend_zero(ds_backend *backend, void *dst, size_t bytes);

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

/* Output sizes (op_shapes.c): d->out_height and d->out_width from d's input, kernel, stride, dilation and
 * padding; the output of max pooling. DS_ERR_VALUE for a bad kernel, stride or padding, or an empty output. */
ds_status ds_conv_output_size(conv_desc *d);
ds_status ds_maxpool_output_size(int height, int width, int kernel, int stride, int pad_before, int pad_after,
                                 int *out_height, int *out_width);

/* The shape checks every backend makes when it builds an op (op_shapes.c): DS_ERR_VALUE unless the
 * output size follows from the input, kernel, stride, dilation and padding. */
#define MAXPOOL_MAX_KERNEL 15 /* the GPU keeps the arg-max of each window in a byte */
ds_status ds_conv_desc_check(const conv_desc *d);
ds_status ds_maxpool_shape_check(int batch, int channels, int height, int width, int out_height, int out_width,
                                 int kernel, int stride, int pad_before, int pad_after);

/* weight: [out_channels, in_channels, kernel, kernel]; bias: [out_channels] (host memory, copied). For a
 * transposed convolution `out` is its output (upsampled) side, as in the weights file. */
ds_status ds_conv_forward_create(ds_op **op, ds_backend *backend, const conv_desc *desc,
                                 const float *weight, const float *bias);
ds_status ds_conv_forward(ds_op *op, const float *src, float *dst);

/* Inference batch norm followed by ReLU: dst = max(0, gamma * (src - mean) / sqrt(var + eps) + beta).
 * The four vectors are host memory, copied. */
ds_status ds_batchnorm_relu_forward_create(ds_op **op, ds_backend *backend, int batch, int channels, int height,
                                           int width, const float *gamma, const float *beta, const float *mean,
                                           const float *variance, float epsilon);
ds_status ds_batchnorm_relu_forward(ds_op *op, const float *src, float *dst);

/* Max pooling, padded cells never win. */
ds_status ds_maxpool_forward_create(ds_op **op, ds_backend *backend, int batch, int channels, int height, int width,
                                    int out_height, int out_width, int kernel, int stride, int pad_before,
                                    int pad_after);
ds_status ds_maxpool_forward(ds_op *op, const float *src, float *dst);

/* Concatenation along channels of n_inputs NHWC tensors of the same batch and size (srcs: an array on the
 * host of pointers to backend memory). */
#define CONCAT_MAX_INPUTS 4
ds_status ds_concat_forward_create(ds_op **op, ds_backend *backend, int batch, int height, int width, int n_inputs,
                                   const int *channels);
ds_status ds_concat_forward(ds_op *op, const float *const *srcs, float *dst);

void ds_op_destroy(ds_op *op);

/* ---------------------------------------------------------------- training (csrc/train.c)
 * Training ops hold one shape's forward-training and backward primitives. Weights are passed on
 * every call (they change each step): the forward reorders them into the primitive's layout and
 * the backward of the same op reuses that copy, so a backward must follow the forward it belongs
 * to with the weights unchanged. llm.c conventions: outputs first, gradients prefixed `d`; every
 * gradient output is overwritten, never accumulated. All tensors NHWC float32 in backend memory,
 * weights [out, in, k, k] as in ds_conv_forward_create, also in backend memory. */
typedef struct ds_train_op ds_train_op;

/* (Transposed) convolution; desc->post must be 0. need_dsrc = 0 skips the data gradient (first layer). */
ds_status ds_conv_train_create(ds_train_op **op, ds_backend *backend, const conv_desc *desc, int need_dsrc);
ds_status ds_conv_train_forward(ds_train_op *op, float *dst, const float *src, const float *weight, const float *bias);
/* dsrc may be NULL (skipped); dweight [out, in, k, k], dbias [out]. */
ds_status ds_conv_backward(ds_train_op *op, float *dsrc, float *dweight, float *dbias, const float *ddst,
                           const float *src);

/* Batch norm, optionally followed by ReLU (fused: the op keeps the ReLU mask until its backward).
 * DS_BN_BATCH_STATISTICS: normalises with the batch statistics and writes them to mean, variance
 * (biased, i.e. divided by N as Keras normalises with); DS_BN_INFERENCE: normalises with the given
 * mean and variance and no backward is possible; DS_BN_FROZEN: normalises with the given mean and
 * variance (the moving statistics) and has a backward that holds them constant (a frozen batch norm,
 * the usual way to fine-tune on little data: training computes what inference computes). */
enum { DS_BN_INFERENCE = 0, DS_BN_BATCH_STATISTICS = 1, DS_BN_FROZEN = 2 };
ds_status ds_batchnorm_train_create(ds_train_op **op, ds_backend *backend, int batch, int channels, int height,
                                    int width, float epsilon, int relu, int mode);
ds_status ds_batchnorm_train_forward(ds_train_op *op, float *dst, float *mean, float *variance, const float *src,
                                     const float *gamma, const float *beta);
/* ddst may be overwritten (a backend may apply the ReLU mask in place); beta lets a backend recompute the
 * ReLU mask instead of keeping it. */
ds_status ds_batchnorm_backward(ds_train_op *op, float *dsrc, float *dgamma, float *dbeta, float *ddst,
                                const float *src, const float *mean, const float *variance, const float *gamma,
                                const float *beta);

/* Max pooling that keeps the arg-max (workspace) in the op for its backward. */
ds_status ds_maxpool_train_create(ds_train_op **op, ds_backend *backend, int batch, int channels, int height,
                                  int width, int out_height, int out_width, int kernel, int stride, int pad_before,
                                  int pad_after);
ds_status ds_maxpool_train_forward(ds_train_op *op, float *dst, const float *src);
ds_status ds_maxpool_backward(ds_train_op *op, float *dsrc, const float *ddst);

void ds_train_op_destroy(ds_train_op *op);

/* ---- kernels (kernels.c on CPU, kernels_cuda.cu on GPU): element-wise ops, dropout, the loss, the
 * optimizer. n counts floats; every pointer is backend memory. */

/* dst = a + b (dst may alias a or b). */
ds_status ds_add_forward(ds_backend *backend, float *dst, const float *a, const float *b, size_t n);
/* dst += src. */
ds_status ds_add_inplace(ds_backend *backend, float *dst, const float *src, size_t n);
/* x = max(x, 0). */
ds_status ds_relu_inplace(ds_backend *backend, float *x, size_t n);
/* dsrc = ddst where dst > 0, else 0 (dst: the ReLU output). accumulate: dsrc += instead. dsrc may alias ddst. */
ds_status ds_relu_backward(ds_backend *backend, float *dsrc, const float *ddst, const float *dst, size_t n,
                           int accumulate);
/* Splits the gradient of a channel concatenation: dsrcs[i] [pixels, channels[i]] from ddst [pixels, sum]
 * (dsrcs and channels: host arrays). */
ds_status ds_concat_backward(ds_backend *backend, float *const *dsrcs, const float *ddst, size_t pixels, int n_inputs,
                             const int *channels);

/* Spatial dropout (Keras SpatialDropout2D): one keep/drop draw per (sample, channel), kept channels
 * scaled by 1 / (1 - rate). mask [batch, channels] gets 0 or 1 / (1 - rate); rate 0 gives all 1.
 * The draw is a pure function of (seed, stream, sample, channel), the same on every backend. */
ds_status ds_dropout_mask(ds_backend *backend, float *mask, int batch, int channels, float rate,
                          unsigned long long seed, unsigned long long stream);
/* dst = src * mask (per sample and channel); dst may alias src. Also the backward (dsrc = ddst * mask). */
ds_status ds_spatial_dropout_forward(ds_backend *backend, float *dst, const float *src, const float *mask, int batch,
                                     size_t pixels, int channels);
#define ds_spatial_dropout_backward ds_spatial_dropout_forward

/* The DeepSpot loss on the head's logits z [batch, pixels] (one channel) against targets t in [0, 1]:
 *   BCE: mean over all values. DS_BCE_LOGITS: max(z,0) - z t + log(1 + exp(-|z|)), what Keras computes
 *   for a sigmoid output inside fit (tf.nn.sigmoid_cross_entropy_with_logits); DS_BCE_CLIPPED: p clipped
 *   to [1e-7, 1 - 1e-7], -(t log p + (1 - t) log(1 - p)) (Keras on a plain probability tensor).
 *   max term, p = sigmoid(z): DS_MAX_BATCH (max over the batch of p - max over the batch of t)^2 (the
 *   authors' code), DS_MAX_PER_IMAGE mean over images of (max p_i - max t_i)^2 (the paper), DS_MAX_NONE.
 * Ties of a maximum share its gradient equally (as TF's reduce_max). pred (may be NULL) gets p;
 * dlogits (may be NULL) gets d loss / d z. terms (backend memory, 3 doubles) gets {loss, BCE, max term}:
 * the value stays on the backend until downloaded, so a training step needs no round trip to the host. */
enum { DS_BCE_LOGITS = 0, DS_BCE_CLIPPED = 1 };
enum { DS_MAX_BATCH = 0, DS_MAX_PER_IMAGE = 1, DS_MAX_NONE = 2 };
#define DS_LOSS_TERMS 3
ds_status ds_deepspot_loss(ds_backend *backend, double *terms, float *pred, float *dlogits, const float *logits,
                           const float *target, int batch, size_t pixels, int bce_mode, int max_mode);

/* The updates of a training step are guarded by its loss: with guard (backend memory, may be NULL) pointing
 * to a loss that is not finite they change nothing, so the step can be queued whole and judged afterwards. */

/* Keras Adam on n values: m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2);
 * param -= lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps). step is t, counted from 1.
 * Rounded as Keras does: 1 - beta from the double betas, the powers in float32. */
ds_status ds_adam_update(ds_backend *backend, float *param, float *m, float *v, const float *grad, size_t n, float lr,
                         double beta1, double beta2, float epsilon, long step, const double *guard);

/* Keras BN moving statistics: moving = moving * momentum + batch * (1 - momentum), the batch variance
 * times variance_correction (1, or n / (n - 1) for the unbiased variance). Both factors are rounded to
 * float from the double momentum: keep = (float)momentum, rest = (float)(1.0 - momentum). */
ds_status ds_moving_statistics_update(ds_backend *backend, float *moving_mean, float *moving_variance,
                                      const float *mean, const float *variance, int channels, double momentum,
                                      float variance_correction, const double *guard);

#endif
