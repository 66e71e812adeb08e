/* pymodule.c - CPython glue for the C core: the module, the Network and Trainer types, and what the
 * glue files share (py_glue.h). Argument checking, NumPy array conversion, turning ds_status codes
 * into Python exceptions; no numerics or shape logic live here. Each Network and Trainer has a lock,
 * so that calls from several Python threads never run at once on its C object: Network calls wait
 * for each other, a Trainer call that computes is refused while another runs (a second training
 * thread is a mistake to report, not to queue). Waiting and computing release the GIL. The
 * detectors are in py_detect.c, the single-op test harness in py_single_ops.c. */
#define DS_PY_MODULE_MAIN
#include "py_glue.h"

#include "model.h"
#include "ops.h"
#include "train.h"

PyObject *ds_py_raise(ds_status rc)
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

PyArrayObject *ds_py_typed_array(PyObject *obj, int type, int ndim, const char *what)
{
    if (!PyArray_Check(obj) || PyArray_TYPE((PyArrayObject *)obj) != type ||
        PyArray_NDIM((PyArrayObject *)obj) != ndim) {
        PyArray_Descr *descr = PyArray_DescrFromType(type);
        const char *name = descr ? descr->typeobj->tp_name : "numeric", *dot = strrchr(name, '.');
        name = dot ? dot + 1 : name;
        PyErr_Format(PyExc_TypeError, "%s must be %s %s numpy array with %d dimensions", what,
                     strchr("aeiou", name[0]) ? "an" : "a", name, ndim);
        Py_XDECREF(descr);
        return NULL;
    }
    return (PyArrayObject *)PyArray_FROM_OTF(obj, type, NPY_ARRAY_IN_ARRAY);
}

PyArrayObject *ds_py_float32_array(PyObject *obj, int ndim, const char *what)
{
    return ds_py_typed_array(obj, NPY_FLOAT32, ndim, what);
}

PyArrayObject *ds_py_new_nhwc(npy_intp n, npy_intp h, npy_intp w, npy_intp c)
{
    npy_intp dims[4] = {n, h, w, c};
    return (PyArrayObject *)PyArray_ZEROS(4, dims, NPY_FLOAT32, 0);
}

int ds_py_parse_mode(const char *value, const char *what, const char *const *names, int n, int *out)
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

const char *const ds_py_bce_names[2] = {"logits", "clipped"};
const char *const ds_py_max_names[3] = {"batch", "per_image", "none"};
static const char *const batch_norm_names[] = {"batch", "frozen"}; /* index: ds_train_config.bn_frozen */
static const char *const math_names[] = {"float32", "tf32", "bf16"};

/* A [batch, height, width] float32 C-contiguous array whose sides fit an int. */
static PyArrayObject *as_bhw(PyObject *obj, const char *what)
{
    PyArrayObject *a = ds_py_float32_array(obj, 3, what);
    if (a && (PyArray_DIM(a, 0) > INT32_MAX || PyArray_DIM(a, 1) > INT32_MAX || PyArray_DIM(a, 2) > INT32_MAX)) {
        Py_DECREF(a);
        PyErr_Format(PyExc_ValueError, "%s is too large", what);
        return NULL;
    }
    return a;
}

