/* pymodule.c - CPython glue for the C core: argument checking, NumPy array conversion, copies
 * between NumPy arrays and backend memory, releasing the GIL around compute, and turning ds_status
 * codes into Python exceptions. No numerics live here. Compiled once per backend, with the same
 * Python API: DS_MODULE _core with DS_BACKEND_NAME "cpu" (oneDNN), _core_cuda with "cuda" (cuDNN). */
#ifndef DS_MODULE
#define DS_MODULE _core
#define DS_BACKEND_NAME "cpu"
#endif
#define DS_STRINGIFY_(x) #x
#define DS_STRINGIFY(x) DS_STRINGIFY_(x)
#define DS_PASTE_(a, b) a##b
#define DS_PASTE(a, b) DS_PASTE_(a, b)
#define DS_MODULE_NAME DS_STRINGIFY(DS_MODULE)
#define DS_QUALIFIED(type) "deepspot_napari." DS_MODULE_NAME "." type

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include "model.h"
#include "detect.h"
#include "ops.h"
#include "train.h"

static PyObject *raise_status(ds_status rc)
{
    PyObject *type = PyExc_RuntimeError;
    switch (rc) {
    case DS_ERR_IO: type = PyExc_OSError; break;
    case DS_ERR_FORMAT:
    case DS_ERR_VALUE: type = PyExc_ValueError; break;
    case DS_ERR_NOMEM: type = PyExc_MemoryError; break;
    case DS_ERR_CANCELLED: type = PyExc_KeyboardInterrupt; break;
    default: break;
    }
    PyErr_SetString(type, ds_last_error());
    return NULL;
}

/* A C-contiguous float32 array of the given ndim, or NULL with a TypeError/ValueError set. */
static PyArrayObject *as_float32_array(PyObject *obj, int ndim, const char *what)
{
    if (!PyArray_Check(obj) || PyArray_TYPE((PyArrayObject *)obj) != NPY_FLOAT32 ||
        PyArray_NDIM((PyArrayObject *)obj) != ndim) {
        PyErr_Format(PyExc_TypeError, "%s must be a float32 numpy array with %d dimensions", what, ndim);
        return NULL;
    }
    return (PyArrayObject *)PyArray_FROM_OTF(obj, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY);
}

static PyArrayObject *new_nhwc(npy_intp n, npy_intp h, npy_intp w, npy_intp c)
{
    npy_intp dims[4] = {n, h, w, c};
    return (PyArrayObject *)PyArray_ZEROS(4, dims, NPY_FLOAT32, 0);
}

/* ---------------------------------------------------------------- Network */

typedef struct {
    PyObject_HEAD
    ds_model *model;
} NetworkObject;

static const char *const math_names[] = {"float32", "tf32"};

static int parse_mode(const char *value, const char *what, const char *const *names, int count, int *mode);

static int Network_init(NetworkObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"weights_path", "math", NULL};
    PyObject *path_obj;
    const char *math = "float32";
    int math_mode;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&|$s", keywords, PyUnicode_FSConverter, &path_obj, &math))
        return -1;
    if (parse_mode(math, "math", math_names, 2, &math_mode) < 0) {
        Py_DECREF(path_obj);
        return -1;
    }
    ds_model *model = NULL;
    ds_status rc;
    Py_BEGIN_ALLOW_THREADS
    rc = model_load(&model, PyBytes_AS_STRING(path_obj), math_mode);
    Py_END_ALLOW_THREADS
    Py_DECREF(path_obj);
    if (rc != DS_OK) {
        raise_status(rc);
        return -1;
    }
    model_free(self->model);
    self->model = model;
    return 0;
}

