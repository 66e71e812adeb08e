/* py_single_ops.c - a test harness: each op and kernel of ops.h on its own, built for the given shape,
 * run once on NumPy arrays and destroyed. The tests check every op against float64 NumPy references
 * and compare backends with each other through it; the network itself never goes through here.
 * All single ops share one backend, made on first use; a lock lets one call at a time build, run and
 * destroy its op on it, with the GIL released. Output shapes come from op_shapes.c. */
#include "py_glue.h"

#include "ops.h"

static ds_backend *shared_backend;     /* made under single_op_lock on first use */
static PyThread_type_lock single_op_lock;

int ds_py_single_ops_init(void)
{
    if (!single_op_lock && !(single_op_lock = PyThread_allocate_lock())) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* The arrays of one single-op call staged in backend memory: inputs uploaded, outputs downloaded
 * at the end. Runs without the GIL (the arrays are owned by the caller for the whole call), holding
 * single_op_lock from staging_begin to staging_finish: build, run and destroy the op in between. */
#define STAGED_MAX 12
enum { STAGE_IN = 1, STAGE_OUT = 2, STAGE_INOUT = 3 };

typedef struct {
    ds_backend *backend;
    ds_status rc; /* the first failure; later staging and finishing do nothing but clean up */
    int count;
    PyArrayObject *arrays[STAGED_MAX];
    void *memory[STAGED_MAX];
    int mode[STAGED_MAX];
} staging;

static void staging_begin(staging *s)
{
    *s = (staging){.rc = DS_OK};
    PyThread_acquire_lock(single_op_lock, WAIT_LOCK);
    if (!shared_backend)
        s->rc = ds_backend_create(&shared_backend, DS_MATH_FLOAT32);
    s->backend = shared_backend;
}

/* Backend memory holding `a` (uploaded for STAGE_IN); NULL if `a` is NULL or staging has failed. */
static void *stage(staging *s, PyArrayObject *a, int mode)
{
    if (!a || s->rc != DS_OK)
        return NULL;
    if (s->count == STAGED_MAX) {
        s->rc = ds_fail(DS_ERR_VALUE, "too many arrays for one op");
        return NULL;
    }
    void *memory = NULL;
    size_t bytes = (size_t)PyArray_NBYTES(a);
    s->rc = ds_backend_alloc(s->backend, &memory, bytes);
    if (s->rc == DS_OK && (mode & STAGE_IN))
        s->rc = ds_backend_upload(s->backend, memory, PyArray_DATA(a), bytes);
    if (memory) {
        s->arrays[s->count] = a;
        s->memory[s->count] = memory;
        s->mode[s->count++] = mode;
    }
    return s->rc == DS_OK ? memory : NULL;
}

/* Downloads the outputs if everything so far succeeded (rc: the op's status), frees the staging and
 * releases the lock; returns the first failure. */
static ds_status staging_finish(staging *s, ds_status rc)
{
    if (s->rc == DS_OK)
        s->rc = rc;
    for (int i = 0; i < s->count; i++) {
        if (s->rc == DS_OK && (s->mode[i] & STAGE_OUT))
            s->rc = ds_backend_download(s->backend, PyArray_DATA(s->arrays[i]), s->memory[i],
                                        (size_t)PyArray_NBYTES(s->arrays[i]));
        ds_backend_free(s->backend, s->memory[i]);
    }
    PyThread_release_lock(single_op_lock);
    return s->rc;
}

/* ---------------------------------------------------------------- inference ops */

/* Builds one inference op from its arguments (`args`, host memory the caller keeps alive). */
typedef ds_status (*op_builder)(ds_op **op, ds_backend *backend, const void *args);
typedef ds_status (*unary_forward)(ds_op *, const float *, float *);

/* Builds an op, runs it on (src -> dst) and destroys it, with the GIL released; dst is also read
 * (accumulation). Consumes the references to src and dst; returns dst or NULL with an exception. */
static PyObject *run_unary(op_builder build, const void *args, unary_forward forward, PyArrayObject *src,
                           PyArrayObject *dst)
{
    ds_status rc;
    Py_BEGIN_ALLOW_THREADS
    staging st;
    staging_begin(&st);
    const float *src_memory = stage(&st, src, STAGE_IN);
    float *dst_memory = stage(&st, dst, STAGE_INOUT);
    ds_op *op = NULL;
    rc = st.rc;
    if (rc == DS_OK)
        rc = build(&op, st.backend, args);
    if (rc == DS_OK)
        rc = forward(op, src_memory, dst_memory);
    ds_op_destroy(op);
    rc = staging_finish(&st, rc);
    Py_END_ALLOW_THREADS
    Py_DECREF(src);
    if (rc != DS_OK) {
        Py_DECREF(dst);
        return ds_py_raise(rc);
    }
    return (PyObject *)dst;
}

typedef struct {
    conv_desc desc;
    const float *weight, *bias;
} conv_args;

static ds_status build_conv(ds_op **op, ds_backend *backend, const void *args)
{
    const conv_args *a = args;
    return ds_conv_forward_create(op, backend, &a->desc, a->weight, a->bias);
}

static PyObject *py_conv2d(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"x", "weight", "bias", "stride", "dilation", "pad_before", "pad_after",
                               "transposed", "relu", "sigmoid", "accumulate", NULL};
    PyObject *x_obj, *w_obj, *b_obj, *acc_obj = Py_None;
    int stride = 1, dilation = 1, pad_before = 0, pad_after = 0, transposed = 0, relu = 0, sigmoid = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|iiiipppO", keywords, &x_obj, &w_obj, &b_obj, &stride,
                                     &dilation, &pad_before, &pad_after, &transposed, &relu, &sigmoid, &acc_obj))
        return NULL;
    PyArrayObject *x = ds_py_float32_array(x_obj, 4, "x"), *w = NULL, *b = NULL, *y = NULL;
    PyObject *result = NULL;
    if (!x || !(w = ds_py_float32_array(w_obj, 4, "weight")) || !(b = ds_py_float32_array(b_obj, 1, "bias")))
        goto done;
    npy_intp *xd = PyArray_DIMS(x), *wd = PyArray_DIMS(w);
    if (wd[1] != xd[3] || wd[2] != wd[3] || PyArray_DIM(b, 0) != wd[0]) {
        PyErr_SetString(PyExc_ValueError, "conv2d: weight must be [out, in, k, k] with in = x.shape[3], bias [out]");
        goto done;
    }
    if (stride < 1 || dilation < 1) {
        PyErr_SetString(PyExc_ValueError, "conv2d: stride and dilation must be >= 1");
        goto done;
    }
    conv_args a = {
        .desc = {.transposed = transposed, .batch = (int)xd[0], .in_channels = (int)xd[3], .in_height = (int)xd[1],
                 .in_width = (int)xd[2], .out_channels = (int)wd[0], .kernel = (int)wd[2], .stride = stride,
                 .dilation = dilation, .pad_before = pad_before, .pad_after = pad_after,
                 .post = (acc_obj != Py_None ? POST_SUM : 0) | (relu ? POST_RELU : 0) | (sigmoid ? POST_SIGMOID : 0)},
        .weight = PyArray_DATA(w),
        .bias = PyArray_DATA(b)};
    conv_desc *d = &a.desc;
    if (ds_conv_output_size(d) != DS_OK) {
        PyErr_SetString(PyExc_ValueError, "conv2d: empty output");
        goto done;
    }
    if (acc_obj != Py_None) {
        PyArrayObject *acc = ds_py_float32_array(acc_obj, 4, "accumulate");
        if (!acc)
            goto done;
        y = (PyArrayObject *)PyArray_NewCopy(acc, NPY_CORDER);
        Py_DECREF(acc);
        if (y && (PyArray_DIM(y, 0) != d->batch || PyArray_DIM(y, 1) != d->out_height ||
                  PyArray_DIM(y, 2) != d->out_width || PyArray_DIM(y, 3) != d->out_channels)) {
            PyErr_SetString(PyExc_ValueError, "conv2d: accumulate must have the output's shape");
            goto done;
        }
    } else {
        y = ds_py_new_nhwc(d->batch, d->out_height, d->out_width, d->out_channels);
    }
    if (!y)
        goto done;
    result = run_unary(build_conv, &a, ds_conv_forward, x, y);
    x = y = NULL;
