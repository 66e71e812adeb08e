/* model.c - the DeepSpot network: parameter arena + safetensors loading (names and shapes from the
 * layer table of network.h), and an inference plan per input shape (ops built once, activations in
 * one arena reused by lifetime), made from the same table by a planning pass: every BatchNorm that
 * directly follows a convolution is folded into that convolution's weights, and residual adds and
 * activations are fused as post-ops, so the whole network is 62 convolutions, 13 BN+ReLU,
 * 6 max-pools and one concat. */
#include "model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "network.h"
#include "ops.h"
#include "safetensors.h"

/* ---------------------------------------------------------------- parameters */

typedef struct {
    char name[96];
    int ndim;
    int shape[4];
    float **slot;
} param_entry;

#define MAX_PARAM_ENTRIES 512

typedef struct {
    param_entry entries[MAX_PARAM_ENTRIES];
    int count;
} param_table;

static void table_add(param_table *t, float **slot, int ndim, const int *shape, const char *fmt, const char *suffix,
                      const char *prefix)
{
    param_entry *e = &t->entries[t->count++];
    snprintf(e->name, sizeof e->name, fmt, prefix, suffix);
    e->ndim = ndim;
    memcpy(e->shape, shape, (size_t)ndim * sizeof(int));
    e->slot = slot;
}

static void table_conv(param_table *t, conv_params *c, const char *prefix, int out, int in, int kernel)
{
    c->out_channels = out;
    c->in_channels = in;
    c->kernel = kernel;
    int wshape[4] = {out, in, kernel, kernel}, bshape[1] = {out};
    table_add(t, &c->weight, 4, wshape, "%s.%s", "weight", prefix);
    table_add(t, &c->bias, 1, bshape, "%s.%s", "bias", prefix);
}

static void table_bn(param_table *t, bn_params *b, const char *prefix, int channels)
{
    int shape[1] = {channels};
    b->channels = channels;
    table_add(t, &b->gamma, 1, shape, "%s.%s", "gamma", prefix);
    table_add(t, &b->beta, 1, shape, "%s.%s", "beta", prefix);
    table_add(t, &b->moving_mean, 1, shape, "%s.%s", "moving_mean", prefix);
    table_add(t, &b->moving_variance, 1, shape, "%s.%s", "moving_variance", prefix);
}

/* The parameter names and shapes, in file order: those of the network's conv and bn layers (network.h). */
static void params_table(model_params *p, param_table *t)
{
    ds_network net;
    ds_network_describe(&net);
    t->count = 0;
    for (int i = 0; i < net.n_layers; i++) {
        const ds_layer *l = &net.layers[i];
        if (l->kind == DS_LAYER_CONV)
            table_conv(t, ds_layer_conv(l, p), l->name, l->out_channels, l->in_channels, l->kernel);
        else if (l->kind == DS_LAYER_BN)
            table_bn(t, ds_layer_bn(l, p), l->name, l->out_channels);
    }
}

static size_t entry_count(const param_entry *e)
{
    size_t n = 1;
    for (int i = 0; i < e->ndim; i++)
        n *= (size_t)e->shape[i];
    return n;
}

/* ---------------------------------------------------------------- inference plan */

typedef enum { STEP_CONV, STEP_BN_RELU, STEP_MAXPOOL, STEP_CONCAT } step_kind;

#define PLAN_MAX_STEPS 160
#define PLAN_MAX_TENSORS 160
#define PLAN_INPUT 0 /* tensor ids */

typedef struct {
    step_kind kind;
    ds_op *op;
    int inputs[CONCAT_MAX_INPUTS];
    int n_inputs;
    int output;
} plan_step;

typedef arena_slot plan_tensor; /* first, last: plan steps */

typedef struct {
    int first_stage, last_stage;
    int batch, height, width; /* of the first stage's input */
    unsigned long last_used;
    plan_step steps[PLAN_MAX_STEPS];
    int n_steps;
    plan_tensor tensors[PLAN_MAX_TENSORS];
    int n_tensors;
    int output;
    size_t arena_floats; /* activations, placed in the model's shared arena */
    float *fold_weight, *fold_bias; /* scratch for BN folding while building */
} plan;

typedef struct {
    int channels, height, width, id;
} act;

#define PLAN_CACHE 8

