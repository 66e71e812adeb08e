/* train.c - the DeepSpot training graph (see train.h).
 *
 * A graph is built per (batch, height, width, mode) from the network's layer table (network.h), one
 * node per layer, as a list of nodes in forward order; node i runs
 * its forward at schedule step i and its backward at step 2N-1-i. Every tensor (activation,
 * gradient of an activation, saved batch statistics, dropout mask, scratch) gets a lifetime on that
 * schedule and an offset in one arena (greedy first fit among tensors whose lifetimes overlap),
 * so an activation's memory is reused once its last backward consumer has run.
 * The inference mode of the same graph (moving statistics, no dropout) is trainer_evaluate's forward.
 * Unlike the inference plan nothing is folded: BN runs on batch statistics and its ReLU is fused;
 * dropout and residual adds are the kernels of ops.h. A tensor read by several nodes gets its
 * gradient written by the last of them (first in backward order) and accumulated by the others.
 * Parameters, their gradients, the Adam moments, the activations and the loss live in backend
 * memory (device memory on the GPU): a step is queued whole, its updates guarded on the device by
 * the loss being finite, and only the loss comes back to the host at its end. */
#include "train.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "network.h"
#include "safetensors.h"

/* ---------------------------------------------------------------- configuration */

void ds_train_config_default(ds_train_config *c)
{
    *c = (ds_train_config){.learning_rate = 1e-4f, .beta1 = 0.9, .beta2 = 0.999, .adam_epsilon = 1e-7f,
                           .dropout_rate = 0.2f, .bn_momentum = 0.99, .bn_bessel = 0,
                           .bce_mode = DS_BCE_LOGITS, .max_mode = DS_MAX_BATCH, .seed = 0};
}

static ds_status check_config(const ds_train_config *c)
{
    if (!(c->learning_rate >= 0.0f) || !(c->beta1 >= 0.0 && c->beta1 < 1.0) ||
        !(c->beta2 >= 0.0 && c->beta2 < 1.0) || !(c->adam_epsilon > 0.0f))
        return ds_fail(DS_ERR_VALUE, "Adam settings out of range (lr >= 0, 0 <= beta < 1, epsilon > 0)");
    if (!(c->dropout_rate >= 0.0f && c->dropout_rate < 1.0f))
        return ds_fail(DS_ERR_VALUE, "dropout rate %g: expected 0 <= rate < 1", c->dropout_rate);
    if (!(c->bn_momentum >= 0.0 && c->bn_momentum <= 1.0))
        return ds_fail(DS_ERR_VALUE, "batch norm momentum %g: expected 0..1", c->bn_momentum);
    if (c->bn_frozen != 0 && c->bn_frozen != 1)
        return ds_fail(DS_ERR_VALUE, "bn_frozen %d: expected 0 or 1", c->bn_frozen);
    if (c->bce_mode != DS_BCE_LOGITS && c->bce_mode != DS_BCE_CLIPPED)
        return ds_fail(DS_ERR_VALUE, "unknown cross-entropy mode %d", c->bce_mode);
    if (c->max_mode != DS_MAX_BATCH && c->max_mode != DS_MAX_PER_IMAGE && c->max_mode != DS_MAX_NONE)
        return ds_fail(DS_ERR_VALUE, "unknown max-term mode %d", c->max_mode);
    return DS_OK;
}

/* ---------------------------------------------------------------- graph */

typedef enum { N_CONV, N_BN, N_POOL, N_CONCAT, N_DROP_ADD, N_LOSS } node_kind;

#define G_MAX_NODES 192
#define G_MAX_TENSORS 640
#define G_MAX_CONSUMERS 4
#define GRAPH_CACHE 4

typedef struct {
    int c, h, w;
    size_t floats;
    int first, last;
    size_t offset;
    int n_consumers;
    int consumer[G_MAX_CONSUMERS]; /* node ids, in forward order */
    int grad;                      /* gradient tensor id, or -1 */
} tensor;

typedef struct {
    node_kind kind;
    ds_train_op *op;
    ds_op *concat;
    int in[CONCAT_MAX_INPUTS], n_in, out;
    int acc[CONCAT_MAX_INPUTS]; /* the backward adds into d(in[k]) instead of writing it */
    int scratch;                /* where an accumulated oneDNN gradient is written first, or -1 */
    int mean, var, mask;        /* saved batch statistics / dropout mask, or -1 */
    int pred;                   /* the loss node in inference mode: the sigmoid map, or -1 */
    conv_params *cp, *cg;
    bn_params *bp, *bg;
    int relu, need_dsrc;
} node;

typedef struct {
    int batch, height, width, training, bn_frozen;
    unsigned long last_used;
    node nodes[G_MAX_NODES];
    int n_nodes;
    tensor tensors[G_MAX_TENSORS];
    int n_tensors;
    int input, target, logits;
    size_t arena_floats;
} graph;

struct ds_trainer {
    ds_backend *backend;
    ds_train_config cfg;
    model_params params, grads, m, v;
    float *mem[4]; /* params, grads, m, v: one arena each, same layout, backend memory */
    double *loss_terms; /* backend memory: DS_LOSS_TERMS values of the last forward */
    ds_param_table *table[4];
    size_t n_floats;
    int trainable[DS_MAX_PARAM_ENTRIES]; /* table indices that Adam updates (not the moving statistics) */
    int n_trainable;
    long step;
    graph *graphs[GRAPH_CACHE];
    unsigned long clock;
    float *arena; /* backend memory */
    size_t arena_floats;
};