done:
    Py_XDECREF(x);
    Py_XDECREF(w);
    Py_XDECREF(b);
    Py_XDECREF(y);
    return result;
}

typedef struct {
    int batch, channels, height, width;
    const float *gamma, *beta, *mean, *variance;
    float epsilon;
} batchnorm_args;

static ds_status build_batchnorm_relu(ds_op **op, ds_backend *backend, const void *args)
{
    const batchnorm_args *a = args;
    return ds_batchnorm_relu_forward_create(op, backend, a->batch, a->channels, a->height, a->width, a->gamma, a->beta,
                                            a->mean, a->variance, a->epsilon);
}

static PyObject *py_batchnorm_relu(PyObject *self, PyObject *args)
{
    PyObject *objs[5];
    float epsilon;
    if (!PyArg_ParseTuple(args, "OOOOOf", &objs[0], &objs[1], &objs[2], &objs[3], &objs[4], &epsilon))
        return NULL;
    static const char *names[5] = {"x", "gamma", "beta", "mean", "variance"};
    PyArrayObject *a[5] = {NULL}, *y = NULL;
    PyObject *result = NULL;
    for (int i = 0; i < 5; i++)
        if (!(a[i] = ds_py_float32_array(objs[i], i ? 1 : 4, names[i])))
            goto done;
    npy_intp *xd = PyArray_DIMS(a[0]);
    for (int i = 1; i < 5; i++)
        if (PyArray_DIM(a[i], 0) != xd[3]) {
            PyErr_SetString(PyExc_ValueError, "batchnorm_relu: statistics must have x.shape[3] entries");
            goto done;
        }
    if (!(y = ds_py_new_nhwc(xd[0], xd[1], xd[2], xd[3])))
        goto done;
    batchnorm_args bn = {.batch = (int)xd[0], .channels = (int)xd[3], .height = (int)xd[1], .width = (int)xd[2],
                         .gamma = PyArray_DATA(a[1]), .beta = PyArray_DATA(a[2]), .mean = PyArray_DATA(a[3]),
                         .variance = PyArray_DATA(a[4]), .epsilon = epsilon};
    result = run_unary(build_batchnorm_relu, &bn, ds_batchnorm_relu_forward, a[0], y);
    a[0] = y = NULL;
done:
    for (int i = 0; i < 5; i++)
        Py_XDECREF(a[i]);
    Py_XDECREF(y);
    return result;
}