struct ds_model {
    st_file file;
    model_params params;
    float *param_arena;
    size_t n_params;
    ds_backend *backend;
    plan *plans[PLAN_CACHE];
    unsigned long clock;
    int math_mode;
    float *arena; /* backend memory: activations of whichever plan runs (plans never run concurrently) */
    size_t arena_floats;
};

static ds_status new_tensor(plan *pl, act *a, int channels, int height, int width)
{
    if (pl->n_tensors == PLAN_MAX_TENSORS)
        return ds_fail(DS_ERR_VALUE, "plan: too many tensors");
    plan_tensor *t = &pl->tensors[pl->n_tensors];
    t->floats = (size_t)pl->batch * channels * height * width;
    t->first = pl->n_steps;
    t->last = pl->n_steps;
    *a = (act){channels, height, width, pl->n_tensors++};
    return DS_OK;
}

static ds_status add_step(plan *pl, step_kind kind, ds_op *op, const act *inputs, int n_inputs, const act *output)
{
    if (pl->n_steps == PLAN_MAX_STEPS) {
        ds_op_destroy(op);
        return ds_fail(DS_ERR_VALUE, "plan: too many steps");
    }
    plan_step *s = &pl->steps[pl->n_steps];
    s->kind = kind;
    s->op = op;
    s->n_inputs = n_inputs;
    for (int i = 0; i < n_inputs; i++) {
        s->inputs[i] = inputs[i].id;
        pl->tensors[inputs[i].id].last = pl->n_steps;
    }
    s->output = output->id;
    pl->tensors[output->id].last = pl->n_steps;
    pl->n_steps++;
    return DS_OK;
}

/* TF 'same' padding: output ceil(in / stride), the odd pixel of padding goes after. */
static void same_padding(int in, int stride, int span, int *out, int *before, int *after)
{
    *out = (in + stride - 1) / stride;
    int total = (*out - 1) * stride + span - in;
    if (total < 0)
        total = 0;
    *before = total / 2;
    *after = total - *before;
}

void ds_model_conv_desc(conv_desc *d, int batch, int in_channels, int height, int width, const conv_params *c,
                        int transposed, int stride, int dilation, unsigned post)
{
    *d = (conv_desc){.transposed = transposed, .batch = batch, .in_channels = in_channels, .in_height = height,
                     .in_width = width, .out_channels = c->out_channels, .kernel = c->kernel, .stride = stride,
                     .dilation = dilation, .post = post};
    int span = (c->kernel - 1) * dilation + 1;
    if (transposed) { /* the adjoint of a 'same' convolution with this stride */
        int unused;
        d->out_height = height * stride;
        d->out_width = width * stride;
        same_padding(d->out_height, stride, span, &unused, &d->pad_before, &d->pad_after);
    } else {
        same_padding(height, stride, span, &d->out_height, &d->pad_before, &d->pad_after);
        same_padding(width, stride, span, &d->out_width, &d->pad_before, &d->pad_after);
    }
}

void ds_model_pool_shape(int height, int width, int *out_height, int *out_width, int *pad_before, int *pad_after)
{
    same_padding(height, DS_POOL_STRIDE, DS_POOL_KERNEL, out_height, pad_before, pad_after);
    same_padding(width, DS_POOL_STRIDE, DS_POOL_KERNEL, out_width, pad_before, pad_after);
}

/* Folds an inference BatchNorm that follows the convolution into its weights (bn may be NULL). */
static void fold_batchnorm(plan *pl, const conv_params *c, const bn_params *bn)
{
    size_t per_out = (size_t)c->in_channels * c->kernel * c->kernel;
    for (int o = 0; o < c->out_channels; o++) {
        double scale = 1.0, shift = 0.0;
        if (bn) {
            scale = bn->gamma[o] / sqrt((double)bn->moving_variance[o] + DS_BN_EPSILON);
            shift = bn->beta[o] - bn->moving_mean[o] * scale;
        }
        for (size_t i = 0; i < per_out; i++)
            pl->fold_weight[o * per_out + i] = (float)(c->weight[o * per_out + i] * scale);
        pl->fold_bias[o] = (float)(c->bias[o] * scale + shift);
    }
}

/* Convolution (or transposed convolution) of `in` -> *out with a following BN folded in.
 * If `accumulate` is set, *out already exists and the result is added to it. */