static void Network_dealloc(NetworkObject *self)
{
    model_free(self->model);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Network_forward(NetworkObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"x", "first_stage", "last_stage", NULL};
    PyObject *x_obj;
    int first = STAGE_ENCODER, last = STAGE_DECODER;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|ii", keywords, &x_obj, &first, &last))
        return NULL;
    if (!self->model)
        return PyErr_Format(PyExc_RuntimeError, "network is not loaded");
    PyArrayObject *input = as_float32_array(x_obj, 4, "x");
    if (!input)
        return NULL;
    npy_intp *dims = PyArray_DIMS(input);
    int in_c, out_c, out_h, out_w;
    ds_status rc = DS_OK;
    if (dims[0] > INT32_MAX || dims[1] > INT32_MAX / 8 || dims[2] > INT32_MAX / 8)
        rc = ds_fail(DS_ERR_VALUE, "input is too large");
    if (rc == DS_OK)
        rc = model_stage_shapes(first, last, (int)dims[1], (int)dims[2], &in_c, &out_c, &out_h, &out_w);
    if (rc == DS_OK && dims[3] != in_c)
        rc = ds_fail(DS_ERR_VALUE, "input has %ld channels; stage %d expects %d", (long)dims[3], first, in_c);
    if (rc != DS_OK) {
        Py_DECREF(input);
        return raise_status(rc);
    }
    PyArrayObject *output = new_nhwc(dims[0], out_h, out_w, out_c);
    if (!output) {
        Py_DECREF(input);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = model_forward_stages(self->model, first, last, (int)dims[0], (int)dims[1], (int)dims[2],
                              PyArray_DATA(input), PyArray_DATA(output));
    Py_END_ALLOW_THREADS
    Py_DECREF(input);
    if (rc != DS_OK) {
        Py_DECREF(output);
        return raise_status(rc);
    }
    return (PyObject *)output;
}

static PyObject *Network_num_parameters(NetworkObject *self, void *closure)
{
    if (!self->model)
        return PyErr_Format(PyExc_RuntimeError, "network is not loaded");
    return PyLong_FromSize_t(model_num_parameters(self->model));
}

static PyObject *Network_math(NetworkObject *self, void *closure)
{
    if (!self->model)
        return PyErr_Format(PyExc_RuntimeError, "network is not loaded");
    return PyUnicode_FromString(math_names[model_math_mode(self->model)]);
}

static PyMethodDef Network_methods[] = {
    {"forward", (PyCFunction)(void (*)(void))Network_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(x, first_stage=0, last_stage=2) -> y: NHWC float32 arrays. Stages: 0 encoder (1 channel scaled "
     "to [0, 1], sides multiples of 8 -> 384 channels at 1/8), 1 trunk (384 -> 128), 2 decoder (128 -> the "
     "sigmoid map at 8x)."},
    {NULL},
};

static PyGetSetDef Network_getset[] = {
    {"num_parameters", (getter)Network_num_parameters, NULL, "number of float32 values in the weights", NULL},
    {"math", (getter)Network_math, NULL, "'float32', or 'tf32' (TF32 tensor-core convolutions, GPU only)", NULL},
    {NULL},
};

static PyTypeObject NetworkType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = DS_QUALIFIED("Network"),
    .tp_doc = "Network(weights_path, *, math='float32'): the DeepSpot network loaded from a safetensors file, on "
              "this module's backend (" DS_BACKEND_NAME "). math='tf32' (GPU only) lets convolutions round their "
              "inputs to TF32 on tensor cores.",
    .tp_basicsize = sizeof(NetworkObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Network_init,
    .tp_dealloc = (destructor)Network_dealloc,
    .tp_methods = Network_methods,
    .tp_getset = Network_getset,
};


/* ---------------------------------------------------------------- single ops
 * Each op of ops.h on its own, built for the given shape, run once and destroyed: used by the
 * tests (against float64 NumPy references) and to compare backends with each other. */

static ds_backend *shared_backend;
static PyThread_type_lock single_op_lock; /* one single op at a time on the shared backend */

static ds_status get_backend(ds_backend **backend)
{
    if (!shared_backend)
        DS_TRY(backend_create(&shared_backend, DS_MATH_FLOAT32));
    *backend = shared_backend;
    return DS_OK;
}

/* The arrays of one single-op call staged in backend memory: inputs uploaded, outputs downloaded
 * at the end. Runs without the GIL (the arrays are owned by the caller for the whole call), holding
 * single_op_lock from staging_begin to staging_finish. */
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
    s->rc = get_backend(&s->backend);
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
    s->rc = backend_alloc(s->backend, &memory, bytes);
    if (s->rc == DS_OK && (mode & STAGE_IN))
        s->rc = backend_upload(s->backend, memory, PyArray_DATA(a), bytes);
    if (memory) {
        s->arrays[s->count] = a;
        s->memory[s->count] = memory;
        s->mode[s->count++] = mode;
    }
    return s->rc == DS_OK ? memory : NULL;
}

/* Downloads the outputs if everything so far succeeded (rc: the op's status), frees the staging; returns the
 * first failure. */
static ds_status staging_finish(staging *s, ds_status rc)
{
    if (s->rc == DS_OK)
        s->rc = rc;
    for (int i = 0; i < s->count; i++) {
        if (s->rc == DS_OK && (s->mode[i] & STAGE_OUT))
            s->rc = backend_download(s->backend, PyArray_DATA(s->arrays[i]), s->memory[i],
                                     (size_t)PyArray_NBYTES(s->arrays[i]));
        backend_free(s->backend, s->memory[i]);
    }
    PyThread_release_lock(single_op_lock);
    return s->rc;
}

/* Runs a built op on (src -> dst), releasing the GIL; consumes op. dst is also read (accumulation). */
typedef ds_status (*unary_forward)(ds_op *, const float *, float *);

static PyObject *run_unary(ds_status rc, ds_op *op, unary_forward forward, PyArrayObject *src, PyArrayObject *dst)
{
    if (rc == DS_OK) {
        Py_BEGIN_ALLOW_THREADS
        staging st;
        staging_begin(&st);
        const float *src_memory = stage(&st, src, STAGE_IN);
        float *dst_memory = stage(&st, dst, STAGE_INOUT);
        rc = staging_finish(&st, st.rc == DS_OK ? forward(op, src_memory, dst_memory) : st.rc);
        op_destroy(op);
        Py_END_ALLOW_THREADS
    }
    Py_DECREF(src);
    if (rc != DS_OK) {
        Py_DECREF(dst);
        return raise_status(rc);
    }
    return (PyObject *)dst;
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
    PyArrayObject *x = as_float32_array(x_obj, 4, "x"), *w = NULL, *b = NULL, *y = NULL;
    if (!x || !(w = as_float32_array(w_obj, 4, "weight")) || !(b = as_float32_array(b_obj, 1, "bias")))
        goto fail;
    npy_intp *xd = PyArray_DIMS(x), *wd = PyArray_DIMS(w);
    if (wd[1] != xd[3] || wd[2] != wd[3] || PyArray_DIM(b, 0) != wd[0]) {
        PyErr_SetString(PyExc_ValueError, "conv2d: weight must be [out, in, k, k] with in = x.shape[3], bias [out]");
        goto fail;
    }
    conv_desc d = {.transposed = transposed, .batch = (int)xd[0], .in_channels = (int)xd[3],
                   .in_height = (int)xd[1], .in_width = (int)xd[2], .out_channels = (int)wd[0],
                   .kernel = (int)wd[2], .stride = stride, .dilation = dilation, .pad_before = pad_before,
                   .pad_after = pad_after,
                   .post = (acc_obj != Py_None ? POST_SUM : 0) | (relu ? POST_RELU : 0) | (sigmoid ? POST_SIGMOID : 0)};
    int span = (d.kernel - 1) * dilation + 1;
    if (stride < 1 || dilation < 1) {
        PyErr_SetString(PyExc_ValueError, "conv2d: stride and dilation must be >= 1");
        goto fail;
    }
    d.out_height = transposed ? (d.in_height - 1) * stride + span - pad_before - pad_after
                              : (d.in_height + pad_before + pad_after - span) / stride + 1;
    d.out_width = transposed ? (d.in_width - 1) * stride + span - pad_before - pad_after
                             : (d.in_width + pad_before + pad_after - span) / stride + 1;
    if (d.out_height < 1 || d.out_width < 1) {
        PyErr_SetString(PyExc_ValueError, "conv2d: empty output");
        goto fail;
    }
    if (acc_obj != Py_None) {
        PyArrayObject *acc = as_float32_array(acc_obj, 4, "accumulate");
        if (!acc)
            goto fail;
        y = (PyArrayObject *)PyArray_NewCopy(acc, NPY_CORDER);
        Py_DECREF(acc);
        if (y && (PyArray_DIM(y, 0) != d.batch || PyArray_DIM(y, 1) != d.out_height ||
                  PyArray_DIM(y, 2) != d.out_width || PyArray_DIM(y, 3) != d.out_channels)) {
            PyErr_SetString(PyExc_ValueError, "conv2d: accumulate must have the output's shape");
            goto fail;
        }
    } else {
        y = new_nhwc(d.batch, d.out_height, d.out_width, d.out_channels);
    }
    if (!y)
        goto fail;
    ds_backend *backend;
    ds_op *op = NULL;
    ds_status rc = get_backend(&backend);
    if (rc == DS_OK)
        rc = conv_forward_create(&op, backend, &d, PyArray_DATA(w), PyArray_DATA(b));
    Py_DECREF(w);
    Py_DECREF(b);
    return run_unary(rc, op, conv_forward, x, y);
fail:
    Py_XDECREF(x);
    Py_XDECREF(w);
    Py_XDECREF(b);
    Py_XDECREF(y);
    return NULL;
}

static PyObject *py_batchnorm_relu(PyObject *self, PyObject *args)
{
    PyObject *objs[5];
    float epsilon;
    if (!PyArg_ParseTuple(args, "OOOOOf", &objs[0], &objs[1], &objs[2], &objs[3], &objs[4], &epsilon))
        return NULL;
    static const char *names[5] = {"x", "gamma", "beta", "mean", "variance"};
    PyArrayObject *a[5] = {NULL};
    for (int i = 0; i < 5; i++)
        if (!(a[i] = as_float32_array(objs[i], i ? 1 : 4, names[i])))
            goto fail;
    npy_intp *xd = PyArray_DIMS(a[0]);
    for (int i = 1; i < 5; i++)
        if (PyArray_DIM(a[i], 0) != xd[3]) {
            PyErr_SetString(PyExc_ValueError, "batchnorm_relu: statistics must have x.shape[3] entries");
            goto fail;
        }
    PyArrayObject *y = new_nhwc(xd[0], xd[1], xd[2], xd[3]);
    if (!y)
        goto fail;
    ds_backend *backend;
    ds_op *op = NULL;
    ds_status rc = get_backend(&backend);
    if (rc == DS_OK)
        rc = batchnorm_relu_forward_create(&op, backend, (int)xd[0], (int)xd[3], (int)xd[1], (int)xd[2],
                                           PyArray_DATA(a[1]), PyArray_DATA(a[2]), PyArray_DATA(a[3]),
                                           PyArray_DATA(a[4]), epsilon);
    for (int i = 1; i < 5; i++)
        Py_DECREF(a[i]);
    return run_unary(rc, op, batchnorm_relu_forward, a[0], y);
fail:
    for (int i = 0; i < 5; i++)
        Py_XDECREF(a[i]);
    return NULL;
}

static PyObject *py_maxpool(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"x", "kernel", "stride", "pad_before", "pad_after", NULL};
    PyObject *x_obj;
    int kernel, stride, pad_before = 0, pad_after = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Oii|ii", keywords, &x_obj, &kernel, &stride, &pad_before,
                                     &pad_after))
        return NULL;
    if (kernel < 1 || stride < 1 || pad_before < 0 || pad_after < 0 || pad_before >= kernel || pad_after >= kernel)
        return PyErr_Format(PyExc_ValueError, "maxpool: kernel, stride >= 1 and 0 <= padding < kernel expected");
    PyArrayObject *x = as_float32_array(x_obj, 4, "x");
    if (!x)
        return NULL;
    npy_intp *xd = PyArray_DIMS(x);
    int oh = ((int)xd[1] + pad_before + pad_after - kernel) / stride + 1;
    int ow = ((int)xd[2] + pad_before + pad_after - kernel) / stride + 1;
    if (oh < 1 || ow < 1) {
        Py_DECREF(x);
        return PyErr_Format(PyExc_ValueError, "maxpool: empty output");
    }
    PyArrayObject *y = new_nhwc(xd[0], oh, ow, xd[3]);
    if (!y) {
        Py_DECREF(x);
        return NULL;
    }
    ds_backend *backend;
    ds_op *op = NULL;
    ds_status rc = get_backend(&backend);
    if (rc == DS_OK)
        rc = maxpool_forward_create(&op, backend, (int)xd[0], (int)xd[3], (int)xd[1], (int)xd[2], oh, ow, kernel,
                                    stride, pad_before, pad_after);
    return run_unary(rc, op, maxpool_forward, x, y);
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
        if (!(xs[i] = as_float32_array(PySequence_Fast_GET_ITEM(seq, i), 4, "each concat input")))
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
    if (!(y = new_nhwc(d0[0], d0[1], d0[2], total)))
        goto done;
    ds_backend *backend;
    ds_op *op = NULL;
    ds_status rc = get_backend(&backend);
    if (rc == DS_OK)
        rc = concat_forward_create(&op, backend, (int)d0[0], (int)d0[1], (int)d0[2], (int)n, channels);
    if (rc == DS_OK) {
        Py_BEGIN_ALLOW_THREADS
        staging st;
        staging_begin(&st);
        const float *srcs[CONCAT_MAX_INPUTS];
        for (Py_ssize_t i = 0; i < n; i++)
            srcs[i] = stage(&st, xs[i], STAGE_IN);
        float *dst = stage(&st, y, STAGE_OUT);
        rc = staging_finish(&st, st.rc == DS_OK ? concat_forward(op, srcs, dst) : st.rc);
        op_destroy(op);
        Py_END_ALLOW_THREADS
    }
    if (rc != DS_OK) {
        Py_CLEAR(y);
        raise_status(rc);
    }