static ds_status new_tensor(graph *g, int *id, int c, int h, int w)
{
    if (g->n_tensors == G_MAX_TENSORS)
        return ds_fail(DS_ERR_VALUE, "training graph: too many tensors");
    tensor *t = &g->tensors[g->n_tensors];
    memset(t, 0, sizeof *t);
    t->c = c;
    t->h = h;
    t->w = w;
    t->floats = (size_t)g->batch * c * h * w;
    t->first = t->last = -1;
    t->grad = -1;
    *id = g->n_tensors++;
    return DS_OK;
}

static ds_status new_node(graph *g, node **out, node_kind kind, const int *in, int n_in)
{
    if (g->n_nodes == G_MAX_NODES)
        return ds_fail(DS_ERR_VALUE, "training graph: too many nodes");
    int id = g->n_nodes;
    node *n = &g->nodes[id];
    memset(n, 0, sizeof *n);
    n->kind = kind;
    n->n_in = n_in;
    n->out = n->scratch = n->mean = n->var = n->mask = n->pred = -1;
    for (int k = 0; k < n_in; k++) {
        tensor *t = &g->tensors[in[k]];
        if (t->n_consumers == G_MAX_CONSUMERS)
            return ds_fail(DS_ERR_VALUE, "training graph: too many consumers");
        t->consumer[t->n_consumers++] = id;
        n->in[k] = in[k];
    }
    g->n_nodes++;
    *out = n;
    return DS_OK;
}

static ds_status g_conv(graph *g, ds_backend *be, int in, int *out, conv_params *cp, conv_params *cg, int transposed,
                        int stride, int dilation, int need_dsrc)
{
    const tensor *x = &g->tensors[in];
    conv_desc d;
    ds_model_conv_desc(&d, g->batch, x->c, x->h, x->w, cp, transposed, stride, dilation, 0);
    if (cp->in_channels != x->c)
        return ds_fail(DS_ERR_VALUE, "training graph: channel mismatch");
    node *n;
    DS_TRY(new_node(g, &n, N_CONV, &in, 1));
    n->cp = cp;
    n->cg = cg;
    n->need_dsrc = need_dsrc && g->training;
    DS_TRY(new_tensor(g, &n->out, d.out_channels, d.out_height, d.out_width));
    *out = n->out;
    return ds_conv_train_create(&n->op, be, &d, n->need_dsrc);
}

static ds_status g_bn(graph *g, ds_backend *be, int in, int *out, bn_params *bp, bn_params *bg, int relu)
{
    const tensor x = g->tensors[in];
    node *n;
    DS_TRY(new_node(g, &n, N_BN, &in, 1));
    n->bp = bp;
    n->bg = bg;
    n->relu = relu;
    DS_TRY(new_tensor(g, &n->out, x.c, x.h, x.w));
    int frozen = g->training && g->bn_frozen;
    if (g->training && !frozen) {
        int saved_batch = g->batch;
        g->batch = 1; /* statistics: [channels] */
        ds_status rc = new_tensor(g, &n->mean, x.c, 1, 1);
        if (rc == DS_OK)
            rc = new_tensor(g, &n->var, x.c, 1, 1);
        g->batch = saved_batch;
        DS_TRY(rc);
    }
    *out = n->out;
    return ds_batchnorm_train_create(&n->op, be, g->batch, x.c, x.h, x.w, DS_BN_EPSILON, relu,
                                     !g->training ? DS_BN_INFERENCE : frozen ? DS_BN_FROZEN : DS_BN_BATCH_STATISTICS);
}

static ds_status g_pool(graph *g, ds_backend *be, int in, int *out)
{
    const tensor x = g->tensors[in];
    int oh, ow, before, after;
    ds_model_pool_shape(x.h, x.w, &oh, &ow, &before, &after);
    node *n;
    DS_TRY(new_node(g, &n, N_POOL, &in, 1));
    DS_TRY(new_tensor(g, &n->out, x.c, oh, ow));
    *out = n->out;
    return ds_maxpool_train_create(&n->op, be, g->batch, x.c, x.h, x.w, oh, ow, DS_POOL_KERNEL, DS_POOL_STRIDE, before,
                                   after);
}

static ds_status g_concat(graph *g, ds_backend *be, const int *in, int n_in, int *out)
{
    int channels[CONCAT_MAX_INPUTS], total = 0;
    for (int k = 0; k < n_in; k++) {
        channels[k] = g->tensors[in[k]].c;
        total += channels[k];
    }
    const tensor x = g->tensors[in[0]];
    node *n;
    DS_TRY(new_node(g, &n, N_CONCAT, in, n_in));
    DS_TRY(new_tensor(g, &n->out, total, x.h, x.w));
    *out = n->out;
    return ds_concat_forward_create(&n->concat, be, g->batch, x.h, x.w, n_in, channels);
}