int ds_py_batch_arguments(PyObject *images_obj, PyObject *targets_obj, PyArrayObject **images,
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

/* Takes an object's lock; a thread that has to wait releases the GIL meanwhile, so that the holder,
 * which needs the GIL to finish its call, is never blocked by it. */
static void lock_wait(PyThread_type_lock lock)
{
    if (PyThread_acquire_lock(lock, NOWAIT_LOCK))
        return;
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(lock, WAIT_LOCK);
    Py_END_ALLOW_THREADS
}

/* ---------------------------------------------------------------- Network */

typedef struct {
    PyObject_HEAD
    ds_model *model; /* read and replaced only under lock */
    PyThread_type_lock lock;
} NetworkObject;

static PyObject *Network_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    NetworkObject *self = (NetworkObject *)type->tp_alloc(type, 0);
    if (self && !(self->lock = PyThread_allocate_lock())) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

static int Network_init(NetworkObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"weights_path", "math", NULL};
    PyObject *path_obj;
    const char *math = "float32";
    int math_mode;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&|$s", keywords, PyUnicode_FSConverter, &path_obj, &math))
        return -1;
    if (ds_py_parse_mode(math, "math", math_names, 3, &math_mode) < 0) {
        Py_DECREF(path_obj);
        return -1;
    }
    ds_model *model = NULL;
    ds_status rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ds_model_load(&model, PyBytes_AS_STRING(path_obj), math_mode);
    Py_END_ALLOW_THREADS
    Py_DECREF(path_obj);
    if (rc != DS_OK) {
        ds_py_raise(rc);
        return -1;
    }
    lock_wait(self->lock);
    ds_model *old = self->model;
    self->model = model;
    PyThread_release_lock(self->lock);
    ds_model_free(old);
    return 0;
}