done:
    for (int i = 0; i < CONCAT_MAX_INPUTS; i++)
        Py_XDECREF(xs[i]);
    Py_DECREF(seq);
    return (PyObject *)y;
}

/* ---------------------------------------------------------------- detection (csrc/detect.c) */

/* A spot list as a float32 array [count, DS_SPOT_FIELDS]: z, y, x, score, intensity, size. */
static PyObject *spots_to_array(const ds_spot_list *spots)
{
    npy_intp dims[2] = {(npy_intp)spots->count, DS_SPOT_FIELDS};
    PyArrayObject *array = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    if (array && spots->count)
        memcpy(PyArray_DATA(array), spots->items, spots->count * sizeof(ds_spot));
    return (PyObject *)array;
}

/* The detection image and the optional raw image (None gives NULL) of the same shape; 0 on success. */
static int plane_arguments(PyObject *image_obj, PyObject *raw_obj, PyArrayObject **image, PyArrayObject **raw)
{
    *raw = NULL;
    *image = as_float32_array(image_obj, 2, "image");
    if (!*image)
        return -1;
    if (PyArray_DIM(*image, 0) > INT32_MAX || PyArray_DIM(*image, 1) > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "image is too large");
        goto fail;
    }
    if (raw_obj == Py_None)
        return 0;
    *raw = as_float32_array(raw_obj, 2, "raw");
    if (!*raw)
        goto fail;
    if (!PyArray_SAMESHAPE(*image, *raw)) {
        PyErr_Format(PyExc_ValueError, "raw must have the shape of image");
        goto fail;
    }
    return 0;
fail:
    Py_CLEAR(*raw);
    Py_CLEAR(*image);
    return -1;
}

static int parse_refine(const char *subpixel, int window_radius, refine_params *refine)
{
    refine->window_radius = window_radius;
    ds_status rc = subpixel_mode_from_name(subpixel, &refine->mode);
    if (rc != DS_OK) {
        raise_status(rc);
        return -1;
    }
    return 0;
}

/* scales (ints) and sensitivities (numbers), two sequences of the same length; 0 on success. */
static int parse_scales(PyObject *scales_obj, PyObject *sensitivities_obj, wavelet_params *params)
{
    PyObject *scales = PySequence_Fast(scales_obj, "scales must be a sequence of ints");
    if (!scales)
        return -1;
    PyObject *sensitivities = PySequence_Fast(sensitivities_obj, "sensitivities must be a sequence of numbers");
    if (!sensitivities) {
        Py_DECREF(scales);
        return -1;
    }
    int ok = 0;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(scales);
    if (count != PySequence_Fast_GET_SIZE(sensitivities))
        PyErr_Format(PyExc_ValueError, "scales and sensitivities must have the same length");
    else if (count < 1 || count > DS_WAVELET_MAX_SCALE)
        PyErr_Format(PyExc_ValueError, "between 1 and %d wavelet scales must be given, got %zd", DS_WAVELET_MAX_SCALE,
                     count);
    else {
        ok = 1;
        params->num_scales = (int)count;
        for (Py_ssize_t i = 0; i < count && ok; i++) {
            long scale = PyLong_AsLong(PySequence_Fast_GET_ITEM(scales, i));
            double sensitivity = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(sensitivities, i));
            ok = !PyErr_Occurred();
            params->scales[i] = scale < INT32_MIN || scale > INT32_MAX ? INT32_MIN : (int)scale;
            params->sensitivities[i] = (float)sensitivity;
        }
    }
    Py_DECREF(scales);
    Py_DECREF(sensitivities);
    return ok ? 0 : -1;
}

/* Runs a 2D detector with the GIL released and returns its spots as an array. */
typedef ds_status (*plane_detector)(int height, int width, const float *image, const float *raw,
                                    const void *params, ds_spot_list *spots);