static ds_status plan_conv(plan *pl, ds_backend *be, const act *in, act *out, const conv_params *c,
                           const bn_params *bn, int transposed, int stride, int dilation, unsigned post)
{
    conv_desc d;
    ds_model_conv_desc(&d, pl->batch, in->channels, in->height, in->width, c, transposed, stride, dilation, post);
    if (!(post & POST_SUM))
        DS_TRY(new_tensor(pl, out, c->out_channels, d.out_height, d.out_width));
    else if (out->channels != d.out_channels || out->height != d.out_height || out->width != d.out_width)
        return ds_fail(DS_ERR_VALUE, "plan: residual shapes differ");
    fold_batchnorm(pl, c, bn);
    ds_op *op;
    DS_TRY(ds_conv_forward_create(&op, be, &d, pl->fold_weight, pl->fold_bias));
    return add_step(pl, STEP_CONV, op, in, 1, out);
}

static ds_status plan_bn_relu(plan *pl, ds_backend *be, const act *in, act *out, const bn_params *bn)
{
    ds_op *op;
    DS_TRY(new_tensor(pl, out, in->channels, in->height, in->width));
    DS_TRY(ds_batchnorm_relu_forward_create(&op, be, pl->batch, in->channels, in->height, in->width, bn->gamma,
                                            bn->beta, bn->moving_mean, bn->moving_variance, DS_BN_EPSILON));
    return add_step(pl, STEP_BN_RELU, op, in, 1, out);
}

static ds_status plan_maxpool(plan *pl, ds_backend *be, const act *in, act *out)
{
    int oh, ow, before, after;
    ds_model_pool_shape(in->height, in->width, &oh, &ow, &before, &after);
    ds_op *op;
    DS_TRY(new_tensor(pl, out, in->channels, oh, ow));
    DS_TRY(ds_maxpool_forward_create(&op, be, pl->batch, in->channels, in->height, in->width, oh, ow, DS_POOL_KERNEL,
                                     DS_POOL_STRIDE, before, after));
    return add_step(pl, STEP_MAXPOOL, op, in, 1, out);
}

static ds_status plan_concat(plan *pl, ds_backend *be, const act *acts, const int *in, int n_in, act *out)
{
    act parts[CONCAT_MAX_INPUTS];
    int channels[CONCAT_MAX_INPUTS], total = 0;
    for (int k = 0; k < n_in; k++) {
        parts[k] = acts[in[k]];
        channels[k] = parts[k].channels;
        total += channels[k];
    }
    ds_op *op;
    DS_TRY(new_tensor(pl, out, total, parts[0].height, parts[0].width));
    DS_TRY(ds_concat_forward_create(&op, be, pl->batch, out->height, out->width, n_in, channels));
    return add_step(pl, STEP_CONCAT, op, parts, n_in, out);
}

/* The plan of stages first..last, made from the network's table (network.h) by one pass that fuses
 * for inference: a BatchNorm folds into the convolution before it when it is that convolution's only
 * reader (its ReLU becoming a post-op), and a residual add into the convolution that makes its first
 * operand, which is put off until the add and then accumulates into the second operand in place.
 * A BatchNorm that follows no convolution (pre-activation) stays a BN+ReLU step. */
typedef struct {
    int conv, bn; /* layer indices of a convolution put off until its add, and of the BN folded into it (or -1) */
} deferred_conv;