/* out = [relu](dropout(a) + b) */
static ds_status g_drop_add(graph *g, int a, int b, int *out, int relu)
{
    const tensor x = g->tensors[a], y = g->tensors[b];
    if (x.c != y.c || x.h != y.h || x.w != y.w)
        return ds_fail(DS_ERR_VALUE, "training graph: residual shapes differ");
    int in[2] = {a, b};
    node *n;
    DS_TRY(new_node(g, &n, N_DROP_ADD, in, 2));
    n->relu = relu;
    DS_TRY(new_tensor(g, &n->out, x.c, x.h, x.w));
    if (g->training) {
        int saved_batch = g->batch;
        g->batch = 1; /* mask: [batch, channels] */
        ds_status rc = new_tensor(g, &n->mask, saved_batch * x.c, 1, 1);
        g->batch = saved_batch;
        DS_TRY(rc);
    }
    *out = n->out;
    return DS_OK;
}

/* The training graph of the network's table (network.h), layer by layer, nothing folded. */
static ds_status build_network(graph *g, ds_trainer *tr)
{
    ds_backend *be = tr->backend;
    ds_network net;
    ds_network_describe(&net);
    int id[DS_MAX_TENSORS]; /* the graph tensor of each table tensor */
    int image = net.stage_input[STAGE_ENCODER];
    DS_TRY(new_tensor(g, &g->input, 1, g->height, g->width));
    DS_TRY(new_tensor(g, &g->target, 1, g->height, g->width));
    id[image] = g->input;
    for (int i = 0; i < net.n_layers; i++) {
        const ds_layer *l = &net.layers[i];
        int in[CONCAT_MAX_INPUTS];
        for (int k = 0; k < l->n_in; k++)
            in[k] = id[l->in[k]];
        switch (l->kind) {
        case DS_LAYER_CONV: /* no data gradient for the image */
            DS_TRY(g_conv(g, be, in[0], &id[l->out], ds_layer_conv(l, &tr->params), ds_layer_conv(l, &tr->grads),
                          l->transposed, l->stride, l->dilation, l->in[0] != image));
            break;
        case DS_LAYER_BN:
            DS_TRY(g_bn(g, be, in[0], &id[l->out], ds_layer_bn(l, &tr->params), ds_layer_bn(l, &tr->grads), l->relu));
            break;
        case DS_LAYER_POOL:
            DS_TRY(g_pool(g, be, in[0], &id[l->out]));
            break;
        case DS_LAYER_CONCAT:
            DS_TRY(g_concat(g, be, in, l->n_in, &id[l->out]));
            break;
        case DS_LAYER_ADD:
            DS_TRY(g_drop_add(g, in[0], in[1], &id[l->out], l->relu));
            break;
        }
    }
    g->logits = id[net.output];
    int in[2] = {g->logits, g->target};
    node *n;
    DS_TRY(new_node(g, &n, N_LOSS, in, 2));
    return g->training ? DS_OK : new_tensor(g, &n->pred, 1, g->height, g->width);
}

/* Lifetimes on the schedule (forward i at step i, backward at 2N-1-i), gradient and scratch
 * tensors, accumulation flags. */
static ds_status plan_lifetimes(graph *g)
{
    int N = g->n_nodes;
#define BWD(i) (2 * N - 1 - (i))
    int n_activations = g->n_tensors;
    for (int i = 0; i < N; i++) {
        node *n = &g->nodes[i];
        if (n->out >= 0)
            g->tensors[n->out].first = i;
        if (n->mean >= 0) {
            g->tensors[n->mean].first = g->tensors[n->var].first = i;
            g->tensors[n->mean].last = g->tensors[n->var].last = BWD(i);
        }
        if (n->mask >= 0) {
            g->tensors[n->mask].first = i;
            g->tensors[n->mask].last = BWD(i);
        }
        if (n->pred >= 0) {
            g->tensors[n->pred].first = i;
            g->tensors[n->pred].last = BWD(i);
        }
    }
    g->tensors[g->input].first = g->tensors[g->target].first = 0;
    for (int id = 0; id < n_activations; id++) {
        tensor *t = &g->tensors[id];
        for (int k = 0; k < t->n_consumers; k++) {
            int j = t->consumer[k];
            if (j > t->last)
                t->last = j;
            /* backward reads: a convolution's and a batch norm's source, an add+ReLU's output */
            if (g->training && (g->nodes[j].kind == N_CONV || g->nodes[j].kind == N_BN) && BWD(j) > t->last)
                t->last = BWD(j);
        }
        if (t->first < 0)
            t->first = 0;
    }
    if (g->training) {
        for (int i = 0; i < N; i++) {
            node *n = &g->nodes[i];
            if (n->kind == N_DROP_ADD && n->relu)
                g->tensors[n->out].last = BWD(i);
        }
        /* gradients of every activation except the input and the target */
        for (int id = 0; id < n_activations; id++) {
            tensor *t = &g->tensors[id];
            /* (saved statistics and masks have no consumers) */
            if (id == g->input || id == g->target || t->n_consumers == 0)
                continue;
            int producer = t->first, last_consumer = t->consumer[t->n_consumers - 1];
            DS_TRY(new_tensor(g, &t->grad, t->c, t->h, t->w));
            tensor *gt = &g->tensors[t->grad];
            gt->first = id == g->logits ? last_consumer : BWD(last_consumer);
            gt->last = BWD(producer);
            /* every consumer but the last accumulates */
            for (int k = 0; k < t->n_consumers - 1; k++) {
                node *c = &g->nodes[t->consumer[k]];
                for (int s = 0; s < c->n_in; s++)
                    if (c->in[s] == id)
                        c->acc[s] = 1;
                if (c->kind == N_CONV || c->kind == N_BN || c->kind == N_POOL) {
                    DS_TRY(new_tensor(g, &c->scratch, t->c, t->h, t->w));
                    g->tensors[c->scratch].first = g->tensors[c->scratch].last = BWD(t->consumer[k]);
                } else if (c->kind == N_CONCAT) {
                    return ds_fail(DS_ERR_VALUE, "training graph: a concat input with several consumers");
                }
            }
        }
    }
    g->tensors[g->input].last = g->tensors[g->target].last = g->training ? 2 * N : N;
    g->tensors[g->logits].last = g->training ? g->tensors[g->logits].last : N;
#undef BWD
    return DS_OK;
}