static void Network_dealloc(NetworkObject *self)
{
    ds_model_free(self->model);
    if (self->lock)
        PyThread_free_lock(self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The network's model with its lock held (release it after the call), or NULL with RuntimeError. */
static ds_model *network_enter(NetworkObject *self)
{
    lock_wait(self->lock);
    if (!self->model) {
        PyThread_release_lock(self->lock);
        PyErr_SetString(PyExc_RuntimeError, "network is not loaded");
    }
    return self->model;
}

static PyObject *Network_forward(NetworkObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"x", "first_stage", "last_stage", NULL};
    PyObject *x_obj;
    int first = STAGE_ENCODER, last = STAGE_DECODER;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|ii", keywords, &x_obj, &first, &last))
        return NULL;
    PyArrayObject *input = ds_py_float32_array(x_obj, 4, "x");
    if (!input)
        return NULL;
    npy_intp *dims = PyArray_DIMS(input);
    int in_c, out_c, out_h, out_w;
    ds_status rc = DS_OK;
    if (dims[0] > INT32_MAX || dims[1] > INT32_MAX / 8 || dims[2] > INT32_MAX / 8)
        rc = ds_fail(DS_ERR_VALUE, "input is too large");
    if (rc == DS_OK)
        rc = ds_model_stage_shapes(first, last, (int)dims[1], (int)dims[2], &in_c, &out_c, &out_h, &out_w);
    if (rc == DS_OK && dims[3] != in_c)
        rc = ds_fail(DS_ERR_VALUE, "input has %ld channels; stage %d expects %d", (long)dims[3], first, in_c);
    if (rc != DS_OK) {
        Py_DECREF(input);
        return ds_py_raise(rc);
    }
    PyArrayObject *output = ds_py_new_nhwc(dims[0], out_h, out_w, out_c);
    ds_model *model = output ? network_enter(self) : NULL;
    if (!model) {
        Py_DECREF(input);
        Py_XDECREF(output);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = ds_model_forward_stages(model, first, last, (int)dims[0], (int)dims[1], (int)dims[2], PyArray_DATA(input),
                                 PyArray_DATA(output));
    Py_END_ALLOW_THREADS
    PyThread_release_lock(self->lock);
    Py_DECREF(input);
    if (rc != DS_OK) {
        Py_DECREF(output);
        return ds_py_raise(rc);
    }
    return (PyObject *)output;
}

static PyObject *Network_num_parameters(NetworkObject *self, void *closure)
{
    ds_model *model = network_enter(self);
    if (!model)
        return NULL;
    size_t count = ds_model_num_parameters(model);
    PyThread_release_lock(self->lock);
    return PyLong_FromSize_t(count);
}

static PyObject *Network_math(NetworkObject *self, void *closure)
{
    ds_model *model = network_enter(self);
    if (!model)
        return NULL;
    int mode = ds_model_math_mode(model);
    PyThread_release_lock(self->lock);
    return PyUnicode_FromString(math_names[mode]);
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
    {"math", (getter)Network_math, NULL,
     "'float32', 'tf32' (TF32 tensor-core convolutions, GPU only) or 'bf16' (bf16 convolutions, CPU only)", NULL},
    {NULL},
};

static PyTypeObject NetworkType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = DS_QUALIFIED("Network"),
    .tp_doc = "Network(weights_path, *, math='float32'): the DeepSpot network loaded from a safetensors file, on "
              "this module's backend (" DS_BACKEND_NAME "). math='tf32' (GPU only) lets convolutions round their "
              "inputs to TF32 on tensor cores; math='bf16' (CPU with bf16 instructions) runs most convolutions "
              "on bf16 inputs with float32 accumulation. Calls from several threads run one at a time.",
    .tp_basicsize = sizeof(NetworkObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Network_new,
    .tp_init = (initproc)Network_init,
    .tp_dealloc = (destructor)Network_dealloc,
    .tp_methods = Network_methods,
    .tp_getset = Network_getset,
};

/* ---------------------------------------------------------------- Trainer */

typedef struct {
    PyObject_HEAD
    ds_trainer *trainer; /* used and replaced only under lock */
    PyThread_type_lock lock;
} TrainerObject;

static PyObject *Trainer_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    TrainerObject *self = (TrainerObject *)type->tp_alloc(type, 0);
    if (self && !(self->lock = PyThread_allocate_lock())) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

static int Trainer_init(TrainerObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"network", "learning_rate", "beta1", "beta2", "epsilon", "dropout", "bn_momentum",
                               "bn_bessel", "bce", "max_term", "seed", "batch_norm", NULL};
    PyObject *network;
    ds_train_config cfg;
    ds_train_config_default(&cfg);
    const char *bce = "logits", *max_term = "batch", *batch_norm = "batch";
    int bessel = 0;
    unsigned long long seed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!|$fddffdpssKs", keywords, &NetworkType, &network,
                                     &cfg.learning_rate, &cfg.beta1, &cfg.beta2, &cfg.adam_epsilon, &cfg.dropout_rate,
                                     &cfg.bn_momentum, &bessel, &bce, &max_term, &seed, &batch_norm))
        return -1;
    if (ds_py_parse_mode(bce, "bce", ds_py_bce_names, 2, &cfg.bce_mode) < 0 ||
        ds_py_parse_mode(max_term, "max_term", ds_py_max_names, 3, &cfg.max_mode) < 0 ||
        ds_py_parse_mode(batch_norm, "batch_norm", batch_norm_names, 2, &cfg.bn_frozen) < 0)
        return -1;
    cfg.bn_bessel = bessel;
    cfg.seed = seed;
    NetworkObject *source = (NetworkObject *)network;
    ds_model *model = network_enter(source);
    if (!model)
        return -1;
    cfg.math_mode = ds_model_math_mode(model);
    ds_trainer *trainer = NULL;
    ds_status rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ds_trainer_create(&trainer, ds_model_parameters(model), &cfg);
    Py_END_ALLOW_THREADS
    PyThread_release_lock(source->lock);
    if (rc != DS_OK) {
        ds_py_raise(rc);
        return -1;
    }
    lock_wait(self->lock);
    ds_trainer *old = self->trainer;
    self->trainer = trainer;
    PyThread_release_lock(self->lock);
    ds_trainer_free(old);
    return 0;
}