static ds_status run_wavelet(int height, int width, const float *image, const float *raw, const void *params,
                             ds_spot_list *spots)
{
    return detect_wavelet(height, width, image, raw, params, spots);
}

static ds_status run_peaks(int height, int width, const float *image, const float *raw, const void *params,
                           ds_spot_list *spots)
{
    return detect_peaks(height, width, image, raw, params, spots);
}

static PyObject *detect_on_plane(plane_detector detector, const void *params, PyArrayObject *image,
                                 PyArrayObject *raw)
{
    ds_spot_list spots = {0};
    ds_status rc;
    Py_BEGIN_ALLOW_THREADS
    rc = detector((int)PyArray_DIM(image, 0), (int)PyArray_DIM(image, 1), PyArray_DATA(image),
                  raw ? PyArray_DATA(raw) : NULL, params, &spots);
    Py_END_ALLOW_THREADS
    Py_DECREF(image);
    Py_XDECREF(raw);
    PyObject *result = rc == DS_OK ? spots_to_array(&spots) : raise_status(rc);
    spot_list_free(&spots);
    return result;
}

static PyObject *py_detect_wavelet(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"image", "raw", "scales", "sensitivities", "subpixel", "window_radius", NULL};
    PyObject *image_obj, *raw_obj, *scales_obj, *sensitivities_obj;
    const char *subpixel = "none";
    int window_radius = 3;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO|si", keywords, &image_obj, &raw_obj, &scales_obj,
                                     &sensitivities_obj, &subpixel, &window_radius))
        return NULL;
    wavelet_params params = {0};
    PyArrayObject *image, *raw;
    if (parse_scales(scales_obj, sensitivities_obj, &params) < 0 ||
        parse_refine(subpixel, window_radius, &params.refine) < 0 ||
        plane_arguments(image_obj, raw_obj, &image, &raw) < 0)
        return NULL;
    return detect_on_plane(run_wavelet, &params, image, raw);
}

static PyObject *py_detect_peaks(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"image",    "raw",           "threshold", "footprint_radius", "min_distance",
                               "subpixel", "window_radius", NULL};
    PyObject *image_obj, *raw_obj;
    peak_params params = {0};
    const char *subpixel = "none";
    int window_radius = 3;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOfif|si", keywords, &image_obj, &raw_obj, &params.threshold,
                                     &params.footprint_radius, &params.min_distance, &subpixel, &window_radius))
        return NULL;
    PyArrayObject *image, *raw;
    if (parse_refine(subpixel, window_radius, &params.refine) < 0 ||
        plane_arguments(image_obj, raw_obj, &image, &raw) < 0)
        return NULL;
    return detect_on_plane(run_peaks, &params, image, raw);
}

static PyObject *py_wavelet_transform(PyObject *self, PyObject *args)
{
    PyObject *image_obj;
    int num_scales;
    if (!PyArg_ParseTuple(args, "Oi", &image_obj, &num_scales))
        return NULL;
    PyArrayObject *image, *unused_raw;
    if (plane_arguments(image_obj, Py_None, &image, &unused_raw) < 0)
        return NULL;
    if (num_scales < 1 || num_scales > DS_WAVELET_MAX_SCALE) {
        Py_DECREF(image);
        return PyErr_Format(PyExc_ValueError, "num_scales must be in 1..%d, got %d", DS_WAVELET_MAX_SCALE,
                            num_scales);
    }
    npy_intp dims[3] = {num_scales, PyArray_DIM(image, 0), PyArray_DIM(image, 1)};
    PyArrayObject *details = (PyArrayObject *)PyArray_SimpleNew(3, dims, NPY_FLOAT32);
    if (!details) {
        Py_DECREF(image);
        return NULL;
    }
    ds_status rc;
    Py_BEGIN_ALLOW_THREADS
    rc = wavelet_transform((int)dims[1], (int)dims[2], PyArray_DATA(image), num_scales, PyArray_DATA(details));
    Py_END_ALLOW_THREADS
    Py_DECREF(image);
    if (rc != DS_OK) {
        Py_DECREF(details);
        return raise_status(rc);
    }
    return (PyObject *)details;
}

static PyObject *py_merge_plane_spots(PyObject *self, PyObject *args)
{
    PyObject *spots_obj;
    float radius;
    if (!PyArg_ParseTuple(args, "Of", &spots_obj, &radius))
        return NULL;
    PyArrayObject *input = as_float32_array(spots_obj, 2, "spots");
    if (!input)
        return NULL;
    if (PyArray_DIM(input, 1) != DS_SPOT_FIELDS) {
        Py_DECREF(input);
        return PyErr_Format(PyExc_ValueError, "spots must have %d columns (z, y, x, score, intensity, size)",
                            DS_SPOT_FIELDS);
    }
    ds_spot_list merged = {0};
    ds_status rc;
    Py_BEGIN_ALLOW_THREADS
    rc = merge_plane_spots(PyArray_DATA(input), (size_t)PyArray_DIM(input, 0), radius, &merged);
    Py_END_ALLOW_THREADS
    Py_DECREF(input);
    PyObject *result = rc == DS_OK ? spots_to_array(&merged) : raise_status(rc);
    spot_list_free(&merged);
    return result;
}

/* Training (csrc/train.c): the Trainer type, and each training op on its own for the tests. */
#include "train.h"

static int parse_mode(const char *value, const char *what, const char *const *names, int n, int *out)
{
    char choices[128] = "";
    for (int i = 0; i < n; i++) {
        if (strcmp(value, names[i]) == 0) {
            *out = i;
            return 0;
        }
        snprintf(choices + strlen(choices), sizeof choices - strlen(choices), "%s'%s'", i ? ", " : "", names[i]);
    }
    PyErr_Format(PyExc_ValueError, "%s must be one of %s, got '%s'", what, choices, value);
    return -1;
}

static const char *const bce_names[] = {"logits", "clipped"};
static const char *const max_names[] = {"batch", "per_image", "none"};
static const char *const batch_norm_names[] = {"batch", "frozen"}; /* index: ds_train_config.bn_frozen */

/* A [batch, height, width] float32 C-contiguous array (None allowed when optional). */
static PyArrayObject *as_bhw(PyObject *obj, const char *what)
{
    PyArrayObject *a = as_float32_array(obj, 3, what);
    if (a && (PyArray_DIM(a, 0) > INT32_MAX || PyArray_DIM(a, 1) > INT32_MAX || PyArray_DIM(a, 2) > INT32_MAX)) {
        Py_DECREF(a);
        PyErr_Format(PyExc_ValueError, "%s is too large", what);
        return NULL;
    }
    return a;
}

typedef struct {
    PyObject_HEAD
    ds_trainer *trainer;
    PyThread_type_lock lock;
} TrainerObject;