typedef struct {
    int batch, channels, height, width, out_height, out_width, kernel, stride, pad_before, pad_after;
} maxpool_args;

static ds_status build_maxpool(ds_op **op, ds_backend *backend, const void *args)
{
    const maxpool_args *a = args;
    return ds_maxpool_forward_create(op, backend, a->batch, a->channels, a->height, a->width, a->out_height,
                                     a->out_width, a->kernel, a->stride, a->pad_before, a->pad_after);
}

static PyObject *py_maxpool(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"x", "kernel", "stride", "pad_before", "pad_after", NULL};
    PyObject *x_obj;
    maxpool_args p = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Oii|ii", keywords, &x_obj, &p.kernel, &p.stride, &p.pad_before,
                                     &p.pad_after))
        return NULL;
    PyArrayObject *x = ds_py_float32_array(x_obj, 4, "x");
    if (!x)
        return NULL;
    npy_intp *xd = PyArray_DIMS(x);
    p.batch = (int)xd[0];
    p.height = (int)xd[1];
    p.width = (int)xd[2];
    p.channels = (int)xd[3];
    ds_status rc = ds_maxpool_output_size(p.height, p.width, p.kernel, p.stride, p.pad_before, p.pad_after,
                                          &p.out_height, &p.out_width);
    PyArrayObject *y = rc == DS_OK ? ds_py_new_nhwc(p.batch, p.out_height, p.out_width, p.channels) : NULL;
    if (!y) {
        Py_DECREF(x);
        return rc == DS_OK ? NULL : ds_py_raise(rc);
    }
    return run_unary(build_maxpool, &p, ds_maxpool_forward, x, y);
}

static PyObject *py_concat(PyObject *self, PyObject *arg)
{
    PyObject *seq = PySequence_Fast(arg, "concat expects a sequence of arrays");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyArrayObject *xs[CONCAT_MAX_INPUTS] = {NULL}, *y = NULL;
    int channels[CONCAT_MAX_INPUTS], total = 0;
    if (n < 1 || n > CONCAT_MAX_INPUTS) {
        PyErr_Format(PyExc_ValueError, "concat: 1..%d arrays expected", CONCAT_MAX_INPUTS);
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!(xs[i] = ds_py_float32_array(PySequence_Fast_GET_ITEM(seq, i), 4, "each concat input")))
            goto done;
        for (int k = 0; k < 3; k++)
            if (PyArray_DIM(xs[i], k) != PyArray_DIM(xs[0], k)) {
                PyErr_SetString(PyExc_ValueError, "concat: inputs differ in batch, height or width");
                goto done;
            }
        channels[i] = (int)PyArray_DIM(xs[i], 3);
        total += channels[i];
    }
    npy_intp *d0 = PyArray_DIMS(xs[0]);
    if (!(y = ds_py_new_nhwc(d0[0], d0[1], d0[2], total)))
        goto done;
    ds_status rc;
    Py_BEGIN_ALLOW_THREADS
    staging st;
    staging_begin(&st);
    const float *srcs[CONCAT_MAX_INPUTS];
    for (Py_ssize_t i = 0; i < n; i++)
        srcs[i] = stage(&st, xs[i], STAGE_IN);
    float *dst = stage(&st, y, STAGE_OUT);
    ds_op *op = NULL;
    rc = st.rc;
    if (rc == DS_OK)
        rc = ds_concat_forward_create(&op, st.backend, (int)d0[0], (int)d0[1], (int)d0[2], (int)n, channels);
    if (rc == DS_OK)
        rc = ds_concat_forward(op, srcs, dst);
    ds_op_destroy(op);
    rc = staging_finish(&st, rc);
    Py_END_ALLOW_THREADS
    if (rc != DS_OK) {
        Py_CLEAR(y);
        ds_py_raise(rc);
    }
done:
    for (int i = 0; i < CONCAT_MAX_INPUTS; i++)
        Py_XDECREF(xs[i]);
    Py_DECREF(seq);
    return (PyObject *)y;
}

/* ---------------------------------------------------------------- training ops and kernels */