static void Trainer_dealloc(TrainerObject *self)
{
    ds_trainer_free(self->trainer);
    if (self->lock)
        PyThread_free_lock(self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The trainer with its lock held (release it after the call), or NULL with RuntimeError. A call that
 * computes (wait 0) is refused while another thread's runs, rather than queued behind it; reading a
 * setting (wait 1) waits. */
static ds_trainer *trainer_enter(TrainerObject *self, int wait)
{
    if (wait)
        lock_wait(self->lock);
    else if (!PyThread_acquire_lock(self->lock, NOWAIT_LOCK)) {
        PyErr_SetString(PyExc_RuntimeError, "the trainer is busy in another thread");
        return NULL;
    }
    if (!self->trainer) {
        PyThread_release_lock(self->lock);
        PyErr_SetString(PyExc_RuntimeError, "trainer is not initialised");
    }
    return self->trainer;
}

static PyObject *loss_tuple(const ds_loss_value *v) { return Py_BuildValue("(ddd)", v->loss, v->bce, v->max_term); }

typedef ds_status (*trainer_batch_fn)(ds_trainer *, int, int, int, const float *, const float *, ds_loss_value *);

static PyObject *trainer_run_batch(TrainerObject *self, PyObject *args, trainer_batch_fn fn)
{
    PyObject *images_obj, *targets_obj;
    if (!PyArg_ParseTuple(args, "OO", &images_obj, &targets_obj))
        return NULL;
    PyArrayObject *images, *targets;
    if (ds_py_batch_arguments(images_obj, targets_obj, &images, &targets, 0) < 0)
        return NULL;
    ds_trainer *trainer = trainer_enter(self, 0);
    if (!trainer) {
        Py_DECREF(images);
        Py_DECREF(targets);
        return NULL;
    }
    ds_loss_value value = {0};
    ds_status rc;
    npy_intp *d = PyArray_DIMS(images);
    Py_BEGIN_ALLOW_THREADS
    rc = fn(trainer, (int)d[0], (int)d[1], (int)d[2], PyArray_DATA(images), PyArray_DATA(targets), &value);
    Py_END_ALLOW_THREADS
    PyThread_release_lock(self->lock);
    Py_DECREF(images);
    Py_DECREF(targets);
    return rc == DS_OK ? loss_tuple(&value) : ds_py_raise(rc);
}

static PyObject *Trainer_step(TrainerObject *self, PyObject *args)
{
    return trainer_run_batch(self, args, ds_trainer_step);
}

static PyObject *Trainer_gradients(TrainerObject *self, PyObject *args)
{
    return trainer_run_batch(self, args, ds_trainer_compute_gradients);
}

static PyObject *Trainer_evaluate(TrainerObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"images", "targets", NULL};
    PyObject *images_obj, *targets_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|O", keywords, &images_obj, &targets_obj))
        return NULL;
    PyArrayObject *images, *targets;
    if (ds_py_batch_arguments(images_obj, targets_obj, &images, &targets, 1) < 0)
        return NULL;
    npy_intp *d = PyArray_DIMS(images);
    PyArrayObject *pred = (PyArrayObject *)PyArray_ZEROS(3, d, NPY_FLOAT32, 0);
    ds_trainer *trainer = pred ? trainer_enter(self, 0) : NULL;
    if (!trainer) {
        Py_XDECREF(pred);
        Py_DECREF(images);
        Py_XDECREF(targets);
        return NULL;
    }
    ds_loss_value value = {0};
    ds_status rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ds_trainer_evaluate(trainer, (int)d[0], (int)d[1], (int)d[2], PyArray_DATA(images),
                             targets ? PyArray_DATA(targets) : NULL, PyArray_DATA(pred), &value);
    Py_END_ALLOW_THREADS
    PyThread_release_lock(self->lock);
    Py_DECREF(images);
    Py_XDECREF(targets);
    if (rc != DS_OK) {
        Py_DECREF(pred);
        return ds_py_raise(rc);
    }
    PyObject *loss = targets_obj == Py_None ? (Py_INCREF(Py_None), Py_None) : loss_tuple(&value);
    return Py_BuildValue("(NN)", (PyObject *)pred, loss);
}

static PyObject *Trainer_get(TrainerObject *self, PyObject *arg)
{
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name)
        return NULL;
    ds_trainer *trainer = trainer_enter(self, 0);
    if (!trainer)
        return NULL;
    const ds_param_entry *e;
    if (ds_trainer_find_tensor(trainer, name, &e) != DS_OK) {
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
        rc = ds_trainer_read_tensor(trainer, name, PyArray_DATA(out));
        Py_END_ALLOW_THREADS
    }
    PyThread_release_lock(self->lock);
    if (rc != DS_OK) {
        Py_XDECREF(out);
        return ds_py_raise(rc);
    }
    return (PyObject *)out;
}