static int Trainer_init(TrainerObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"network", "learning_rate", "beta1", "beta2", "epsilon", "dropout", "bn_momentum",
                               "bn_bessel", "bce", "max_term", "seed", "batch_norm", NULL};
    PyObject *network;
    ds_train_config cfg;
    train_config_default(&cfg);
    const char *bce = "logits", *max_term = "batch", *batch_norm = "batch";
    int bessel = 0;
    unsigned long long seed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!|$fddffdpssKs", keywords, &NetworkType, &network,
                                     &cfg.learning_rate, &cfg.beta1, &cfg.beta2, &cfg.adam_epsilon, &cfg.dropout_rate,
                                     &cfg.bn_momentum, &bessel, &bce, &max_term, &seed, &batch_norm))
        return -1;
    if (parse_mode(bce, "bce", bce_names, 2, &cfg.bce_mode) < 0 ||
        parse_mode(max_term, "max_term", max_names, 3, &cfg.max_mode) < 0 ||
        parse_mode(batch_norm, "batch_norm", batch_norm_names, 2, &cfg.bn_frozen) < 0)
        return -1;
    cfg.bn_bessel = bessel;
    cfg.seed = seed;
    ds_model *model = ((NetworkObject *)network)->model;
    if (!model) {
        PyErr_SetString(PyExc_RuntimeError, "network is not loaded");
        return -1;
    }
    cfg.math_mode = model_math_mode(model);
    if (!self->lock && !(self->lock = PyThread_allocate_lock())) {
        PyErr_NoMemory();
        return -1;
    }
    ds_trainer *trainer = NULL;
    ds_status rc;
    Py_BEGIN_ALLOW_THREADS
    rc = trainer_create(&trainer, model_parameters(model), &cfg);
    Py_END_ALLOW_THREADS
    if (rc != DS_OK) {
        raise_status(rc);
        return -1;
    }
    trainer_free(self->trainer);
    self->trainer = trainer;
    return 0;
}

static void Trainer_dealloc(TrainerObject *self)
{
    trainer_free(self->trainer);
    if (self->lock)
        PyThread_free_lock(self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Takes the trainer for one call (0), or sets RuntimeError (-1): calls never run concurrently. */
static int trainer_acquire(TrainerObject *self)
{
    if (!self->trainer) {
        PyErr_SetString(PyExc_RuntimeError, "trainer is not initialised");
        return -1;
    }
    if (!PyThread_acquire_lock(self->lock, NOWAIT_LOCK)) {
        PyErr_SetString(PyExc_RuntimeError, "the trainer is busy in another thread");
        return -1;
    }
    return 0;
}

static PyObject *loss_tuple(const ds_loss_value *v) { return Py_BuildValue("(ddd)", v->loss, v->bce, v->max_term); }

/* Parses (images, targets) as two [batch, height, width] float32 arrays of the same shape. */
static int batch_arguments(PyObject *images_obj, PyObject *targets_obj, PyArrayObject **images,
                           PyArrayObject **targets, int targets_optional)
{
    *targets = NULL;
    if (!(*images = as_bhw(images_obj, "images")))
        return -1;
    if (targets_optional && targets_obj == Py_None)
        return 0;
    if (!(*targets = as_bhw(targets_obj, "targets")) || !PyArray_SAMESHAPE(*images, *targets)) {
        if (*targets)
            PyErr_SetString(PyExc_ValueError, "targets must have the shape of images");
        Py_CLEAR(*images);
        Py_CLEAR(*targets);
        return -1;
    }
    return 0;
}

typedef ds_status (*trainer_batch_fn)(ds_trainer *, int, int, int, const float *, const float *, ds_loss_value *);

static PyObject *trainer_run_batch(TrainerObject *self, PyObject *args, trainer_batch_fn fn)
{
    PyObject *images_obj, *targets_obj;
    if (!PyArg_ParseTuple(args, "OO", &images_obj, &targets_obj))
        return NULL;
    PyArrayObject *images, *targets;
    if (batch_arguments(images_obj, targets_obj, &images, &targets, 0) < 0)
        return NULL;
    if (trainer_acquire(self) < 0) {
        Py_DECREF(images);
        Py_DECREF(targets);
        return NULL;
    }
    ds_loss_value value = {0};
    ds_status rc;
    npy_intp *d = PyArray_DIMS(images);
    Py_BEGIN_ALLOW_THREADS
    rc = fn(self->trainer, (int)d[0], (int)d[1], (int)d[2], PyArray_DATA(images), PyArray_DATA(targets), &value);
    Py_END_ALLOW_THREADS
    PyThread_release_lock(self->lock);
    Py_DECREF(images);
    Py_DECREF(targets);
    return rc == DS_OK ? loss_tuple(&value) : raise_status(rc);
}

static PyObject *Trainer_step(TrainerObject *self, PyObject *args)
{
    return trainer_run_batch(self, args, trainer_step);
}

static PyObject *Trainer_gradients(TrainerObject *self, PyObject *args)
{
    return trainer_run_batch(self, args, trainer_compute_gradients);
}

static PyObject *Trainer_evaluate(TrainerObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"images", "targets", NULL};
    PyObject *images_obj, *targets_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|O", keywords, &images_obj, &targets_obj))
        return NULL;
    PyArrayObject *images, *targets;
    if (batch_arguments(images_obj, targets_obj, &images, &targets, 1) < 0)
        return NULL;
    npy_intp *d = PyArray_DIMS(images);
    PyArrayObject *pred = (PyArrayObject *)PyArray_ZEROS(3, d, NPY_FLOAT32, 0);
    if (!pred || trainer_acquire(self) < 0) {
        Py_XDECREF(pred);
        Py_DECREF(images);
        Py_XDECREF(targets);
        return NULL;
    }
    ds_loss_value value = {0};
    ds_status rc;
    Py_BEGIN_ALLOW_THREADS
    rc = trainer_evaluate(self->trainer, (int)d[0], (int)d[1], (int)d[2], PyArray_DATA(images),
                          targets ? PyArray_DATA(targets) : NULL, PyArray_DATA(pred), &value);
    Py_END_ALLOW_THREADS
    PyThread_release_lock(self->lock);
    Py_DECREF(images);
    Py_XDECREF(targets);
    if (rc != DS_OK) {
        Py_DECREF(pred);
        return raise_status(rc);
    }
    PyObject *loss = targets_obj == Py_None ? (Py_INCREF(Py_None), Py_None) : loss_tuple(&value);
    return Py_BuildValue("(NN)", (PyObject *)pred, loss);
}

static PyObject *Trainer_get(TrainerObject *self, PyObject *arg)
{
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name)
        return NULL;
    const ds_param_entry *e;
    if (trainer_acquire(self) < 0)
        return NULL;
    if (trainer_find_tensor(self->trainer, name, &e) != DS_OK) {
        PyThread_release_lock(self->lock);
        PyErr_SetString(PyExc_KeyError, ds_last_error());
        return NULL;
    }
    npy_intp dims[4];
    for (int i = 0; i < e->ndim; i++)
        dims[i] = e->shape[i];
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(e->ndim, dims, NPY_FLOAT32);
    ds_status rc = DS_OK;
    if (out) {
        Py_BEGIN_ALLOW_THREADS
        rc = trainer_read_tensor(self->trainer, name, PyArray_DATA(out));
        Py_END_ALLOW_THREADS
    }
    PyThread_release_lock(self->lock);
    if (rc != DS_OK) {
        Py_XDECREF(out);
        return raise_status(rc);
    }
    return (PyObject *)out;
}

