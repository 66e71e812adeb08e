/* ops_dnnl.c - the CPU backend of ops.h on oneDNN 3.x (C API).
 * Following oneDNN's own examples: each op creates its primitive descriptor once, lets oneDNN
 * pick the weight layout (format "any"), reorders the weights into it once, and afterwards
 * only swaps the activation data handles and executes. Activations stay in plain NHWC so the
 * model can address them as offsets into one arena. */
#include "ops.h"

#include <stdlib.h>
#include <string.h>

#include "oneapi/dnnl/dnnl.h"

struct ds_backend {
    dnnl_engine_t engine;
    dnnl_stream_t stream;
};

#define OP_MAX_ARGS 12
#define OP_MAX_IO 5

struct ds_op {
    ds_backend *backend;
    dnnl_primitive_t primitive;
    int nargs;
    dnnl_exec_arg_t args[OP_MAX_ARGS];
    int n_io;                        /* io[0..n_io-1]: caller buffers, set per call */
    dnnl_memory_t io[OP_MAX_IO];
    int n_owned;                     /* weights, bias, statistics: owned by the op */
    dnnl_memory_t owned[OP_MAX_ARGS];
};

#define DNNL_TRY(call, what)                                                                          \
    do {                                                                                              \
        dnnl_status_t dnnl_rc_ = (call);                                                              \
        if (dnnl_rc_ != dnnl_success)                                                                 \
            return ds_fail(DS_ERR_BACKEND, "oneDNN: %s failed (status %d)", what, (int)dnnl_rc_);     \
    } while (0)

ds_status backend_create(ds_backend **backend)
{
    ds_backend *b = calloc(1, sizeof *b);
    if (!b)
        return ds_fail(DS_ERR_NOMEM, "out of memory");
    if (dnnl_engine_create(&b->engine, dnnl_cpu, 0) != dnnl_success) {
        free(b);
        return ds_fail(DS_ERR_BACKEND, "oneDNN: cannot create the CPU engine");
    }
    if (dnnl_stream_create(&b->stream, b->engine, dnnl_stream_default_flags) != dnnl_success) {
        dnnl_engine_destroy(b->engine);
        free(b);
        return ds_fail(DS_ERR_BACKEND, "oneDNN: cannot create a CPU stream");
    }
    *backend = b;
    return DS_OK;
}

void backend_destroy(ds_backend *backend)
{
    if (!backend)
        return;
    dnnl_stream_destroy(backend->stream);
    dnnl_engine_destroy(backend->engine);
    free(backend);
}

ds_status backend_synchronize(ds_backend *backend)
{
    DNNL_TRY(dnnl_stream_wait(backend->stream), "stream wait");
    return DS_OK;
}

void op_destroy(ds_op *op)
{
    if (!op)
        return;
    if (op->primitive)
        dnnl_primitive_destroy(op->primitive);
    for (int i = 0; i < op->n_io; i++)
        dnnl_memory_destroy(op->io[i]);
    for (int i = 0; i < op->n_owned; i++)
        dnnl_memory_destroy(op->owned[i]);
    free(op);
}

static ds_status op_alloc(ds_op **op, ds_backend *backend)
{
    *op = calloc(1, sizeof **op);
    if (!*op)
        return ds_fail(DS_ERR_NOMEM, "out of memory");
    (*op)->backend = backend;
    return DS_OK;
}

static ds_status nhwc_desc(dnnl_memory_desc_t *md, int n, int c, int h, int w)
{
    dnnl_dims_t dims = {n, c, h, w};
    DNNL_TRY(dnnl_memory_desc_create_with_tag(md, 4, dims, dnnl_f32, dnnl_nhwc), "NHWC memory descriptor");
    return DS_OK;
}

/* A caller-buffer argument: the handle is set on each execution. */
static ds_status add_io(ds_op *op, int arg, const_dnnl_memory_desc_t md)
{
    dnnl_memory_t mem;
    DNNL_TRY(dnnl_memory_create(&mem, md, op->backend->engine, DNNL_MEMORY_NONE), "memory");
    op->io[op->n_io++] = mem;
    op->args[op->nargs++] = (dnnl_exec_arg_t){arg, mem};
    return DS_OK;
}