static ds_status plan_network(plan *pl, model_params *p, ds_backend *be)
{
    ds_network net;
    ds_network_describe(&net);
    int readers[DS_MAX_TENSORS] = {0}, reader[DS_MAX_TENSORS], folded[DS_MAX_LAYERS] = {0};
    deferred_conv deferred[DS_MAX_TENSORS];
    act acts[DS_MAX_TENSORS];
    for (int t = 0; t < net.n_tensors; t++)
        deferred[t] = (deferred_conv){-1, -1};
    for (int i = 0; i < net.n_layers; i++) {
        const ds_layer *l = &net.layers[i];
        for (int k = 0; k < l->n_in && pl->first_stage <= l->stage && l->stage <= pl->last_stage; k++) {
            readers[l->in[k]]++;
            reader[l->in[k]] = i;
        }
    }
    int input = net.stage_input[pl->first_stage];
    DS_TRY(new_tensor(pl, &acts[input], net.channels[input], pl->height, pl->width)); /* PLAN_INPUT */
    for (int i = 0; i < net.n_layers; i++) {
        const ds_layer *l = &net.layers[i];
        if (l->stage < pl->first_stage || l->stage > pl->last_stage || folded[i])
            continue;
        switch (l->kind) {
        case DS_LAYER_CONV: {
            int bn = readers[l->out] == 1 && net.layers[reader[l->out]].kind == DS_LAYER_BN ? reader[l->out] : -1;
            int result = l->out, relu = 0;
            if (bn >= 0) {
                folded[bn] = 1;
                result = net.layers[bn].out;
                relu = net.layers[bn].relu;
            }
            const ds_layer *next = readers[result] == 1 ? &net.layers[reader[result]] : NULL;
            if (next && next->kind == DS_LAYER_ADD && next->in[0] == result && !relu) {
                deferred[result] = (deferred_conv){i, bn};
                break;
            }
            DS_TRY(plan_conv(pl, be, &acts[l->in[0]], &acts[result], ds_layer_conv(l, p),
                             bn >= 0 ? ds_layer_bn(&net.layers[bn], p) : NULL, l->transposed, l->stride, l->dilation,
                             (relu ? POST_RELU : 0) | (result == net.output ? POST_SIGMOID : 0)));
            break;
        }
        case DS_LAYER_BN:
            if (!l->relu)
                return ds_fail(DS_ERR_VALUE, "plan: %s has no convolution to fold into", l->name);
            DS_TRY(plan_bn_relu(pl, be, &acts[l->in[0]], &acts[l->out], ds_layer_bn(l, p)));
            break;
        case DS_LAYER_POOL:
            DS_TRY(plan_maxpool(pl, be, &acts[l->in[0]], &acts[l->out]));
            break;
        case DS_LAYER_CONCAT:
            DS_TRY(plan_concat(pl, be, acts, l->in, l->n_in, &acts[l->out]));
            break;
        case DS_LAYER_ADD: {
            deferred_conv d = deferred[l->in[0]];
            if (d.conv < 0 || reader[l->in[1]] != i) /* the sum is written over the second operand */
                return ds_fail(DS_ERR_VALUE, "plan: a residual add needs a convolution on its first input and to "
                               "be the last reader of its second");
            const ds_layer *c = &net.layers[d.conv];
            DS_TRY(plan_conv(pl, be, &acts[c->in[0]], &acts[l->in[1]], ds_layer_conv(c, p),
                             d.bn >= 0 ? ds_layer_bn(&net.layers[d.bn], p) : NULL, c->transposed, c->stride,
                             c->dilation, POST_SUM | (l->relu ? POST_RELU : 0)));
            acts[l->out] = acts[l->in[1]];
            break;
        }
        }
    }
    pl->output = acts[pl->last_stage == STAGE_DECODER ? net.output : net.stage_input[pl->last_stage + 1]].id;
    return DS_OK;
}

static void place_tensors(plan *pl)
{
    pl->tensors[pl->output].last = pl->n_steps; /* read back after the last step */
    pl->arena_floats = ds_arena_place(pl->tensors, pl->n_tensors);
}

static void plan_free(plan *pl)
{
    if (!pl)
        return;
    for (int i = 0; i < pl->n_steps; i++)
        ds_op_destroy(pl->steps[i].op);
    free(pl->fold_weight);
    free(pl->fold_bias);
    free(pl);
}

static ds_status plan_create(plan **out, ds_model *m, int first_stage, int last_stage, int batch, int height, int width)
{
    plan *pl = calloc(1, sizeof *pl);
    if (!pl)
        return ds_fail(DS_ERR_NOMEM, "out of memory");
    pl->first_stage = first_stage;
    pl->last_stage = last_stage;
    pl->batch = batch;
    pl->height = height;
    pl->width = width;
    size_t max_weights = 0, max_out = 0;
    param_table table;
    params_table(&m->params, &table);
    for (int i = 0; i < table.count; i++)
        if (table.entries[i].ndim == 4 && entry_count(&table.entries[i]) > max_weights)
            max_weights = entry_count(&table.entries[i]);
    max_out = 512;
    pl->fold_weight = malloc(max_weights * sizeof(float));
    pl->fold_bias = malloc(max_out * sizeof(float));
    ds_status rc = (pl->fold_weight && pl->fold_bias) ? DS_OK : ds_fail(DS_ERR_NOMEM, "out of memory");
    if (rc == DS_OK)
        rc = plan_network(pl, &m->params, m->backend);
    free(pl->fold_weight);
    free(pl->fold_bias);
    pl->fold_weight = pl->fold_bias = NULL;
    if (rc == DS_OK)
        place_tensors(pl);
    if (rc != DS_OK) {
        plan_free(pl);
        return rc;
    }
    *out = pl;
    return DS_OK;
}