/* The graph's tensors placed by lifetime (arena.h). */
static void place_tensors(graph *g)
{
    arena_slot slots[G_MAX_TENSORS];
    for (int i = 0; i < g->n_tensors; i++)
        slots[i] = (arena_slot){g->tensors[i].floats, g->tensors[i].first, g->tensors[i].last, 0};
    g->arena_floats = ds_arena_place(slots, g->n_tensors);
    for (int i = 0; i < g->n_tensors; i++)
        g->tensors[i].offset = slots[i].offset;
}

static void graph_free(graph *g)
{
    if (!g)
        return;
    for (int i = 0; i < g->n_nodes; i++) {
        ds_train_op_destroy(g->nodes[i].op);
        ds_op_destroy(g->nodes[i].concat);
    }
    free(g);
}

static ds_status graph_create(graph **out, ds_trainer *tr, int batch, int height, int width, int training)
{
    graph *g = calloc(1, sizeof *g);
    if (!g)
        return ds_fail(DS_ERR_NOMEM, "out of memory");
    g->batch = batch;
    g->height = height;
    g->width = width;
    g->training = training;
    g->bn_frozen = tr->cfg.bn_frozen;
    ds_status rc = build_network(g, tr);
    if (rc == DS_OK)
        rc = plan_lifetimes(g);
    if (rc != DS_OK) {
        graph_free(g);
        return rc;
    }
    place_tensors(g);
    *out = g;
    return DS_OK;
}

static ds_status get_graph(ds_trainer *tr, int batch, int height, int width, int training, graph **out)
{
    if (batch < 1)
        return ds_fail(DS_ERR_VALUE, "batch of %d; expected >= 1", batch);
    if (height < DS_SIZE_MULTIPLE || width < DS_SIZE_MULTIPLE || height % DS_SIZE_MULTIPLE ||
        width % DS_SIZE_MULTIPLE)
        return ds_fail(DS_ERR_VALUE, "input of %dx%d; expected sides that are positive multiples of %d", height,
                       width, DS_SIZE_MULTIPLE);
    int victim = 0;
    for (int i = 0; i < GRAPH_CACHE; i++) {
        graph *g = tr->graphs[i];
        if (g && g->batch == batch && g->height == height && g->width == width && g->training == training) {
            g->last_used = ++tr->clock;
            *out = g;
            return DS_OK;
        }
        if (!g || (tr->graphs[victim] && g->last_used < tr->graphs[victim]->last_used))
            victim = i;
    }
    graph_free(tr->graphs[victim]);
    tr->graphs[victim] = NULL;
    graph *g = NULL;
    DS_TRY(graph_create(&g, tr, batch, height, width, training));
    if (g->arena_floats > tr->arena_floats) {
        ds_backend_free(tr->backend, tr->arena);
        tr->arena = NULL;
        tr->arena_floats = 0;
        if (ds_backend_alloc(tr->backend, (void **)&tr->arena, g->arena_floats * sizeof(float)) != DS_OK) {
            size_t mib = g->arena_floats * sizeof(float) >> 20;
            graph_free(g);
            return ds_fail(DS_ERR_NOMEM, "out of memory: %zu MiB of activations to train on a batch of %d at %dx%d",
                           mib, batch, height, width);
        }
        tr->arena_floats = g->arena_floats;
    }
    g->last_used = ++tr->clock;
    tr->graphs[victim] = g;
    *out = g;
    return DS_OK;
}

/* ---------------------------------------------------------------- execution */

#define T(id) (tr->arena + g->tensors[id].offset)