/* An owned argument in the layout `md`, filled from plain data laid out as `user_md`. */
static ds_status add_owned(ds_op *op, int arg, const_dnnl_memory_desc_t md, const_dnnl_memory_desc_t user_md,
                           const float *data)
{
    dnnl_engine_t engine = op->backend->engine;
    dnnl_memory_t mem, user;
    DNNL_TRY(dnnl_memory_create(&mem, md, engine, DNNL_MEMORY_ALLOCATE), "memory");
    op->owned[op->n_owned++] = mem;
    op->args[op->nargs++] = (dnnl_exec_arg_t){arg, mem};
    DNNL_TRY(dnnl_memory_create(&user, user_md, engine, (void *)data), "memory");
    dnnl_primitive_desc_t reorder_pd;
    dnnl_primitive_t reorder;
    dnnl_status_t rc = dnnl_reorder_primitive_desc_create(&reorder_pd, user_md, engine, md, engine, NULL);
    if (rc == dnnl_success) {
        rc = dnnl_primitive_create(&reorder, reorder_pd);
        dnnl_primitive_desc_destroy(reorder_pd);
        if (rc == dnnl_success) {
            dnnl_exec_arg_t args[2] = {{DNNL_ARG_FROM, user}, {DNNL_ARG_TO, mem}};
            rc = dnnl_primitive_execute(reorder, op->backend->stream, 2, args);
            if (rc == dnnl_success)
                rc = dnnl_stream_wait(op->backend->stream);
            dnnl_primitive_destroy(reorder);
        }
    }
    dnnl_memory_destroy(user);
    DNNL_TRY(rc, "weight reorder");
    return DS_OK;
}

static ds_status vector_desc(dnnl_memory_desc_t *md, int n)
{
    dnnl_dims_t dims = {n};
    DNNL_TRY(dnnl_memory_desc_create_with_tag(md, 1, dims, dnnl_f32, dnnl_a), "vector memory descriptor");
    return DS_OK;
}

/* Creates the primitive and the scratchpad-free argument list from a primitive descriptor. */
static ds_status op_finish(ds_op *op, dnnl_primitive_desc_t pd)
{
    dnnl_status_t rc = dnnl_primitive_create(&op->primitive, pd);
    dnnl_primitive_desc_destroy(pd);
    DNNL_TRY(rc, "primitive creation");
    return DS_OK;
}

static ds_status execute(ds_op *op)
{
    DNNL_TRY(dnnl_primitive_execute(op->primitive, op->backend->stream, op->nargs, op->args), "execution");
    return DS_OK;
}

static ds_status set_io(ds_op *op, int index, const float *data)
{
    DNNL_TRY(dnnl_memory_set_data_handle(op->io[index], (void *)data), "set data handle");
    return DS_OK;
}

/* ---- convolution and transposed convolution ---- */

static ds_status conv_check(const conv_desc *d)
{
    int span = (d->kernel - 1) * d->dilation + 1;
    int expect_h, expect_w;
    if (d->transposed) {
        expect_h = (d->in_height - 1) * d->stride + span - d->pad_before - d->pad_after;
        expect_w = (d->in_width - 1) * d->stride + span - d->pad_before - d->pad_after;
    } else {
        expect_h = (d->in_height + d->pad_before + d->pad_after - span) / d->stride + 1;
        expect_w = (d->in_width + d->pad_before + d->pad_after - span) / d->stride + 1;
    }
    if (d->batch < 1 || d->in_channels < 1 || d->out_channels < 1 || d->kernel < 1 || d->stride < 1 ||
        d->dilation < 1 || expect_h != d->out_height || expect_w != d->out_width)
        return ds_fail(DS_ERR_VALUE, "convolution: inconsistent shape (input %dx%d, output %dx%d, kernel %d, stride %d)",
                       d->in_height, d->in_width, d->out_height, d->out_width, d->kernel, d->stride);
    return DS_OK;
}

