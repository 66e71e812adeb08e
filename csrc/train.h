/* train.h - training the DeepSpot network in C (docs/reference_model.md section 2): forward in training
 * mode (batch statistics or, frozen, the moving ones; spatial dropout), the loss, the backward pass through the whole network
 * and the Keras Adam update, with the BN moving statistics updated as Keras does.
 *
 * Memory, llm.c style: parameters, gradients and the two Adam moments are four arenas of the same
 * layout (model_params structs bound with ds_model_params_bind); the activations, gradients of
 * activations and saved statistics of one (batch, height, width) live in one arena, placed by
 * lifetime over the forward-then-backward schedule. All of it is backend memory (ops.h): on the
 * GPU it never leaves the device except through the functions below that take host pointers.
 * The backend's ops are built once per shape (a few shapes are cached) and reused. No function
 * exits or aborts: each returns a ds_status. */
#ifndef DS_TRAIN_H
#define DS_TRAIN_H

#include <stddef.h>

#include "model.h"
#include "ops.h"
#include "status.h"

typedef struct {
    float learning_rate; /* Adam, Keras defaults for DeepSpot: 1e-4, 0.9, 0.999, 1e-7 */
    double beta1, beta2;
    float adam_epsilon;
    float dropout_rate;  /* SpatialDropout2D rate (0.2); 0 turns dropout off */
    double bn_momentum;  /* 0.99: moving = moving * momentum + batch * (1 - momentum) */
    int bn_bessel;       /* 0: the moving variance takes the biased batch variance (Keras 3, what the
                            installed TF does); 1: the unbiased n/(n-1) one (TF 2.x fused batch norm,
                            which trained the published weights) */
    int bn_frozen;       /* 0: batch norm trains on the batch statistics (Keras' training mode); 1: it
                            normalises with the moving statistics, held constant (frozen, for fine-tuning:
                            the network trained is the one inference runs); fixed at ds_trainer_create */
    int bce_mode;        /* DS_BCE_LOGITS (what Keras fit computes for a sigmoid output) or DS_BCE_CLIPPED */
    int max_mode;        /* DS_MAX_BATCH (the authors' code), DS_MAX_PER_IMAGE (the paper), DS_MAX_NONE */
    unsigned long long seed; /* dropout masks are a pure function of (seed, step, layer, sample, channel) */
    int math_mode;       /* DS_MATH_FLOAT32 or DS_MATH_TF32 (GPU only); fixed at ds_trainer_create */
} ds_train_config;

void ds_train_config_default(ds_train_config *config);

typedef struct {
    double loss, bce, max_term;
} ds_loss_value;

typedef struct ds_trainer ds_trainer;

/* A trainer starting from the parameters `init` (copied; all pointers set, e.g. ds_model_parameters()). */
ds_status ds_trainer_create(ds_trainer **trainer, const model_params *init, const ds_train_config *config);
void ds_trainer_free(ds_trainer *trainer);
const ds_train_config *ds_trainer_get_config(const ds_trainer *trainer);
ds_status ds_trainer_set_config(ds_trainer *trainer, const ds_train_config *config);

/* images, targets: [batch, height, width] float32 (one channel); sides positive multiples of 8.
 * One optimisation step: training-mode forward, loss, backward, Adam, moving statistics, step count + 1.
 * The loss reported is the one of the forward pass, before the update (as Keras reports it). */
ds_status ds_trainer_step(ds_trainer *trainer, int batch, int height, int width, const float *images,
                          const float *targets, ds_loss_value *loss);
/* The same forward and backward, but nothing is updated: the gradients are left in trainer_gradients(). */
ds_status ds_trainer_compute_gradients(ds_trainer *trainer, int batch, int height, int width, const float *images,
                                       const float *targets, ds_loss_value *loss);
/* Inference-mode forward (moving statistics, no dropout) and the loss; pred (may be NULL) gets the
 * sigmoid map [batch, height, width]; targets may be NULL (then loss is not computed). */
ds_status ds_trainer_evaluate(ds_trainer *trainer, int batch, int height, int width, const float *images,
                              const float *targets, float *pred, ds_loss_value *loss);

long ds_trainer_step_count(const ds_trainer *trainer);
void ds_trainer_set_step_count(ds_trainer *trainer, long step);

/* A tensor of the trainer by name: "<parameter>" (e.g. "head.conv.weight"), "grad.<parameter>",
 * "adam.m.<parameter>", "adam.v.<parameter>"; entry gets its shape. DS_ERR_VALUE if there is none. */
ds_status ds_trainer_find_tensor(const ds_trainer *trainer, const char *name, const ds_param_entry **entry);
/* Copies a tensor (by name, as above) to / from host memory of entry->count floats; written values must be finite. */
ds_status ds_trainer_read_tensor(ds_trainer *trainer, const char *name, float *host);
ds_status ds_trainer_write_tensor(ds_trainer *trainer, const char *name, const float *host);
/* An inference model (folded, same backend and math mode) from the current parameters. */
ds_status ds_trainer_to_model(ds_trainer *trainer, ds_model **model);
/* Number of parameter tensors and the table entry of the i-th (names and shapes, in file order). */
int ds_trainer_num_tensors(const ds_trainer *trainer);
const ds_param_entry *ds_trainer_tensor_entry(const ds_trainer *trainer, int index);
/* Loads every tensor of a safetensors file into the trainer by name (parameters required; the
 * "adam.m." / "adam.v." moments optional, zero when absent); nothing is changed on error. */
ds_status ds_trainer_load(ds_trainer *trainer, const char *path);
/* Bytes of the activation arena that the largest shape used so far needs. */
size_t ds_trainer_arena_bytes(const ds_trainer *trainer);

#endif