/* Queues the whole forward; the loss terms stay in tr->loss_terms (backend memory). */
static ds_status forward(ds_trainer *tr, graph *g)
{
    ds_backend *be = tr->backend;
    for (int i = 0; i < g->n_nodes; i++) {
        node *n = &g->nodes[i];
        switch (n->kind) {
        case N_CONV:
            DS_TRY(ds_conv_train_forward(n->op, T(n->out), T(n->in[0]), n->cp->weight, n->cp->bias));
            break;
        case N_BN:
            if (n->mean >= 0) { /* training on the batch statistics */
                DS_TRY(ds_batchnorm_train_forward(n->op, T(n->out), T(n->mean), T(n->var), T(n->in[0]), n->bp->gamma,
                                                  n->bp->beta));
            } else {
                DS_TRY(ds_batchnorm_train_forward(n->op, T(n->out), n->bp->moving_mean, n->bp->moving_variance,
                                                  T(n->in[0]), n->bp->gamma, n->bp->beta));
            }
            break;
        case N_POOL:
            DS_TRY(ds_maxpool_train_forward(n->op, T(n->out), T(n->in[0])));
            break;
        case N_CONCAT: {
            const float *srcs[CONCAT_MAX_INPUTS];
            for (int k = 0; k < n->n_in; k++)
                srcs[k] = T(n->in[k]);
            DS_TRY(ds_concat_forward(n->concat, srcs, T(n->out)));
            break;
        }
        case N_DROP_ADD: {
            const tensor *x = &g->tensors[n->out];
            size_t pixels = (size_t)x->h * x->w;
            if (g->training && tr->cfg.dropout_rate > 0.0f) {
                DS_TRY(ds_dropout_mask(be, T(n->mask), g->batch, x->c, tr->cfg.dropout_rate, tr->cfg.seed,
                                       (unsigned long long)tr->step * 1024u + (unsigned)i));
                DS_TRY(ds_spatial_dropout_forward(be, T(n->out), T(n->in[0]), T(n->mask), g->batch, pixels, x->c));
                DS_TRY(ds_add_inplace(be, T(n->out), T(n->in[1]), x->floats));
            } else {
                if (g->training)
                    DS_TRY(ds_dropout_mask(be, T(n->mask), g->batch, x->c, 0.0f, 0, 0));
                DS_TRY(ds_add_forward(be, T(n->out), T(n->in[0]), T(n->in[1]), x->floats));
            }
            if (n->relu)
                DS_TRY(ds_relu_inplace(be, T(n->out), x->floats));
            break;
        }
        case N_LOSS: {
            const tensor *z = &g->tensors[n->in[0]];
            DS_TRY(ds_deepspot_loss(be, tr->loss_terms, n->pred >= 0 ? T(n->pred) : NULL,
                                    g->training ? T(z->grad) : NULL, T(n->in[0]), T(n->in[1]), g->batch,
                                    (size_t)z->h * z->w, tr->cfg.bce_mode, tr->cfg.max_mode));
            break;
        }
        }
    }
    return DS_OK;
}

/* Keras updates the moving statistics in the forward; here only if the loss is finite (guarded on the
 * backend; the batch statistics stay saved until each node's backward). */
static ds_status commit_moving_statistics(ds_trainer *tr, graph *g)
{
    for (int i = 0; i < g->n_nodes; i++) {
        const node *n = &g->nodes[i];
        if (n->kind != N_BN || n->mean < 0) /* a frozen batch norm keeps its statistics */
            continue;
        const tensor *x = &g->tensors[n->in[0]];
        double count = (double)g->batch * x->h * x->w;
        float correction = tr->cfg.bn_bessel && count > 1.0 ? (float)(count / (count - 1.0)) : 1.0f;
        DS_TRY(ds_moving_statistics_update(tr->backend, n->bp->moving_mean, n->bp->moving_variance, T(n->mean),
                                           T(n->var), n->bp->channels, tr->cfg.bn_momentum, correction,
                                           tr->loss_terms));
    }
    return DS_OK;
}

/* Where node n writes d(in[k]): the gradient itself, or its scratch when it must accumulate. */
static float *grad_target(ds_trainer *tr, graph *g, node *n, int k)
{
    return n->acc[k] ? T(n->scratch) : T(g->tensors[n->in[k]].grad);
}

static ds_status backward(ds_trainer *tr, graph *g)
{
    ds_backend *be = tr->backend;
    for (int i = g->n_nodes - 1; i >= 0; i--) {
        node *n = &g->nodes[i];
        const tensor *in0 = &g->tensors[n->in[0]];
        float *dout = n->out >= 0 ? T(g->tensors[n->out].grad) : NULL;
        switch (n->kind) {
        case N_LOSS:
            break; /* the loss wrote d(logits) in its forward */
        case N_CONV:
            DS_TRY(ds_conv_backward(n->op, n->need_dsrc ? grad_target(tr, g, n, 0) : NULL, n->cg->weight, n->cg->bias,
                                    dout, T(n->in[0])));
            if (n->need_dsrc && n->acc[0])
                DS_TRY(ds_add_inplace(be, T(in0->grad), T(n->scratch), in0->floats));
            break;
        case N_BN:
            DS_TRY(ds_batchnorm_backward(n->op, grad_target(tr, g, n, 0), n->bg->gamma, n->bg->beta, dout, T(n->in[0]),
                                         n->mean >= 0 ? T(n->mean) : n->bp->moving_mean,
                                         n->mean >= 0 ? T(n->var) : n->bp->moving_variance, n->bp->gamma, n->bp->beta));
            if (n->acc[0])
                DS_TRY(ds_add_inplace(be, T(in0->grad), T(n->scratch), in0->floats));
            break;
        case N_POOL:
            DS_TRY(ds_maxpool_backward(n->op, grad_target(tr, g, n, 0), dout));
            if (n->acc[0])
                DS_TRY(ds_add_inplace(be, T(in0->grad), T(n->scratch), in0->floats));
            break;
        case N_CONCAT: {
            float *dsrcs[CONCAT_MAX_INPUTS];
            int channels[CONCAT_MAX_INPUTS];
            for (int k = 0; k < n->n_in; k++) {
                dsrcs[k] = T(g->tensors[n->in[k]].grad);
                channels[k] = g->tensors[n->in[k]].c;
            }
            DS_TRY(ds_concat_backward(be, dsrcs, dout, (size_t)g->batch * in0->h * in0->w, n->n_in, channels));
            break;
        }
        case N_DROP_ADD: {
            const tensor *y = &g->tensors[n->out], *b = &g->tensors[n->in[1]];
            size_t count = y->floats;
            if (n->acc[0])
                return ds_fail(DS_ERR_VALUE, "training graph: a dropout input with several consumers");
            if (n->relu)
                DS_TRY(ds_relu_backward(be, dout, dout, T(n->out), count, 0));
            /* d(b) = dout; d(a) = dout * mask */
            if (n->acc[1])
                DS_TRY(ds_add_inplace(be, T(b->grad), dout, count));
            else
                DS_TRY(ds_backend_copy(be, T(b->grad), dout, count * sizeof(float)));
            DS_TRY(ds_spatial_dropout_backward(be, T(in0->grad), dout, T(n->mask), g->batch, (size_t)y->h * y->w,
                                               y->c));
            break;
        }
        }
    }
    return DS_OK;
}