static PyObject *py_conv2d_backward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"x", "weight", "bias", "dy", "stride", "dilation", "pad_before", "pad_after",
                               "transposed", "need_dx", NULL};
    PyObject *x_obj, *w_obj, *b_obj, *dy_obj;
    int stride = 1, dilation = 1, pad_before = 0, pad_after = 0, transposed = 0, need_dx = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO|iiiipp", keywords, &x_obj, &w_obj, &b_obj, &dy_obj, &stride,
                                     &dilation, &pad_before, &pad_after, &transposed, &need_dx))
        return NULL;
    PyArrayObject *x = NULL, *w = NULL, *b = NULL, *dy = NULL, *y = NULL, *dx = NULL, *dw = NULL, *db = NULL;
    PyObject *result = NULL;
    if (!(x = ds_py_float32_array(x_obj, 4, "x")) || !(w = ds_py_float32_array(w_obj, 4, "weight")) ||
        !(b = ds_py_float32_array(b_obj, 1, "bias")) || !(dy = ds_py_float32_array(dy_obj, 4, "dy")))
        goto done;
    npy_intp *xd = PyArray_DIMS(x), *wd = PyArray_DIMS(w);
    if (wd[1] != xd[3] || wd[2] != wd[3] || PyArray_DIM(b, 0) != wd[0] || stride < 1 || dilation < 1) {
        PyErr_SetString(PyExc_ValueError, "conv2d_backward: weight [out, in, k, k] with in = x.shape[3], bias [out]");
        goto done;
    }
    conv_desc d = {.transposed = transposed, .batch = (int)xd[0], .in_channels = (int)xd[3], .in_height = (int)xd[1],
                   .in_width = (int)xd[2], .out_channels = (int)wd[0], .kernel = (int)wd[2], .stride = stride,
                   .dilation = dilation, .pad_before = pad_before, .pad_after = pad_after};
    if (ds_conv_output_size(&d) != DS_OK || PyArray_DIM(dy, 0) != d.batch || PyArray_DIM(dy, 1) != d.out_height ||
        PyArray_DIM(dy, 2) != d.out_width || PyArray_DIM(dy, 3) != d.out_channels) {
        PyErr_SetString(PyExc_ValueError, "conv2d_backward: dy must have the output's shape");
        goto done;
    }
    if (!(y = ds_py_new_nhwc(d.batch, d.out_height, d.out_width, d.out_channels)) ||
        !(dx = ds_py_new_nhwc(xd[0], xd[1], xd[2], xd[3])) ||
        !(dw = (PyArrayObject *)PyArray_ZEROS(4, wd, NPY_FLOAT32, 0)) ||
        !(db = (PyArrayObject *)PyArray_ZEROS(1, PyArray_DIMS(b), NPY_FLOAT32, 0)))
        goto done;
    ds_train_op *op = NULL;
    ds_status rc;
    Py_BEGIN_ALLOW_THREADS
    staging st;
    staging_begin(&st);
    float *x_ = stage(&st, x, STAGE_IN), *w_ = stage(&st, w, STAGE_IN), *b_ = stage(&st, b, STAGE_IN),
          *dy_ = stage(&st, dy, STAGE_IN), *y_ = stage(&st, y, STAGE_OUT), *dw_ = stage(&st, dw, STAGE_OUT),
          *db_ = stage(&st, db, STAGE_OUT), *dx_ = need_dx ? stage(&st, dx, STAGE_OUT) : NULL;
    rc = st.rc;
    if (rc == DS_OK)
        rc = ds_conv_train_create(&op, st.backend, &d, need_dx);
    if (rc == DS_OK)
        rc = ds_conv_train_forward(op, y_, x_, w_, b_);
    if (rc == DS_OK)
        rc = ds_conv_backward(op, dx_, dw_, db_, dy_, x_);
    ds_train_op_destroy(op);
    rc = staging_finish(&st, rc);
    Py_END_ALLOW_THREADS
    if (rc != DS_OK)
        ds_py_raise(rc);
    else
        result = Py_BuildValue("(OOOO)", y, need_dx ? (PyObject *)dx : Py_None, dw, db);
done:
    Py_XDECREF(x);
    Py_XDECREF(w);
    Py_XDECREF(b);
    Py_XDECREF(dy);
    Py_XDECREF(y);
    Py_XDECREF(dx);
    Py_XDECREF(dw);
    Py_XDECREF(db);
    return result;
}

