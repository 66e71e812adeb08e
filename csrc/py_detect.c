/* py_detect.c - CPython glue for the spot detectors (detect.h): argument checking, NumPy arrays in
 * and out, the GIL released around each detector. Detection runs on the CPU whatever the module's
 * backend. */
#include "py_glue.h"

#include "detect.h"

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
    *image = ds_py_float32_array(image_obj, 2, "image");
    if (!*image)
        return -1;
    if (PyArray_DIM(*image, 0) > INT32_MAX || PyArray_DIM(*image, 1) > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "image is too large");
        goto fail;
    }
    if (raw_obj == Py_None)
        return 0;
    *raw = ds_py_float32_array(raw_obj, 2, "raw");
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
    ds_status rc = ds_subpixel_mode_from_name(subpixel, &refine->mode);
    if (rc != DS_OK) {
        ds_py_raise(rc);
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
    return ds_detect_wavelet(height, width, image, raw, params, spots);
}

static ds_status run_peaks(int height, int width, const float *image, const float *raw, const void *params,
                           ds_spot_list *spots)
{
    return ds_detect_peaks(height, width, image, raw, params, spots);
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
    PyObject *result = rc == DS_OK ? spots_to_array(&spots) : ds_py_raise(rc);
    ds_spot_list_free(&spots);
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
    rc = ds_wavelet_transform((int)dims[1], (int)dims[2], PyArray_DATA(image), num_scales, PyArray_DATA(details));
    Py_END_ALLOW_THREADS
    Py_DECREF(image);
    if (rc != DS_OK) {
        Py_DECREF(details);
        return ds_py_raise(rc);
    }
    return (PyObject *)details;
}

static PyObject *py_merge_plane_spots(PyObject *self, PyObject *args)
{
    PyObject *spots_obj;
    float radius;
    if (!PyArg_ParseTuple(args, "Of", &spots_obj, &radius))
        return NULL;
    PyArrayObject *input = ds_py_float32_array(spots_obj, 2, "spots");
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
    rc = ds_merge_plane_spots(PyArray_DATA(input), (size_t)PyArray_DIM(input, 0), radius, &merged);
    Py_END_ALLOW_THREADS
    Py_DECREF(input);
    PyObject *result = rc == DS_OK ? spots_to_array(&merged) : ds_py_raise(rc);
    ds_spot_list_free(&merged);
    return result;
}

PyMethodDef ds_py_detect_methods[] = {
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
