/* model.h - the DeepSpot network (docs/reference_model.md section 1): its parameters, loaded from a
 * safetensors file into one host arena, and its inference forward pass on the ops.h backend
 * (whichever this file is compiled with). Inputs and outputs are host memory. */
#ifndef DS_MODEL_H
#define DS_MODEL_H

#include <stddef.h>
#include "ops.h"
#include "status.h"

#define DS_BN_EPSILON 1e-3f
#define DS_TRUNK_BLOCKS 13
#define DS_SIZE_MULTIPLE 8 /* three stride-2 stages down, three up */
#define DS_POOL_KERNEL 3   /* the CASO max-pools: 3x3, stride 2, TF 'same' */
#define DS_POOL_STRIDE 2

typedef struct {
    float *weight; /* [out, in, k, k]; for transposed convs `out` is the upsampled side */
    float *bias;   /* [out] */
    int out_channels, in_channels, kernel;
} conv_params;

typedef struct {
    float *gamma, *beta, *moving_mean, *moving_variance;
    int channels;
} bn_params;

enum { CASO_STRIDED, CASO_MAXPOOL, CASO_ATROUS, CASO_PATHS };

typedef struct {
    struct {
        conv_params conv[3];
        bn_params bn[3];
    } caso[CASO_PATHS];
    struct {
        bn_params bn[3]; /* pre-activation: bn[i] comes before conv[i] */
        conv_params conv[3];
        conv_params shortcut_conv; /* block 1 only */
        bn_params shortcut_bn;
    } trunk[DS_TRUNK_BLOCKS];
    struct {
        conv_params convt[3]; /* bn[i] comes after convt[i] */
        bn_params bn[3];
        conv_params shortcut_convt;
        bn_params shortcut_bn;
    } decoder[3];
    conv_params head;
} model_params;

typedef struct ds_model ds_model;

/* The layer shapes the inference plan and the training graph share, with TF 'same' padding: a (transposed)
 * convolution of an input of in_channels x height x width by c, and a CASO max-pool. */
void ds_model_conv_desc(conv_desc *d, int batch, int in_channels, int height, int width, const conv_params *c,
                        int transposed, int stride, int dilation, unsigned post);
void ds_model_pool_shape(int height, int width, int *out_height, int *out_width, int *pad_before, int *pad_after);

/* math_mode: DS_MATH_FLOAT32 or DS_MATH_TF32 (ops.h; GPU only). */
ds_status ds_model_load(ds_model **model, const char *weights_path, int math_mode);
void ds_model_free(ds_model *model);
size_t ds_model_num_parameters(const ds_model *model);
int ds_model_math_mode(const ds_model *model);
const model_params *ds_model_parameters(const ds_model *model);

/* The network in three stages, so that large images can be tiled stage by stage with exact
 * halos (each stage's receptive field is small at its own resolution): the encoder (CASO,
 * 1 -> 384 channels at 1/8 resolution), the trunk (384 -> 128, same resolution) and the decoder
 * (128 channels at 1/8 -> the sigmoid map at full resolution). */
enum { STAGE_ENCODER, STAGE_TRUNK, STAGE_DECODER, DS_STAGES };

/* Channels and output size of running stages first..last on an input of height x width. */
ds_status ds_model_stage_shapes(int first_stage, int last_stage, int height, int width, int *in_channels,
                                int *out_channels, int *out_height, int *out_width);
/* input [batch, height, width, in_channels] -> output [batch, out_height, out_width, out_channels], NHWC.
 * Not thread-safe: one call at a time per model. */
ds_status ds_model_forward_stages(ds_model *m, int first_stage, int last_stage, int batch, int height, int width,
                                  const float *input, float *output);

/* The whole network; input, output: [batch, height, width] float32 (one channel); height and width multiples of 8.
 * Not thread-safe: one call at a time per model. */
ds_status ds_model_forward(ds_model *model, int batch, int height, int width, const float *input, float *output);

/* ---- the parameter table, for training and checkpoints (csrc/train.c) ---- */

#define DS_MAX_PARAM_ENTRIES 512

typedef struct {
    char name[96];  /* the safetensors name, e.g. "trunk.block01.conv2.weight" */
    int ndim;
    int shape[4];
    size_t count;   /* number of floats */
    float **slot;   /* the pointer of the model_params that the table was made from */
} ds_param_entry;

typedef struct {
    ds_param_entry entries[DS_MAX_PARAM_ENTRIES];
    int count;
} ds_param_table;

/* Every tensor of the architecture in its fixed order (the order of ds_model_params_bind). Also fills
 * p's channel and kernel fields; p's pointers are only referenced, not read. */
void ds_model_param_table(model_params *p, ds_param_table *table);
/* Floats of an arena holding every tensor, each aligned to 64 bytes (4,037,249 values plus alignment). */
size_t ds_model_param_floats(void);
/* Points every tensor of p into arena (ds_model_param_floats() floats), in table order, 64-byte aligned. */
void ds_model_params_bind(model_params *p, float *arena);
/* An inference model from parameters in host memory (copied; p's pointers must all be set). */
ds_status ds_model_from_parameters(ds_model **model, const model_params *p, int math_mode);

#endif