static PyObject *py_batchnorm_train(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"x", "gamma", "beta", "dy", "epsilon", "relu", NULL};
    PyObject *x_obj, *g_obj, *b_obj, *dy_obj;
    float epsilon = 1e-3f;
    int relu = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO|fp", keywords, &x_obj, &g_obj, &b_obj, &dy_obj, &epsilon,
                                     &relu))
        return NULL;
    PyArrayObject *x = NULL, *g = NULL, *b = NULL, *dy = NULL, *y = NULL, *dx = NULL, *mean = NULL, *var = NULL,
                  *dg = NULL, *dbeta = NULL;
    PyObject *result = NULL;
    if (!(x = ds_py_float32_array(x_obj, 4, "x")) || !(g = ds_py_float32_array(g_obj, 1, "gamma")) ||
        !(b = ds_py_float32_array(b_obj, 1, "beta")) || !(dy = ds_py_float32_array(dy_obj, 4, "dy")))
        goto done;
    npy_intp *xd = PyArray_DIMS(x), cd[1] = {xd[3]};
    if (PyArray_DIM(g, 0) != xd[3] || PyArray_DIM(b, 0) != xd[3] || !PyArray_SAMESHAPE(x, dy)) {
        PyErr_SetString(PyExc_ValueError, "batchnorm_train: gamma, beta [channels]; dy of x's shape");
        goto done;
    }
    if (!(y = ds_py_new_nhwc(xd[0], xd[1], xd[2], xd[3])) || !(dx = ds_py_new_nhwc(xd[0], xd[1], xd[2], xd[3])) ||
        !(mean = (PyArrayObject *)PyArray_ZEROS(1, cd, NPY_FLOAT32, 0)) ||
        !(var = (PyArrayObject *)PyArray_ZEROS(1, cd, NPY_FLOAT32, 0)) ||
        !(dg = (PyArrayObject *)PyArray_ZEROS(1, cd, NPY_FLOAT32, 0)) ||
        !(dbeta = (PyArrayObject *)PyArray_ZEROS(1, cd, NPY_FLOAT32, 0)))
        goto done;
    ds_train_op *op = NULL;
    ds_status rc;
    Py_BEGIN_ALLOW_THREADS
    staging st;
    staging_begin(&st);
    float *x_ = stage(&st, x, STAGE_IN), *g_ = stage(&st, g, STAGE_IN), *b_ = stage(&st, b, STAGE_IN),
          *dy_ = stage(&st, dy, STAGE_IN), *y_ = stage(&st, y, STAGE_OUT), *mean_ = stage(&st, mean, STAGE_OUT),
          *var_ = stage(&st, var, STAGE_OUT), *dx_ = stage(&st, dx, STAGE_OUT), *dg_ = stage(&st, dg, STAGE_OUT),
          *dbeta_ = stage(&st, dbeta, STAGE_OUT);
    rc = st.rc;
    if (rc == DS_OK)
        rc = ds_batchnorm_train_create(&op, st.backend, (int)xd[0], (int)xd[3], (int)xd[1], (int)xd[2], epsilon, relu,
                                       1);
    if (rc == DS_OK)
        rc = ds_batchnorm_train_forward(op, y_, mean_, var_, x_, g_, b_);
    if (rc == DS_OK)
        rc = ds_batchnorm_backward(op, dx_, dg_, dbeta_, dy_, x_, mean_, var_, g_, b_);
    ds_train_op_destroy(op);
    rc = staging_finish(&st, rc);
    Py_END_ALLOW_THREADS
    if (rc != DS_OK)
        ds_py_raise(rc);
    else
        result = Py_BuildValue("(OOOOOO)", y, mean, var, dx, dg, dbeta);
done:
    Py_XDECREF(x);
    Py_XDECREF(g);
    Py_XDECREF(b);
    Py_XDECREF(dy);
    Py_XDECREF(y);
    Py_XDECREF(dx);
    Py_XDECREF(mean);
    Py_XDECREF(var);
    Py_XDECREF(dg);
    Py_XDECREF(dbeta);
    return result;
}

static PyObject *py_maxpool_backward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"x", "dy", "kernel", "stride", "pad_before", "pad_after", NULL};
    PyObject *x_obj, *dy_obj;
    int kernel, stride, pad_before = 0, pad_after = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOii|ii", keywords, &x_obj, &dy_obj, &kernel, &stride,
                                     &pad_before, &pad_after))
        return NULL;
    PyArrayObject *x = NULL, *dy = NULL, *y = NULL, *dx = NULL;
    PyObject *result = NULL;
    if (!(x = ds_py_float32_array(x_obj, 4, "x")) || !(dy = ds_py_float32_array(dy_obj, 4, "dy")))
        goto done;
    npy_intp *xd = PyArray_DIMS(x);
    int oh, ow;
    ds_status rc = ds_maxpool_output_size((int)xd[1], (int)xd[2], kernel, stride, pad_before, pad_after, &oh, &ow);
    if (rc != DS_OK) {
        ds_py_raise(rc);
        goto done;
    }
    if (PyArray_DIM(dy, 0) != xd[0] || PyArray_DIM(dy, 1) != oh || PyArray_DIM(dy, 2) != ow ||
        PyArray_DIM(dy, 3) != xd[3]) {
        PyErr_SetString(PyExc_ValueError, "maxpool_backward: dy must have the output's shape");
        goto done;
    }
    if (!(y = ds_py_new_nhwc(xd[0], oh, ow, xd[3])) || !(dx = ds_py_new_nhwc(xd[0], xd[1], xd[2], xd[3])))
        goto done;
    ds_train_op *op = NULL;
    Py_BEGIN_ALLOW_THREADS
    staging st;
    staging_begin(&st);
    float *x_ = stage(&st, x, STAGE_IN), *dy_ = stage(&st, dy, STAGE_IN), *y_ = stage(&st, y, STAGE_OUT),
          *dx_ = stage(&st, dx, STAGE_OUT);
    rc = st.rc;
    if (rc == DS_OK)
        rc = ds_maxpool_train_create(&op, st.backend, (int)xd[0], (int)xd[3], (int)xd[1], (int)xd[2], oh, ow, kernel,
                                     stride, pad_before, pad_after);
    if (rc == DS_OK)
        rc = ds_maxpool_train_forward(op, y_, x_);
    if (rc == DS_OK)
        rc = ds_maxpool_backward(op, dx_, dy_);
    ds_train_op_destroy(op);
    rc = staging_finish(&st, rc);
    Py_END_ALLOW_THREADS
    if (rc != DS_OK)
        ds_py_raise(rc);
    else
        result = Py_BuildValue("(OO)", y, dx);