static float *tensor_data(const plan *pl, float *arena, int id) { return arena + pl->tensors[id].offset; }

static ds_status plan_execute(plan *pl, float *arena)
{
    for (int i = 0; i < pl->n_steps; i++) {
        plan_step *s = &pl->steps[i];
        float *dst = tensor_data(pl, arena, s->output);
        const float *src = tensor_data(pl, arena, s->inputs[0]);
        switch (s->kind) {
        case STEP_CONV:
            DS_TRY(ds_conv_forward(s->op, src, dst));
            break;
        case STEP_BN_RELU:
            DS_TRY(ds_batchnorm_relu_forward(s->op, src, dst));
            break;
        case STEP_MAXPOOL:
            DS_TRY(ds_maxpool_forward(s->op, src, dst));
            break;
        case STEP_CONCAT: {
            const float *srcs[CONCAT_MAX_INPUTS];
            for (int k = 0; k < s->n_inputs; k++)
                srcs[k] = tensor_data(pl, arena, s->inputs[k]);
            DS_TRY(ds_concat_forward(s->op, srcs, dst));
            break;
        }
        }
    }
    return DS_OK;
}

/* ---------------------------------------------------------------- model */

/* m's parameter arena, in the layout of every parameter arena (ds_model_params_bind); n_params counts the values. */
static ds_status params_alloc(ds_model *m, const param_table *t)
{
    for (int i = 0; i < t->count; i++)
        m->n_params += entry_count(&t->entries[i]);
    m->param_arena = malloc(ds_model_param_floats() * sizeof(float));
    if (!m->param_arena)
        return ds_fail(DS_ERR_NOMEM, "out of memory");
    ds_model_params_bind(&m->params, m->param_arena);
    return DS_OK;
}

ds_status ds_model_load(ds_model **out, const char *weights_path, int math_mode)
{
    ds_model *m = calloc(1, sizeof *m);
    if (!m)
        return ds_fail(DS_ERR_NOMEM, "out of memory");
    m->math_mode = math_mode;
    ds_status rc = ds_st_read(&m->file, weights_path);
    param_table table;
    params_table(&m->params, &table);
    if (rc == DS_OK)
        rc = params_alloc(m, &table);
    for (int i = 0; i < table.count && rc == DS_OK; i++) {
        const param_entry *e = &table.entries[i];
        const st_tensor *t = ds_st_find(&m->file, e->name);
        if (!t) {
            rc = ds_fail(DS_ERR_FORMAT, "weights file '%s' lacks tensor '%s': not a DeepSpot model", weights_path,
                         e->name);
            break;
        }
        int same = t->ndim == e->ndim;
        for (int d = 0; same && d < e->ndim; d++)
            same = t->shape[d] == e->shape[d];
        if (!same) {
            char expect[64] = "", got[64] = "";
            for (int d = 0; d < e->ndim; d++)
                snprintf(expect + strlen(expect), sizeof expect - strlen(expect), "%s%d", d ? "," : "", e->shape[d]);
            for (int d = 0; d < t->ndim; d++)
                snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld", d ? "," : "", (long long)t->shape[d]);
            rc = ds_fail(DS_ERR_FORMAT, "tensor '%s' has shape [%s]; expected [%s]", e->name, got, expect);
            break;
        }
        memcpy(*e->slot, t->data, t->count * sizeof(float));
        int is_variance = strstr(e->name, "moving_variance") != NULL;
        for (size_t k = 0; k < t->count && rc == DS_OK; k++)
            if (!isfinite((*e->slot)[k]) || (is_variance && (*e->slot)[k] < 0.0f))
                rc = ds_fail(DS_ERR_FORMAT, "tensor '%s' holds %s", e->name,
                             isfinite((*e->slot)[k]) ? "a negative variance" : "NaN or Inf values");
    }
    if (rc == DS_OK && m->file.ntensors != table.count) {
        for (int i = 0; i < m->file.ntensors; i++) {
            /* a training checkpoint also holds Adam's moments of each parameter: inference ignores them */
            const char *name = m->file.tensors[i].name;
            if (strncmp(name, "adam.m.", 7) == 0 || strncmp(name, "adam.v.", 7) == 0)
                name += 7;
            int known = 0;
            for (int k = 0; k < table.count && !known; k++)
                known = strcmp(name, table.entries[k].name) == 0;
            if (!known) {
                rc = ds_fail(DS_ERR_FORMAT, "weights file '%s' has an unexpected tensor '%s'", weights_path,
                             m->file.tensors[i].name);
                break;
            }
        }
    }
    if (rc == DS_OK)
        rc = ds_backend_create(&m->backend, math_mode);
    /* The file's bytes are no longer needed once copied into the arena. */
    ds_st_free(&m->file);
    if (rc != DS_OK) {
        ds_model_free(m);
        return rc;
    }
    *out = m;
    return DS_OK;
}

