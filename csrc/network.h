/* network.h - the DeepSpot network written down once (docs/reference_model.md section 1), llm.c / ggml
 * style: a table of layers in forward order, each naming its input and output tensors, its
 * parameters (by name and by place in model_params) and its settings. Everything that needs the
 * architecture is made from this table: the parameter names and shapes of the weights file
 * (model.c), the inference plan (model.c; BatchNorms folded into the convolution before them and
 * residual adds fused as a planning pass) and the training graph (train.c, nothing folded; its
 * inference mode is trainer_evaluate's forward). Shapes are not in the table: they follow from the
 * input by TF 'same' padding as each builder goes. */
#ifndef DS_NETWORK_H
#define DS_NETWORK_H

#include <stddef.h>

#include "model.h"

typedef enum {
    DS_LAYER_CONV,   /* (transposed) convolution with bias */
    DS_LAYER_BN,     /* batch norm, then ReLU if relu */
    DS_LAYER_POOL,   /* the CASO max-pool (DS_POOL_KERNEL, DS_POOL_STRIDE, TF 'same') */
    DS_LAYER_CONCAT, /* channel concatenation of in[0..n_in) */
    DS_LAYER_ADD,    /* out = in[0] + in[1] (then ReLU if relu); training applies spatial dropout to in[0] */
} ds_layer_kind;

typedef struct {
    ds_layer_kind kind;
    int stage; /* STAGE_ENCODER, STAGE_TRUNK or STAGE_DECODER */
    int in[CONCAT_MAX_INPUTS], n_in, out; /* tensor ids */
    char name[48];  /* conv, bn: the parameters' name prefix in the weights file, e.g. "trunk.block01.conv2" */
    size_t params;  /* conv, bn: byte offset of its conv_params / bn_params in model_params */
    int in_channels, out_channels, kernel; /* conv (bn: out_channels) */
    int transposed, stride, dilation;      /* conv */
    int relu;                              /* bn, add */
} ds_layer;

#define DS_MAX_LAYERS 160
#define DS_MAX_TENSORS 160

typedef struct {
    ds_layer layers[DS_MAX_LAYERS];
    int n_layers;
    int n_tensors;
    int channels[DS_MAX_TENSORS];  /* of each tensor */
    int stage_input[DS_STAGES];    /* the tensor each stage starts from; stage_input[STAGE_ENCODER] is the image */
    int output;                    /* the head's logits (inference applies the sigmoid) */
} ds_network;

/* The table (always the same; cheap to make). */
void ds_network_describe(ds_network *net);

/* The parameters of a conv or bn layer in p. */
conv_params *ds_layer_conv(const ds_layer *layer, model_params *p);
bn_params *ds_layer_bn(const ds_layer *layer, model_params *p);

#endif