static PyObject *Trainer_set(TrainerObject *self, PyObject *args)
{
    const char *name;
    PyObject *value_obj;
    if (!PyArg_ParseTuple(args, "sO", &name, &value_obj))
        return NULL;
    ds_trainer *trainer = trainer_enter(self, 0);
    if (!trainer)
        return NULL;
    const ds_param_entry *e;
    PyArrayObject *value = NULL;
    ds_status rc = DS_OK;
    if (ds_trainer_find_tensor(trainer, name, &e) != DS_OK) {
        PyErr_SetString(PyExc_KeyError, ds_last_error());
        goto done;
    }
    value = (PyArrayObject *)PyArray_FROM_OTF(value_obj, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    if (!value)
        goto done;
    int same = PyArray_NDIM(value) == e->ndim;
    for (int i = 0; same && i < e->ndim; i++)
        same = PyArray_DIM(value, i) == e->shape[i];
    if (!same) {
        PyErr_Format(PyExc_ValueError, "'%s': the array does not have the tensor's shape", name);
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = ds_trainer_write_tensor(trainer, name, PyArray_DATA(value));
    Py_END_ALLOW_THREADS
    if (rc != DS_OK)
        ds_py_raise(rc);
done:
    PyThread_release_lock(self->lock);
    Py_XDECREF(value);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Trainer_load(TrainerObject *self, PyObject *arg)
{
    PyObject *path;
    if (!PyUnicode_FSConverter(arg, &path))
        return NULL;
    ds_trainer *trainer = trainer_enter(self, 0);
    if (!trainer) {
        Py_DECREF(path);
        return NULL;
    }
    ds_status rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ds_trainer_load(trainer, PyBytes_AS_STRING(path));
    Py_END_ALLOW_THREADS
    PyThread_release_lock(self->lock);
    Py_DECREF(path);
    if (rc != DS_OK)
        return ds_py_raise(rc);
    Py_RETURN_NONE;
}

static PyObject *Trainer_to_network(TrainerObject *self, PyObject *unused)
{
    ds_trainer *trainer = trainer_enter(self, 0);
    if (!trainer)
        return NULL;
    ds_model *model = NULL;
    ds_status rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ds_trainer_to_model(trainer, &model);
    Py_END_ALLOW_THREADS
    PyThread_release_lock(self->lock);
    if (rc != DS_OK)
        return ds_py_raise(rc);
    NetworkObject *network = (NetworkObject *)Network_new(&NetworkType, NULL, NULL);
    if (!network) {
        ds_model_free(model);
        return NULL;
    }
    network->model = model;
    return (PyObject *)network;
}

static PyObject *Trainer_get_names(TrainerObject *self, void *closure)
{
    ds_trainer *trainer = trainer_enter(self, 1);
    if (!trainer)
        return NULL;
    int n = ds_trainer_num_tensors(trainer);
    PyObject *list = PyList_New(n);
    for (int i = 0; list && i < n; i++) {
        PyObject *name = PyUnicode_FromString(ds_trainer_tensor_entry(trainer, i)->name);
        if (!name) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, i, name);
    }
    PyThread_release_lock(self->lock);
    return list;
}

static PyObject *Trainer_get_step_count(TrainerObject *self, void *closure)
{
    ds_trainer *trainer = trainer_enter(self, 1);
    if (!trainer)
        return NULL;
    long step = ds_trainer_step_count(trainer);
    PyThread_release_lock(self->lock);
    return PyLong_FromLong(step);
}

static int Trainer_set_step_count(TrainerObject *self, PyObject *value, void *closure)
{
    long step = value ? PyLong_AsLong(value) : -1;
    if (step == -1 && (!value || PyErr_Occurred())) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "step_count must be an int");
        return -1;
    }
    lock_wait(self->lock);
    if (step >= 0 && self->trainer)
        ds_trainer_set_step_count(self->trainer, step);
    else
        PyErr_SetString(PyExc_ValueError, "step_count must be >= 0 on an initialised trainer");
    PyThread_release_lock(self->lock);
    return PyErr_Occurred() ? -1 : 0;
}