done:
    Py_XDECREF(x);
    Py_XDECREF(dy);
    Py_XDECREF(y);
    Py_XDECREF(dx);
    return result;
}

static PyObject *py_concat_backward(PyObject *self, PyObject *args)
{
    PyObject *dy_obj, *channels_obj;
    if (!PyArg_ParseTuple(args, "OO", &dy_obj, &channels_obj))
        return NULL;
    PyObject *seq = PySequence_Fast(channels_obj, "channels must be a sequence of ints");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    int channels[CONCAT_MAX_INPUTS], total = 0;
    PyArrayObject *dy = NULL, *parts[CONCAT_MAX_INPUTS] = {NULL};
    PyObject *result = NULL;
    if (n < 1 || n > CONCAT_MAX_INPUTS) {
        PyErr_Format(PyExc_ValueError, "concat_backward: 1..%d inputs", CONCAT_MAX_INPUTS);
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long c = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (c < 1 || c > INT32_MAX) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "concat_backward: channel counts must be >= 1");
            goto done;
        }
        channels[i] = (int)c;
        total += channels[i];
    }
    if (!(dy = ds_py_float32_array(dy_obj, 4, "dy")))
        goto done;
    npy_intp *d = PyArray_DIMS(dy);
    if (d[3] != total) {
        PyErr_SetString(PyExc_ValueError, "concat_backward: dy.shape[3] must be the sum of channels");
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (!(parts[i] = ds_py_new_nhwc(d[0], d[1], d[2], channels[i])))
            goto done;
    ds_status rc;
    Py_BEGIN_ALLOW_THREADS
    staging st;
    staging_begin(&st);
    float *dsrcs[CONCAT_MAX_INPUTS];
    for (Py_ssize_t i = 0; i < n; i++)
        dsrcs[i] = stage(&st, parts[i], STAGE_OUT);
    const float *ddst = stage(&st, dy, STAGE_IN);
    rc = staging_finish(&st, st.rc == DS_OK ? ds_concat_backward(st.backend, dsrcs, ddst, (size_t)(d[0] * d[1] * d[2]),
                                                                 (int)n, channels)
                                            : st.rc);
    Py_END_ALLOW_THREADS
    if (rc != DS_OK) {
        ds_py_raise(rc);
        goto done;
    }
    result = PyList_New(n);
    for (Py_ssize_t i = 0; result && i < n; i++) {
        Py_INCREF(parts[i]);
        PyList_SET_ITEM(result, i, (PyObject *)parts[i]);
    }
done:
    for (int i = 0; i < CONCAT_MAX_INPUTS; i++)
        Py_XDECREF(parts[i]);
    Py_XDECREF(dy);
    Py_DECREF(seq);
    return result;
}

/* Element-wise kernels on arrays of one shape: relu_backward(dy, y), add(a, b). */
static PyObject *binary_kernel(PyObject *args, int which)
{
    PyObject *a_obj, *b_obj;
    if (!PyArg_ParseTuple(args, "OO", &a_obj, &b_obj))
        return NULL;
    PyArrayObject *a = (PyArrayObject *)PyArray_FROM_OTF(a_obj, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY);
    PyArrayObject *b = a ? (PyArrayObject *)PyArray_FROM_OTF(b_obj, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY) : NULL;
    PyArrayObject *out = NULL;
    if (b && !PyArray_SAMESHAPE(a, b))
        PyErr_SetString(PyExc_ValueError, "the two arrays must have the same shape");
    else if (b && (out = (PyArrayObject *)PyArray_ZEROS(PyArray_NDIM(a), PyArray_DIMS(a), NPY_FLOAT32, 0))) {
        size_t n = (size_t)PyArray_SIZE(a);
        ds_status rc;
        Py_BEGIN_ALLOW_THREADS
        staging st;
        staging_begin(&st);
        const float *a_ = stage(&st, a, STAGE_IN), *b_ = stage(&st, b, STAGE_IN);
        float *out_ = stage(&st, out, STAGE_OUT);
        rc = st.rc;
        if (rc == DS_OK)
            rc = which == 0 ? ds_relu_backward(st.backend, out_, a_, b_, n, 0)
                            : ds_add_forward(st.backend, out_, a_, b_, n);
        rc = staging_finish(&st, rc);
        Py_END_ALLOW_THREADS
        if (rc != DS_OK) {
            Py_CLEAR(out);
            ds_py_raise(rc);
        }
    }
    Py_XDECREF(a);
    Py_XDECREF(b);
    return (PyObject *)out;
}

static PyObject *py_relu_backward(PyObject *self, PyObject *args) { return binary_kernel(args, 0); }
static PyObject *py_add(PyObject *self, PyObject *args) { return binary_kernel(args, 1); }