/* images and targets (NULL: zeros, when no loss is wanted) from the host into the graph's inputs. */
static ds_status copy_inputs(ds_trainer *tr, graph *g, const float *images, const float *targets)
{
    size_t bytes = (size_t)g->batch * g->height * g->width * sizeof(float);
    DS_TRY(ds_backend_upload(tr->backend, T(g->input), images, bytes));
    return targets ? ds_backend_upload(tr->backend, T(g->target), targets, bytes)
                   : ds_backend_zero(tr->backend, T(g->target), bytes);
}

/* Waits for the queued step and brings its loss to the host. */
static ds_status read_loss(ds_trainer *tr, ds_loss_value *value)
{
    double terms[DS_LOSS_TERMS];
    DS_TRY(ds_backend_download(tr->backend, terms, tr->loss_terms, sizeof terms));
    *value = (ds_loss_value){terms[0], terms[1], terms[2]};
    return DS_OK;
}

#undef T

static ds_status check_finite(const float *a, size_t n, const char *what)
{
    int finite = 1;
    for (size_t i = 0; i < n; i++)
        finite &= isfinite(a[i]);
    return finite ? DS_OK : ds_fail(DS_ERR_VALUE, "%s: expected finite values, found NaN or Inf", what);
}

static ds_status check_step_inputs(const float *images, const float *targets, size_t n)
{
    if (!images || !targets)
        return ds_fail(DS_ERR_VALUE, "images and targets are required");
    DS_TRY(check_finite(images, n, "the images"));
    return check_finite(targets, n, "the targets");
}

/* The part every training call shares: checked inputs, the graph for this shape, the forward in
 * training mode (batch statistics, dropout) and its loss, the moving statistics if asked (before the
 * backward reuses the memory of the batch statistics), and the backward. */
static ds_status training_pass(ds_trainer *tr, int batch, int height, int width, const float *images,
                               const float *targets, int update_statistics)
{
    size_t n = (size_t)(batch > 0 ? batch : 0) * (height > 0 ? height : 0) * (width > 0 ? width : 0);
    graph *g = NULL;
    DS_TRY(check_step_inputs(images, targets, n));
    DS_TRY(get_graph(tr, batch, height, width, 1, &g));
    DS_TRY(copy_inputs(tr, g, images, targets));
    DS_TRY(forward(tr, g));
    if (update_statistics)
        DS_TRY(commit_moving_statistics(tr, g));
    return backward(tr, g);
}

ds_status ds_trainer_compute_gradients(ds_trainer *tr, int batch, int height, int width, const float *images,
                                       const float *targets, ds_loss_value *loss)
{
    ds_loss_value value;
    DS_TRY(training_pass(tr, batch, height, width, images, targets, 0));
    DS_TRY(read_loss(tr, &value));
    if (!isfinite(value.loss))
        return ds_fail(DS_ERR_VALUE, "the loss is not finite (%g)", value.loss);
    if (loss)
        *loss = value;
    return DS_OK;
}

ds_status ds_trainer_step(ds_trainer *tr, int batch, int height, int width, const float *images, const float *targets,
                          ds_loss_value *loss)
{
    ds_loss_value value;
    DS_TRY(training_pass(tr, batch, height, width, images, targets, 1));
    long step = tr->step + 1;
    for (int k = 0; k < tr->n_trainable; k++) {
        const ds_param_entry *e = &tr->table[0]->entries[tr->trainable[k]];
        size_t offset = (size_t)(*e->slot - tr->mem[0]);
        DS_TRY(ds_adam_update(tr->backend, tr->mem[0] + offset, tr->mem[2] + offset, tr->mem[3] + offset,
                              tr->mem[1] + offset, e->count, tr->cfg.learning_rate, tr->cfg.beta1, tr->cfg.beta2,
                              tr->cfg.adam_epsilon, step, tr->loss_terms));
    }
    DS_TRY(read_loss(tr, &value));
    if (!isfinite(value.loss))
        return ds_fail(DS_ERR_VALUE, "the loss is not finite (%g): no update made", value.loss);
    tr->step = step;
    if (loss)
        *loss = value;
    return DS_OK;
}