static PyObject *Trainer_get_arena_bytes(TrainerObject *self, void *closure)
{
    ds_trainer *trainer = trainer_enter(self, 1);
    if (!trainer)
        return NULL;
    size_t bytes = ds_trainer_arena_bytes(trainer);
    PyThread_release_lock(self->lock);
    return PyLong_FromSize_t(bytes);
}

static PyObject *Trainer_get_config(TrainerObject *self, void *closure)
{
    ds_trainer *trainer = trainer_enter(self, 1);
    if (!trainer)
        return NULL;
    ds_train_config c = *ds_trainer_get_config(trainer);
    PyThread_release_lock(self->lock);
    return Py_BuildValue("{s:d,s:d,s:d,s:d,s:d,s:d,s:O,s:s,s:s,s:K,s:s}", "learning_rate", (double)c.learning_rate,
                         "beta1", c.beta1, "beta2", c.beta2, "epsilon", (double)c.adam_epsilon,
                         "dropout", (double)c.dropout_rate, "bn_momentum", c.bn_momentum, "bn_bessel",
                         c.bn_bessel ? Py_True : Py_False, "bce", ds_py_bce_names[c.bce_mode], "max_term",
                         ds_py_max_names[c.max_mode], "seed", c.seed, "batch_norm", batch_norm_names[c.bn_frozen]);
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
              "normalises with the moving statistics in training too and keeps them (CPU only for now). A call that "
              "computes while another thread's runs raises RuntimeError (busy).",
    .tp_basicsize = sizeof(TrainerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Trainer_new,
    .tp_init = (initproc)Trainer_init,
    .tp_dealloc = (destructor)Trainer_dealloc,
    .tp_methods = Trainer_methods,
    .tp_getset = Trainer_getset,
};

/* ---------------------------------------------------------------- the module */

static PyObject *py_probe(PyObject *self, PyObject *unused)
{
    char description[256];
    ds_status rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ds_backend_probe(description, sizeof description);
    Py_END_ALLOW_THREADS
    if (rc != DS_OK) {
        PyErr_SetString(PyExc_RuntimeError, ds_last_error());
        return NULL;
    }
    return PyUnicode_FromString(description);
}

static PyObject *py_cpu_has_bf16(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(ds_cpu_has_bf16());
}

static PyMethodDef module_methods[] = {
    {"cpu_has_bf16", py_cpu_has_bf16, METH_NOARGS,
     "cpu_has_bf16() -> bool: whether math='bf16' can run here (the CPU backend on a CPU with bf16 instructions)."},
    {"probe", py_probe, METH_NOARGS,
     "probe() -> a one-line description of the device this module computes on; RuntimeError with the reason when it "
     "cannot run here (e.g. no GPU)."},
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
    if (ds_py_single_ops_init() < 0)
        return NULL;
    PyObject *module = PyModule_Create(&module_def);
    if (!module)
        return NULL;
    if (PyModule_AddFunctions(module, ds_py_single_op_methods) < 0 ||
        PyModule_AddFunctions(module, ds_py_detect_methods) < 0 ||
        PyModule_AddFunctions(module, ds_py_polarity_methods) < 0 || add_type(module, "Network", &NetworkType) < 0 ||
        add_type(module, "Trainer", &TrainerType) < 0 ||
        PyModule_AddStringConstant(module, "BACKEND", DS_BACKEND_NAME) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