void ds_model_free(ds_model *m)
{
    if (!m)
        return;
    for (int i = 0; i < PLAN_CACHE; i++)
        plan_free(m->plans[i]);
    ds_backend_free(m->backend, m->arena);
    ds_backend_destroy(m->backend);
    free(m->param_arena);
    ds_st_free(&m->file);
    free(m);
}

size_t ds_model_num_parameters(const ds_model *m) { return m->n_params; }

int ds_model_math_mode(const ds_model *m) { return m->math_mode; }

const model_params *ds_model_parameters(const ds_model *m) { return &m->params; }

static ds_status get_plan(ds_model *m, int first_stage, int last_stage, int batch, int height, int width, plan **out)
{
    int victim = 0;
    for (int i = 0; i < PLAN_CACHE; i++) {
        plan *pl = m->plans[i];
        if (pl && pl->first_stage == first_stage && pl->last_stage == last_stage && pl->batch == batch &&
            pl->height == height && pl->width == width) {
            pl->last_used = ++m->clock;
            *out = pl;
            return DS_OK;
        }
        if (!pl || (m->plans[victim] && pl->last_used < m->plans[victim]->last_used))
            victim = i;
    }
    plan_free(m->plans[victim]);
    m->plans[victim] = NULL;
    DS_TRY(plan_create(&m->plans[victim], m, first_stage, last_stage, batch, height, width));
    m->plans[victim]->last_used = ++m->clock;
    *out = m->plans[victim];
    return DS_OK;
}

ds_status ds_model_stage_shapes(int first_stage, int last_stage, int height, int width, int *in_channels,
                                int *out_channels, int *out_height, int *out_width)
{
    if (first_stage < 0 || last_stage >= DS_STAGES || first_stage > last_stage)
        return ds_fail(DS_ERR_VALUE, "stages %d..%d: expected 0 <= first <= last <= %d", first_stage, last_stage,
                       DS_STAGES - 1);
    int multiple = first_stage == STAGE_ENCODER ? DS_SIZE_MULTIPLE : 1;
    if (height < multiple || width < multiple || height % multiple || width % multiple)
        return ds_fail(DS_ERR_VALUE, "input of %dx%d; expected sides that are positive multiples of %d", height, width,
                       multiple);
    ds_network net;
    ds_network_describe(&net);
    *in_channels = net.channels[net.stage_input[first_stage]];
    *out_channels = net.channels[last_stage == STAGE_DECODER ? net.output : net.stage_input[last_stage + 1]];
    int scale_down = first_stage == STAGE_ENCODER && last_stage < STAGE_DECODER;
    int scale_up = first_stage > STAGE_ENCODER && last_stage == STAGE_DECODER;
    *out_height = scale_down ? height / DS_SIZE_MULTIPLE : scale_up ? height * DS_SIZE_MULTIPLE : height;
    *out_width = scale_down ? width / DS_SIZE_MULTIPLE : scale_up ? width * DS_SIZE_MULTIPLE : width;
    return DS_OK;
}

