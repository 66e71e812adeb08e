/* py_polarity.c - CPython glue for the polarity histograms (polarity.h): NumPy arrays in and out, shapes
 * checked, the GIL released around the pass. Runs on the CPU whatever the module's backend. */
#include "py_glue.h"

#include "polarity.h"

static PyObject *py_polarity_histograms(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"cell_of_pixel", "centroids", "origins", "bins", "spots", "with_map", NULL};
    PyObject *cells_obj, *centroids_obj, *origins_obj, *spots_obj;
    int bins, with_map = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOiO|p", keywords, &cells_obj, &centroids_obj, &origins_obj,
                                     &bins, &spots_obj, &with_map))
        return NULL;
    PyArrayObject *cells = NULL, *centroids = NULL, *origins = NULL, *spots = NULL;
    PyArrayObject *area = NULL, *counts = NULL, *cell_of_spot = NULL, *bin_map = NULL;
    PyObject *result = NULL;
    if (!(cells = ds_py_typed_array(cells_obj, NPY_INT32, 2, "cell_of_pixel")) ||
        !(centroids = ds_py_typed_array(centroids_obj, NPY_FLOAT64, 2, "centroids")) ||
        !(origins = ds_py_typed_array(origins_obj, NPY_FLOAT64, 1, "origins")) ||
        !(spots = ds_py_typed_array(spots_obj, NPY_FLOAT64, 2, "spots")))
        goto done;
    npy_intp n_cells = PyArray_DIM(origins, 0), n_spots = PyArray_DIM(spots, 0);
    if (PyArray_DIM(centroids, 0) != n_cells || PyArray_DIM(centroids, 1) != 2) {
        PyErr_Format(PyExc_ValueError, "centroids must be [%zd, 2] (one (y, x) per direction)", (Py_ssize_t)n_cells);
        goto done;
    }
    if (PyArray_DIM(spots, 1) != 2 && n_spots) {
        PyErr_Format(PyExc_ValueError, "spots must be [n, 2] (y, x)");
        goto done;
    }
    if (bins < 1 || n_cells > INT32_MAX || PyArray_DIM(cells, 0) > INT32_MAX || PyArray_DIM(cells, 1) > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "bins must be >= 1 and the image and cell count below 2^31");
        goto done;
    }
    npy_intp hist_dims[2] = {n_cells, bins};
    if (!(area = (PyArrayObject *)PyArray_SimpleNew(2, hist_dims, NPY_INT64)) ||
        !(counts = (PyArrayObject *)PyArray_SimpleNew(2, hist_dims, NPY_INT64)) ||
        !(cell_of_spot = (PyArrayObject *)PyArray_SimpleNew(1, &n_spots, NPY_INT32)) ||
        (with_map && !(bin_map = (PyArrayObject *)PyArray_SimpleNew(2, PyArray_DIMS(cells), NPY_INT32))))
        goto done;
    ds_status rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ds_polarity_histograms(PyArray_DATA(area), PyArray_DATA(counts), PyArray_DATA(cell_of_spot),
                                bin_map ? PyArray_DATA(bin_map) : NULL, (int)PyArray_DIM(cells, 0),
                                (int)PyArray_DIM(cells, 1), PyArray_DATA(cells), (int)n_cells,
                                PyArray_DATA(centroids), PyArray_DATA(origins), bins, PyArray_DATA(spots),
                                (int64_t)n_spots);
    Py_END_ALLOW_THREADS
    if (rc != DS_OK) {
        ds_py_raise(rc);
        goto done;
    }
    result = Py_BuildValue("OOOO", area, counts, cell_of_spot, bin_map ? (PyObject *)bin_map : Py_None);
done:
    Py_XDECREF(cells);
    Py_XDECREF(centroids);
    Py_XDECREF(origins);
    Py_XDECREF(spots);
    Py_XDECREF(area);
    Py_XDECREF(counts);
    Py_XDECREF(cell_of_spot);
    Py_XDECREF(bin_map);
    return result;
}

PyMethodDef ds_py_polarity_methods[] = {
    {"polarity_histograms", (PyCFunction)(void (*)(void))py_polarity_histograms, METH_VARARGS | METH_KEYWORDS,
     "polarity_histograms(cell_of_pixel, centroids, origins, bins, spots, with_map=False) -> (area int64 [cells, "
     "bins], spot_count int64 [cells, bins], cell_of_spot int32 [spots], bin_of_pixel int32 [h, w] or None): "
     "per cell, cytoplasm pixels and spots per angular bin around its centroid (polarity.h)."},
    {NULL},
};
