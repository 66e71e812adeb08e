/* pymodule.c - CPython glue for the C core (module deepspot_napari._core): argument checking,
 * NumPy array conversion, releasing the GIL around compute, and turning ds_status codes into
 * Python exceptions. No numerics live here. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include "model.h"
#include "detect.h"
#include "ops.h"

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

static int Network_init(NetworkObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"weights_path", NULL};
    PyObject *path_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&", keywords, PyUnicode_FSConverter, &path_obj))
        return -1;
    ds_model *model = NULL;
    ds_status rc;
    Py_BEGIN_ALLOW_THREADS
    rc = model_load(&model, PyBytes_AS_STRING(path_obj));
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

static PyMethodDef Network_methods[] = {
    {"forward", (PyCFunction)(void (*)(void))Network_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(x, first_stage=0, last_stage=2) -> y: NHWC float32 arrays. Stages: 0 encoder (1 channel scaled "
     "to [0, 1], sides multiples of 8 -> 384 channels at 1/8), 1 trunk (384 -> 128), 2 decoder (128 -> the "
     "sigmoid map at 8x)."},
    {NULL},
};

static PyGetSetDef Network_getset[] = {
    {"num_parameters", (getter)Network_num_parameters, NULL, "number of float32 values in the weights", NULL},
    {NULL},
};

static PyTypeObject NetworkType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "deepspot_napari._core.Network",
    .tp_doc = "Network(weights_path): the DeepSpot network loaded from a safetensors file (CPU, oneDNN).",
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

static ds_status get_backend(ds_backend **backend)
{
    if (!shared_backend)
        DS_TRY(backend_create(&shared_backend));
    *backend = shared_backend;
    return DS_OK;
}


/* Runs a built op on (src -> dst), releasing the GIL; consumes op. */
typedef ds_status (*unary_forward)(ds_op *, const float *, float *);

static PyObject *run_unary(ds_status rc, ds_op *op, unary_forward forward, PyArrayObject *src, PyArrayObject *dst)
{
    if (rc == DS_OK) {
        Py_BEGIN_ALLOW_THREADS
        rc = forward(op, PyArray_DATA(src), PyArray_DATA(dst));
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
        const float *srcs[CONCAT_MAX_INPUTS];
        for (Py_ssize_t i = 0; i < n; i++)
            srcs[i] = PyArray_DATA(xs[i]);
        Py_BEGIN_ALLOW_THREADS
        rc = concat_forward(op, srcs, PyArray_DATA(y));
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
/* --- detection glue: begin --- */

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
/* --- detection glue: end --- */

/* --- training glue: begin --- */
/* --- training glue: end --- */

static PyMethodDef module_methods[] = {
/* --- training methods: begin --- */
/* --- training methods: end --- */
    {"conv2d", (PyCFunction)(void (*)(void))py_conv2d, METH_VARARGS | METH_KEYWORDS,
     "conv2d(x, weight, bias, stride=1, dilation=1, pad_before=0, pad_after=0, transposed=False, relu=False, "
     "sigmoid=False, accumulate=None): one (transposed) convolution on NHWC float32 x, weight [out, in, k, k]."},
    {"batchnorm_relu", py_batchnorm_relu, METH_VARARGS,
     "batchnorm_relu(x, gamma, beta, mean, variance, epsilon): inference batch norm then ReLU on NHWC x."},
    {"maxpool", (PyCFunction)(void (*)(void))py_maxpool, METH_VARARGS | METH_KEYWORDS,
     "maxpool(x, kernel, stride, pad_before=0, pad_after=0): max pooling on NHWC x."},
    {"concat", py_concat, METH_O, "concat([x1, x2, ...]): channel concatenation of NHWC arrays."},
/* --- detection methods: begin --- */
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
/* --- detection methods: end --- */
    {NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_core", "DeepSpot C core: network forward on oneDNN, spot detection.", -1, module_methods,
};

PyMODINIT_FUNC PyInit__core(void)
{
    import_array();
    if (PyType_Ready(&NetworkType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&module_def);
    if (!module)
        return NULL;
    Py_INCREF(&NetworkType);
    if (PyModule_AddObject(module, "Network", (PyObject *)&NetworkType) < 0) {
        Py_DECREF(&NetworkType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