static PyObject *Trainer_set(TrainerObject *self, PyObject *args)
{
    const char *name;
    PyObject *value_obj;
    if (!PyArg_ParseTuple(args, "sO", &name, &value_obj))
        return NULL;
    if (!self->trainer)
        return PyErr_Format(PyExc_RuntimeError, "trainer is not initialised");
    const ds_param_entry *e;
    if (trainer_find_tensor(self->trainer, name, &e) != DS_OK) {
        PyErr_SetString(PyExc_KeyError, ds_last_error());
        return NULL;
    }
    PyArrayObject *value = (PyArrayObject *)PyArray_FROM_OTF(value_obj, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    if (!value)
        return NULL;
    int same = PyArray_NDIM(value) == e->ndim;
    for (int i = 0; same && i < e->ndim; i++)
        same = PyArray_DIM(value, i) == e->shape[i];
    if (!same) {
        Py_DECREF(value);
        return PyErr_Format(PyExc_ValueError, "'%s': the array does not have the tensor's shape", name);
    }
    if (trainer_acquire(self) < 0) {
        Py_DECREF(value);
        return NULL;
    }
    ds_status rc;
    Py_BEGIN_ALLOW_THREADS
    rc = trainer_write_tensor(self->trainer, name, PyArray_DATA(value));
    Py_END_ALLOW_THREADS
    PyThread_release_lock(self->lock);
    Py_DECREF(value);
    if (rc != DS_OK)
        return raise_status(rc);
    Py_RETURN_NONE;
}

static PyObject *Trainer_load(TrainerObject *self, PyObject *arg)
{
    PyObject *path;
    if (!PyUnicode_FSConverter(arg, &path))
        return NULL;
    if (trainer_acquire(self) < 0) {
        Py_DECREF(path);
        return NULL;
    }
    ds_status rc;
    Py_BEGIN_ALLOW_THREADS
    rc = trainer_load(self->trainer, PyBytes_AS_STRING(path));
    Py_END_ALLOW_THREADS
    PyThread_release_lock(self->lock);
    Py_DECREF(path);
    if (rc != DS_OK)
        return raise_status(rc);
    Py_RETURN_NONE;
}

static PyObject *Trainer_to_network(TrainerObject *self, PyObject *unused)
{
    if (trainer_acquire(self) < 0)
        return NULL;
    ds_model *model = NULL;
    ds_status rc;
    Py_BEGIN_ALLOW_THREADS
    rc = trainer_to_model(self->trainer, &model);
    Py_END_ALLOW_THREADS
    PyThread_release_lock(self->lock);
    if (rc != DS_OK)
        return raise_status(rc);
    NetworkObject *network = (NetworkObject *)NetworkType.tp_alloc(&NetworkType, 0);
    if (!network) {
        model_free(model);
        return NULL;
    }
    network->model = model;
    return (PyObject *)network;
}

static PyObject *Trainer_get_names(TrainerObject *self, void *closure)
{
    if (!self->trainer)
        return PyErr_Format(PyExc_RuntimeError, "trainer is not initialised");
    int n = trainer_num_tensors(self->trainer);
    PyObject *list = PyList_New(n);
    for (int i = 0; list && i < n; i++) {
        PyObject *name = PyUnicode_FromString(trainer_tensor_entry(self->trainer, i)->name);
        if (!name) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, i, name);
    }
    return list;
}

static PyObject *Trainer_get_step_count(TrainerObject *self, void *closure)
{
    if (!self->trainer)
        return PyErr_Format(PyExc_RuntimeError, "trainer is not initialised");
    return PyLong_FromLong(trainer_step_count(self->trainer));
}

static int Trainer_set_step_count(TrainerObject *self, PyObject *value, void *closure)
{
    long step = value ? PyLong_AsLong(value) : -1;
    if (step == -1 && (!value || PyErr_Occurred())) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "step_count must be an int");
        return -1;
    }
    if (step < 0 || !self->trainer) {
        PyErr_SetString(PyExc_ValueError, "step_count must be >= 0 on an initialised trainer");
        return -1;
    }
    trainer_set_step_count(self->trainer, step);
    return 0;
}

static PyObject *Trainer_get_arena_bytes(TrainerObject *self, void *closure)
{
    return self->trainer ? PyLong_FromSize_t(trainer_arena_bytes(self->trainer))
                         : PyErr_Format(PyExc_RuntimeError, "trainer is not initialised");
}

static PyObject *Trainer_get_config(TrainerObject *self, void *closure)
{
    if (!self->trainer)
        return PyErr_Format(PyExc_RuntimeError, "trainer is not initialised");
    const ds_train_config *c = trainer_get_config(self->trainer);
    return Py_BuildValue("{s:d,s:d,s:d,s:d,s:d,s:d,s:O,s:s,s:s,s:K,s:s}", "learning_rate", (double)c->learning_rate,
                         "beta1", c->beta1, "beta2", c->beta2, "epsilon", (double)c->adam_epsilon,
                         "dropout", (double)c->dropout_rate, "bn_momentum", c->bn_momentum, "bn_bessel",
                         c->bn_bessel ? Py_True : Py_False, "bce", bce_names[c->bce_mode], "max_term",
                         max_names[c->max_mode], "seed", c->seed, "batch_norm", batch_norm_names[c->bn_frozen]);
}

static PyMethodDef Trainer_methods[] = {
    {"step", (PyCFunction)Trainer_step, METH_VARARGS,
     "step(images, targets) -> (loss, bce, max_term): one Adam step on a float32 [batch, h, w] batch (training-mode "
     "forward, backward, update, BN moving statistics). The loss is the forward's, before the update."},
    {"gradients", (PyCFunction)Trainer_gradients, METH_VARARGS,
     "gradients(images, targets) -> (loss, bce, max_term): forward and backward only; read them with get('grad.<name>')."},
    {"evaluate", (PyCFunction)(void (*)(void))Trainer_evaluate, METH_VARARGS | METH_KEYWORDS,
     "evaluate(images, targets=None) -> (pred, (loss, bce, max_term) or None): inference mode (moving statistics, "
     "no dropout)."},
    {"get", (PyCFunction)Trainer_get, METH_O,
     "get(name) -> float32 array copy of '<param>', 'grad.<param>', 'adam.m.<param>' or 'adam.v.<param>'."},
    {"set", (PyCFunction)Trainer_set, METH_VARARGS, "set(name, array): overwrite one tensor (same names as get)."},
    {"load", (PyCFunction)Trainer_load, METH_O,
     "load(path): parameters (all required) and Adam moments (optional) from a safetensors file."},
    {"to_network", (PyCFunction)Trainer_to_network, METH_NOARGS,
     "to_network() -> Network: an inference network with a copy of the current parameters."},
    {NULL},
};

static PyGetSetDef Trainer_getset[] = {
    {"names", (getter)Trainer_get_names, NULL, "parameter names in file order", NULL},
    {"step_count", (getter)Trainer_get_step_count, (setter)Trainer_set_step_count, "Adam steps taken", NULL},
    {"arena_bytes", (getter)Trainer_get_arena_bytes, NULL, "bytes of the activation arena", NULL},
    {"config", (getter)Trainer_get_config, NULL, "the training settings", NULL},
    {NULL},
};