ds_status ds_model_forward_stages(ds_model *m, int first_stage, int last_stage, int batch, int height, int width,
                                  const float *input, float *output)
{
    int in_c, out_c, out_h, out_w;
    DS_TRY(ds_model_stage_shapes(first_stage, last_stage, height, width, &in_c, &out_c, &out_h, &out_w));
    if (batch < 1)
        return ds_fail(DS_ERR_VALUE, "batch of %d; expected >= 1", batch);
    plan *pl;
    DS_TRY(get_plan(m, first_stage, last_stage, batch, height, width, &pl));
    if (pl->arena_floats > m->arena_floats) {
        ds_backend_free(m->backend, m->arena);
        m->arena = NULL;
        m->arena_floats = 0;
        if (ds_backend_alloc(m->backend, (void **)&m->arena, pl->arena_floats * sizeof(float)) != DS_OK)
            return ds_fail(DS_ERR_NOMEM, "out of memory: %zu MiB of activations for a batch of %d at %dx%d",
                           pl->arena_floats * sizeof(float) >> 20, batch, height, width);
        m->arena_floats = pl->arena_floats;
    }
    DS_TRY(ds_backend_upload(m->backend, tensor_data(pl, m->arena, PLAN_INPUT), input,
                             (size_t)batch * height * width * in_c * sizeof(float)));
    DS_TRY(plan_execute(pl, m->arena));
    return ds_backend_download(m->backend, output, tensor_data(pl, m->arena, pl->output),
                               (size_t)batch * out_h * out_w * out_c * sizeof(float));
}

ds_status ds_model_forward(ds_model *m, int batch, int height, int width, const float *input, float *output)
{
    return ds_model_forward_stages(m, STAGE_ENCODER, STAGE_DECODER, batch, height, width, input, output);
}

/* ---------------------------------------------------------------- parameters in memory (training) */

void ds_model_param_table(model_params *p, ds_param_table *out)
{
    param_table t;
    params_table(p, &t);
    out->count = t.count;
    for (int i = 0; i < t.count; i++) {
        ds_param_entry *e = &out->entries[i];
        memcpy(e->name, t.entries[i].name, sizeof e->name);
        e->ndim = t.entries[i].ndim;
        memcpy(e->shape, t.entries[i].shape, sizeof e->shape);
        e->count = entry_count(&t.entries[i]);
        e->slot = t.entries[i].slot;
    }
}

/* Each tensor of a parameter arena starts on a multiple of this many floats (64 bytes), so that a backend
 * can hand any of them to its library directly (cuDNN reads the batch-norm parameters in place). */
#define PARAM_ALIGN_FLOATS 16

static size_t aligned_count(const param_entry *e)
{
    return (entry_count(e) + PARAM_ALIGN_FLOATS - 1) / PARAM_ALIGN_FLOATS * PARAM_ALIGN_FLOATS;
}

size_t ds_model_param_floats(void)
{
    model_params p;
    param_table t;
    params_table(&p, &t);
    size_t n = 0;
    for (int i = 0; i < t.count; i++)
        n += aligned_count(&t.entries[i]);
    return n;
}

void ds_model_params_bind(model_params *p, float *arena)
{
    param_table t;
    params_table(p, &t);
    size_t offset = 0;
    for (int i = 0; i < t.count; i++) {
        *t.entries[i].slot = arena + offset;
        offset += aligned_count(&t.entries[i]);
    }
}

ds_status ds_model_from_parameters(ds_model **out, const model_params *src, int math_mode)
{
    ds_model *m = calloc(1, sizeof *m);
    param_table *table = malloc(sizeof *table), *src_table = malloc(sizeof *src_table);
    model_params copy = *src;
    ds_status rc = DS_OK;
    if (!m || !table || !src_table) {
        rc = ds_fail(DS_ERR_NOMEM, "out of memory");
        goto done;
    }
    params_table(&m->params, table);
    params_table(&copy, src_table);
    if ((rc = params_alloc(m, table)) != DS_OK)
        goto done;
    for (int i = 0; i < table->count && rc == DS_OK; i++) {
        size_t count = entry_count(&table->entries[i]);
        const float *from = *src_table->entries[i].slot;
        memcpy(*table->entries[i].slot, from, count * sizeof(float));
        for (size_t k = 0; k < count && rc == DS_OK; k++)
            if (!isfinite(from[k]))
                rc = ds_fail(DS_ERR_VALUE, "parameter '%s' holds NaN or Inf values", table->entries[i].name);
    }
    if (rc == DS_OK) {
        m->math_mode = math_mode;
        rc = ds_backend_create(&m->backend, math_mode);
    }
done:
    free(table);
    free(src_table);
    if (rc != DS_OK) {
        ds_model_free(m);
        return rc;
    }
    *out = m;
    return DS_OK;
}
