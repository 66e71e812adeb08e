/* ops_dnnl.c - the CPU backend of ops.h on oneDNN 3.x (C API).
 * Following oneDNN's own examples: each op creates its primitive descriptor once, lets oneDNN
 * pick the weight layout (format "any"), reorders the weights into it once, and afterwards
 * only swaps the activation data handles and executes. Activations stay in plain NHWC so the
 * model can address them as offsets into one arena.
 *
 * bf16 (DS_MATH_BF16): oneDNN 3.2's float32 convolutions ignore the bf16 fpmath attribute on this
 * CPU, so a bf16 convolution is explicit: its weights are converted to bf16 once at creation, its
 * float32 input is reordered into a bf16 scratch buffer shared by the backend's ops (they run one at
 * a time), and it writes float32. Convolutions with few input channels (no speed to gain, and the
 * raw image's precision to keep) and the last one (the sigmoid map) stay float32. */
#include "ops.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "oneapi/dnnl/dnnl.h"

struct ds_backend {
    dnnl_engine_t engine;
    dnnl_stream_t stream;
    int bf16;                        /* DS_MATH_BF16: convolutions with bf16 inputs */
    void *bf16_scratch;              /* the bf16 copy of a convolution's input, shared by the ops */
    size_t bf16_scratch_bytes;
};

/* Below this many input channels a convolution stays float32 (the first layers see the raw image). */
#define BF16_MIN_IN_CHANNELS 16

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
    dnnl_primitive_t to_bf16;        /* bf16 convolutions: io[0] (float32 input) -> bf16_src */
    dnnl_memory_t bf16_src;          /* ... in the backend's bf16 scratch */
};

#define DNNL_TRY(call, what)                                                                          \
    do {                                                                                              \
        dnnl_status_t dnnl_rc_ = (call);                                                              \
        if (dnnl_rc_ != dnnl_success)                                                                 \
            return ds_fail(DS_ERR_BACKEND, "oneDNN: %s failed (status %d)", what, (int)dnnl_rc_);     \
    } while (0)