static PyObject *py_spatial_dropout(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"x", "rate", "seed", "stream", NULL};
    PyObject *x_obj;
    float rate;
    unsigned long long seed = 0, stream = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Of|KK", keywords, &x_obj, &rate, &seed, &stream))
        return NULL;
    if (!(rate >= 0.0f && rate < 1.0f))
        return PyErr_Format(PyExc_ValueError, "rate must be in [0, 1)");
    PyArrayObject *x = ds_py_float32_array(x_obj, 4, "x");
    if (!x)
        return NULL;
    npy_intp *d = PyArray_DIMS(x), md[2] = {d[0], d[3]};
    PyArrayObject *y = ds_py_new_nhwc(d[0], d[1], d[2], d[3]);
    PyArrayObject *mask = y ? (PyArrayObject *)PyArray_ZEROS(2, md, NPY_FLOAT32, 0) : NULL;
    PyObject *result = NULL;
    if (mask) {
        ds_status rc;
        Py_BEGIN_ALLOW_THREADS
        staging st;
        staging_begin(&st);
        float *x_ = stage(&st, x, STAGE_IN), *y_ = stage(&st, y, STAGE_OUT), *mask_ = stage(&st, mask, STAGE_OUT);
        rc = st.rc;
        if (rc == DS_OK)
            rc = ds_dropout_mask(st.backend, mask_, (int)d[0], (int)d[3], rate, seed, stream);
        if (rc == DS_OK)
            rc = ds_spatial_dropout_forward(st.backend, y_, x_, mask_, (int)d[0], (size_t)(d[1] * d[2]), (int)d[3]);
        rc = staging_finish(&st, rc);
        Py_END_ALLOW_THREADS
        result = rc == DS_OK ? Py_BuildValue("(OO)", y, mask) : ds_py_raise(rc);
    }
    Py_DECREF(x);
    Py_XDECREF(y);
    Py_XDECREF(mask);
    return result;
}

static PyObject *py_deepspot_loss(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"logits", "target", "bce", "max_term", NULL};
    PyObject *z_obj, *t_obj;
    const char *bce = "logits", *max_term = "batch";
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|ss", keywords, &z_obj, &t_obj, &bce, &max_term))
        return NULL;
    int bce_mode, max_mode;
    if (ds_py_parse_mode(bce, "bce", ds_py_bce_names, 2, &bce_mode) < 0 ||
        ds_py_parse_mode(max_term, "max_term", ds_py_max_names, 3, &max_mode) < 0)
        return NULL;
    PyArrayObject *z, *t;
    if (ds_py_batch_arguments(z_obj, t_obj, &z, &t, 0) < 0)
        return NULL;
    npy_intp *d = PyArray_DIMS(z);
    PyArrayObject *pred = (PyArrayObject *)PyArray_ZEROS(3, d, NPY_FLOAT32, 0);
    PyArrayObject *dz = pred ? (PyArrayObject *)PyArray_ZEROS(3, d, NPY_FLOAT32, 0) : NULL;
    npy_intp terms_dims[1] = {DS_LOSS_TERMS};
    PyArrayObject *terms = dz ? (PyArrayObject *)PyArray_ZEROS(1, terms_dims, NPY_FLOAT64, 0) : NULL;
    PyObject *result = NULL;
    if (terms) {
        ds_status rc;
        Py_BEGIN_ALLOW_THREADS
        staging st;
        staging_begin(&st);
        const float *z_ = stage(&st, z, STAGE_IN), *t_ = stage(&st, t, STAGE_IN);
        float *pred_ = stage(&st, pred, STAGE_OUT), *dz_ = stage(&st, dz, STAGE_OUT);
        double *terms_ = stage(&st, terms, STAGE_OUT);
        rc = staging_finish(&st, st.rc == DS_OK ? ds_deepspot_loss(st.backend, terms_, pred_, dz_, z_, t_, (int)d[0],
                                                                   (size_t)(d[1] * d[2]), bce_mode, max_mode)
                                                : st.rc);
        Py_END_ALLOW_THREADS
        const double *v = PyArray_DATA(terms);
        result = rc == DS_OK ? Py_BuildValue("(dddOO)", v[0], v[1], v[2], pred, dz) : ds_py_raise(rc);
        Py_DECREF(terms);
    }
    Py_DECREF(z);
    Py_DECREF(t);
    Py_XDECREF(pred);
    Py_XDECREF(dz);
    return result;
}