static ds_status conv_attr(dnnl_primitive_attr_t *attr, unsigned post)
{
    dnnl_post_ops_t post_ops;
    DNNL_TRY(dnnl_primitive_attr_create(attr), "attribute");
    DNNL_TRY(dnnl_post_ops_create(&post_ops), "post-ops");
    if (post & POST_SUM)
        DNNL_TRY(dnnl_post_ops_append_sum(post_ops, 1.0f, 0, dnnl_data_type_undef), "sum post-op");
    if (post & POST_RELU)
        DNNL_TRY(dnnl_post_ops_append_eltwise(post_ops, dnnl_eltwise_relu, 0.0f, 0.0f), "relu post-op");
    if (post & POST_SIGMOID)
        DNNL_TRY(dnnl_post_ops_append_eltwise(post_ops, dnnl_eltwise_logistic, 0.0f, 0.0f), "sigmoid post-op");
    dnnl_status_t rc = dnnl_primitive_attr_set_post_ops(*attr, post_ops);
    dnnl_post_ops_destroy(post_ops);
    DNNL_TRY(rc, "set post-ops");
    return DS_OK;
}

ds_status conv_forward_create(ds_op **op_out, ds_backend *backend, const conv_desc *d, const float *weight,
                              const float *bias)
{
    DS_TRY(conv_check(d));
    ds_op *op;
    DS_TRY(op_alloc(&op, backend));
    dnnl_memory_desc_t src_md = NULL, dst_md = NULL, any_weight_md = NULL, user_weight_md = NULL, bias_md = NULL;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_primitive_desc_t pd = NULL;
    ds_status rc = DS_OK;
    dnnl_dims_t weight_dims = {d->out_channels, d->in_channels, d->kernel, d->kernel};
    dnnl_dims_t strides = {d->stride, d->stride}, dilates = {d->dilation - 1, d->dilation - 1};
    dnnl_dims_t pad_l = {d->pad_before, d->pad_before}, pad_r = {d->pad_after, d->pad_after};

    if ((rc = nhwc_desc(&src_md, d->batch, d->in_channels, d->in_height, d->in_width)) ||
        (rc = nhwc_desc(&dst_md, d->batch, d->out_channels, d->out_height, d->out_width)) ||
        (rc = vector_desc(&bias_md, d->out_channels)) || (rc = conv_attr(&attr, d->post)))
        goto done;
    if (dnnl_memory_desc_create_with_tag(&any_weight_md, 4, weight_dims, dnnl_f32, dnnl_format_tag_any) ||
        dnnl_memory_desc_create_with_tag(&user_weight_md, 4, weight_dims, dnnl_f32, dnnl_oihw)) {
        rc = ds_fail(DS_ERR_BACKEND, "oneDNN: weight memory descriptor");
        goto done;
    }
    dnnl_status_t st = d->transposed
        ? dnnl_deconvolution_forward_primitive_desc_create(&pd, backend->engine, dnnl_forward_inference,
                                                           dnnl_deconvolution_direct, src_md, any_weight_md,
                                                           bias_md, dst_md, strides, dilates, pad_l, pad_r, attr)
        : dnnl_convolution_forward_primitive_desc_create(&pd, backend->engine, dnnl_forward_inference,
                                                         dnnl_convolution_direct, src_md, any_weight_md, bias_md,
                                                         dst_md, strides, dilates, pad_l, pad_r, attr);
    if (st != dnnl_success) {
        rc = ds_fail(DS_ERR_BACKEND, "oneDNN: no %sconvolution implementation for this shape (status %d)",
                     d->transposed ? "transposed " : "", (int)st);
        goto done;
    }
    const_dnnl_memory_desc_t chosen_weight_md = dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
    if ((rc = add_io(op, DNNL_ARG_SRC, src_md)) || (rc = add_io(op, DNNL_ARG_DST, dst_md)) ||
        (rc = add_owned(op, DNNL_ARG_WEIGHTS, chosen_weight_md, user_weight_md, weight)) ||
        (rc = add_owned(op, DNNL_ARG_BIAS, bias_md, bias_md, bias)))
        goto done;
    rc = op_finish(op, pd);
    pd = NULL;
done:
    if (pd)
        dnnl_primitive_desc_destroy(pd);
    dnnl_memory_desc_destroy(src_md);
    dnnl_memory_desc_destroy(dst_md);
    dnnl_memory_desc_destroy(any_weight_md);
    dnnl_memory_desc_destroy(user_weight_md);
    dnnl_memory_desc_destroy(bias_md);
    if (attr)
        dnnl_primitive_attr_destroy(attr);
    if (rc != DS_OK)
        op_destroy(op);
    else
        *op_out = op;
    return rc;
}

