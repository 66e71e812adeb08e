/* ops.h - the backend boundary: the network's layers as ops with the same names on every
 * backend (oneDNN on CPU in ops_dnnl.c). An op is built once for one shape (primitive
 * descriptors, weight reorders) and then only executed. Activations are NHWC float32 buffers
 * owned by the caller; weights are copied into the op at creation in the backend's best layout. */
#ifndef DS_OPS_H
#define DS_OPS_H

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

#endif