ds_status ds_backend_create(ds_backend **backend, int math_mode)
{
    if (math_mode == DS_MATH_TF32)
        return ds_fail(DS_ERR_VALUE, "TF32 convolutions need the GPU (CUDA) backend; the CPU computes in float32");
    if (math_mode != DS_MATH_FLOAT32 && math_mode != DS_MATH_BF16)
        return ds_fail(DS_ERR_VALUE, "unknown math mode %d", math_mode);
    if (math_mode == DS_MATH_BF16 && !ds_cpu_has_bf16())
        return ds_fail(DS_ERR_VALUE, "bf16 needs a CPU with AVX512-BF16 (or AMX) instructions; this one has "
                                     "none: use float32");
    ds_backend *b = calloc(1, sizeof *b);
    if (!b)
        return ds_fail(DS_ERR_NOMEM, "out of memory");
    b->bf16 = math_mode == DS_MATH_BF16;
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

int ds_cpu_has_bf16(void)
{
    return (dnnl_get_effective_cpu_isa() & dnnl_cpu_isa_avx512_core_bf16) == dnnl_cpu_isa_avx512_core_bf16;
}

void ds_backend_destroy(ds_backend *backend)
{
    if (!backend)
        return;
    free(backend->bf16_scratch);
    dnnl_stream_destroy(backend->stream);
    dnnl_engine_destroy(backend->engine);
    free(backend);
}

ds_status ds_backend_synchronize(ds_backend *backend)
{
    DNNL_TRY(dnnl_stream_wait(backend->stream), "stream wait");
    return DS_OK;
}

ds_status ds_backend_probe(char *description, size_t size)
{
    const dnnl_version_t *v = dnnl_version();
    snprintf(description, size, "CPU, oneDNN %d.%d.%d", v->major, v->minor, v->patch);
    return DS_OK;
}

/* ---- backend memory: host memory, since the CPU ops read and write it directly ---- */

#define BACKEND_ALIGNMENT 64

ds_status ds_backend_alloc(ds_backend *backend, void **memory, size_t bytes)
{
    size_t rounded = (bytes + BACKEND_ALIGNMENT - 1) / BACKEND_ALIGNMENT * BACKEND_ALIGNMENT;
    *memory = aligned_alloc(BACKEND_ALIGNMENT, rounded ? rounded : BACKEND_ALIGNMENT);
    if (!*memory)
        return ds_fail(DS_ERR_NOMEM, "out of memory: %zu MiB requested", bytes >> 20);
    memset(*memory, 0, rounded);
    return DS_OK;
}

void ds_backend_free(ds_backend *backend, void *memory) { free(memory); }

ds_status ds_backend_upload(ds_backend *backend, void *dst, const void *host_src, size_t bytes)
{
    if (bytes)
        memcpy(dst, host_src, bytes);
    return DS_OK;
}

ds_status ds_backend_download(ds_backend *backend, void *host_dst, const void *src, size_t bytes)
{
    DS_TRY(ds_backend_synchronize(backend));
    if (bytes)
        memcpy(host_dst, src, bytes);
    return DS_OK;
}

ds_status ds_backend_copy(ds_backend *backend, void *dst, const void *src, size_t bytes)
{
    if (bytes)
        memmove(dst, src, bytes);
    return DS_OK;
}

ds_status ds_backend_zero(ds_backend *backend, void *dst, size_t bytes)
{
    if (bytes)
        memset(dst, 0, bytes);
    return DS_OK;
}

void ds_op_destroy(ds_op *op)
{
    if (!op)
        return;
    if (op->primitive)
        dnnl_primitive_destroy(op->primitive);
    if (op->to_bf16)
        dnnl_primitive_destroy(op->to_bf16);
    if (op->bf16_src)
        dnnl_memory_destroy(op->bf16_src);
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

/* A caller buffer of the op (io[n_io]): the handle is set on each execution. */
static ds_status new_io(ds_op *op, const_dnnl_memory_desc_t md, dnnl_memory_t *mem)
{
    DNNL_TRY(dnnl_memory_create(mem, md, op->backend->engine, DNNL_MEMORY_NONE), "memory");
    op->io[op->n_io++] = *mem;
    return DS_OK;
}

/* A caller-buffer argument of the primitive. */
static ds_status add_io(ds_op *op, int arg, const_dnnl_memory_desc_t md)
{
    dnnl_memory_t mem;
    DS_TRY(new_io(op, md, &mem));
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

/* Runs a one-input op (src -> dst): the data handles are swapped in, the primitive is reused. */
static ds_status execute_unary(ds_op *op, const float *src, float *dst)
{
    DS_TRY(set_io(op, 0, src));
    DS_TRY(set_io(op, 1, dst));
    return execute(op);
}

/* ---- convolution and transposed convolution ---- */

/* A bf16 convolution's input: io[0] is the caller's float32 buffer (not a convolution argument), reordered
 * into bf16_src (the convolution's DNNL_ARG_SRC, in the backend's scratch, grown here to fit). */
static ds_status add_bf16_input(ds_op *op, const_dnnl_memory_desc_t f32_md, const_dnnl_memory_desc_t bf16_md)
{
    ds_backend *b = op->backend;
    size_t bytes = dnnl_memory_desc_get_size(bf16_md);
    if (bytes > b->bf16_scratch_bytes) {
        void *grown = realloc(b->bf16_scratch, bytes);
        if (!grown)
            return ds_fail(DS_ERR_NOMEM, "out of memory (bf16 scratch of %zu bytes)", bytes);
        b->bf16_scratch = grown;
        b->bf16_scratch_bytes = bytes;
    }
    dnnl_memory_t input;
    DS_TRY(new_io(op, f32_md, &input));
    DNNL_TRY(dnnl_memory_create(&op->bf16_src, bf16_md, b->engine, DNNL_MEMORY_NONE), "memory");
    op->args[op->nargs++] = (dnnl_exec_arg_t){DNNL_ARG_SRC, op->bf16_src};
    dnnl_primitive_desc_t reorder_pd;
    DNNL_TRY(dnnl_reorder_primitive_desc_create(&reorder_pd, f32_md, b->engine, bf16_md, b->engine, NULL),
             "bf16 reorder descriptor");
    dnnl_status_t rc = dnnl_primitive_create(&op->to_bf16, reorder_pd);
    dnnl_primitive_desc_destroy(reorder_pd);
    DNNL_TRY(rc, "bf16 reorder");
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

ds_status ds_conv_forward_create(ds_op **op_out, ds_backend *backend, const conv_desc *d, const float *weight,
                                 const float *bias)
{
    DS_TRY(ds_conv_desc_check(d));
    ds_op *op;
    DS_TRY(op_alloc(&op, backend));
    dnnl_memory_desc_t src_md = NULL, dst_md = NULL, any_weight_md = NULL, user_weight_md = NULL, bias_md = NULL;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_primitive_desc_t pd = NULL;
    ds_status rc = DS_OK;
    dnnl_dims_t weight_dims = {d->out_channels, d->in_channels, d->kernel, d->kernel};
    dnnl_dims_t strides = {d->stride, d->stride}, dilates = {d->dilation - 1, d->dilation - 1};
    dnnl_dims_t pad_l = {d->pad_before, d->pad_before}, pad_r = {d->pad_after, d->pad_after};

    int bf16 = backend->bf16 && d->in_channels >= BF16_MIN_IN_CHANNELS && !(d->post & POST_SIGMOID);
    dnnl_data_type_t compute = bf16 ? dnnl_bf16 : dnnl_f32;
    dnnl_memory_desc_t conv_src_md = NULL;
    dnnl_dims_t src_dims = {d->batch, d->in_channels, d->in_height, d->in_width};
    if ((rc = nhwc_desc(&src_md, d->batch, d->in_channels, d->in_height, d->in_width)) ||
        (rc = nhwc_desc(&dst_md, d->batch, d->out_channels, d->out_height, d->out_width)) ||
        (rc = vector_desc(&bias_md, d->out_channels)) || (rc = conv_attr(&attr, d->post)))
        goto done;
    if (dnnl_memory_desc_create_with_tag(&conv_src_md, 4, src_dims, compute, dnnl_nhwc)) {
        rc = ds_fail(DS_ERR_BACKEND, "oneDNN: input memory descriptor");
        goto done;
    }
    if (dnnl_memory_desc_create_with_tag(&any_weight_md, 4, weight_dims, compute, dnnl_format_tag_any) ||
        dnnl_memory_desc_create_with_tag(&user_weight_md, 4, weight_dims, dnnl_f32, dnnl_oihw)) {
        rc = ds_fail(DS_ERR_BACKEND, "oneDNN: weight memory descriptor");
        goto done;
    }
    dnnl_status_t st = d->transposed
        ? dnnl_deconvolution_forward_primitive_desc_create(&pd, backend->engine, dnnl_forward_inference,
                                                           dnnl_deconvolution_direct, conv_src_md, any_weight_md,
                                                           bias_md, dst_md, strides, dilates, pad_l, pad_r, attr)
        : dnnl_convolution_forward_primitive_desc_create(&pd, backend->engine, dnnl_forward_inference,
                                                         dnnl_convolution_direct, conv_src_md, any_weight_md, bias_md,
                                                         dst_md, strides, dilates, pad_l, pad_r, attr);
    if (st != dnnl_success) {
        rc = ds_fail(DS_ERR_BACKEND, "oneDNN: no %sconvolution implementation for this shape (status %d)",
                     d->transposed ? "transposed " : "", (int)st);
        goto done;
    }
    const_dnnl_memory_desc_t chosen_weight_md = dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
    if ((rc = bf16 ? add_bf16_input(op, src_md, conv_src_md) : add_io(op, DNNL_ARG_SRC, src_md)) ||
        (rc = add_io(op, DNNL_ARG_DST, dst_md)) ||
        (rc = add_owned(op, DNNL_ARG_WEIGHTS, chosen_weight_md, user_weight_md, weight)) ||
        (rc = add_owned(op, DNNL_ARG_BIAS, bias_md, bias_md, bias)))
        goto done;
    rc = op_finish(op, pd);
    pd = NULL;
done:
    if (pd)
        dnnl_primitive_desc_destroy(pd);
    dnnl_memory_desc_destroy(src_md);
    dnnl_memory_desc_destroy(conv_src_md);
    dnnl_memory_desc_destroy(dst_md);
    dnnl_memory_desc_destroy(any_weight_md);
    dnnl_memory_desc_destroy(user_weight_md);
    dnnl_memory_desc_destroy(bias_md);
    if (attr)
        dnnl_primitive_attr_destroy(attr);
    if (rc != DS_OK)
        ds_op_destroy(op);
    else
        *op_out = op;
    return rc;
}

ds_status ds_conv_forward(ds_op *op, const float *src, float *dst)
{
    if (!op->to_bf16)
        return execute_unary(op, src, dst);
    DS_TRY(set_io(op, 0, src));
    DNNL_TRY(dnnl_memory_set_data_handle(op->bf16_src, op->backend->bf16_scratch), "set data handle");
    dnnl_exec_arg_t args[2] = {{DNNL_ARG_FROM, op->io[0]}, {DNNL_ARG_TO, op->bf16_src}};
    DNNL_TRY(dnnl_primitive_execute(op->to_bf16, op->backend->stream, 2, args), "bf16 input reorder");
    DS_TRY(set_io(op, 1, dst));
    return execute(op);
}

/* ---- batch norm + ReLU (inference) ---- */

ds_status ds_batchnorm_relu_forward_create(ds_op **op_out, ds_backend *backend, int batch, int channels, int height,
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
        ds_op_destroy(op);
    else
        *op_out = op;
    return rc;
}

ds_status ds_batchnorm_relu_forward(ds_op *op, const float *src, float *dst) { return execute_unary(op, src, dst); }

/* ---- max pooling ---- */

ds_status ds_maxpool_forward_create(ds_op **op_out, ds_backend *backend, int batch, int channels, int height,
                                    int width, int out_height, int out_width, int kernel, int stride, int pad_before,
                                    int pad_after)
{
    DS_TRY(ds_maxpool_shape_check(batch, channels, height, width, out_height, out_width, kernel, stride, pad_before,
                                  pad_after));
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
        ds_op_destroy(op);
    else
        *op_out = op;
    return rc;
}

ds_status ds_maxpool_forward(ds_op *op, const float *src, float *dst) { return execute_unary(op, src, dst); }

/* ---- channel concatenation ---- */

ds_status ds_concat_forward_create(ds_op **op_out, ds_backend *backend, int batch, int height, int width, int n_inputs,
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
        ds_op_destroy(op);
    else
        *op_out = op;
    return rc;
}

ds_status ds_concat_forward(ds_op *op, const float *const *srcs, float *dst)
{
    int n_inputs = op->n_io - 1;
    for (int i = 0; i < n_inputs; i++)
        DS_TRY(set_io(op, i, srcs[i]));
    DS_TRY(set_io(op, n_inputs, dst));
    return execute(op);
}

/* ================================================================ training ops
 * Each training op keeps its primitives (forward, backward data, backward weights) and the
 * memory objects of their arguments; caller buffers are bound with set_data_handle on each call.
 * Weights and weight gradients are exchanged in the plain [out, in, k, k] layout: when a
 * primitive prefers a blocked layout, a reorder primitive (built once) converts them. */

#define TOP_MAX_MEMS 24

typedef struct {
    dnnl_primitive_t primitive;
    int nargs;
    dnnl_exec_arg_t args[OP_MAX_ARGS];
} exec_step;

struct ds_train_op {
    ds_backend *backend;
    int training, need_dsrc;
    exec_step fwd, bwd_data, bwd_weights, reorder_w_fwd, reorder_w_bwd, reorder_dw;
    /* memories bound to caller buffers (NULL when unused) */
    dnnl_memory_t src, dst, weight, bias, dsrc, ddst, dweight, dbias;
    dnnl_memory_t scale, shift, mean, variance, dscale, dshift;
    int n_mems;
    dnnl_memory_t mems[TOP_MAX_MEMS]; /* every memory object, destroyed with the op */
};

void ds_train_op_destroy(ds_train_op *op)
{
    if (!op)
        return;
    exec_step *steps[] = {&op->fwd, &op->bwd_data, &op->bwd_weights, &op->reorder_w_fwd, &op->reorder_w_bwd,
                          &op->reorder_dw};
    for (size_t i = 0; i < sizeof steps / sizeof *steps; i++)
        if (steps[i]->primitive)
            dnnl_primitive_destroy(steps[i]->primitive);
    for (int i = 0; i < op->n_mems; i++)
        dnnl_memory_destroy(op->mems[i]);
    free(op);
}

static ds_status top_alloc(ds_train_op **op, ds_backend *backend)
{
    *op = calloc(1, sizeof **op);
    if (!*op)
        return ds_fail(DS_ERR_NOMEM, "out of memory");
    (*op)->backend = backend;
    return DS_OK;
}

/* A memory object of the op: allocate = 1 gives it its own buffer, 0 leaves the handle to the caller. */
static ds_status top_mem(ds_train_op *op, dnnl_memory_t *mem, const_dnnl_memory_desc_t md, int allocate)
{
    if (op->n_mems == TOP_MAX_MEMS)
        return ds_fail(DS_ERR_BACKEND, "training op: too many memory objects");
    DNNL_TRY(dnnl_memory_create(mem, md, op->backend->engine, allocate ? DNNL_MEMORY_ALLOCATE : DNNL_MEMORY_NONE),
             "memory");
    op->mems[op->n_mems++] = *mem;
    return DS_OK;
}

static void step_arg(exec_step *s, int arg, dnnl_memory_t mem) { s->args[s->nargs++] = (dnnl_exec_arg_t){arg, mem}; }

/* Takes ownership of pd. */
static ds_status step_create(exec_step *s, dnnl_primitive_desc_t pd, const char *what)
{
    dnnl_status_t rc = dnnl_primitive_create(&s->primitive, pd);
    dnnl_primitive_desc_destroy(pd);
    if (rc != dnnl_success)
        return ds_fail(DS_ERR_BACKEND, "oneDNN: cannot create the %s primitive (status %d)", what, (int)rc);
    return DS_OK;
}

static ds_status step_reorder(ds_train_op *op, exec_step *s, dnnl_memory_t from, dnnl_memory_t to)
{
    const_dnnl_memory_desc_t from_md, to_md;
    DNNL_TRY(dnnl_memory_get_memory_desc(from, &from_md), "memory descriptor query");
    DNNL_TRY(dnnl_memory_get_memory_desc(to, &to_md), "memory descriptor query");
    dnnl_primitive_desc_t pd;
    DNNL_TRY(dnnl_reorder_primitive_desc_create(&pd, from_md, op->backend->engine, to_md, op->backend->engine, NULL),
             "reorder primitive descriptor");
    step_arg(s, DNNL_ARG_FROM, from);
    step_arg(s, DNNL_ARG_TO, to);
    return step_create(s, pd, "reorder");
}

static ds_status step_run(ds_train_op *op, exec_step *s)
{
    if (!s->primitive)
        return DS_OK;
    DNNL_TRY(dnnl_primitive_execute(s->primitive, op->backend->stream, s->nargs, s->args), "execution");
    return DS_OK;
}

static ds_status bind(dnnl_memory_t mem, const void *data)
{
    DNNL_TRY(dnnl_memory_set_data_handle(mem, (void *)data), "set data handle");
    return DS_OK;
}

/* ---- convolution and transposed convolution: forward (training), backward data, backward weights ---- */

ds_status ds_conv_train_create(ds_train_op **op_out, ds_backend *backend, const conv_desc *d, int need_dsrc)
{
    if (d->post)
        return ds_fail(DS_ERR_VALUE, "training convolution: post-ops are not supported");
    DS_TRY(ds_conv_desc_check(d));
    ds_train_op *op;
    DS_TRY(top_alloc(&op, backend));
    op->need_dsrc = need_dsrc;
    op->training = 1;
    dnnl_memory_desc_t src_md = NULL, dst_md = NULL, any_w = NULL, user_w = NULL, bias_md = NULL;
    dnnl_primitive_desc_t fwd_pd = NULL, bwd_data_pd = NULL, bwd_weights_pd = NULL;
    ds_status rc = DS_OK;
    dnnl_dims_t weight_dims = {d->out_channels, d->in_channels, d->kernel, d->kernel};
    dnnl_dims_t strides = {d->stride, d->stride}, dilates = {d->dilation - 1, d->dilation - 1};
    dnnl_dims_t pad_l = {d->pad_before, d->pad_before}, pad_r = {d->pad_after, d->pad_after};
    dnnl_engine_t engine = backend->engine;
    dnnl_alg_kind_t alg = d->transposed ? dnnl_deconvolution_direct : dnnl_convolution_direct;
    const char *what = d->transposed ? "transposed convolution" : "convolution";

    if ((rc = nhwc_desc(&src_md, d->batch, d->in_channels, d->in_height, d->in_width)) ||
        (rc = nhwc_desc(&dst_md, d->batch, d->out_channels, d->out_height, d->out_width)) ||
        (rc = vector_desc(&bias_md, d->out_channels)))
        goto done;
    if (dnnl_memory_desc_create_with_tag(&any_w, 4, weight_dims, dnnl_f32, dnnl_format_tag_any) ||
        dnnl_memory_desc_create_with_tag(&user_w, 4, weight_dims, dnnl_f32, dnnl_oihw)) {
        rc = ds_fail(DS_ERR_BACKEND, "oneDNN: weight memory descriptor");
        goto done;
    }
    dnnl_status_t st = d->transposed
        ? dnnl_deconvolution_forward_primitive_desc_create(&fwd_pd, engine, dnnl_forward_training, alg, src_md, any_w,
                                                           bias_md, dst_md, strides, dilates, pad_l, pad_r, NULL)
        : dnnl_convolution_forward_primitive_desc_create(&fwd_pd, engine, dnnl_forward_training, alg, src_md, any_w,
                                                         bias_md, dst_md, strides, dilates, pad_l, pad_r, NULL);
    if (st == dnnl_success && need_dsrc)
        st = d->transposed
            ? dnnl_deconvolution_backward_data_primitive_desc_create(&bwd_data_pd, engine, alg, src_md, any_w, dst_md,
                                                                     strides, dilates, pad_l, pad_r, fwd_pd, NULL)
            : dnnl_convolution_backward_data_primitive_desc_create(&bwd_data_pd, engine, alg, src_md, any_w, dst_md,
                                                                   strides, dilates, pad_l, pad_r, fwd_pd, NULL);
    if (st == dnnl_success)
        st = d->transposed
            ? dnnl_deconvolution_backward_weights_primitive_desc_create(&bwd_weights_pd, engine, alg, src_md, any_w,
                                                                        bias_md, dst_md, strides, dilates, pad_l,
                                                                        pad_r, fwd_pd, NULL)
            : dnnl_convolution_backward_weights_primitive_desc_create(&bwd_weights_pd, engine, alg, src_md, any_w,
                                                                      bias_md, dst_md, strides, dilates, pad_l, pad_r,
                                                                      fwd_pd, NULL);
    if (st != dnnl_success) {
        rc = ds_fail(DS_ERR_BACKEND, "oneDNN: no training %s implementation for this shape (status %d)", what, (int)st);
        goto done;
    }
    /* forward: SRC, WEIGHTS (reordered from the caller's plain layout if needed), BIAS -> DST */
    const_dnnl_memory_desc_t w_fwd_md = dnnl_primitive_desc_query_md(fwd_pd, dnnl_query_weights_md, 0);
    dnnl_memory_t w_fwd;
    if ((rc = top_mem(op, &op->src, src_md, 0)) || (rc = top_mem(op, &op->dst, dst_md, 0)) ||
        (rc = top_mem(op, &op->weight, user_w, 0)) || (rc = top_mem(op, &op->bias, bias_md, 0)) ||
        (rc = top_mem(op, &op->ddst, dst_md, 0)) || (rc = top_mem(op, &op->dweight, user_w, 0)) ||
        (rc = top_mem(op, &op->dbias, bias_md, 0)))
        goto done;
    if (dnnl_memory_desc_equal(w_fwd_md, user_w)) {
        w_fwd = op->weight;
    } else if ((rc = top_mem(op, &w_fwd, w_fwd_md, 1)) || (rc = step_reorder(op, &op->reorder_w_fwd, op->weight, w_fwd))) {
        goto done;
    }
    step_arg(&op->fwd, DNNL_ARG_SRC, op->src);
    step_arg(&op->fwd, DNNL_ARG_WEIGHTS, w_fwd);
    step_arg(&op->fwd, DNNL_ARG_BIAS, op->bias);
    step_arg(&op->fwd, DNNL_ARG_DST, op->dst);
    /* backward data: DIFF_DST, WEIGHTS -> DIFF_SRC */
    if (need_dsrc) {
        const_dnnl_memory_desc_t w_bwd_md = dnnl_primitive_desc_query_md(bwd_data_pd, dnnl_query_weights_md, 0);
        dnnl_memory_t w_bwd;
        if ((rc = top_mem(op, &op->dsrc, src_md, 0)))
            goto done;
        if (dnnl_memory_desc_equal(w_bwd_md, w_fwd_md)) {
            w_bwd = w_fwd;
        } else if ((rc = top_mem(op, &w_bwd, w_bwd_md, 1)) ||
                   (rc = step_reorder(op, &op->reorder_w_bwd, w_fwd, w_bwd))) {
            goto done;
        }
        step_arg(&op->bwd_data, DNNL_ARG_DIFF_DST, op->ddst);
        step_arg(&op->bwd_data, DNNL_ARG_WEIGHTS, w_bwd);
        step_arg(&op->bwd_data, DNNL_ARG_DIFF_SRC, op->dsrc);
    }
    /* backward weights: SRC, DIFF_DST -> DIFF_WEIGHTS (reordered to the caller's layout), DIFF_BIAS */
    const_dnnl_memory_desc_t dw_md = dnnl_primitive_desc_query_md(bwd_weights_pd, dnnl_query_diff_weights_md, 0);
    dnnl_memory_t dw;
    if (dnnl_memory_desc_equal(dw_md, user_w)) {
        dw = op->dweight;
    } else if ((rc = top_mem(op, &dw, dw_md, 1)) || (rc = step_reorder(op, &op->reorder_dw, dw, op->dweight))) {
        goto done;
    }
    step_arg(&op->bwd_weights, DNNL_ARG_SRC, op->src);
    step_arg(&op->bwd_weights, DNNL_ARG_DIFF_DST, op->ddst);
    step_arg(&op->bwd_weights, DNNL_ARG_DIFF_WEIGHTS, dw);
    step_arg(&op->bwd_weights, DNNL_ARG_DIFF_BIAS, op->dbias);

    rc = step_create(&op->fwd, fwd_pd, what);
    fwd_pd = NULL;
    if (rc == DS_OK && need_dsrc) {
        rc = step_create(&op->bwd_data, bwd_data_pd, what);
        bwd_data_pd = NULL;
    }
    if (rc == DS_OK) {
        rc = step_create(&op->bwd_weights, bwd_weights_pd, what);
        bwd_weights_pd = NULL;
    }
done:
    if (fwd_pd)
        dnnl_primitive_desc_destroy(fwd_pd);
    if (bwd_data_pd)
        dnnl_primitive_desc_destroy(bwd_data_pd);
    if (bwd_weights_pd)
        dnnl_primitive_desc_destroy(bwd_weights_pd);
    dnnl_memory_desc_destroy(src_md);
    dnnl_memory_desc_destroy(dst_md);
    dnnl_memory_desc_destroy(any_w);
    dnnl_memory_desc_destroy(user_w);
    dnnl_memory_desc_destroy(bias_md);
    if (rc != DS_OK)
        ds_train_op_destroy(op);
    else
        *op_out = op;
    return rc;
}

ds_status ds_conv_train_forward(ds_train_op *op, float *dst, const float *src, const float *weight, const float *bias)
{
    DS_TRY(bind(op->src, src));
    DS_TRY(bind(op->dst, dst));
    DS_TRY(bind(op->weight, weight));
    DS_TRY(bind(op->bias, bias));
    DS_TRY(step_run(op, &op->reorder_w_fwd));
    return step_run(op, &op->fwd);
}

ds_status ds_conv_backward(ds_train_op *op, float *dsrc, float *dweight, float *dbias, const float *ddst,
                           const float *src)
{
    DS_TRY(bind(op->ddst, ddst));
    if (dsrc) {
        if (!op->need_dsrc)
            return ds_fail(DS_ERR_VALUE, "convolution backward: built without the data gradient");
        DS_TRY(bind(op->dsrc, dsrc));
        DS_TRY(step_run(op, &op->reorder_w_bwd));
        DS_TRY(step_run(op, &op->bwd_data));
    }
    if (dweight) {
        if (!dbias)
            return ds_fail(DS_ERR_VALUE, "convolution backward: dweight without dbias");
        DS_TRY(bind(op->src, src));
        DS_TRY(bind(op->dweight, dweight));
        DS_TRY(bind(op->dbias, dbias));
        DS_TRY(step_run(op, &op->bwd_weights));
        DS_TRY(step_run(op, &op->reorder_dw));
    }
    return DS_OK;
}

/* ---- batch norm (+ ReLU), training and inference with statistics passed per call ---- */

ds_status ds_batchnorm_train_create(ds_train_op **op_out, ds_backend *backend, int batch, int channels, int height,
                                    int width, float epsilon, int relu, int mode)
{
    if (mode != DS_BN_INFERENCE && mode != DS_BN_BATCH_STATISTICS && mode != DS_BN_FROZEN)
        return ds_fail(DS_ERR_VALUE, "batch norm: unknown mode %d", mode);
    int training = mode != DS_BN_INFERENCE; /* has a backward */
    ds_train_op *op;
    DS_TRY(top_alloc(&op, backend));
    op->training = training;
    dnnl_memory_desc_t md = NULL, vec_md = NULL;
    dnnl_primitive_desc_t fwd_pd = NULL, bwd_pd = NULL;
    ds_status rc;
    /* with global statistics oneDNN's backward treats mean and variance as constants */
    unsigned flags = dnnl_use_scale | dnnl_use_shift | (relu ? dnnl_fuse_norm_relu : 0) |
                     (mode == DS_BN_BATCH_STATISTICS ? 0 : dnnl_use_global_stats);
    if ((rc = nhwc_desc(&md, batch, channels, height, width)) || (rc = vector_desc(&vec_md, channels)))
        goto done;
    if (dnnl_batch_normalization_forward_primitive_desc_create(&fwd_pd, backend->engine,
                                                               training ? dnnl_forward_training
                                                                        : dnnl_forward_inference,
                                                               md, md, epsilon, flags, NULL) != dnnl_success ||
        (training && dnnl_batch_normalization_backward_primitive_desc_create(&bwd_pd, backend->engine, dnnl_backward,
                                                                             md, md, md, epsilon, flags, fwd_pd,
                                                                             NULL) != dnnl_success)) {
        rc = ds_fail(DS_ERR_BACKEND, "oneDNN: training batch norm primitive descriptor");
        goto done;
    }
    dnnl_memory_t workspace = NULL;
    if ((rc = top_mem(op, &op->src, md, 0)) || (rc = top_mem(op, &op->dst, md, 0)) ||
        (rc = top_mem(op, &op->scale, vec_md, 0)) || (rc = top_mem(op, &op->shift, vec_md, 0)) ||
        (rc = top_mem(op, &op->mean, vec_md, 0)) || (rc = top_mem(op, &op->variance, vec_md, 0)))
        goto done;
    if (training && relu &&
        (rc = top_mem(op, &workspace, dnnl_primitive_desc_query_md(fwd_pd, dnnl_query_workspace_md, 0), 1)))
        goto done;
    step_arg(&op->fwd, DNNL_ARG_SRC, op->src);
    step_arg(&op->fwd, DNNL_ARG_DST, op->dst);
    step_arg(&op->fwd, DNNL_ARG_SCALE, op->scale);
    step_arg(&op->fwd, DNNL_ARG_SHIFT, op->shift);
    step_arg(&op->fwd, DNNL_ARG_MEAN, op->mean);
    step_arg(&op->fwd, DNNL_ARG_VARIANCE, op->variance);
    if (workspace)
        step_arg(&op->fwd, DNNL_ARG_WORKSPACE, workspace);
    if (training) {
        if ((rc = top_mem(op, &op->dsrc, md, 0)) || (rc = top_mem(op, &op->ddst, md, 0)) ||
            (rc = top_mem(op, &op->dscale, vec_md, 0)) || (rc = top_mem(op, &op->dshift, vec_md, 0)))
            goto done;
        step_arg(&op->bwd_data, DNNL_ARG_SRC, op->src);
        step_arg(&op->bwd_data, DNNL_ARG_MEAN, op->mean);
        step_arg(&op->bwd_data, DNNL_ARG_VARIANCE, op->variance);
        step_arg(&op->bwd_data, DNNL_ARG_DIFF_DST, op->ddst);
        step_arg(&op->bwd_data, DNNL_ARG_SCALE, op->scale);
        if (workspace)
            step_arg(&op->bwd_data, DNNL_ARG_WORKSPACE, workspace);
        step_arg(&op->bwd_data, DNNL_ARG_DIFF_SRC, op->dsrc);
        step_arg(&op->bwd_data, DNNL_ARG_DIFF_SCALE, op->dscale);
        step_arg(&op->bwd_data, DNNL_ARG_DIFF_SHIFT, op->dshift);
    }
    rc = step_create(&op->fwd, fwd_pd, "batch norm");
    fwd_pd = NULL;
    if (rc == DS_OK && training) {
        rc = step_create(&op->bwd_data, bwd_pd, "batch norm backward");
        bwd_pd = NULL;
    }
done:
    if (fwd_pd)
        dnnl_primitive_desc_destroy(fwd_pd);
    if (bwd_pd)
        dnnl_primitive_desc_destroy(bwd_pd);
    dnnl_memory_desc_destroy(md);
    dnnl_memory_desc_destroy(vec_md);
    if (rc != DS_OK)
        ds_train_op_destroy(op);
    else
        *op_out = op;
    return rc;
}

ds_status ds_batchnorm_train_forward(ds_train_op *op, float *dst, float *mean, float *variance, const float *src,
                                     const float *gamma, const float *beta)
{
    DS_TRY(bind(op->src, src));
    DS_TRY(bind(op->dst, dst));
    DS_TRY(bind(op->mean, mean));
    DS_TRY(bind(op->variance, variance));
    DS_TRY(bind(op->scale, gamma));
    DS_TRY(bind(op->shift, beta));
    return step_run(op, &op->fwd);
}

ds_status ds_batchnorm_backward(ds_train_op *op, float *dsrc, float *dgamma, float *dbeta, float *ddst,
                                const float *src, const float *mean, const float *variance, const float *gamma,
                                const float *beta)
{
    if (!op->training)
        return ds_fail(DS_ERR_VALUE, "batch norm backward: the op was built for inference");
    DS_TRY(bind(op->src, src));
    DS_TRY(bind(op->mean, mean));
    DS_TRY(bind(op->variance, variance));
    DS_TRY(bind(op->scale, gamma));
    DS_TRY(bind(op->ddst, ddst));
    DS_TRY(bind(op->dsrc, dsrc));
    DS_TRY(bind(op->dscale, dgamma));
    DS_TRY(bind(op->dshift, dbeta));
    return step_run(op, &op->bwd_data);
}

/* ---- max pooling with its arg-max workspace ---- */

ds_status ds_maxpool_train_create(ds_train_op **op_out, ds_backend *backend, int batch, int channels, int height,
                                  int width, int out_height, int out_width, int kernel, int stride, int pad_before,
                                  int pad_after)
{
    DS_TRY(ds_maxpool_shape_check(batch, channels, height, width, out_height, out_width, kernel, stride, pad_before,
                                  pad_after));
    ds_train_op *op;
    DS_TRY(top_alloc(&op, backend));
    op->training = 1;
    dnnl_memory_desc_t src_md = NULL, dst_md = NULL;
    dnnl_primitive_desc_t fwd_pd = NULL, bwd_pd = NULL;
    ds_status rc;
    dnnl_dims_t strides = {stride, stride}, kernels = {kernel, kernel}, dilation = {0, 0};
    dnnl_dims_t pad_l = {pad_before, pad_before}, pad_r = {pad_after, pad_after};
    if ((rc = nhwc_desc(&src_md, batch, channels, height, width)) ||
        (rc = nhwc_desc(&dst_md, batch, channels, out_height, out_width)))
        goto done;
    if (dnnl_pooling_forward_primitive_desc_create(&fwd_pd, backend->engine, dnnl_forward_training, dnnl_pooling_max,
                                                   src_md, dst_md, strides, kernels, dilation, pad_l, pad_r,
                                                   NULL) != dnnl_success ||
        dnnl_pooling_backward_primitive_desc_create(&bwd_pd, backend->engine, dnnl_pooling_max, src_md, dst_md,
                                                    strides, kernels, dilation, pad_l, pad_r, fwd_pd,
                                                    NULL) != dnnl_success) {
        rc = ds_fail(DS_ERR_BACKEND, "oneDNN: training pooling primitive descriptor");
        goto done;
    }
    dnnl_memory_t workspace;
    if ((rc = top_mem(op, &op->src, src_md, 0)) || (rc = top_mem(op, &op->dst, dst_md, 0)) ||
        (rc = top_mem(op, &op->dsrc, src_md, 0)) || (rc = top_mem(op, &op->ddst, dst_md, 0)) ||
        (rc = top_mem(op, &workspace, dnnl_primitive_desc_query_md(fwd_pd, dnnl_query_workspace_md, 0), 1)))
        goto done;
    step_arg(&op->fwd, DNNL_ARG_SRC, op->src);
    step_arg(&op->fwd, DNNL_ARG_DST, op->dst);
    step_arg(&op->fwd, DNNL_ARG_WORKSPACE, workspace);
    step_arg(&op->bwd_data, DNNL_ARG_DIFF_DST, op->ddst);
    step_arg(&op->bwd_data, DNNL_ARG_WORKSPACE, workspace);
    step_arg(&op->bwd_data, DNNL_ARG_DIFF_SRC, op->dsrc);
    rc = step_create(&op->fwd, fwd_pd, "pooling");
    fwd_pd = NULL;
    if (rc == DS_OK) {
        rc = step_create(&op->bwd_data, bwd_pd, "pooling backward");
        bwd_pd = NULL;
    }
done:
    if (fwd_pd)
        dnnl_primitive_desc_destroy(fwd_pd);
    if (bwd_pd)
        dnnl_primitive_desc_destroy(bwd_pd);
    dnnl_memory_desc_destroy(src_md);
    dnnl_memory_desc_destroy(dst_md);
    if (rc != DS_OK)
        ds_train_op_destroy(op);
    else
        *op_out = op;
    return rc;
}

ds_status ds_maxpool_train_forward(ds_train_op *op, float *dst, const float *src)
{
    DS_TRY(bind(op->src, src));
    DS_TRY(bind(op->dst, dst));
    return step_run(op, &op->fwd);
}

ds_status ds_maxpool_backward(ds_train_op *op, float *dsrc, const float *ddst)
{
    DS_TRY(bind(op->ddst, ddst));
    DS_TRY(bind(op->dsrc, dsrc));
    return step_run(op, &op->bwd_data);
}