static PyTypeObject TrainerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = DS_QUALIFIED("Trainer"),
    .tp_doc = "Trainer(network, *, learning_rate=1e-4, beta1=0.9, beta2=0.999, epsilon=1e-7, dropout=0.2, "
              "bn_momentum=0.99, bn_bessel=False, bce='logits', max_term='batch', seed=0, batch_norm='batch'): trains a "
              "copy of the network's parameters in C, on the network's backend and math mode. batch_norm='frozen' "
              "normalises with the moving statistics in training too and keeps them (CPU only for now).",
    .tp_basicsize = sizeof(TrainerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Trainer_init,
    .tp_dealloc = (destructor)Trainer_dealloc,
    .tp_methods = Trainer_methods,
    .tp_getset = Trainer_getset,
};

/* ---- single training ops, for the tests ---- */

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
    if (!(x = as_float32_array(x_obj, 4, "x")) || !(w = as_float32_array(w_obj, 4, "weight")) ||
        !(b = as_float32_array(b_obj, 1, "bias")) || !(dy = as_float32_array(dy_obj, 4, "dy")))
        goto done;
    npy_intp *xd = PyArray_DIMS(x), *wd = PyArray_DIMS(w);
    if (wd[1] != xd[3] || wd[2] != wd[3] || PyArray_DIM(b, 0) != wd[0] || stride < 1 || dilation < 1) {
        PyErr_SetString(PyExc_ValueError, "conv2d_backward: weight [out, in, k, k] with in = x.shape[3], bias [out]");
        goto done;
    }
    conv_desc d = {.transposed = transposed, .batch = (int)xd[0], .in_channels = (int)xd[3], .in_height = (int)xd[1],
                   .in_width = (int)xd[2], .out_channels = (int)wd[0], .kernel = (int)wd[2], .stride = stride,
                   .dilation = dilation, .pad_before = pad_before, .pad_after = pad_after};
    int span = (d.kernel - 1) * dilation + 1;
    d.out_height = transposed ? (d.in_height - 1) * stride + span - pad_before - pad_after
                              : (d.in_height + pad_before + pad_after - span) / stride + 1;
    d.out_width = transposed ? (d.in_width - 1) * stride + span - pad_before - pad_after
                             : (d.in_width + pad_before + pad_after - span) / stride + 1;
    if (d.out_height < 1 || d.out_width < 1 || PyArray_DIM(dy, 0) != d.batch || PyArray_DIM(dy, 1) != d.out_height ||
        PyArray_DIM(dy, 2) != d.out_width || PyArray_DIM(dy, 3) != d.out_channels) {
        PyErr_SetString(PyExc_ValueError, "conv2d_backward: dy must have the output's shape");
        goto done;
    }
    if (!(y = new_nhwc(d.batch, d.out_height, d.out_width, d.out_channels)) ||
        !(dx = new_nhwc(xd[0], xd[1], xd[2], xd[3])) ||
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
        rc = conv_train_create(&op, st.backend, &d, need_dx);
    if (rc == DS_OK)
        rc = conv_train_forward(op, y_, x_, w_, b_);
    if (rc == DS_OK)
        rc = conv_backward(op, dx_, dw_, db_, dy_, x_);
    rc = staging_finish(&st, rc);
    train_op_destroy(op);
    Py_END_ALLOW_THREADS
    if (rc != DS_OK)
        raise_status(rc);
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
    if (!(x = as_float32_array(x_obj, 4, "x")) || !(g = as_float32_array(g_obj, 1, "gamma")) ||
        !(b = as_float32_array(b_obj, 1, "beta")) || !(dy = as_float32_array(dy_obj, 4, "dy")))
        goto done;
    npy_intp *xd = PyArray_DIMS(x), cd[1] = {xd[3]};
    if (PyArray_DIM(g, 0) != xd[3] || PyArray_DIM(b, 0) != xd[3] || !PyArray_SAMESHAPE(x, dy)) {
        PyErr_SetString(PyExc_ValueError, "batchnorm_train: gamma, beta [channels]; dy of x's shape");
        goto done;
    }
    if (!(y = new_nhwc(xd[0], xd[1], xd[2], xd[3])) || !(dx = new_nhwc(xd[0], xd[1], xd[2], xd[3])) ||
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
        rc = batchnorm_train_create(&op, st.backend, (int)xd[0], (int)xd[3], (int)xd[1], (int)xd[2], epsilon, relu,
                                    1);
    if (rc == DS_OK)
        rc = batchnorm_train_forward(op, y_, mean_, var_, x_, g_, b_);
    if (rc == DS_OK)
        rc = batchnorm_backward(op, dx_, dg_, dbeta_, dy_, x_, mean_, var_, g_, b_);
    rc = staging_finish(&st, rc);
    train_op_destroy(op);
    Py_END_ALLOW_THREADS
    if (rc != DS_OK)
        raise_status(rc);
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
    if (kernel < 1 || stride < 1 || pad_before < 0 || pad_after < 0 || pad_before >= kernel || pad_after >= kernel)
        return PyErr_Format(PyExc_ValueError, "maxpool_backward: kernel, stride >= 1 and 0 <= padding < kernel");
    PyArrayObject *x = NULL, *dy = NULL, *y = NULL, *dx = NULL;
    PyObject *result = NULL;
    if (!(x = as_float32_array(x_obj, 4, "x")) || !(dy = as_float32_array(dy_obj, 4, "dy")))
        goto done;
    npy_intp *xd = PyArray_DIMS(x);
    int oh = ((int)xd[1] + pad_before + pad_after - kernel) / stride + 1;
    int ow = ((int)xd[2] + pad_before + pad_after - kernel) / stride + 1;
    if (oh < 1 || ow < 1 || PyArray_DIM(dy, 0) != xd[0] || PyArray_DIM(dy, 1) != oh || PyArray_DIM(dy, 2) != ow ||
        PyArray_DIM(dy, 3) != xd[3]) {
        PyErr_SetString(PyExc_ValueError, "maxpool_backward: dy must have the output's shape");
        goto done;
    }
    if (!(y = new_nhwc(xd[0], oh, ow, xd[3])) || !(dx = new_nhwc(xd[0], xd[1], xd[2], xd[3])))
        goto done;
    ds_train_op *op = NULL;
    ds_status rc;
    Py_BEGIN_ALLOW_THREADS
    staging st;
    staging_begin(&st);
    float *x_ = stage(&st, x, STAGE_IN), *dy_ = stage(&st, dy, STAGE_IN), *y_ = stage(&st, y, STAGE_OUT),
          *dx_ = stage(&st, dx, STAGE_OUT);
    rc = st.rc;
    if (rc == DS_OK)
        rc = maxpool_train_create(&op, st.backend, (int)xd[0], (int)xd[3], (int)xd[1], (int)xd[2], oh, ow, kernel,
                                  stride, pad_before, pad_after);
    if (rc == DS_OK)
        rc = maxpool_train_forward(op, y_, x_);
    if (rc == DS_OK)
        rc = maxpool_backward(op, dx_, dy_);
    rc = staging_finish(&st, rc);
    train_op_destroy(op);
    Py_END_ALLOW_THREADS
    if (rc != DS_OK)
        raise_status(rc);
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
    if (!(dy = as_float32_array(dy_obj, 4, "dy")))
        goto done;
    npy_intp *d = PyArray_DIMS(dy);
    if (d[3] != total) {
        PyErr_SetString(PyExc_ValueError, "concat_backward: dy.shape[3] must be the sum of channels");
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (!(parts[i] = new_nhwc(d[0], d[1], d[2], channels[i])))
            goto done;
    ds_status rc;
    Py_BEGIN_ALLOW_THREADS
    staging st;
    staging_begin(&st);
    float *dsrcs[CONCAT_MAX_INPUTS];
    for (Py_ssize_t i = 0; i < n; i++)
        dsrcs[i] = stage(&st, parts[i], STAGE_OUT);
    const float *ddst = stage(&st, dy, STAGE_IN);
    rc = staging_finish(&st, st.rc == DS_OK ? concat_backward(st.backend, dsrcs, ddst, (size_t)(d[0] * d[1] * d[2]),
                                                              (int)n, channels)
                                            : st.rc);
    Py_END_ALLOW_THREADS
    if (rc != DS_OK) {
        raise_status(rc);
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
            rc = which == 0 ? relu_backward(st.backend, out_, a_, b_, n, 0) : add_forward(st.backend, out_, a_, b_, n);
        rc = staging_finish(&st, rc);
        Py_END_ALLOW_THREADS
        if (rc != DS_OK) {
            Py_CLEAR(out);
            raise_status(rc);
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
    PyArrayObject *x = as_float32_array(x_obj, 4, "x");
    if (!x)
        return NULL;
    npy_intp *d = PyArray_DIMS(x), md[2] = {d[0], d[3]};
    PyArrayObject *y = new_nhwc(d[0], d[1], d[2], d[3]);
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
            rc = dropout_mask(st.backend, mask_, (int)d[0], (int)d[3], rate, seed, stream);
        if (rc == DS_OK)
            rc = spatial_dropout_forward(st.backend, y_, x_, mask_, (int)d[0], (size_t)(d[1] * d[2]), (int)d[3]);
        rc = staging_finish(&st, rc);
        Py_END_ALLOW_THREADS
        result = rc == DS_OK ? Py_BuildValue("(OO)", y, mask) : raise_status(rc);
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
    if (parse_mode(bce, "bce", bce_names, 2, &bce_mode) < 0 ||
        parse_mode(max_term, "max_term", max_names, 3, &max_mode) < 0)
        return NULL;
    PyArrayObject *z, *t;
    if (batch_arguments(z_obj, t_obj, &z, &t, 0) < 0)
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
        rc = staging_finish(&st, st.rc == DS_OK ? deepspot_loss(st.backend, terms_, pred_, dz_, z_, t_, (int)d[0],
                                                                (size_t)(d[1] * d[2]), bce_mode, max_mode)
                                                : st.rc);
        Py_END_ALLOW_THREADS
        const double *v = PyArray_DATA(terms);
        result = rc == DS_OK ? Py_BuildValue("(dddOO)", v[0], v[1], v[2], pred, dz) : raise_status(rc);
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
    rc = staging_finish(&st, st.rc == DS_OK ? adam_update(st.backend, param, m, v, grad, (size_t)PyArray_SIZE(a[0]),
                                                          lr, beta1, beta2, epsilon, step, NULL)
                                            : st.rc);
    Py_END_ALLOW_THREADS
    result = rc == DS_OK ? Py_BuildValue("(OOO)", a[0], a[1], a[2]) : raise_status(rc);
done:
    for (int i = 0; i < 4; i++)
        Py_XDECREF(a[i]);
    return result;
}
static PyObject *py_probe(PyObject *self, PyObject *unused)
{
    char description[256];
    ds_status rc;
    Py_BEGIN_ALLOW_THREADS
    rc = backend_probe(description, sizeof description);
    Py_END_ALLOW_THREADS
    if (rc != DS_OK) {
        PyErr_SetString(PyExc_RuntimeError, ds_last_error());
        return NULL;
    }
    return PyUnicode_FromString(description);
}

static PyMethodDef module_methods[] = {
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
    {"probe", py_probe, METH_NOARGS,
     "probe() -> a one-line description of the device this module computes on; RuntimeError with the reason when it "
     "cannot run here (e.g. no GPU)."},
    {"conv2d", (PyCFunction)(void (*)(void))py_conv2d, METH_VARARGS | METH_KEYWORDS,
     "conv2d(x, weight, bias, stride=1, dilation=1, pad_before=0, pad_after=0, transposed=False, relu=False, "
     "sigmoid=False, accumulate=None): one (transposed) convolution on NHWC float32 x, weight [out, in, k, k]."},
    {"batchnorm_relu", py_batchnorm_relu, METH_VARARGS,
     "batchnorm_relu(x, gamma, beta, mean, variance, epsilon): inference batch norm then ReLU on NHWC x."},
    {"maxpool", (PyCFunction)(void (*)(void))py_maxpool, METH_VARARGS | METH_KEYWORDS,
     "maxpool(x, kernel, stride, pad_before=0, pad_after=0): max pooling on NHWC x."},
    {"concat", py_concat, METH_O, "concat([x1, x2, ...]): channel concatenation of NHWC arrays."},
    {"wavelet_transform", (PyCFunction)py_wavelet_transform, METH_VARARGS,
     "wavelet_transform(image, num_scales) -> float32 [num_scales, h, w]: a trous details W_1..W_n "
     "(B3 spline, symmetric mirror borders)."},
    {"detect_wavelet", (PyCFunction)(void (*)(void))py_detect_wavelet, METH_VARARGS | METH_KEYWORDS,
     "detect_wavelet(image, raw, scales, sensitivities, subpixel='none', window_radius=3) -> float32 [n, 6] "
     "(z, y, x, score, intensity, size): Icy-style wavelet spot detector on one 2D float32 plane."},
    {"detect_peaks", (PyCFunction)(void (*)(void))py_detect_peaks, METH_VARARGS | METH_KEYWORDS,
     "detect_peaks(image, raw, threshold, footprint_radius, min_distance, subpixel='none', window_radius=3) -> "
     "float32 [n, 6] (z, y, x, score, intensity, size): local maxima above threshold on one 2D float32 plane."},
    {"merge_plane_spots", (PyCFunction)py_merge_plane_spots, METH_VARARGS,
     "merge_plane_spots(spots, radius) -> float32 [m, 6]: spots [n, 6] of several planes (z = plane index) with "
     "those of adjacent planes within radius linked into one molecule each."},
    {NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, DS_MODULE_NAME,
    "DeepSpot C core on the " DS_BACKEND_NAME " backend: network forward and training, spot detection.", -1,
    module_methods,
};

static int add_type(PyObject *module, const char *name, PyTypeObject *type)
{
    if (PyType_Ready(type) < 0)
        return -1;
    Py_INCREF(type);
    if (PyModule_AddObject(module, name, (PyObject *)type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC DS_PASTE(PyInit_, DS_MODULE)(void)
{
    import_array();
    if (!single_op_lock && !(single_op_lock = PyThread_allocate_lock()))
        return PyErr_NoMemory();
    PyObject *module = PyModule_Create(&module_def);
    if (!module)
        return NULL;
    if (add_type(module, "Network", &NetworkType) < 0 || add_type(module, "Trainer", &TrainerType) < 0 ||
        PyModule_AddStringConstant(module, "BACKEND", DS_BACKEND_NAME) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