static PyObject *py_adam_update(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"param", "m", "v", "grad", "step", "learning_rate", "beta1", "beta2", "epsilon", NULL};
    PyObject *objs[4];
    long step;
    float lr = 1e-4f, epsilon = 1e-7f;
    double beta1 = 0.9, beta2 = 0.999;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOl|fddf", keywords, &objs[0], &objs[1], &objs[2], &objs[3],
                                     &step, &lr, &beta1, &beta2, &epsilon))
        return NULL;
    if (step < 1)
        return PyErr_Format(PyExc_ValueError, "step must be >= 1");
    PyArrayObject *a[4] = {NULL};
    PyObject *result = NULL;
    for (int i = 0; i < 4; i++) {
        PyArrayObject *in = (PyArrayObject *)PyArray_FROM_OTF(objs[i], NPY_FLOAT32, NPY_ARRAY_IN_ARRAY);
        if (!in)
            goto done;
        a[i] = (PyArrayObject *)PyArray_NewCopy(in, NPY_CORDER);
        Py_DECREF(in);
        if (!a[i])
            goto done;
        if (i && PyArray_SIZE(a[i]) != PyArray_SIZE(a[0])) {
            PyErr_SetString(PyExc_ValueError, "adam_update: param, m, v and grad must have the same size");
            goto done;
        }
    }
    ds_status rc;
    Py_BEGIN_ALLOW_THREADS
    staging st;
    staging_begin(&st);
    float *param = stage(&st, a[0], STAGE_INOUT), *m = stage(&st, a[1], STAGE_INOUT),
          *v = stage(&st, a[2], STAGE_INOUT), *grad = stage(&st, a[3], STAGE_IN);
    rc = staging_finish(&st, st.rc == DS_OK ? ds_adam_update(st.backend, param, m, v, grad, (size_t)PyArray_SIZE(a[0]),
                                                             lr, beta1, beta2, epsilon, step, NULL)
                                            : st.rc);
    Py_END_ALLOW_THREADS
    result = rc == DS_OK ? Py_BuildValue("(OOO)", a[0], a[1], a[2]) : ds_py_raise(rc);
done:
    for (int i = 0; i < 4; i++)
        Py_XDECREF(a[i]);
    return result;
}

PyMethodDef ds_py_single_op_methods[] = {
    {"conv2d", (PyCFunction)(void (*)(void))py_conv2d, METH_VARARGS | METH_KEYWORDS,
     "conv2d(x, weight, bias, stride=1, dilation=1, pad_before=0, pad_after=0, transposed=False, relu=False, "
     "sigmoid=False, accumulate=None): one (transposed) convolution on NHWC float32 x, weight [out, in, k, k]."},
    {"batchnorm_relu", py_batchnorm_relu, METH_VARARGS,
     "batchnorm_relu(x, gamma, beta, mean, variance, epsilon): inference batch norm then ReLU on NHWC x."},
    {"maxpool", (PyCFunction)(void (*)(void))py_maxpool, METH_VARARGS | METH_KEYWORDS,
     "maxpool(x, kernel, stride, pad_before=0, pad_after=0): max pooling on NHWC x."},
    {"concat", py_concat, METH_O, "concat([x1, x2, ...]): channel concatenation of NHWC arrays."},
    {"conv2d_backward", (PyCFunction)(void (*)(void))py_conv2d_backward, METH_VARARGS | METH_KEYWORDS,
     "conv2d_backward(x, weight, bias, dy, stride=1, dilation=1, pad_before=0, pad_after=0, transposed=False, "
     "need_dx=True) -> (y, dx or None, dweight, dbias): the training forward and backward of one (transposed) conv."},
    {"batchnorm_train", (PyCFunction)(void (*)(void))py_batchnorm_train, METH_VARARGS | METH_KEYWORDS,
     "batchnorm_train(x, gamma, beta, dy, epsilon=1e-3, relu=False) -> (y, mean, variance, dx, dgamma, dbeta): "
     "batch norm on batch statistics (+ fused ReLU) and its backward."},
    {"maxpool_backward", (PyCFunction)(void (*)(void))py_maxpool_backward, METH_VARARGS | METH_KEYWORDS,
     "maxpool_backward(x, dy, kernel, stride, pad_before=0, pad_after=0) -> (y, dx)."},
    {"concat_backward", py_concat_backward, METH_VARARGS,
     "concat_backward(dy, channels) -> [dx1, dx2, ...]: the gradient of a channel concatenation split."},
    {"relu_backward", py_relu_backward, METH_VARARGS, "relu_backward(dy, y) -> dx = dy where y > 0."},
    {"add", py_add, METH_VARARGS, "add(a, b) -> a + b (float32)."},
    {"spatial_dropout", (PyCFunction)(void (*)(void))py_spatial_dropout, METH_VARARGS | METH_KEYWORDS,
     "spatial_dropout(x, rate, seed=0, stream=0) -> (y, mask [batch, channels]): Keras SpatialDropout2D in training."},
    {"deepspot_loss", (PyCFunction)(void (*)(void))py_deepspot_loss, METH_VARARGS | METH_KEYWORDS,
     "deepspot_loss(logits, target, bce='logits', max_term='batch') -> (loss, bce, max_term, pred, dlogits) on "
     "[batch, h, w] float32 arrays."},
    {"adam_update", (PyCFunction)(void (*)(void))py_adam_update, METH_VARARGS | METH_KEYWORDS,
     "adam_update(param, m, v, grad, step, learning_rate=1e-4, beta1=0.9, beta2=0.999, epsilon=1e-7) -> "
     "(param, m, v): one Keras Adam update (copies)."},
    {NULL},
};
