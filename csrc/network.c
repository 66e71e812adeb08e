/* network.c - the one description of the DeepSpot network (see network.h): the layer table in the
 * order of the weights file, which is also the training graph's forward order. */
#include "network.h"

#include <stdio.h>
#include <string.h>

#define PARAM_OFFSET(field) ((size_t)((const char *)&layout.field - (const char *)&layout))
static const model_params layout; /* only its addresses are used */

static int new_tensor(ds_network *net, int channels)
{
    net->channels[net->n_tensors] = channels;
    return net->n_tensors++;
}

static ds_layer *add_layer(ds_network *net, ds_layer_kind kind, int stage, const int *in, int n_in, int channels)
{
    ds_layer *l = &net->layers[net->n_layers++];
    *l = (ds_layer){.kind = kind, .stage = stage, .n_in = n_in, .out_channels = channels};
    memcpy(l->in, in, (size_t)n_in * sizeof *in);
    l->out = new_tensor(net, channels);
    return l;
}

static int conv(ds_network *net, int stage, int in, const char *name, size_t params, int out_channels, int kernel,
                int transposed, int stride, int dilation)
{
    ds_layer *l = add_layer(net, DS_LAYER_CONV, stage, &in, 1, out_channels);
    snprintf(l->name, sizeof l->name, "%s", name);
    l->params = params;
    l->in_channels = net->channels[in];
    l->kernel = kernel;
    l->transposed = transposed;
    l->stride = stride;
    l->dilation = dilation;
    return l->out;
}

static int bn(ds_network *net, int stage, int in, const char *name, size_t params, int relu)
{
    ds_layer *l = add_layer(net, DS_LAYER_BN, stage, &in, 1, net->channels[in]);
    snprintf(l->name, sizeof l->name, "%s", name);
    l->params = params;
    l->relu = relu;
    return l->out;
}

static int add(ds_network *net, int stage, int a, int b, int relu)
{
    int in[2] = {a, b};
    ds_layer *l = add_layer(net, DS_LAYER_ADD, stage, in, 2, net->channels[a]);
    l->relu = relu;
    return l->out;
}

void ds_network_describe(ds_network *net)
{
    static const char *caso_names[CASO_PATHS] = {"strided", "maxpool", "atrous"};
    static const int caso_filters[3] = {32, 64, 128};
    static const int up_filters[3][3] = {{256, 128, 128}, {128, 64, 64}, {64, 32, 32}};
    char name[48];
    memset(net, 0, sizeof *net);
    int t = new_tensor(net, 1);
    net->stage_input[STAGE_ENCODER] = t;

    /* CASO: three paths from the image, concatenated at 1/8 resolution */
    int paths[CASO_PATHS];
    for (int path = 0; path < CASO_PATHS; path++) {
        int h = t;
        for (int i = 0; i < 3; i++) {
            snprintf(name, sizeof name, "caso.%s.conv%d", caso_names[path], i + 1);
            h = conv(net, STAGE_ENCODER, h, name, PARAM_OFFSET(caso[path].conv[i]), caso_filters[i], 3, 0,
                     path == CASO_STRIDED ? 2 : 1, path == CASO_ATROUS ? 2 : 1);
            snprintf(name, sizeof name, "caso.%s.bn%d", caso_names[path], i + 1);
            h = bn(net, STAGE_ENCODER, h, name, PARAM_OFFSET(caso[path].bn[i]), 1);
            if (path != CASO_STRIDED)
                h = add_layer(net, DS_LAYER_POOL, STAGE_ENCODER, &h, 1, net->channels[h])->out;
        }
        paths[path] = h;
    }
    int concat_channels = net->channels[paths[0]] + net->channels[paths[1]] + net->channels[paths[2]];
    t = add_layer(net, DS_LAYER_CONCAT, STAGE_ENCODER, paths, CASO_PATHS, concat_channels)->out;
    net->stage_input[STAGE_TRUNK] = t;

    /* trunk: full pre-activation bottlenecks; block 1's shortcut is a convolution, the others' the identity */
    for (int b = 0; b < DS_TRUNK_BLOCKS; b++) {
        int h = t, shortcut = t;
        for (int i = 0; i < 3; i++) {
            snprintf(name, sizeof name, "trunk.block%02d.bn%d", b + 1, i + 1);
            h = bn(net, STAGE_TRUNK, h, name, PARAM_OFFSET(trunk[b].bn[i]), 1);
            snprintf(name, sizeof name, "trunk.block%02d.conv%d", b + 1, i + 1);
            h = conv(net, STAGE_TRUNK, h, name, PARAM_OFFSET(trunk[b].conv[i]), 128, i == 1 ? 3 : 1, 0, 1, 1);
        }
        if (b == 0) {
            shortcut = conv(net, STAGE_TRUNK, t, "trunk.block01.shortcut.conv", PARAM_OFFSET(trunk[0].shortcut_conv),
                            128, 1, 0, 1, 1);
            shortcut = bn(net, STAGE_TRUNK, shortcut, "trunk.block01.shortcut.bn", PARAM_OFFSET(trunk[0].shortcut_bn),
                          0);
        }
        t = add(net, STAGE_TRUNK, h, shortcut, 0);
    }
    net->stage_input[STAGE_DECODER] = t;

    /* decoder: three up-residual blocks (transposed convolutions), then the 1x1 head */
    for (int j = 0; j < 3; j++) {
        int h = t, s;
        for (int i = 0; i < 3; i++) {
            snprintf(name, sizeof name, "decoder.up%d.convt%d", j + 1, i + 1);
            h = conv(net, STAGE_DECODER, h, name, PARAM_OFFSET(decoder[j].convt[i]), up_filters[j][i], 3, 1,
                     i == 0 ? 2 : 1, 1);
            snprintf(name, sizeof name, "decoder.up%d.bn%d", j + 1, i + 1);
            h = bn(net, STAGE_DECODER, h, name, PARAM_OFFSET(decoder[j].bn[i]), i < 2);
        }
        snprintf(name, sizeof name, "decoder.up%d.shortcut.convt", j + 1);
        s = conv(net, STAGE_DECODER, t, name, PARAM_OFFSET(decoder[j].shortcut_convt), up_filters[j][1], 3, 1, 2, 1);
        snprintf(name, sizeof name, "decoder.up%d.shortcut.bn", j + 1);
        s = bn(net, STAGE_DECODER, s, name, PARAM_OFFSET(decoder[j].shortcut_bn), 0);
        t = add(net, STAGE_DECODER, h, s, 1);
    }
    net->output = conv(net, STAGE_DECODER, t, "head.conv", PARAM_OFFSET(head), 1, 1, 0, 1, 1);
}

conv_params *ds_layer_conv(const ds_layer *layer, model_params *p)
{
    return (conv_params *)((char *)p + layer->params);
}

bn_params *ds_layer_bn(const ds_layer *layer, model_params *p)
{
    return (bn_params *)((char *)p + layer->params);
}