ds_status ds_trainer_evaluate(ds_trainer *tr, int batch, int height, int width, const float *images,
                              const float *targets, float *pred, ds_loss_value *loss)
{
    if (!images)
        return ds_fail(DS_ERR_VALUE, "images are required");
    size_t n = (size_t)(batch > 0 ? batch : 0) * (height > 0 ? height : 0) * (width > 0 ? width : 0);
    DS_TRY(check_finite(images, n, "the images"));
    if (targets)
        DS_TRY(check_finite(targets, n, "the targets"));
    graph *g = NULL;
    DS_TRY(get_graph(tr, batch, height, width, 0, &g));
    DS_TRY(copy_inputs(tr, g, images, targets));
    DS_TRY(forward(tr, g));
    const node *loss_node = &g->nodes[g->n_nodes - 1];
    if (pred)
        DS_TRY(ds_backend_download(tr->backend, pred, tr->arena + g->tensors[loss_node->pred].offset,
                                   n * sizeof(float)));
    ds_loss_value value = {0, 0, 0};
    if (targets)
        DS_TRY(read_loss(tr, &value));
    else
        DS_TRY(ds_backend_synchronize(tr->backend));
    if (loss)
        *loss = value;
    return DS_OK;
}

/* ---------------------------------------------------------------- trainer */

ds_status ds_trainer_create(ds_trainer **out, const model_params *init, const ds_train_config *config)
{
    ds_train_config cfg;
    if (config)
        cfg = *config;
    else
        ds_train_config_default(&cfg);
    DS_TRY(check_config(&cfg));
    ds_trainer *tr = calloc(1, sizeof *tr);
    if (!tr)
        return ds_fail(DS_ERR_NOMEM, "out of memory");
    tr->cfg = cfg;
    tr->n_floats = ds_model_param_floats();
    ds_status rc = ds_backend_create(&tr->backend, cfg.math_mode);
    if (rc == DS_OK)
        rc = ds_backend_alloc(tr->backend, (void **)&tr->loss_terms, DS_LOSS_TERMS * sizeof(double));
    model_params *sets[4] = {&tr->params, &tr->grads, &tr->m, &tr->v};
    for (int k = 0; k < 4 && rc == DS_OK; k++) {
        tr->table[k] = malloc(sizeof(ds_param_table));
        rc = tr->table[k] ? ds_backend_alloc(tr->backend, (void **)&tr->mem[k], tr->n_floats * sizeof(float))
                          : ds_fail(DS_ERR_NOMEM, "out of memory");
        if (rc != DS_OK)
            break;
        ds_model_params_bind(sets[k], tr->mem[k]);
        ds_model_param_table(sets[k], tr->table[k]);
    }
    if (rc == DS_OK) {
        model_params copy = *init;
        ds_param_table *src = malloc(sizeof *src);
        if (!src)
            rc = ds_fail(DS_ERR_NOMEM, "out of memory");
        else {
            ds_model_param_table(&copy, src);
            for (int i = 0; i < src->count && rc == DS_OK; i++) {
                const ds_param_entry *e = &tr->table[0]->entries[i];
                const float *from = *src->entries[i].slot;
                if (!from) {
                    rc = ds_fail(DS_ERR_VALUE, "initial parameter '%s' is missing", e->name);
                    break;
                }
                rc = check_finite(from, e->count, e->name);
                if (rc == DS_OK)
                    rc = ds_backend_upload(tr->backend, *e->slot, from, e->count * sizeof(float));
                if (!strstr(e->name, ".moving_"))
                    tr->trainable[tr->n_trainable++] = i;
            }
            free(src);
        }
    }
    if (rc != DS_OK) {
        ds_trainer_free(tr);
        return rc;
    }
    *out = tr;
    return DS_OK;
}

void ds_trainer_free(ds_trainer *tr)
{
    if (!tr)
        return;
    for (int i = 0; i < GRAPH_CACHE; i++)
        graph_free(tr->graphs[i]);
    for (int k = 0; k < 4; k++) {
        ds_backend_free(tr->backend, tr->mem[k]);
        free(tr->table[k]);
    }
    ds_backend_free(tr->backend, tr->arena);
    ds_backend_free(tr->backend, tr->loss_terms);
    ds_backend_destroy(tr->backend);
    free(tr);
}

const ds_train_config *ds_trainer_get_config(const ds_trainer *tr) { return &tr->cfg; }

ds_status ds_trainer_set_config(ds_trainer *tr, const ds_train_config *config)
{
    DS_TRY(check_config(config));
    if (config->math_mode != tr->cfg.math_mode)
        return ds_fail(DS_ERR_VALUE, "the math mode is fixed when the trainer is created");
    if (config->bn_frozen != tr->cfg.bn_frozen)
        return ds_fail(DS_ERR_VALUE, "frozen or batch-statistics batch norm is fixed when the trainer is created");
    tr->cfg = *config;
    return DS_OK;
}