ds_status conv_forward(ds_op *op, const float *src, float *dst)
{
    DS_TRY(set_io(op, 0, src));
    DS_TRY(set_io(op, 1, dst));
    return execute(op);
}

/* ---- batch norm + ReLU (inference) ---- */

ds_status batchnorm_relu_forward_create(ds_op **op_out, ds_backend *backend, int batch, int channels, int height,
                                        int width, const float *gamma, const float *beta, const float *mean,
                                        const float *variance, float epsilon)
{
    ds_op *op;
    DS_TRY(op_alloc(&op, backend));
    dnnl_memory_desc_t md = NULL, vec_md = NULL;
    dnnl_primitive_desc_t pd = NULL;
    ds_status rc;
    unsigned flags = dnnl_use_global_stats | dnnl_use_scale | dnnl_use_shift | dnnl_fuse_norm_relu;
    if ((rc = nhwc_desc(&md, batch, channels, height, width)) || (rc = vector_desc(&vec_md, channels)))
        goto done;
    if (dnnl_batch_normalization_forward_primitive_desc_create(&pd, backend->engine, dnnl_forward_inference, md, md,
                                                               epsilon, flags, NULL) != dnnl_success) {
        rc = ds_fail(DS_ERR_BACKEND, "oneDNN: batch norm primitive descriptor");
        goto done;
    }
    if ((rc = add_io(op, DNNL_ARG_SRC, md)) || (rc = add_io(op, DNNL_ARG_DST, md)) ||
        (rc = add_owned(op, DNNL_ARG_SCALE, vec_md, vec_md, gamma)) ||
        (rc = add_owned(op, DNNL_ARG_SHIFT, vec_md, vec_md, beta)) ||
        (rc = add_owned(op, DNNL_ARG_MEAN, vec_md, vec_md, mean)) ||
        (rc = add_owned(op, DNNL_ARG_VARIANCE, vec_md, vec_md, variance)))
        goto done;
    rc = op_finish(op, pd);
    pd = NULL;
done:
    if (pd)
        dnnl_primitive_desc_destroy(pd);
    dnnl_memory_desc_destroy(md);
    dnnl_memory_desc_destroy(vec_md);
    if (rc != DS_OK)
        op_destroy(op);
    else
        *op_out = op;
    return rc;
}

ds_status batchnorm_relu_forward(ds_op *op, const float *src, float *dst)
{
    DS_TRY(set_io(op, 0, src));
    DS_TRY(set_io(op, 1, dst));
    return execute(op);
}

/* ---- max pooling ---- */

