/* op_shapes.c - the output sizes of the shaped ops and the checks every backend makes when an op is
 * built (ops.h), written once so that both backends and the Python glue accept and refuse exactly
 * the same ops, with the same messages. */
#include "ops.h"

ds_status ds_conv_output_size(conv_desc *d)
{
    if (d->kernel < 1 || d->stride < 1 || d->dilation < 1 || d->pad_before < 0 || d->pad_after < 0)
        return ds_fail(DS_ERR_VALUE, "convolution: kernel, stride, dilation >= 1 and padding >= 0 expected");
    int span = (d->kernel - 1) * d->dilation + 1;
    if (d->transposed) {
        d->out_height = (d->in_height - 1) * d->stride + span - d->pad_before - d->pad_after;
        d->out_width = (d->in_width - 1) * d->stride + span - d->pad_before - d->pad_after;
    } else {
        d->out_height = (d->in_height + d->pad_before + d->pad_after - span) / d->stride + 1;
        d->out_width = (d->in_width + d->pad_before + d->pad_after - span) / d->stride + 1;
    }
    if (d->out_height < 1 || d->out_width < 1)
        return ds_fail(DS_ERR_VALUE, "convolution: empty output");
    return DS_OK;
}

ds_status ds_conv_desc_check(const conv_desc *d)
{
    conv_desc expect = *d;
    if (d->batch < 1 || d->in_channels < 1 || d->out_channels < 1 || ds_conv_output_size(&expect) != DS_OK ||
        expect.out_height != d->out_height || expect.out_width != d->out_width)
        return ds_fail(DS_ERR_VALUE, "convolution: inconsistent shape (input %dx%d, output %dx%d, kernel %d, stride %d)",
                       d->in_height, d->in_width, d->out_height, d->out_width, d->kernel, d->stride);
    return DS_OK;
}

ds_status ds_maxpool_output_size(int height, int width, int kernel, int stride, int pad_before, int pad_after,
                                 int *out_height, int *out_width)
{
    if (kernel < 1 || stride < 1 || pad_before < 0 || pad_after < 0 || pad_before >= kernel || pad_after >= kernel)
        return ds_fail(DS_ERR_VALUE, "maxpool: kernel, stride >= 1 and 0 <= padding < kernel expected");
    *out_height = (height + pad_before + pad_after - kernel) / stride + 1;
    *out_width = (width + pad_before + pad_after - kernel) / stride + 1;
    if (*out_height < 1 || *out_width < 1)
        return ds_fail(DS_ERR_VALUE, "maxpool: empty output");
    return DS_OK;
}

ds_status ds_maxpool_shape_check(int batch, int channels, int height, int width, int out_height, int out_width,
                                 int kernel, int stride, int pad_before, int pad_after)
{
    int expect_h, expect_w;
    if (batch < 1 || channels < 1 || height < 1 || width < 1 || kernel > MAXPOOL_MAX_KERNEL ||
        ds_maxpool_output_size(height, width, kernel, stride, pad_before, pad_after, &expect_h, &expect_w) != DS_OK ||
        expect_h != out_height || expect_w != out_width)
        return ds_fail(DS_ERR_VALUE, "max-pool: inconsistent shape");
    return DS_OK;
}