long ds_trainer_step_count(const ds_trainer *tr) { return tr->step; }
void ds_trainer_set_step_count(ds_trainer *tr, long step) { tr->step = step < 0 ? 0 : step; }
int ds_trainer_num_tensors(const ds_trainer *tr) { return tr->table[0]->count; }

const ds_param_entry *ds_trainer_tensor_entry(const ds_trainer *tr, int index)
{
    return index >= 0 && index < tr->table[0]->count ? &tr->table[0]->entries[index] : NULL;
}

size_t ds_trainer_arena_bytes(const ds_trainer *tr) { return tr->arena_floats * sizeof(float); }

/* The backend memory of a tensor by name (see ds_trainer_find_tensor). */
static ds_status tensor_by_name(const ds_trainer *tr, const char *name, float **data, const ds_param_entry **entry)
{
    static const char *prefixes[4] = {"", "grad.", "adam.m.", "adam.v."};
    for (int k = 3; k >= 0; k--) {
        size_t len = strlen(prefixes[k]);
        if (strncmp(name, prefixes[k], len) != 0)
            continue;
        const ds_param_table *t = tr->table[k];
        for (int i = 0; i < t->count; i++)
            if (strcmp(t->entries[i].name, name + len) == 0) {
                *data = *t->entries[i].slot;
                *entry = &tr->table[0]->entries[i];
                return DS_OK;
            }
        break;
    }
    return ds_fail(DS_ERR_VALUE, "the trainer has no tensor '%s'", name);
}

ds_status ds_trainer_find_tensor(const ds_trainer *tr, const char *name, const ds_param_entry **entry)
{
    float *unused;
    return tensor_by_name(tr, name, &unused, entry);
}

ds_status ds_trainer_read_tensor(ds_trainer *tr, const char *name, float *host)
{
    float *data;
    const ds_param_entry *e;
    DS_TRY(tensor_by_name(tr, name, &data, &e));
    return ds_backend_download(tr->backend, host, data, e->count * sizeof(float));
}

ds_status ds_trainer_write_tensor(ds_trainer *tr, const char *name, const float *host)
{
    float *data;
    const ds_param_entry *e;
    DS_TRY(tensor_by_name(tr, name, &data, &e));
    DS_TRY(check_finite(host, e->count, name));
    return ds_backend_upload(tr->backend, data, host, e->count * sizeof(float));
}

ds_status ds_trainer_to_model(ds_trainer *tr, ds_model **model)
{
    float *host = malloc(tr->n_floats * sizeof(float));
    if (!host)
        return ds_fail(DS_ERR_NOMEM, "out of memory");
    model_params params;
    ds_model_params_bind(&params, host);
    ds_status rc = ds_backend_download(tr->backend, host, tr->mem[0], tr->n_floats * sizeof(float));
    if (rc == DS_OK)
        rc = ds_model_from_parameters(model, &params, tr->cfg.math_mode);
    free(host);
    return rc;
}

ds_status ds_trainer_load(ds_trainer *tr, const char *path)
{
    st_file file;
    DS_TRY(ds_st_read(&file, path));
    ds_status rc = DS_OK;
    /* validate everything first, then copy: nothing changes on error */
    for (int pass = 0; pass < 2 && rc == DS_OK; pass++) {
        for (int i = 0; i < file.ntensors && rc == DS_OK; i++) {
            const st_tensor *t = &file.tensors[i];
            float *data;
            const ds_param_entry *e;
            if (strncmp(t->name, "grad.", 5) == 0 || tensor_by_name(tr, t->name, &data, &e) != DS_OK) {
                rc = ds_fail(DS_ERR_FORMAT, "'%s' has an unexpected tensor '%s'", path, t->name);
                break;
            }
            int same = t->ndim == e->ndim;
            for (int d = 0; same && d < e->ndim; d++)
                same = t->shape[d] == e->shape[d];
            if (!same) {
                rc = ds_fail(DS_ERR_FORMAT, "'%s': tensor '%s' does not have the architecture's shape", path, t->name);
                break;
            }
            if (pass == 0) {
                for (size_t j = 0; j < t->count; j++) {
                    float value;
                    memcpy(&value, t->data + 4 * j, 4);
                    if (!isfinite(value)) {
                        rc = ds_fail(DS_ERR_FORMAT, "'%s': tensor '%s' holds NaN or Inf values", path, t->name);
                        break;
                    }
                }
            } else {
                rc = ds_backend_upload(tr->backend, data, t->data, t->count * sizeof(float));
            }
        }
        if (pass == 0 && rc == DS_OK)
            for (int i = 0; i < tr->table[0]->count; i++)
                if (!ds_st_find(&file, tr->table[0]->entries[i].name)) {
                    rc = ds_fail(DS_ERR_FORMAT, "'%s' lacks parameter '%s'", path, tr->table[0]->entries[i].name);
                    break;
                }
        if (pass == 0 && rc == DS_OK) {
            /* moments absent from the file start at zero */
            rc = ds_backend_zero(tr->backend, tr->mem[2], tr->n_floats * sizeof(float));
            if (rc == DS_OK)
                rc = ds_backend_zero(tr->backend, tr->mem[3], tr->n_floats * sizeof(float));
        }
    }
    ds_st_free(&file);
    return rc;
}