ds_status maxpool_forward_create(ds_op **op_out, ds_backend *backend, int batch, int channels, int height, int width,
                                 int out_height, int out_width, int kernel, int stride, int pad_before, int pad_after)
{
    if ((height + pad_before + pad_after - kernel) / stride + 1 != out_height ||
        (width + pad_before + pad_after - kernel) / stride + 1 != out_width)
        return ds_fail(DS_ERR_VALUE, "max-pool: inconsistent shape");
    ds_op *op;
    DS_TRY(op_alloc(&op, backend));
    dnnl_memory_desc_t src_md = NULL, dst_md = NULL;
    dnnl_primitive_desc_t pd = NULL;
    ds_status rc;
    dnnl_dims_t strides = {stride, stride}, kernels = {kernel, kernel}, dilation = {0, 0};
    dnnl_dims_t pad_l = {pad_before, pad_before}, pad_r = {pad_after, pad_after};
    if ((rc = nhwc_desc(&src_md, batch, channels, height, width)) ||
        (rc = nhwc_desc(&dst_md, batch, channels, out_height, out_width)))
        goto done;
    if (dnnl_pooling_forward_primitive_desc_create(&pd, backend->engine, dnnl_forward_inference, dnnl_pooling_max,
                                                   src_md, dst_md, strides, kernels, dilation, pad_l, pad_r,
                                                   NULL) != dnnl_success) {
        rc = ds_fail(DS_ERR_BACKEND, "oneDNN: pooling primitive descriptor");
        goto done;
    }
    if ((rc = add_io(op, DNNL_ARG_SRC, src_md)) || (rc = add_io(op, DNNL_ARG_DST, dst_md)))
        goto done;
    rc = op_finish(op, pd);
    pd = NULL;
done:
    if (pd)
        dnnl_primitive_desc_destroy(pd);
    dnnl_memory_desc_destroy(src_md);
    dnnl_memory_desc_destroy(dst_md);
    if (rc != DS_OK)
        op_destroy(op);
    else
        *op_out = op;
    return rc;
}

ds_status maxpool_forward(ds_op *op, const float *src, float *dst)
{
    DS_TRY(set_io(op, 0, src));
    DS_TRY(set_io(op, 1, dst));
    return execute(op);
}

/* ---- channel concatenation ---- */

ds_status concat_forward_create(ds_op **op_out, ds_backend *backend, int batch, int height, int width, int n_inputs,
                                const int *channels)
{
    if (n_inputs < 1 || n_inputs > CONCAT_MAX_INPUTS)
        return ds_fail(DS_ERR_VALUE, "concat: %d inputs (1..%d supported)", n_inputs, CONCAT_MAX_INPUTS);
    ds_op *op;
    DS_TRY(op_alloc(&op, backend));
    dnnl_memory_desc_t src_md[CONCAT_MAX_INPUTS] = {0}, dst_md = NULL;
    dnnl_primitive_desc_t pd = NULL;
    ds_status rc = DS_OK;
    int total = 0;
    for (int i = 0; i < n_inputs && rc == DS_OK; i++) {
        rc = nhwc_desc(&src_md[i], batch, channels[i], height, width);
        total += channels[i];
    }
    if (rc || (rc = nhwc_desc(&dst_md, batch, total, height, width)))
        goto done;
    if (dnnl_concat_primitive_desc_create(&pd, backend->engine, dst_md, n_inputs, 1,
                                          (const_dnnl_memory_desc_t *)src_md, NULL) != dnnl_success) {
        rc = ds_fail(DS_ERR_BACKEND, "oneDNN: concat primitive descriptor");
        goto done;
    }
    for (int i = 0; i < n_inputs && rc == DS_OK; i++)
        rc = add_io(op, DNNL_ARG_MULTIPLE_SRC + i, src_md[i]);
    if (rc || (rc = add_io(op, DNNL_ARG_DST, dst_md)))
        goto done;
    rc = op_finish(op, pd);
    pd = NULL;
done:
    if (pd)
        dnnl_primitive_desc_destroy(pd);
    for (int i = 0; i < n_inputs; i++)
        dnnl_memory_desc_destroy(src_md[i]);
    dnnl_memory_desc_destroy(dst_md);
    if (rc != DS_OK)
        op_destroy(op);
    else
        *op_out = op;
    return rc;
}

ds_status concat_forward(ds_op *op, const float *const *srcs, float *dst)
{
    int n_inputs = op->n_io - 1;
    for (int i = 0; i < n_inputs; i++)
        DS_TRY(set_io(op, i, srcs[i]));
    DS_TRY(set_io(op, n_inputs, dst));
    return execute(op);
}
