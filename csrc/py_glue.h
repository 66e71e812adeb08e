/* py_glue.h - what the CPython glue files share: the module's name per backend, NumPy's C API (imported
 * once, in pymodule.c), turning ds_status codes into exceptions and NumPy argument conversion.
 * The glue is split by purpose: pymodule.c (the module, Network, Trainer), py_detect.c (the spot
 * detectors), py_polarity.c (the polarity histograms) and py_single_ops.c (each op of ops.h on its
 * own, a test harness). Every file is compiled once per backend: DS_MODULE _core with DS_BACKEND_NAME
 * "cpu" (oneDNN), _core_cuda with "cuda" (cuDNN). */
#ifndef DS_PY_GLUE_H
#define DS_PY_GLUE_H

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
/* One NumPy API table for the three files; only pymodule.c (DS_PY_MODULE_MAIN) imports it. */
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#define PY_ARRAY_UNIQUE_SYMBOL ds_py_numpy_api
#ifndef DS_PY_MODULE_MAIN
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#include "status.h"

/* Sets the exception for rc (OSError, ValueError, MemoryError, KeyboardInterrupt or RuntimeError) with
 * ds_last_error()'s message; returns NULL. */
PyObject *ds_py_raise(ds_status rc);
/* A C-contiguous array of NumPy type `type` (NPY_FLOAT32, NPY_INT32, ...) and the given ndim, or NULL with a
 * TypeError set (another type or ndim) or a ValueError. ds_py_float32_array: the float32 case. */
PyArrayObject *ds_py_typed_array(PyObject *obj, int type, int ndim, const char *what);
PyArrayObject *ds_py_float32_array(PyObject *obj, int ndim, const char *what);
/* A zeroed float32 array [n, h, w, c]. */
PyArrayObject *ds_py_new_nhwc(npy_intp n, npy_intp h, npy_intp w, npy_intp c);
/* The index of value in names (0), or ValueError listing the choices (-1). */
int ds_py_parse_mode(const char *value, const char *what, const char *const *names, int count, int *mode);
/* (images, targets) as two [batch, height, width] float32 arrays of the same shape (targets may be None
 * when optional, giving NULL); 0, or -1 with an exception set. */
int ds_py_batch_arguments(PyObject *images_obj, PyObject *targets_obj, PyArrayObject **images,
                          PyArrayObject **targets, int targets_optional);

/* Names of the loss modes (ops.h: DS_BCE_*, DS_MAX_*), in index order. */
extern const char *const ds_py_bce_names[2];
extern const char *const ds_py_max_names[3];

/* The functions of py_detect.c, py_polarity.c and py_single_ops.c, added to the module by pymodule.c. */
extern PyMethodDef ds_py_detect_methods[];
extern PyMethodDef ds_py_single_op_methods[];
extern PyMethodDef ds_py_polarity_methods[];
/* Makes the single ops' lock; 0, or -1 with an exception set. */
int ds_py_single_ops_init(void);

#endif
